"""``kedit`` command line: one subcommand per module under ``kedit.commands``, one error boundary.

Every subcommand is a thin layer over the Python API; ``--json`` output goes to stdout, progress and
logs to stderr. Errors: a mistake the user can fix (bad flag, missing or unreadable file, invalid input,
any KeditError) is one line ``kedit CMD: error: ...`` and exit 2; anything else is one line plus a hint
to rerun with ``--debug`` (exit 1); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path
from types import ModuleType, TracebackType

from kedit._version import __version__
from kedit.errors import KeditError

# subcommand name -> help; module kedit.commands.<name> exposes add_arguments(parser) and run(args) -> int
COMMANDS = {
    "demo": "Edit a handful of facts on the default model, show before/after, undo.",
    "stats": "Compute (or find cached) second-moment statistics of W_out inputs.",
    "edit": "Edit facts in a model and show before/after; optionally save the patch.",
    "apply": "Apply a saved edit patch to a model and show its effect.",
    "eval": "Evaluate an editing method on CounterFact / zsRE / kedit datasets.",
    "compare": "Compare evaluation runs side by side.",
    "layers": "Choose editing layers: LGA, brute force, causal tracing.",
    "cache": "List or clear kedit's caches (statistics, templates, corpus, models) and their sizes.",
    "export": "Apply a patch and write the edited model as a plain sharded safetensors checkpoint.",
    "plan": "Print the peak memory of each phase of an edit from the model's config (nothing loaded).",
}


class Parser(argparse.ArgumentParser):
    """Usage errors as one line ``PROG: error: MESSAGE`` (plus where to find help), exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"kedit.commands.{name}")


def build_parser() -> tuple[Parser, dict[str, ModuleType]]:
    """The ``kedit`` parser with every subcommand, and the subcommand modules by name."""
    from kedit.commands._common import HelpFormatter

    parser = Parser(prog="kedit", description="Locate-then-edit knowledge editing.", formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"kedit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    # the same flags after the subcommand; SUPPRESS keeps a value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an unexpected error (default: off)")
    common.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bars or log lines on stderr (default: off)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    modules = {}
    for name, help_text in COMMANDS.items():
        mod = _module(name)
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                           formatter_class=HelpFormatter)
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def _culprit(tb: TracebackType | None) -> str | None:
    """The innermost file path a frame of the failing call was working on (for errors that lack one)."""
    found = None
    while tb is not None:
        for name in ("path", "file", "filename", "name_or_path"):
            value = tb.tb_frame.f_locals.get(name)
            if isinstance(value, str | Path) and str(value):
                found = str(value)
                break
        tb = tb.tb_next
    return found


def describe_error(e: BaseException) -> str | None:
    """One line for a failure the user can fix, or None for an unexpected one."""
    if isinstance(e, KeditError):
        return str(e)
    if isinstance(e, UnicodeDecodeError):
        where = _culprit(e.__traceback__)
        return (f"{where or 'an input file'} is not UTF-8 text ({e.reason} at byte {e.start}); "
                "convert it to UTF-8")
    kinds = {FileNotFoundError: "no such file or directory", PermissionError: "permission denied",
             IsADirectoryError: "is a directory, expected a file",
             NotADirectoryError: "a component of the path is not a directory"}
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {kinds.get(type(e), e.strerror or str(e))}"
    if type(e) in kinds:  # raised by kedit with the path in its message
        return str(e) or kinds[type(e)]
    if isinstance(e, ValueError):  # input validation (dataclass checks, JSON, registries) says what was wrong
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    """Run ``kedit`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--version"]:  # without building the subcommands (no torch import)
        print(f"kedit {__version__}")
        return 0
    parser, modules = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: already printed
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    cmd = args.command
    try:
        from kedit.commands._common import validate

        validate(args)
        return int(modules[cmd].run(args) or 0)
    except KeyboardInterrupt:
        print(f"\nkedit {cmd}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `kedit ... --json | head`: nothing left to tell
        return 1
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        message = describe_error(e)
        if message is not None:
            print(f"kedit {cmd}: error: {message}", file=sys.stderr)
            return 2
        first = (str(e).splitlines() or [""])[0]
        print(f"kedit {cmd}: unexpected error: {type(e).__name__}: {first}"
              + ("" if args.debug else " (rerun with --debug for the traceback)"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
