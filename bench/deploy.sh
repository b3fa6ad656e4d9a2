#!/usr/bin/env bash
# bench/deploy.sh: a rolling replace of 4 instances of the example service under keep-alive
# load, timed, with the failed requests counted: by Docker Swarm
# (`docker service update --update-order start-first`) and by graven.
#
# Swarm half (this file today):
# - dockerd is started here with its own data-root, exec-root, pidfile and unix socket in a
#   temp dir, and stopped by its PID in a trap; nothing of the machine's Docker is used.
# - The image: the example baked by graven (its Containerfile plus `ENV VERSION=N`, so each
#   update is a changed image), exported with `graven image export --format docker` and
#   `docker load`ed, so Swarm runs the very image graven bakes.
# - Networking, and why: Swarm's routing mesh needs IPVS, which this kernel does not have
#   (/proc/net/ip_vs is missing), so `--publish` in ingress mode cannot route. Host-mode
#   publishing binds the published port once per node, so 4 replicas on one node collide,
#   and giving each replica its own port (a `{{.Task.Slot}}` template) collides too under
#   start-first, where a slot's new task starts while its old one still holds the port.
#   What stays honest (one service, 4 replicas, no proxy of ours in front): host
#   networking, with every replica listening on the same port with SO_REUSEPORT (the
#   example's `$REUSE_PORT=1`), so the kernel spreads new connections over all replicas,
#   old and new, as a Swarm user without the mesh would get. Keep-alive connections stay on
#   the replica that accepted them until it is stopped.
# - Timing: from `docker service update` until the last container of the old image is gone
#   (the command itself returns earlier, once new tasks run; both are printed). Defaults:
#   parallelism 1, no delay, start-first, stop grace 5s (the example's stop_grace).
# - Load: `graven __load` (graven::loadgen), C keep-alive connections for the whole update
#   plus a second after; a failed request is a connection error or a non-2xx answer. The
#   release build here adds the `dev-tools` feature for it (and for GRAVEN_BENCH_RUNTIME=fake);
#   the deploy path it times is the same code as without.
#
# graven half (bench_graven): the same 4-instance rolling replace with `graven deploy`
# against `graven up` (its own GRAVEN_HOME in the temp dir, stopped by its PID), the example
# baked by graven, a new release per update (VERSION in graven.toml's env), max_surge 1,
# max_unavailable 0, the same health timing as examples/hello/graven.toml. Timing: from
# `graven deploy` until it returns, which is when the deploy succeeded: every new instance
# healthy and every old one drained, stopped and removed. The same load tool and settings.
#
# Three nodes (NODES=3, issue 18): a Swarm of three dockerd engines on this machine, each in
# a network namespace of its own with its own address on a bridge made here (a free /24 of
# 10.216.0.0/16), a manager and two workers, as tests/support/swarm.rs makes it; every engine
# stopped by its PID, the namespaces, veths and bridge deleted by name. A rolling replace of
# 6 instances on it, timed and loaded as above:
# - Swarm's own: one service of 6 replicas, start-first, parallelism 1, the very image graven
#   baked loaded into every node and named by its id (no pull). No routing mesh (no IPVS):
#   host networking with SO_REUSEPORT on each node, and the load split over the three nodes'
#   addresses (CONNECTIONS/3 keep-alive connections each, as DNS round-robin would), their
#   counts summed.
# - graven's: `graven up` with `runtime = "swarm"` on the same nodes, one service per
#   instance placed by Swarm, `graven deploy` (max_surge 1, max_unavailable 0), the load on
#   graven's route (the same CONNECTIONS in all).
#
# Usage: bench/deploy.sh            (UPDATES=3 CONNECTIONS=8 by default)
#        ONLY=graven bench/deploy.sh   (skip the Swarm half, e.g. without dockerd)
#        NODES=3 bench/deploy.sh       (the three-node Swarm rows instead, CONNECTIONS=9)
#        GRAVEN_BENCH_RUNTIME=fake ...  (graven's in-process fake instances: a dry run of the
#                                        script only, not a comparable figure)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/bench/lib.sh"
bench_require docker.io
UPDATES=${UPDATES:-3}
CONNECTIONS=${CONNECTIONS:-8}
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

