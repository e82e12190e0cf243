#!/usr/bin/env python3
"""Counts system calls, context switches and wake-ups per operation for each target of a
wsgate-bench run: `perf stat --per-thread` attached to the target's processes for each
measurement window, divided by the operations the harness counted in that window.

usage: python3 bench/perf-stat.py OUT -- target/release/wsgate-bench run [ARGS...]

OUT receives the harness's results (its --out is set to OUT/results), one perf file per window
(r<round>-<measure>-<target>.txt) and per-operation.txt: the median per operation over the
rounds of each event, for each measure and target. Needs perf (Debian's linux-perf) and root
or perf_event_paranoid <= 1; software events and tracepoints only, so it works in a VM without
hardware counters. Counting adds a little CPU to the counted target, so read the harness's CPU
figures from a run without it.
"""
import collections
import glob
import json
import os
import re
import subprocess
import sys
import threading
import time

EVENTS = ",".join([
    "task-clock", "context-switches", "cpu-migrations", "raw_syscalls:sys_enter",
    "syscalls:sys_enter_futex", "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_writev", "syscalls:sys_enter_recvfrom", "sched:sched_wakeup",
])
# The harness's CPU figure of each measure: its operation count is the divisor.
FIGURES = {
    "Handshakes": "hs_cpu_us", "SmallFixed": "small_fixed_cpu_us", "LargeFixed": "large_fixed_cpu_us",
    "SmallSaturated": "small_saturated_cpu_us", "LargeSaturated": "large_saturated_cpu_us",
    "Latency": "rtt_p50_ms",
}


def read(path, mode="r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:
        return None


def target_pids(kind):
    """The processes of target `kind`: wsgate's by its Secret volume under the harness's
    `<kind>-…` instance directory, nginx's and HAProxy's by their working directory there, the
    limit by its subcommand."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        argv = (read(f"/proc/{pid}/cmdline", "rb") or b"").split(b"\0")
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        # The instance directory: the kind, a dash and tempfile's six random characters.
        mark = re.compile(rf"/{re.escape(kind)}-[A-Za-z0-9]{{6}}(/|$)")
        if kind == "limit":
            if len(argv) > 1 and argv[1] == b"limit":
                found.append(pid)
        elif any(mark.search(a.decode(errors="replace")) for a in argv) or mark.search(cwd + "/"):
            found.append(pid)
    return found


def attach(pids, path, warmup, secs):
    time.sleep(warmup)
    subprocess.run(
        ["perf", "stat", "--per-thread", "-x", ",", "-e", EVENTS, "-p", ",".join(pids), "-o", path,
         "--", "sleep", str(secs)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def per_operation(out):
    records = json.load(open(f"{out}/results/raw.json"))["records"]
    ops = {(r["round"], r["figure"], r["target"]): r["detail"].get("ops") for r in records}
    table = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in glob.glob(f"{out}/r*-*.txt"):
        m = re.match(r"r(\d+)-(\w+)-(\S+)\.txt$", os.path.basename(path))
        rnd, measure, target = int(m.group(1)), m.group(2), m.group(3)
        n = ops.get((rnd, FIGURES.get(measure), target))
        if not n:
            continue
        counts = collections.Counter()
        for line in open(path):
            f = line.strip().split(",")
            if len(f) > 3 and not f[1].startswith("<"):
                try:
                    counts[f[3]] += float(f[1])
                except ValueError:
                    pass
        for event, v in counts.items():
            table[(measure, target)][event].append(v / n)
    lines = ["per operation, median over the rounds (task-clock in ms)"]
    for (measure, target), events in sorted(table.items()):
        cells = []
        for event, values in sorted(events.items()):
            values.sort()
            name = event.split(":")[-1].replace("sys_enter_", "").replace("sys_enter", "syscalls")
            cells.append(f"{name}={values[len(values) // 2]:.3g}")
        lines.append(f"{measure} {target}: " + " ".join(cells))
    return "\n".join(lines) + "\n"


def main():
    if "--" not in sys.argv or sys.argv.index("--") != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    cmd = sys.argv[3:] + ["--out", f"{out}/results"]
    warmup = float(cmd[cmd.index("--warmup") + 1]) if "--warmup" in cmd else 1.0
    secs = float(cmd[cmd.index("--secs") + 1]) if "--secs" in cmd else 5.0
    os.makedirs(out, exist_ok=True)
    harness = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    counters = []
    with open(f"{out}/harness.log", "w") as log:
        for line in harness.stderr:
            log.write(line)
            log.flush()
            m = re.match(r"round (\d+): (\w+) on (\S+)", line)
            if m and m.group(2) in FIGURES:
                pids = target_pids(m.group(3))
                if pids:
                    path = f"{out}/r{m.group(1)}-{m.group(2)}-{m.group(3)}.txt"
                    t = threading.Thread(target=attach, args=(pids, path, warmup + 0.05, secs - 0.1))
                    t.start()
                    counters.append(t)
    for t in counters:
        t.join()
    if harness.wait() != 0:
        sys.exit(f"wsgate-bench failed: see {out}/harness.log")
    table = per_operation(out)
    open(f"{out}/per-operation.txt", "w").write(table)
    print(table)


if __name__ == "__main__":
    main()
