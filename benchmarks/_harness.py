"""Run one benchmark task in a fresh Python process and measure its time and peak memory.

A *task* is a function ``task(**args) -> (run, finish)`` named as ``"module:function"``. The
worker process (``python -m benchmarks._harness '<json>'``):

1. calls ``task(**args)``: loading inputs happens here and is **not timed**;
2. collects garbage, records RSS (the baseline), resets the kernel's peak-RSS counter
   (``/proc/self/clear_refs`` ← ``5``) so the peak covers the timed part only on top of what is
   already resident;
3. times ``result = run()`` with ``time.perf_counter`` (wall) and ``getrusage`` (CPU time of
   all threads: on a busy machine the wall time suffers, the CPU time much less); with
   ``runs`` > 1 it calls ``run`` that many times and keeps the best call after the first (a
   *warm* process: imports, compiled code and allocator pages already there), and reports
   the first call's wall time too;
4. reads ``VmHWM`` (peak RSS) from ``/proc/self/status``;
5. calls ``finish(result)`` (not timed: e.g. writes the answer for the equality check);
6. prints one JSON line: seconds, peak and baseline RSS in bytes.

If the peak counter cannot be reset, the peak includes the loading phase (``peak_reset`` False in
the report). Where ``/proc`` is missing, ``resource.getrusage`` gives the peak of the process.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["Measurement", "best_of", "run_task", "summarize"]

_MARKER = "__BENCH_RESULT__ "


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _peak_bytes() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@dataclass
class Measurement:
    seconds: float
    peak_rss: int  # bytes
    base_rss: int  # bytes, resident before the timed part
    peak_reset: bool
    cpu_seconds: float = float("nan")  # user + system time of every thread in the timed part
    first_seconds: float = float("nan")  # the first call's wall time, when a task runs twice
    error: str | None = None
    extra: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def run_task(
    task: str, args: dict[str, Any], *, timeout: float | None = None, runs: int = 1
) -> Measurement:
    """Run ``task`` in a fresh interpreter, calling its ``run`` ``runs`` times (the best of
    the calls after the first is the measurement when ``runs > 1``, the first call's time is
    ``first_seconds``); never raises for a failing task."""
    payload = json.dumps({"task": task, "args": args, "runs": runs})
    env = dict(os.environ)
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = cwd + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks._harness", payload],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Measurement(float("nan"), 0, 0, False, error=f"timeout after {timeout} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARKER):
            data = json.loads(line[len(_MARKER) :])
            return Measurement(**data)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return Measurement(
        float("nan"), 0, 0, False, error=f"exit {proc.returncode}: " + " | ".join(tail)
    )


def summarize(runs: list[Measurement]) -> Measurement:
    """Best (min) time and its CPU time, max peak RSS, min baseline; the first failure if any."""
    failed = [m for m in runs if not m.ok]
    if failed or not runs:
        return failed[0] if failed else Measurement(float("nan"), 0, 0, False, error="no run")
    best = min(runs, key=lambda m: m.seconds)
    return Measurement(
        seconds=best.seconds,
        peak_rss=max(m.peak_rss for m in runs),
        base_rss=min(m.base_rss for m in runs),
        peak_reset=all(m.peak_reset for m in runs),
        cpu_seconds=best.cpu_seconds,
        first_seconds=min(m.first_seconds for m in runs),
        extra=best.extra,
    )


def best_of(
    task: str,
    args: dict[str, Any],
    repeat: int,
    *,
    first_args: dict[str, Any] | None = None,
    runs_each: int = 1,
) -> Measurement:
    """``repeat`` fresh processes, one after the other, each calling the task's ``run``
    ``runs_each`` times (see :func:`run_task`); the first gets ``args | first_args`` (e.g.
    where to save the answer). Stops at the first failure."""
    runs: list[Measurement] = []
    for i in range(repeat):
        given = {**args, **(first_args or {})} if i == 0 else args
        runs.append(run_task(task, given, runs=runs_each))
        if not runs[-1].ok:
            break
    return summarize(runs)


def _worker(payload: str) -> None:
    spec = json.loads(payload)
    module_name, func_name = spec["task"].split(":")
    task = getattr(importlib.import_module(module_name), func_name)
    run, finish = task(**spec["args"])
    gc.collect()
    base = (_status_kib("VmRSS") or 0) * 1024
    reset = _reset_peak()
    timed: list[tuple[float, float]] = []
    result = None
    for i in range(spec.get("runs", 1)):
        if i:
            result = None  # not held beside the next call's answer
            gc.collect()
        c0 = _cpu_seconds()
        t0 = time.perf_counter()
        result = run()
        timed.append((time.perf_counter() - t0, _cpu_seconds() - c0))
    seconds, cpu = min(timed[1:]) if len(timed) > 1 else timed[0]
    peak = _peak_bytes()
    extra = finish(result)
    out = {
        "seconds": seconds,
        "peak_rss": peak,
        "base_rss": base,
        "peak_reset": reset,
        "cpu_seconds": cpu,
        "first_seconds": timed[0][0],
        "extra": extra if isinstance(extra, dict) else None,
    }
    sys.stdout.flush()
    print(_MARKER + json.dumps(out), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1])
