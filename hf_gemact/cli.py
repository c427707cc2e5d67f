"""`hf-gemact` command line: one subcommand per job, each defined next to the code it drives."""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> that module defines `add_subcommands(subparsers)`; each subparser sets `func`.
COMMAND_MODULES = [
    "hf_gemact.plotting",
    "hf_gemact.surgery_cli",
    "hf_gemact.sweep",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-gemact", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_path in COMMAND_MODULES:
        importlib.import_module(module_path).add_subcommands(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
