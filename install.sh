#!/usr/bin/env bash
# Installs forkvm and everything it needs on a Debian/Ubuntu machine, builds the guest image
# and the default template (cached under ~/.cache/forkvm, keyed by their inputs), then runs a
# real cell in a forkvm kernel. Safe to run again: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PYTHON="${PYTHON:-python3}"

APT_PACKAGES=(
  qemu-system-x86 qemu-utils       # the portable VM backend
  linux-source-6.1                 # the guest kernel is built from Debian's source
  build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils  # to build it
  busybox-static                   # the guest's shell and tools
  chromium                         # headless browser for the JupyterLab tests
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> apt-get install ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

echo "==> pip install forkvm (with test extras)"
"$PYTHON" -m pip install -q --disable-pip-version-check '.[test]'

echo "==> forkvm doctor"
forkvm doctor

echo "==> forkvm template build (guest kernel ~4 min and root filesystem ~30 s the first time)"
forkvm template build

echo "==> a forkvm kernel answering a cell"
forkvm run "import numpy; print('numpy says', numpy.arange(10).sum())"
