#!/usr/bin/env bash
# bench/events.sh: the app event log's durable appends against PostgreSQL doing the same
# durable work, side by side in one run (issue 15's target: at least the peer's appends per
# second at no more than its p99 latency).
#
# - graven: `graven daemon` serves the log; wrk POSTs a JSON event of about 100 bytes over
#   CONNS keep-alive connections for DURATION (`--latency` gives p50 and p99). Each append is
#   answered only after its batch is synced (RWF_DSYNC: fdatasync of the batch's range).
# - PostgreSQL (Debian's, a private cluster on a unix socket, fsync and synchronous_commit on,
#   its defaults): pgbench runs `INSERT INTO events (body) VALUES (<the same JSON>)` over CONNS
#   connections for DURATION; each insert commits, so each is answered after its WAL flush.
#   Latencies come from pgbench's per-transaction log. Chosen over Redis AOF and NATS
#   JetStream because it is the durable store a user of graven most likely already runs, and
#   it batches concurrent commits' flushes as graven batches appends.
#
# Usage: bench/events.sh            (CONNS=16 DURATION=10 PROFILE=release; GRAVEN=path runs that
#        binary instead of building one)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source bench/lib.sh
CONNS=${CONNS:-16}
DURATION=${DURATION:-10}
PROFILE=${PROFILE:-release}
bench_require wrk postgresql

work=$(mktemp -d /tmp/graven-bench-events.XXXXXX)
chmod 755 "$work"
daemon_pid=""
pg_pid=""
cleanup() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null || true
  [ -n "$pg_pid" ] && kill "$pg_pid" 2>/dev/null || true
  for _ in $(seq 100); do [ -n "$pg_pid" ] && kill -0 "$pg_pid" 2>/dev/null || break; sleep 0.1; done
  rm -rf "$work"
}
trap cleanup EXIT
if [ -n "${GRAVEN:-}" ]; then
  graven=$GRAVEN
else
  echo "building graven ($PROFILE)" >&2
  cargo build --profile "$PROFILE" --quiet --bin graven
  dir=$PROFILE; [ "$PROFILE" = dev ] && dir=debug
  graven="$ROOT/target/$dir/graven"
fi

body='{"type":"order-placed","order":12345,"customer":678,"items":3,"total_cents":4599}'

# graven
export GRAVEN_HOME="$work/home"
mkdir -p "$GRAVEN_HOME/apps/bench/local"
"$graven" daemon >"$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 300); do [ -s "$GRAVEN_HOME/app-events.port" ] && break; sleep 0.1; done
url=$("$graven" events url --app bench)
cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
LUA
echo "graven: wrk -c $CONNS -d ${DURATION}s POST /events" >&2
wrk -t 2 -c "$CONNS" -d "${DURATION}s" --latency -s "$work/post.lua" "$url/events" >"$work/wrk.txt"
kill "$daemon_pid"; wait "$daemon_pid" 2>/dev/null || true; daemon_pid=""
events=$("$graven" events status --app bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["last"])')

# PostgreSQL
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
mkdir -p "$work/pg" "$work/sock"
chown postgres "$work/pg" "$work/sock"
runuser -u postgres -- "$pgbin/initdb" -D "$work/pg/data" -A trust >/dev/null
runuser -u postgres -- "$pgbin/postgres" -D "$work/pg/data" -k "$work/sock" -c listen_addresses= \
  -c fsync=on -c synchronous_commit=on -c max_connections=$((CONNS + 10)) >"$work/pg.log" 2>&1 &
pg_pid=$!
for _ in $(seq 300); do runuser -u postgres -- "$pgbin/pg_isready" -h "$work/sock" -q && break; sleep 0.1; done
runuser -u postgres -- psql -h "$work/sock" -q -c "CREATE TABLE events (seq bigserial PRIMARY KEY, body jsonb NOT NULL)" postgres
echo "INSERT INTO events (body) VALUES ('$body');" >"$work/insert.sql"
chmod 644 "$work/insert.sql"
echo "postgresql: pgbench -c $CONNS -T $DURATION INSERT" >&2
(cd "$work/pg" && runuser -u postgres -- "$pgbin/pgbench" -h "$work/sock" -n -c "$CONNS" -j 2 -T "$DURATION" \
  -f "$work/insert.sql" --log --log-prefix="$work/pg/txn" postgres >"$work/pgbench.txt")

cat "$work/wrk.txt" >&2
python3 - "$work" "$events" <<'PY'
import glob, re, sys
work, events = sys.argv[1], int(sys.argv[2])
wrk = open(f"{work}/wrk.txt").read()
def ms(text):
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
g_rate = float(re.search(r"Requests/sec:\s+([\d.]+)", wrk).group(1))
# The distribution's lines only: a "+/- Stdev" column such as "89.50%" also ends in "50%".
g_p50 = ms(re.search(r"^\s+50%\s+(\S+)", wrk, re.M).group(1))
g_p99 = ms(re.search(r"^\s+99%\s+(\S+)", wrk, re.M).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk)
g_bad = int(bad.group(1)) if bad else 0
pg = open(f"{work}/pgbench.txt").read()
p_rate = float(re.search(r"tps = ([\d.]+)", pg).group(1))
lat = []
for path in glob.glob(f"{work}/pg/txn*"):
    for line in open(path):
        lat.append(int(line.split()[2]) / 1000)
lat.sort()
p_p50, p_p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
print()
print(f"{'':34} {'appends/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
print(f"{'graven app event log (HTTP)':34} {g_rate:>10.0f} {g_p50:>8.2f} {g_p99:>8.2f}")
print(f"{'PostgreSQL INSERT (commit each)':34} {p_rate:>10.0f} {p_p50:>8.2f} {p_p99:>8.2f}")
print(f"{'graven / PostgreSQL':34} {g_rate / p_rate:>9.2f}x {g_p50 / p_p50:>7.2f}x {g_p99 / p_p99:>7.2f}x")
print(f"graven: {events} events in the log after the run, {g_bad} answers other than 201")
PY
