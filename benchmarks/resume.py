"""Resume cost: work redone after a SIGKILL in the middle of a generating stage.

Runs a stage three times in child processes: uninterrupted; killed with SIGKILL once
`--kill-after` batches are written; resumed. The stage is the instruction-candidates
stage by default (the embedded model, sampled generation through `cai run`'s own stage
runner) or, with `--stage eval`, evaluation-response generation (greedy). Each child prints one line per decoded batch, so
redone = (killed batches + resumed batches) - uninterrupted batches. Target <= 1 batch;
the resumed artifact must equal the uninterrupted one record for record (by id).

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
EVAL_CONFIG = {"name": "resume-bench", "seed": 0, "model": {"source": "embedded"},
               "eval": {"suites": ["primary"], "limit": 12, "batch_size": 3, "max_new_tokens": 24}}


def child(out: str, config: dict, stage: str) -> None:
    """Run the stage, printing `batch` after every decoded batch (a `generate` call decodes one
    or more: eval makes one call per suite and model)."""
    from cai.config import RunConfig
    from cai.invariants.artifacts import RecordIds
    from cai.pipeline.compare import generate_eval_responses, load_eval_set
    from cai.pipeline.generation import HFGenerator
    from cai.pipeline.models import ModelSlot
    from cai.pipeline.runner import Run, run_stages
    from cai.pipeline.store import ArtifactWriter

    original = HFGenerator._decode

    def counted(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        print("batch", flush=True)
        return result

    HFGenerator._decode = counted
    cfg = RunConfig.model_validate(config)
    if stage == "candidates":
        run_stages(Run(cfg, Path(out), resume=True), ["candidates"])
    else:
        with ModelSlot(cfg.model) as slot:
            writer = ArtifactWriter(Path(out) / "eval", "eval", config_hash=cfg.hash(), resume=True)
            generate_eval_responses(cfg, slot, load_eval_set("stage1", cfg.eval.limit), ["base"], writer)
            writer.finalize(invariants=[RecordIds().check(writer.done)])
    print("done", flush=True)


def start(out: Path, config: dict, stage: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.resume", "--child", str(out), json.dumps(config), stage],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def measure(workdir: Path, config: dict = CONFIG, kill_after: int = 2, stage: str = "candidates") -> dict:
    from cai.pipeline.store import read_artifact

    full = start(workdir / "full", config, stage)
    full_batches = sum(line.strip() == "batch" for line in full.stdout)
    assert full.wait() == 0, "uninterrupted run failed"

    killed = start(workdir / "killed", config, stage)
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

    resumed = start(workdir / "killed", config, stage)
    resumed_batches = sum(line.strip() == "batch" for line in resumed.stdout)
    assert resumed.wait() == 0, "resumed run failed"

    # record for record, by id: eval writes each batch as it ends, and a resumed call batches
    # only what is left, so the order of the records (not their content) may differ
    a = sorted(read_artifact(workdir / "full" / stage).records(), key=lambda r: r["id"])
    b = sorted(read_artifact(workdir / "killed" / stage).records(), key=lambda r: r["id"])
    return {"uninterrupted_batches": full_batches, "killed_batches": killed_batches, "resumed_batches": resumed_batches,
            "redone_batches": killed_batches + resumed_batches - full_batches, "records": len(a),
            "identical": a == b, "killed_returncode": killed.returncode}


def main(argv: list[str] | None = None) -> dict:
    offline()
    if argv and argv[0] == "--child":
        child(argv[1], json.loads(argv[2]), argv[3])
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-after", type=int, default=2)
    parser.add_argument("--stage", choices=["candidates", "eval"], default="candidates")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        m = measure(Path(tmp), CONFIG if args.stage == "candidates" else EVAL_CONFIG, args.kill_after, args.stage)
    m["stage"] = args.stage
    return write_result("resume", value=m["redone_batches"], unit="batches redone after SIGKILL", target=1,
                        target_op="<=", passed=m["redone_batches"] <= 1 and m["identical"], measurements=m)


if __name__ == "__main__":
    main(sys.argv[1:])
