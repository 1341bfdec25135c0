#!/usr/bin/env bash
# Installs Debian's chromium for the dashboard's browser test (tests/integration/test_dashboard_browser.py), which
# Playwright drives by its executable path: no browser is ever downloaded by Playwright itself.
# Not root, or no apt-get: says so and exits 0; the browser test then skips, naming this script.
set -euo pipefail
for name in chromium chromium-browser; do
  if command -v "$name" >/dev/null 2>&1; then
    echo "install_browser: $(command -v "$name") is already installed"
    exit 0
  fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no apt-get on this machine; install Chromium yourself (or set CHROMIUM_PATH)," \
       "else the dashboard's browser test is skipped"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_browser: not root; run 'sudo apt-get install -y chromium' (or set CHROMIUM_PATH)," \
       "else the dashboard's browser test is skipped"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends chromium
echo "install_browser: installed $(command -v chromium)"
