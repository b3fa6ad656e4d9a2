#!/usr/bin/env bash
# bench/proxy.sh: the same backend hit directly, through graven's route, through HAProxy and
# through nginx, with the same wrk settings; prints requests/s, p50/p99 latency and the CPU
# time each proxy process spent per request (utime+stime from /proc/PID/stat around the
# measured run, divided by the requests wrk completed), with ratios to HAProxy at the same
# thread count, for each thread count in THREAD_COUNTS.
#
# Usage: bench/proxy.sh            (defaults below; override with environment variables)
#   DURATION=10s CONNECTIONS=32 WRK_THREADS=1 THREAD_COUNTS="1 2" ROUNDS=3 PROFILE=dist bench/proxy.sh
#   MODES=syscalls DURATION=5s PROFILE=release bench/proxy.sh   (system calls per request)
#
# Rounds interleave the targets (direct, graven, HAProxy, nginx, direct, ...) so that load from
# other processes on the machine falls on all of them alike; the summary takes the median of
# each figure over the rounds. graven is built with the `dist` profile (release plus fat LTO,
# Cargo.toml: the profile for shipped binaries); PROFILE=release measures a plain release build.
# The build adds the `dev-tools` feature for the hidden `graven __proxy` command, which serves
# one `graven::proxy::Route`: the same route code `graven up` serves, with the same profile.
#
# The TCP part (MODES contains tcp) serves the same backend through graven's TCP route and
# HAProxy in `mode tcp` (its defaults: no splicing): CPU per connection from wrk with
# `Connection: close` (one connection per request), and CPU per megabyte from wrk fetching a
# BULK_MB file over CONNECTIONS_BULK keep-alive connections.
#
# The system-call part (MODES contains syscalls) counts each proxy's system calls per request
# under the same wrk load: perf's syscall tracepoints over one DURATION run (little overhead),
# then `strace -c -f` over another for the calls that failed (reads returning EAGAIN).
# strace slows the proxy several times over, which changes how many events each epoll_wait
# returns, so its table shows where the calls go, and perf's row is the figure.
#
# Each proxy runs with each thread count N of THREAD_COUNTS: graven's route with `--threads N`,
# HAProxy with `nbthread N`, nginx with `worker_processes N`. Keep-alive on both sides
# everywhere. The backend is nginx answering a fixed `return 200` on loopback, one worker.
#
# The load generator and the backend share the machine's cores with the proxy. So that this
# is seen rather than guessed, each run also reports the CPU wrk itself spent per request
# (its rusage, from the shell's `times`) and how busy the whole machine was (/proc/stat):
# when the machine is near 100% busy, requests/s is bounded by the machine, not the proxy,
# and only CPU per request compares the proxies.
set -euo pipefail

DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-32}
WRK_THREADS=${WRK_THREADS:-1}
THREAD_COUNTS=${THREAD_COUNTS:-${PROXY_THREADS:-1 2}}
ROUNDS=${ROUNDS:-3}
PROFILE=${PROFILE:-dist}
MODES=${MODES:-http tcp}
BULK_MB=${BULK_MB:-16}
CONNECTIONS_BULK=${CONNECTIONS_BULK:-4}

root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/proxy-lib.sh
source "$root/bench/proxy-lib.sh"
proxy_bench_start proxy

"$root/scripts/install-packages" wrk haproxy nginx

# GRAVEN=PATH measures a graven binary built already (with dev-tools), say an older commit's;
# GRAVEN_BASE=PATH adds another as the target "graven-base" to every round, for an A/B of two
# builds under the same conditions.
if [ -n "${GRAVEN:-}" ]; then
    graven=$GRAVEN
else
    echo "building graven (profile $PROFILE)..." >&2
    (cd "$root" && cargo build --profile "$PROFILE" --features dev-tools --quiet --bin graven)
    graven="$root/target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/graven"
fi

# utime and stime of a process, in clock ticks.
cpu_ticks() {
    awk '{ print $14, $15 }' "/proc/$1/stat"
}

backend_port=$(free_port)
mkdir -p "$work/files"
head -c $((BULK_MB * 1048576)) /dev/urandom >"$work/files/bulk"
nginx_conf "$work/backend" 1 <<EOF
    keepalive_timeout 300s;
    sendfile on;
    server {
        listen 127.0.0.1:$backend_port;
        location / { return 200 "hello from the backend\n"; }
        location = /bulk { alias $work/files/bulk; }
    }
