"""Resume cost: work redone after a SIGKILL in the middle of a generating stage.

Runs the instruction-candidates stage (the embedded model, sampled generation) three
times in child processes: uninterrupted; killed with SIGKILL once `--kill-after` batches
are written; resumed. Each child prints one line per finished generate batch, so
redone = (killed batches + resumed batches) - uninterrupted batches. Target <= 1 batch;
the resumed artifact must equal the uninterrupted one record for record.

    python -m benchmarks.resume
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import offline, write_result

CONFIG = {"name": "resume-bench", "seed": 0, "model": {"source": "embedded"},
          "instructions": {"n": 12, "overgenerate": 2.0, "batch_size": 4, "max_new_tokens": 40}}


def child(out: str, config: dict) -> None:
    """Run the candidates stage, printing `batch` after every generate call."""
    from cai.config import RunConfig
    from cai.pipeline.generation import HFGenerator
    from cai.pipeline.runner import Run, run_stages

    original = HFGenerator.generate

    def counted(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        print("batch", flush=True)
        return result

    HFGenerator.generate = counted
    cfg = RunConfig.model_validate(config)
    run_stages(Run(cfg, Path(out), resume=True), ["candidates"])
    print("done", flush=True)


def start(out: Path, config: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.resume", "--child", str(out), json.dumps(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def measure(workdir: Path, config: dict = CONFIG, kill_after: int = 2) -> dict:
    from cai.pipeline.store import read_artifact

    full = start(workdir / "full", config)
    full_batches = sum(line.strip() == "batch" for line in full.stdout)
    assert full.wait() == 0, "uninterrupted run failed"

    killed = start(workdir / "killed", config)
    killed_batches = 0
    for line in killed.stdout:
        if line.strip() == "batch":
            killed_batches += 1
            if killed_batches == kill_after:
                time.sleep(0.5)  # let it start the next batch: the kill lands mid-work
                killed.send_signal(signal.SIGKILL)
                break
    killed.wait()
    killed_batches += sum(line.strip() == "batch" for line in killed.stdout)  # printed before the kill landed

    resumed = start(workdir / "killed", config)
    resumed_batches = sum(line.strip() == "batch" for line in resumed.stdout)
    assert resumed.wait() == 0, "resumed run failed"

    a = list(read_artifact(workdir / "full" / "candidates").records())
    b = list(read_artifact(workdir / "killed" / "candidates").records())
    return {"uninterrupted_batches": full_batches, "killed_batches": killed_batches, "resumed_batches": resumed_batches,
            "redone_batches": killed_batches + resumed_batches - full_batches, "records": len(a),
            "identical": a == b, "killed_returncode": killed.returncode}


def main(argv: list[str] | None = None) -> dict:
    offline()
    if argv and argv[0] == "--child":
        child(argv[1], json.loads(argv[2]))
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-after", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        m = measure(Path(tmp), kill_after=args.kill_after)
    return write_result("resume", value=m["redone_batches"], unit="batches redone after SIGKILL", target=1,
                        target_op="<=", passed=m["redone_batches"] <= 1 and m["identical"], measurements=m)


if __name__ == "__main__":
    main(sys.argv[1:])