# PROFILE=dev uses the debug build (a loaded machine's quicker build; figures not comparable
# with a release build's).
PROFILE=${PROFILE:-release}
echo "building graven ($PROFILE) and the example" >&2
cargo build --quiet --profile "$PROFILE" --features dev-tools --bin graven --manifest-path "$ROOT/Cargo.toml"
GRAVEN=$ROOT/target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/graven
sh "$ROOT/examples/hello/build.sh"

WORK=$(mktemp -d /tmp/graven-bench-deploy.XXXXXX)
DOCKERD_PID=
GRAVEN_UP_PID=
cleanup() {
    set +e
    # A load still running (the script stopped mid-update) ends by its stop file.
    touch "$WORK/stop"
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
    stop_nodes
    rm -rf "$WORK"
}
trap cleanup EXIT

# start_load PORT: starts the load against 127.0.0.1:PORT in the background (its PID in
# load_pid), lets it run a second of steady load as a baseline, and sets start to the time the
# update starts; record_update stops it. Both halves load through this one function.
start_load() {
    rm -f "$WORK/stop"
    "$GRAVEN" __load --address "127.0.0.1:$1" --connections "$CONNECTIONS" --duration 600s \
        --stop-file "$WORK/stop" --json >"$WORK/load.json" &
    load_pid=$!
    sleep 1
    start=$(now)
}

# record_update WHO VERSION START RETURNED CONVERGED LOAD_PID: lets the load run one more
# second (so reconnections after the update show), stops it, and appends the update's row to
# $WORK/WHO.tsv; both halves are recorded by this one function, so they are measured alike.
record_update() {
    local who=$1 version=$2 start=$3 returned=$4 converged=$5 load_pid=$6
    sleep 1
    touch "$WORK/stop"
    wait "$load_pid"
    printf 'v%s\t%s\t%s\t%s\t%s\t%s\n' "$version" "$(seconds "$start" "$returned")" \
        "$(seconds "$start" "$converged")" "$(jq .total "$WORK/load.json")" \
        "$(jq .failed "$WORK/load.json")" "$(jq -r .last_version "$WORK/load.json")" \
        >>"$WORK/$who.tsv"
    jq -r '.failures[:3][] | "  '"$who"' v'"$version"' failure: " + .' "$WORK/load.json" >&2
}

# ---------------------------------------------------------------- graven half
bench_graven() {
    local home=$WORK/graven-home project=$WORK/graven-project port up_pid version
    mkdir -p "$project/dist"
    cp "$ROOT/examples/hello/Containerfile" "$project/"
    cp "$ROOT/examples/hello/dist/hello" "$project/dist/"
    port=$(free_port tcp)
    write_toml() {
        cat >"$project/graven.toml" <<TOML
app = "bench"

[services.web]
instances = $REPLICAS
port = 8080
route = "127.0.0.1:$port"
env = { VERSION = "$1" }
health = { path = "/healthz", interval = "200ms", timeout = "200ms", healthy_after = 2, unhealthy_after = 3 }
deploy = { strategy = "rolling", max_surge = 1, max_unavailable = 0, health_deadline = "30s" }
stop_grace = "$GRACE"
TOML
    }
    write_toml 1
    GRAVEN_HOME=$home GRAVEN_RUNTIME=${GRAVEN_BENCH_RUNTIME:-local} \
        "$GRAVEN" up "$project" >"$WORK/up.out" 2>"$WORK/up.err" &
    up_pid=$!
    GRAVEN_UP_PID=$up_pid
    for _ in $(seq 600); do
        grep -qs "graven: serving" "$WORK/up.err" && break
        kill -0 "$up_pid" 2>/dev/null || break
        sleep 0.1
    done
    grep -q "graven: serving" "$WORK/up.err" || { echo "graven up did not serve:" >&2; tail "$WORK/up.err" >&2; exit 1; }

    printf 'update\tcommand_s\tconverged_s\trequests\tfailed\tlast_version\n' >"$WORK/graven.tsv"
    for version in $(seq 2 $((UPDATES + 1))); do
        write_toml "$version"
        start_load "$port"
        GRAVEN_HOME=$home "$GRAVEN" deploy "$project" >"$WORK/deploy.out" 2>"$WORK/deploy.err" \
            || { echo "graven deploy failed:" >&2; cat "$WORK/deploy.out" "$WORK/deploy.err" >&2; }
        converged=$(now)
        record_update graven "$version" "$start" "$converged" "$converged" "$load_pid"
    done
    kill -TERM "$up_pid"
    wait "$up_pid" || true
    GRAVEN_UP_PID=
}

