"""EditRequest: a validated, immutable edit request, and readers for request files.

A request is ``(prompt, subject, target_new, target_true?)``. The prompt holds one ``{}`` where the
subject goes, or contains the subject's text exactly once (it is then turned into a template).
Evaluation extras (``paraphrases``, ``neighbors``) ride along for the harness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kedit.errors import BadRequest, InputFileError
from kedit.io import read_records, read_text


@dataclass(frozen=True)
class EditRequest:
    prompt: str                      # template with exactly one "{}" for the subject
    subject: str
    target_new: str                  # scored as the continuation " " + target_new (METHODS §1)
    target_true: str | None = None
    case_id: str | int | None = None
    paraphrases: tuple[str, ...] = field(default=(), compare=False)           # filled prompts
    neighbors: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # (filled prompt, answer)

    def __post_init__(self) -> None:
        where = f" (request {self.case_id})" if self.case_id is not None else ""
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise BadRequest(f"empty subject{where}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise BadRequest(f"empty prompt{where}")
        n_slots = self.prompt.count("{}")
        if n_slots > 1:
            raise BadRequest(f"prompt {self.prompt!r} has {n_slots} '{{}}' slots; exactly one is allowed{where}")
        if n_slots == 0:
            n_occ = self.prompt.count(self.subject)
            if n_occ != 1:
                raise BadRequest(
                    f"subject {self.subject!r} {'is absent from' if n_occ == 0 else f'occurs {n_occ} times in'} "
                    f"prompt {self.prompt!r}; write the prompt with one '{{}}' or the subject exactly once{where}"
                )
            object.__setattr__(self, "prompt", self.prompt.replace(self.subject, "{}"))
        for name in ("target_new", "target_true"):
            value = getattr(self, name)
            if value is None and name == "target_true":
                continue
            if not isinstance(value, str) or not value.strip():
                raise BadRequest(f"{name} is empty or whitespace{where}")
            object.__setattr__(self, name, value.strip())
        if self.case_id is not None and (not isinstance(self.case_id, str | int) or isinstance(self.case_id, bool)):
            raise BadRequest(f"case_id must be a string or an integer, got {type(self.case_id).__name__}")
        if isinstance(self.paraphrases, str) or not all(isinstance(p, str) for p in self.paraphrases):
            raise BadRequest(f"paraphrases must be a list of strings{where}")
        if isinstance(self.neighbors, str) or not all(
                isinstance(n, list | tuple) and len(n) == 2 and all(isinstance(x, str) for x in n)
                for n in self.neighbors):
            raise BadRequest(f"neighbors must be a list of [prompt, answer] string pairs{where}")
        object.__setattr__(self, "paraphrases", tuple(self.paraphrases))
        object.__setattr__(self, "neighbors", tuple((p, a) for p, a in self.neighbors))

    @property
    def filled(self) -> str:
        """The prompt with the subject written in."""
        return fill(self.prompt, self.subject)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prompt": self.prompt, "subject": self.subject, "target": self.target_new}
        if self.target_true is not None:
            d["true"] = self.target_true
        if self.case_id is not None:
            d["case_id"] = self.case_id
        return d


def fill(template: str, subject: str) -> str:
    """Write ``subject`` into the single ``{}`` of ``template`` (no str.format: prompts may hold braces)."""
    return template.replace("{}", subject, 1)


def check_batch(requests: list[EditRequest]) -> None:
    """Raise BadRequest for an empty batch or two requests that disagree on the same fact."""
    if not requests:
        raise BadRequest("no edit requests given")
    seen: dict[tuple[str, str], str] = {}
    for r in requests:
        key = (r.prompt, r.subject)
        if key in seen and seen[key] != r.target_new:
            raise BadRequest(
                f"conflicting requests for prompt {r.filled!r}: targets {seen[key]!r} and {r.target_new!r}"
            )
        seen[key] = r.target_new


def request_from_record(rec: dict[str, Any], where: str) -> EditRequest:
    """One request from a CounterFact ``requested_rewrite`` record or kedit's flat shape."""
    if not isinstance(rec, dict):
        raise BadRequest(f"{where}: expected a JSON object, got {type(rec).__name__}")
    try:
        if "requested_rewrite" in rec:
            rw = rec["requested_rewrite"]
            if isinstance(rw, list):
                if len(rw) != 1:
                    raise BadRequest(f"'requested_rewrite' holds {len(rw)} rewrites; expected 1")
                rw = rw[0]
            if not isinstance(rw, dict):
                raise BadRequest(f"'requested_rewrite' must be an object, got {type(rw).__name__}")
            true = _counterfact_str(rw, "target_true") if rw.get("target_true") is not None else None
            neighborhood = _list(rec, "neighborhood_prompts")
            if neighborhood and true is None:
                raise BadRequest("'neighborhood_prompts' need 'requested_rewrite.target_true'")
            return EditRequest(
                prompt=rw["prompt"], subject=rw["subject"], target_new=_counterfact_str(rw, "target_new"),
                target_true=true, case_id=rec.get("case_id"), paraphrases=tuple(_list(rec, "paraphrase_prompts")),
                neighbors=tuple((p, true) for p in neighborhood),
            )
        return EditRequest(
            prompt=rec["prompt"], subject=rec["subject"], target_new=rec["target"], target_true=rec.get("true"),
            case_id=rec.get("case_id"), paraphrases=tuple(_list(rec, "paraphrases")),
            neighbors=tuple(_list(rec, "neighbors")),
        )
    except KeyError as e:
        raise BadRequest(f"{where}: missing field {e.args[0]!r}") from None
    except BadRequest as e:
        raise BadRequest(f"{where}: {e}") from None


def _counterfact_str(rw: dict[str, Any], name: str) -> str:
    """``rw[name]["str"]`` of a CounterFact rewrite, else BadRequest naming the field."""
    value = rw[name]
    if not isinstance(value, dict) or not isinstance(value.get("str"), str):
        raise BadRequest(f"field 'requested_rewrite.{name}' must be an object with a string 'str', "
                         f"got {type(value).__name__}")
    return value["str"]


def _list(rec: dict[str, Any], name: str) -> list[Any]:
    value = rec.get(name, [])
    if not isinstance(value, list):
        raise BadRequest(f"field {name!r} must be a list, got {type(value).__name__}")
    return value


def read_text_file(path: Path, error: type[Exception] = InputFileError) -> str:
    """UTF-8 text of ``path``; a non-UTF-8 byte raises ``error`` naming the file, line and byte (kedit.io)."""
    return read_text(path, error)


def read_requests(path: str | Path) -> list[EditRequest]:
    """Requests from a JSON list or JSONL file; errors name the file and the line or index."""
    path = Path(path)
    if not path.is_file():
        raise BadRequest(f"request file {path} does not exist")
    out = [request_from_record(r, where) for where, r in read_records(path, BadRequest, InputFileError)]
    if not out:
        raise BadRequest(f"{path} holds no requests")
    return out
