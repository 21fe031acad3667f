"""Context templates (METHODS §2): the bare prompt plus short prefixes sampled from the model.

ROME/MEMIT average keys and optimise anchors over ``"{}"`` and ~5 sampled prefixes of ~10
tokens, each ending in ``". {}"``. Sampling is seeded (kedit.sampling) and the result cached per
model fingerprint, so optimisation and solve always see the same strings, across runs too.
"""

from __future__ import annotations

import hashlib
import json

from kedit.io import write_json
from kedit.models import kedit_home, model_fingerprint
from kedit.sampling import sample

PREFIXES = ("The", "Therefore", "Because", "I", "You")


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
            if cached.get("spec") == json.loads(json.dumps(spec)):
                return cached["templates"]
        except (ValueError, OSError):
            pass  # unreadable cache: sample again and overwrite
    templates = ["{}"]
    for i, prefix in enumerate(prefixes):
        for text in sample(model, tok, prefix, n_per_prefix, length, seed=seed * 1000 + i, top_k=5):
            # braces would break the template; newlines make odd prompts
            clean = " ".join(text.replace("{", " ").replace("}", " ").split())
            templates.append(clean + ". {}")
    write_json(path, {"spec": spec, "templates": templates}, indent=1)
    return templates
