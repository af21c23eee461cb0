#!/usr/bin/env bash
# The project's entry points on a fresh machine (needs only Python 3.11+, pip and, for the bundled
# Fashion-MNIST data, apt). Each command sets everything up first, so any of them may run first.
#
#   bash run.sh demo [skipgrad demo options]   # set up, then run the bundled Fashion-MNIST benchmark
#   bash run.sh test [pytest options]          # set up, then run the default test suite (~minutes)
#   bash run.sh test-slow                      # the slow tests (marked @pytest.mark.slow)
#   bash run.sh bench                          # benchmarks/ (ratios measured in one run)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then "$PYTHON" -m venv "$VENV"; fi
  # Reinstall only when the project metadata or the pinned versions changed since the last
  # install. constraints.txt pins the exact versions the tests ran with (pyproject has ranges).
  if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ] \
      || [ constraints.txt -nt "$VENV/.installed" ]; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
    touch "$VENV/.installed"
  fi
  bash scripts/install-fashion-mnist.sh
}

run_pytest() {
  # pytest exits 5 when it collects nothing: a failure here, never a pass.
  set +e
  "$VENV/bin/python" -m pytest "$@"
  rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
  exit "$rc"
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo)      setup; exec "$VENV/bin/skipgrad" demo "$@" ;;
  test)      setup; run_pytest -q "$@" ;;
  test-slow) setup; run_pytest -q -m slow "$@" ;;
  bench)     setup; for b in benchmarks/[!_]*.py; do echo "== $b"; "$VENV/bin/python" "$b"; done ;;
  setup)     setup ;;
  *) echo "usage: bash run.sh {demo|test|test-slow|bench|setup} [args]" >&2; exit 2 ;;
esac
