#!/usr/bin/env bash
# bench/dns.sh: graven's DNS server against unbound serving the same names as a local zone,
# side by side in one run, on this machine (issue 17's target: at least unbound's queries per
# second at no more than its p99 latency).
#
# - graven: `graven up` of a project of SERVICES services on the in-memory runtime (the
#   answers come from the controller's snapshot as they do with real instances; the runtime
#   does not take part in answering), its server on a loopback port.
# - unbound (Debian's): `local-zone: "graven." static` with a `local-data` line for every
#   record graven answers (copied from graven's own answers with dig), NUM_THREADS threads
#   (graven answers on as many threads as there are cores), no cache warm-up needed.
# - dnsperf (Debian's) sends an even mix of A (`SERVICE.local.bench.graven.`) and SRV
#   (`_http._tcp.SERVICE.local.bench.graven.`) queries over UDP from CLIENTS sockets with
#   OUTSTANDING queries in flight, for DURATION seconds, one server after the other; p50 and
#   p99 come from its per-query report (-v).
#
# Usage: bench/dns.sh   (SERVICES=50 DURATION=10 CLIENTS=4 OUTSTANDING=100 NUM_THREADS=$(nproc)
#                        PROFILE=release)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source bench/lib.sh
SERVICES=${SERVICES:-50}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-4}
OUTSTANDING=${OUTSTANDING:-100}
NUM_THREADS=${NUM_THREADS:-$(nproc)}
PROFILE=${PROFILE:-release}
bench_require dnsperf unbound bind9-dnsutils

