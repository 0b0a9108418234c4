#!/usr/bin/env bash
# The main-job report is checked in a real headless browser: Debian's Chromium. Installs it once
# when missing and apt is usable (root); otherwise says what to install. Prints the binary path.
set -euo pipefail
for b in "${MUGV_CHROMIUM:-}" chromium chromium-browser; do
  if [ -n "$b" ] && command -v "$b" >/dev/null 2>&1; then command -v "$b"; exit 0; fi
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "[mugv] installing Debian's chromium for the report's browser test" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  command -v chromium
  exit 0
fi
echo "[mugv] chromium not found: install Debian's 'chromium' package (or set MUGV_CHROMIUM) for the report's browser test" >&2
exit 1