# ---------------------------------------------------------------- Swarm half
bench_swarm() {
    # Always an engine of its own: Swarm mode must not touch the machine's Docker.
    start_dockerd "$WORK/docker"
    # Swarm takes a data path port only in 1024-49151, below most of the ephemeral range.
    local data_port
    data_port=$(free_port udp)
    while [ "$data_port" -gt 49151 ]; do data_port=$(free_port udp); done
    docker swarm init --advertise-addr 127.0.0.1 --listen-addr "127.0.0.1:$(free_port tcp)" \
        --data-path-port "$data_port" >/dev/null

    echo "baking hello:v1..v$((UPDATES + 1)) with graven, exporting each to docker" >&2
    for version in $(seq 1 $((UPDATES + 1))); do
        local context="$WORK/swarm-context.v$version"
        mkdir -p "$context/dist"
        cp "$ROOT/examples/hello/dist/hello" "$context/dist/hello"
        { cat "$ROOT/examples/hello/Containerfile"; echo "ENV VERSION=$version"; } >"$context/Containerfile"
        GRAVEN_HOME="$WORK/swarm-home" "$GRAVEN" bake "$context" --tag "hello:v$version" >/dev/null 2>&1
        GRAVEN_HOME="$WORK/swarm-home" "$GRAVEN" image export "hello:v$version" --format docker \
            -o "$WORK/hello.v$version.tar" >/dev/null
        docker load -q -i "$WORK/hello.v$version.tar" >/dev/null
    done

    PORT=$(free_port tcp)
    docker service create --quiet --name hello --replicas $REPLICAS --network host \
        --no-resolve-image --env PORT="$PORT" --env REUSE_PORT=1 \
        --stop-grace-period $GRACE --update-order start-first --update-parallelism 1 \
        hello:v1 >/dev/null
    until [ "$(curl -s "127.0.0.1:$PORT/" || true)" != "" ]; do sleep 0.1; done

    printf 'update\tcommand_s\tconverged_s\trequests\tfailed\tlast_version\n' >"$WORK/swarm.tsv"
    for version in $(seq 2 $((UPDATES + 1))); do
        start_load "$PORT"
        docker service update --quiet --update-order start-first --no-resolve-image \
            --image "hello:v$version" hello >/dev/null
        returned=$(now)
        while docker ps --format '{{.Image}}' | grep -qv "^hello:v$version\$"; do sleep 0.05; done
        converged=$(now)
        record_update swarm "$version" "$start" "$returned" "$converged" "$load_pid"
    done
}

