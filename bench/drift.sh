#!/usr/bin/env bash
# Drift checker benchmark (issue 16): the cost of one full check of a Debian image's root
# (the Debian base of scripts/debian-base, debootstrap minbase: about 90 packages) and the time
# from a changed byte to the instance's condemnation.
#
# 1. `graven drift --check` against one running instance of the image, RUNS times, at the
#    default read budget (64 MiB/s): wall time, CPU time (user + system, from wait4's
#    rusage) and bytes read (rchar of /proc/PID/io, sampled until it exits), each per GB of
#    the root's regular files; then the same check made with the page cache dropped for the
#    root only (read_bytes: what came from the disk).
# 2. `graven up` of a one-instance service with `drift.interval = INTERVAL`: one byte of a
#    file of the root changed, the time until `graven drift --json` shows it condemned.
#
# Usage: bench/drift.sh      (RUNS=5, INTERVAL=5s; PROFILE=release by default;
#        GRAVEN=path/to/graven uses that binary instead of building one)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
interval=${INTERVAL:-5s}

source bench/lib.sh
if [ -n "${GRAVEN:-}" ]; then
  work=$(mktemp -d /tmp/graven-bench-drift.XXXXXX)
  trap bench_cleanup EXIT
  graven=$GRAVEN
  [ -x examples/hello/dist/hello ] || examples/hello/build.sh
else
  bench_setup drift
fi
export GRAVEN_HOME="$work/home"
base=$(scripts/debian-base)

ctx="$work/ctx"
mkdir -p "$ctx/dist"
cp examples/hello/dist/hello "$ctx/dist/hello"
printf 'FROM docker-archive:%s\nCOPY dist/hello /hello\nENV PORT=8080\nCMD ["/hello"]\n' "$base" \
  >"$ctx/Containerfile"
"$graven" bake --tag drift:bench --file "$ctx/Containerfile" "$ctx" >/dev/null 2>&1
id=$("$graven" run -d drift:bench)
stop_instance() { "$graven" stop "$id" >/dev/null 2>&1 || true; "$graven" rm "$id" >/dev/null 2>&1 || true; }
trap 'stop_instance; bench_cleanup' EXIT
root=$(find "$GRAVEN_HOME/rootfs" -mindepth 1 -maxdepth 1 -type d ! -name '.*' | head -1)
bytes=$(find "$root" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
files=$(find "$root" -type f | wc -l)
echo "root: $files regular files, $bytes bytes ($(du -sh "$root" | cut -f1) on disk)" >&2

python3 - "$graven" "$runs" "$bytes" "$root" <<'EOF'
import os, statistics, subprocess, sys, time
graven, runs, total, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
gb = total / 1e9

def check():
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.execv(graven, [graven, "drift", "--check"])
    io = {}
    while True:
        try:
            with open(f"/proc/{pid}/io") as f:
                io = {k: int(v) for k, v in (l.split(": ") for l in f.read().splitlines())}
        except OSError:
            pass
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    wall = time.monotonic() - start
    assert os.waitstatus_to_exitcode(status) == 0, "graven drift --check failed"
    return wall, usage.ru_utime + usage.ru_stime, io.get("rchar", 0), io.get("read_bytes", 0)

def drop_root_cache():
    # The root's files only (POSIX_FADV_DONTNEED), never the machine's whole page cache.
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

warm = [check() for _ in range(runs)]
drop_root_cache()
cold = check()
med = lambda i: statistics.median(r[i] for r in warm)
print(f"| one full check of the Debian base's root ({total / 1e6:.0f} MB of files) | warm cache, median of {runs} | cold (root's pages dropped) |")
print("|---|---:|---:|")
print(f"| wall time, s | {med(0):.2f} | {cold[0]:.2f} |")
print(f"| CPU time (user + system), s | {med(1):.3f} | {cold[1]:.3f} |")
print(f"| CPU time per GB of image, s | {med(1) / gb:.3f} | {cold[1] / gb:.3f} |")
print(f"| bytes read (rchar) per GB of image, GB | {med(2) / 1e9 / gb:.2f} | {cold[2] / 1e9 / gb:.2f} |")
print(f"| bytes from disk (read_bytes) per GB of image, GB | {med(3) / 1e9 / gb:.2f} | {cold[3] / 1e9 / gb:.2f} |")
EOF
stop_instance

# 2. Time to detect, under the control plane.
proj="$work/project"
mkdir -p "$proj/dist"
cp "$ctx/Containerfile" "$proj/Containerfile"
cp "$ctx/dist/hello" "$proj/dist/hello"
port=$(free_port)
cat >"$proj/graven.toml" <<EOF
app = "bench"

[services.web]
instances = 1
port = 8080
route = "127.0.0.1:$port"
health = { path = "/healthz", interval = "200ms" }
deploy = { health_deadline = "60s" }
drift = { interval = "$interval" }
EOF
"$graven" up "$proj" >"$work/up.out" 2>"$work/up.err" &
up=$!
trap 'kill $up 2>/dev/null; wait $up 2>/dev/null || true; bench_cleanup' EXIT
for _ in $(seq 600); do
  grep -q "graven: serving" "$work/up.err" && break
  sleep 0.1
done
for _ in $(seq 600); do
  "$graven" status --json 2>/dev/null | grep -q '"healthy"' && break
  sleep 0.1
done
root=$(find "$GRAVEN_HOME/rootfs" -mindepth 1 -maxdepth 1 -type d ! -name '.*' | head -1)
python3 - "$graven" "$root" "$interval" <<'EOF'
import json, subprocess, sys, time
graven, root, interval = sys.argv[1:]
path = f"{root}/etc/debian_version"
with open(path, "r+b") as f:
    data = bytearray(f.read())
    data[0] ^= 1
    f.seek(0)
    f.write(data)
start = time.monotonic()
while True:
    report = json.loads(subprocess.run([graven, "drift", "--json"], capture_output=True, check=True).stdout)
    if report["history"]:
        break
    time.sleep(0.05)
print()
print(f"| changed byte of /etc/debian_version to condemned (`drift.interval = \"{interval}\"`) | {time.monotonic() - start:.2f} s |")
print("|---|---:|")
print(f"| evidence | {report['history'][0]['reason']['change']}: {report['history'][0]['reason']['path']} |")
EOF
