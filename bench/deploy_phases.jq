# bench/deploy_phases.jq: where a deploy's time goes, from graven's event log
# (`graven history --json`). One line per deploy (DeployStarted to DeploySucceeded), in ms:
#   total     the deploy, from its DeployStarted to its DeploySucceeded
#   to_first  DeployStarted to the first new instance launched
#   start     a new instance's launch to the runtime's start result (mean over the deploy)
#   health    start result to healthy (mean)
#   gap       an instance healthy to the next one launched (mean; 0 when they overlap)
#   stop      an old instance's drain to it gone: drained, stopped, removed (mean)
#   tail      the last new instance healthy to DeploySucceeded
def first_at(kind; at): if .[kind] == null then .[kind] = at else . end;
def mean: if length == 0 then null else (add / length | floor) end;
. as $events
| (reduce $events[] as $e ({};
    if $e.payload.instance == null then .
    else .[$e.payload.instance] |= ((. // {}) | first_at($e.payload.kind; $e.at_ms)) end)
   ) as $instances
| [$events[] | select(.payload.kind == "deploy_started")] as $starts
| [$events[] | select(.payload.kind == "deploy_succeeded")] as $ends
| $starts[]
| .at_ms as $s
| ([$ends[] | select(.at_ms >= $s)] | first | .at_ms) as $e
| select($e != null)
| ([$instances[] | select(.instance_launched != null and .instance_launched >= $s
      and .instance_launched <= $e)] | sort_by(.instance_launched)) as $new
| ([$instances[] | select(.instance_draining != null and .instance_draining >= $s
      and .instance_draining <= $e)]) as $old
| {
    release: .payload.to,
    total: ($e - $s),
    to_first: (($new | first | .instance_launched) - $s),
    start: ($new | map(.instance_started - .instance_launched) | mean),
    health: ($new | map(.instance_healthy - .instance_started) | mean),
    gap: ([range(1; $new | length) as $i
           | [$new[$i].instance_launched - $new[$i - 1].instance_healthy, 0] | max] | mean),
    stop: ($old | map(select(.instance_gone != null) | .instance_gone - .instance_draining) | mean),
    tail: ($e - ($new | map(.instance_healthy) | max))
  }
