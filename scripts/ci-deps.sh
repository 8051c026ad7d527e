#!/usr/bin/env bash
# System packages the test suite needs beyond Python: Chromium for the Flower browser test
# (tests/system/test_flower.py drives /usr/bin/chromium through Playwright; Playwright's own browser
# download is not used). Idempotent: does nothing when Chromium is already there.
#
#   scripts/ci-deps.sh          # from .ci/run, before `make test`
#
# Debian/Ubuntu only. Needs root (CI runs as root); otherwise it prints the command to run and exits 1.
set -euo pipefail

CHROMIUM="${DSPEX_TEST_CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
    echo "ci-deps: chromium present ($("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM"))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci-deps: no apt-get here; install Chromium yourself and set DSPEX_TEST_CHROMIUM to its path" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ci-deps: not root; run: apt-get update && apt-get install -y --no-install-recommends chromium" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium
echo "ci-deps: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
