#!/usr/bin/env bash
# Debian/Ubuntu system libraries the Python packages need but do not ship (open3d's GL/USB libraries; Chromium
# for the report-rendering tests). Installs what is missing when run as root (or with sudo), otherwise stops
# with the exact command to run. Anything but a dpkg-based Linux: nothing to do (the wheels bring their own).
#   usage: scripts/system_deps.sh run|test
set -euo pipefail

RUN_PKGS=(libusb-1.0-0 libgl1 libegl1 libx11-6 libgomp1)
TEST_PKGS=(chromium)

case "${1:-run}" in
  run) want=("${RUN_PKGS[@]}") ;;
  test) want=("${RUN_PKGS[@]}" "${TEST_PKGS[@]}") ;;
  *) echo "error: scripts/system_deps.sh takes 'run' or 'test', not '$1'" >&2; exit 2 ;;
esac

if [ "$(uname -s)" != Linux ] || ! command -v dpkg-query >/dev/null 2>&1; then
  exit 0
fi

missing=()
for pkg in "${want[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" = installed ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

cmd="apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then
  echo "installing missing system packages: ${missing[*]}"
  bash -c "$cmd"
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  echo "installing missing system packages with sudo: ${missing[*]}"
  sudo bash -c "$cmd"
else
  echo "error: missing system packages ${missing[*]}; install them first with:" >&2
  echo "  sudo bash -c '$cmd'" >&2
  exit 2
fi
