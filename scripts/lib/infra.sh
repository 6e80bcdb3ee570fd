# Sourced by the project's scripts: makes sure Postgres and Redis are reachable.
#
# DATABASE_URL / REDIS_URL (defaults: the standard local ports) are reused when they answer.
# Otherwise project-private instances are started from the installed `postgresql` and
# `redis-server` packages under .data/ (git ignores it) on ports 55432 and 56379, and stopped
# again when the calling script exits. Nothing else on the machine is touched.
#
# Exports: DATABASE_URL, REDIS_URL, FAIRGATE_TEST_DATABASE_URL, FAIRGATE_TEST_REDIS_URL.

FG_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
FG_DATA="$FG_ROOT/.data"
FG_PRIVATE_PG_PORT="${FG_PRIVATE_PG_PORT:-55432}"
FG_PRIVATE_REDIS_PORT="${FG_PRIVATE_REDIS_PORT:-56379}"
FG_CLEANUP=()

fg_say() { printf '\033[1m[fairgate]\033[0m %s\n' "$*" >&2; }
fg_die() { fg_say "$*"; exit 1; }

fg_cleanup() {
  local i
  for ((i=${#FG_CLEANUP[@]}-1; i>=0; i--)); do
    eval "${FG_CLEANUP[$i]}" >/dev/null 2>&1 || true
  done
  FG_CLEANUP=()
}
trap fg_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fg_missing_packages() {
  fg_say "$1 is not running and its package is not installed."
  fg_say "Install both with:  sudo apt-get install -y postgresql redis-server"
  fg_say "(or run Postgres and Redis yourself and set DATABASE_URL / REDIS_URL)"
  exit 1
}

# The URL of the same server's maintenance database "postgres".
fg_admin_url() {
  local url="$1" base query=""
  base="${url%%\?*}"
  [[ "$url" == *\?* ]] && query="?${url#*\?}"
  printf '%s/postgres%s' "${base%/*}" "$query"
}

fg_pg_reachable() {
  command -v psql >/dev/null 2>&1 || return 1
  psql "$(fg_admin_url "$1")" -Atqc 'SELECT 1' >/dev/null 2>&1
}

fg_pg_bindir() {
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
    pg_config --bindir; return
  fi
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
  command -v initdb >/dev/null 2>&1 && dirname "$(command -v initdb)"
}

# Starts a Postgres of the project's own with its data in $1 on 127.0.0.1:$2 (initialising it
# first), stopped again when the calling script exits. Sets FG_PG_RESTART: a command restarting
# it in immediate mode (a crash and recovery, as the chaos run injects).
fg_start_pg_at() {
  local dir="$1" port="$2" bindir run=()
  bindir="$(fg_pg_bindir)"
  [ -n "$bindir" ] || fg_missing_packages "Postgres"
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || fg_die "running as root needs the 'postgres' user (from the postgresql package)"
    chown -R postgres "$dir"
    run=(runuser -u postgres --)
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    fg_say "initialising a private Postgres in $dir"
    "${run[@]}" "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
      || fg_die "initdb failed: see $dir/initdb.log"
  fi
  fg_say "starting a private Postgres on 127.0.0.1:$port"
  "${run[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $dir -c max_connections=300" start >/dev/null \
    || fg_die "Postgres did not start: see $dir/postgres.log"
  FG_CLEANUP+=("${run[*]} $bindir/pg_ctl -D $dir/data -m fast -w stop")
  FG_PG_RESTART="${run[*]} $bindir/pg_ctl -D $dir/data -l $dir/postgres.log -m immediate -w -t 60 restart"
}

fg_start_private_pg() {
  fg_start_pg_at "$FG_DATA/pg" "$FG_PRIVATE_PG_PORT"
  DATABASE_URL="postgres://postgres@127.0.0.1:$FG_PRIVATE_PG_PORT/fairgate"
}

fg_redis_reachable() {
  command -v redis-cli >/dev/null 2>&1 || return 1
  [ "$(redis-cli -u "$1" ping 2>/dev/null)" = "PONG" ]
}

fg_start_private_redis() {
  command -v redis-server >/dev/null 2>&1 || fg_missing_packages "Redis"
  local dir="$FG_DATA/redis"
  mkdir -p "$dir"
  fg_say "starting a private Redis on 127.0.0.1:$FG_PRIVATE_REDIS_PORT (append-only, no eviction)"
  redis-server --port "$FG_PRIVATE_REDIS_PORT" --bind 127.0.0.1 --dir "$dir" \
    --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
    || fg_die "Redis did not start: see $dir/redis.log"
  REDIS_URL="redis://127.0.0.1:$FG_PRIVATE_REDIS_PORT"
  local i
  for i in $(seq 1 50); do fg_redis_reachable "$REDIS_URL" && break; sleep 0.1; done
  fg_redis_reachable "$REDIS_URL" || fg_die "Redis did not answer: see $dir/redis.log"
  FG_CLEANUP+=("redis-cli -p $FG_PRIVATE_REDIS_PORT shutdown")
}

fg_infra_up() {
  DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/fairgate}"
  REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
  command -v psql >/dev/null 2>&1 || fg_missing_packages "Postgres (psql)"
  command -v redis-cli >/dev/null 2>&1 || fg_missing_packages "Redis (redis-cli)"
  if fg_pg_reachable "$DATABASE_URL"; then
    fg_say "reusing Postgres at ${DATABASE_URL%%\?*}"
  else
    fg_start_private_pg
  fi
  local db="${DATABASE_URL%%\?*}"; db="${db##*/}"
  if ! psql "$(fg_admin_url "$DATABASE_URL")" -Atqc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
    psql "$(fg_admin_url "$DATABASE_URL")" -qc "CREATE DATABASE \"$db\"" >/dev/null
  fi
  if fg_redis_reachable "$REDIS_URL"; then
    fg_say "reusing Redis at $REDIS_URL"
  else
    fg_start_private_redis
  fi
  export DATABASE_URL REDIS_URL
  export FAIRGATE_TEST_DATABASE_URL="$(fg_admin_url "$DATABASE_URL")"
  export FAIRGATE_TEST_REDIS_URL="$REDIS_URL"
}

# A sale of a script's own: a database `fgtest_<tag>` (dropped on exit) as DATABASE_URL, and
# `<tag>` as the services' Redis key prefix.
fg_private_sale_db() {
  local tag="$1" admin base
  admin="$(fg_admin_url "$DATABASE_URL")"
  psql "$admin" -qc "CREATE DATABASE fgtest_$tag" >/dev/null
  FG_CLEANUP+=("psql '$admin' -qc 'DROP DATABASE IF EXISTS fgtest_$tag WITH (FORCE)'")
  base="${DATABASE_URL%%\?*}"
  export DATABASE_URL="${base%/*}/fgtest_$tag"
  export FAIRGATE_REDIS_PREFIX="$tag"
}

# Deletes the Redis keys of prefix `$1` on exit (not on a Redis Cluster: stopped with it).
fg_forget_redis_keys() {
  FG_CLEANUP+=("redis-cli -u '$REDIS_URL' --scan --pattern '$1*' | xargs -r -n 500 redis-cli -u '$REDIS_URL' del")
}

# Fresh secrets for the services of one run: signing key, order secret, organizer token.
fg_sale_secrets() {
  export FAIRGATE_SIGNING_KEY="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  export FAIRGATE_ORDER_SECRET="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  export FAIRGATE_ORGANIZER_TOKEN="$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')"
}
