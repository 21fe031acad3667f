"""Memory plan: the peak memory of each phase of an edit, from the model's config alone (no weights loaded).

The model is built on the ``meta`` device, which gives the exact
parameter count, dtype bytes and the edited layers' shapes for any architecture transformers knows;
the rest is arithmetic over what kedit's code allocates, phase by phase:

- weights: every distinct parameter and buffer, in the load dtype (exact);
- stats: one fp64 ``[f, f]`` accumulator per edited layer (exact; kept by the editor for the whole run),
  plus one token batch (``StatsSpec.batch_tokens``) through the model up to the deepest edited layer,
  or the mirror of the upper triangle at the end (3 transient ``[f, f]``), whichever is larger;
- anchors: one chunk of ``AnchorConfig.batch_size`` requests x templates rows: the no-grad set-up pass
  (logits + key/value cache), then the activations saved for the backward pass through the blocks
  above the anchor layer on the suffix columns, and the fp32 logits of the loss;
- keys: template-averaged keys ``[n, f]`` fp64 per layer and one key-reading chunk (256 rows);
- solve: the fp64 ``[f, f]`` system and its LU factorisation per layer (AlphaEdit: ``eigh`` + projector),
  the fp64 copy of W_out kept in ``Edit.problems``, and the sequential-editing state (``C_cache``);
- undo: the copy of each edited W_out kept for a bit-identical undo (``d * f`` in the load dtype per layer).

Activation terms are estimates (the coefficients below count the tensors a Llama block keeps alive);
tests/test_plan.py checks them against measured allocations within a stated factor.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit.errors import KeditError

GIB = 2 ** 30
F64 = 8
F32 = 4
KEY_CHUNK = 256  # rows per key-reading pass (Editor._read)
SOLVE_FF = {"memit": 3, "emmet": 3, "rome": 3, "prune": 3, "rect": 3, "alphaedit": 4}  # transient [f, f] fp64
EIGH_FF = 3  # eigh: eigenvectors + LAPACK workspace (syevd) + the projector U U^T

# published hyperparameters of common checkpoints (config.json of each), for planning without any file
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False),
    "llama3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, tie_word_embeddings=False),
    "gpt-j-6b": dict(model_type="gptj", vocab_size=50400, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                     n_positions=2048, tie_word_embeddings=False),
    "gpt2-xl": dict(model_type="gpt2", vocab_size=50257, n_embd=1600, n_layer=48, n_head=25, n_positions=1024,
                    tie_word_embeddings=True),
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    """What the plan needs to know about a model: sizes from its config and its meta-device build."""

    name: str
    n_params: int      # distinct parameters (tied ones once)
    n_buffers: int     # buffer elements (RoPE tables etc.), kept in their own dtype by transformers
    d: int             # d_model
    f: int             # d_ff (W_out input width)
    n_layers: int
    vocab: int
    q_dim: int         # heads * head_dim
    kv_dim: int        # kv heads * head_dim
    heads: int
    gated: bool        # SwiGLU-style MLP (gate, up, act*up alive together)


def load_config(source: str | dict | Path):
    """A transformers config from a preset name, a dict, a config.json path, a model directory or an embedded name."""
    from transformers import AutoConfig

    if isinstance(source, dict):
        d = dict(source)
        return AutoConfig.for_model(d.pop("model_type"), **d)
    if str(source) in SHAPES:
        return load_config(SHAPES[str(source)])
    p = Path(source).expanduser()
    if p.is_file() and p.suffix == ".json":
        return load_config(json.loads(p.read_text()))
    if p.is_dir() and (p / "config.json").is_file():
        return load_config(json.loads((p / "config.json").read_text()))
    from kedit.models import EMBEDDED, kedit_home

    if str(source) in EMBEDDED:
        cached = kedit_home() / "models" / str(source) / "config.json"
        return load_config(cached if cached.is_file() else SHAPES[str(source)])
    raise KeditError(f"cannot plan for {source!r}: give a --shape preset ({', '.join(SHAPES)}), "
                     "a config.json path or a local HF model directory")


def model_shape(config, name: str = "model") -> Shape:
    """Build the model on the meta device (no memory) and read its exact sizes."""
    from transformers import AutoModelForCausalLM

    from kedit.arch import ArchitectureAdapter

    with torch.device("meta"):  # unlike accelerate's init_empty_weights, this also ties embeddings (counted once)
        model = AutoModelForCausalLM.from_config(config)
    adapter = ArchitectureAdapter.from_model(model, probe=False)
    heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or adapter.d_model // heads)
    gated = any(n.endswith(("gate_proj", "w1", "gate_up_proj")) for n, _ in model.named_modules())
    return Shape(name=name, n_params=sum(p.numel() for p in model.parameters()),
                 n_buffers=sum(b.numel() for b in model.buffers()), d=adapter.d_model, f=adapter.d_ff,
                 n_layers=adapter.n_layers, vocab=int(config.vocab_size), q_dim=heads * head_dim,
                 kv_dim=kv * head_dim, heads=heads, gated=gated)


def forward_bytes(s: Shape, tokens: int, rows: int, width: int, b: int) -> int:
    """Peak live activations of a no-grad forward over ``tokens`` (one block at a time).

    Residual in/out and norm output (3d), q/k/v and attention output, the MLP's intermediate tensors
    (gate, up and act(gate)*up: 3f gated, 2f otherwise) and the attention scores [rows, heads, width, width].
    """
    per_token = 3 * s.d + 2 * s.q_dim + 2 * s.kv_dim + (3 if s.gated else 2) * s.f
    return tokens * per_token * b + rows * s.heads * width * width * b


def backward_bytes(s: Shape, rows: int, suffix: int, width: int, layers_above: int, scored: int, kl_rows: int,
                   b: int) -> int:
    """Tensors autograd saves for one anchor backward pass (blocks above the anchor layer, suffix columns).

    Per token and block: both norms' inputs (2d) and outputs (2d), q, k, v, the attention output and its
    projection input (2 q_dim + 2 kv_dim + d), the MLP's inputs of the products (gate, act, up: 3f gated);
    per row, the keys/values over the whole width that attention reads (2 kv_dim * width); and the fp32
    loss logits: log-softmax over the vocabulary for ``scored`` target tokens (3 copies) and ``kl_rows``
    KL rows (4 copies: logits, log-probabilities, probabilities, their product).
    """
    per_token = 5 * s.d + 2 * s.q_dim + 2 * s.kv_dim + (3 if s.gated else 2) * s.f
    blocks = layers_above * (rows * suffix * per_token + rows * width * 2 * s.kv_dim) * b
    return blocks + (3 * scored + 4 * kl_rows) * s.vocab * F32


@dataclass
class Phase:
    name: str
    resident: int      # bytes this phase leaves allocated for the rest of the run
    transient: int     # bytes alive only during the phase
    peak: int = 0      # weights + everything resident before + this phase's transient
    detail: dict[str, int] = field(default_factory=dict)
    note: str = ""


@dataclass
class Plan:
    model: str
    method: str
    layers: list[int]
    requests: int
    dtype: str
    phases: list[Phase]
    peak: int
    peak_phase: str
    assumptions: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """Human-readable table (GiB)."""
        g = lambda x: f"{x / GIB:9.2f}"  # noqa: E731
        lines = [f"memory plan: {self.model}, {self.method}, layers {self.layers}, {self.requests} requests, "
                 f"{self.dtype}", f"{'phase':<9}{'resident':>10}{'transient':>10}{'peak':>10}  GiB"]
        lines += [f"{p.name:<9}{g(p.resident)} {g(p.transient)} {g(p.peak)}  {p.note}" for p in self.phases]
        lines.append(f"peak {self.peak / GIB:.2f} GiB, during {self.peak_phase}")
        return "\n".join(lines)


def plan(shape: Shape, method: str = "memit", layers: list[int] | None = None, requests: int = 1,
         dtype: str | torch.dtype = "float32", *, batch_tokens: int | None = None, max_length: int = 256,
         anchor_batch: int | None = None, templates: int | None = None, width: int = 32, suffix: int = 8,
         target_tokens: int = 3, sequential: bool = True) -> Plan:
    """Peak memory per phase of editing ``requests`` facts at ``layers`` of ``shape`` (bytes; see module doc).

    ``width``/``suffix``/``target_tokens``: padded tokens per anchor row, columns from the decisive token
    on, and scored target tokens per row (kedit's templates are ~10 tokens + prompt + target).
    """
    from kedit.editor import default_layers
    from kedit.optimize import AnchorConfig
    from kedit.stats import StatsSpec
    from kedit.templates import PREFIXES

    if method not in SOLVE_FF:
        raise KeditError(f"unknown method {method!r} (choose from {', '.join(SOLVE_FF)})")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise KeditError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    b = torch.tensor([], dtype=dtype).element_size()
    layers = sorted(layers or default_layers(shape.n_layers, method != "rome"))
    if layers[0] < 0 or layers[-1] >= shape.n_layers:
        raise KeditError(f"layers {layers} out of range for a model with {shape.n_layers} layers")
    if requests < 1:
        raise KeditError(f"--requests must be >= 1, got {requests}")
    batch_tokens = batch_tokens or StatsSpec().batch_tokens
    anchor_batch = anchor_batch or AnchorConfig().batch_size
    templates = templates or 1 + len(PREFIXES)
    d, f, L, Le, n = shape.d, shape.f, shape.n_layers, len(layers), requests
    ff = F64 * f * f

    weights = shape.n_params * b + shape.n_buffers * F32
    # stats: accumulators are resident (the editor keeps every C_l for the run)
    rows = max(1, batch_tokens // max_length)
    batch = (forward_bytes(shape, batch_tokens, rows, max_length, b) + Le * batch_tokens * f * b
             + (batch_tokens * f * F32 if b < F32 else 0) + f * f * F32)
    stats = Phase("stats", resident=Le * ff, transient=max(batch, 3 * ff),
                  detail={"accumulators": Le * ff, "token_batch": batch, "mirror": 3 * ff},
                  note=f"{Le} x fp64 [f,f] + one {batch_tokens}-token batch")
    # anchors: per chunk of requests; the deepest cost is the first (shallowest) anchor layer
    c = min(n, anchor_batch)
    B = c * templates + c  # rewrite rows + KL rows
    above = L - layers[0] - 1
    setup = (forward_bytes(shape, B * width, B, width, b) + B * width * shape.vocab * b
             + L * B * width * 2 * shape.kv_dim * b)
    saved = backward_bytes(shape, B, suffix, width, above, c * templates * target_tokens, c, b)
    anchors = Phase("anchors", resident=Le * n * d * F32 * 3, transient=max(setup, saved),
                    detail={"setup_pass": setup, "saved_for_backward": saved},
                    note=f"chunks of {c} requests x {templates} templates, {above} blocks above layer {layers[0]}")
    # keys: fp64 [n, f] per layer plus one key-reading chunk through the model
    kr = min(KEY_CHUNK, n * templates)
    keys = Phase("keys", resident=0, transient=3 * n * f * F64 + forward_bytes(shape, kr * width, kr, width, b),
                 note=f"keys [n,f] fp64 + a {kr}-row read")
    # solve: per layer (one at a time); what stays: the W fp64 copy in Edit.problems, the low-rank delta,
    # the undo copies and the solver's sequential state
    per_layer = ((SOLVE_FF[method] * ff) + 2 * F64 * d * f + (EIGH_FF * ff if method == "alphaedit" else 0)
                 + (3 * F64 * d * f if method in ("prune", "rect") else 0))  # dense delta + SVD factors
    state = Le * ff * ((1 if sequential else 0) + (1 if method == "alphaedit" else 0))
    if sequential and method == "prune":  # the accumulated S and F(S), at most dense (rank grows with the edits)
        state += Le * 2 * F64 * d * f
    solve = Phase("solve", resident=Le * (F64 * d * f + F64 * n * (d + f)) + state, transient=per_layer,
                  detail={"per_layer_system": per_layer, "problems_W_fp64": Le * F64 * d * f, "state": state},
                  note=f"fp64 systems; {'eigh + projector; ' if method == 'alphaedit' else ''}"
                       f"{'C_cache kept' if sequential else ''}"
                       f"{' + accumulated edit' if sequential and method == 'prune' else ''}")
    undo = Phase("undo", resident=Le * d * f * b, transient=0, note=f"{Le} x W_out copies ({dtype})".replace(
        "torch.", ""))
    phases = [Phase("weights", resident=weights, transient=0, note=f"{shape.n_params / 1e9:.3f}B params"),
              stats, anchors, keys, undo, solve]
    held = 0
    for p in phases:  # in run order: each phase's peak sits on everything resident before it
        p.peak = held + p.resident + p.transient
        held += p.resident
    top = max(phases, key=lambda p: p.peak)
    return Plan(model=shape.name, method=method, layers=layers, requests=n, dtype=str(dtype).replace("torch.", ""),
                phases=phases, peak=top.peak, peak_phase=top.name,
                assumptions={"batch_tokens": batch_tokens, "max_length": max_length, "anchor_batch": anchor_batch,
                             "templates": templates, "width": width, "suffix": suffix,
                             "target_tokens": target_tokens, "sequential_state": sequential,
                             "activations": "estimates (see kedit.plan); weights and fp64 matrices exact"})
