# Shared by bench/proxy.sh and bench/proxy-pairs.sh (source it): their scratch dir and the
# processes they start, stopped by PID on exit; waiting for a listener, and nginx configs for
# the backend and the peer. Free loopback ports come from bench/lib.sh's free_port.

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# proxy_bench_start NAME: makes $work (/tmp/graven-bench-NAME.*) and $pids, the PIDs of what
# the script starts; on exit each is stopped by its PID and $work removed.
proxy_bench_start() {
    work=$(mktemp -d "/tmp/graven-bench-$1.XXXXXX")
    pids=()
    trap proxy_bench_cleanup EXIT
}

proxy_bench_cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}

wait_port() {
    local port=$1
    for _ in $(seq 1 500); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.01
    done
    echo "$(basename "$0"): nothing listens on port $port" >&2
    cat "$work"/*/log "$work"/*/error.log 2>/dev/null >&2 || true
    exit 1
}

# nginx_conf DIR WORKERS: writes DIR/nginx.conf: nginx in the foreground with WORKERS worker
# processes (under a master only when there are several), its files in DIR, no access log,
# keep-alive without a request limit, and the lines read from stdin inside its http block.
nginx_conf() {
    local dir=$1 workers=$2 master=off
    [ "$workers" -gt 1 ] && master=on
    mkdir -p "$dir"
    {
        cat <<EOF
daemon off;
master_process $master;
worker_processes $workers;
error_log $dir/error.log;
pid $dir/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 100000000;
EOF
        cat
        echo "}"
    } >"$dir/nginx.conf"
}

# start_haproxy PORT THREADS [tcp]: HAProxy on PORT with `nbthread THREADS` in front of
# $backend_port, in HTTP mode with keep-alive on both sides, or in `mode tcp` (its defaults: no
# splicing); its PID in $started.
start_haproxy() {
    local http_frontend="" http_backend="" mode=${3:-http}
    if [ "$mode" = http ]; then
        http_frontend="    option http-keep-alive"
        http_backend="    http-reuse always"
    fi
    mkdir -p "$work/haproxy"
    grep -v '^$' >"$work/haproxy/haproxy.cfg" <<EOF
global
    nbthread $2
    maxconn 4096
defaults
    mode $mode
$http_frontend
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend route
    bind 127.0.0.1:$1
    default_backend instances
backend instances
$http_backend
    server backend 127.0.0.1:$backend_port
EOF
    haproxy -db -f "$work/haproxy/haproxy.cfg" >"$work/haproxy/log" 2>&1 &
    started=$!
}
