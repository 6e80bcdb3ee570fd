#!/usr/bin/env bash
# A big simulated sale on this machine, with the raw primitives measured in the same run:
# builds the release binaries, starts the buffer, QUEUES queue instances sharing one port
# (SO_REUSEPORT; one process holds only ~19,900 sockets here) and the purchase service on a
# private database and Redis prefix, measures `redis-benchmark` ZADD and a `pgbench`
# conditional seat UPDATE, then runs `crowd` spread over worker processes from their own
# loopback addresses. Not part of the test suite.
#
#   scripts/crowd-scale.sh                     # 30,000 fans, 15,000 seats
#   FANS=200000 SEATS=100000 QUEUES=12 PRESALE=240 scripts/crowd-scale.sh
#   CLUSTER=1 FANS=10000 SEATS=5000 scripts/crowd-scale.sh   # on a local Redis Cluster
#                                              # (scripts/redis-cluster.sh, 3 masters + 3 replicas)
#
# Results: the crowd's summary on stdout, loadtest/out/scale-<fans>.json / .html, and the
# primitives' figures in loadtest/out/scale-<fans>-primitives.txt.
set -euo pipefail
source "$(dirname "$0")/lib/infra.sh"
cd "$FG_ROOT"
fg_infra_up

FANS="${FANS:-30000}"
SEATS="${SEATS:-15000}"
QUEUES="${QUEUES:-$(( (FANS + 17999) / 18000 ))}"
PRESALE="${PRESALE:-$(( FANS / 500 + 20 ))}"
# Shoppers at once: about what one purchase process serves (hold + checkout ~500/s, a few
# requests each); a fan who walks away frees the slot when the pass expires (PASS_TTL).
MAX_ACTIVE="${MAX_ACTIVE:-400}"
# Admissions per minute, as an operator would set it: about what the shoppers under the cap
# can take (a few seconds each), not far above it. The waiting room paces its updates to a
# waiter by the shortest time its turn can take at this rate, so an unreachable rate makes
# every waiter hear from it far more often than the line really moves.
RATE="${RATE:-$(( MAX_ACTIVE * 6 ))}"
PASS_TTL="${PASS_TTL:-60}"
# How long one fan may take from arrival to done before the crowd counts it as an error.
FAN_TIMEOUT="${FAN_TIMEOUT:-1200}"
# Seconds after the draw over which the late tenth of the crowd arrives.
LATE_SECS="${LATE_SECS:-20}"
# A rehearsal's holds last a minute, so seats of fans who walk away come back soon.
export FAIRGATE_HOLD_TTL_SECS="${FAIRGATE_HOLD_TTL_SECS:-60}"
OUT="$FG_ROOT/loadtest/out"
mkdir -p "$OUT" "$FG_DATA/logs"

fg_say "building the release binaries"
cargo build --release --quiet -p fairgate-buffer -p fairgate-queue -p fairgate-purchase -p fairgate-loadtest

tag="scale$(date +%s)"
fg_private_sale_db "$tag"
if [ "${CLUSTER:-0}" = 1 ]; then
  cluster_port="${CLUSTER_PORT:-21001}"
  FG_CLEANUP+=("scripts/redis-cluster.sh stop $cluster_port $FG_DATA/redis-cluster-scale")
  REDIS_URL="$(scripts/redis-cluster.sh start "$cluster_port" "$FG_DATA/redis-cluster-scale")"
  export REDIS_URL
  fg_say "services on the Redis Cluster $REDIS_URL"
else
  fg_forget_redis_keys "$tag"
fi
fg_sale_secrets
export FAIRGATE_JOIN_LIMIT_PER_IP=0 LOG_FORMAT=json RUST_LOG="${RUST_LOG:-warn}"
export FAIRGATE_BUFFER_BIND=127.0.0.1:18081 FAIRGATE_QUEUE_BIND=127.0.0.1:18082 FAIRGATE_PURCHASE_BIND=127.0.0.1:18083
export FAIRGATE_JWKS_URL="http://$FAIRGATE_QUEUE_BIND/.well-known/jwks.json"

wait_ready() {
  local url="$1" pid="$2" i
  for i in $(seq 1 300); do
    curl -sf "$url/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || fg_die "a service exited: see $FG_DATA/logs/"
    sleep 0.2
  done
  fg_die "$url did not become ready"
}
# Not in a subshell (no `$(start …)`): the cleanup list must grow in this shell, or the
# services would outlive the script.
start() { # name, log suffix, extra env...; sets $pid
  local name="$1" log="$2"; shift 2
  env "$@" "target/release/$name" >"$FG_DATA/logs/scale-$name$log.log" 2>&1 &
  pid=$!
  FG_CLEANUP+=("kill -TERM $pid; wait $pid")
}
start buffer ""
wait_ready "http://$FAIRGATE_BUFFER_BIND" "$pid"
for q in $(seq 1 "$QUEUES"); do
  start queue "-$q" FAIRGATE_REUSE_PORT=true FAIRGATE_DB_MAX_CONNECTIONS=4
done
wait_ready "http://$FAIRGATE_QUEUE_BIND" "$pid"
start purchase ""
wait_ready "http://$FAIRGATE_PURCHASE_BIND" "$pid"
fg_say "services up: buffer, $QUEUES queue instances on one port, purchase"

prim="$OUT/scale-$FANS-primitives.txt"
{
  echo "# redis-benchmark ZADD (same Redis, same run)"
  if [ "${CLUSTER:-0}" = 1 ]; then
    redis-benchmark --cluster -p "$cluster_port" -q -t zadd -n 200000 -c 50 2>/dev/null | tr "\r" "\n" | grep "requests per second"
  else
    redis-benchmark -u "$REDIS_URL" -q -t zadd -n 200000 -c 50 2>/dev/null | tr "\r" "\n" | grep "requests per second"
  fi
  echo "# pgbench: conditional UPDATE of one seat row (same Postgres, same run)"
  psql "$DATABASE_URL" -qc "CREATE TABLE pgbench_seats AS SELECT g AS id, 'available'::text AS status FROM generate_series(1, 100000) g; ALTER TABLE pgbench_seats ADD PRIMARY KEY (id)" >/dev/null
  printf '%s\n' '\set id random(1, 100000)' \
    "UPDATE pgbench_seats SET status = CASE status WHEN 'available' THEN 'sold' ELSE 'available' END WHERE id = :id;" \
    > "$FG_DATA/pgbench-seat.sql"
  pgbench -n -T 10 -c 8 -j 2 -f "$FG_DATA/pgbench-seat.sql" "$DATABASE_URL" 2>/dev/null | grep -E "^(tps|latency average)"
} | tee "$prim"

fg_say "crowd: $FANS fans, $SEATS seats, presale ${PRESALE}s, admission $RATE/min, at most $MAX_ACTIVE shoppers"
target/release/crowd --fans "$FANS" --seats "$SEATS" --presale-secs "$PRESALE" \
  --rate-per-minute "$RATE" --max-active "$MAX_ACTIVE" --pass-ttl-secs "$PASS_TTL" --late-secs "$LATE_SECS" --fan-timeout-secs "$FAN_TIMEOUT" \
  --buffer-url "http://$FAIRGATE_BUFFER_BIND" --queue-url "http://$FAIRGATE_QUEUE_BIND" \
  --purchase-url "http://$FAIRGATE_PURCHASE_BIND" \
  --json "$OUT/scale-$FANS.json" --html "$OUT/scale-$FANS.html" "$@"
