#!/usr/bin/env bash
# The demo: brings up Postgres and Redis (reused if running, else private under .data/), builds
# and starts the three services, runs a short sale with a simulated crowd and prints what
# happened. The services keep running for you to explore until Ctrl-C, which stops everything
# this script started and nothing else. `scripts/demo.sh --exit` stops right after the sale.
#
# Knobs: DEMO_FANS (default 300), DEMO_SEATS (200), DEMO_PRESALE_SECS (8), and every service
# variable of the README (FAIRGATE_BUFFER_BIND, ...).
set -euo pipefail
source "$(dirname "$0")/lib/infra.sh"
cd "$FG_ROOT"

EXIT_AFTER_SALE=0
[ "${1:-}" = "--exit" ] && EXIT_AFTER_SALE=1

command -v cargo >/dev/null 2>&1 || fg_die "Rust is needed: install it from https://rustup.rs (or apt-get install cargo)"
fg_infra_up

fg_say "building the services (release)"
cargo build --release --quiet -p fairgate-buffer -p fairgate-queue -p fairgate-purchase -p fairgate-loadtest

mkdir -p "$FG_DATA/logs"
if [ ! -s "$FG_DATA/signing.key" ]; then
  (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$FG_DATA/signing.key")
fi
export FAIRGATE_SIGNING_KEY_FILE="$FG_DATA/signing.key"
export FAIRGATE_ORGANIZER_TOKEN="${FAIRGATE_ORGANIZER_TOKEN:-$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
if [ ! -s "$FG_DATA/order.secret" ]; then
  (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$FG_DATA/order.secret")
fi
export FAIRGATE_ORDER_SECRET="${FAIRGATE_ORDER_SECRET:-$(cat "$FG_DATA/order.secret")}"
# The whole simulated crowd comes from one address.
export FAIRGATE_JOIN_LIMIT_PER_IP="${FAIRGATE_JOIN_LIMIT_PER_IP:-0}"

BUFFER_BIND="${FAIRGATE_BUFFER_BIND:-127.0.0.1:8081}"
QUEUE_BIND="${FAIRGATE_QUEUE_BIND:-127.0.0.1:8082}"
PURCHASE_BIND="${FAIRGATE_PURCHASE_BIND:-127.0.0.1:8083}"
export FAIRGATE_BUFFER_BIND="$BUFFER_BIND" FAIRGATE_QUEUE_BIND="$QUEUE_BIND" FAIRGATE_PURCHASE_BIND="$PURCHASE_BIND"
export FAIRGATE_JWKS_URL="http://$QUEUE_BIND/.well-known/jwks.json"
export FAIRGATE_BUFFER_PUBLIC_URL="${FAIRGATE_BUFFER_PUBLIC_URL:-http://$BUFFER_BIND}"
export FAIRGATE_QUEUE_PUBLIC_URL="${FAIRGATE_QUEUE_PUBLIC_URL:-http://$QUEUE_BIND}"
export FAIRGATE_PURCHASE_PUBLIC_URL="${FAIRGATE_PURCHASE_PUBLIC_URL:-http://$PURCHASE_BIND}"
OPERATOR_TOKEN="$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export FAIRGATE_OPERATOR_TOKENS="${FAIRGATE_OPERATOR_TOKENS:-demo:$OPERATOR_TOKEN}"
# The waiting page sends an admitted fan on to the purchase service's seat page.
SEAT_PAGE="http://$PURCHASE_BIND/e/{event}/seats"
export FAIRGATE_NEXT_PAGE_URL="${FAIRGATE_NEXT_PAGE_URL:-$SEAT_PAGE}"

port_busy() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }
http_status() { # GET a path over bash's /dev/tcp (no curl needed); prints the status code
  local addr="$1" path="$2" line
  exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}" || return 1
  printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$addr" >&3
  read -r line <&3 || true
  exec 3<&- 3>&-
  echo "$line" | awk '{print $2}'
}

for bind in "$BUFFER_BIND" "$QUEUE_BIND" "$PURCHASE_BIND"; do
  port_busy "$bind" && fg_die "$bind is already in use: stop what runs there or set FAIRGATE_*_BIND"
done

start_service() {
  local name="$1" bind="$2"
  "target/release/$name" >"$FG_DATA/logs/$name.log" 2>&1 &
  local pid=$!
  FG_CLEANUP+=("kill -TERM $pid; wait $pid")
  local i
  for i in $(seq 1 150); do
    [ "$(http_status "$bind" /readyz 2>/dev/null)" = "200" ] && { fg_say "$name ready on http://$bind"; return; }
    kill -0 "$pid" 2>/dev/null || fg_die "$name exited: see $FG_DATA/logs/$name.log"
    sleep 0.2
  done
  fg_die "$name did not become ready: see $FG_DATA/logs/$name.log"
}
start_service queue "$QUEUE_BIND"
start_service buffer "$BUFFER_BIND"
start_service purchase "$PURCHASE_BIND"

fg_say "running a demo sale: ${DEMO_FANS:-300} fans, ${DEMO_SEATS:-200} seats"
target/release/crowd \
  --fans "${DEMO_FANS:-300}" --seats "${DEMO_SEATS:-200}" --presale-secs "${DEMO_PRESALE_SECS:-8}" \
  --buffer-url "http://$BUFFER_BIND" --queue-url "http://$QUEUE_BIND" --purchase-url "http://$PURCHASE_BIND" \
  --json "$FG_DATA/demo-report.json" --html "$FG_DATA/demo-report.html" --spectator

EVENT_ID="$(sed -n 's/.*"event_id": *\([0-9]*\).*/\1/p' "$FG_DATA/demo-report.json" | head -n 1)"
cat <<MSG

Pages (the tokens below are this demo's own, made up at start):
  the demo event       $FAIRGATE_PURCHASE_PUBLIC_URL/e/$EVENT_ID
  operator dashboard   $FAIRGATE_QUEUE_PUBLIC_URL/operator/e/$EVENT_ID   (token ${FAIRGATE_OPERATOR_TOKENS#*:})
  organizer console    $FAIRGATE_PURCHASE_PUBLIC_URL/organizer   (token $FAIRGATE_ORGANIZER_TOKEN)

The services are running:
  buffer    http://$BUFFER_BIND    (join, draw: /api/v1/events/{id}/draw)
  queue     http://$QUEUE_BIND     (waiting page /e/{id}, websocket, passes, JWKS)
  purchase  http://$PURCHASE_BIND  (events, seats, holds, checkout)
  logs      $FG_DATA/logs/   report  $FG_DATA/demo-report.json, $FG_DATA/demo-report.html
MSG
if [ "$EXIT_AFTER_SALE" = 1 ]; then exit 0; fi
fg_say "press Ctrl-C to stop everything this demo started"
while true; do sleep 3600 & wait $!; done
