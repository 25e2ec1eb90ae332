"""Arguments of `cai audit` and its `cli_main`. Kept free of heavy imports: `cai --help`
builds this parser. The flags follow ruff's where ruff has one (docs/audit.md)."""

from __future__ import annotations

import argparse
import sys


def _ids(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--format", choices=["text", "json", "sarif"], default="text")
    p.add_argument("--show-fixes", action="store_true", help="text: print why and the fix under each finding")
    p.add_argument("--statistics", action="store_true", help="text: a count per rule after the findings")
    p.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="skip files matching (root-relative, repeatable)"
    )
    p.add_argument("--select", type=_ids, action="extend", default=[], metavar="IDS", help="only these rules/categories")
    p.add_argument("--ignore", type=_ids, action="extend", default=[], metavar="IDS", help="not these rules/categories")
    p.add_argument("--severity", choices=["warning", "error"], default="warning", help="lowest severity reported")
    p.add_argument("--baseline", metavar="FILE", help="a previous --format json output: report only new findings")
    p.add_argument("--exit-zero", action="store_true", help="exit 0 even with error findings (bad input is still 2)")


def cli_main(args) -> int:
    from cai.audit.static import audit, render

    result = audit(
        list(args.paths),
        exclude=args.exclude,
        select=args.select,
        ignore=args.ignore,
        severity=args.severity,
        baseline=args.baseline,
    )
    sys.stdout.write(render(result, args.format, show_fixes=args.show_fixes, statistics=args.statistics) + "\n")
    return 0 if args.exit_zero else result.exit_code
