"""Writing and reading evaluation results: summary.json, cases.jsonl, summary.md, PNG plots and report.html.

``summary.json`` holds one plain key per metric (``efficacy_score``, ``neighborhood_kl``, ...) whose
value is ``{mean, ci_low, ci_high, n, pre: {...}, convention}``, next to the reserved keys
``config``, ``timings``, ``evaluated``, ``trajectory``, ``health_trajectory``, ``caveats`` and ``n_cases``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kedit.errors import ReportFormatError
from kedit.eval import metrics as M
from kedit.eval.results import Report
from kedit.io import write_text

RESERVED = ("config", "timings", "evaluated", "trajectory", "health_trajectory", "caveats", "n_cases")
ORDER = M.ORDER  # display order: the metric table's row order
# metrics on a [-1, 1] scale share the left panel of the plots; the rest (KL, fluency) go right
UNIT_RANGE = {k for k in ORDER if k.endswith(("_score", "_acc", "_overlap", "_match", "_agreement", "_magnitude"))}
UNIT_RANGE.add("score")


MQUAKE_CAVEATS = (
    "MQuAKE answers are matched against new_answer and its Wikidata aliases after normalisation (case, accents, "
    "punctuation, articles) as a whole-word prefix of the first generated line; aliases are incomplete (a correct "
    "paraphrase of the answer counts as wrong) and short aliases (e.g. 'US') can match a longer wrong answer.",
    "Several MQuAKE cases rewrite the same subject/relation with different objects; in batch mode (all cases' "
    "rewrites at once) such conflicting edits are applied together, so batch multi-hop figures are a lower bound "
    "for per-case (--single) editing.",
    "multihop_acc / hopwise_acc use greedy decoding with a small token budget and a two-shot QA prompt; "
    "multihop_score is the teacher-forced comparison of new vs pre-edit answer on the same prompt.",
)
PORTABILITY_CAVEAT = ("Portability questions (EasyEdit one-hop set) are written around the record's 'alt' answer; "
                      "with --zsre-target answers the edit target differs from the fact the question presupposes.")


def caveats(report: Report) -> list[str]:
    """Known caveats of the run's metrics (MQuAKE alias matching, portability convention)."""
    kinds = {c.get("kind") for c in report.cases}
    out = list(MQUAKE_CAVEATS) if "mquake" in kinds else []
    if any(c.get("portability") for c in report.cases) and \
            report.config.get("dataset", {}).get("zsre_target") == "answers":
        out.append(PORTABILITY_CAVEAT)
    return out


def summary_dict(report: Report) -> dict[str, Any]:
    """The JSON object written to summary.json."""
    return {**report.summary, "n_cases": len(report.cases), "evaluated": report.evaluated,
            "timings": report.timings, "config": report.config, "trajectory": report.trajectory,
            "health_trajectory": report.health, "caveats": caveats(report)}


def metric_keys(summary: dict[str, Any]) -> list[str]:
    """Metric keys of a summary in display order (known ones first)."""
    keys = [k for k, v in summary.items() if k not in RESERVED and isinstance(v, dict) and "mean" in v]
    return sorted(keys, key=lambda k: (ORDER.index(k) if k in ORDER else len(ORDER), k))


