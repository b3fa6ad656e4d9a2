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
# Usage: bench/events.sh            (CONNS=16 DURATION=10 ROUNDS=5 PROFILE=release; GRAVEN=path
#        runs that binary instead of building one). Each round prints its row (load average at
#        its start, both sides' rate, p50 and p99 in ms, the two ratios); the end prints the
#        medians, the median of the rounds' ratios, and in how many rounds the target was met.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source bench/lib.sh
CONNS=${CONNS:-16}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-5}
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

# Both servers run for the whole script; each round runs wrk against graven, then pgbench
# against PostgreSQL, so a noisy minute falls on both sides of one round and the medians over
# the rounds decide, not one pair of runs.
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

echo "graven: wrk -t 2 -c $CONNS -d ${DURATION}s POST /events; postgresql: pgbench -c $CONNS -j 2 -T $DURATION INSERT; $ROUNDS rounds" >&2
for round in $(seq "$ROUNDS"); do
  mkdir -p "$work/r$round/pg"
  chown postgres "$work/r$round/pg"
  cut -d' ' -f1-3 /proc/loadavg >"$work/r$round/load"
  wrk -t 2 -c "$CONNS" -d "${DURATION}s" --latency -s "$work/post.lua" "$url/events" >"$work/r$round/wrk.txt"
  (cd "$work/r$round/pg" && runuser -u postgres -- "$pgbin/pgbench" -h "$work/sock" -n -c "$CONNS" -j 2 \
    -T "$DURATION" -f "$work/insert.sql" --log --log-prefix="$work/r$round/pg/txn" postgres \
    >"$work/r$round/pgbench.txt")
  python3 - "$work" "$round" <<'PY'
import glob, json, re, sys
work, round = sys.argv[1], sys.argv[2]
r = f"{work}/r{round}"
wrk = open(f"{r}/wrk.txt").read()
def ms(text):
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
# The distribution's lines only: a "+/- Stdev" column such as "89.50%" also ends in "50%".
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk)
pg = open(f"{r}/pgbench.txt").read()
lat = sorted(int(line.split()[2]) / 1000 for path in glob.glob(f"{r}/pg/txn*") for line in open(path))
row = {
    "round": int(round),
    "load": open(f"{r}/load").read().strip(),
    "g_rate": float(re.search(r"Requests/sec:\s+([\d.]+)", wrk).group(1)),
    "g_requests": int(re.search(r"(\d+) requests in", wrk).group(1)),
    "g_p50": ms(re.search(r"^\s+50%\s+(\S+)", wrk, re.M).group(1)),
    "g_p99": ms(re.search(r"^\s+99%\s+(\S+)", wrk, re.M).group(1)),
    "g_bad": int(bad.group(1)) if bad else 0,
    "p_rate": float(re.search(r"tps = ([\d.]+)", pg).group(1)),
    "p_p50": lat[len(lat) // 2],
    "p_p99": lat[int(len(lat) * 0.99)],
}
open(f"{r}/row.json", "w").write(json.dumps(row))
if row["round"] == 1:
    print(f"{'round (load)':22} {'graven/s':>9} {'p50':>6} {'p99':>6} {'pg/s':>9} {'p50':>6} {'p99':>6} {'rate':>6} {'p99':>6}")
print(f"{row['round']:>2} ({row['load']:16}) {row['g_rate']:>9.0f} {row['g_p50']:>6.2f} {row['g_p99']:>6.2f} "
      f"{row['p_rate']:>9.0f} {row['p_p50']:>6.2f} {row['p_p99']:>6.2f} "
      f"{row['g_rate'] / row['p_rate']:>5.2f}x {row['g_p99'] / row['p_p99']:>5.2f}x", flush=True)
PY
done
kill "$daemon_pid"; wait "$daemon_pid" 2>/dev/null || true; daemon_pid=""
events=$("$graven" events status --app bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["last"])')

python3 - "$work" "$ROUNDS" "$events" <<'PY'
import json, statistics, sys
work, rounds, events = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = [json.load(open(f"{work}/r{i}/row.json")) for i in range(1, rounds + 1)]
med = lambda key: statistics.median(row[key] for row in rows)
rate = statistics.median(row["g_rate"] / row["p_rate"] for row in rows)
p99 = statistics.median(row["g_p99"] / row["p_p99"] for row in rows)
met = sum(row["g_rate"] >= row["p_rate"] and row["g_p99"] <= row["p_p99"] for row in rows)
print()
print(f"medians of {rounds} rounds (latencies in ms):")
print(f"{'':34} {'appends/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
print(f"{'graven app event log (HTTP)':34} {med('g_rate'):>10.0f} {med('g_p50'):>8.2f} {med('g_p99'):>8.2f}")
print(f"{'PostgreSQL INSERT (commit each)':34} {med('p_rate'):>10.0f} {med('p_p50'):>8.2f} {med('p_p99'):>8.2f}")
print(f"{'graven / PostgreSQL (per round)':34} {rate:>9.2f}x {'':>8} {p99:>7.2f}x")
print(f"target (>= the appends/s at <= the p99) met in {met} of {rounds} rounds")
answered = sum(row["g_requests"] for row in rows)
bad = sum(row["g_bad"] for row in rows)
print(f"graven: {events} events in the log, {answered} appends answered to wrk, {bad} answers other than 201")
PY
