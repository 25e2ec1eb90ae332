"""The `cai` command. Arguments are declared here (the CLI is a stable contract);
each subcommand's work lives in its module's `cli_main(args) -> int`, imported lazily
so `cai --help` stays fast.

This is also the one error boundary: whatever a subcommand raises ends here as one line on
stderr and an exit code from `EXIT_CODES` (README, "Exit codes"). Expected failures say what
and where; anything else is an internal error whose traceback goes to a log file, so that a
bug is never reported as the user's bad input.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

from cai.errors import CaiError, describe_os_error, os_error_in

# subcommand -> module that implements `cli_main(args) -> int`
HANDLERS = {
    "run": "cai.pipeline.runner",
    "train": "cai.pipeline.train_cli",
    "preflight": "cai.audit.preflight",
    "audit": "cai.audit.cli",
    "check": "cai.invariants.check",
    "score": "cai.pipeline.evaluate",
    "report": "cai.harness.report",
    "compare": "cai.pipeline.compare_cli",
}

EXIT_CODES = {  # code -> (what it means, more)
    0: ("success", "every check ran and passed"),
    1: ("a check failed", "an error-severity invariant (the run is VOID), error findings, a stage short of its target"),
    2: ("bad input", "config, command line, path, data file or run directory; one line naming file, line or key"),
    3: ("internal error", "a bug in cai, not bad input; the line names the log file holding the traceback"),
    4: ("the machine refused", "disk full, permission denied, read-only file system; a run continues with --resume"),
    5: ("out of memory", "the line names the stage, the batch size in use and what to lower"),
    130: ("interrupted", "Ctrl-C; a run continues with --resume"),
}
BAD_INPUT, INTERNAL_ERROR, ENVIRONMENT, OUT_OF_MEMORY, INTERRUPTED = 2, 3, 4, 5, 130


class Parser(argparse.ArgumentParser):
    """Usage errors in one line too (argparse prints the whole usage block)."""

    def error(self, message: str):
        self.exit(BAD_INPUT, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cai",
        description="Post-train a base LM into an instruction follower; runs count only when invariants pass.",
        epilog="Exit codes: " + ", ".join(f"{code} {name}" for code, (name, _) in EXIT_CODES.items()) + " (README: Exit codes).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the whole pipeline, gated")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--out", help="output directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--shard", help="I/N: run shard I of N of the data stages")

    p = sub.add_parser("train", help="SFT then DPO of a run's certified data (also under accelerate launch)")
    importlib.import_module("cai.pipeline.train_cli").add_arguments(p)

    p = sub.add_parser("preflight", help="rehearse every stage on a small sample; project cost")
    p.add_argument("config")
    p.add_argument("--sample", type=int, default=None, help="items per stage in the rehearsal")
    p.add_argument("--target", type=int, default=15000, help="examples to project for")
    p.add_argument("--out", help="report directory (default: reports/preflight)")

    p = sub.add_parser("audit", help="static audit of a training codebase")
    importlib.import_module("cai.audit.cli").add_arguments(p)

    p = sub.add_parser("check", help="invariants on a model dir / GGUF file, a JSONL file, or a run dir")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--format", choices=["text", "json"], default="text")

    p = sub.add_parser("score", help="canonical IFEval-style scoring of responses made anywhere")
    p.add_argument("--prompts", required=True, help="JSONL: key, prompt, instruction_id_list, kwargs")
    p.add_argument("--responses", required=True, help="JSONL: prompt (or key), response")
    p.add_argument("--format", choices=["text", "json"], default="text")

    p = sub.add_parser("compare", help="paired statistics + artifact diagnostics for per-item verdicts made anywhere")
    importlib.import_module("cai.pipeline.compare_cli").add_arguments(p)

    p = sub.add_parser("report", help="rebuild a run's report")
    p.add_argument("run_dir")
    return parser


def write_crash_log(err: BaseException, argv: list[str]) -> Path:
    """The traceback of an unexpected exception, in `$CAI_CACHE_DIR/logs` (the cai cache,
    ~/.cache/cai by default) or, if that cannot be written, the temp directory. Not the run
    directory: it may be what failed."""
    from cai.pipeline.models import cache_root

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = f"cai {' '.join(argv)}\n\n" + "".join(traceback.format_exception(err))
    for directory in (cache_root() / "logs", Path(tempfile.gettempdir())):
        path = directory / f"cai-crash-{stamp}-{os.getpid()}.log"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        except OSError:
            continue
    raise err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def failure(err: BaseException, command: str, argv: list[str]) -> tuple[int, str]:
    """(exit code, the one stderr line) for an exception that reached the boundary."""
    prefix = f"cai {command}: error: "
    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED, f"cai {command}: interrupted" + ("; continue with --resume" if command == "run" else "")
    if isinstance(err, CaiError):
        return err.exit_code, prefix + _first_line(err)
    torch = sys.modules.get("torch")  # an out-of-memory error from torch means torch is loaded
    if isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError)):
        return OUT_OF_MEMORY, prefix + f"out of memory ({_first_line(err)[:160]}); lower the batch size"
    if (os_err := os_error_in(err)) is not None:
        return ENVIRONMENT, prefix + describe_os_error(os_err)
    if isinstance(err, UnicodeDecodeError):
        return BAD_INPUT, prefix + f"input is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
    if isinstance(err, json.JSONDecodeError):
        return BAD_INPUT, prefix + f"invalid JSON ({err.msg}, line {err.lineno} column {err.colno})"
    log = write_crash_log(err, argv)
    return INTERNAL_ERROR, (f"cai {command}: internal error ({type(err).__name__}: {_first_line(err)[:160]}); "
                            f"a bug in cai, not bad input; traceback in {log}")


def close_progress_bars() -> None:
    """Close the tqdm bars a failed stage left open: each ends its line, so the error line
    that follows is a line of its own (a bar redraws with carriage returns, no newline)."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(tqdm.tqdm._instances):
            bar.close()


def main(argv: list[str] | None = None) -> int:
    from cai.invariants.offline import enforce_offline

    enforce_offline()  # cai never downloads: set before transformers / huggingface_hub are imported
    argv = sys.argv[1:] if argv is None else argv
    args = make_parser().parse_args(argv)
    module_name = HANDLERS[args.command]
    if importlib.util.find_spec(module_name) is None:
        print(f"cai {args.command}: not built yet ({module_name} is missing)", file=sys.stderr)
        return INTERNAL_ERROR
    try:
        return int(importlib.import_module(module_name).cli_main(args))
    except (Exception, KeyboardInterrupt) as err:
        code, line = failure(err, args.command, argv)
        close_progress_bars()
        print(line, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
