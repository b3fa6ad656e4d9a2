#!/usr/bin/env python3
"""Per-step CPU of a bake: runs a bake command and, at each line of its output that ends a step,
prints that line with the CPU time a process used since the previous such line, its own
(user+sys) and its waited children's (user+sys), read from /proc/PID/stat.

A step's command is counted when the process that waits it reaps it: graven reaps the sandbox
helper that waited the step's command, dockerd reaps the `runc run` that waited BuildKit's. So
a step's "children" figure is its command's CPU (and, for docker, runc's), and "self" is what
the tool's own process spent meanwhile (graven: the step's diff and hashing, and the layers'
background gzip while it overlapped the step; dockerd: BuildKit's snapshots and export).

Usage: step_cpu.py graven CMD...        (the process measured is CMD itself)
       step_cpu.py docker PID CMD...    (the process measured is PID, the dockerd)
Each line also says when it came, in seconds from the start, so the work after the last step
(graven's last gzip and manifest, BuildKit's export) shows too. Prints one summary line at the
end: the totals and the wall time.
"""

import os
import re
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")
STEP_END = {
    # graven: "[2/9] RUN … done 14316ms" or "… cached"
    "graven": re.compile(r"^\[\d+/\d+\] .*(done \d+ms|cached)$"),
    # BuildKit, --progress=plain: "#5 DONE 14.3s" (a step, the context, the export)
    "docker": re.compile(r"^#\d+ DONE [0-9.]+s$"),
}


def cpu(pid):
    """(self user, self sys, children user, children sys) of pid, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the ")" field 3 (state) is fields[0]; utime is field 14, so fields[11].
    return tuple(int(x) / HZ for x in fields[11:15])


def main():
    tool = sys.argv[1]
    if tool == "docker":
        pid, cmd = int(sys.argv[2]), sys.argv[3:]
    else:
        pid, cmd = None, sys.argv[2:]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    measured = pid or proc.pid
    first = last = cpu(measured)
    names = {}
    for line in proc.stdout:
        line = line.rstrip("\n")
        if tool == "docker":
            m = re.match(r"^(#\d+) (\[.*)$", line)
            if m:
                names[m.group(1)] = m.group(2)
                continue
        if not STEP_END[tool].match(line):
            continue
        try:
            now = cpu(measured)
        except (FileNotFoundError, ProcessLookupError):
            now = last
        d = [b - a for a, b in zip(last, now)]
        last = now
        if tool == "docker":
            step = line.split()[0]
            name, end = names.get(step, step), line.split(" ", 1)[1]
        else:
            name, end = line.rsplit("  ", 1) if "  " in line else (line, "")
        at = time.monotonic() - start
        print(
            f"  {name[:64]:64} {end:>12}  at {at:6.2f} s  self {d[0]:5.2f}+{d[1]:4.2f}"
            f"  children {d[2]:5.2f}+{d[3]:4.2f}"
        )
    # graven's own CPU is final only once it has been waited: read it just before.
    if tool == "graven":
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        last_self = cpu(proc.pid)
    else:
        last_self = None
    rc = proc.wait()
    wall = time.monotonic() - start
    if tool == "graven":
        end = last_self
    else:
        end = cpu(measured)
    t = [b - a for a, b in zip(first, end)]
    print(
        f"{tool}: {wall:.2f} s wall, self {t[0]:.2f}+{t[1]:.2f} s, "
        f"children {t[2]:.2f}+{t[3]:.2f} s (user+sys), exit {rc}"
    )
    sys.exit(rc)


if __name__ == "__main__":
    main()
