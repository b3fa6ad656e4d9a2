#!/usr/bin/env bash
# Instance start benchmark: time from "start" to the first successful GET /healthz of the
# example service, as a bare process, as a graven local instance (`graven run -d`, a new
# graven process each time, sandbox and all), under `runc run -d` (bundle from umoci, host
# network) and under `docker run -d --network host`. Median of RUNS runs each (DOCKER_RUNS
# for docker), side by side with the ratio to the bare process and to graven.
#
# Usage: bench/instance_start.sh     (RUNS=30, DOCKER_RUNS=10, ROUNDS=5 by default; needs umoci, runc,
#                                      dockerd; starts a private dockerd when none answers)
#
# graven is built with the `dist` profile, the shipped binary (release plus fat LTO: about
# half the load-time relocations of a release build); PROFILE=release measures that instead.
#
# The four ways take turns in ROUNDS rounds (5 by default), each way's starts split evenly over
# them, so a VM that slows down or speeds up during the run weighs on every way alike. Each
# turn begins with WARM_MS (300) of uncounted starts: a way that follows a slow one (docker's
# removal leaves the CPUs idle for a while) would otherwise pay for waking them up.
#
# GRAVEN_B=/path/to/another/graven adds a row for that build (an A/B of two builds in one run,
# taking turns with the others); it shares the store, so it must read the same format.
# GRAVEN_B_ARGS adds `run` arguments to that row (GRAVEN_B=target/release/graven
# GRAVEN_B_ARGS="--pids 0" measures a start without the process limit's cgroup).
#
# Starts follow one another back to back, which measures what each way costs in itself. With
# REST_MS=200 each start comes after the machine has rested that long instead, as a start on
# a quiet server does; on a VM every way then also pays for waking an idle CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
runs=${RUNS:-30}
docker_runs=${DOCKER_RUNS:-10}
rest_ms=${REST_MS:-0}
rounds=${ROUNDS:-5}
warm_ms=${WARM_MS:-300}

source bench/lib.sh
bench_require umoci runc docker.io
PROFILE=${PROFILE:-dist} bench_setup start
export GRAVEN_HOME="$work/home"
"$graven" bake examples/hello --tag hello-bench >/dev/null
# The first instance unpacks the image; the timed ones all share the unpacked root.
id=$("$graven" run -d hello-bench)
"$graven" rm -f "$id" >/dev/null

echo "making the runc bundle" >&2
umoci unpack --image "$GRAVEN_HOME/store:hello-bench" "$work/bundle" >/dev/null 2>&1

use_or_start_dockerd "$work/docker"
"$graven" image export hello-bench --format docker -o "$work/hello.tar" >/dev/null
docker load -q -i "$work/hello.tar" >/dev/null
docker_image=$(docker load -q -i "$work/hello.tar" | sed -n 's/^Loaded image[^:]*: //p' | tail -1)

python3 - "$graven" "$root/examples/hello/dist/hello" "$work/bundle" "$docker_image" "$runs" "$docker_runs" "$rest_ms" "$rounds" "$warm_ms" "${GRAVEN_B:-}" "${GRAVEN_B_ARGS:-}" <<'PY'
import json, os, socket, statistics, subprocess, sys, time

