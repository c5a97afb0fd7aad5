"""The ``torchnde`` command line.

``torchnde <command> [options]``; ``torchnde --help`` lists the commands. Each command lives in its
own module of this package, named in :data:`COMMANDS`, and provides:

* ``HELP``: a one-line summary for ``torchnde --help``;
* ``add_arguments(parser)``: its options, on the subparser ``torchnde <command>`` creates;
* ``run(args) -> int``: the command itself, returning the exit status.

A command reports bad input and failures by raising; :func:`main` turns every such error into one
``torchnde <command>: error: ...`` line on stderr and the exit status of
:func:`torchnde.cli._errors.exit_status` (2 for bad input, 1 for a failure while running, 130 when
interrupted), with no traceback unless ``TORCHNDE_TRACEBACK=1`` is set.

Adding a command (``train``, ``sample``, ``evaluate``, ``bench``, ...) is one module plus one entry
in :data:`COMMANDS`. Optional dependencies (matplotlib, tqdm) are imported by the commands that
need them, through :func:`torchnde.cli._deps.require`, so ``import torchnde.cli`` and
``torchnde --help`` work without the ``[cli]`` extra.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from ._deps import INSTALL_HINT
from ._errors import describe, exit_status

__all__ = ["COMMANDS", "build_parser", "main"]

#: Subcommand name -> module (relative to this package) implementing it.
COMMANDS: dict[str, str] = {
    "demo": ".demo",
    "train": ".train",
    "sample": ".sample",
    "evaluate": ".evaluate",
}

PROG = "torchnde"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors point to ``--help``."""

    def error(self, message):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        self.exit(
            2, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for the available commands and options.\n"
        )


def _version() -> str:
    from torchnde import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The full parser: global options plus one subparser per entry of :data:`COMMANDS`."""
    parser = _Parser(
        prog=PROG,
        description="torchnde: neural differential equations in PyTorch.",
        epilog=f"Plotting and progress bars need the CLI extras: {INSTALL_HINT}",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands", parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name, __name__)
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``torchnde`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Invalid arguments, ``--help`` and ``--version`` exit through ``SystemExit`` as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    prog = f"{PROG} {args.command}"
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt as e:  # train's says which step it saved and how to resume
        print(f"\n{prog}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:
        status = exit_status(e)
        if status is None or os.environ.get("TORCHNDE_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
