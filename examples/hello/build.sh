#!/bin/sh
# The example's build stage: compile the service as a static binary into dist/, where the
# Containerfile copies it from. graven.toml's [build] step runs this before baking.
set -eu
cd "$(dirname "$0")"
root=$(cd ../.. && pwd)
target="$root/target/static"
cargo rustc --quiet --release -p hello --target-dir "$target" -- -C target-feature=+crt-static
mkdir -p dist
# Replaced by rename, never overwritten in place: a copy of the binary may be running
# (a benchmark's bare process), and writing over it would fail with "text file busy".
cp "$target/release/hello" dist/.hello.tmp
mv -f dist/.hello.tmp dist/hello
