"""`hf-gemact` command line: one subcommand per job, each defined next to the code it drives."""

from __future__ import annotations

import argparse
import importlib
import re
import sys

# module path -> that module defines `add_subcommands(subparsers)`; each subparser sets `func`.
COMMAND_MODULES = [
    "hf_gemact.plotting",
    "hf_gemact.surgery_cli",
    "hf_gemact.sweep",
    "hf_gemact.tables",
]


class CommandError(Exception):
    """A failure the user can fix (a bad path, flag value or checkpoint): `main` prints its message,
    one line naming the path or flag and the problem, and returns 2."""


# NAME or ORG/NAME: what from_pretrained and load_dataset take for an id on the Hub
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?\Z")


def one_line(err) -> str:
    """An error's message on one line of at most 300 characters, for a CommandError."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _failure(err: BaseException):
    """(one-line message, exit code) for the errors a command is expected to raise, else None:
    unexpected errors (bugs) keep their traceback."""
    from .hub import HubError
    from .registry import UnknownActivationError
    from .surgery import SurgeryError

    lines = str(err).strip().splitlines() or [type(err).__name__]
    if isinstance(err, UnknownActivationError):
        return f"{lines[0]} (hf_gemact.grammar_help() lists the name grammar)", 2
    if isinstance(err, (CommandError, SurgeryError)):
        return " ".join(" ".join(lines).split()), 2
    if isinstance(err, HubError):  # the environment failed, not the input
        return " ".join(" ".join(lines).split()), 1
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-gemact", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_path in COMMAND_MODULES:
        importlib.import_module(module_path).add_subcommands(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except Exception as err:
        failure = _failure(err)
        if failure is None:
            raise
        message, code = failure
        print(f"hf-gemact {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    # run the importable module's main, so that errors raised as hf_gemact.cli.CommandError by the
    # subcommands are the class main() catches (under -m this file is also loaded as __main__)
    sys.exit(importlib.import_module("hf_gemact.cli").main())