# ---------------------------------------------------------------- three nodes
NODE_PIDS=()
NODE_NETNS=()
BRIDGE=
# stop_nodes: each node's engine by its PID (workers first), then the namespaces, veths and
# bridge this script made, by name.
stop_nodes() {
    local i
    for ((i = ${#NODE_PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${NODE_PIDS[$i]}" 2>/dev/null
        for _ in $(seq 300); do kill -0 "${NODE_PIDS[$i]}" 2>/dev/null || break; sleep 0.1; done
        kill -9 "${NODE_PIDS[$i]}" 2>/dev/null
    done
    for ns in "${NODE_NETNS[@]}"; do
        ip netns del "$ns" 2>/dev/null
        ip link del "${ns}h" 2>/dev/null
    done
    [ -z "$BRIDGE" ] || ip link del "$BRIDGE" 2>/dev/null
    NODE_PIDS=() NODE_NETNS=() BRIDGE=
}

# node N ARGS...: `docker ARGS` on node N's engine.
node() { local n=$1; shift; DOCKER_HOST="unix://$WORK/node$n/docker.sock" docker "$@"; }

# start_nodes: the bridge, three namespaces with an engine each, one Swarm.
start_nodes() {
    BRIDGE=gbd$$
    ip link add "$BRIDGE" type bridge
    local third
    for third in $(seq 1 250); do
        ip -4 route show match "10.216.$third.1" | grep -qv '^default' && continue
        ip addr add "10.216.$third.1/24" dev "$BRIDGE" 2>/dev/null && break
    done
    ip link set "$BRIDGE" up
    SUBNET=10.216.$third
    # `ip netns exec` mounts a fresh /sys: the host's cgroup hierarchies go back under it
    # before dockerd starts (tests/support/swarm.rs says why).
    local cgroups
    cgroups=$(awk '{ for (i = 1; i <= NF; i++) if ($i == "-") { t = $(i + 1); o = $(i + 3) }
        if ((t == "cgroup" || t == "cgroup2") && index($5, "/sys/fs/cgroup") == 1) print $5, t, o }'         /proc/self/mountinfo)
    local n ns dir
    for n in 1 2 3; do
        ns=gbn$$n$n
        dir=$WORK/node$n
        mkdir -p "$dir"
        ip netns add "$ns"
        NODE_NETNS+=("$ns")
        ip link add "${ns}h" type veth peer name "${ns}c"
        ip link set "${ns}h" master "$BRIDGE" up
        ip link set "${ns}c" netns "$ns"
        ip netns exec "$ns" ip addr add "$SUBNET.$((n + 1))/24" dev "${ns}c"
        ip netns exec "$ns" ip link set "${ns}c" up
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip route add default via "$SUBNET.1"
        CGROUP_MOUNTS=$cgroups ip netns exec "$ns" sh -c '
            set -e
            mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
            printf "%s\n" "$CGROUP_MOUNTS" | while read -r point type opts; do
                [ -n "$point" ] || continue
                mkdir -p "$point"; mount -t "$type" -o "$opts" "$type" "$point"
            done
            exec "$@"' sh dockerd --data-root "$dir/data" --exec-root "$dir/exec" \
            --pidfile "$dir/dockerd.pid" -H "unix://$dir/docker.sock" \
            --iptables=false --ip6tables=false >"$dir/log" 2>&1 &
        NODE_PIDS+=($!)
    done
    for n in 1 2 3; do
        for _ in $(seq 300); do node $n info >/dev/null 2>&1 && break; sleep 0.1; done
        node $n info >/dev/null || { tail "$WORK/node$n/log" >&2; exit 1; }
    done
    node 1 swarm init --advertise-addr "$SUBNET.2" --dispatcher-heartbeat 1s >/dev/null
    local token
    token=$(node 1 swarm join-token -q worker)
    for n in 2 3; do
        node $n swarm join --token "$token" --advertise-addr "$SUBNET.$((n + 1))" "$SUBNET.2:2377" >/dev/null
    done
}

# start_node_loads PORT: one load per node address (CONNECTIONS/3 each), as start_load.
start_node_loads() {
    local n
    rm -f "$WORK/stop"
    load_pids=()
    for n in 1 2 3; do
        "$GRAVEN" __load --address "$SUBNET.$((n + 1)):$1" --connections $((CONNECTIONS / 3)) \
            --duration 600s --stop-file "$WORK/stop" --json >"$WORK/load$n.json" &
        load_pids+=($!)
    done
    sleep 1
    start=$(now)
}

# record_node_update VERSION START RETURNED CONVERGED: as record_update, the loads summed.
record_node_update() {
    local version=$1 start=$2 returned=$3 converged=$4
    sleep 1
    touch "$WORK/stop"
    wait "${load_pids[@]}"
    local total failed
    total=$(jq -s 'map(.total) | add' "$WORK"/load[123].json)
    failed=$(jq -s 'map(.failed) | add' "$WORK"/load[123].json)
    printf 'v%s\t%s\t%s\t%s\t%s\t%s\n' "$version" "$(seconds "$start" "$returned")" \
        "$(seconds "$start" "$converged")" "$total" "$failed" \
        "$(jq -r .last_version "$WORK/load1.json")" >>"$WORK/swarm.tsv"
}

bench_three_nodes() {
    local replicas=6 version n id
    start_nodes
    echo "baking hello:v1..v$((UPDATES + 1)) with graven, loading each into every node" >&2
    for version in $(seq 1 $((UPDATES + 1))); do
        local context="$WORK/swarm-context.v$version"
        mkdir -p "$context/dist"
        cp "$ROOT/examples/hello/dist/hello" "$context/dist/hello"
        { cat "$ROOT/examples/hello/Containerfile"; echo "ENV VERSION=$version"; } >"$context/Containerfile"
        GRAVEN_HOME="$WORK/swarm-home" "$GRAVEN" bake "$context" --tag "hello:v$version" >/dev/null 2>&1
        GRAVEN_HOME="$WORK/swarm-home" "$GRAVEN" image export "hello:v$version" --format docker \
            -o "$WORK/hello.v$version.tar" >/dev/null
        for n in 1 2 3; do node $n load -q -i "$WORK/hello.v$version.tar" >/dev/null; done
    done
    image_id() { node 1 image inspect -f '{{.Id}}' "hello:v$1"; }

    PORT=$(free_port tcp)
    node 1 service create --quiet --name hello --replicas $replicas --network host \
        --env PORT="$PORT" --env REUSE_PORT=1 \
        --stop-grace-period $GRACE --update-order start-first --update-parallelism 1 \
        "$(image_id 1)" >/dev/null 2>&1
    for n in 1 2 3; do
        until [ "$(curl -s "$SUBNET.$((n + 1)):$PORT/" || true)" != "" ]; do sleep 0.1; done
    done
    printf 'update\tcommand_s\tconverged_s\trequests\tfailed\tlast_version\n' >"$WORK/swarm.tsv"
    for version in $(seq 2 $((UPDATES + 1))); do
        id=$(image_id "$version")
        start_node_loads "$PORT"
        node 1 service update --quiet --update-order start-first --image "$id" hello >/dev/null 2>&1
        returned=$(now)
        # Converged: no node runs a container of another image.
        while for n in 1 2 3; do node $n ps --format '{{.Image}}'; done | grep -qv "^$id\$"; do
            sleep 0.05
        done
        converged=$(now)
        record_node_update "$version" "$start" "$returned" "$converged"
    done
    node 1 service rm hello >/dev/null
    while for n in 1 2 3; do node $n ps -q; done | grep -q .; do sleep 0.1; done

    # graven on the same nodes.
    local home=$WORK/graven-home project=$WORK/graven-project port
    mkdir -p "$project/dist"
    cp "$ROOT/examples/hello/Containerfile" "$project/"
    cp "$ROOT/examples/hello/dist/hello" "$project/dist/"
    port=$(free_port tcp)
    write_swarm_toml() {
        cat >"$project/graven.toml" <<TOML
app = "bench"

[services.web]
instances = $replicas
port = 8080
route = "127.0.0.1:$port"
env = { VERSION = "$1" }
health = { path = "/healthz", interval = "200ms", timeout = "200ms", healthy_after = 2, unhealthy_after = 3 }
deploy = { strategy = "rolling", max_surge = 1, max_unavailable = 0, health_deadline = "30s" }
stop_grace = "$GRACE"

[environments.local]
runtime = "swarm"
docker_host = "unix://$WORK/node1/docker.sock"
swarm_engines = ["unix://$WORK/node1/docker.sock", "unix://$WORK/node2/docker.sock", "unix://$WORK/node3/docker.sock"]
TOML
    }
    write_swarm_toml 1
    GRAVEN_HOME=$home "$GRAVEN" up "$project" >"$WORK/up.out" 2>"$WORK/up.err" &
    GRAVEN_UP_PID=$!
    for _ in $(seq 1200); do
        grep -qs "graven: serving" "$WORK/up.err" && break
        kill -0 "$GRAVEN_UP_PID" 2>/dev/null || break
        sleep 0.1
    done
    grep -q "graven: serving" "$WORK/up.err" || { echo "graven up did not serve:" >&2; tail "$WORK/up.err" >&2; exit 1; }
    printf 'update\tcommand_s\tconverged_s\trequests\tfailed\tlast_version\n' >"$WORK/graven.tsv"
    for version in $(seq 2 $((UPDATES + 1))); do
        write_swarm_toml "$version"
        start_load "$port"
        GRAVEN_HOME=$home "$GRAVEN" deploy "$project" >"$WORK/deploy.out" 2>"$WORK/deploy.err" \
            || { echo "graven deploy failed:" >&2; cat "$WORK/deploy.out" "$WORK/deploy.err" >&2; }
        converged=$(now)
        record_update graven "$version" "$start" "$converged" "$converged" "$load_pid"
    done
    # Where each deploy's time went, from the event log's times (bench/deploy_phases.jq).
    GRAVEN_HOME=$home "$GRAVEN" history --json >"$WORK/history.json"
    jq -r -f "$ROOT/bench/deploy_phases.jq" "$WORK/history.json" \
        | jq -rs '(["release", "total", "to_first", "start", "health", "gap", "stop", "tail"] | @tsv),
            (.[] | [.release, .total, .to_first, .start, .health, .gap, .stop, .tail] | @tsv)' \
        >"$WORK/phases.tsv"
    GRAVEN_HOME=$home "$GRAVEN" down "$project" >/dev/null 2>&1 || true
    kill -TERM "$GRAVEN_UP_PID"
    wait "$GRAVEN_UP_PID" || true
    GRAVEN_UP_PID=
}

if [ "${NODES:-1}" = 3 ]; then
    [ $((CONNECTIONS % 3)) = 0 ] || CONNECTIONS=9
    REPLICAS=6
    bench_three_nodes
elif [ "${ONLY:-}" != "graven" ]; then
    bench_swarm
fi
if [ "${NODES:-1}" != 3 ]; then bench_graven; fi

summary() { # summary NAME FILE: one row of the side-by-side table
    awk -F'\t' -v name="$1" 'NR > 1 { t += $3; f += $5; r += $4; n++ }
        END { printf "%s\t%.2f\t%d\t%d\t%d\n", name, t / n, r, f, n }' "$2"
}
echo
echo "Rolling replace of $REPLICAS instances under $CONNECTIONS keep-alive connections"
if [ "${NODES:-1}" = 3 ]; then
    echo "($(nproc) cores, $(uname -r); graven runtime swarm, 3 nodes; $PROFILE build)"
else
    echo "($(nproc) cores, $(uname -r); graven runtime ${GRAVEN_BENCH_RUNTIME:-local})"
fi
if [ -f "$WORK/swarm.tsv" ]; then
    echo
    echo "Docker Swarm ${NODES:-1} node(s), start-first (seconds from update to last old container gone):"
    column -t -s $'\t' "$WORK/swarm.tsv"
fi
echo
echo "graven (seconds from \`graven deploy\` to every old instance gone):"
column -t -s $'\t' "$WORK/graven.tsv"
if [ -f "$WORK/phases.tsv" ]; then
    echo
    echo "graven's deploys by phase (ms, from its event log; bench/deploy_phases.jq says what each is):"
    column -t -s $'\t' "$WORK/phases.tsv"
fi
echo
{
    printf 'who\tmean_converged_s\trequests\tfailed\tupdates\tvs_swarm\n'
    graven_row=$(summary graven "$WORK/graven.tsv")
    if [ -f "$WORK/swarm.tsv" ]; then
        swarm_row=$(summary swarm "$WORK/swarm.tsv")
        ratio=$(echo "$graven_row $swarm_row" | awk '{ if ($7 > 0) printf "%.2fx", $2 / $7; else print "-" }')
        printf '%s\t1.00x\n' "$swarm_row"
        printf '%s\t%s\n' "$graven_row" "$ratio"
    else
        printf '%s\t-\n' "$graven_row"
    fi
} | column -t -s $'\t'
