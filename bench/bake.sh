#!/usr/bin/env bash
# Bake benchmark: the example's Containerfile plus a 20 MB COPY, baked cold (empty store and
# cache) and warm (everything cached) by graven, `buildah bud --timestamp 0` and `docker build`,
# side by side: median of RUNS runs each (hyperfine), the ratio to graven, and whether two cold
# builds gave the same image digest. Prints a markdown table.
#
# Usage: bench/bake.sh            (RUNS=5 by default; needs hyperfine, buildah, dockerd)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}

source bench/lib.sh
bench_require buildah hyperfine docker.io
bench_setup bake

ctx="$work/ctx"
mkdir -p "$ctx/dist" "$ctx/data"
cp examples/hello/dist/hello "$ctx/dist/hello"
# 20 MB of deterministic, incompressible bytes (a seeded PRNG).
python3 -c 'import random, sys; sys.stdout.buffer.write(random.Random(42).randbytes(20 * 1024 * 1024))' \
  >"$ctx/data/blob.bin"
{
  grep -v '^ENTRYPOINT' examples/hello/Containerfile | grep -v '^#'
  echo 'COPY data/blob.bin /data/blob.bin'
  echo 'ENTRYPOINT ["/hello"]'
} >"$ctx/Containerfile"

median_ms() { # hyperfine json → median in ms
  python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["results"][0]["median"]*1000, 1))' "$1"
}

# --- graven ---------------------------------------------------------------------------------
g_home="$work/graven-home"
hyperfine -N --runs "$runs" --prepare "rm -rf $g_home" --export-json "$work/g-cold.json" \
  "env GRAVEN_HOME=$g_home $graven bake $ctx --tag bench:1" >&2
hyperfine -N --warmup 1 --runs "$((runs * 4))" --export-json "$work/g-warm.json" \
  "env GRAVEN_HOME=$g_home $graven bake $ctx --tag bench:1" >&2
g_digest() {
  rm -rf "$1"
  GRAVEN_HOME="$1" "$graven" bake "$ctx" --tag bench:1 --json 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["digest"])'
}
g1=$(g_digest "$work/g1"); g2=$(g_digest "$work/g2")

# --- buildah --------------------------------------------------------------------------------
b_root="$work/buildah"
buildah_cmd="buildah --root $b_root/root --runroot $b_root/run --storage-driver vfs bud --timestamp 0 --layers -q -t bench -f $ctx/Containerfile $ctx"
hyperfine --runs "$runs" --prepare "rm -rf $b_root" --export-json "$work/b-cold.json" "$buildah_cmd" >&2
hyperfine --warmup 1 --runs "$((runs * 2))" --export-json "$work/b-warm.json" "$buildah_cmd" >&2
b_digest() {
  rm -rf "$b_root"
  $buildah_cmd >/dev/null 2>&1
  buildah --root "$b_root/root" --runroot "$b_root/run" --storage-driver vfs images --digests \
    --format '{{.Digest}}' localhost/bench
}
b1=$(b_digest); b2=$(b_digest)

# --- docker ---------------------------------------------------------------------------------
use_or_start_dockerd "$work/docker"
docker_cmd="docker build -q -f $ctx/Containerfile -t graven-bench:1 $ctx"
docker_reset="docker rmi -f graven-bench:1 >/dev/null 2>&1; docker builder prune -af >/dev/null 2>&1; true"
hyperfine --runs "$runs" --prepare "$docker_reset" --export-json "$work/d-cold.json" "$docker_cmd" >&2
hyperfine --warmup 1 --runs "$((runs * 2))" --export-json "$work/d-warm.json" "$docker_cmd" >&2
d_digest() {
  sh -c "$docker_reset"
  $docker_cmd >/dev/null
  docker image inspect --format '{{.Id}}' graven-bench:1
}
d1=$(d_digest); sleep 1.1; d2=$(d_digest)
sh -c "$docker_reset"

# --- table ----------------------------------------------------------------------------------
gc=$(median_ms "$work/g-cold.json"); gw=$(median_ms "$work/g-warm.json")
bc=$(median_ms "$work/b-cold.json"); bw=$(median_ms "$work/b-warm.json")
dc=$(median_ms "$work/d-cold.json"); dw=$(median_ms "$work/d-warm.json")
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" "$1" "$2"; }
same() { [ "$1" = "$2" ] && echo "yes" || echo "no"; }

cat <<EOF

Bake benchmark: examples/hello Containerfile + a 20 MB COPY; median of $runs cold runs and $((runs * 4)) (graven) / $((runs * 2)) (others) warm runs.
Machine: $(nproc) cores, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //').

| tool | cold (ms) | cold vs graven | warm (ms) | warm vs graven | same digest on two cold builds |
|---|---:|---:|---:|---:|---|
| graven | $gc | 1.00x | $gw | 1.00x | $(same "$g1" "$g2") |
| buildah bud --timestamp 0 (vfs) | $bc | $(ratio "$bc" "$gc") | $bw | $(ratio "$bw" "$gw") | $(same "$b1" "$b2") |
| docker build ($(docker version --format '{{.Server.Version}}')) | $dc | $(ratio "$dc" "$gc") | $dw | $(ratio "$dw" "$gw") | $(same "$d1" "$d2") |

graven digest: $g1
EOF
