#!/usr/bin/env bash
# bench/phoenix.sh: recycle every instance of a 4-instance service under keep-alive load, with
# the failed requests counted, the time taken and the extra instances at the peak: by graven's
# phoenix and by Docker Swarm's `docker service update --force` (same image, no change).
#
# - graven: `graven up` (its own GRAVEN_HOME in the temp dir, stopped by its PID) runs the
#   example with `[services.web.phoenix] max_age = "$AGE"`, no jitter, `max_at_once = 1`,
#   max_surge 1, max_unavailable 0: the 4 instances, launched together, are all due at once
#   and recycled one at a time, surge-first. Timing: from the first instance condemned for its
#   age to the last of the first 4 gone, both as seen by sampling `graven status --json`
#   (one sample every ~0.1 s, so ±0.1 s). Peak: the most instances of the service alive in
#   the samples (starting, healthy, draining), minus 4.
# - Swarm: the same image (baked by graven, exported, `docker load`ed) as a 4-replica service
#   on a one-node Swarm of a dockerd of the script's own (as bench/deploy.sh: host network,
#   SO_REUSEPORT, since this kernel has no IPVS for the routing mesh), recycled with
#   `docker service update --force` in start-first order (its default, stop-first, fails
#   requests by design; `ORDER=stop-first` measures it). Timing: from the command until the
#   last of the first 4 containers is gone. Peak: the most containers running in a sampling
#   loop (`docker ps`, ~0.1 s), minus 4.
# - Load: `graven __load`, C keep-alive connections from before the recycle to a second after;
#   a failed request is a connection error or a non-2xx answer.
#
# Usage: bench/phoenix.sh                (CONNECTIONS=8 AGE=20s by default)
#        ONLY=graven bench/phoenix.sh    (skip the Swarm half)
#        PROFILE=dev bench/phoenix.sh    (the debug build the tests use: no release build)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/bench/lib.sh"
bench_require docker.io jq bc
use_debian_docker
CONNECTIONS=${CONNECTIONS:-8}
AGE=${AGE:-20s}
ORDER=${ORDER:-start-first}
REPLICAS=4
GRACE=5s

free_port() { # free_port tcp|udp
    python3 - "$1" <<'PY'
import socket, sys
kind = socket.SOCK_STREAM if sys.argv[1] == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
PY
}
now() { date +%s.%N; }
seconds() { echo "scale=2; ($2 - $1) / 1" | bc; }

PROFILE=${PROFILE:-release}
echo "building graven ($PROFILE, with the load tool) and the example" >&2
cargo build --quiet --profile "$PROFILE" --features dev-tools --bin graven --manifest-path "$ROOT/Cargo.toml"
case $PROFILE in dev) GRAVEN=$ROOT/target/debug/graven ;; *) GRAVEN=$ROOT/target/$PROFILE/graven ;; esac
sh "$ROOT/examples/hello/build.sh"

