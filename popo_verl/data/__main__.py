"""``python -m popo_verl.data prepare --out DATA_DIR [--sources ...] [--local NAME=PATH ...] [--limit N] [--prompt-style S]``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from popo_verl.data.prepare import DEFAULT_PROMPT_STYLE, PROMPT_STYLES, prepare
from popo_verl.data.sources import SOURCES


def _parse_local(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(f"--local expects NAME=PATH, got {item!r}")
        if name not in SOURCES:
            raise argparse.ArgumentTypeError(f"--local: unknown source {name!r} (known: {', '.join(SOURCES)})")
        out[name] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m popo_verl.data", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write verl RL parquet files for the train set and benchmarks")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--sources",
        nargs="+",
        default=list(SOURCES),
        choices=list(SOURCES),
        metavar="SOURCE",
        help=f"sources to build (default: all of {' '.join(SOURCES)})",
    )
    p.add_argument(
        "--local",
        nargs="+",
        action="extend",
        default=[],
        metavar="SOURCE=PATH",
        help="read SOURCE from a local parquet/json/jsonl/csv file or directory instead of the hub",
    )
    p.add_argument("--limit", type=int, default=None, help="keep the first N rows of each source")
    p.add_argument(
        "--prompt-style",
        default=DEFAULT_PROMPT_STYLE,
        choices=list(PROMPT_STYLES),
        help="system: the reference's system prompt ('Please reason step by step, and put your final answer within "
        "\\boxed{}.') and the bare problem; suffix: the instruction after the problem, no system message; bare: the "
        "problem only, the run's chat template adds its model family's instruction (default: %(default)s)",
    )
    p.add_argument("--template", default=None, help="user-turn template with {problem} (default: the prompt style's)")
    sub.add_parser("list", help="list the known sources and their hub copies")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for s in SOURCES.values():
            print(f"{s.name:14s} {s.split:5s} data_source={s.data_source:14s} hub: {', '.join(map(str, s.hub))}")
        return 0
    try:
        local = _parse_local(args.local)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if args.limit is not None and args.limit <= 0:
        ap.error("--limit must be positive")
    try:
        prepare(args.out, args.sources, local=local, limit=args.limit, template=args.template,
                prompt_style=args.prompt_style)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
