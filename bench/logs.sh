#!/usr/bin/env bash
# bench/logs.sh: the log store (issue 14). Two measurements, peers side by side in one run:
#
# - Durable ingestion of 100-byte lines from an instance: a `graven run -d` instance of the
#   Debian base writes LINES lines of 99 bytes and a newline (`yes | head`, stdio-buffered
#   writes, as a busy server's logger makes them) straight into its source's data file; the
#   time is from the start until the shim has stamped and synced the last byte (the instance
#   exited, `graven rm` done). The shim's CPU (sampled from /proc until it exits) is given
#   apart from the workload's own writes. Against rsyslogd from Debian: imptcp on loopback,
#   omfile with its high-throughput settings (asyncWriting, 64 KiB buffers, flush every
#   second: an fsync interval comparable to graven's), fed the same lines by one `nc`
#   connection; the time is until the file holds every line.
# - Search: `graven logs --grep WORD` over the same LINES stored lines (one hit in 1,000)
#   against `grep -F WORD` over the same text as a plain file, each run RUNS times, median.
#
# Usage: bench/logs.sh   (LINES=10000000 RUNS=3 PROFILE=release)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
LINES=${LINES:-10000000}
RUNS=${RUNS:-3}
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_require rsyslog netcat-openbsd
bench_setup logs
export GRAVEN_HOME=$work/home
base=$(scripts/debian-base)

now() { date +%s.%N; }
# cpu PID: user+system seconds of a process so far.
# (Fields counted after the name's closing parenthesis: a process's name may hold spaces.)
cpu() { awk -v t="$(getconf CLK_TCK)" '{sub(/.*\) /, ""); print ($12+$13)/t}' "/proc/$1/stat" 2>/dev/null; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

mkdir -p "$work/ctx"
echo "FROM docker-archive:$base" > "$work/ctx/Containerfile"
"$graven" bake --tag base:bench --file "$work/ctx/Containerfile" "$work/ctx" >/dev/null 2>&1
# The line: 99 bytes and a newline; every 1,000th holds the word searched for.
line=$(printf 'x%.0s' $(seq 1 93))
writer="awk 'BEGIN { for (i = 1; i <= $LINES; i++) { if (i % 1000 == 0) print \"NEEDLE\" substr(\"$line\", 7); else print \"$line\" substr(i \"\", 1, 6) } }'"
# A first instance unpacks the image: not part of the measurement.
"$graven" run base:bench -- true >/dev/null

echo "ingesting $LINES lines through graven" >&2
start=$(now)
# A bound above the lines' size: retention must not free any of them during the run.
id=$("$graven" run -d --log-size 4GiB base:bench -- /bin/sh -c "$writer")
state="$GRAVEN_HOME/instances/$id/state.json"
shim=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['shim']['pid'])" "$state")
work_pid=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['workload']['pid'])" "$state")
shim_cpu=0 load_cpu=0
while kill -0 "$shim" 2>/dev/null; do
  c=$(cpu "$shim") && [ -n "$c" ] && shim_cpu=$c
  c=$(cpu "$work_pid") && [ -n "$c" ] && load_cpu=$c
  sleep 0.05
done
"$graven" rm "$id" >/dev/null
graven_s=$(echo "$(now) - $start" | bc)
source_dir=$(dirname "$(find "$GRAVEN_HOME/logs" -name out -path "*$id*")")
stored=$(wc -l < "$source_dir/out")
if [ "$stored" -ne "$LINES" ]; then
  echo "the store holds $stored lines of the $LINES written" >&2
  exit 1
fi

echo "ingesting $LINES lines through rsyslogd" >&2
port=$(free_port)
cat > "$work/rsyslog.conf" <<CONF
global(workDirectory="$work")
module(load="imptcp")
input(type="imptcp" address="127.0.0.1" port="$port" ruleset="bench")
template(name="raw" type="string" string="%rawmsg%\n")
ruleset(name="bench" queue.type="Direct") {
  action(type="omfile" file="$work/rsyslog.out" template="raw" asyncWriting="on"
         ioBufferSize="64k" flushInterval="1" flushOnTXEnd="off")
}
CONF
rsyslogd -n -f "$work/rsyslog.conf" -i "$work/rsyslog.pid" &
rsyslog_pid=$!
for _ in $(seq 100); do nc -z 127.0.0.1 "$port" 2>/dev/null && break; sleep 0.1; done
start=$(now)
sh -c "$writer" | nc -q 1 127.0.0.1 "$port"
want=$stored
while [ "$(wc -l < "$work/rsyslog.out" 2>/dev/null || echo 0)" -lt "$want" ]; do sleep 0.05; done
rsyslog_s=$(echo "$(now) - $start" | bc)
rsyslog_cpu=$(cpu "$rsyslog_pid")
kill "$rsyslog_pid"; wait "$rsyslog_pid" 2>/dev/null || true
rm -f "$work/rsyslog.out"

echo "searching" >&2
# The same text as a plain file, written afresh (not a copy of the data file).
sh -c "$writer" > "$work/plain.txt"
hits=$("$graven" logs --grep NEEDLE | wc -l)
graven_grep=$(for _ in $(seq "$RUNS"); do
  s=$(now); "$graven" logs --grep NEEDLE >/dev/null; echo "$(now) - $s" | bc; done | median)
grep_f=$(for _ in $(seq "$RUNS"); do
  s=$(now); grep -F NEEDLE "$work/plain.txt" | wc -l >/dev/null; echo "$(now) - $s" | bc; done | median)
grep_hits=$(grep -F -c NEEDLE "$work/plain.txt")
rm -f "$work/plain.txt"

rate() { echo "$stored / $1" | bc; }
per_line() { echo "scale=1; $1 * 1000000000 / $stored" | bc; }
printf '\n%-44s %14s %14s %8s\n' "$LINES lines of 100 bytes" graven rsyslogd ratio
printf '%-44s %14s %14s %8s\n' "ingestion, lines/s (durable)" "$(rate "$graven_s")" "$(rate "$rsyslog_s")" \
  "$(echo "scale=2; $rsyslog_s / $graven_s" | bc)x"
printf '%-44s %14s %14s\n' "CPU per line, ns (graven: shim only)" "$(per_line "$shim_cpu")" "$(per_line "$rsyslog_cpu")"
printf '%-44s %14s\n' "  the workload's own writes, ns per line" "$(per_line "$load_cpu")"
printf '\n%-44s %14s %14s %8s\n' "search (hits: $hits, grep's $grep_hits)" "graven logs" "grep -F" ratio
printf '%-44s %14s %14s %8s\n' "  median of $RUNS, s" "$graven_grep" "$grep_f" \
  "$(echo "scale=2; $graven_grep / $grep_f" | bc)x"
