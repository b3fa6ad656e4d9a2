#!/usr/bin/env bash
# bench/proxy-pairs.sh: graven's route with one thread and HAProxy with `nbthread 1`, run
# alternately in PAIRS pairs (the order swapped every pair) against one nginx backend with
# the same wrk load as bench/proxy.sh (wrk -t1 -c32, keep-alive, 2 s warm-up, DURATION s
# measured). Prints one row per run (CPU µs per request from /proc/PID/task/*/schedstat, in
# nanoseconds, split into user and system time in the ratio of /proc/PID/stat's clock ticks;
# voluntary context switches per 100 requests) and a summary of the pairs: how many pairs
# graven spent less CPU (and less system time) in, and the median of the pairs' ratios.
#
# Many short pairs, each run next to the other target, compare two proxies on a VM whose
# speed moves from minute to minute better than medians of a few long rounds do.
#
# Usage: GRAVEN=target/release/graven bench/proxy-pairs.sh   (a build with dev-tools)
#   PAIRS=12 DURATION=5 GRAVEN=… bench/proxy-pairs.sh
set -euo pipefail

PAIRS=${PAIRS:-12}
DURATION=${DURATION:-5}
graven=${GRAVEN:?GRAVEN=PATH of a graven binary built with --features dev-tools}

root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-packages" wrk haproxy nginx

# shellcheck source=bench/proxy-lib.sh
source "$root/bench/proxy-lib.sh"
proxy_bench_start pairs

backend_port=$(free_port)
nginx_conf "$work/backend" 1 <<EOC
    keepalive_timeout 300s;
    sendfile on;
    server {
        listen 127.0.0.1:$backend_port;
        location / { return 200 "hello from the backend\n"; }
    }
EOC
nginx -c "$work/backend/nginx.conf" -p "$work/backend" &
pids+=($!)
wait_port "$backend_port"

# The CPU nanoseconds all the process's threads have run so far.
run_ns() {
    awk '{ s += $1 } END { printf "%.0f", s }' /proc/"$1"/task/*/schedstat
}

voluntary() {
    awk '/^voluntary_ctxt_switches/ { s += $2 } END { print s + 0 }' /proc/"$1"/task/*/status
}

# one TARGET: starts graven or haproxy with one thread, loads it, prints its row.
one() {
    local target=$1 port pid
    port=$(free_port)
    if [ "$target" = graven ]; then
        "$graven" __proxy --threads 1 --listen "127.0.0.1:$port" --backend "127.0.0.1:$backend_port" >/dev/null &
        pid=$!
    else
        start_haproxy "$port" 1
        pid=$started
    fi
    pids+=("$pid")
    wait_port "$port"
    wrk -t1 -c32 -d2s "http://127.0.0.1:$port/" >/dev/null
    local ns0 ns1 user0 sys0 user1 sys1 vol0 vol1 requests
    ns0=$(run_ns "$pid")
    read -r user0 sys0 < <(awk '{ print $14, $15 }' /proc/"$pid"/stat)
    vol0=$(voluntary "$pid")
    wrk -t1 -c32 -d"${DURATION}s" "http://127.0.0.1:$port/" >"$work/wrk.out"
    ns1=$(run_ns "$pid")
    read -r user1 sys1 < <(awk '{ print $14, $15 }' /proc/"$pid"/stat)
    vol1=$(voluntary "$pid")
    requests=$(awk '/requests in/ { print $1 }' "$work/wrk.out")
    awk -v t="$target" -v n="$requests" -v ns=$((ns1 - ns0)) -v u=$((user1 - user0)) -v s=$((sys1 - sys0)) \
        -v v=$((vol1 - vol0)) -v d="$DURATION" 'BEGIN {
            cpu = ns / 1000 / n; user = (u + s) ? cpu * u / (u + s) : 0
            printf "| %s | %.0f | %.2f | %.2f | %.2f | %.2f |\n", t, n / d, cpu, user, cpu - user, v * 100 / n
        }' | tee -a "$work/rows"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

echo "wrk -t1 -c32 -d${DURATION}s, keep-alive; graven --threads 1 and HAProxy nbthread 1, $PAIRS pairs;" \
    "$(nproc) CPUs; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| target | requests/s | CPU µs/request | user | sys | voluntary switches per 100 requests |"
echo "|---|---:|---:|---:|---:|---:|"
for pair in $(seq 1 "$PAIRS"); do
    if [ $((pair % 2)) = 1 ]; then
        one graven
        one haproxy
    else
        one haproxy
        one graven
    fi
done

echo
awk -F'|' '
    function median(list,   n, a, i, j, t) {
        n = split(list, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    {
        t = $2; gsub(/ /, "", t); cpu[t] = $4; sys[t] = $6
        all[t] = all[t] " " $4; user_all[t] = user_all[t] " " $5; sys_all[t] = sys_all[t] " " $6
        rps[t] = rps[t] " " $3; vol[t] = vol[t] " " $7
        if (NR % 2 == 0) {
            pairs++; ratio = ratio " " cpu["graven"] / cpu["haproxy"]; sys_diff = sys_diff " " (sys["graven"] - sys["haproxy"])
            if (cpu["graven"] < cpu["haproxy"]) below++
            if (sys["graven"] < sys["haproxy"]) sys_below++
        }
    }
    END {
        printf "%d pairs: graven spent less CPU per request in %d, less system time in %d; median of the pairs'"'"' ratios %.3f×, median system time difference %+.2f µs\n", pairs, below, sys_below, median(ratio), median(sys_diff)
        for (t in all) printf "%s: median CPU µs/request %.2f (%.2f + %.2f), requests/s %.0f, voluntary switches per 100 requests %.2f\n", t, median(all[t]), median(user_all[t]), median(sys_all[t]), median(rps[t]), median(vol[t])
    }' "$work/rows"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
