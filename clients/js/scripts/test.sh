#!/bin/sh
# Installs, builds and tests the JavaScript SDK: unit tests (fake socket and clock), end-to-end
# tests in Node against a real shardcast node, and tests in headless Chromium.
#
#   SHARDCAST_BIN=path/to/shardcast clients/js/scripts/test.sh
#
# SHARDCAST_BIN defaults to target/release/shardcast, else target/debug/shardcast, of this
# repository. Chromium is installed with apt-get when missing (as root); CHROMIUM names
# another binary.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
repo=$(cd "$here/../.." && pwd)

if [ -n "${SHARDCAST_BIN:-}" ]; then
  SHARDCAST_BIN=$(cd "$(dirname "$SHARDCAST_BIN")" && pwd)/$(basename "$SHARDCAST_BIN")
elif [ -x "$repo/target/release/shardcast" ]; then
  SHARDCAST_BIN=$repo/target/release/shardcast
else
  SHARDCAST_BIN=$repo/target/debug/shardcast
fi
[ -x "$SHARDCAST_BIN" ] || { echo "no shardcast binary at $SHARDCAST_BIN: build one or set SHARDCAST_BIN" >&2; exit 1; }
export SHARDCAST_BIN

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium with apt-get" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "no chromium at $CHROMIUM: install it (apt-get install chromium) or set CHROMIUM" >&2
    exit 1
  fi
fi
export CHROMIUM

cd "$here"
npm ci --no-audit --no-fund --loglevel=error
npm run --silent build
npm run --silent typecheck
npm run --silent lint
node scripts/bundle.js
node --test --test-concurrency=1 test/unit.test.js test/e2e.test.js test/browser.test.js
