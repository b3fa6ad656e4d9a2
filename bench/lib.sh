# Shared by the bench scripts (source it): a Docker engine of the script's own, so nothing of
# the machine's Docker is touched, stopped by its PID and nothing else; and the common start of
# a script that times the example.

# bench_require PACKAGE...: installs the Debian packages a script's peers come in, when missing.
bench_require() {
  "$(dirname "${BASH_SOURCE[0]}")/../scripts/install-packages" "$@"
}

# free_port: prints a loopback TCP port free right now (the kernel's pick; a script binds it
# soon after).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# use_debian_docker: `docker` is Debian's docker.io client (20.10, BuildKit built in, on with
# DOCKER_BUILDKIT=1), whatever else is earlier on the PATH: a newer client runs BuildKit only
# through a buildx plugin Debian 12 does not package, and falls back to the legacy builder.
use_debian_docker() {
  export PATH="/usr/bin:$PATH" DOCKER_BUILDKIT=1
}

# bench_setup NAME: from the repository root, makes the scratch dir $work
# (/tmp/graven-bench-NAME.*), removed on exit after any private dockerd is stopped, and builds
# graven (the cargo profile $PROFILE, release unless set; path in $graven) and the example's
# static binary.
bench_setup() {
  work=$(mktemp -d "/tmp/graven-bench-$1.XXXXXX")
  trap bench_cleanup EXIT
  local profile=${PROFILE:-release}
  echo "building graven ($profile) and the example's static binary" >&2
  cargo build --profile "$profile" --quiet --bin graven
  examples/hello/build.sh
  graven="$PWD/target/$profile/graven"
}

bench_cleanup() {
  stop_dockerd
  rm -rf "$work" 2>/dev/null || true
}

# start_dockerd DIR: starts dockerd with its data, exec root, pidfile, log and unix socket under
# DIR, exports DOCKER_HOST and DOCKERD_PID, and waits (30 s at most) until it answers.
start_dockerd() {
  local dir=$1
  mkdir -p "$dir"
  export DOCKER_HOST="unix://$dir/docker.sock"
  dockerd --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
    -H "$DOCKER_HOST" --iptables=false --ip6tables=false --bridge=none >"$dir/log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 300); do
    docker info >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "dockerd did not start:" >&2
  tail -20 "$dir/log" >&2
  return 1
}

# use_or_start_dockerd DIR: the Docker engine that already answers, else start_dockerd DIR.
use_or_start_dockerd() {
  docker info >/dev/null 2>&1 && return 0
  echo "starting a private dockerd" >&2
  start_dockerd "$1"
}

# stop_dockerd: stops the dockerd start_dockerd started, if any: SIGTERM, up to 30 s, SIGKILL;
# then detaches what it left mounted under its dir (its network namespace's bind mount).
stop_dockerd() {
  [ -n "${DOCKERD_PID:-}" ] || return 0
  kill "$DOCKERD_PID" 2>/dev/null || true
  for _ in $(seq 300); do
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$DOCKERD_PID" 2>/dev/null || true
  DOCKERD_PID=
  local dir=${DOCKER_HOST#unix://}
  dir=${dir%/docker.sock}
  awk -v dir="$dir/" 'index($5, dir) == 1 { print $5 }' /proc/self/mountinfo |
    while read -r mounted; do umount -l "$mounted" 2>/dev/null || true; done
}
