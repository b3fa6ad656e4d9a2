#!/usr/bin/env bash
# bench/stateful.sh: the client-visible pause of a stop-first switch of PostgreSQL as a
# stateful service (`stateful = true`, its data on a named volume, behind a TCP route), against
# PostgreSQL's own stop + start on a data directory (`pg_ctl stop -m fast` then
# `pg_ctl start -w`, timed, the host's PostgreSQL 15 as the `postgres` user).
#
# graven half: `graven daemon` with its own GRAVEN_HOME in a temp dir (stopped by its PID), the
# image baked by graven from the Debian base (scripts/debian-base) with postgresql-15, the
# service deployed, then SWITCHES deploys of a new release each (VERSION in its env). A writer
# inserts rows through the route, each with its own `psql` connection, one after another, and
# records when each was acknowledged; a switch's pause is the longest gap between two
# acknowledged inserts from `graven deploy` until three inserts went through after it returned.
# The health check is `pg_isready` every 100 ms, so the pause includes up to one interval of
# the check beyond PostgreSQL's own start.
#
# Peer: the same number of `pg_ctl stop -m fast` + `pg_ctl start -w` on a fresh cluster, each
# timed from the stop's start to the start's return.
#
# Target (issue 15): pause <= stop + start + 100 ms (medians). Prints a markdown table.
#
# Usage: bench/stateful.sh          (SWITCHES=5; PROFILE=release by default, as every bench;
#                                    PROFILE=dev for the debug build)
set -euo pipefail
cd "$(dirname "$0")/.."
switches=${SWITCHES:-5}

source bench/lib.sh
bench_require postgresql-15 postgresql-client-15
# Not bench_setup's build: this one has the test tools (`dev-tools`), as the tests' build has,
# so a bench run between test runs rebuilds nothing; the path it times is the same code. The
# binary is copied into the scratch dir, so a build meanwhile cannot replace it under the
# daemon (whose shims re-execute it).
work=$(mktemp -d /tmp/graven-bench-stateful.XXXXXX)
trap bench_cleanup EXIT
profile=${PROFILE:-release}
cargo build --profile "$profile" --features dev-tools --quiet --bin graven
out=$profile
[ "$profile" = dev ] && out=debug
cp "target/$out/graven" "$work/graven"
graven="$work/graven"
pgbin=/usr/lib/postgresql/15/bin
base=$(scripts/debian-base)
home="$work/home" dir="$work/project"
mkdir -p "$dir"
route_port=$(free_port)