EOF
nginx -c "$work/backend/nginx.conf" -p "$work/backend" &
pids+=($!)
wait_port "$backend_port"

# start_PROXY PORT THREADS: starts the proxy on PORT with THREADS threads (or workers).
start_graven() {
    "$graven" __proxy --threads "$2" --listen "127.0.0.1:$1" --backend "127.0.0.1:$backend_port" >/dev/null &
    started=$!
}

start_graven-base() {
    "$GRAVEN_BASE" __proxy --threads "$2" --listen "127.0.0.1:$1" --backend "127.0.0.1:$backend_port" >/dev/null &
    started=$!
}

start_graven_tcp() {
    "$graven" __proxy --tcp --threads "$2" --listen "127.0.0.1:$1" --backend "127.0.0.1:$backend_port" >/dev/null &
    started=$!
}

start_haproxy_tcp() {
    start_haproxy "$1" "$2" tcp
}

start_nginx() {
    nginx_conf "$work/nginx" "$2" <<EOF
    upstream instances {
        server 127.0.0.1:$backend_port;
        keepalive 256;
    }
    server {
        listen 127.0.0.1:$1;
        location / {
            proxy_pass http://instances;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
EOF
    nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" >/dev/null 2>&1 &
    started=$!
}

# All PIDs whose CPU counts for a proxy: the process and, for nginx with a master, its workers.
family() {
    local pid=$1
    echo "$pid"
    pgrep -P "$pid" || true
}

family_ticks() {
    local user=0 sys=0 u k
    for pid in $(family "$1"); do
        read -r u k < <(cpu_ticks "$pid")
        user=$((user + u))
        sys=$((sys + k))
    done
    echo "$user $sys"
}

# The voluntary and involuntary context switches of all a proxy's threads so far (a thread
# that ended meanwhile is not counted; the proxies start theirs at the start).
family_switches() {
    local voluntary=0 involuntary=0 pid v n
    for pid in $(family "$1"); do
        read -r v n < <(awk '/^voluntary_ctxt_switches/ { v += $2 } /^nonvoluntary_ctxt_switches/ { n += $2 }
            END { print v + 0, n + 0 }' /proc/"$pid"/task/*/status 2>/dev/null)
        voluntary=$((voluntary + v))
        involuntary=$((involuntary + n))
    done
    echo "$voluntary $involuntary"
}

# The machine's busy and total clock ticks so far, from /proc/stat (idle and iowait count as
# not busy).
machine_ticks() {
    awk '$1 == "cpu" { total = 0; for (i = 2; i <= 9; i++) total += $i; print total - $5 - $6, total }' /proc/stat
}

# The user+system seconds this shell's waited-for children had used, from the output of
# `times` saved in file $1 (`times` must run in this shell, not in a subshell).
children_seconds() {
    awk 'NR == 2 {
        split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%.3f", u[1] * 60 + u[2] + s[1] * 60 + s[2]
    }' "$1"
}

# Reads wrk's output and prints: requests rps p50 p99 (latencies as wrk prints them).
wrk_figures() {
    awk '
        /requests in/ { requests = $1 }
        /Requests\/sec/ { rps = $2 }
        $1 == "50%" { p50 = $2 }
        $1 == "99%" { p99 = $2 }
        /Non-2xx|Socket errors/ { errors = errors $0 " " }
        END { print requests, rps, p50, p99; if (errors != "") print errors > "/dev/stderr" }
    ' "$work/wrk.out"
}

# The PID of the proxy the last start_* function launched (set, not printed, so the process
# stays a child of this shell and can be waited for).
started=""

# One row per run: name|threads|requests/s|p50 µs|p99 µs|user µs/request|system µs/request|
# wrk's CPU µs/request|machine busy %|voluntary and involuntary context switches of the
# proxy per 100 requests.
results=()
run() {
    local name=$1 threads=$2 pid=$3 port=$4
    wait_port "$port"
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$WARMUP" "http://127.0.0.1:$port/" >/dev/null
    local user0=0 sys0=0 user1=0 sys1=0 busy0 total0 busy1 total1 wrk0 wrk1
    local vol0=0 invol0=0 vol1=0 invol1=0
    if [ -n "$pid" ]; then
        read -r user0 sys0 < <(family_ticks "$pid")
        read -r vol0 invol0 < <(family_switches "$pid")
    fi
    read -r busy0 total0 < <(machine_ticks)
    times >"$work/times0"
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "http://127.0.0.1:$port/" >"$work/wrk.out"
    times >"$work/times1"
    wrk0=$(children_seconds "$work/times0")
    wrk1=$(children_seconds "$work/times1")
    read -r busy1 total1 < <(machine_ticks)
    if [ -n "$pid" ]; then
        read -r user1 sys1 < <(family_ticks "$pid")
        read -r vol1 invol1 < <(family_switches "$pid")
    fi
    read -r requests rps p50 p99 < <(wrk_figures)
    local load
    load=$(awk -v w0="$wrk0" -v w1="$wrk1" -v n="$requests" -v b=$((busy1 - busy0)) -v t=$((total1 - total0)) \
        'BEGIN { printf "%.2f|%.0f", (w1 - w0) * 1e6 / n, 100 * b / t }')
    # Clock ticks are 1/CLK_TCK s; report microseconds of CPU per request.
    local cpu
    cpu=$(awk -v u=$((user1 - user0)) -v s=$((sys1 - sys0)) -v hz="$(getconf CLK_TCK)" \
        -v n="$requests" -v proxy="$pid" 'BEGIN {
            if (proxy == "") { print "-|-" } else { printf "%.2f|%.2f", u / hz * 1e6 / n, s / hz * 1e6 / n }
        }')
    local switches="-|-"
    if [ -n "$pid" ]; then
        switches=$(awk -v v=$((vol1 - vol0)) -v i=$((invol1 - invol0)) -v n="$requests" \
            'BEGIN { printf "%.2f|%.2f", v * 100 / n, i * 100 / n }')
    fi
    results+=("$name|$threads|$rps|$(micros "$p50")|$(micros "$p99")|$cpu|$load|$switches")
}

# One row per TCP run: name|connections/s|CPU µs/connection|MB/s|CPU µs/MB.
tcp_results=()
run_tcp() {
    local name=$1 pid=$2 port=$3 user0 sys0 user1 sys1
    wait_port "$port"
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$WARMUP" -H "Connection: close" "http://127.0.0.1:$port/" >/dev/null
    read -r user0 sys0 < <(family_ticks "$pid")
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$DURATION" -H "Connection: close" "http://127.0.0.1:$port/" >"$work/wrk.out"
    read -r user1 sys1 < <(family_ticks "$pid")
    local connections rate
    read -r connections rate < <(awk '/requests in/ { n = $1 } /Requests\/sec/ { r = $2 } END { print n, r }' "$work/wrk.out")
    local per_connection
    per_connection=$(awk -v t=$((user1 + sys1 - user0 - sys0)) -v hz="$(getconf CLK_TCK)" -v n="$connections" \
        'BEGIN { printf "%.2f", t / hz * 1e6 / n }')
    read -r user0 sys0 < <(family_ticks "$pid")
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS_BULK" -d"$DURATION" "http://127.0.0.1:$port/bulk" >"$work/wrk.out"
    read -r user1 sys1 < <(family_ticks "$pid")
    local fetched seconds
    read -r fetched seconds < <(awk '/requests in/ { n = $1; s = $4; sub(/s,?$/, "", s) } END { print n, s }' "$work/wrk.out")
    local bulk
    bulk=$(awk -v t=$((user1 + sys1 - user0 - sys0)) -v hz="$(getconf CLK_TCK)" -v n="$fetched" \
        -v mb="$BULK_MB" -v s="$seconds" 'BEGIN { printf "%.1f|%.1f", n * mb / s, t / hz * 1e6 / (n * mb) }')
    tcp_results+=("$name|$rate|$per_connection|$bulk")
}

# The median of a space-separated list, for the summaries' awk programs.
AWK_MEDIAN='
    function median(list,   n, a, i, j, t) {
        n = split(list, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
'

# wrk prints latencies as 512.00us, 1.20ms or 1.01s; convert to microseconds.
micros() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) m = 1; else if (v ~ /ms$/) m = 1e3; else if (v ~ /s$/) m = 1e6; else m = 1
        sub(/[a-z]+$/, "", v); printf "%.0f", v * m
    }'
}

stop() {
    local pid=$1
    for member in $(family "$pid" | sort -r); do kill "$member" 2>/dev/null || true; done
    wait "$pid" 2>/dev/null || true
}

http_proxies="graven haproxy nginx"
[ -n "${GRAVEN_BASE:-}" ] && http_proxies="graven graven-base haproxy nginx"

# each_proxy THREADS COMMAND: starts each HTTP proxy in turn with THREADS threads (or
# workers), runs COMMAND NAME THREADS PID PORT against it, and stops it.
each_proxy() {
    local threads=$1 command=$2 proxy port pid
    for proxy in $http_proxies; do
        port=$(free_port)
        start_"$proxy" "$port" "$threads"
        pid=$started
        pids+=("$pid")
        "$command" "$proxy" "$threads" "$pid" "$port"
        stop "$pid"
    done
}

if [[ " $MODES " == *" http "* ]]; then
    for round in $(seq 1 "$ROUNDS"); do
        echo "round $round/$ROUNDS" >&2
        run "direct (backend, no proxy)" - "" "$backend_port"
        for threads in $THREAD_COUNTS; do
            each_proxy "$threads" run
        done
    done

    echo
    echo "wrk -t$WRK_THREADS -c$CONNECTIONS -d$DURATION, keep-alive; proxies with $THREAD_COUNTS thread(s);" \
        "graven profile $PROFILE; $ROUNDS round(s); $(nproc) CPUs; load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "Median over the rounds. CPU is the proxy's utime+stime per request (all its threads or"
    echo "worker processes); ratios are to HAProxy with the same thread count; 'vs 1 thread' is the"
    echo "proxy's own requests/s over its requests/s at 1 thread. wrk CPU is the load generator's;"
    echo "machine busy is the share of both cores in use during the run (idle and iowait excluded)."
    echo
    printf '%s\n' "${results[@]}" | awk -F'|' "$AWK_MEDIAN"'
        {
            key = $1 "|" $2
            if (!(key in seen)) { seen[key] = 1; order[++targets] = key }
            rps[key] = rps[key] " " $3; p50[key] = p50[key] " " $4; p99[key] = p99[key] " " $5
            if ($6 != "-") { user[key] = user[key] " " $6; sys[key] = sys[key] " " $7; cpu[key] = cpu[key] " " ($6 + $7) }
            wrk[key] = wrk[key] " " $8; busy[key] = busy[key] " " $9
            if ($10 != "-") { vol[key] = vol[key] " " $10; invol[key] = invol[key] " " $11 }
        }
        END {
            print "| target | threads | requests/s | p50 µs | p99 µs | CPU µs/request (user + sys) | CPU vs HAProxy | req/s vs HAProxy | req/s vs 1 thread | wrk CPU µs/request | machine busy | switches per 100 requests (voluntary / involuntary) |"
            print "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            for (i = 1; i <= targets; i++) {
                key = order[i]; split(key, part, "|"); t = part[1]; n = part[2]
                base = "haproxy|" n; one = t "|1"
                if (key in cpu) {
                    c = sprintf("%.2f (%.2f + %.2f)", median(cpu[key]), median(user[key]), median(sys[key]))
                    r = sprintf("%.2f×", median(cpu[key]) / median(cpu[base]))
                    q = sprintf("%.2f×", median(rps[key]) / median(rps[base]))
                    v = (one in rps) ? sprintf("%.2f×", median(rps[key]) / median(rps[one])) : "-"
                } else { c = "-"; r = "-"; q = "-"; v = "-" }
                s = (key in vol) ? sprintf("%.2f / %.2f", median(vol[key]), median(invol[key])) : "-"
                printf "| %s | %s | %.0f | %.0f | %.0f | %s | %s | %s | %s | %.2f | %.0f%% | %s |\n", t, n, median(rps[key]), median(p50[key]), median(p99[key]), c, r, q, v, median(wrk[key]), median(busy[key]), s
            }
        }'
    echo
    echo "Every run:"
    echo
    echo "| target | threads | requests/s | p50 µs | p99 µs | user µs/request | sys µs/request | wrk CPU µs/request | machine busy % | switches per 100 requests (voluntary / involuntary) |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${results[@]}" | awk -F'|' '{ printf "| %s | %s | %.0f | %s | %s | %s | %s | %s | %s | %s / %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 }'
