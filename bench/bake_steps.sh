#!/usr/bin/env bash
# Per-step profile of a cold bake of bench/python-app: graven and `docker build` (BuildKit)
# taking turns, ROUNDS times, on the same base and context. For each run: the wall time, and
# for each step its time (graven's `done Nms`, BuildKit's `DONE N.Ns` from --progress=plain)
# and its CPU time (bench/step_cpu.py): the step's command ("children": graven's waited
# sandbox helper, dockerd's waited `runc run`) and the tool's own process meanwhile ("self":
# graven's diff, hashing and background gzip; dockerd's BuildKit). On a machine others load,
# compare the ratios within a round and the CPU times, which load distorts less.
#
# Usage: bench/bake_steps.sh   (ROUNDS=3; PROFILE=release; GRAVEN=path runs a given binary
#        instead of this tree's build; GRAVEN_B=path also bakes with a second binary in every
#        round, between the first and docker, in a home of its own, so two builds of graven
#        are compared within one run; graven's own knobs in the env pass through, e.g.
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
mkdir -p "$work/import"
echo "FROM docker-archive:$base" >"$work/import/Containerfile"
builds=("$graven")
[ -n "${GRAVEN_B:-}" ] && builds+=("$GRAVEN_B")
for i in "${!builds[@]}"; do
  GRAVEN_HOME="$work/graven-home-$i" "${builds[$i]}" bake --tag graven-test/debian:bookworm \
    "$work/import" >/dev/null 2>&1
done

start_dockerd "$work/docker"
docker=/usr/bin/docker
$docker load -i "$base" >/dev/null

step_cpu="$PWD/bench/step_cpu.py"
for round in $(seq "$rounds"); do
  echo "=== round $round, load $(cut -d' ' -f1-3 /proc/loadavg)"
  for i in "${!builds[@]}"; do
    g_home="$work/graven-home-$i"
    GRAVEN_HOME="$g_home" "${builds[$i]}" image rm app:1 >/dev/null 2>&1 || true
    GRAVEN_HOME="$g_home" "${builds[$i]}" gc --cache >/dev/null
    echo "graven ${builds[$i]} ($(ls "$g_home/snapshots" | grep -cE '^[0-9a-f]{64}$' || true) snapshots at the start)"
    sync
    GRAVEN_HOME="$g_home" python3 "$step_cpu" graven "${builds[$i]}" bake --tag app:1 "$ctx"
  done

  $docker rmi -f app:1 >/dev/null 2>&1 || true
  $docker builder prune -af >/dev/null 2>&1 || true
  sync
  echo "docker build"
  python3 "$step_cpu" docker "$DOCKERD_PID" \
    $docker build --network=host --progress=plain -f "$ctx/Containerfile" -t app:1 "$ctx"
done
