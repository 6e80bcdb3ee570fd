#!/usr/bin/env bash
# Runs fairgate's whole test suite against real Postgres and Redis (reused if running,
# otherwise started privately for the run; see scripts/lib/infra.sh).
set -euo pipefail
source "$(dirname "$0")/lib/infra.sh"
cd "$FG_ROOT"
fg_infra_up

# Databases left by tests that crashed in an earlier run.
leftovers=$(psql "$FAIRGATE_TEST_DATABASE_URL" -Atqc \
  "SELECT datname FROM pg_database WHERE datname LIKE 'fgtest\_%'")
for db in $leftovers; do
  psql "$FAIRGATE_TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
done

# Each end-to-end test starts three services with their own Postgres pools: four at a time stay
# within a default Postgres's 100 connections (see shared/src/testing.rs).
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"
fg_say "running the test suite"
cargo test --workspace --all-targets "$@"

# fairgate on a real Redis Cluster (3 masters, 3 replicas, started here and stopped on exit):
# the integration tests that touch Redis, and a crowd sale, again and unchanged. (The cluster
# tests themselves, which kill nodes, start clusters of their own and already ran above.)
cluster_port="${FG_TEST_CLUSTER_PORT:-21001}"
fg_say "starting a Redis Cluster on 127.0.0.1:$cluster_port-$((cluster_port + 5))"
FG_CLEANUP+=("scripts/redis-cluster.sh stop $cluster_port $FG_DATA/redis-cluster")
cluster_url="$(scripts/redis-cluster.sh start "$cluster_port" "$FG_DATA/redis-cluster")"
fg_say "running the Redis-touching tests against the cluster ($cluster_url)"
FAIRGATE_TEST_REDIS_URL="$cluster_url" cargo test -p fairgate-buffer -p fairgate-queue \
  -p fairgate-purchase -p fairgate-loadtest --tests -- --skip cluster::

# A short chaos run: a crowd sale while Redis, a buffer, the admission leader and Postgres fail
# under it (its own Postgres and Redis; see scripts/chaos.sh), then every invariant checked.
fg_say "chaos smoke run"
scripts/chaos.sh --smoke --debug

# A sale operators can watch: a real Prometheus scrapes a small crowd sale with autotune on;
# every dashboard query returns data, the alert rules load, a fan's request id crosses all three
# services' logs (installs Debian's prometheus when missing).
fg_say "observability check"
scripts/observe.sh

# The pages in a real browser (installs Debian's chromium and playwright-core if missing).
if [ "${FAIRGATE_SKIP_BROWSER_TESTS:-0}" = 1 ]; then
  fg_say "skipping the browser tests (FAIRGATE_SKIP_BROWSER_TESTS=1)"
else
  scripts/browser-test.sh
fi
