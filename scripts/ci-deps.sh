#!/usr/bin/env bash
# System tools the test suite needs beyond Python, from Debian's package registry:
#  - Chromium for the Flower browser test (tests/system/test_flower.py drives /usr/bin/chromium through
#    Playwright; Playwright's own browser download is not used);
#  - promtool (`promtool check metrics`, tests/unit/test_metrics_prom.py): taken out of Debian's `prometheus`
#    package into .cache/bin without installing the package, so no Prometheus service is set up or started.
# Idempotent: does nothing for a tool already there.
#
#   scripts/ci-deps.sh          # from .ci/run, before `make test`; prints the promtool path last
#
# Debian/Ubuntu only. Needs root (CI runs as root) for Chromium; otherwise it prints the command to run and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMIUM="${DSPEX_TEST_CHROMIUM:-/usr/bin/chromium}"
PROMTOOL_DIR="$PWD/.cache/bin"

SUDO=""
need_apt() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "ci-deps: no apt-get here; install $1 yourself" >&2
        exit 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            SUDO="sudo -n"
        else
            echo "ci-deps: not root; run: apt-get update && apt-get install -y --no-install-recommends $1" >&2
            exit 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
}

if [ -x "$CHROMIUM" ]; then
    echo "ci-deps: chromium present ($("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM"))"
else
    need_apt chromium
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends chromium
    echo "ci-deps: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
fi

if command -v promtool >/dev/null 2>&1; then
    echo "ci-deps: promtool present ($(command -v promtool))"
elif [ -x "$PROMTOOL_DIR/promtool" ]; then
    echo "ci-deps: promtool present ($PROMTOOL_DIR/promtool)"
else
    need_apt prometheus
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get download -qq prometheus 2>/dev/null) || { $SUDO apt-get update -qq; (cd "$work" && apt-get download -qq prometheus); }
    dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
    mkdir -p "$PROMTOOL_DIR"
    cp "$work/x/usr/bin/promtool" "$PROMTOOL_DIR/promtool"
    echo "ci-deps: promtool from Debian's prometheus package: $("$PROMTOOL_DIR/promtool" --version 2>&1 | head -1)"
fi
