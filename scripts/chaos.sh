#!/usr/bin/env bash
# The chaos run (see loadtest/src/bin/chaos.rs): a real crowd sale through two buffers, two
# queue instances and the purchase service while Redis is killed and restarted empty, the
# event's keys are deleted again and again (during the draw's publication, a rebuild and live
# joins), a buffer is killed mid-draw, the admission leader is stopped past its lease and
# Postgres restarts in immediate mode during checkouts; then every invariant is checked.
# It runs on a Postgres of its own (started here under .data/chaos-pg, port 55433) so that it
# may restart it, and on a Redis of its own (port 56390, nothing kept on disk).
#
#   scripts/chaos.sh                      # 2,000 fans on the release build
#   scripts/chaos.sh --fans 5000 --seed 7 # any flag of `chaos --help`
#   scripts/chaos.sh --smoke --debug      # the test suite's short run, on the debug build
#
# Exit status non-zero if any invariant failed; the report is in loadtest/out/chaos/.
set -euo pipefail
source "$(dirname "$0")/lib/infra.sh"
cd "$FG_ROOT"

profile=release
args=()
for a in "$@"; do
  case "$a" in
    --debug) profile=debug ;;
    *) args+=("$a") ;;
  esac
done
command -v redis-server >/dev/null 2>&1 || fg_missing_packages "Redis"
if [ "$profile" = release ]; then
  fg_say "building the release binaries"
  cargo build --release --quiet -p fairgate-buffer -p fairgate-queue -p fairgate-purchase -p fairgate-loadtest
else
  cargo build --quiet -p fairgate-buffer -p fairgate-queue -p fairgate-purchase -p fairgate-loadtest --bins
fi

port="${FG_CHAOS_PG_PORT:-55433}"
fg_start_pg_at "$FG_DATA/chaos-pg" "$port"
mkdir -p loadtest/out/chaos
"target/$profile/chaos" --bin-dir "target/$profile" \
  --database-url "postgres://postgres@127.0.0.1:$port/postgres" \
  --pg-restart-command "$FG_PG_RESTART" --out loadtest/out/chaos "${args[@]+"${args[@]}"}"
