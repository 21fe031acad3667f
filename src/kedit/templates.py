"""Context templates (METHODS §2): the bare prompt plus short prefixes sampled from the model.

ROME/MEMIT average keys and optimise anchors over ``"{}"`` and ~5 sampled prefixes of ~10
tokens, each ending in ``". {}"``. Sampling is seeded (kedit.sampling) and the result cached per
model fingerprint, so optimisation and solve always see the same strings, across runs too.
"""

from __future__ import annotations

import hashlib
import json

from kedit.errors import warn_cache_unwritable
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
            found = cached["templates"]
            if cached.get("spec") == json.loads(json.dumps(spec)) and isinstance(found, list) and found and \
                    all(isinstance(t, str) and t.count("{}") == 1 for t in found):
                return found
        except (ValueError, OSError, KeyError, AttributeError, TypeError):  # missing key, not an object
            pass  # unreadable cache: sample again and overwrite
    templates = ["{}"]
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