def _fmt(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    return f"{entry['mean']:.4g} [{entry['ci_low']:.3g}, {entry['ci_high']:.3g}]"


def markdown(summary: dict[str, Any]) -> str:
    """A readable table: metric, post (CI), pre (CI), n, convention; then timings and configuration."""
    cfg, t = summary.get("config", {}), summary.get("timings", {})
    ed = cfg.get("editor", {})
    lines = [f"# kedit eval: {ed.get('method', '?')} / {ed.get('targets', '-')} on "
             f"{cfg.get('dataset', {}).get('spec', '?')}"
             + (f" (format: {cfg['dataset']['format']})" if cfg.get("dataset", {}).get("format") else ""), "",
             f"- model: {cfg.get('model', {}).get('name')}; cases: {summary.get('n_cases')}; "
             f"evaluated: {summary.get('evaluated')}", "",
             "| metric | post-edit [95% CI] | pre-edit [95% CI] | n | convention |", "|---|---|---|---|---|"]
    for k in metric_keys(summary):
        e = summary[k]
        conv = e.get("convention", "").replace("|", "\\|")  # keep the table's columns intact
        lines.append(f"| {k} | {_fmt(e)} | {_fmt(e.get('pre'))} | {e.get('n')} | {conv} |")
    lines += [f"- caveat: {c}" for c in summary.get("caveats", [])]
    lines += ["", "| phase | seconds | records/s |", "|---|---|---|"]
    for phase, rate in (("pre_eval", "pre_eval_records_per_s"), ("edit", "edit_records_per_s"),
                        ("post_eval", "post_eval_records_per_s")):
        r = t.get(rate)
        lines.append(f"| {phase} | {t.get(phase + '_s', 0):.2f} | {'-' if r is None else f'{r:.2f}'} |")
    lines += ["", "```json", json.dumps({k: v for k, v in cfg.items() if k != "dataset"}, indent=1, default=str),
              "```", ""]
    return "\n".join(lines)


def write(report: Report, out: str | Path, plots: bool = True, html: bool = True) -> Path:
    """Write summary.json, cases.jsonl, summary.md, plots and report.html into ``out``; returns the directory.

    Each file is written to a temporary name and renamed, so an interrupted run leaves no half-written file.
    """
    from kedit.eval.html import run_page

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_dict(report)
    write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    write_text(out / "cases.jsonl", "".join(json.dumps(rec, default=str) + "\n" for rec in report.cases))
    write_text(out / "summary.md", markdown(summary))
    pngs = []
    if plots:
        plot_metrics(summary, out / "metrics.png")
        plot_scatter(report.cases, out / "p_new_scatter.png")
        pngs = [out / "metrics.png", out / "p_new_scatter.png"]
        if len(report.health) > 1:
            plot_health([("run", report.health)], out / "health.png")
            pngs.append(out / "health.png")
    if html:
        write_text(out / "report.html", run_page(summary, report.cases, pngs, metric_keys(summary)))
    return out


def plot_health(runs: list[tuple[str, list[dict[str, Any]]]], path: Path) -> None:
    """Health over the number of edits (perplexity, top-1 agreement, KL), one line per run."""
    plt = _pyplot()
    keys = ("health_perplexity", "health_top1_agreement", "health_kl")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, k in zip(axes, keys, strict=True):
        for name, traj in runs:
            pts = [(p["n_edited"], p[k]) for p in traj if p.get(k) is not None]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, label=name)
        ax.set(xlabel="edits applied", title=k.removeprefix("health_"))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_summary(path: str | Path) -> dict[str, Any]:
    """summary.json of a run directory (or the file itself); raises FileNotFoundError naming the path."""
    p = Path(path)
    p = p / "summary.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no summary.json at {p}")
    try:
        summary = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ReportFormatError(f"{p} is not a valid summary.json ({type(e).__name__}: {e})") from None
    if not isinstance(summary, dict):
        raise ReportFormatError(f"{p} is not a valid summary.json (a JSON {type(summary).__name__}, "
                                "expected an object)")
    for name in ("config", "timings"):
        if not isinstance(summary.get(name, {}), dict):
            raise ReportFormatError(f"{p}: field {name!r} must be an object")
    if not isinstance(summary.get("config", {}).get("editor", {}), dict):
        raise ReportFormatError(f"{p}: field 'config.editor' must be an object")
    for key in metric_keys(summary):
        mean = summary[key]["mean"]
        if mean is not None and (isinstance(mean, bool) or not isinstance(mean, int | float)):
            raise ReportFormatError(f"{p}: field {key!r}.mean must be a number, got {type(mean).__name__}")
    return summary


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, keys: list[str], series: list[tuple[str, list[dict | None]]]) -> None:
    width = 0.8 / max(len(series), 1)
    for j, (label, entries) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(keys))]
        means = [e["mean"] if e and e.get("mean") is not None else math.nan for e in entries]
        lo = [e["ci_low"] if e and e.get("ci_low") is not None else m for m, e in zip(means, entries, strict=True)]
        hi = [e["ci_high"] if e and e.get("ci_high") is not None else m for m, e in zip(means, entries, strict=True)]
        err = [[m - v for m, v in zip(means, lo, strict=True)], [v - m for m, v in zip(means, hi, strict=True)]]
        ax.bar(xs, means, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right", fontsize=7)
    ax.legend(fontsize=7)


def _unit_ylim(ax, entries: list[dict | None]) -> None:
    lows = [e["ci_low"] for e in entries if e and e.get("ci_low") is not None]
    ax.set_ylim(min([0.0, *lows]) - 0.05, 1.05)
    ax.axhline(0, color="grey", lw=0.5)


def plot_metrics(summary: dict[str, Any], path: Path) -> None:
    """Bars with 95% CIs, pre vs post: [0, 1] metrics left, unbounded ones (KL, fluency, ...) right."""
    plt = _pyplot()
    keys = [k for k in metric_keys(summary) if k not in ("p_new", "p_true")]
    unit = [k for k in keys if k in UNIT_RANGE]
    other = [k for k in keys if k not in UNIT_RANGE]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    for ax, ks in ((axes[0], unit), (axes[1], other)):
        _bars(ax, ks, [("pre", [summary[k].get("pre") for k in ks]), ("post", [summary[k] for k in ks])])
    _unit_ylim(axes[0], [summary[k] for k in unit] + [summary[k].get("pre") for k in unit])
    fig.suptitle(f"{summary.get('config', {}).get('editor', {}).get('method', '?')}: "
                 f"{summary.get('evaluated', '')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scatter(cases: list[dict[str, Any]], path: Path) -> None:
    """Per-record p_new (exp(-NLL) of the new target on the edit prompt) before vs after, log-log."""
    plt = _pyplot()
    pairs = [(c["pre"].get("p_new"), c["post"].get("p_new")) for c in cases]
    pre, post = ([max(p[i], 1e-12) for p in pairs if None not in p] for i in (0, 1))
    low = min([*pre, *post, 1e-3]) / 2  # pre-edit p_new is often ~1e-4: a linear axis would hide it
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(pre, post, s=8, alpha=0.6)
    ax.plot([low, 1], [low, 1], color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", yscale="log", xlim=(low, 1), ylim=(low, 1), xlabel="p_new before edit",
           ylabel="p_new after edit", title="per-record p_new = exp(-NLL(new))")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compare(summaries: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    """Post-edit bars with CIs for several runs side by side (metrics every run has)."""
    plt = _pyplot()
    keys: list[str] = []  # metrics any run has (MQuAKE, zsRE and CounterFact runs can be lined up)
    for _, s in summaries:
        keys += [k for k in metric_keys(s) if k not in keys and k not in ("p_new", "p_true")]
    unit = [k for k in keys if k in UNIT_RANGE]
    other = [k for k in keys if k not in UNIT_RANGE]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 1]})
    for ax, ks in ((axes[0], unit), (axes[1], other)):
        _bars(ax, ks, [(name, [s.get(k) for k in ks]) for name, s in summaries])
    _unit_ylim(axes[0], [s.get(k) for _, s in summaries for k in unit])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
