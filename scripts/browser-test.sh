#!/usr/bin/env bash
# fairgate's browser tests: the fan, operator and organizer pages driven in headless Chromium
# (Debian's `chromium` package) by playwright-core, against the three real services started by
# the tests themselves on free ports, with their own database and Redis prefix. Screenshots of
# every page go to target/e2e-artifacts/ (FAIRGATE_E2E_ARTIFACTS to change it).
#
# Installs what it needs on a fresh Debian machine: the `chromium` package (as root, with
# apt-get) and playwright-core from the npm registry (e2e/package-lock.json). Nothing downloads
# a browser: playwright-core drives /usr/bin/chromium (FAIRGATE_CHROMIUM to use another).
set -euo pipefail
source "$(dirname "$0")/lib/infra.sh"
cd "$FG_ROOT"
fg_infra_up

CHROMIUM="${FAIRGATE_CHROMIUM:-/usr/bin/chromium}"
apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
    || fg_die "the browser tests need the Debian packages: $* (sudo apt-get install -y $*)"
  fg_say "installing $* from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "$@" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$@" >/dev/null; }
}
[ -x "$CHROMIUM" ] || apt_install chromium
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || apt_install nodejs npm
if [ ! -d e2e/node_modules/playwright-core ]; then
  fg_say "installing playwright-core from the npm registry"
  (cd e2e && npm ci --no-audit --no-fund --loglevel=error)
fi

fg_say "building the services for the browser tests"
cargo build --quiet -p fairgate-buffer -p fairgate-queue -p fairgate-purchase

export FAIRGATE_CHROMIUM="$CHROMIUM"
export FAIRGATE_E2E_BIN="${CARGO_TARGET_DIR:-$FG_ROOT/target}/debug"
export FAIRGATE_E2E_ARTIFACTS="${FAIRGATE_E2E_ARTIFACTS:-$FG_ROOT/target/e2e-artifacts}"
rm -rf "$FAIRGATE_E2E_ARTIFACTS" && mkdir -p "$FAIRGATE_E2E_ARTIFACTS"
fg_say "running the browser tests (screenshots in $FAIRGATE_E2E_ARTIFACTS)"
node --test --test-concurrency=1 e2e/
