#!/usr/bin/env bash
# A sale operators can watch, checked against a real Prometheus: starts the three services,
# a Prometheus (Debian's `prometheus` package, installed here when missing) scraping them every
# second, and a small crowd sale with autotune on; then
#   * every query of the Grafana dashboard (ops/grafana/fairgate-sale.json) returns data,
#   * `promtool check rules` passes on the alert rules (ops/prometheus/alerts.yml) and
#     Prometheus loaded them,
#   * one fan's request id is in the logs of all three services.
# Part of the test suite (scripts/test.sh).
#
#   scripts/observe.sh            # on the debug build
#   scripts/observe.sh --release  # on the release build
set -euo pipefail
source "$(dirname "$0")/lib/infra.sh"
cd "$FG_ROOT"
fg_infra_up

profile=debug
[ "${1:-}" = --release ] && profile=release

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
    || fg_die "the observability check needs Debian's prometheus package (sudo apt-get install -y prometheus)"
  fg_say "installing Debian's prometheus package"
  apt-get install -y -qq prometheus >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; }
fi

fg_say "promtool check rules"
promtool check rules ops/prometheus/alerts.yml

if [ "$profile" = release ]; then
  cargo build --release --quiet -p fairgate-buffer -p fairgate-queue -p fairgate-purchase -p fairgate-loadtest
else
  cargo build --quiet -p fairgate-buffer -p fairgate-queue -p fairgate-purchase -p fairgate-loadtest --bins
fi

work="$(mktemp -d)"
FG_CLEANUP+=("rm -rf '$work'")
tag="observe$(date +%s)"
fg_private_sale_db "$tag"
fg_forget_redis_keys "$tag"
fg_sale_secrets
export FAIRGATE_JOIN_LIMIT_PER_IP=0 LOG_FORMAT=json RUST_LOG=info
port="${FG_OBSERVE_PORT:-18380}"
export FAIRGATE_BUFFER_BIND="127.0.0.1:$((port + 1))" FAIRGATE_QUEUE_BIND="127.0.0.1:$((port + 2))"
export FAIRGATE_PURCHASE_BIND="127.0.0.1:$((port + 3))"
export FAIRGATE_JWKS_URL="http://$FAIRGATE_QUEUE_BIND/.well-known/jwks.json"
prom="127.0.0.1:$((port + 9))"

start() { # name; sets $pid
  "target/$profile/$1" >"$work/$1.log" 2>&1 &
  pid=$!
  FG_CLEANUP+=("kill -TERM $pid; wait $pid")
}
wait_ready() {
  local i
  for i in $(seq 1 300); do
    curl -sf "$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  fg_die "$1 did not become ready: see $work"
}
start buffer; wait_ready "http://$FAIRGATE_BUFFER_BIND"
start queue; wait_ready "http://$FAIRGATE_QUEUE_BIND"
start purchase; wait_ready "http://$FAIRGATE_PURCHASE_BIND"

cat >"$work/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $FG_ROOT/ops/prometheus/alerts.yml
scrape_configs:
  - job_name: buffer
    static_configs: [{ targets: ["$FAIRGATE_BUFFER_BIND"] }]
  - job_name: queue
    static_configs: [{ targets: ["$FAIRGATE_QUEUE_BIND"] }]
  - job_name: purchase
    static_configs: [{ targets: ["$FAIRGATE_PURCHASE_BIND"] }]
YAML
prometheus --config.file "$work/prometheus.yml" --storage.tsdb.path "$work/tsdb" \
  --web.listen-address "$prom" >"$work/prometheus.log" 2>&1 &
FG_CLEANUP+=("kill -TERM $!; wait $!")
for i in $(seq 1 100); do curl -sf "http://$prom/-/ready" >/dev/null 2>&1 && break; sleep 0.2; done
curl -sf "http://$prom/-/ready" >/dev/null || fg_die "Prometheus did not start: see $work/prometheus.log"

fg_say "a small crowd sale with autotune on, Prometheus scraping every second"
"target/$profile/crowd" --fans 300 --seats 150 --presale-secs 5 --rate-per-minute 3000 \
  --max-active 200 --autotune --autotune-cap-floor 20 --claim-window-secs 20 \
  --fan-timeout-secs 120 --quiet \
  --buffer-url "http://$FAIRGATE_BUFFER_BIND" --queue-url "http://$FAIRGATE_QUEUE_BIND" \
  --purchase-url "http://$FAIRGATE_PURCHASE_BIND" --json "$work/crowd.json" >"$work/crowd.txt" \
  || { cat "$work/crowd.txt"; fg_die "the crowd sale failed"; }
sleep 3

fg_say "every dashboard query returns data"
python3 - "$prom" ops/grafana/fairgate-sale.json <<'PY'
import json, sys, urllib.parse, urllib.request
prom, path = sys.argv[1], sys.argv[2]
dashboard = json.load(open(path))
failed = 0
for panel in dashboard["panels"]:
    for target in panel["targets"]:
        expr = target["expr"].replace("$event", ".*")
        url = f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = json.load(urllib.request.urlopen(url, timeout=10))
        series = answer.get("data", {}).get("result", [])
        ok = answer.get("status") == "success" and len(series) > 0
        failed += not ok
        print(f"  {'ok ' if ok else 'NO DATA'} {panel['title']}: {expr[:90]}")
rules = json.load(urllib.request.urlopen(f"http://{prom}/api/v1/rules", timeout=10))
loaded = sum(len(g["rules"]) for g in rules["data"]["groups"])
print(f"  {loaded} alert rules loaded by Prometheus")
if failed or loaded == 0:
    sys.exit(f"{failed} dashboard queries returned no data")
PY

fg_say "one fan's request id in the logs of all three services"
found=""
for id in $(grep -o '"request_id":"fan-[0-9a-f]*"' "$work/purchase.log" | sort -u | cut -d'"' -f4 | head -50); do
  if grep -q "$id" "$work/buffer.log" && grep -q "$id" "$work/queue.log"; then found="$id"; break; fi
done
[ -n "$found" ] || fg_die "no request id found in the buffer's, the queue's and the purchase's logs"
fg_say "request $found: buffer, queue and purchase logged it"
fg_say "observability check passed"