fi

# The syscalls perf counts, as perf names them; the summary adds them up by kind.
SYSCALL_EVENTS="raw_syscalls:sys_enter"
for call in read recvfrom readv write sendto writev epoll_wait epoll_pwait epoll_ctl futex; do
    SYSCALL_EVENTS="$SYSCALL_EVENTS,syscalls:sys_enter_$call"
done

# run_syscalls NAME THREADS PID PORT: one row of system calls per request, then strace's
# table of calls and errors per request.
syscall_rows=()
run_syscalls() {
    local name=$1 threads=$2 pid=$3 port=$4 targets=() member
    wait_port "$port"
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$WARMUP" "http://127.0.0.1:$port/" >/dev/null
    for member in $(family "$pid"); do targets+=(-p "$member"); done
    perf stat -x, -e "$SYSCALL_EVENTS" -p "$(family "$pid" | paste -sd,)" -o "$work/perf.out" &
    local counter=$!
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:$port/" >"$work/wrk.out"
    kill -INT "$counter"
    wait "$counter" || true
    local requests
    read -r requests _ < <(wrk_figures)
    syscall_rows+=("$name|$threads|$(awk -F, -v n="$requests" '
        { sub(/^syscalls:sys_enter_/, "", $3); count[$3] = $1 }
        END {
            printf "%.2f|%.2f|%.2f|%.2f|%.2f|%.2f", count["raw_syscalls:sys_enter"] / n,
                (count["read"] + count["recvfrom"] + count["readv"]) / n,
                (count["write"] + count["sendto"] + count["writev"]) / n,
                (count["epoll_wait"] + count["epoll_pwait"]) / n, count["epoll_ctl"] / n, count["futex"] / n
        }' "$work/perf.out")")
    strace -c -f "${targets[@]}" -o "$work/strace.out" &
    local tracer=$!
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:$port/" >"$work/wrk.out"
    kill -INT "$tracer"
    wait "$tracer" || true
    read -r requests _ < <(wrk_figures)
    echo
    echo "strace -c -f, $name with $threads thread(s): calls and errors per request ($requests requests)"
    echo
    echo "| syscall | calls/request | errors/request |"
    echo "|---|---:|---:|"
    awk -v n="$requests" '
        $NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" {
            errors = (NF == 6) ? $5 : 0
            if ($4 / n >= 0.01) printf "| %s | %.2f | %.2f |\n", $NF, $4 / n, errors / n
        }' "$work/strace.out"
}

