"""Flags, validation and printing shared by the subcommands: every flag is declared here once.

Flag groups: model loading (``add_model_args``), layers (``add_layers_arg``), method / targets /
solver hyperparameters (``add_solver_args``), statistics (``add_stats_args``), anchors
(``add_anchor_args``); ``add_editor_args`` combines the last four. Values are parsed and range-checked
by argparse types (one-line errors, exit 2); ``validate`` checks what needs no model (device, solver
hyperparameters, writable outputs) before any expensive work, ``check_layers`` right after loading.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from kedit.errors import NotWritable, UsageError
from kedit.requests import EditRequest

# -- help ---------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every help text, except where the text already says its default or
    there is no value to show (``None`` defaults explain themselves in the text, flags default to off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


# -- value types (argparse calls them; ArgumentTypeError becomes a one-line usage error) --------------


def _number(kind: type, low: float, inclusive: bool):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or (value < low if inclusive else value <= low):  # NaN too
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, 0, inclusive=False)
nonneg_int = _number(int, 0, inclusive=True)
positive_float = _number(float, 0.0, inclusive=False)
nonneg_float = _number(float, 0.0, inclusive=True)
at_least_2 = _number(int, 2, inclusive=True)


def parse_layers(text: str, allow_auto: bool = True) -> list[int] | str:
    """THE layer grammar: ``4-8``, ``4,5,6``, ``4-6,9`` (inclusive ranges, any mix) -> sorted unique
    indices; ``auto`` -> ``"auto"`` where allowed. Raises ArgumentTypeError naming the bad part."""
    text = text.strip()
    if text == "auto":
        if not allow_auto:
            raise argparse.ArgumentTypeError("'auto' is not accepted here; give layers like 4-8 or 4,5,6")
        return "auto"
    layers: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not a layer index or a range: use e.g. 4-8, 4,5,6, 4-6,9" +
                (" or auto" if allow_auto else ""))
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:
            raise argparse.ArgumentTypeError(f"range {part!r} is reversed: write {hi}-{lo}")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def layer_list(text: str) -> list[int]:
    """``parse_layers`` without ``auto`` (explicit layers only)."""
    return parse_layers(text, allow_auto=False)  # type: ignore[return-value]


def parse_scalar(text: str) -> Any:
    """A flag value as the type it reads as: true/false, int, float, JSON (lists, objects, null) or text."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return json.loads(text)
    except ValueError:
        return text


