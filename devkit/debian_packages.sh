#!/bin/sh
# Install the Debian packages named as arguments that are missing (their command not on PATH): as
# root directly, otherwise through sudo; without either, stop with the exact command to run.
set -eu
missing=""
for p in "$@"; do
	command -v "$p" >/dev/null 2>&1 || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
install="apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300$missing"
if [ "$(id -u)" = 0 ]; then
	apt-get update && $install && exit 0
elif command -v sudo >/dev/null 2>&1; then
	echo "Installing$missing with sudo (the tests run them for real):"
	sudo apt-get update && sudo $install && exit 0
fi
echo "The tests need the Debian packages$missing. Install them, then run make test again:" >&2
echo "  sudo apt-get update && sudo $install" >&2
exit 1
