"""Open an HTML page in headless Chromium (Debian's ``chromium``) and report what a reader would
meet: images that did not load, script errors, blocked resources, console errors.

The page under test is copied with a small script placed first in its ``<head>``, before the
page's own Content-Security-Policy (a policy set by <meta> applies only to what follows it). On
``load`` the script writes a JSON verdict into the DOM, which ``--dump-dom`` prints.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

MARK = "skipgrad-browser-check"

CHECK_SCRIPT = """<script>
(() => {
  const errors = [];
  window.addEventListener("error", ev => {
    const t = ev.target;
    errors.push(t && t !== window ? "failed to load " + (t.src || t.href || t.tagName)
                                  : "script error: " + ev.message);
  }, true);
  document.addEventListener("securitypolicyviolation",
    ev => errors.push("blocked by CSP: " + ev.blockedURI + " (" + ev.violatedDirective + ")"));
  const original = console.error;
  console.error = (...args) => { errors.push("console.error: " + args.join(" ")); original(...args); };
  window.addEventListener("load", () => {
    const images = Array.from(document.images);
    const verdict = {
      images: images.length,
      broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60)),
      errors: errors,
    };
    const pre = document.createElement("pre");
    pre.id = "MARK";
    pre.textContent = JSON.stringify(verdict);
    document.body.appendChild(pre);
  });
})();
</script>""".replace("MARK", MARK)

# A console message of the page in Chromium's log (``...:INFO:CONSOLE:57] "text", source: URL
# (57)``; older builds write ``CONSOLE(57)``). The report runs no script, so any is a problem;
# Chromium's other log lines (no D-Bus in a container, no GPU) are about the browser, not the page.
_CONSOLE = re.compile(r":[A-Z0-9]+:CONSOLE[:(]\d+\)?\] \"(.*)\", source: (.*)$")


def chromium() -> str | None:
    """The Chromium binary, or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> str:
    """The binary; skip when it is absent outside CI, fail when it is absent in CI (where
    ``.ci/run`` installs it)."""
    binary = chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed, and CI must run the browser test "
                        "(.ci/run installs it with apt-get)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); the browser "
                    "test runs in CI")
    return binary


def _run(binary: str, profile: str, *args: str) -> subprocess.CompletedProcess:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update", "--no-first-run",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--enable-logging=stderr",
               "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def check_page(page: Path) -> dict:
    """Load ``page`` in Chromium: ``{"images": n, "broken": [...], "errors": [...]}``, where
    errors also holds every console message Chromium logged for the page."""
    binary = require_chromium()
    text = Path(page).read_text(encoding="utf-8")
    assert "<head>" in text, "no <head> to put the check script in"
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "page.html"
        probe.write_text(text.replace("<head>", "<head>\n" + CHECK_SCRIPT, 1), encoding="utf-8")
        done = _run(binary, str(Path(tmp) / "profile"), "--virtual-time-budget=10000",
                    "--dump-dom", probe.as_uri())
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    found = re.search(rf'<pre id="{MARK}">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the check script did not report (no load event?): {done.stderr[-2000:]}"
    import html

    verdict = json.loads(html.unescape(found.group(1)))
    verdict["errors"] += [f"console: {m.group(1)}" for line in done.stderr.splitlines()
                          if (m := _CONSOLE.search(line))]
    return verdict


def screenshot(page: Path, png: Path, size: str = "1200,2000") -> Path:
    """A screenshot of the top ``size`` (width,height) of ``page``."""
    binary = require_chromium()
    with tempfile.TemporaryDirectory() as tmp:
        done = _run(binary, str(Path(tmp) / "profile"), f"--screenshot={png}",
                    f"--window-size={size}", "--hide-scrollbars", Path(page).resolve().as_uri())
    assert done.returncode == 0 and png.is_file(), done.stderr[-2000:]
    return png
