#!/usr/bin/env bash
# Bake benchmark: the example's Containerfile plus a 20 MB COPY, baked cold (empty store and
# cache) and warm (everything cached) by graven, `buildah bud --timestamp 0` and `docker build`,
# side by side: median of RUNS runs each (hyperfine), the ratio to graven, and whether two cold
# builds gave the same image digest. Then `RUN echo` on a ~500 MB base (the Debian base of
# scripts/debian-base plus 380 MB of generated files): a bake whose only step to run is a new
# `RUN echo`, by graven, `docker build` (BuildKit) and `buildah bud`. Prints markdown tables.
#
# Usage: bench/bake.sh            (RUNS=5 by default; needs hyperfine, buildah, dockerd)
#        BAKE_CASES=run-echo bench/bake.sh   (one case: `example`, `run-echo` or `python-app`)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}

source bench/lib.sh
use_debian_docker
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

cases=${BAKE_CASES:-example run-echo python-app}
want() { [[ " $cases " == *" $1 "* ]]; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" "$1" "$2"; }
same() { [ "$1" = "$2" ] && echo "yes" || echo "no"; }

median_ms() { # hyperfine json → median in ms
  python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["results"][0]["median"]*1000, 1))' "$1"
}

example_case() {
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
}

# --- RUN echo on a ~500 MB base --------------------------------------------------------------
# Each timed run bakes `FROM <big base>` + `RUN echo <a new number>`: the base is cached (in
# graven's store, docker's and buildah's images), so what is timed is one RUN step on it and
# the layer it makes. The first run (a warmup, untimed) lets each tool make what it keeps
# between builds (graven: the base's snapshots).
run_echo_case() {
  local big="$work/big" echo_ctx="$work/echo" e_home="$work/echo-home"
  mkdir -p "$big/data" "$echo_ctx"
  # 38 files of 10 MB, deterministic and incompressible (a seeded PRNG).
  python3 - "$big/data" <<'PY'
import random, sys
rng = random.Random(500)
for i in range(38):
    with open(f"{sys.argv[1]}/part-{i:02}.bin", "wb") as out:
        out.write(rng.randbytes(10 * 1024 * 1024))
PY
  cp "$(scripts/debian-base)" "$big/debian.tar"
  printf 'FROM docker-archive:debian.tar\nCOPY data /data\n' >"$big/Containerfile"
  GRAVEN_HOME="$e_home" "$graven" bake "$big" --tag big:1 >&2
  GRAVEN_HOME="$e_home" "$graven" image export big:1 --format docker -o "$work/big.tar" >&2
  # The base's size unpacked: its layers' uncompressed bytes.
  local base_mb
  base_mb=$(GRAVEN_HOME="$e_home" "$graven" image inspect big:1 | E_HOME="$e_home" python3 -c '
import json, sys, gzip, os
home = os.environ["E_HOME"]
total = 0
for layer in json.load(sys.stdin)["manifest"]["layers"]:
    path = os.path.join(home, "store/blobs/sha256", layer["digest"].split(":")[1])
    with gzip.open(path) as f:
        while chunk := f.read(1 << 20):
            total += len(chunk)
print(total // (1 << 20))' 2>/dev/null || echo "~500")
  # One script per tool writes its Containerfile with a new `RUN echo`.
  local tool from
  for tool in graven docker buildah; do
    case $tool in
      graven) from=big:1 ;;
      docker) from=graven-big:1 ;;
      buildah) from=localhost/graven-big:1 ;;
    esac
    mkdir -p "$echo_ctx/$tool"
    printf '#!/bin/sh\nprintf "FROM %s\\nRUN echo %%s\\n" "$(date +%%s%%N)" >%s\n' \
      "$from" "$echo_ctx/$tool/Containerfile" >"$work/prep-$tool.sh"
    chmod +x "$work/prep-$tool.sh"
  done
  hyperfine -N --warmup 1 --runs "$runs" --prepare "$work/prep-graven.sh" \
    --export-json "$work/e-graven.json" \
    "env GRAVEN_HOME=$e_home $graven bake $echo_ctx/graven --tag echo:1" >&2

  use_or_start_dockerd "$work/docker"
  docker load -q -i "$work/big.tar" >&2
  docker tag big:1 graven-big:1
  local buildkit=1 builder="BuildKit"
  hyperfine -N --warmup 1 --runs "$runs" --prepare "$work/prep-docker.sh" \
    --export-json "$work/e-docker.json" \
    "env DOCKER_BUILDKIT=$buildkit docker build --network host -q -f $echo_ctx/docker/Containerfile -t graven-echo:1 $echo_ctx/docker" >&2
  docker rmi -f graven-echo:1 graven-big:1 big:1 >/dev/null 2>&1 || true
  docker builder prune -af >/dev/null 2>&1 || true

  local b_root="$work/buildah-echo"
  local buildah="buildah --root $b_root/root --runroot $b_root/run --storage-driver vfs"
  $buildah pull -q "docker-archive:$work/big.tar" >&2
  $buildah tag "$($buildah images -q | head -1)" localhost/graven-big:1
  hyperfine -N --warmup 1 --runs "$runs" --prepare "$work/prep-buildah.sh" \
    --export-json "$work/e-buildah.json" \
    "$buildah bud --network host --timestamp 0 --layers -q -t echo $echo_ctx/buildah" >&2
  rm -rf "$b_root" 2>/dev/null || true

  local eg ed eb
  eg=$(median_ms "$work/e-graven.json")
  ed=$(median_ms "$work/e-docker.json")
  eb=$(median_ms "$work/e-buildah.json")
  cat <<EOF

\`RUN echo\` on a ${base_mb} MB base (Debian bookworm minbase + 380 MB of files); median of $runs runs, each a new \`RUN echo\` on the cached base.

| tool | RUN echo (ms) | vs graven |
|---|---:|---:|
| graven | $eg | 1.00x |
| docker build ($(docker version --format '{{.Server.Version}}'), $builder) | $ed | $(ratio "$ed" "$eg") |
| buildah bud --timestamp 0 (vfs) | $eb | $(ratio "$eb" "$eg") |
EOF
}

if want example; then example_case; fi
if want run-echo; then run_echo_case; fi
# The Python app on the Debian base (cold, no-change rebuild, rebuild after one edit) is a
# script of its own, run here as the case `python-app`.
if want python-app; then RUNS=$runs bench/bake_app.sh; fi
