#!/usr/bin/env bash
# bench/event_log.sh: how long a control plane takes to read its event log at start-up, as the
# log grows, with and without a snapshot (issue 11's target: a log of 1,000,000 events, and
# start-up after compaction under 1 s).
#
# - The log: `graven __synthetic-history` (dev-only) appends EVENTS events of a realistic life
#   to app `bench`: per cycle a release of 4 instances rolled out (launch, start, healthy,
#   traffic, drain, gone), a day of health checks flapping and two crashes replaced, with the
#   traffic decision each change records; about 90 events a cycle, so 1,000,000 events hold
#   some 11,000 releases.
# - Start-up is timed as `graven status --app bench --json` with no control plane running:
#   it opens the log and folds it (`events::snapshot::load`), which is what a starting
#   controller does before anything else, then prints the state. Median of RUNS runs.
# - "before": no snapshot, the whole log folded. "after": `graven compact` stored a snapshot
#   at the log's end, then EXTRA more events were appended (a snapshot is never exactly at the
#   end in life: the controller writes one every 10,000 events), so start-up reads the
#   snapshot and folds EXTRA events.
# - No peer does this job the same way (Kubernetes keeps its state in etcd, Nomad in raft
#   snapshots plus a log, both servers), so the table gives graven against the target.
#
# Usage: bench/event_log.sh            (EVENTS=1000000 EXTRA=9999 RUNS=5)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
EVENTS=${EVENTS:-1000000}
EXTRA=${EXTRA:-9999}
RUNS=${RUNS:-5}
PROFILE=${PROFILE:-release}

work=$(mktemp -d /tmp/graven-bench-event-log.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "building graven ($PROFILE, with the dev-only history generator)" >&2
cargo build --profile "$PROFILE" --quiet --features dev-tools --bin graven
graven="$ROOT/target/$PROFILE/graven"
export GRAVEN_HOME="$work/home"

now() { date +%s%N; }
# median_ms CMD...: runs CMD $RUNS times, prints the median wall time in ms.
median_ms() {
  local times=()
  for _ in $(seq "$RUNS"); do
    local start end
    start=$(now)
    "$@" >/dev/null 2>&1
    end=$(now)
    times+=($(( (end - start) / 1000000 )))
  done
  printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p"
}

start=$(now)
"$graven" __synthetic-history --app bench --events "$EVENTS" >&2
echo "wrote $EVENTS events in $(( ($(now) - start) / 1000000 )) ms; log: $(du -h "$GRAVEN_HOME/apps/bench/local/events.db" | cut -f1)" >&2

before=$(median_ms "$graven" status --app bench --json)
"$graven" compact --app bench >&2
"$graven" __synthetic-history --app bench --events "$EXTRA" >&2
after=$(median_ms "$graven" status --app bench --json)
snapshot=$(python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("SELECT length(state) FROM snapshots").fetchone()[0])' "$GRAVEN_HOME/apps/bench/local/events.db")

printf '\n%-44s %12s\n' "start-up (fold the log, print the state)" "median ms"
printf '%-44s %12s\n' "$EVENTS events, no snapshot" "$before"
printf '%-44s %12s\n' "snapshot at $EVENTS + $EXTRA events after it" "$after"
printf '%-44s %12s\n' "ratio (before / after)" "$(python3 -c "print(f'{$before / max($after, 1):.1f}x')")"
printf '%-44s %12s\n' "target after compaction" "< 1000"
printf '%-44s %12s\n' "snapshot size (bytes of JSON)" "$snapshot"
