#!/usr/bin/env bash
# Makes the Fashion-MNIST IDX files available: Debian's dataset-fashion-mnist package where apt is
# usable (this is the offline, real data the bundled benchmark uses). Elsewhere skipgrad falls back
# to torchvision's downloader at run time, so a failure here is reported but not fatal.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/t10k-images-idx3-ubyte.gz" ]; then exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian package dataset-fashion-mnist ..."
  apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null && exit 0
  echo "warning: apt-get could not install dataset-fashion-mnist" >&2
else
  echo "note: Fashion-MNIST not found in $dir and apt-get is not usable here;" \
       "skipgrad will try torchvision's downloader (set SKIPGRAD_FMNIST_DIR to a folder of IDX files)" >&2
fi
exit 0