graven, hello, bundle, docker_image, runs, docker_runs, rest_ms, rounds, warm_ms, graven_b, graven_b_args = sys.argv[1:12]
runs, docker_runs, rest = int(runs), int(docker_runs), int(rest_ms) / 1000
rounds, warm = max(1, int(rounds)), int(warm_ms) / 1000
DEVNULL = subprocess.DEVNULL

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def healthy(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False

def measure(name, n, prepare, start, stop, times):
    # Uncounted starts first, for at least `warm` seconds (not with REST_MS, which is about
    # starting from rest).
    warm_until = time.perf_counter() + (0 if rest else warm)
    counted = len(times) + n
    i = 0
    while len(times) < counted:
        i += 1
        warming = time.perf_counter() < warm_until
        port = free_port()
        # A port number comes round again: the address of an earlier start on it is stale.
        addresses.pop(port, None)
        prepare(i, port)
        if rest:
            time.sleep(rest)
        t0 = time.perf_counter()
        handle = start(i, port)
        deadline = t0 + 30
        while not healthy_at(port):
            if time.perf_counter() > deadline:
                stop(handle)
                raise SystemExit(f"{name}: no healthy answer within 30 s")
        if not warming:
            times.append((time.perf_counter() - t0) * 1000)
        stop(handle)

def nothing(i, port):
    pass

def bare_start(i, port):
    return subprocess.Popen([hello], env={"PORT": str(port)}, stdout=DEVNULL, stderr=DEVNULL)

def bare_stop(p):
    p.kill()
    p.wait()

# The address each graven start answers at: the host's loopback on the host's network, the
# instance's own address (read from `run -d --json`, inside the timing) in its own network.
addresses = {}

def healthy_at(port):
    return healthy(port, addresses.get(port, "127.0.0.1"))

def graven_way(binary, extra=("--network", "host")):
    def start(i, port):
        out = subprocess.run([binary, "run", "-d", "--json", "--port", str(port), *extra, "hello-bench"],
                             check=True, capture_output=True, text=True)
        instance = json.loads(out.stdout)
        addresses[port] = instance["address"].rsplit(":", 1)[0]
        return instance["id"]
    def stop(instance):
        subprocess.run([binary, "rm", "-f", instance], check=True, stdout=DEVNULL)
    return start, stop

graven_start, graven_stop = graven_way(graven)
private_start, private_stop = graven_way(graven, ())

config_path = os.path.join(bundle, "config.json")
base = json.load(open(config_path))

def runc_prepare(i, port):
    config = json.loads(json.dumps(base))
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/hello"]
    config["process"]["env"] = [e for e in config["process"].get("env", []) if not e.startswith("PORT=")] + [f"PORT={port}"]
    config["root"]["readonly"] = True
    config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
    json.dump(config, open(config_path, "w"))

def runc_start(i, port):
    name = f"graven-bench-{os.getpid()}-{i}"
    subprocess.run(["runc", "run", "-d", "--bundle", bundle, name], check=True,
                   stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
    return name

def runc_stop(name):
    subprocess.run(["runc", "delete", "-f", name], check=True, stdout=DEVNULL, stderr=DEVNULL)

def docker_start(i, port):
    out = subprocess.run(["docker", "run", "-d", "--network", "host", "-e", f"PORT={port}", docker_image],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()

def docker_stop(container):
    subprocess.run(["docker", "rm", "-f", container], check=True, stdout=DEVNULL)

ways = [
    ("bare process", runs, "bare", nothing, bare_start, bare_stop),
    ("graven run -d --network host (local runtime)", runs, "graven", nothing, graven_start, graven_stop),
    ("graven run -d, a network of its own", runs, "graven-private", nothing, private_start, private_stop),
    ("runc run -d (host network)", runs, "runc", runc_prepare, runc_start, runc_stop),
    ("docker run -d --network host", docker_runs, "docker", nothing, docker_start, docker_stop),
]
if graven_b:
    label = f"graven run -d {graven_b_args}, build B ({graven_b})".replace("  ", " ")
    ways.append((label, runs, "graven-b", nothing, *graven_way(graven_b, graven_b_args.split())))
times = {way[2]: [] for way in ways}
for r in range(rounds):
    for _, n, name, prepare, start, stop in ways:
        # This round's share of the way's starts: the rounds' shares add up to n.
        share = n * (r + 1) // rounds - n * r // rounds
        measure(name, share, prepare, start, stop, times[name])
results = [
    (label, n, (statistics.median(times[name]), min(times[name]), max(times[name])))
    for label, n, name, *_ in ways
]
bare = results[0][2][0]
g = results[1][2][0]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print()
print("Instance start to first healthy /healthz of examples/hello (median, min, max in ms), "
      + (f"each start after {rest_ms} ms of rest" if rest else "starts back to back")
      + f", the ways taking turns over {rounds} rounds.")
print(f"Machine: {os.cpu_count()} cores, {os.uname().release}, {cpu}.")
print()
print("| how | runs | median (ms) | min | max | vs bare | vs graven |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, n, (median, lo, hi) in results:
    print(f"| {name} | {n} | {median:.2f} | {lo:.2f} | {hi:.2f} | {median / bare:.2f}x | {median / g:.2f}x |")
print()
if rest:
    # Waking an idle CPU adds a few ms to every way, which says nothing of the runtimes.
    print("targets are judged on back-to-back starts (REST_MS=0)")
else:
    runc, docker = results[3][2][0], results[4][2][0]
    private = results[2][2][0]
    verdict = lambda met: "met" if met else "missed"
    print(f"target: a network of its own <= host network + 1 ms: {verdict(private - g <= 1)} (+{private - g:.2f} ms)")
    print(f"targets: graven <= bare + 2 ms: {verdict(g - bare <= 2)} (+{g - bare:.2f} ms); "
          f"runc >= 5x graven: {verdict(runc >= 5 * g)} ({runc / g:.1f}x); "
          f"docker >= 20x graven: {verdict(docker >= 20 * g)} ({docker / g:.1f}x)")
PY
