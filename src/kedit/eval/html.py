"""One-page, self-contained HTML reports for ``kedit eval`` (one run) and ``kedit compare`` (several runs).

Rendered with jinja2 (autoescaped); plots are inlined as base64 PNG data URIs and sorting is a few
lines of inline JavaScript, so the page needs no network and no other file.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jinja2

from kedit.eval import metrics as M

MAX_CASES = 2000          # drill-down rows (worst first); the full list is in cases.jsonl
CASE_METRICS = 8          # metric columns in the drill-down

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#eef2f7}th.sort{cursor:pointer}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.fam td{background:#f6f6f6;font-weight:bold}.conv{color:#666;font-size:.9em}.bad{background:#fde7e7}
.good{background:#e7f6e9}img{max-width:100%;border:1px solid #ddd;margin:.4em 0}
pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em;font-size:.8em}.caveat{color:#8a5a00}
#cases td.txt{min-width:170px}#cases td.gen{min-width:420px;font-size:.8em;white-space:pre-wrap}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){
    th.classList.add('sort');
    th.addEventListener('click',function(){
      var body=t.tBodies[0],rows=Array.from(body.rows),asc=th.dataset.asc!=='1';
      th.dataset.asc=asc?'1':'0';
      rows.sort(function(a,b){
        var x=a.cells[i].dataset.v!==undefined?a.cells[i].dataset.v:a.cells[i].textContent;
        var y=b.cells[i].dataset.v!==undefined?b.cells[i].dataset.v:b.cells[i].textContent;
        var nx=parseFloat(x),ny=parseFloat(y);
        var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(x).localeCompare(String(y));
        return asc?c:-c;});
      rows.forEach(function(r){body.appendChild(r);});});});});
"""

