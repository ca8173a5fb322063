#!/usr/bin/env bash
# A headless Chromium for the results page's browser test (tests/test_results_page.py), from the
# system packages: Debian's `chromium` (the test drives it with Playwright's Python package, from
# the dev extras, pointed at this binary: no browser download).
#
#   scripts/install_browser.sh          # install chromium with apt-get when missing (needs root)
#   scripts/install_browser.sh --path   # print the browser's path (exit 1 when there is none)
#
# Idempotent: with a browser already installed it only says where it is. Called by .ci/run before
# `make test`; SCORE_BROWSER=/path/to/chromium points the test at another Chromium.
set -euo pipefail

say() { echo "install_browser: $*" >&2; }

find_browser() {
  local b
  for b in "${SCORE_BROWSER:-}" chromium chromium-browser google-chrome-stable google-chrome; do
    [ -n "$b" ] || continue
    if command -v "$b" >/dev/null 2>&1; then
      command -v "$b"
      return 0
    fi
  done
  return 1
}

if [ "${1:-}" = "--path" ]; then
  find_browser
  exit
fi

if where=$(find_browser); then
  say "browser present: $where"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  say "no Chromium and not root: install it with 'apt-get install -y chromium' (the browser test skips without it, and fails under CI)"
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  say "no Chromium and no apt-get: install a Chromium and set SCORE_BROWSER to its path"
  exit 1
fi
say "installing chromium (apt-get)"
# Another apt-get (the Slurm install, a second checkout) may hold the lock: wait for it.
apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
  --no-install-recommends chromium fonts-dejavu-core >/dev/null
where=$(find_browser) || { say "error: chromium installed but not on PATH"; exit 1; }
say "browser installed: $where ($("$where" --version 2>/dev/null || echo 'version unknown'))"
