"""The ``leanconv`` command line: one subcommand per module in ``leanconv.commands``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches, so ``--help`` stays fast and a
command's heavy imports happen only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["main", "build_parser"]

# Module names under leanconv.commands, in the order --help lists them.
COMMANDS = [
    "profile",
    "bench",
    "convert",
    "export",
    "train",
    "distill",
    "evaluate",
    "compare",
    "reproduce",
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="leanconv",
        description="Exact, fast HetConv / DSC / BSConv convolutions: profile, convert, export, train, compare.",
    )
    parser.add_argument("--version", action="version", version=f"leanconv {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        module = importlib.import_module(f"leanconv.commands.{module_name}")
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def _stop_writing_stdout() -> None:
    """After a BrokenPipeError (``leanconv ... | head``): send what is left
    of stdout to /dev/null, so that flushing at exit raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        try:
            return int(args._run(args) or 0)
        except (ValueError, TypeError, FileNotFoundError) as error:
            # Argument and data errors: one clear line, no traceback.
            print(f"leanconv {args.command}: error: {error}", file=sys.stderr)
            return 2
    except BrokenPipeError:  # the reader went away (e.g. `| head`): nothing left to say
        _stop_writing_stdout()
        return 0


if __name__ == "__main__":
    sys.exit(main())
