"""The `cai` command. Arguments are declared here (the CLI is a stable contract);
each subcommand's work lives in its module's `cli_main(args) -> int`, imported lazily
so `cai --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from cai.errors import CaiError

# subcommand -> module that implements `cli_main(args) -> int`
HANDLERS = {
    "run": "cai.pipeline.runner",
    "preflight": "cai.audit.preflight",
    "audit": "cai.audit.static",
    "check": "cai.invariants.check",
    "score": "cai.pipeline.evaluate",
    "report": "cai.harness.report",
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cai",
        description="Post-train a base LM into an instruction follower; runs count only when invariants pass.",
        epilog="Exit codes: 0 all pass, 1 an invariant failed / error findings, 2 bad input.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the whole pipeline, gated")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--out", help="output directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--shard", help="I/N: run shard I of N of the data stages")

    p = sub.add_parser("preflight", help="rehearse every stage on a small sample; project cost")
    p.add_argument("config")
    p.add_argument("--sample", type=int, default=None, help="items per stage in the rehearsal")
    p.add_argument("--target", type=int, default=15000, help="examples to project for")
    p.add_argument("--out", help="report directory (default: reports/preflight)")

    p = sub.add_parser("audit", help="static audit of a training codebase")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--format", choices=["text", "json", "sarif"], default="text")

    p = sub.add_parser("check", help="invariants on a model dir / GGUF file, a JSONL file, or a run dir")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--format", choices=["text", "json"], default="text")

    p = sub.add_parser("score", help="canonical IFEval-style scoring of responses made anywhere")
    p.add_argument("--prompts", required=True, help="JSONL: key, prompt, instruction_id_list, kwargs")
    p.add_argument("--responses", required=True, help="JSONL: prompt (or key), response")
    p.add_argument("--format", choices=["text", "json"], default="text")

    p = sub.add_parser("report", help="rebuild a run's report")
    p.add_argument("run_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    from cai.invariants.offline import enforce_offline

    enforce_offline()  # cai never downloads: set before transformers / huggingface_hub are imported
    args = make_parser().parse_args(argv)
    module_name = HANDLERS[args.command]
    if importlib.util.find_spec(module_name) is None:
        print(f"cai {args.command}: not built yet ({module_name} is missing)", file=sys.stderr)
        return 2
    handler = importlib.import_module(module_name).cli_main
    try:
        return int(handler(args))
    except CaiError as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"cai {args.command}: error: {first_line}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"cai {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