if [[ " $MODES " == *" syscalls "* ]]; then
    for threads in $THREAD_COUNTS; do
        each_proxy "$threads" run_syscalls
    done
    echo
    echo "System calls per request (perf syscall tracepoints, wrk -t$WRK_THREADS -c$CONNECTIONS -d$DURATION):"
    echo
    echo "| target | threads | all | reads | writes | epoll_wait | epoll_ctl | futex |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${syscall_rows[@]}" | awk -F'|' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8 }'
fi

if [[ " $MODES " == *" tcp "* ]]; then
    for round in $(seq 1 "$ROUNDS"); do
        echo "tcp round $round/$ROUNDS" >&2
        for threads in $THREAD_COUNTS; do
            for proxy in graven_tcp haproxy_tcp; do
                port=$(free_port)
                start_"$proxy" "$port" "$threads"
                pid=$started
                pids+=("$pid")
                run_tcp "${proxy%_tcp}|$threads" "$pid" "$port"
                stop "$pid"
            done
        done
    done
    echo
    echo "TCP routes: graven's TCP route and HAProxy mode tcp (defaults), with $THREAD_COUNTS thread(s); the same nginx backend."
    echo "Per connection: wrk -c$CONNECTIONS -H 'Connection: close' (one connection per request)."
    echo "Per MB: wrk -c$CONNECTIONS_BULK fetching a ${BULK_MB} MiB file. Median over $ROUNDS round(s); CPU is utime+stime."
    echo
    printf '%s\n' "${tcp_results[@]}" | awk -F'|' "$AWK_MEDIAN"'
        {
            key = $1 "|" $2
            if (!(key in seen)) { seen[key] = 1; order[++targets] = key }
            rate[key] = rate[key] " " $3; conn[key] = conn[key] " " $4; mbs[key] = mbs[key] " " $5; mb[key] = mb[key] " " $6
        }
        END {
            print "| target | threads | connections/s | CPU µs/connection | vs HAProxy | MB/s | CPU µs/MB | vs HAProxy |"
            print "|---|---:|---:|---:|---:|---:|---:|---:|"
            for (i = 1; i <= targets; i++) {
                key = order[i]; split(key, part, "|"); base = "haproxy|" part[2]
                printf "| %s | %s | %.0f | %.2f | %.2f× | %.0f | %.1f | %.2f× |\n", part[1], part[2], median(rate[key]), median(conn[key]), median(conn[key]) / median(conn[base]), median(mbs[key]), median(mb[key]), median(mb[key]) / median(mb[base])
            }
        }'
fi
