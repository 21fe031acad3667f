"""``kedit`` command line: one subcommand per module under ``kedit.commands``.

Every subcommand is a thin layer over the Python API; ``--json`` output goes to stdout and
human-readable progress to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kedit.errors import KeditError

# subcommand name -> module in kedit.commands exposing add_arguments(parser) and run(args) -> int
COMMANDS = {
    "demo": "Edit a handful of facts on the default model, show before/after, undo.",
    "stats": "Compute (or find cached) second-moment statistics of W_out inputs.",
    "edit": "Edit facts in a model and show before/after; optionally save the patch.",
    "apply": "Apply a saved edit patch to a model and show its effect.",
    "eval": "Evaluate an editing method on CounterFact / zsRE / kedit datasets.",
    "compare": "Compare evaluation runs side by side.",
    "layers": "Choose editing layers: LGA, brute force, causal tracing.",
    "export": "Apply a patch and write the edited model as a plain sharded safetensors checkpoint.",
    "plan": "Print the peak memory of each phase of an edit from the model's config (nothing loaded).",
}


def _module(name: str):
    return importlib.import_module(f"kedit.commands.{name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kedit", description="Locate-then-edit knowledge editing.")
    sub = parser.add_subparsers(dest="command", required=True)
    available = {}
    for name, help_text in COMMANDS.items():
        try:
            mod = _module(name)
        except ModuleNotFoundError as e:
            if e.name == f"kedit.commands.{name}":
                continue  # subcommand not built yet
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        available[name] = mod
    args = parser.parse_args(argv)
    try:
        return int(available[args.command].run(args) or 0)
    except KeditError as e:
        print(f"kedit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
