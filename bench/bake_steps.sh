#!/usr/bin/env bash
# Per-step profile of a cold bake of bench/python-app: graven and `docker build` (BuildKit)
# back to back, ROUNDS times, on the same base and context. For each run: the wall time, the
# CPU time (user and system, the steps' commands included: graven's children, and dockerd's
# own and its waited children's from /proc/PID/stat), and each step's time (graven's `done Nms`,
# BuildKit's `DONE N.Ns` from --progress=plain). On a machine others load, compare the ratios
# within a round and the CPU times, which load distorts less.
#
# Usage: bench/bake_steps.sh   (ROUNDS=3; PROFILE=release; GRAVEN=path runs a given binary
#        instead of this tree's build; graven's own knobs in the env pass through, e.g.
#        GRAVEN_BAKE_OVERLAY=0)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}

source bench/lib.sh
use_debian_docker
bench_require docker.io debootstrap
bench_setup bake-steps
graven=${GRAVEN:-$graven}
base=$(scripts/debian-base)
ctx="$work/ctx"
cp -r bench/python-app "$ctx"

# One graven home for every round, as docker keeps one engine: the base is imported once (its
# snapshot unpacked, as `docker load` leaves docker's), and each round starts by removing the
# app's image, the bake cache and what only they held (`image rm` + `gc --cache`), as docker's
# starts with `rmi` + `builder prune`. (Copying a fresh home per round, as this script did
# before, made graven's rounds, not docker's, delete and re-create the whole unpacked base
# each time.)
g_home="$work/graven-home"
mkdir -p "$work/import"
echo "FROM docker-archive:$base" >"$work/import/Containerfile"
GRAVEN_HOME="$g_home" "$graven" bake --tag graven-test/debian:bookworm "$work/import" >/dev/null 2>&1

start_dockerd "$work/docker"
docker=/usr/bin/docker
$docker load -i "$base" >/dev/null

# The CPU seconds (user+sys, with waited children) of PID so far.
cpu_of() {
  awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f %.2f\n", ($14 + $16) / hz, ($15 + $17) / hz }' \
    "/proc/$1/stat"
}

for round in $(seq "$rounds"); do
  echo "=== round $round, load $(cut -d' ' -f1-3 /proc/loadavg)"
  GRAVEN_HOME="$g_home" "$graven" image rm app:1 >/dev/null 2>&1 || true
  GRAVEN_HOME="$g_home" "$graven" gc --cache >/dev/null
  echo "graven's snapshots at the start: $(ls "$g_home/snapshots" | grep -cE '^[0-9a-f]{64}$' || true)"
  sync
  /usr/bin/time -f "graven: %e s wall, %U s user, %S s sys" \
    env GRAVEN_HOME="$g_home" "$graven" bake --tag app:1 "$ctx" 2>&1 |
    grep -E '^\[|^graven:'

  $docker rmi -f app:1 >/dev/null 2>&1 || true
  $docker builder prune -af >/dev/null 2>&1 || true
  sync
  read -r u0 s0 < <(cpu_of "$DOCKERD_PID")
  start=$(date +%s.%N)
  $docker build --network=host --progress=plain -f "$ctx/Containerfile" -t app:1 "$ctx" 2>&1 |
    grep -E '^#[0-9]+ (\[|DONE|exporting|writing)' | grep -E 'DONE|^#[0-9]+ \[' || true
  end=$(date +%s.%N)
  read -r u1 s1 < <(cpu_of "$DOCKERD_PID")
  python3 -c 'import sys; a = [float(x) for x in sys.argv[1:]]; print(f"docker: {a[1]-a[0]:.2f} s wall, {a[3]-a[2]:.2f} s user, {a[5]-a[4]:.2f} s sys (dockerd and its children)")' \
    "$start" "$end" "$u0" "$u1" "$s0" "$s1"
done
