"""Bad input and faults through the real CLI (`python -m cai ...`, one subprocess each; issue #13).

For every case: the exit code (README "Exit codes", `cai.cli.EXIT_CODES`), exactly one
stderr line naming the file / key / stage (bad input prints nothing else; runs that got past
validation also print `[cai]` progress lines, ignored), no traceback, and no files where
none should be (the case's directory listed before and after).

Faults are real where this machine allows: a full disk is a small tmpfs and an unwritable
output directory a read-only tmpfs (both need root and `mount`; otherwise the disk-full case
injects ENOSPC into the run's writes inside the real subprocess, and the unwritable case is
a mode-0555 directory as a non-root user). Out of memory, an internal error and Ctrl-C are
raised inside the real subprocess by a one-line patch of the generator (`-c` wrapper).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from cai.cli import EXIT_CODES

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
CAI = [sys.executable, "-m", "cai"]


def patched(code: str) -> list[str]:
    """`python -c`: run `code` (a patch), then the real CLI with the remaining arguments."""
    return [sys.executable, "-c", f"{code}\nimport sys\nfrom cai.cli import main\nsys.exit(main(sys.argv[1:]))"]


GENERATE_RAISES = "import torch\nfrom cai.pipeline import generation\n" \
                  "def boom(*a, **k):\n    raise {}\ngeneration.HFGenerator.generate = boom"


@dataclass
class Case:
    argv: list[str]
    code: int
    needles: list[str]  # each must appear in the error line
    new: set[str] = field(default_factory=set)  # paths (relative to the case dir) the command may leave
    gone: set[str] = field(default_factory=set)  # paths the command may remove (what a failed start of its own left)
    runner: list[str] = field(default_factory=lambda: list(CAI))
    env: dict[str, str] = field(default_factory=dict)
    progress: bool = False  # the run got past validation: `[cai]` lines may precede the error


def listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def write_config(tmp: Path, name: str = "cfg.yaml", **sections) -> str:
    data = {"model": {"source": "tiny-random"}}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    (tmp / name).write_text(yaml.safe_dump(data))
    return name


def model_dir(tmp: Path, embedded: str, name: str = "ckpt", *, weights: bytes | None = None,
              config_update: dict | None = None) -> str:
    """A checkpoint directory: the embedded model's config and tokenizer, `weights` as its
    model.safetensors (none if None)."""
    d = tmp / name
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(embedded) / f, d / f)
    if config_update:
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **config_update}))
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    return str(d)


REMOTE = {"auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"},
          "model_type": "x_custom"}


def run_dir(tmp: Path, name: str = "run", *, index: str | bytes | None = None, stage: bool = False) -> str:
    """A run directory as `cai run` leaves it: run.json (`index` as given, else a valid one
    for the default config) and, with `stage`, a started first stage."""
    from cai.config import load_config

    d = tmp / name
    d.mkdir()
    if index is None:
        cfg = load_config(tmp / write_config(tmp))
        index = json.dumps({"name": cfg.name, "config_hash": cfg.hash(), "config": cfg.model_dump(mode="json"),
                            "stages": {}, "status": "running"})
    (d / "run.json").write_bytes(index if isinstance(index, bytes) else index.encode())
    if stage:
        (d / "candidates" / "data").mkdir(parents=True)
        (d / "candidates" / "data" / "part-00000.jsonl.partial").write_text('{"id": "c-0"}\n')
    return name


def ifeval_prompts(tmp: Path, name: str = "prompts.jsonl", text: bytes | None = None) -> str:
    line = {"key": 1, "prompt": "Write a haiku.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    (tmp / name).write_bytes(text if text is not None else (json.dumps(line) + "\n").encode())
    return name


# --------------------------------------------------------------------------- root-only file systems


def mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True).returncode == 0


@pytest.fixture
def mounts():
    mounted: list[Path] = []

    def mount(where: Path, options: str) -> bool:
        ok = mount_tmpfs(where, options)
        if ok:
            mounted.append(where)
        return ok

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def unwritable(tmp: Path, mount) -> str:
    d = tmp / "readonly"
    if not mount(d, "ro,size=64k"):  # read-only tmpfs (root); else a directory without write permission
        d.chmod(0o555)
        if os.access(d, os.W_OK):
            pytest.skip("root without mount: no way to make a directory unwritable here")
    return "readonly"


# --------------------------------------------------------------------------- the cases

BAD_INPUT: dict[str, Callable[..., Case]] = {
    # config
    "config-missing": lambda t, e: Case(["run", "nope.yaml"], 2, ["nope.yaml", "config file not found"]),
    "config-invalid-yaml": lambda t, e: (t.joinpath("c.yaml").write_text("seed: 1\nmodel: [\n"),
                                         Case(["run", "c.yaml"], 2, ["c.yaml", "line", "invalid YAML"]))[1],
    "config-not-a-mapping": lambda t, e: (t.joinpath("c.yaml").write_text("- 1\n- 2\n"),
                                          Case(["run", "c.yaml"], 2, ["c.yaml", "expected a mapping"]))[1],
    "config-not-utf8": lambda t, e: (t.joinpath("c.yaml").write_bytes(b"name: caf\xe9\n"),
                                     Case(["run", "c.yaml"], 2, ["c.yaml", "not UTF-8", "0xe9"]))[1],
    "config-unknown-key": lambda t, e: Case(["run", write_config(t, sft={"lr": 0.1})], 2, ["cfg.yaml", "sft.lr", "unknown key"]),
    "config-bad-value": lambda t, e: Case(["run", write_config(t, model={"quantization": "3bit"})], 2,
                                          ["cfg.yaml", "model.quantization"]),
    "config-unknown-format": lambda t, e: Case(["run", write_config(t, format="chatml")], 2, ["cfg.yaml", "format", "chatml"]),
    "backend-vllm": lambda t, e: Case(["run", write_config(t, generation={"backend": "vllm"})], 2,
                                      ["cfg.yaml", "generation.backend", "vllm"]),
    "device-banana": lambda t, e: Case(["run", write_config(t, model={"device": "banana"}), "--out", "r"], 2,
                                       ["cfg.yaml", "model.device", "banana"]),
    "device-cuda-without-gpu": lambda t, e: Case(["run", write_config(t, model={"device": "cuda:7"}), "--out", "r"], 2,
                                                 ["cfg.yaml", "model.device", "cuda:7"]),
    "eval-set-missing": lambda t, e: Case(["run", write_config(t, eval={"sets": ["stage1", "nope"]}), "--out", "r"], 2,
                                          ["cfg.yaml", "eval.sets[1]", "nope", "not found"]),
    "eval-set-bad-record": lambda t, e: (t.joinpath("ev.jsonl").write_text('{"key": 1, "prompt": "x"}\n'),
                                         Case(["run", write_config(t, eval={"sets": [str(t / "ev.jsonl")]}), "--out", "r"],
                                              2, ["cfg.yaml", "eval.sets[0]", "ev.jsonl:1", "IFEval"]))[1],
    "model-path-missing": lambda t, e: Case(["run", write_config(t, model={"source": str(t / "no-model")}), "--out", "r"], 2,
                                            ["cfg.yaml", "model.source", "no-model", "not found"]),
    "model-without-weights": lambda t, e: Case(["run", write_config(t, model={"source": model_dir(t, e)}), "--out", "r"], 2,
                                               ["cfg.yaml", "model.source", "no weights"]),
    "model-pickle-only": lambda t, e: (t.joinpath("pk").mkdir(), t.joinpath("pk", "pytorch_model.bin").write_bytes(b"\x80\x04"),
                                       Case(["run", write_config(t, model={"source": str(t / "pk")}), "--out", "r"], 2,
                                            ["cfg.yaml", "model.source", "pickle"]))[2],
    "model-remote-code": lambda t, e: Case(["run", write_config(t, model={"source": model_dir(t, e, weights=b"x",
                                                                                                 config_update=REMOTE)}),
                                            "--out", "r"], 2, ["cfg.yaml", "model.source", "auto_map", "modeling_x",
                                                               "trust_remote_code"]),
    # the output path and run directories
    "out-is-a-file": lambda t, e: (t.joinpath("f").write_text("x"),
                                   Case(["run", write_config(t), "--out", "f"], 2, ["f", "not a directory"]))[1],
    "out-below-a-file": lambda t, e: (t.joinpath("f").write_text("x"),
                                      Case(["run", write_config(t), "--out", "f/run"], 2, ["--out f/run", "not a directory"]))[1],
    "resume-foreign-dir": lambda t, e: (t.joinpath("mine").mkdir(), t.joinpath("mine", "notes.txt").write_text("x"),
                                        Case(["run", write_config(t), "--out", "mine", "--resume"], 2,
                                             ["mine", "not a cai run directory"]))[2],
    "run-into-foreign-dir": lambda t, e: (t.joinpath("mine").mkdir(), t.joinpath("mine", "notes.txt").write_text("x"),
                                          Case(["run", write_config(t), "--out", "mine"], 2,
                                               ["mine", "not a cai run directory"]))[2],
    "resume-corrupt-run-json": lambda t, e: Case(["run", write_config(t), "--out", run_dir(t, index='{"config_hash": '),
                                                  "--resume"], 2, ["run/run.json", "invalid JSON"]),
    "resume-run-json-not-object": lambda t, e: Case(["run", write_config(t), "--out", run_dir(t, index="[1, 2]"),
                                                     "--resume"], 2, ["run/run.json", "JSON object"]),
    "resume-run-json-not-utf8": lambda t, e: Case(["run", write_config(t), "--out", run_dir(t, index=b'{"a": "\xff"}'),
                                                   "--resume"], 2, ["run/run.json", "UTF-8"]),
    "started-run-without-resume": lambda t, e: Case(["run", write_config(t), "--out", run_dir(t, stage=True)], 2,
                                                    ["run", "exists and is not empty", "--resume"]),
    "resume-with-another-config": lambda t, e: (run_dir(t, stage=True),
                                                Case(["run", write_config(t, "other.yaml", seed=5), "--out", "run",
                                                      "--resume"], 2, ["run", "another config"]))[1],
    "shard-out-of-range": lambda t, e: Case(["run", write_config(t), "--out", "r", "--shard", "3/2"], 2, ["--shard 3/2"]),
    # usage
    "usage-missing-argument": lambda t, e: Case(["run"], 2, ["cai run", "config"]),
    "usage-unknown-command": lambda t, e: Case(["bogus"], 2, ["bogus", "invalid choice"]),
    # cai check
    "check-missing-path": lambda t, e: Case(["check", str(t / "nothing")], 2, ["nothing", "path not found"]),
    "check-not-a-model-dir": lambda t, e: (t.joinpath("stuff").mkdir(), t.joinpath("stuff", "a.txt").write_text("x"),
                                           Case(["check", "stuff"], 2, ["stuff", "not a model, artifact or run"]))[2],
    "check-remote-code-model": lambda t, e: Case(["check", model_dir(t, e, weights=b"x", config_update=REMOTE)], 2,
                                                 ["config.json", "auto_map", "modeling_x"]),
    "check-not-utf8-jsonl": lambda t, e: Case(["check", ifeval_prompts(t, "d.jsonl", b'{"id": "caf\xe9"}\n')], 2,
                                              ["d.jsonl:1", "UTF-8"]),
    "check-truncated-jsonl": lambda t, e: Case(["check", ifeval_prompts(t, "d.jsonl", b'{"id": 1}\n{"id": \n')], 2,
                                               ["d.jsonl:2", "invalid JSON"]),
    "check-unknown-file-kind": lambda t, e: (t.joinpath("n.txt").write_text("x"),
                                             Case(["check", "n.txt"], 2, ["n.txt", "cannot check this file"]))[1],
    # cai score
    "score-prompts-missing": lambda t, e: Case(["score", "--prompts", "p.jsonl", "--responses", "r.jsonl"], 2,
                                               ["p.jsonl", "not found"]),
    "score-prompts-not-utf8": lambda t, e: Case(["score", "--prompts", ifeval_prompts(t, text=b'{"key": "\xff"}\n'),
                                                 "--responses", ifeval_prompts(t, "r.jsonl")], 2, ["prompts.jsonl:1", "UTF-8"]),
    "score-prompts-empty": lambda t, e: Case(["score", "--prompts", ifeval_prompts(t, text=b""),
                                              "--responses", ifeval_prompts(t, "r.jsonl")], 2, ["prompts.jsonl", "no records"]),
    "score-response-without-text": lambda t, e: Case(["score", "--prompts", ifeval_prompts(t), "--responses",
                                                      ifeval_prompts(t, "r.jsonl", b'{"key": 1}\n')], 2,
                                                     ["r.jsonl:1", "response"]),
    # cai preflight: the same validation as cai run, before its report directory exists
    "preflight-eval-set-missing": lambda t, e: Case(["preflight", write_config(t, eval={"sets": ["nope"]}), "--out", "pf"], 2,
                                                    ["cfg.yaml", "eval.sets[0]", "nope"]),
    "preflight-out-is-a-file": lambda t, e: (t.joinpath("f").write_text("x"),
                                             Case(["preflight", write_config(t), "--out", "f/pf"], 2,
                                                  ["--out f/pf", "not a directory"]))[1],
    # cai report
    "report-empty-dir": lambda t, e: (t.joinpath("empty").mkdir(), Case(["report", "empty"], 2, ["empty", "not a cai run"]))[1],
}


def run_case(tmp: Path, case: Case, timeout: float = 180) -> subprocess.CompletedProcess:
    before = listing(tmp)
    proc = subprocess.run(case.runner + case.argv, cwd=tmp, env={**ENV, "PYTHONPATH": str(REPO), **case.env},
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if case.progress:
        lines = [ln for ln in lines if not ln.startswith("[cai]")]
    assert proc.returncode == case.code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
    after = listing(tmp)
    assert after - before == case.new, "files written where none should be"
    assert before - after == case.gone, "files removed"
    return proc


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_writes_nothing(name, tmp_path, embedded_model_dir):
    case = BAD_INPUT[name](tmp_path, embedded_model_dir)
    if name == "device-cuda-without-gpu":
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    run_case(tmp_path, case)


def test_unwritable_out_is_refused_before_anything_is_written(tmp_path, mounts):
    parent = unwritable(tmp_path, mounts)
    run_case(tmp_path, Case(["run", write_config(tmp_path), "--out", f"{parent}/run"], 2,
                            [f"--out {parent}/run", "cannot write"]))


# --------------------------------------------------------------------------- faults after validation


def test_disk_full_during_a_stage_names_the_stage(tmp_path, mounts):
    """A full disk mid-stage is the machine's fault (exit 4), said with the stage; the run
    directory keeps what it had (resume continues it)."""
    cfg = write_config(tmp_path, instructions={"source": "templates", "n": 4}, critic={"enabled": False})
    case = Case(["run", cfg, "--out", "disk/run"], 4, ["stage candidates", "No space left on device", "ENOSPC", "--resume"],
                progress=True)
    if not mounts(tmp_path / "disk", "size=8k"):  # 2 pages: run.json and the stage manifest fit, its data does not
        case.runner = patched(  # no tmpfs here: the run's record writes fail with ENOSPC instead
            "import errno, builtins\nfrom cai.pipeline import store\n"
            "def full(path, mode='r', *a, **k):\n"
            "    if 'a' in mode and '/candidates/' in str(path):\n"
            "        raise OSError(errno.ENOSPC, 'No space left on device', str(path))\n"
            "    return builtins.open(path, mode, *a, **k)\n"
            "store.open = full")
    proc = subprocess.run(case.runner + case.argv, cwd=tmp_path, env={**ENV, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=180)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("[cai]")]
    assert proc.returncode == 4 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert all(n in lines[0] for n in case.needles), lines[0]
    assert (tmp_path / "disk" / "run" / "run.json").is_file()


def test_out_of_memory_names_stage_batch_size_and_what_to_lower(tmp_path):
    """torch.OutOfMemoryError in a stage: exit 5 (not 2, "bad input"), one line of its own
    after the progress bar the stage left open."""
    cfg = write_config(tmp_path, instructions={"batch_size": 4})
    case = Case(["run", cfg, "--out", "run"], 5, ["stage candidates", "out of cpu memory", "instructions.batch_size = 4",
                                                 "lower instructions.batch_size", "--resume"],
                runner=patched(GENERATE_RAISES.format("torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2 GiB')")),
                env={"TQDM_DISABLE": "0"}, progress=True)
    before = listing(tmp_path)
    proc = subprocess.run(case.runner + case.argv, cwd=tmp_path, env={**ENV, "PYTHONPATH": str(REPO), **case.env},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 5 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [ln for ln in proc.stderr.split("\n") if ln.startswith("cai run:")]
    assert len(error) == 1 and all(n in error[0] for n in case.needles), proc.stderr[-3000:]
    assert {p.split("/")[0] for p in listing(tmp_path) - before} == {"run"}


def test_internal_error_points_to_a_log_with_the_traceback(tmp_path):
    """An unexpected exception is exit 3 "internal error" with the log's path, never "bad input"."""
    from cai.pipeline.models import cache_root

    cfg = write_config(tmp_path, model={"cache_dir": str(cache_root())})  # the converted model; logs go elsewhere
    case = Case(["run", cfg, "--out", "run"], 3, ["internal error", "ValueError: boom", "not bad input"],
                runner=patched(GENERATE_RAISES.format("ValueError('boom')")), env={"CAI_CACHE_DIR": str(tmp_path / "cache")},
                progress=True)
    proc = subprocess.run(case.runner + case.argv, cwd=tmp_path, env={**ENV, "PYTHONPATH": str(REPO), **case.env},
                          capture_output=True, text=True, timeout=180)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("[cai]")]
    assert proc.returncode == 3 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert all(n in lines[0] for n in case.needles), lines[0]
    log = Path(lines[0].rsplit("traceback in ", 1)[1])
    assert log.parent == tmp_path / "cache" / "logs"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ValueError: boom" in text