def hparam(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` -> (name, parsed value); names may be dotted (``base.lam``)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)?", name):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. lam=20000 or base.lam=5000)")
    return name, parse_scalar(value)


# -- flag groups ----------------------------------------------------------------------------------------

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Which model and how to load it (passed to kedit.load_model only when set)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2-135m",
                   help="embedded name, HF model directory, .gguf file or hub id (downloaded when the environment "
                        "allows, else taken from the local HF cache)")
    g.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weight dtype; 'auto' keeps the checkpoint's (default: the checkpoint's; float32 for the "
                        "embedded model)")
    g.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or mps (default: the loader's, cpu unless --device-map places the model)")
    g.add_argument("--device-map", default=None,
                   help="place layers across devices: auto, balanced, balanced_low_0, sequential, a JSON object "
                        "{module: device} or a path to a JSON file with one (default: one device)")
    g.add_argument("--max-memory", default=None,
                   help="per-device memory cap for --device-map, e.g. 0=20GiB,cpu=60GiB (default: no cap)")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of a hub id (default: main)")
    g.add_argument("--offload-folder", default=None,
                   help="folder for weights --device-map offloads to disk (default: none)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code shipped with the checkpoint (default: off)")


def add_layers_arg(p: argparse.ArgumentParser, *, required: bool = False, allow_auto: bool = True,
                   help: str | None = None) -> None:
    """``--layers`` in the one grammar (``parse_layers``)."""
    grammar = "4-8, 4,5,6 or 4-6,9" + (", or 'auto' (verified selection on the packaged facts, cached per model, "
                                       "method and targets)"
                                       if allow_auto else "")
    p.add_argument("--layers", required=required, default=None, type=parse_layers if allow_auto else layer_list,
                   help=help or f"edited layers: {grammar} (default: a window derived from the model's depth)")


def add_solver_args(p: argparse.ArgumentParser, *, method: str = "memit", allow_none: bool = False,
                    targets_help: str = "target construction across layers") -> None:
    """``--method``, ``--targets``, ``--lam``, ``--hparam`` (every solver hyperparameter reachable)."""
    from kedit.solvers import SOLVERS
    from kedit.targets import TARGETS

    g = p.add_argument_group("method")
    choices = (["none"] if allow_none else []) + sorted(SOLVERS)
    g.add_argument("--method", default=method, choices=choices,
                   help="solver" + (", or 'none' for the unedited model" if allow_none else ""))
    g.add_argument("--targets", default="forward", choices=sorted(TARGETS), help=targets_help)
    g.add_argument("--lam", type=nonneg_float, default=None,
                   help="preservation weight of MEMIT/EMMET (PRUNE/RECT: of their base solver); rejected for "
                        "solvers without one (default: 15000, whatever --targets)")
    g.add_argument("--hparam", type=hparam, action="append", default=[], metavar="NAME=VALUE",
                   help="any solver hyperparameter, repeatable; nested base solver as base.NAME=VALUE, base=NAME "
                        "picks PRUNE/RECT's base (default: the solver's defaults)")


def add_stats_args(p: argparse.ArgumentParser, *, tokens: int | None = None) -> None:
    """Statistics corpus and budget (kedit.stats.StatsSpec)."""
    from kedit.stats import StatsSpec

    d = StatsSpec()
    g = p.add_argument_group("statistics")
    g.add_argument("--corpus", default=None,
                   help="statistics corpus: text file, directory of text files or .jsonl (default: text sampled "
                        "from the model)")
    g.add_argument("--tokens", type=positive_int, default=tokens,
                   help=f"statistics token budget (default: {tokens or d.tokens:,})")
    g.add_argument("--max-length", type=at_least_2, default=d.max_length, help="tokens per row")
    g.add_argument("--batch-tokens", type=positive_int, default=d.batch_tokens,
                   help="tokens per forward pass (memory only, never changes the result)")
    g.add_argument("--text-field", default=d.text_field, help="JSONL text field")


def add_anchor_args(p: argparse.ArgumentParser) -> None:
    """Anchor optimisation overrides (kedit.optimize.AnchorConfig)."""
    from kedit.optimize import AnchorConfig

    g = p.add_argument_group("anchors")
    g.add_argument("--steps", type=positive_int, default=None,
                   help=f"anchor optimisation steps (default: {AnchorConfig().steps})")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="anchor optimisation learning rate (default: 0.5 below 2B parameters, else 0.1)")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 autocast of the anchor optimisation (GPUs; on a CPU use --dtype bfloat16 instead)")
    g.add_argument("--anchor-cache", default=None, metavar="DIR",
                   help="keep each request's optimised anchors in DIR and reuse them when the weights, request, "
                        "layer, templates and anchor settings match (e.g. a per-case run after a batch run) "
                        "(default: none)")


def add_seed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of templates, sampled corpus and sampling")


def add_editor_args(p: argparse.ArgumentParser, *, allow_none: bool = False, tokens: int | None = None) -> None:
    """Everything an Editor needs: solver, layers, statistics, anchors, seed, diagnostics."""
    add_solver_args(p, allow_none=allow_none)
    add_layers_arg(p)
    add_stats_args(p, tokens=tokens)
    add_anchor_args(p)
    add_seed_arg(p)
    from kedit.templates import DEFAULT_KEY_WEIGHTING, KEY_WEIGHTINGS

    p.add_argument("--key-weighting", choices=KEY_WEIGHTINGS, default=DEFAULT_KEY_WEIGHTING,
                   help="how a request's context-template keys are averaged: grouped (MEMIT's reference: bare "
                        "prompt 1/2, prefixed templates the other 1/2) or flat (plain mean) (default: grouped)")
    p.add_argument("--diagnostics", action="store_true",
                   help="print per-layer diagnostics (always recorded in the JSON output) (default: off)")


# -- validation before any expensive work -------------------------------------------------------------------


def validate(args: argparse.Namespace) -> None:
    """Checks that need no model: cache folder, device, device map, memory caps, solver hyperparameters,
    counts, output paths."""
    from kedit.models import kedit_home

    home = kedit_home()
    if home.exists() and not home.is_dir():  # else every cache write fails, after the work
        raise NotWritable(f"KEDIT_HOME {home} is a file, not a directory; point KEDIT_HOME at a folder")
    if getattr(args, "device", None):
        check_device(args.device)
    if getattr(args, "device_map", None):
        args.device_map = parse_device_map(args.device_map)
    if getattr(args, "max_memory", None):
        args.max_memory = parse_max_memory(args.max_memory)
    if getattr(args, "method", None) not in (None, "none") and hasattr(args, "hparam"):
        from kedit.solvers import make_solver

        hparams = solver_hparams(args)  # names checked here
        try:
            make_solver(args.method, **hparams)  # values checked here (the solvers' own checks)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--hparam/--lam: {e}") from None
    # belt and braces for counts declared outside this module (e.g. `demo --facts`): never <= 0
    for name in ("tokens", "steps", "lr", "n", "facts", "batch_size", "proxy", "samples"):
        value = getattr(args, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool) and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')}: must be > 0, got {value}")
    # "any": the command decides whether it writes a file or a directory there
    for flag, kind in (("save", "file"), ("out", "any"), ("export", "any"), ("png", "file"), ("anchor_cache", "dir")):
        value = getattr(args, flag, None)
        if isinstance(value, str | Path) and value:
            check_writable(Path(value), kind, f"--{flag.replace('_', '-')}")


def check_device(device: str) -> None:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` (``auto``: the loader decides); present on this machine."""
    m = re.fullmatch(r"(cpu|cuda|mps|auto)(?::(\d+))?", device)
    if not m or (m[2] is not None and m[1] != "cuda"):
        raise UsageError(f"--device {device!r}: expected cpu, cuda, cuda:N or mps")
    import torch

    if m[1] == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'no CUDA build' if torch.version.cuda is None else 'no GPU visible'}); "
                             "use --device cpu")
        if m[2] is not None and int(m[2]) >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if m[1] == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")


def parse_device_map(text: str) -> str | dict[str, Any]:
    """A named strategy, a JSON object, or a path to a JSON file holding one."""
    if text in DEVICE_MAPS:
        return text
    source = "--device-map"
    if not text.lstrip().startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise UsageError(f"--device-map {text!r}: not one of {', '.join(DEVICE_MAPS)}, a JSON object, "
                             "or an existing JSON file")
        text, source = path.read_text(encoding="utf-8"), f"--device-map file {path}"
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{source}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{source}: expected a JSON object {{module: device}}, got {type(value).__name__}")
    return value


def parse_max_memory(text: str) -> dict[int | str, str]:
    """``0=20GiB,cpu=60GiB`` -> ``{0: "20GiB", "cpu": "60GiB"}`` (GPU indices as ints, as accelerate wants)."""
    out: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not re.fullmatch(r"\d+|cpu|disk|mps", key) or not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B",
                                                                                       size, re.I):
            raise UsageError(f"--max-memory: {part!r} is not DEVICE=SIZE (e.g. 0=20GiB,cpu=60GiB)")
        out[int(key) if key.isdigit() else key] = size
    if not out:
        raise UsageError("--max-memory: empty; give e.g. 0=20GiB,cpu=60GiB")
    return out


def check_writable(path: Path, kind: str, flag: str) -> None:
    """``path`` can be written as a ``kind`` ("file", "dir" or "any") without creating anything now."""
    path = path.expanduser()
    if path.exists():
        if kind == "file" and path.is_dir():
            raise NotWritable(f"{flag} {path}: is a directory; give a file path")
        if kind == "dir" and not path.is_dir():
            raise NotWritable(f"{flag} {path}: exists and is not a directory")
        if not os.access(path, os.W_OK):
            raise NotWritable(f"{flag} {path}: not writable")
    # the nearest existing ancestor must be a writable directory: missing folders get created there, and
    # atomic writes put their temp file beside the target (so an existing file's folder must be writable too)
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotWritable(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NotWritable(f"{flag} {path}: directory {parent} is not writable; choose another path")


def solver_hparams(args: argparse.Namespace) -> dict[str, Any]:
    """``--hparam`` and ``--lam`` as Editor keyword arguments; unknown names list the valid ones.

    ``base.NAME=VALUE`` collects into ``base={"name": ..., NAME: VALUE}`` for PRUNE/RECT. ``--lam`` goes
    to ``lam`` where the solver has one, to ``base.lam`` where its base has one, else it is rejected.
    """
    from kedit.solvers import SOLVERS, hparam_names

    cls = SOLVERS[args.method]
    top: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    for name, value in args.hparam or []:
        head, _, sub = name.partition(".")
        if head not in hparam_names(cls):
            raise UsageError(f"--hparam {name}: {args.method} has no hyperparameter {head!r}; valid: "
                             f"{', '.join(hparam_names(cls)) or 'none'}")
        if sub:
            if head != "base":
                raise UsageError(f"--hparam {name}: only base.NAME may be nested")
            nested[sub] = value
        else:
            top[name] = value
    has_base = "base" in hparam_names(cls)
    base_cls = None
    if has_base:
        base = top.get("base")
        base_name = base if isinstance(base, str) else (base or {}).get("name") if isinstance(base, dict) else None
        base_name = base_name or _default_base_name(cls)
        if base_name not in SOLVERS:
            raise UsageError(f"--hparam base={base_name}: unknown solver; available: {', '.join(sorted(SOLVERS))}")
        base_cls = SOLVERS[base_name]
    if args.lam is not None:
        if "lam" in hparam_names(cls):
            top["lam"] = args.lam
        elif base_cls is not None and "lam" in hparam_names(base_cls):
            nested["lam"] = args.lam
        else:
            where = f"{args.method} (base {base_cls.name})" if base_cls is not None else args.method
            raise UsageError(f"--lam: {where} has no preservation weight lam; its hyperparameters are "
                             f"{', '.join(hparam_names(cls))} (set them with --hparam NAME=VALUE)")
    if nested:
        bad = sorted(set(nested) - set(hparam_names(base_cls)))
        if bad:
            raise UsageError(f"--hparam base.{bad[0]}: base solver {base_cls.name} has no hyperparameter "
                             f"{bad[0]!r}; valid: {', '.join(hparam_names(base_cls))}")
        base = top.get("base")
        top["base"] = {**(base if isinstance(base, dict) else {}), "name": base_cls.name, **nested}
    return top


def _default_base_name(cls: type) -> str:
    field = next(f for f in dataclasses.fields(cls) if f.name == "base")
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    return default if isinstance(default, str) else default.name


def anchor_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """AnchorConfig overrides from ``--steps``, ``--lr``, ``--bf16``."""
    anchor: dict[str, Any] = {k: v for k, v in {"steps": args.steps, "lr": args.lr}.items() if v is not None}
    if args.bf16:
        anchor["autocast_bf16"] = True
    return anchor


def verbose(args: argparse.Namespace) -> bool:
    """Progress and log lines on stderr: off with --quiet or --json."""
    return not (getattr(args, "quiet", False) or getattr(args, "json", False))


# -- model, layers, editor -------------------------------------------------------------------------------------

_MODEL_FLAGS = {"dtype": "--dtype", "device": "--device", "device_map": "--device-map",
                "max_memory": "--max-memory", "revision": "--revision", "offload_folder": "--offload-folder"}


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The model-loading flags the user set, as kedit.load_model keyword arguments."""
    kw = {k: getattr(args, k) for k in _MODEL_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "trust_remote_code", False):
        kw["trust_remote_code"] = True
    return kw


def load(args: argparse.Namespace):
    """``(model, tok)`` from the model flags; layers given on the command line are checked right away."""
    from kedit.models import load_model

    model, tok = load_model(args.model, **load_kwargs(args))
    check_layers(args, model)
    return model, tok


def check_layers(args: argparse.Namespace, model, flags: tuple[str, ...] = ("layers", "candidates")) -> None:
    """Layers given as flags exist in ``model`` (one line naming the range, before any statistics)."""
    from kedit.arch import ArchitectureAdapter

    given = {f: getattr(args, f) for f in flags if isinstance(getattr(args, f, None), list)}
    if not given:
        return
    n = ArchitectureAdapter.from_model(model).n_layers
    for flag, layers in given.items():
        bad = [x for x in layers if not 0 <= x < n]
        if bad:
            raise UsageError(f"--{flag.replace('_', '-')}: layer {bad[0]} is out of range: {args.model} has "
                             f"{n} layers (0-{n - 1})")


def stats_spec(args: argparse.Namespace):
    """StatsSpec from the statistics flags (``--tokens`` unset: the spec's default)."""
    from kedit.stats import StatsSpec

    kw: dict[str, Any] = {"corpus": args.corpus, "seed": args.seed}
    for name in ("tokens", "max_length", "batch_tokens", "text_field"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    return StatsSpec(**kw)


def make_editor(args: argparse.Namespace, model, tok, verbose: bool = True):
    """An Editor from the editor flags; ``--layers auto`` runs (or reuses) the verified choice and prints it."""
    from kedit.editor import Editor

    layers = args.layers
    if layers == "auto":
        from kedit.layers.auto import resolve_auto

        decision = resolve_auto(model, tok, args.method, args.targets, stats=stats_spec(args),
                                editor_kwargs={"anchor": anchor_overrides(args), "key_weighting": args.key_weighting,
                                               **solver_hparams(args)})
        print(f"[kedit] {decision.summary()}", file=sys.stderr, flush=True)
        layers = decision.layers
    return Editor(model, tok, method=args.method, targets=args.targets, layers=layers, stats=stats_spec(args),
                  anchor=anchor_overrides(args), seed=args.seed, verbose=verbose, key_weighting=args.key_weighting,
                  anchor_cache=getattr(args, "anchor_cache", None), **solver_hparams(args))


# -- printing ---------------------------------------------------------------------------------------------------


def snapshot(model, tok, requests: list[EditRequest], max_new_tokens: int = 10) -> list[dict[str, Any]]:
    """Per request: P(new), P(true) and the greedy continuation of the filled prompt."""
    from kedit.probe import greedy, target_probs

    prompts = [r.filled for r in requests]
    p_new = target_probs(model, tok, prompts, [r.target_new for r in requests])
    trues = [r.target_true for r in requests]
    p_true = target_probs(model, tok, [p for p, t in zip(prompts, trues, strict=True) if t],
                          [t for t in trues if t]) if any(trues) else []
    it = iter(p_true)
    gens = greedy(model, tok, prompts, max_new_tokens)
    return [{"p_new": pn, "p_true": next(it) if t else None, "generation": g}
            for pn, t, g in zip(p_new, trues, gens, strict=True)]


def print_table(requests: list[EditRequest], before: list[dict], after: list[dict], out=sys.stdout) -> None:
    """Human-readable before/after per request."""
    fmt = lambda x: "  -  " if x is None else f"{x:.3f}"  # noqa: E731
    for r, b, a in zip(requests, before, after, strict=True):
        was = f" (was {r.target_true!r})" if r.target_true else ""
        print(f"\n{r.filled!r}  ->  {r.target_new!r}{was}", file=out)
        print(f"  before  p_new={fmt(b['p_new'])} p_true={fmt(b['p_true'])}  {b['generation']!r}", file=out)
        print(f"  after   p_new={fmt(a['p_new'])} p_true={fmt(a['p_true'])}  {a['generation']!r}", file=out)


def print_diagnostics(record: dict[str, Any], out=sys.stderr) -> None:
    for d in record.get("diagnostics", []):
        null = f"  null_dim {d['null_dim']}/{d['d_ff']}" if "null_dim" in d else ""
        print(f"  layer {d['layer']:>3}: remaining residual {d['residual_ratio']:.3f}  "
              f"cos(own, induced) {d['cos_own_induced']:.3f}  |delta| {d['delta_norm']:.3f}{null}", file=out)
