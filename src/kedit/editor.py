"""Editor: THE edit loop, written once (METHODS §4-6).

batch -> anchors (optimize.py) -> targets (targets.py) -> per edited layer, shallow to deep:
keys K and current states from the partially edited model -> R from the targets -> solver ->
apply -> Edit. Solvers and target constructions plug in by registry; neither knows the other.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

import kedit
from kedit import distributed
from kedit.anchor_cache import AnchorRow, AnchorStore, anchor_key, join_rows, split_rows
from kedit.arch import ArchitectureAdapter
from kedit.batch import KL_PROMPT, TokenBatch
from kedit.edit import Edit
from kedit.errors import EditFailed, KeditError
from kedit.hooks import Trace
from kedit.models import device_map_summary, model_fingerprint, model_info
from kedit.optimize import AnchorConfig, Anchors, concat_anchors, optimize_anchors
from kedit.progress import bar
from kedit.requests import EditRequest, check_batch
from kedit.solvers import LayerProblem, make_solver, with_hparams, work_dtype
from kedit.targets import make_targets
from kedit.templates import DEFAULT_KEY_WEIGHTING, check_key_weighting, context_templates, template_weights
from kedit.tokens import check_limits, pad_id


def default_layers(n_layers: int, multi_layer: bool) -> list[int]:
    """Layers derived from depth: an early-middle window of up to 5 (MEMIT) or its first layer (ROME).

    Matches the hand-tuned choices of the papers (GPT-J 3-8, Llama-3-8B 4-8, i.e. ~13% of depth);
    ``kedit layers`` finds a better one for a given model and method.
    """
    start = max(1, round(0.13 * n_layers)) if n_layers > 2 else 0
    if not multi_layer:
        return [start]
    width = max(1, min(5, round(n_layers / 6)))
    return list(range(start, min(n_layers, start + width)))


def default_anchor_config(model, multi_layer: bool, **overrides: Any) -> AnchorConfig:
    """Anchor hyperparameters derived from the model and method (METHODS §4).

    Multi-layer methods (MEMIT family): delta relative to the residual ``h_a``, clamp 0.75 (MEMIT
    ``compute_z``); single-layer ones (ROME ``compute_v``): relative to the MLP output, clamp 4.
    """
    n_params = sum(p.numel() for p in model.parameters())
    base = dict(lr=0.5 if n_params < 2e9 else 0.1, clamp_norm_factor=0.75 if multi_layer else 4.0,
                site="block" if multi_layer else "mlp")
    return AnchorConfig(**{**base, **overrides})


def describe(obj: Any) -> Any:
    """JSON-able description of a method object: its name and hyperparameters, nested ones too."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"name": obj.name} if hasattr(obj, "name") else {}
        return {**out, **{f.name: describe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, list | tuple):
        return [describe(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return {"name": getattr(obj, "name", type(obj).__name__)}


_ANCHOR_TENSORS = ("z", "h", "delta", "nll_start", "nll_end", "steps", "norm")


def _distributed_anchors(editor: Editor, prep: TokenBatch, layer: int) -> Anchors:
    """Anchors of this rank's contiguous block of requests, gathered to every rank in request order.

    Requests are independent (METHODS §4), so the result matches one batched run within the batched
    optimiser's own tolerance; every rank then holds the same anchors and solves the same problem.
    """
    distributed.check_same_model(editor.model, editor.fingerprint)
    lo, hi = distributed.shard_bounds(prep.n)
    parts = []
    if hi > lo:
        mine = TokenBatch(editor.tok, list(prep.requests[lo:hi]), editor.templates, editor.anchor_cfg.batch_size,
                          editor.anchor_cfg.chunk_order)
        parts.append(optimize_anchors(editor.model, editor.adapter, mine.chunks, layer, editor.anchor_cfg,
                                      pad_id(editor.tok)))
    cpu = [dataclasses.replace(a, **{k: getattr(a, k).cpu() for k in _ANCHOR_TENSORS}) for a in parts]
    gathered = [a for part in distributed.all_gather_object(cpu) for a in part]  # rank order = request order
    return concat_anchors(layer, gathered, max(a.seconds for a in gathered), editor.anchor_cfg.site,
                          {"world_size": distributed.world_size()})


class Editor:
    """Edits facts in ``model`` (in place) with one solver and one target construction.

    >>> editor = Editor(model, tok, method="memit", targets="forward")
    >>> edit = editor.apply([EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")])
    >>> edit.undo()

    ``layers``: edited layers (default derived from depth); ``stats``: a kedit.stats.StatsSpec or a
    ``{layer: C [f, f]}`` mapping; ``anchor``: AnchorConfig overrides (dict) or an AnchorConfig;
    ``diagnostics``: record per edited layer the remaining residual ratio at the last layer, the cosine
    between its own and its induced output change, and its update norm (one extra bare-prompt pass per
    layer), plus what the solver reports per layer (AlphaEdit: ``null_dim`` and its threshold, always);
    ``key_weighting``: how a request's template keys are averaged into its key K (every solver, ROME's k* too):
    ``"grouped"`` (default, MEMIT's reference: bare prompt 1/2, the prefixed templates share the other 1/2) or
    ``"flat"`` (plain mean over all templates; kedit before issue 11, ROME's reference), see
    ``kedit.templates.template_weights``; other keyword arguments are the solver's hyperparameters, for a name
    or an object alike (applied with ``dataclasses.replace``, unknown names rejected). Defaults are the solver
    dataclass's own, whatever the target construction (one ``lam`` default: ``kedit.solvers.DEFAULT_LAM``);
    everything used is in ``config()``. Sequential calls to ``apply`` carry the solver state (e.g. MEMIT's
    ``C_cache``); ``reset()`` forgets it.

    ``anchor_cache``: a dict shared by several editors (e.g. one per solver), or a directory (then each
    entry is also written there and later runs resume from it), so that anchors already optimised for
    the same weights, request, layer, templates and anchor settings are reused, per request
    (kedit.anchor_cache): the anchors do not depend on the solver, so comparing solvers costs one
    optimisation per layer, and a batch that extends an earlier one optimises only its new requests.
    """

    def __init__(self, model, tok, method: str | Any = "memit", targets: str | Any = "forward",
                 layers: list[int] | None = None, *, stats: Any = None, anchor: AnchorConfig | dict | None = None,
                 seed: int = 0, diagnostics: bool = True, verbose: bool = False,
                 anchor_cache: dict | str | os.PathLike | None = None, key_weighting: str = DEFAULT_KEY_WEIGHTING,
                 **hparams: Any):
        self.model, self.tok = model, tok
        self.adapter = ArchitectureAdapter.from_model(model)
        self.builder = make_targets(targets) if isinstance(targets, str) else targets
        # names and objects alike: hparams applied (checked); the target construction never changes them
        self.solver = make_solver(method, **hparams) if isinstance(method, str) else with_hparams(method, **hparams)
        self.key_weighting = check_key_weighting(key_weighting)
        multi = getattr(self.solver, "multi_layer", True)
        self.layers = sorted(self.adapter.check_layer(int(x)) for x in (layers or default_layers(
            self.adapter.n_layers, multi)))
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"duplicate layers in {self.layers}")
        if not multi and len(self.layers) != 1:
            raise ValueError(f"{self.solver.name} edits exactly one layer; got layers {self.layers}")
        if isinstance(anchor, AnchorConfig):
            self.anchor_cfg = anchor
        else:
            self.anchor_cfg = default_anchor_config(model, multi, **(anchor or {}))
        self.stats = stats
        self.seed = seed
        self.diagnostics = diagnostics
        self.verbose = verbose
        self.fingerprint = model_fingerprint(model)
        self._anchor_store = AnchorStore(anchor_cache) if anchor_cache is not None else None
        self.state: dict[int, dict] = {layer: {} for layer in self.layers}
        self._C: dict[int, torch.Tensor] = {}
        self._templates: list[str] | None = None
        self.timings: dict[str, float] = {}

    # -- configuration -----------------------------------------------------------------------
    @property
    def templates(self) -> list[str]:
        if self._templates is None:
            t0 = time.perf_counter()
            # keyed by the weights that sample them now (not self.fingerprint: the model may have been edited
            # since this editor was built, and those templates must not be cached as the unedited model's)
            self._templates = context_templates(self.model, self.tok, seed=self.seed)
            self.timings["templates"] = time.perf_counter() - t0
        return self._templates

    def config(self) -> dict[str, Any]:
        """Everything this editor uses: model identity, dtype, placement, layers, hyperparameters, seed, templates.

        ``dtype``: the edited weights' dtype; ``devices``: where the W_out of every block lives
        (``{"cpu": 30}``, ``{"cuda:0": 20, "offload": 12}``); ``device_map``: accelerate's map when the
        model was dispatched, summarised as ``{device: n_modules}``.
        """
        import transformers

        stats = "user-supplied matrices" if isinstance(self.stats, dict) else describe(self.stats)
        info = model_info(self.model)
        return {
            "kedit_version": kedit.__version__, "transformers": transformers.__version__,
            "model": info.name, "revision": info.revision,
            "dtype": str(self.adapter.w_out_storage(self.layers[0]).dtype),
            "devices": self.adapter.offload_summary(), "device_map": device_map_summary(self.model),
            "fingerprint": self.fingerprint, "architecture": self.adapter.describe(),
            "method": self.solver.name, "solver": describe(self.solver),
            "targets": self.builder.name, "layers": self.layers, "key_weighting": self.key_weighting,
            "anchor": describe(self.anchor_cfg), "stats": stats, "seed": self.seed,
            "templates": self.templates, "kl_prompt": KL_PROMPT, "torch": torch.__version__,
        }

    def reset(self) -> None:
        """Forget sequential-editing state (C_cache, projectors)."""
        self.state = {layer: {} for layer in self.layers}

    def _log(self, msg: str) -> None:
        if self.verbose:
            print(f"[kedit] {msg}", file=sys.stderr, flush=True)

    # -- statistics --------------------------------------------------------------------------
    def second_moment(self, layer: int) -> torch.Tensor:
        """``C_layer = E[k k^T]`` [f, f] float64, computed once (for all layers in one pass) and kept."""
        if layer not in self._C:
            t0 = time.perf_counter()
            if isinstance(self.stats, dict):
                if layer not in self.stats:
                    raise KeditError(f"no second-moment matrix supplied for layer {layer}")
                self._C.update({k: v.double() for k, v in self.stats.items()})
            else:
                from kedit.stats import StatsSpec, second_moments

                spec = self.stats or StatsSpec()
                self._log(f"second-moment statistics for layers {self.layers} ({spec})")
                self._C.update(second_moments(self.model, self.tok, self.layers, spec, adapter=self.adapter,
                                              progress=self.verbose))
            self.timings["stats"] = self.timings.get("stats", 0.0) + time.perf_counter() - t0
        return self._C[layer]

    # -- forward passes the targets and the loop need ------------------------------------------
    @torch.no_grad()
    def _read(self, prep: TokenBatch, key_layers: list[int], hidden_layers: list[int], chunk: int = 256,
              bare_keys: dict[int, torch.Tensor] | None = None) -> tuple[dict[int, torch.Tensor],
                                                                          dict[int, torch.Tensor]]:
        """Template-averaged keys ``{l: [n, f]}`` and bare-prompt residuals ``{l: [n, d]}`` now.

        Keys are weighted per template by ``self.key_weighting`` (``kedit.templates.template_weights``). Given a
        dict ``bare_keys``, it is filled with the bare prompt's keys ``{l: [n, f]}`` of the same pass (r-ROME's
        numerator). Without ``key_layers`` only the bare-prompt rows are run (1/T of the template rows). Inputs
        go to the embedding's device; keys are captured on their W_out's device and summed there in the solve
        precision; all results are returned on CPU (``[n, f]``/``[n, d]``: small).
        """
        device = self.adapter.input_device
        keys = {layer: torch.zeros(prep.n, self.adapter.d_ff, dtype=work_dtype(self.adapter.layer_device(layer)),
                                   device=self.adapter.layer_device(layer)) for layer in key_layers}
        bare_parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in key_layers}
        weights = template_weights(self.templates, self.key_weighting) if key_layers else None  # [T]
        hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in hidden_layers}
        rows = torch.arange(prep.key_ids.shape[0]) if key_layers else prep.bare_rows
        # rows by length, so that a chunk pads little (CounterFact, 6 templates: 34% of the cells were padding)
        rows = rows[torch.argsort(prep.key_mask[rows].sum(1), stable=True)]
        bare_req: list[torch.Tensor] = []  # request of each bare row, in the order the chunks met them
        for lo in range(0, len(rows), chunk):
            sl = rows[lo:lo + chunk]
            width = int(prep.key_mask[sl].sum(1).max())
            idx = (torch.arange(len(sl)), prep.key_decisive[sl])  # Trace moves it to each activation's device
            with Trace(self.adapter) as tr:
                for layer in key_layers:
                    tr.capture_key(layer, idx)
                for layer in hidden_layers:
                    tr.capture_block(layer, idx)
                tr.stop_after(max(key_layers + hidden_layers))
                tr.run(input_ids=prep.key_ids[sl, :width].to(device),
                       attention_mask=prep.key_mask[sl, :width].to(device))
            bare = (sl % prep.T) == 0  # row i*T is request i's bare prompt
            bare_req.append(prep.key_request[sl][bare])
            for layer in key_layers:
                acc = keys[layer]
                k = tr.keys[layer].to(device=acc.device, dtype=acc.dtype)  # [m, f]
                w = weights[sl % prep.T].to(device=acc.device, dtype=acc.dtype)  # [m]: row's template weight
                acc.index_add_(0, prep.key_request[sl].to(acc.device), k * w[:, None])
                if bare_keys is not None:
                    bare_parts[layer].append(k[bare.to(k.device)].cpu())
            for layer in hidden_layers:
                h = tr.blocks[layer]
                hidden[layer].append(h[bare.to(h.device)].float().cpu())
        order = torch.argsort(torch.cat(bare_req))  # bare rows back to request order

        def in_request_order(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(parts)[order]

        if bare_keys is not None:
            bare_keys.update({k: in_request_order(v) for k, v in bare_parts.items()})
        return ({k: v.cpu() for k, v in keys.items()}, {k: in_request_order(v) for k, v in hidden.items()})

    @torch.no_grad()
    def _replay(self, prep: TokenBatch, layer: int, z: torch.Tensor, read_layers: list[int]) -> dict[int, torch.Tensor]:
        """Outputs of ``read_layers`` when block ``layer`` outputs ``z`` at the decisive tokens (METHODS §6)."""
        if not read_layers:
            return {}
        device = self.adapter.input_device
        rows = prep.bare_rows
        width = int(prep.key_mask[rows].sum(1).max())
        idx = (torch.arange(prep.n), prep.key_decisive[rows])  # Trace moves index and z to block layer's device
        with Trace(self.adapter) as tr:
            tr.set_block(layer, idx, z)
            for later in read_layers:
                tr.capture_block(later, idx)
            tr.stop_after(max(read_layers))
            tr.run(input_ids=prep.key_ids[rows, :width].to(device),
                   attention_mask=prep.key_mask[rows, :width].to(device))
        return {later: tr.blocks[later].float().cpu() for later in read_layers}

    def _optimize(self, prep: TokenBatch, layer: int,
                  on_chunk: Callable[[torch.Tensor, Anchors], None] | None = None) -> Anchors:
        """Anchors of every request of ``prep`` at ``layer`` (split across ranks under torchrun).

        ``on_chunk``: see ``optimize_anchors`` (not called under torchrun, where ranks gather at the end).
        """
        if distributed.active(self.adapter.input_device):
            return _distributed_anchors(self, prep, layer)
        steps = self.anchor_cfg.steps
        with bar(len(prep.chunks) * steps, f"anchors L{layer}", "step", self.verbose) as pb:
            def on_step(chunk: int, step: int, converged: int) -> None:
                pb.n = chunk * steps + step
                pb.set_postfix_str(f"converged {converged}/{prep.chunks[chunk].n}", refresh=True)

            return optimize_anchors(self.model, self.adapter, prep.chunks, layer, self.anchor_cfg,
                                    pad_id(self.tok), on_step=on_step, on_chunk=on_chunk)

    def _session(self, prep: TokenBatch, log: dict[str, Any]):
        editor = self

        class Session:
            def optimize(self, layer: int) -> Anchors:
                t0 = time.perf_counter()
                store = editor._anchor_store
                rows: list[AnchorRow | None] = [None] * prep.n
                keys: list[str] = []
                if store is not None:  # the weights as they are now are part of the key (sequential editing)
                    from kedit.stats import tokenizer_identity

                    fp, tok_id = model_fingerprint(editor.model), tokenizer_identity(editor.tok)
                    keys = [anchor_key(fp, tok_id, layer, r, editor.templates, editor.anchor_cfg)
                            for r in prep.requests]
                    rows = [store.get(k) for k in keys]
                missing = [i for i, r in enumerate(rows) if r is None]
                reused = prep.n - len(missing)
                editor._log(f"anchors at layer {layer}: {reused} reused, {len(missing)} to optimise")
                fresh = None
                if missing:
                    todo = prep if not reused else TokenBatch(
                        editor.tok, [prep.requests[i] for i in missing], editor.templates,
                        editor.anchor_cfg.batch_size, editor.anchor_cfg.chunk_order)
                    stored: set[int] = set()

                    def keep(indices: torch.Tensor, part: Anchors) -> None:  # each chunk as it finishes
                        for j, row in zip(indices.tolist(), split_rows(part), strict=True):
                            store.put(keys[missing[j]], row)
                            stored.add(missing[j])

                    fresh = editor._optimize(todo, layer, on_chunk=keep if store is not None else None)
                    for i, row in zip(missing, split_rows(fresh), strict=True):
                        rows[i] = row
                        if store is not None and i not in stored:
                            store.put(keys[i], row)
                if fresh is not None and not reused:
                    a = fresh
                else:
                    a = join_rows(layer, rows, fresh.seconds if fresh else 0.0, fresh.flops if fresh else 0.0)
                log.setdefault("anchors", []).append({
                    "layer": layer, "reused": reused, "optimised": len(missing),
                    "seconds": round(fresh.seconds, 3) if fresh else 0.0,
                    "gflops": round(fresh.flops / 1e9, 2) if fresh else 0.0,
                    "nll_start": a.nll_start.mean().item(), "nll_end": a.nll_end.mean().item(),
                    "steps_mean": a.steps.float().mean().item(), "replay": a.extra["replay"], "site": a.site,
                    "norm_mean": a.norm.mean().item() if a.norm is not None else None,
                })
                log["optimize_seconds"] = log.get("optimize_seconds", 0.0) + time.perf_counter() - t0
                return a

            def replay(self, layer: int, z: torch.Tensor, read_layers: list[int]) -> dict[int, torch.Tensor]:
                return editor._replay(prep, layer, z, read_layers)

        return Session()

    # -- the loop ------------------------------------------------------------------------------
    def prepare(self, requests: list[EditRequest]) -> tuple[TokenBatch, Any, dict[str, Any]]:
        """Validate, tokenise, compute statistics and build the targets (before any weight changes)."""
        check_batch(requests)
        check_limits(self.tok, requests)  # before any forward pass: long inputs cost minutes and rarely take
        prep = TokenBatch(self.tok, requests, self.templates, self.anchor_cfg.batch_size, self.anchor_cfg.chunk_order)
        for layer in self.layers:
            self.second_moment(layer)
        log: dict[str, Any] = {}
        targets = self.builder.build(self._session(prep, log), self.layers)
        return prep, targets, log

    def apply(self, requests: list[EditRequest]) -> Edit:
        """Edit the model in place for ``requests``; returns the Edit (undo, save). All or nothing.

        Sequential use: the solver state (e.g. ``C_cache``) is carried to the next ``apply``.
        """
        t_start = time.perf_counter()
        prep, targets, log = self.prepare(requests)
        self.timings["optimize"] = log.get("optimize_seconds", 0.0)
        edit, pending = self._edit_loop(requests, prep, targets, log)
        if distributed.active(self.adapter.input_device):  # every rank solved the same problem: same weights
            try:
                distributed.check_same("edited weights digest", distributed.weights_digest(
                    [self.adapter.w_out(layer) for layer in edit.layers]))
            except KeditError:
                edit.undo()
                raise
        previous = copy.deepcopy(self.state)
        try:
            for layer, problem, delta in pending:
                self.state[layer] = problem.state
                if hasattr(self.solver, "update_state"):
                    self.solver.update_state(self.state[layer], problem, delta)
        except BaseException:  # Ctrl-C too: weights and solver state go back together
            self.state = previous
            edit.undo()
            raise
        edit._on_undo = lambda: setattr(self, "state", previous)
        edit.record["timings"]["total"] = time.perf_counter() - t_start
        return edit

    def apply_each(self, requests: list[EditRequest], skip_failures: bool = False) -> Iterator[Edit | None]:
        """Single-request editing: all anchors optimised in one batch, then each request applied alone.

        Yields each applied Edit; the caller scores it and must ``undo()`` it before the next one
        (the solver state is not carried: every edit starts from the same weights). With
        ``skip_failures`` a request whose edit fails (EditFailed, model restored) yields None.
        """
        prep, targets, log = self.prepare(requests)
        self.timings["optimize"] = log.get("optimize_seconds", 0.0)
        for i, request in enumerate(requests):
            sub = TokenBatch(self.tok, [request], self.templates, 1)
            try:
                edit, _ = self._edit_loop([request], sub, targets.select([i]), log)
            except EditFailed:
                if not skip_failures:
                    raise
                yield None
                continue
            yield edit
            if edit.is_applied:
                raise KeditError("apply_each: undo() each yielded edit before asking for the next one")

    def _edit_loop(self, requests, prep: TokenBatch, targets, log: dict[str, Any]) -> tuple[Edit, list]:
        """Per edited layer, shallow to deep: current keys and states -> R -> solve -> apply."""
        record = {**self.config(), "n_requests": len(requests), "edit_layers": targets.edit_layers,
                  "world_size": distributed.world_size() if distributed.active(self.adapter.input_device) else 1}
        edit = Edit(requests, record)
        edit.targets = targets
        pending, diag = [], []
        # r-ROME's numerator v* - W k* needs the bare prompt's key beside the template-averaged k* (METHODS §5)
        wants_bare = any(getattr(s, "needs_K_bare", False) for s in (self.solver, getattr(self.solver, "base", None)))
        t_solve = time.perf_counter()
        final = targets.final_layer
        layer = targets.edit_layers[0]
        try:
            h_final_before = None
            for j, layer in enumerate(bar(desc="keys+solve", unit="layer", enabled=self.verbose and len(
                    targets.edit_layers) > 1, iterable=targets.edit_layers)):
                bare: dict[int, torch.Tensor] | None = {} if wants_bare else None
                keys, hidden = self._read(prep, [layer], sorted({layer, final}), bare_keys=bare)
                if self.diagnostics and h_final_before is None:
                    h_final_before = hidden[final]
                R = targets.residual(j, hidden.__getitem__)  # [n, d]
                # the solve runs on the edited layer's device in its solve precision (fp64 on CPU/CUDA)
                dev = self.adapter.layer_device(layer)
                at = {"device": dev, "dtype": work_dtype(dev)}
                problem = LayerProblem(layer, K=keys[layer].T.to(**at), R=R.T.to(**at),
                                       C=self.second_moment(layer).to(**at),
                                       W=self.adapter.w_out_weight(layer).detach().to(**at),
                                       state=copy.copy(self.state[layer]),
                                       K_bare=None if bare is None else bare[layer].T.to(**at))
                delta = self.solver.solve(problem)
                edit.add_layer(self.adapter, layer, delta)
                edit.problems[layer] = problem
                pending.append((layer, problem, delta))
                entry = {"layer": layer}
                if self.diagnostics:
                    entry = self._diagnose(prep, targets, layer, keys[layer], hidden, delta, h_final_before)
                if hasattr(self.solver, "diagnostics"):  # e.g. AlphaEdit's null_dim: recorded even without ours
                    entry.update(self.solver.diagnostics(problem))
                if len(entry) > 1:
                    diag.append(entry)
        except BaseException as e:  # Ctrl-C too: restore every touched layer, then re-raise as is
            edit.undo()
            if not isinstance(e, Exception):
                raise
            if isinstance(e, EditFailed):
                raise EditFailed(f"{e}; every touched layer was restored") from e
            raise EditFailed(f"editing failed at layer {layer} ({type(e).__name__}: {e}); "
                             "every touched layer was restored") from e
        record["timings"] = {"templates": self.timings.get("templates", 0.0), "stats": self.timings.get("stats", 0.0),
                             "optimize": log.get("optimize_seconds", 0.0), "solve": time.perf_counter() - t_solve}
        record["anchors"] = log.get("anchors", [])
        if diag:
            record["diagnostics"] = diag
        return edit, pending

    @torch.no_grad()
    def _diagnose(self, prep, targets, layer, K, hidden, delta, h_final_before) -> dict[str, Any]:
        """Remaining residual at the last layer, cos(own change, induced change), update norm."""
        final = targets.final_layer
        _, after = self._read(prep, [], [final])  # bare prompts only: cheap enough to be on by default
        z = targets.final_target
        start = (z - h_final_before).norm(dim=-1)
        D = delta.dense().double().cpu()  # [d, f]
        own = (K.double() @ D.T).float()  # [n, d] this layer's output change
        induced = after[final] - hidden[final]  # [n, d] change it caused at the last layer
        cos = torch.nn.functional.cosine_similarity(own, induced, dim=-1)
        return {"layer": layer, "residual_ratio": ((z - after[final]).norm(dim=-1) / start).mean().item(),
                "cos_own_induced": cos.mean().item(), "delta_norm": D.norm().item()}