def test_a_start_that_fails_before_its_first_stage_leaves_nothing_and_restarts(tmp_path, embedded_model_dir):
    """A checkpoint whose weights do not load passes validation and fails at load: exit 2,
    and the run directory it had created is gone. A start killed before its first stage
    (SIGKILL: no cleanup) is started again by the same command, not "exists and is not empty"."""
    src = model_dir(tmp_path, embedded_model_dir, weights=b"not safetensors")
    cfg = write_config(tmp_path, model={"source": src})
    run_case(tmp_path, Case(["run", cfg, "--out", "run"], 2, ["cannot load model", "ckpt"], progress=True))

    cfg = write_config(tmp_path, "tiny.yaml")
    killed = subprocess.run(patched("import os, signal\nfrom cai.pipeline import models\n"
                                    "models.load_model = lambda cfg: os.kill(os.getpid(), signal.SIGKILL)")
                            + ["run", cfg, "--out", "run"], cwd=tmp_path, env={**ENV, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=180)
    assert killed.returncode == -signal.SIGKILL and (tmp_path / "run" / "run.json").is_file(), killed.stderr[-2000:]
    interrupt = patched("from cai.pipeline import models\n"
                        "def stop(cfg):\n    raise KeyboardInterrupt\nmodels.load_model = stop")
    proc = run_case(tmp_path, Case(["run", cfg, "--out", "run"], 130, ["interrupted"], runner=interrupt, progress=True,
                                   gone={"run/run.json", "run/.owner.lock"}))
    assert "stages to run: candidates" in proc.stderr  # it started again; Ctrl-C then left nothing behind
    assert listing(tmp_path / "run") == set()


# --------------------------------------------------------------------------- pytest suites/ and children


def test_pytest_suites_refuses_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "suites"), "--cai-run", str(tmp_path / "mine"),
                           "-q", "-p", "no:cacheprovider"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "not a cai run" in proc.stdout + proc.stderr
    assert listing(tmp_path / "mine") == {"notes.txt"}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie is dead, waiting for a reaper (PID 1 in a container may never reap)