WORK=$(mktemp -d /tmp/graven-bench-phoenix.XXXXXX)
DOCKERD_PID=
GRAVEN_UP_PID=
cleanup() {
    set +e
    if [ -n "$GRAVEN_UP_PID" ]; then
        kill -TERM "$GRAVEN_UP_PID" 2>/dev/null
        for _ in $(seq 300); do kill -0 "$GRAVEN_UP_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$GRAVEN_UP_PID" 2>/dev/null
    fi
    if [ -n "$DOCKERD_PID" ]; then
        docker service rm hello >/dev/null 2>&1
        timeout 30 docker swarm leave --force >/dev/null 2>&1
        stop_dockerd
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# start_load PORT / stop_load: the load in the background, stopped a second after the
# recycle; its report in $WORK/load.json.
start_load() {
    rm -f "$WORK/stop"
    "$GRAVEN" __load --address "127.0.0.1:$1" --connections "$CONNECTIONS" --duration 600s \
        --stop-file "$WORK/stop" --json >"$WORK/load.json" &
    load_pid=$!
    sleep 1
}
stop_load() {
    sleep 1
    touch "$WORK/stop"
    wait "$load_pid"
}

# row WHO SECONDS PEAK: appends the recycle's row to $WORK/rows.tsv.
row() {
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$(jq .total "$WORK/load.json")" \
        "$(jq .failed "$WORK/load.json")" "$3" >>"$WORK/rows.tsv"
    jq -r '.failures[:3][] | "  '"$1"' failure: " + .' "$WORK/load.json" >&2
}

# ---------------------------------------------------------------- graven half
bench_graven() {
    local home=$WORK/graven-home project=$WORK/graven-project port
    mkdir -p "$project/dist"
    cp "$ROOT/examples/hello/Containerfile" "$project/"
    cp "$ROOT/examples/hello/dist/hello" "$project/dist/"
    port=$(free_port tcp)
    cat >"$project/graven.toml" <<TOML
app = "bench"

[services.web]
instances = $REPLICAS
port = 8080
route = "127.0.0.1:$port"
env = { VERSION = "1" }
health = { path = "/healthz", interval = "200ms", timeout = "200ms", healthy_after = 2, unhealthy_after = 3 }
deploy = { strategy = "rolling", max_surge = 1, max_unavailable = 0, health_deadline = "30s" }
stop_grace = "$GRACE"
phoenix = { max_age = "$AGE", max_at_once = 1 }
TOML
    GRAVEN_HOME=$home GRAVEN_RUNTIME=local "$GRAVEN" up "$project" >"$WORK/up.out" 2>"$WORK/up.err" &
    GRAVEN_UP_PID=$!
    for _ in $(seq 600); do
        grep -qs "graven: serving" "$WORK/up.err" && break
        kill -0 "$GRAVEN_UP_PID" 2>/dev/null || break
        sleep 0.1
    done
    grep -q "graven: serving" "$WORK/up.err" || { echo "graven up did not serve:" >&2; tail "$WORK/up.err" >&2; exit 1; }
    status() { GRAVEN_HOME=$home "$GRAVEN" status --json 2>/dev/null; }
    # The first instances, once all are healthy.
    local first=""
    for _ in $(seq 600); do
        first=$(status | jq -r '.[0].state.instances | to_entries
            | if (map(select(.value.lifecycle == "healthy")) | length) == '"$REPLICAS"'
              then map(.key) | join(" ") else "" end')
        [ -n "$first" ] && break
        sleep 0.1
    done
    [ -n "$first" ] || { echo "the instances did not get healthy" >&2; exit 1; }
    start_load "$port"
    local started="" peak=0 alive left snapshot
    while :; do
        snapshot=$(status) || continue
        alive=$(jq '.[0].state.instances | length' <<<"$snapshot")
        [ "$alive" -gt "$peak" ] && peak=$alive
        if [ -z "$started" ] && jq -e '.[0].state.instances | any(.condemned.why == "aged")' \
            <<<"$snapshot" >/dev/null; then
            started=$(now)
        fi
        left=0
        for name in $first; do
            jq -e --arg n "$name" '.[0].state.instances | has($n)' <<<"$snapshot" >/dev/null && left=$((left + 1))
        done
        [ "$left" -eq 0 ] && break
        sleep 0.05
    done
    local done_at
    done_at=$(now)
    stop_load
    row "graven phoenix" "$(seconds "$started" "$done_at")" $((peak - REPLICAS))
    kill -TERM "$GRAVEN_UP_PID"
    wait "$GRAVEN_UP_PID" || true
    GRAVEN_UP_PID=
}

# ---------------------------------------------------------------- Swarm half
bench_swarm() {
    start_dockerd "$WORK/docker"
    local data_port
    data_port=$(free_port udp)
    while [ "$data_port" -gt 49151 ]; do data_port=$(free_port udp); done
    docker swarm init --advertise-addr 127.0.0.1 --listen-addr "127.0.0.1:$(free_port tcp)" \
        --data-path-port "$data_port" >/dev/null
    local context="$WORK/swarm-context"
    mkdir -p "$context/dist"
    cp "$ROOT/examples/hello/dist/hello" "$context/dist/hello"
    { cat "$ROOT/examples/hello/Containerfile"; echo "ENV VERSION=1"; } >"$context/Containerfile"
    GRAVEN_HOME="$WORK/swarm-home" "$GRAVEN" bake "$context" --tag hello:v1 >/dev/null 2>&1
    GRAVEN_HOME="$WORK/swarm-home" "$GRAVEN" image export hello:v1 --format docker \
        -o "$WORK/hello.tar" >/dev/null
    docker load -q -i "$WORK/hello.tar" >/dev/null

    PORT=$(free_port tcp)
    docker service create --quiet --name hello --replicas $REPLICAS --network host \
        --no-resolve-image --env PORT="$PORT" --env REUSE_PORT=1 \
        --stop-grace-period $GRACE hello:v1 >/dev/null
    until [ "$(docker ps -q | wc -l)" -eq $REPLICAS ] && curl -sf "127.0.0.1:$PORT/" >/dev/null; do
        sleep 0.1
    done
    local first
    first=$(docker ps -q)
    start_load "$PORT"
    # The peak, sampled while the update runs.
    (
        peak=0
        while [ ! -e "$WORK/sampled" ]; do
            n=$(docker ps -q | wc -l)
            [ "$n" -gt "$peak" ] && peak=$n && echo "$peak" >"$WORK/swarm-peak"
            sleep 0.05
        done
    ) &
    local sampler=$! started done_at
    started=$(now)
    docker service update --quiet --force --update-order "$ORDER" --update-parallelism 1 \
        --no-resolve-image hello >/dev/null
    while :; do
        local running left=0
        running=$(docker ps -q)
        for id in $first; do grep -q "^$id" <<<"$running" && left=$((left + 1)); done
        [ "$left" -eq 0 ] && break
        sleep 0.05
    done
    done_at=$(now)
    touch "$WORK/sampled"
    wait "$sampler"
    stop_load
    row "swarm update --force ($ORDER)" "$(seconds "$started" "$done_at")" \
        $(($(cat "$WORK/swarm-peak") - REPLICAS))
}

printf 'who\tseconds\trequests\tfailed\textra_at_peak\n' >"$WORK/rows.tsv"
if [ "${ONLY:-}" != "graven" ]; then bench_swarm; fi
bench_graven

echo
echo "Recycling every one of $REPLICAS instances under $CONNECTIONS keep-alive connections"
echo "($(nproc) cores, $(uname -r); Docker $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '-'))"
column -t -s $'\t' "$WORK/rows.tsv"
awk -F'\t' 'NR == 2 { swarm = $2 } NR == 3 && swarm > 0 { printf "graven / swarm time: %.2fx\n", $2 / swarm }' "$WORK/rows.tsv"
