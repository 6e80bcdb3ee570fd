#!/usr/bin/env bash
# A local Redis Cluster from the installed redis-server: 3 masters and 3 replicas on six
# consecutive ports of 127.0.0.1, keeping nothing on disk. fairgate runs on it unchanged:
# point REDIS_URL at the URL this prints (fred's cluster mode discovers the other nodes).
#
#   scripts/redis-cluster.sh start [PORT] [DIR]   # default 21001 and .data/redis-cluster;
#                                                 # prints redis-cluster://127.0.0.1:PORT?node=…
#   scripts/redis-cluster.sh stop  [PORT] [DIR]
#
# Each node also takes PORT+10000 for the cluster bus; both stay below Linux's ephemeral range
# (32768 and up), where an outgoing connection may hold a port at any moment.
# A master that dies is replaced by its replica after cluster-node-timeout (2 s); the other
# masters' slots keep serving meanwhile (cluster-require-full-coverage no).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
action="${1:-start}"
port="${2:-21001}"
dir="${3:-$root/.data/redis-cluster}"
ports=($(seq "$port" $((port + 5))))
say() { printf '\033[1m[fairgate]\033[0m %s\n' "$*" >&2; }

stop() {
  local p
  for p in "${ports[@]}"; do
    redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true
  done
}

case "$action" in
  stop) stop; exit 0 ;;
  start) ;;
  *) say "usage: $0 start|stop [PORT] [DIR]"; exit 2 ;;
esac

command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 \
  || { say "redis-server and redis-cli are needed: sudo apt-get install -y redis-server"; exit 1; }
stop
rm -rf "$dir"
for p in "${ports[@]}"; do
  mkdir -p "$dir/$p"
  redis-server --port "$p" --bind 127.0.0.1 --dir "$dir/$p" \
    --cluster-enabled yes --cluster-config-file "$dir/$p/nodes.conf" \
    --cluster-node-timeout 2000 --cluster-require-full-coverage no \
    --save "" --appendonly no --maxmemory-policy noeviction \
    --daemonize yes --pidfile "$dir/$p/redis.pid" --logfile "$dir/$p/redis.log" >/dev/null
done
for p in "${ports[@]}"; do
  for _ in $(seq 1 100); do
    [ "$(redis-cli -p "$p" ping 2>/dev/null)" = PONG ] && break
    sleep 0.05
  done
done
nodes=()
for p in "${ports[@]}"; do nodes+=("127.0.0.1:$p"); done
redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 \
  || { say "cluster create failed: see $dir/create.log"; stop; exit 1; }
# Ready: every node sees the whole cluster healthy, and every replica is in sync with its master.
for _ in $(seq 1 200); do
  ready=1
  for p in "${ports[@]}"; do
    redis-cli -p "$p" cluster info 2>/dev/null | grep -q "cluster_state:ok" || ready=0
    if redis-cli -p "$p" info replication 2>/dev/null | grep -q "role:slave"; then
      redis-cli -p "$p" info replication | grep -q "master_link_status:up" || ready=0
    fi
  done
  [ "$ready" = 1 ] && break
  sleep 0.1
done
[ "$ready" = 1 ] || { say "the cluster did not become ready: see $dir/*/redis.log"; stop; exit 1; }
url="redis-cluster://127.0.0.1:${ports[0]}"
sep="?"
for p in "${ports[@]:1:2}"; do url+="${sep}node=127.0.0.1:$p"; sep="&"; done
echo "$url"