cat >"$dir/Containerfile" <<EOC
FROM docker-archive:$base
RUN apt-get update \\
 && apt-get install -y --no-install-recommends postgresql-15 \\
 && rm -rf /var/lib/apt/lists/*
USER postgres
ENV PATH=/usr/lib/postgresql/15/bin:\$PATH PGDATA=/var/lib/postgresql/data/pg
EXPOSE 5432
CMD ["sh", "-c", "test -s \$PGDATA/PG_VERSION || { initdb -D \$PGDATA -U postgres --auth=trust >/dev/null && echo 'host all all 0.0.0.0/0 trust' >> \$PGDATA/pg_hba.conf; } && exec postgres -D \$PGDATA -k /tmp -c listen_addresses='*'"]
EOC
project() {
  cat >"$dir/graven.toml" <<EOT
app = "pg"

[services.db]
route = "tcp://127.0.0.1:$route_port"
stateful = true
env = { VERSION = "$1" }
volumes = { pgdata = "/var/lib/postgresql/data" }
limits = { tmp = "256MiB" }
health = { kind = "exec", command = "pg_isready -q -h 127.0.0.1 -p 5432", interval = "100ms", timeout = "2s", healthy_after = 1, unhealthy_after = 3 }
deploy = { health_deadline = "60s" }
stop_grace = "20s"
EOT
}

daemon_pid="" writer_pid="" peer_dir=""
finish() {
  [ -n "$writer_pid" ] && kill "$writer_pid" 2>/dev/null || true
  if [ -n "$daemon_pid" ]; then
    GRAVEN_HOME=$home "$graven" down >/dev/null 2>&1 || true
    kill -TERM "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
  fi
  if [ -n "$peer_dir" ]; then
    runuser -u postgres -- "$pgbin/pg_ctl" -D "$peer_dir/pg" stop -m immediate >/dev/null 2>&1 || true
    rm -rf "$peer_dir"
  fi
  # Instance logs are append-only (chattr +a): cleared so the scratch dir can go.
  chattr -R -a "$work" 2>/dev/null || true
  bench_cleanup
}
trap finish EXIT

# --- graven ---------------------------------------------------------------------------------
project v1
GRAVEN_HOME=$home "$graven" daemon 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 600); do grep -q "daemon listening" "$work/daemon.log" && break; sleep 0.1; done
echo "baking and deploying v1" >&2
GRAVEN_HOME=$home "$graven" deploy "$dir" >/dev/null
psql_route() { PGCONNECT_TIMEOUT=60 psql -h 127.0.0.1 -p "$route_port" -U postgres -tA -c "$1"; }
psql_route "create table t (id bigint primary key)" >/dev/null

acks="$work/acks"
: >"$acks"
(
  i=0
  while :; do
    i=$((i + 1))
    if psql_route "insert into t values ($i)" >/dev/null 2>&1; then date +%s.%N >>"$acks"; fi
  done
) &
writer_pid=$!
acks_after() { awk -v t="$1" '$1 > t' "$acks" | wc -l; }

windows="$work/windows"
: >"$windows"
for n in $(seq 2 $((switches + 1))); do
  sleep 1
  project "v$n"
  t0=$(date +%s.%N)
  GRAVEN_HOME=$home "$graven" deploy "$dir" >/dev/null
  t1=$(date +%s.%N)
  for _ in $(seq 600); do [ "$(acks_after "$t1")" -ge 3 ] && break; sleep 0.05; done
  echo "$t0 $(date +%s.%N)" >>"$windows"
  echo "switch to v$n done" >&2
done
kill "$writer_pid"
wait "$writer_pid" 2>/dev/null || true
writer_pid=""

# --- peer: pg_ctl stop -m fast + pg_ctl start -w --------------------------------------------
# Its own dir, which the postgres user can reach (the scratch dir is root's alone).
peer_dir=$(mktemp -d /tmp/graven-bench-stateful-peer.XXXXXX)
chown postgres: "$peer_dir"
peer_port=$(free_port)
as_pg() { runuser -u postgres -- "$@"; }
as_pg "$pgbin/initdb" -D "$peer_dir/pg" -U postgres --auth=trust >/dev/null
pg_ctl_peer() { as_pg "$pgbin/pg_ctl" -D "$peer_dir/pg" -l "$peer_dir/log" -o "-p $peer_port -k $peer_dir -c listen_addresses=''" "$@" >/dev/null; }
pg_ctl_peer start -w
peer="$work/peer.times"
: >"$peer"
for _ in $(seq "$switches"); do
  sleep 1
  t0=$(date +%s.%N)
  pg_ctl_peer stop -m fast
  pg_ctl_peer start -w
  t1=$(date +%s.%N)
  echo "$t0 $t1" >>"$peer"
done
pg_ctl_peer stop -m fast
rm -rf "$peer_dir"
peer_dir=""

# --- table -----------------------------------------------------------------------------------
python3 - "$acks" "$windows" "$peer" <<'EOP'
import statistics, sys
acks = sorted(float(l) for l in open(sys.argv[1]) if l.strip())
windows = [tuple(map(float, l.split())) for l in open(sys.argv[2]) if l.strip()]
peer = [b - a for a, b in (tuple(map(float, l.split())) for l in open(sys.argv[3]) if l.strip())]
pauses = []
for start, end in windows:
    gaps = [b - a for a, b in zip(acks, acks[1:]) if b >= start and a <= end]
    pauses.append(max(gaps) if gaps else float("nan"))
print("| switch | graven stop-first pause (ms) | pg_ctl stop -m fast + start -w (ms) | ratio |")
print("|---|---|---|---|")
for i, (p, q) in enumerate(zip(pauses, peer), 1):
    print(f"| {i} | {p * 1000:.0f} | {q * 1000:.0f} | {p / q:.2f}x |")
mp, mq = statistics.median(pauses), statistics.median(peer)
print(f"| median | {mp * 1000:.0f} | {mq * 1000:.0f} | {mp / mq:.2f}x |")
verdict = "met" if mp <= mq + 0.1 else "missed"
print(f"\ntarget pause <= stop + start + 100 ms: {verdict} ({mp * 1000:.0f} <= {(mq + 0.1) * 1000:.0f})")
print(f"{len(acks)} inserts acknowledged")
EOP
echo "load: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores" >&2
