#!/usr/bin/env bash
# Bake benchmark on a real app: bench/python-app (apt, a venv, pip, useradd) on the Debian base
# from scripts/debian-base, baked by graven, `docker build` (BuildKit, Debian's docker.io) and
# `buildah bud` (vfs) side by side: cold (base present, no cache), rebuild with no change,
# rebuild after editing app.py; medians of RUNS runs (hyperfine), ratios to graven, and
# whether two cold builds gave one digest. Prints a markdown table.
#
# Usage: bench/bake_app.sh          (RUNS=3 by default; pip and apt reach PyPI and Debian;
#        TOOLS="graven docker" leaves buildah out, whose runs take most of the script's time)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
tools=${TOOLS:-graven docker buildah}

source bench/lib.sh
use_debian_docker
bench_require buildah hyperfine docker.io debootstrap
bench_setup bake-app
base=$(scripts/debian-base)
ctx="$work/ctx"
cp -r bench/python-app "$ctx"
median_ms() {
  python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["results"][0]["median"]*1000))' "$1"
}
# A different line each time, so every timed rebuild sees an edit.
edit="python3 -c 'import time; open(\"$ctx/app.py\", \"a\").write(f\"# edit {time.time_ns()}\\n\")'"

# --- graven: one home for every run, as docker keeps one engine -------------------------------
# The base is imported once (its snapshot unpacked, as `docker load` leaves docker's); a cold
# run starts by removing the app's image, the bake cache and what only they held (`image rm` +
# `gc --cache`), as docker's starts with `rmi` + `builder prune`. (A fresh copy of an imported
# home per cold run, as this script made before, had graven's runs, not docker's, delete and
# re-create the whole unpacked base each time: bench/bake_steps.sh measured it at 1.19x.)
g_home="$work/graven-home"
mkdir -p "$work/import"
echo "FROM docker-archive:$base" >"$work/import/Containerfile"
GRAVEN_HOME="$g_home" "$graven" bake --tag graven-test/debian:bookworm "$work/import" >/dev/null 2>&1
g_cmd="env GRAVEN_HOME=$g_home $graven bake --tag app:1 $ctx"
# hyperfine -N runs commands without a shell, its --prepare too.
g_fresh="sh -c 'GRAVEN_HOME=$g_home $graven image rm app:1 >/dev/null 2>&1; GRAVEN_HOME=$g_home $graven gc --cache >/dev/null'"
hyperfine -N --runs "$runs" --prepare "$g_fresh" --export-json "$work/g-cold.json" "$g_cmd" >&2
hyperfine -N --warmup 1 --runs "$((runs * 3))" --export-json "$work/g-warm.json" "$g_cmd" >&2
hyperfine --runs "$runs" --prepare "$edit" --export-json "$work/g-edit.json" "$g_cmd" >&2
g_digest() {
  sh -c "$g_fresh"
  $g_cmd --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["digest"])'
}
g1=$(g_digest); g2=$(g_digest)

# --- docker (BuildKit) ------------------------------------------------------------------------
start_dockerd "$work/docker"
docker=/usr/bin/docker
export DOCKER_BUILDKIT=1
$docker load -i "$base" >/dev/null
d_cmd="$docker build --network=host -q -f $ctx/Containerfile -t app:1 $ctx"
d_fresh="$docker rmi -f app:1 >/dev/null 2>&1; $docker builder prune -af >/dev/null 2>&1; true"
hyperfine --runs "$runs" --prepare "$d_fresh" --export-json "$work/d-cold.json" "$d_cmd" >&2
hyperfine --warmup 1 --runs "$((runs * 3))" --export-json "$work/d-warm.json" "$d_cmd" >&2
hyperfine --runs "$runs" --prepare "$edit" --export-json "$work/d-edit.json" "$d_cmd" >&2
d_digest() {
  sh -c "$d_fresh"
  $d_cmd >/dev/null
  $docker image inspect --format '{{.Id}}' app:1
}
d1=$(d_digest); d2=$(d_digest)

# --- buildah (vfs) ----------------------------------------------------------------------------
if [[ " $tools " == *" buildah "* ]]; then
b_root="$work/buildah"
b_store="--root $b_root/root --runroot $b_root/run --storage-driver vfs"
buildah $b_store pull -q "docker-archive:$base" >/dev/null
b_cmd="buildah $b_store bud --pull=never --network=host --layers --timestamp 0 -q -t app:1 $ctx"
b_fresh="buildah $b_store rmi -f app:1 >/dev/null 2>&1; buildah $b_store rmi --prune >/dev/null 2>&1; buildah $b_store images -q --filter dangling=true | xargs -r buildah $b_store rmi -f >/dev/null 2>&1; true"
hyperfine --runs "$runs" --prepare "$b_fresh" --export-json "$work/b-cold.json" "$b_cmd" >&2
hyperfine --warmup 1 --runs "$((runs * 3))" --export-json "$work/b-warm.json" "$b_cmd" >&2
hyperfine --runs "$runs" --prepare "$edit" --export-json "$work/b-edit.json" "$b_cmd" >&2
b_digest() {
  sh -c "$b_fresh"
  $b_cmd >/dev/null 2>&1
  buildah $b_store images --digests --format '{{.Digest}}' localhost/app:1
}
b1=$(b_digest); b2=$(b_digest)
fi

# --- table ------------------------------------------------------------------------------------
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" "$1" "$2"; }
same() { [ "$1" = "$2" ] && echo "yes" || echo "no"; }
for t in g d b; do for k in cold warm edit; do
  if [ -f "$work/${t}-${k}.json" ]; then
    eval "${t}_${k}=\$(median_ms \"$work/${t}-${k}.json\")"
  fi
done; done
cat <<EOF

Bake benchmark, a Python web app (bench/python-app: apt, venv + pip, useradd) on the Debian
bookworm base; medians of $runs cold and edit runs, $((runs * 3)) no-change rebuilds.
Machine: $(nproc) cores, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //').

| tool | cold (ms) | vs graven | no change (ms) | vs graven | edit app.py (ms) | vs graven | same digest, two cold |
|---|---:|---:|---:|---:|---:|---:|---|
| graven | $g_cold | 1.00x | $g_warm | 1.00x | $g_edit | 1.00x | $(same "$g1" "$g2") |
| docker build (BuildKit, $($docker version --format '{{.Server.Version}}')) | $d_cold | $(ratio "$d_cold" "$g_cold") | $d_warm | $(ratio "$d_warm" "$g_warm") | $d_edit | $(ratio "$d_edit" "$g_edit") | $(same "$d1" "$d2") |
$(if [ -n "${b_cold:-}" ]; then echo "| buildah bud --timestamp 0 (vfs) | $b_cold | $(ratio "$b_cold" "$g_cold") | $b_warm | $(ratio "$b_warm" "$g_warm") | $b_edit | $(ratio "$b_edit" "$g_edit") | $(same "$b1" "$b2") |"; fi)

graven digest: $g1
EOF
