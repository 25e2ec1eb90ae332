"""Shared helpers for benchmarks: machine info and the result writer.

Every benchmark ends with `write_result(...)`, which writes reports/benchmarks/NAME.json and
prints the result as one JSON object on the last line of stdout:
`name, value, unit, target, target_op, passed` + `measurements` (raw numbers) + `machine`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
REPORT_DIR = REPO_ROOT / "reports" / "benchmarks"
OPS = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, "==": lambda v, t: v == t}


def offline() -> None:
    """Benchmarks never reach a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model and cores, torch threads, GPU, library versions, git commit, load average
    (other processes on the machine skew CPU timings: the load says how much)."""
    import torch

    from cai.pipeline.models import library_versions
    from cai.pipeline.store import git_commit

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
               "cuda": torch.version.cuda}
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": library_versions(),
        "git_commit": git_commit(),
        "load_average": load_average(),
    }


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """`with stopwatch() as t: ...` then t["seconds"] (wall) and t["cpu_seconds"] (this process,
    all threads). On a shared machine wall time swings with other processes' load; CPU time
    much less, so benchmarks report both."""
    out: dict[str, float] = {}
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - started
        out["cpu_seconds"] = time.process_time() - cpu_started


def write_result(name: str, *, value: float, unit: str, target: float, target_op: str = ">=",
                 measurements: dict[str, Any] | None = None, passed: bool | None = None,
                 notes: str | None = None) -> dict[str, Any]:
    """Write reports/benchmarks/NAME.json and print the result as the last stdout line.
    `passed` defaults to `value <target_op> target`."""
    if passed is None:
        passed = bool(OPS[target_op](value, target))
    result = {"name": name, "value": value, "unit": unit, "target": target, "target_op": target_op,
              "passed": bool(passed), "measurements": measurements or {}, "machine": machine_info(),
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if notes:
        result["notes"] = notes
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return result
