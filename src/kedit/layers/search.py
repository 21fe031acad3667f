"""Brute-force layer search (METHODS §7): edit at every candidate layer (or window), score, restore.

Ground truth for the other selectors. Per candidate window: the anchors of *all* requests are
optimised in one batched run (they are independent, METHODS §4), then each request is edited on
its own with its slice of those targets, scored with the evaluation harness and undone, so
``model at end == model at start``. Results: the per-request (sample-wise) optimal window and the
golden window (best mean score over the set).

The rank score is the mean of explicit harness metrics per request (default: ES, PS, NS for
CounterFact; efficacy / generalisation token accuracy and specificity agreement for zsRE); ties are
broken by the mean of the matching magnitudes (P(new) - P(true) style), then by the shallower layer.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kedit import distributed
from kedit.arch import ArchitectureAdapter
from kedit.eval import metrics as M
from kedit.eval.datasets import EvalCase
from kedit.eval.harness import Evaluator, case_metrics
from kedit.layers.base import LayerChoice, bootstrap_stability, candidate_layers, check_proxy, window_starts
from kedit.progress import bar
from kedit.requests import EditRequest

SCORE_KEYS = {kind: M.score_keys(kind) for kind in ("counterfact", "zsre")}  # read from the metric table
TIE_KEYS = {
    "counterfact": ("efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude"),
    "zsre": ("p_new",),
}


def as_cases(items: Sequence[EditRequest | EvalCase]) -> list[EvalCase]:
    """EvalCases as given; EditRequests become CounterFact-style cases (their paraphrases and neighbors)."""
    out = []
    for i, x in enumerate(items):
        if isinstance(x, EvalCase):
            out.append(x)
        else:
            out.append(EvalCase(request=x, kind="counterfact", source="<requests>", index=i,
                                paraphrases=tuple(x.paraphrases), neighborhood=tuple(x.neighbors)))
    return out


def _mean(metrics: dict[str, Any], keys: Sequence[str]) -> float:
    vals = [metrics.get(k) for k in keys]
    vals = [float(v) for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


@dataclass
class WindowScores:
    """Rank score and tie-break value per request and window, ``[n, W]`` (nan where an edit failed)."""

    windows: list[list[int]]
    score: torch.Tensor       # [n, W]
    tie: torch.Tensor         # [n, W]
    keys: tuple[str, ...]
    seconds: dict[str, float]
    failures: int

    def best(self, score: torch.Tensor, tie: torch.Tensor) -> int:
        """Index of the best window for a score vector ``[W]``: score, then tie-break, then shallowest."""
        s, t = score.nan_to_num(-math.inf).tolist(), tie.nan_to_num(-math.inf).tolist()
        return max(range(len(s)), key=lambda j: (s[j], t[j], -j))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (nan kept as float nan)."""
        return {"windows": self.windows, "score": self.score.tolist(), "tie": self.tie.tolist(),
                "keys": list(self.keys), "seconds": dict(self.seconds), "failures": self.failures}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WindowScores:
        return cls([list(w) for w in d["windows"]], torch.tensor(d["score"], dtype=torch.float64),
                   torch.tensor(d["tie"], dtype=torch.float64), tuple(d["keys"]), dict(d["seconds"]),
                   int(d["failures"]))

    @classmethod
    def join(cls, parts: Sequence[WindowScores]) -> WindowScores:
        """The scores of disjoint window lists on the same cases, side by side (a search run in pieces,
        e.g. resumed): per-window phases summed, statistics and the pre-edit measurement counted once."""
        if not parts or len({p.keys for p in parts}) > 1 or len({p.score.shape[0] for p in parts}) > 1:
            raise ValueError("WindowScores.join needs parts scored with the same keys on the same cases")
        windows = [w for p in parts for w in p.windows]
        if len({tuple(w) for w in windows}) < len(windows):
            raise ValueError("WindowScores.join: a window is scored in two parts")
        seconds = {k: parts[0].seconds[k] if k in ("stats", "pre") else sum(p.seconds[k] for p in parts)
                   for k in parts[0].seconds}
        return cls(windows, torch.cat([p.score for p in parts], 1), torch.cat([p.tie for p in parts], 1),
                   parts[0].keys, seconds, sum(p.failures for p in parts))


