"""Which phase of a command holds its peak host memory: resident memory sampled beside its log.

    python -m scripts.diagnostics.rss_timeline -- qtool quantize RECIPE --output OUT --overwrite

Runs the command (one process; its children are not followed), samples its resident set size
(``VmRSS`` of ``/proc/PID/status``) every ``--interval`` seconds, and reads its output line by line.
Prints, for each log line, the largest resident size seen from that line until the next one, then
the overall peak (``VmHWM``, the kernel's own high-water mark, read last) and the line it came
after. Run with ``QTOOL_NO_PROGRESS=1`` so that every step logs plain lines. What it cannot see:
peaks shorter than the interval (``VmHWM`` still has them; the phase is then the nearest line).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time


def status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS", "VmHWM")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("give the command after --")
    env = {**os.environ, "QTOOL_NO_PROGRESS": os.environ.get("QTOOL_NO_PROGRESS", "1")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    phases: list[list] = [["(start)", 0.0, 0]]  # [line, time, max RSS while it was the last line]
    hwm = 0
    lock = threading.Lock()
    t0 = time.perf_counter()

    def sample() -> None:
        nonlocal hwm
        while proc.poll() is None:
            st = status(proc.pid)
            with lock:
                if "VmRSS" in st:
                    phases[-1][2] = max(phases[-1][2], st["VmRSS"])
                hwm = max(hwm, st.get("VmHWM", 0))
            time.sleep(args.interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if not line:
            continue
        with lock:
            phases.append([line[:140], time.perf_counter() - t0, 0])
    proc.wait()
    thread.join()
    print(f"{'t s':>8} {'max RSS GB':>10}  line")
    for line, t, rss in phases:
        print(f"{t:8.1f} {rss / 1e9:10.3f}  {line}")
    top = max(phases, key=lambda ph: ph[2])
    print(
        f"\npeak sampled RSS {top[2] / 1e9:.3f} GB after: {top[0]!r} (t={top[1]:.1f} s); "
        f"kernel high-water mark {hwm / 1e9:.3f} GB; exit status {proc.returncode}"
    )
    raise SystemExit(proc.returncode)


if __name__ == "__main__":
    main()
