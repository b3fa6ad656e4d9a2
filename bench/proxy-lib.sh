# Shared by bench/proxy.sh and bench/proxy-pairs.sh (source it after setting $work): free
# loopback ports, waiting for a listener, and nginx configs for the backend and the peer.

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
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
