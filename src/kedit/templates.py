"""Context templates (METHODS §2): the bare prompt plus short prefixes sampled from the model.

ROME/MEMIT average keys and optimise anchors over ``"{}"`` and ~5 sampled prefixes of ~10
tokens, each ending in ``". {}"``. Sampling is seeded (kedit.sampling) and the result cached per
model fingerprint, so optimisation and solve always see the same strings, across runs too.
"""

from __future__ import annotations

import hashlib
import json

import torch

from kedit.errors import warn_cache_unwritable
from kedit.io import write_json
from kedit.models import kedit_home, model_fingerprint
from kedit.sampling import sample

PREFIXES = ("The", "Therefore", "Because", "I", "You")
BARE = "{}"  # the bare prompt: the only template without a prefix

# How the keys of one request's templates are averaged into its key k (METHODS §2):
# "grouped": MEMIT's reference ``compute_ks``: mean within each template group, then over the groups; the groups
#   are the bare prompt and the prefixed templates (kedit samples all prefixes at one length, i.e. one group), so
#   the bare key weighs 1/2 and each prefixed one 1/(2(T-1)). The default.
# "flat": the plain mean over all T templates (ROME's reference ``compute_u`` over its flat template list).
KEY_WEIGHTINGS = ("grouped", "flat")
DEFAULT_KEY_WEIGHTING = "grouped"  # the one default (Editor, CLI, template_weights)


def check_key_weighting(key_weighting: str) -> str:
    """``key_weighting`` itself if it is one of ``KEY_WEIGHTINGS``, else ValueError listing them."""
    if key_weighting not in KEY_WEIGHTINGS:
        raise ValueError(f"unknown key_weighting {key_weighting!r}; valid: {list(KEY_WEIGHTINGS)}")
    return key_weighting


def template_weights(templates: list[str], key_weighting: str = DEFAULT_KEY_WEIGHTING) -> torch.Tensor:
    """Weight of each template's key in a request's key ``[T]`` float64, summing to 1 (``KEY_WEIGHTINGS``).

    Groups follow from the list itself: the bare ``"{}"`` and the prefixed templates; an absent group (e.g. a
    bare-only list) is not counted, so a single template always weighs 1. Raises ValueError for an unknown mode.
    """
    check_key_weighting(key_weighting)
    if not templates:
        raise ValueError("no context templates")
    T = len(templates)
    if key_weighting == "flat":
        return torch.full((T,), 1.0 / T, dtype=torch.float64)
    bare = torch.tensor([t == BARE for t in templates])  # [T]
    groups = [g for g in (bare, ~bare) if g.any()]
    w = torch.zeros(T, dtype=torch.float64)
    for g in groups:
        w[g] = 1.0 / (len(groups) * int(g.sum()))
    return w


def context_templates(model, tok, seed: int = 0, n_per_prefix: int = 1, length: int = 10,
                      prefixes: tuple[str, ...] = PREFIXES, fingerprint: str | None = None) -> list[str]:
    """``["{}", "<sample>. {}", ...]``; each template holds one ``{}`` where the prompt goes."""
    fingerprint = fingerprint or model_fingerprint(model)
    spec = {"fingerprint": fingerprint, "seed": seed, "n": n_per_prefix, "length": length, "prefixes": prefixes}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    path = kedit_home() / "templates" / f"{digest}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            found = cached["templates"]
            if cached.get("spec") == json.loads(json.dumps(spec)) and isinstance(found, list) and found and \
                    all(isinstance(t, str) and t.count("{}") == 1 for t in found):
                return found
        except (ValueError, OSError, KeyError, AttributeError, TypeError):  # missing key, not an object
            pass  # unreadable cache: sample again and overwrite
    templates = [BARE]
    for i, prefix in enumerate(prefixes):
        for text in sample(model, tok, prefix, n_per_prefix, length, seed=seed * 1000 + i, top_k=5):
            # braces would break the template; newlines make odd prompts
            clean = " ".join(text.replace("{", " ").replace("}", " ").split())
            templates.append(clean + ". {}")
    try:
        write_json(path, {"spec": spec, "templates": templates}, indent=1)
    except OSError as e:  # read-only KEDIT_HOME: the sampled templates are still good for this run
        warn_cache_unwritable("templates", path, e)
    return templates