def score_windows(model: torch.nn.Module, tok: Any, cases: Sequence[EvalCase], windows: Sequence[Sequence[int]],
                  method: str = "rome", targets: str = "forward", score_keys: Sequence[str] | None = None,
                  stats: Any = None, seed: int = 0, evaluator: Evaluator | None = None,
                  editor_kwargs: dict[str, Any] | None = None, progress: bool = False) -> WindowScores:
    """Edit each case alone at each window (anchors batched per window), score, undo; the model ends unchanged.

    ``stats``: ``{layer: C}``, a StatsSpec, or None (default StatsSpec); computed once for every layer.
    ``progress``: a bar over windows x cases on stderr (kedit.progress).
    """
    from kedit.editor import Editor
    from kedit.stats import StatsSpec, second_moments

    kind = cases[0].kind
    keys = tuple(score_keys or SCORE_KEYS.get(kind, SCORE_KEYS["counterfact"]))
    tie_keys = TIE_KEYS.get(kind, ())
    needed = sorted({l for w in windows for l in w})
    t0 = time.perf_counter()
    if not isinstance(stats, dict):
        stats = second_moments(model, tok, needed, stats or StatsSpec(), progress=False)
    t1 = time.perf_counter()
    ev = evaluator or Evaluator(model, tok)
    pre = ev.measure(cases)
    seconds = {"stats": t1 - t0, "pre": time.perf_counter() - t1, "anchors": 0.0, "edit": 0.0, "score": 0.0}
    requests = [c.request for c in cases]
    score = torch.full((len(cases), len(windows)), float("nan"), dtype=torch.float64)
    tie = torch.full_like(score, float("nan"))
    failures = 0
    # units (window, request block): under torchrun each rank runs a contiguous share of them; requests are
    # split only when there are fewer windows than ranks, so the usual case matches one process bit for bit
    parallel = distributed.active(next(model.parameters()).device)
    blocks = min(len(cases), -(-distributed.world_size() // len(windows))) if parallel else 1
    units = [(j, *distributed.shard_bounds(len(cases), b, blocks)) for j in range(len(windows)) for b in range(blocks)]
    mine = list(distributed.shard(units)) if parallel else units
    found: list[tuple[int, int, float, float]] = []  # (request, window, score, tie)
    pb = bar(sum(hi - lo for _, lo, hi in mine), "brute-force windows", "edit", progress)
    with distributed.serial() if parallel else contextlib.nullcontext():  # each rank edits alone
        for j, lo, hi in mine:
            editor = Editor(model, tok, method=method, targets=targets, layers=list(windows[j]), stats=stats,
                            seed=seed, **(editor_kwargs or {}))
            t = time.perf_counter()
            # anchors of every request of the unit in one batch, then each request applied alone
            for i, case, edit in zip(range(lo, hi), cases[lo:hi], editor.apply_each(requests[lo:hi],
                                                                                    skip_failures=True)):
                pb.set_postfix_str(f"layers {list(windows[j])}", refresh=False)
                pb.update(1)
                if edit is None:  # e.g. a non-finite update: scored as missing, counted
                    failures += 1
                    continue
                t2 = time.perf_counter()
                seconds["edit"] += t2 - t
                try:
                    post = ev.measure([case])[0]
                finally:
                    edit.undo()
                t = time.perf_counter()
                seconds["score"] += t - t2
                metrics = case_metrics(case, post, pre[i])
                found.append((i, j, _mean(metrics, keys), _mean(metrics, tie_keys)))
            seconds["anchors"] += editor.timings.get("optimize", 0.0)
    pb.close()
    if parallel:  # every rank ends with every score (and the summed per-phase seconds of all ranks)
        parts = distributed.all_gather_object((found, failures, seconds))
        found = [x for part in parts for x in part[0]]
        failures = sum(part[1] for part in parts)
        seconds = {k: seconds[k] if k in ("stats", "pre") else sum(part[2][k] for part in parts) for k in seconds}
    for i, j, s, t in found:
        score[i, j], tie[i, j] = s, t
    return WindowScores([list(w) for w in windows], score, tie, keys, seconds, failures)


@dataclass(frozen=True)
class BruteForce:
    """Golden window (best mean score) and per-request optimal windows by editing at every candidate."""

    name: ClassVar[str] = "brute"
    method: str = "rome"
    targets: str = "forward"                 # target construction for windows (METHODS §6)
    window: int = 1                          # consecutive layers edited (1 for ROME)
    layers: tuple[int, ...] | None = None    # candidate layers; None = every layer
    score_keys: tuple[str, ...] | None = None  # harness metrics averaged into the rank score
    seed: int = 0
    stats: Any = None                        # {layer: C}, StatsSpec or None (default StatsSpec)
    editor_kwargs: dict[str, Any] = field(default_factory=dict)  # solver hyperparameters, anchor=...
    bootstrap: int = 200                     # resamples of the proxy set for the stability report (0 = off)
    progress: bool = False                   # progress bar on stderr (kedit.progress)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"BruteForce.window must be >= 1, got {self.window}")

    def windows(self, adapter: ArchitectureAdapter) -> list[list[int]]:
        """The candidate windows, in order (window starts ascending)."""
        cands = candidate_layers(adapter, self.layers, self.window)
        return [cands[j:j + self.window] for j in window_starts(cands, self.window)]

    def select(self, model: torch.nn.Module, adapter: ArchitectureAdapter | None, tok: Any,
               proxy: Sequence[EditRequest | EvalCase]) -> LayerChoice:
        """Edit every proxy case at every candidate window; choose the golden window. Model left unchanged."""
        t0 = time.perf_counter()
        cases = as_cases(proxy)
        check_proxy([c.request for c in cases], who="brute-force search")
        adapter = adapter or ArchitectureAdapter.from_model(model)
        ws = self.scores(model, tok, cases, self.windows(adapter))
        return self.choose(ws, cases, time.perf_counter() - t0)

    def scores(self, model: torch.nn.Module, tok: Any, cases: Sequence[EvalCase],
               windows: Sequence[Sequence[int]]) -> WindowScores:
        """``score_windows`` with this search's settings, for some of its windows (a search run in pieces:
        ``choose(WindowScores.join(parts), ...)`` then equals ``select``)."""
        return score_windows(model, tok, cases, windows, self.method, self.targets, self.score_keys, self.stats,
                             self.seed, editor_kwargs=self.editor_kwargs, progress=self.progress)

    def choose(self, ws: WindowScores, cases: Sequence[EvalCase], seconds: float) -> LayerChoice:
        """The golden window, per-request optima and bootstrap stability from every window's scores."""
        windows = ws.windows
        mean, mean_tie = ws.score.nanmean(0), ws.tie.nanmean(0)            # [W]
        golden = ws.best(mean, mean_tie)
        optimal = [ws.best(ws.score[i], ws.tie[i]) for i in range(len(cases))]
        starts = [w[0] for w in windows]
        hist = {s: 0 for s in starts}
        for j in optimal:
            hist[starts[j]] += 1
        best_per_request = ws.score.nan_to_num(-math.inf).max(1).values
        s0, ties = ws.score.nan_to_num(0.0), ws.tie.nan_to_num(0.0)   # failed edits count as 0 when resampled
        stability = bootstrap_stability(
            lambda w: starts[ws.best(w @ s0 / w.sum(), w @ ties / w.sum())], len(cases), starts[golden],
            self.bootstrap, self.seed)
        details = {
            "method": self.method, "targets": self.targets, "window": self.window, "windows": ws.windows,
            "score_keys": list(ws.keys), "tie_break": list(TIE_KEYS.get(cases[0].kind, ())), "n_proxy": len(cases),
            "golden_score": mean[golden].item(),
            "sample_wise_optimum": best_per_request.mean().item(),   # mean over requests of their best score
            "optimal": [starts[j] for j in optimal], "histogram": hist,
            "per_request": ws.score.tolist(), "tie": ws.tie.tolist(), "failures": ws.failures,
            "seconds": ws.seconds, "candidates_are": "first layer of each window", "stability": stability,
        }
        return LayerChoice("brute", windows[golden], starts, mean.tolist(), seconds, details)
