#!/usr/bin/env bash
# System packages the full test suite needs on Debian 12 (bookworm); a no-op for what is present.
#  - Mesa's lavapipe (software Vulkan) from bookworm-backports: stock Mesa 22.3 offers no adapter that
#    WebGPU accepts, 25.x does. Used by the WebGPU execution-provider test (issue 7).
#  - Debian's Chromium, driven by playwright-core in the in-browser demo test.
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v apt-get >/dev/null; then
  echo "system-deps: not a Debian system; install Mesa >= 25 (lavapipe), libvulkan1 and chromium by hand" >&2
  exit 1
fi
need=()
dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | grep -q '^25\.' || need+=(mesa)
dpkg -s libvulkan1 >/dev/null 2>&1 || need+=(vulkan)
command -v chromium >/dev/null || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ ! -f /etc/apt/sources.list.d/backports.list ] && ! grep -rqs bookworm-backports /etc/apt/sources.list.d/ /etc/apt/sources.list; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/backports.list >/dev/null
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers >/dev/null
$SUDO apt-get install -y -qq libvulkan1 chromium >/dev/null