def _orphan_after_parent_sigkill(tmp_path: Path, spawn: str) -> int:
    """Start a parent that runs a sleeping child via `spawn` (code calling it with `cmd`),
    SIGKILL the parent, return the child's pid."""
    pidfile = tmp_path / f"child-{spawn.split('(')[0]}.pid"
    child = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys\nfrom cai.pipeline.runner import run_child\n"
                               f"cmd = [sys.executable, '-c', {child!r}]\n{spawn}"], cwd=REPO, env=ENV)
    deadline = time.monotonic() + 60
    while not (pidfile.is_file() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    return int(pidfile.read_text())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_evaluation_child_dies_with_a_sigkilled_parent(tmp_path):
    """`cai run` spawns `pytest suites/` through run_child; that child once kept running after
    its parent was SIGKILLed. A plain subprocess.run child (the control) survives the same kill."""
    plain = _orphan_after_parent_sigkill(tmp_path, "subprocess.run(cmd)")
    try:
        time.sleep(1.0)
        assert _alive(plain), "control: a plain child outlives its killed parent"
    finally:
        if _alive(plain):
            os.kill(plain, signal.SIGKILL)
    child = _orphan_after_parent_sigkill(tmp_path, "run_child(cmd)")
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "run_child's child outlived its SIGKILLed parent"


# --------------------------------------------------------------------------- the exit-code table


def test_readme_documents_every_exit_code():
    """README "Exit codes" lists every code cai can return (cai.cli.EXIT_CODES) and those of
    `pytest suites/` (pytest's 0-5, the gate's 8 OR-ed in)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`") for line in section.splitlines() if line.startswith("| ")}
    assert {str(c) for c in EXIT_CODES} <= rows, rows
    assert {"0", "1", "2", "3", "4", "5", "8", "9"} <= rows
