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
# - The target is judged against PostgreSQL on its unix socket, the strictest peer. Each round
#   also runs the same pgbench over loopback TCP (PG_TCP=0 skips it), the transport graven's
#   clients use (an instance reaches a database in another instance over TCP too), and prints
#   graven's ratios to that as well.
#
# Usage: bench/events.sh            (CONNS=16 DURATION=10 ROUNDS=5 PROFILE=release; GRAVEN=path
#        runs that binary instead of building one; GRAVEN_B=path also runs a second build, a
#        daemon of its own on a home of its own, in every round: an A/B of two builds against
#        the same PostgreSQL minutes, the two graven runs taking turns at going first). Each
#        round prints its row (load average at its start, each side's rate, p50 and p99 in ms,
#        each build's two ratios); the end prints the medians, the median of the rounds'
#        ratios, and in how many rounds the target was met.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source bench/lib.sh
CONNS=${CONNS:-16}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-5}
PROFILE=${PROFILE:-release}
PG_TCP=${PG_TCP:-1}
bench_require wrk postgresql

work=$(mktemp -d /tmp/graven-bench-events.XXXXXX)
chmod 755 "$work"
daemon_pids=()
pg_pid=""
cleanup() {
  for pid in "${daemon_pids[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
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
# The builds: "a" (GRAVEN or this tree's), and "b" (GRAVEN_B) when given; each its daemon.
sides=(a)
declare -A binary=([a]="$graven") url=()
[ -n "${GRAVEN_B:-}" ] && sides+=(b) && binary[b]=$GRAVEN_B
for side in "${sides[@]}"; do
  home="$work/home-$side"
  mkdir -p "$home/apps/bench/local"
  GRAVEN_HOME=$home "${binary[$side]}" daemon >"$work/daemon-$side.log" 2>&1 &
  daemon_pids+=($!)
  for _ in $(seq 300); do [ -s "$home/app-events.port" ] && break; sleep 0.1; done
  url[$side]=$(GRAVEN_HOME=$home "${binary[$side]}" events url --app bench)
  echo "graven $side: ${binary[$side]}" >&2
done
cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
LUA

pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
mkdir -p "$work/pg" "$work/sock"
chown postgres "$work/pg" "$work/sock"
runuser -u postgres -- "$pgbin/initdb" -D "$work/pg/data" -A trust >/dev/null
# A free loopback port for the TCP side (the unix socket's name carries it too).
pgport=$(free_port)
listen=""; [ "$PG_TCP" = 1 ] && listen=127.0.0.1
runuser -u postgres -- "$pgbin/postgres" -D "$work/pg/data" -k "$work/sock" -p "$pgport" \
  -c listen_addresses="$listen" -c fsync=on -c synchronous_commit=on \
  -c max_connections=$((2 * CONNS + 10)) >"$work/pg.log" 2>&1 &
pg_pid=$!
for _ in $(seq 300); do runuser -u postgres -- "$pgbin/pg_isready" -h "$work/sock" -p "$pgport" -q && break; sleep 0.1; done
runuser -u postgres -- psql -h "$work/sock" -p "$pgport" -q -c "CREATE TABLE events (seq bigserial PRIMARY KEY, body jsonb NOT NULL)" postgres
echo "INSERT INTO events (body) VALUES ('$body');" >"$work/insert.sql"
chmod 644 "$work/insert.sql"

echo "graven: wrk -t 2 -c $CONNS -d ${DURATION}s POST /events; postgresql: pgbench -c $CONNS -j 2 -T $DURATION INSERT; $ROUNDS rounds" >&2
for round in $(seq "$ROUNDS"); do
  mkdir -p "$work/r$round/pg" "$work/r$round/pgtcp"
  chown postgres "$work/r$round/pg" "$work/r$round/pgtcp"
  cut -d' ' -f1-3 /proc/loadavg >"$work/r$round/load"
  order=("${sides[@]}")
  [ $((round % 2)) = 0 ] && [ ${#sides[@]} = 2 ] && order=(b a)
  for side in "${order[@]}"; do
    wrk -t 2 -c "$CONNS" -d "${DURATION}s" --latency -s "$work/post.lua" "${url[$side]}/events" \
      >"$work/r$round/wrk-$side.txt"
  done
  (cd "$work/r$round/pg" && runuser -u postgres -- "$pgbin/pgbench" -h "$work/sock" -p "$pgport" -n \
    -c "$CONNS" -j 2 -T "$DURATION" -f "$work/insert.sql" --log --log-prefix="$work/r$round/pg/txn" \
    postgres >"$work/r$round/pgbench.txt")
  if [ "$PG_TCP" = 1 ]; then
    (cd "$work/r$round/pgtcp" && runuser -u postgres -- "$pgbin/pgbench" -h 127.0.0.1 -p "$pgport" -n \
      -c "$CONNS" -j 2 -T "$DURATION" -f "$work/insert.sql" --log \
      --log-prefix="$work/r$round/pgtcp/txn" postgres >"$work/r$round/pgbench-tcp.txt")
  fi
  python3 - "$work" "$round" "${sides[@]}" <<'PY'
import glob, json, re, sys
work, round, sides = sys.argv[1], sys.argv[2], sys.argv[3:]
r = f"{work}/r{round}"
def ms(text):
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
def pgbench(out, logs):
    text = open(out).read()
    lat = sorted(int(line.split()[2]) / 1000 for path in glob.glob(f"{logs}/txn*") for line in open(path))
    rate = float(re.search(r"tps = ([\d.]+)", text).group(1))
    return rate, lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
row = {"round": int(round), "load": open(f"{r}/load").read().strip()}
row["p_rate"], row["p_p50"], row["p_p99"] = pgbench(f"{r}/pgbench.txt", f"{r}/pg")
tcp = glob.glob(f"{r}/pgbench-tcp.txt")
if tcp:
    row["t_rate"], row["t_p50"], row["t_p99"] = pgbench(tcp[0], f"{r}/pgtcp")
for side in sides:
    wrk = open(f"{r}/wrk-{side}.txt").read()
    # The distribution's lines only: a "+/- Stdev" column such as "89.50%" also ends in "50%".
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk)
    row[side] = {
        "rate": float(re.search(r"Requests/sec:\s+([\d.]+)", wrk).group(1)),
        "requests": int(re.search(r"(\d+) requests in", wrk).group(1)),
        "p50": ms(re.search(r"^\s+50%\s+(\S+)", wrk, re.M).group(1)),
        "p99": ms(re.search(r"^\s+99%\s+(\S+)", wrk, re.M).group(1)),
        "bad": int(bad.group(1)) if bad else 0,
    }
open(f"{r}/row.json", "w").write(json.dumps(row))
# The row's columns: (title, width, text); the header is their titles.
cols = []
for side in sides:
    cols += [("graven " + side + "/s", 10, f"{row[side]['rate']:.0f}"),
             ("p50", 6, f"{row[side]['p50']:.2f}"), ("p99", 6, f"{row[side]['p99']:.2f}")]
for peer, name in [("p", "pg/s"), ("t", "pg tcp/s")] if tcp else [("p", "pg/s")]:
    cols += [(name, 9, f"{row[peer + '_rate']:.0f}"),
             ("p50", 6, f"{row[peer + '_p50']:.2f}"), ("p99", 6, f"{row[peer + '_p99']:.2f}")]
for side in sides:
    cols += [(side + " rate", 7, f"{row[side]['rate'] / row['p_rate']:.2f}x"),
             (side + " p99", 7, f"{row[side]['p99'] / row['p_p99']:.2f}x")]
    if tcp:
        cols.append((side + " p99 tcp", 9, f"{row[side]['p99'] / row['t_p99']:.2f}x"))
if row["round"] == 1:
    print(f"{'round (load)':22}" + "".join(f" {title:>{width}}" for title, width, _ in cols))
print(f"{row['round']:>2} ({row['load']:16})" + "".join(f" {text:>{width}}" for _, width, text in cols),
      flush=True)
PY
done
events=()
for i in "${!sides[@]}"; do
  side=${sides[$i]}
  kill "${daemon_pids[$i]}"; wait "${daemon_pids[$i]}" 2>/dev/null || true
  events+=("$(GRAVEN_HOME="$work/home-$side" "${binary[$side]}" events status --app bench --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["last"])')")
done
daemon_pids=()

python3 - "$work" "$ROUNDS" "${#sides[@]}" "${sides[@]}" "${events[@]}" <<'PY'
import json, statistics, sys
work, rounds, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sides, events = sys.argv[4:4 + n], [int(e) for e in sys.argv[4 + n:]]
rows = [json.load(open(f"{work}/r{i}/row.json")) for i in range(1, rounds + 1)]
med = lambda get: statistics.median(get(row) for row in rows)
print()
print(f"medians of {rounds} rounds (latencies in ms):")
print(f"{'':38} {'appends/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
for side in sides:
    print(f"{'graven ' + side + ' app event log (HTTP)':38} {med(lambda r: r[side]['rate']):>10.0f} "
          f"{med(lambda r: r[side]['p50']):>8.2f} {med(lambda r: r[side]['p99']):>8.2f}")
print(f"{'PostgreSQL INSERT (commit each)':38} {med(lambda r: r['p_rate']):>10.0f} "
      f"{med(lambda r: r['p_p50']):>8.2f} {med(lambda r: r['p_p99']):>8.2f}")
tcp = all("t_rate" in r for r in rows)
if tcp:
    print(f"{'PostgreSQL INSERT over loopback TCP':38} {med(lambda r: r['t_rate']):>10.0f} "
          f"{med(lambda r: r['t_p50']):>8.2f} {med(lambda r: r['t_p99']):>8.2f}")
peers = [("p", "PostgreSQL (per round)", "target (>= the appends/s at <= the p99) met in")]
if tcp:
    peers.append(("t", "PostgreSQL over TCP", "against PostgreSQL over TCP: met in"))
for side, count in zip(sides, events):
    for peer, name, said in peers:
        rate = med(lambda r: r[side]["rate"] / r[peer + "_rate"])
        p99 = med(lambda r: r[side]["p99"] / r[peer + "_p99"])
        met = sum(r[side]["rate"] >= r[peer + "_rate"] and r[side]["p99"] <= r[peer + "_p99"] for r in rows)
        print(f"{'graven ' + side + ' / ' + name:38} {rate:>9.2f}x {'':>8} {p99:>7.2f}x")
        print(f"  {said} {met} of {rounds} rounds")
    answered = sum(r[side]["requests"] for r in rows)
    bad = sum(r[side]["bad"] for r in rows)
    print(f"  graven {side}: {count} events in the log, {answered} appends answered to wrk, "
          f"{bad} answers other than 201")
PY