work=$(mktemp -d /tmp/graven-bench-dns.XXXXXX)
up_pid=""
unbound_pid=""
cleanup() {
  [ -n "$up_pid" ] && kill "$up_pid" 2>/dev/null && wait "$up_pid" 2>/dev/null || true
  [ -n "$unbound_pid" ] && kill "$unbound_pid" 2>/dev/null && wait "$unbound_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The in-memory runtime is a test tool: only in a build with `dev-tools`.
echo "building graven ($PROFILE, with dev-tools for the in-memory runtime)" >&2
cargo build --profile "$PROFILE" --features dev-tools --quiet --bin graven
dir=$PROFILE; [ "$PROFILE" = dev ] && dir=debug
graven="$ROOT/target/$dir/graven"

graven_port=$(free_port)
unbound_port=$(free_port)

mkdir -p "$work/project"
echo "FROM scratch" >"$work/project/Containerfile"
{
  echo 'app = "bench"'
  for i in $(seq "$SERVICES"); do
    printf '\n[services.s%d]\nport = 8080\nroute = "127.0.0.1:0"\n' "$i"
    printf 'health = { path = "/healthz", interval = "1s", healthy_after = 1 }\n'
  done
  printf '\n[dns]\nlisten = ["127.0.0.1:%d"]\n' "$graven_port"
} >"$work/project/graven.toml"

echo "starting graven up ($SERVICES services, in-memory runtime)" >&2
GRAVEN_HOME="$work/home" GRAVEN_RUNTIME=fake "$graven" up "$work/project" >"$work/up.out" 2>"$work/up.log" &
up_pid=$!
for _ in $(seq 600); do
  grep -q "graven: serving" "$work/up.log" && break
  kill -0 "$up_pid" 2>/dev/null || { cat "$work/up.log" >&2; exit 1; }
  sleep 0.1
done
grep -q "graven: serving" "$work/up.log" || { echo "graven up did not serve" >&2; exit 1; }

# The query mix, and unbound's zone made of graven's own answers to it.
: >"$work/queries"
: >"$work/local-data"
for i in $(seq "$SERVICES"); do
  echo "s$i.local.bench.graven. A" >>"$work/queries"
  echo "_http._tcp.s$i.local.bench.graven. SRV" >>"$work/queries"
done
while read -r name type; do
  dig @127.0.0.1 -p "$graven_port" +noall +answer "$name" "$type" |
    awk '{ $1 = $1; printf "  local-data: \"%s\"\n", $0 }' >>"$work/local-data"
done <"$work/queries"
records=$(wc -l <"$work/local-data")
[ "$records" -eq $((SERVICES * 2)) ] || { echo "graven answered $records of $((SERVICES * 2)) names" >&2; exit 1; }

cat >"$work/unbound.conf" <<EOF
server:
  interface: 127.0.0.1
  port: $unbound_port
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "$work"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  num-threads: $NUM_THREADS
  so-reuseport: yes
  access-control: 127.0.0.0/8 allow
  local-zone: "graven." static
$(cat "$work/local-data")
remote-control:
  control-enable: no
EOF
unbound -d -c "$work/unbound.conf" 2>"$work/unbound.log" &
unbound_pid=$!
for _ in $(seq 100); do
  dig @127.0.0.1 -p "$unbound_port" +short +time=1 +tries=1 s1.local.bench.graven. A >/dev/null 2>&1 && break
  sleep 0.1
done
# The same answers from both, or the comparison means nothing.
for server in "$graven_port" "$unbound_port"; do
  while read -r name type; do
    dig @127.0.0.1 -p "$server" +short "$name" "$type"
  done <"$work/queries" >"$work/answers-$server"
done
cmp -s "$work/answers-$graven_port" "$work/answers-$unbound_port" ||
  { echo "graven and unbound answer differently" >&2; diff "$work/answers-$graven_port" "$work/answers-$unbound_port" >&2; exit 1; }

# run NAME PORT: dnsperf against the server, its verbose report kept for the percentiles.
run() {
  local name=$1 port=$2
  dnsperf -s 127.0.0.1 -p "$port" -d "$work/queries" -l "$DURATION" -c "$CLIENTS" \
    -q "$OUTSTANDING" -v >"$work/perf-$name" 2>&1
  local qps lost p50 p99
  qps=$(awk '/Queries per second:/ { printf "%d", $4 }' "$work/perf-$name")
  lost=$(awk '/Queries lost:/ { print $3 }' "$work/perf-$name")
  # Each answered query's line ends with its latency in seconds.
  awk '/^> NOERROR/ { print $NF }' "$work/perf-$name" | sort -g >"$work/lat-$name"
  local n
  n=$(wc -l <"$work/lat-$name")
  p50=$(awk -v n="$n" 'NR == int(n * 0.50) + 1 { printf "%.3f", $1 * 1000 }' "$work/lat-$name")
  p99=$(awk -v n="$n" 'NR == int(n * 0.99) + 1 { printf "%.3f", $1 * 1000 }' "$work/lat-$name")
  printf '%s %s %s %s %s\n' "$name" "$qps" "$p50" "$p99" "$lost"
}

echo "dnsperf: $DURATION s each, $CLIENTS clients, $OUTSTANDING outstanding, $((SERVICES * 2)) names (A and SRV)" >&2
graven_row=$(run graven "$graven_port")
unbound_row=$(run unbound "$unbound_port")
read -r _ g_qps g_p50 g_p99 g_lost <<<"$graven_row"
read -r _ u_qps u_p50 u_p99 u_lost <<<"$unbound_row"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
echo
echo "| server | queries/s | p50 ms | p99 ms | lost |"
echo "|---|---:|---:|---:|---:|"
echo "| graven ($NUM_THREADS cores) | $g_qps | $g_p50 | $g_p99 | $g_lost |"
echo "| unbound 1.17 (num-threads $NUM_THREADS) | $u_qps | $u_p50 | $u_p99 | $u_lost |"
echo "| graven / unbound | $(ratio "$g_qps" "$u_qps") | $(ratio "$g_p50" "$u_p50") | $(ratio "$g_p99" "$u_p99") | |"
echo
echo "graven's server: $(grep -c . "$work/queries") names; RSS of graven up: $(awk '/VmRSS/ { print $2, $3 }' /proc/"$up_pid"/status)"
