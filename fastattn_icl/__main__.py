"""Command line: ``python -m fastattn_icl reproduce [--model smollm2|PATH] [--tasks ...] [--out DIR] [--quick]``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn_icl", description="fastattn_icl command line")
    commands = parser.add_subparsers(dest="command", required=True)
    from fastattn_icl.lab import reproduce

    reproduce.build_parser(commands.add_parser("reproduce", help="reproduce the papers' findings on a real model"))
    args, _ = parser.parse_known_args(argv)
    rest = sys.argv[2:] if argv is None else argv[1:]
    if args.command == "reproduce":
        return reproduce.main(rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