_RUN = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ style }}</style></head>
<body>
<h1>{{ title }}</h1>
<p>{{ n_cases }} cases; evaluated {{ evaluated }}.</p>
{% for c in caveats %}<p class="caveat">Caveat: {{ c }}</p>{% endfor %}
<h2>Run</h2>
<table id="run">{% for k, v in record %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>
<h2>Metrics</h2>
<table id="metrics"><thead><tr><th>metric</th><th>post-edit [95% CI]</th><th>pre-edit [95% CI]</th><th>n</th>
<th>better</th><th>convention</th></tr></thead><tbody>
{% for fam, rows in families %}<tr class="fam"><td colspan="6">{{ fam }}</td></tr>
{% for r in rows %}<tr><td>{{ r.name }}</td><td class="num">{{ r.post }}</td><td class="num">{{ r.pre }}</td>
<td class="num">{{ r.n }}</td><td>{{ r.better }}</td><td class="conv">{{ r.convention }}</td></tr>{% endfor %}
{% endfor %}</tbody></table>
{% if health %}<h2>Model health over edits</h2>
<table id="health"><thead><tr><th>after batch</th><th>edits</th><th>perplexity</th><th>top-1 agreement</th>
<th>KL</th></tr></thead><tbody>{% for h in health %}<tr><td class="num">{{ h.after_batch }}</td>
<td class="num">{{ h.n_edited }}</td><td class="num">{{ fmt(h.health_perplexity) }}</td>
<td class="num">{{ fmt(h.health_top1_agreement) }}</td><td class="num">{{ fmt(h.health_kl) }}</td></tr>{% endfor %}
</tbody></table>{% endif %}
{% if images %}<h2>Plots</h2>{% for name, uri in images %}<figure><img alt="{{ name }}" src="{{ uri }}">
<figcaption>{{ name }}</figcaption></figure>{% endfor %}{% endif %}
<h2>Cases (worst first{% if truncated %}; first {{ rows|length }} of {{ n_cases }}, all in cases.jsonl{% endif %})</h2>
<p class="conv">Click a column header to sort. Worst = lowest {{ worst_key }} after editing, then lowest p_new.</p>
<table id="cases" class="sortable"><thead><tr><th>case</th><th>prompt</th><th>target (new / true)</th>
<th>p_new pre</th><th>p_new post</th>{% for k in case_keys %}<th>{{ k }} post</th>{% endfor %}
<th>generations (pre &rarr; post)</th></tr></thead><tbody>
{% for r in rows %}<tr><td>{{ r.id }}</td><td class="txt">{{ r.prompt }}</td><td class="txt">{{ r.target }}</td>
<td class="num" data-v="{{ r.p_pre_v }}">{{ r.p_pre }}</td><td class="num" data-v="{{ r.p_post_v }}">{{ r.p_post }}</td>
{% for v, cls in r.vals %}<td class="num {{ cls }}" data-v="{{ v[1] }}">{{ v[0] }}</td>{% endfor %}
<td class="gen">{% for g in r.gens %}<div>{{ g }}</div>{% endfor %}</td></tr>{% endfor %}
</tbody></table>
<h2>Configuration</h2><pre>{{ config }}</pre>
<script>{{ js }}</script>
</body></html>
"""

_COMPARE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ style }}</style></head>
<body>
<h1>{{ title }}</h1>
<h2>Runs</h2>
<table id="runs" class="sortable"><thead><tr><th>run</th><th>method</th><th>targets</th><th>lam</th>
<th>dataset</th><th>cases</th><th>evaluated</th><th>edit s</th><th>command</th></tr></thead><tbody>
{% for r in runs %}<tr>{% for v in r %}<td>{{ v }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
<h2>Metrics (post-edit mean [95% CI]; pre-edit in parentheses)</h2>
<table id="metrics"><thead><tr><th>metric</th>{% for n in names %}<th>{{ n }}</th>{% endfor %}
<th>convention</th></tr></thead><tbody>
{% for fam, rows in families %}<tr class="fam"><td colspan="{{ names|length + 2 }}">{{ fam }}</td></tr>
{% for r in rows %}<tr><td>{{ r.name }}</td>{% for c in r.cells %}<td class="num">{{ c }}</td>{% endfor %}
<td class="conv">{{ r.convention }}</td></tr>{% endfor %}{% endfor %}</tbody></table>
{% for c in caveats %}<p class="caveat">Caveat: {{ c }}</p>{% endfor %}
{% if images %}<h2>Plots</h2>{% for name, uri in images %}<figure><img alt="{{ name }}" src="{{ uri }}">
<figcaption>{{ name }}</figcaption></figure>{% endfor %}{% endif %}
<script>{{ js }}</script>
</body></html>
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def _num(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, (int, float)) else str(v)


def _cell(e: dict[str, Any] | None) -> str:
    if not e or e.get("mean") is None:
        return "-"
    return f"{e['mean']:.4g} [{e['ci_low']:.3g}, {e['ci_high']:.3g}]"


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _families(keys: list[str]) -> list[tuple[str, list[str]]]:
    """Metric keys grouped by the metric table's family, in display order."""
    out: dict[str, list[str]] = {}
    for k in keys:
        out.setdefault(M.METRICS[k].family if k in M.METRICS else "other", []).append(k)
    return list(out.items())


def _record(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The run's record: model, method, targets, layers, hyperparameters, data slice, protocol, command."""
    cfg = summary.get("config", {})
    model, ed, ds, proto = (cfg.get(k, {}) or {} for k in ("model", "editor", "dataset", "protocol"))
    hyper = {k: v for k, v in ed.items() if k not in ("method", "targets", "layers")}
    rows = [("model", model.get("name")), ("revision", model.get("revision")), ("dtype", model.get("dtype")),
            ("fingerprint", model.get("fingerprint")), ("method", ed.get("method")), ("targets", ed.get("targets")),
            ("layers", ed.get("layers")), ("hyperparameters", json.dumps(hyper, default=str) if hyper else "-"),
            ("dataset", ds.get("spec")),
            ("slice", json.dumps(ds["selection"], default=str) if "selection" in ds else None),
            ("records", f"{ds['n_loaded']} loaded of {ds.get('n_records_in_file')} ({ds.get('n_skipped', 0)} skipped)"
             if "n_loaded" in ds else None),
            ("protocol", json.dumps(proto, default=str)), ("command", cfg.get("command"))]
    t = summary.get("timings", {})
    secs = {k[:-2]: v for k, v in t.items() if k.endswith("_s") and not k.endswith("per_s")
            and isinstance(v, (int, float))}
    rows.append(("timings (s)", ", ".join(f"{k} {v:.1f}" for k, v in secs.items())))
    return [(k, "-" if v is None else str(v)) for k, v in rows]


def _worst_key(cases: list[dict[str, Any]]) -> str:
    kinds = {c.get("kind") for c in cases}
    for key in ("multihop_acc", "efficacy_score", "efficacy_token_acc", "efficacy_acc"):
        if any(key in c.get("post", {}) for c in cases) and (key != "multihop_acc" or "mquake" in kinds):
            return key
    return "p_new"


def _case_rows(cases: list[dict[str, Any]], keys: list[str], worst: str) -> list[dict[str, Any]]:
    def order(c: dict[str, Any]) -> tuple[float, float]:
        post = c.get("post", {})
        w, p = post.get(worst), post.get("p_new")
        return (float("inf") if w is None else w, float("inf") if p is None else p)

    rows = []
    for c in sorted(cases, key=order)[:MAX_CASES]:
        pre, post = c.get("pre", {}), c.get("post", {})
        vals = []
        for k in keys:
            v, v0 = post.get(k), pre.get(k)
            hib = M.METRICS[k].higher_is_better if k in M.METRICS else None
            cls = "" if v is None or v0 is None or hib is None or v == v0 else \
                ("good" if (v > v0) == hib else "bad")
            vals.append(((_num(v), "" if v is None else v), cls))
        gens = []
        for tag, g in (c.get("answers_post") or {}).items():
            gens.append(f"{tag}: {(c.get('answers_pre') or {}).get(tag, '')!r} -> {g!r}")
        for t0, t1 in zip(c.get("texts_pre", [])[:1], c.get("texts_post", [])[:1], strict=False):
            gens.append(f"{t0[:160]!r} -> {t1[:160]!r}")
        target = c.get("target_new", "")
        if c.get("new_answer"):
            target = f"{target} ... multi-hop: {c['new_answer']} / {c.get('answer')}"
        elif c.get("target_true"):
            target = f"{target} / {c['target_true']}"
        prompt = c.get("prompt", "")
        if c.get("edits"):
            prompt = "; ".join(f"{e['prompt']} -> {e['target_new']}" for e in c["edits"])
        rows.append({"id": c.get("case_id"), "prompt": prompt, "target": target,
                     "p_pre": _num(pre.get("p_new"), 3), "p_pre_v": pre.get("p_new", ""),
                     "p_post": _num(post.get("p_new"), 3), "p_post_v": post.get("p_new", ""),
                     "vals": vals, "gens": gens})
    return rows


def run_page(summary: dict[str, Any], cases: list[dict[str, Any]], pngs: list[Path], keys: list[str]) -> str:
    """The report.html of one ``kedit eval`` run: summary.json content, cases.jsonl records, plot files,
    and the summary's metric keys in display order (kedit.eval.report.metric_keys)."""
    families = [(fam, [{"name": k, "post": _cell(summary[k]), "pre": _cell(summary[k].get("pre")),
                        "n": summary[k].get("n"), "convention": summary[k].get("convention", ""),
                        "better": {True: "higher", False: "lower", None: "-"}[
                            M.METRICS[k].higher_is_better if k in M.METRICS else None]} for k in ks])
                for fam, ks in _families(keys)]
    present = {k for c in cases for k in c.get("post", {})}
    case_keys = [k for k in keys if k in present and k not in ("p_new", "p_true")
                 and not k.startswith(("top", "health_"))][:CASE_METRICS]
    worst = _worst_key(cases)
    ed = summary.get("config", {}).get("editor", {})
    title = (f"kedit eval: {ed.get('method', '?')} / {ed.get('targets', '-')} on "
             f"{summary.get('config', {}).get('dataset', {}).get('spec', '?')}")
    return _ENV.from_string(_RUN).render(
        title=title, style=_STYLE, js=_SORT_JS, n_cases=summary.get("n_cases", len(cases)),
        evaluated=summary.get("evaluated", ""), caveats=summary.get("caveats", []), record=_record(summary),
        families=families, health=summary.get("health_trajectory") or [], fmt=_num,
        images=[(Path(p).name, _png_uri(p)) for p in pngs if Path(p).is_file()],
        rows=_case_rows(cases, case_keys, worst), truncated=len(cases) > MAX_CASES, case_keys=case_keys,
        worst_key=worst, config=json.dumps(summary.get("config", {}), indent=1, default=str))


def compare_page(runs: list[tuple[str, dict[str, Any]]], pngs: list[Path], keys: list[str]) -> str:
    """The HTML page of ``kedit compare``: runs' records, every metric (``keys``, display order) side by side."""

    def cell(s: dict[str, Any], k: str) -> str:
        e = s.get(k)
        return "-" if not e else f"{_cell(e)} ({_num((e.get('pre') or {}).get('mean'))})"

    families = [(fam, [{"name": k, "cells": [cell(s, k) for _, s in runs],
                        "convention": M.CONVENTIONS.get(k, "")} for k in ks]) for fam, ks in _families(keys)]
    rows = []
    for name, s in runs:
        cfg = s.get("config", {})
        ed = cfg.get("editor", {})
        rows.append([name, ed.get("method", "?"), ed.get("targets", "-"), _num(ed.get("lam")),
                     cfg.get("dataset", {}).get("spec", "?"), s.get("n_cases", "?"), s.get("evaluated", ""),
                     _num(s.get("timings", {}).get("edit_s"), 3), cfg.get("command", "-")])
    caveats = sorted({c for _, s in runs for c in s.get("caveats", [])})
    return _ENV.from_string(_COMPARE).render(
        title=f"kedit compare: {len(runs)} runs", style=_STYLE, js=_SORT_JS, runs=rows, names=[n for n, _ in runs],
        families=families, caveats=caveats,
        images=[(Path(p).name, _png_uri(p)) for p in pngs if Path(p).is_file()])
