"""Evaluation datasets -> ``EvalCase``: CounterFact (ROME / MCF JSON), EasyEdit flat CounterFact, zsRE
(with EasyEdit ``portability`` when present), MQuAKE (multi-hop, 1-4 rewrites per case), kedit JSONL.

A dataset is named by a spec string ``KIND:PATH`` (``counterfact``, ``easyedit``, ``zsre``, ``mquake``, ``kedit``).
``counterfact:PATH`` reads either format of CounterFact, told apart by the first selected record and
recorded as ``format`` in the provenance: ``rome`` (``requested_rewrite``, 2 paraphrases, ~10 neighbours)
or ``mend`` (the MEND/EasyEdit flat records, e.g. ``counterfact-edit.json`` with 10,000 records: one
paraphrase, one neighbourhood prompt scored with ``locality_ground_truth`` against ``target_new``).
The slice (offset, n, seeded sample) is chosen on record indices *before* parsing, so the same
spec and slice always name the same records; a malformed record raises ``DatasetFormatError``
naming the file, record index and field, or, with ``allow_skips``, is counted and reported.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kedit.errors import BadRequest, DatasetFormatError
from kedit.io import read_records
from kedit.requests import EditRequest, fill, request_from_record

KINDS = ("counterfact", "easyedit", "zsre", "mquake", "kedit")
ZSRE_TARGETS = ("answers", "alt")  # answers[0]: ROME/MEMIT convention; alt: EasyEdit convention (METHODS §8)


@dataclass(frozen=True)
class MultiHop:
    """What MQuAKE scores beyond the edits: multi-hop questions and the post-edit single hops."""

    questions: tuple[str, ...]
    answer: str                                 # pre-edit multi-hop answer
    answer_aliases: tuple[str, ...]
    new_answer: str                             # answer once every rewrite of the case is applied
    new_answer_aliases: tuple[str, ...]
    new_single_hops: tuple[tuple[str, str, tuple[str, ...]], ...] = ()  # (cloze, answer, aliases)


@dataclass(frozen=True)
class EvalCase:
    """One edit request plus what the metrics need. ``kind`` decides the metric family.

    ``neighborhood``: (filled prompt, ground-truth answer) pairs; for zsRE it holds the single
    ``(loc + "?", loc_ans)`` pair (ROME's zsRE convention). Paraphrases and generation prompts are filled.
    """

    request: EditRequest
    kind: str                                   # "counterfact" (ES/PS/NS family) or "zsre" (token accuracy)
    source: str                                 # file path
    index: int                                  # record index in the file (0-based; JSONL: line order)
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[tuple[str, str], ...] = ()
    generation_prompts: tuple[str, ...] = ()
    references: tuple[str, ...] = ()            # reference texts about the new object (consistency)
    loc: str | None = None
    loc_ans: str | None = None
    portability: tuple[tuple[str, str], ...] = ()  # (New Question, New Answer) pairs (zsRE + EasyEdit)
    edits: tuple[EditRequest, ...] = ()         # every rewrite of a multi-edit case (MQuAKE); () = (request,)
    multihop: MultiHop | None = None

    @property
    def case_id(self) -> str | int:
        return self.request.case_id if self.request.case_id is not None else self.index

    @property
    def requests(self) -> tuple[EditRequest, ...]:
        """The edit requests this case applies (one batch per case in single mode)."""
        return self.edits or (self.request,)


@dataclass
class Dataset:
    """Loaded cases plus the provenance recorded in every report."""

    cases: list[EvalCase]
    spec: str
    kind: str
    path: str
    n_records: int                              # records in the file
    indices: list[int]                          # selected record indices (before skips)
    selection: dict[str, Any]                   # offset / n / sample_seed as asked
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"index", "reason"} when allow_skips
    options: dict[str, Any] = field(default_factory=dict)        # e.g. zsre_target

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance: spec, slice, counts and skips."""
        return {"spec": self.spec, "kind": self.kind, "path": self.path, "n_records_in_file": self.n_records,
                "selection": self.selection, "n_selected": len(self.indices), "n_loaded": len(self.cases),
                "n_skipped": len(self.skipped), "skipped": self.skipped, "indices": self.indices, **self.options}


def parse_spec(spec: str) -> tuple[str, Path]:
    """``"KIND:PATH"`` -> (kind, path); raises DatasetFormatError for an unknown kind."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in KINDS or not path:
        raise DatasetFormatError(f"dataset spec {spec!r} must be KIND:PATH with KIND one of {', '.join(KINDS)}")
    return kind, Path(path).expanduser()


def _read_records(path: Path) -> list[Any]:
    """A JSON list, or JSONL (one object per line; blank lines ignored)."""
    if not path.is_file():
        raise DatasetFormatError(f"dataset file {path} does not exist")
    return [record for _, record in read_records(path, DatasetFormatError)]


def select_indices(total: int, n: int | None = None, offset: int = 0, sample_seed: int | None = None) -> list[int]:
    """Record indices: ``[offset, offset+n)``, or a seeded sample of ``n`` from ``[offset, total)`` (sorted)."""
    if offset < 0 or (n is not None and n < 1):
        raise ValueError(f"bad slice: offset={offset} (must be >= 0), n={n} (must be >= 1)")
    pool = range(offset, total)
    if n is None:
        return list(pool)
    if sample_seed is None:
        return list(pool[:n])
    if n > len(pool):
        raise ValueError(f"cannot sample n={n} records from {len(pool)} (file has {total}, offset {offset})")
    return sorted(random.Random(sample_seed).sample(pool, n))


def _get(rec: Any, dotted: str, where: str) -> Any:
    """Field ``a.b.c`` of a record, else DatasetFormatError naming the record and the missing field."""
    cur = rec
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise DatasetFormatError(f"{where}: missing field {dotted!r}")
        cur = cur[part]
    return cur


def _template(prompt: str, subject: str, where: str, field_name: str) -> str:
    """Template of a prompt that has the subject written in (first occurrence -> ``{}``)."""
    if not isinstance(prompt, str) or not isinstance(subject, str) or not subject:
        raise DatasetFormatError(f"{where}: field {field_name!r} and 'subject' must be non-empty strings")
    if subject not in prompt:
        raise DatasetFormatError(f"{where}: subject {subject!r} is absent from {field_name} {prompt!r}")
    return prompt.replace(subject, "{}", 1)


def _strs(value: Any, where: str, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DatasetFormatError(f"{where}: field {name!r} must be a list of strings")
    return tuple(value)


def _counterfact(rec: Any, where: str, **_: Any) -> dict[str, Any]:
    rw = _get(rec, "requested_rewrite", where)
    if isinstance(rw, list):  # Multi-CounterFact / MQuAKE style: one rewrite per record is supported
        if len(rw) != 1:
            raise DatasetFormatError(f"{where}: 'requested_rewrite' holds {len(rw)} rewrites; expected 1")
        rec = {**rec, "requested_rewrite": rw[0]}
    true = _get(rec, "requested_rewrite.target_true.str", where)
    req = EditRequest(prompt=_get(rec, "requested_rewrite.prompt", where),
                      subject=_get(rec, "requested_rewrite.subject", where),
                      target_new=_get(rec, "requested_rewrite.target_new.str", where), target_true=true,
                      case_id=rec.get("case_id"))
    return dict(request=req, kind="counterfact",
                paraphrases=_strs(_get(rec, "paraphrase_prompts", where), where, "paraphrase_prompts"),
                neighborhood=tuple((p, true) for p in _strs(_get(rec, "neighborhood_prompts", where), where,
                                                            "neighborhood_prompts")),
                generation_prompts=_strs(rec.get("generation_prompts", []), where, "generation_prompts"))


def _easyedit(rec: Any, where: str, **_: Any) -> dict[str, Any]:
    subject = _get(rec, "subject", where)
    prompt = _get(rec, "prompt", where)
    req = EditRequest(prompt=_template(prompt, subject, where, "prompt"), subject=subject,
                      target_new=_nonempty(rec, "target_new", where), target_true=_nonempty(rec, "ground_truth", where),
                      case_id=rec.get("case_id"))
    return dict(request=req, kind="counterfact", paraphrases=(_nonempty(rec, "rephrase_prompt", where),),
                neighborhood=((_nonempty(rec, "locality_prompt", where),
                               _nonempty(rec, "locality_ground_truth", where)),))


MEND_FIELDS = ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
               "locality_ground_truth")


def counterfact_format(record: Any) -> str:
    """``"mend"`` for a flat MEND/EasyEdit record (no ``requested_rewrite``, a ``ground_truth``), else ``"rome"``."""
    if isinstance(record, dict) and "requested_rewrite" not in record and "ground_truth" in record:
        return "mend"
    return "rome"


def _zsre(rec: Any, where: str, zsre_target: str = "answers", **_: Any) -> dict[str, Any]:
    subject, src = _get(rec, "subject", where), _get(rec, "src", where)
    answers = _get(rec, "answers", where)
    if not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
        raise DatasetFormatError(f"{where}: field 'answers' must be a non-empty list of strings")
    # answers[0] is the *true* answer: ROME/MEMIT "edit" towards it (the model rarely knows it);
    # EasyEdit edits towards `alt` and keeps answers[0] as ground truth.
    new, true = (answers[0], None) if zsre_target == "answers" else (_get(rec, "alt", where), answers[0])
    loc, loc_ans = _get(rec, "loc", where), _get(rec, "loc_ans", where)
    req = EditRequest(prompt=_template(src, subject, where, "src"), subject=subject, target_new=new,
                      target_true=true, case_id=rec.get("case_id"))
    # ROME's zsRE neighborhood prompt is `loc + "?"`, scored against " " + loc_ans
    port: tuple[tuple[str, str], ...] = ()
    if "portability" in rec:  # EasyEdit's one-hop portability: a question whose answer depends on the edit
        q, a = _get(rec, "portability.New Question", where), _get(rec, "portability.New Answer", where)
        for name, v in (("portability.New Question", q), ("portability.New Answer", a)):
            if not isinstance(v, str) or not v.strip():
                raise DatasetFormatError(f"{where}: field {name!r} must be a non-empty string")
        port = ((q, a),)
    return dict(request=req, kind="zsre", paraphrases=(_get(rec, "rephrase", where),),
                neighborhood=((loc + "?", loc_ans),), loc=loc, loc_ans=loc_ans, portability=port)


def _nonempty(rec: Any, dotted: str, where: str) -> str:
    v = _get(rec, dotted, where)
    if not isinstance(v, str) or not v.strip():
        raise DatasetFormatError(f"{where}: field {dotted!r} must be a non-empty string")
    return v


def _mquake(rec: Any, where: str, **_: Any) -> dict[str, Any]:
    rws = _get(rec, "requested_rewrite", where)
    if not isinstance(rws, list) or not rws:
        raise DatasetFormatError(f"{where}: field 'requested_rewrite' must be a non-empty list")
    case_id = rec.get("case_id")
    edits = []
    for j, rw in enumerate(rws):
        at = f"{where} requested_rewrite.{j}"  # errors name the record and the rewrite's field
        try:
            edits.append(EditRequest(prompt=_nonempty(rw, "prompt", at), subject=_nonempty(rw, "subject", at),
                                     target_new=_nonempty(rw, "target_new.str", at),
                                     target_true=_nonempty(rw, "target_true.str", at), case_id=case_id))
        except BadRequest as e:
            raise DatasetFormatError(f"{at}: {e}") from None
    questions = _strs(_get(rec, "questions", where), where, "questions")
    if not questions:
        raise DatasetFormatError(f"{where}: field 'questions' must hold at least one question")
    hops = _get(rec, "new_single_hops", where)
    if not isinstance(hops, list):
        raise DatasetFormatError(f"{where}: field 'new_single_hops' must be a list")
    single = tuple((_nonempty(h, "cloze", f"{where} new_single_hops.{j}"),
                    _nonempty(h, "answer", f"{where} new_single_hops.{j}"),
                    _strs(h.get("answer_alias", []) if isinstance(h, dict) else [], where,
                          f"new_single_hops.{j}.answer_alias")) for j, h in enumerate(hops))
    mh = MultiHop(questions, _nonempty(rec, "answer", where), _strs(rec.get("answer_alias", []), where, "answer_alias"),
                  _nonempty(rec, "new_answer", where),
                  _strs(rec.get("new_answer_alias", []), where, "new_answer_alias"), single)
    return dict(request=edits[0], kind="mquake", edits=tuple(edits), multihop=mh)


def _kedit(rec: Any, where: str, **_: Any) -> dict[str, Any]:
    for name in ("prompt", "subject", "target"):
        _get(rec, name, where)
    req = request_from_record(rec, where)
    return dict(request=req, kind="counterfact", paraphrases=req.paraphrases, neighborhood=req.neighbors,
                generation_prompts=_strs(rec.get("generation_prompts", []), where, "generation_prompts"),
                references=_strs(rec.get("references", []), where, "references"))


PARSERS = {"counterfact": _counterfact, "easyedit": _easyedit, "zsre": _zsre, "mquake": _mquake, "kedit": _kedit}


def load_dataset(spec: str, n: int | None = None, offset: int = 0, sample_seed: int | None = None,
                 zsre_target: str | None = None, allow_skips: bool = False) -> Dataset:
    """Load the selected records of ``spec`` (``KIND:PATH``) as EvalCases.

    zsRE needs ``zsre_target`` in {"answers", "alt"} (no silent default: the conventions disagree).
    Raises DatasetFormatError (file, record index, field) unless ``allow_skips``; then skips are recorded.
    """
    kind, path = parse_spec(spec)
    options: dict[str, Any] = {}
    if kind == "zsre":
        if zsre_target not in ZSRE_TARGETS:
            raise DatasetFormatError(f"zsRE needs an explicit target convention: zsre_target in {ZSRE_TARGETS} "
                                     f"('answers' = ROME/MEMIT answers[0], 'alt' = EasyEdit), got {zsre_target!r}")
        options["zsre_target"] = zsre_target
    records = _read_records(path)
    if not isinstance(records, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of records or JSONL")
    indices = select_indices(len(records), n, offset, sample_seed)
    parse = PARSERS[kind]
    if kind == "counterfact":  # one format per file, named in the provenance (a stray record errors by field)
        options["format"] = counterfact_format(records[indices[0]]) if indices else "rome"
        parse = _easyedit if options["format"] == "mend" else _counterfact
    cases, skipped = [], []
    for i in indices:
        where = f"{path} record {i}"
        try:
            if not isinstance(records[i], dict):
                raise DatasetFormatError(f"{where}: expected a JSON object, got {type(records[i]).__name__}")
            fields = parse(records[i], where, zsre_target=zsre_target)
            cases.append(EvalCase(source=str(path), index=i, **fields))
        except (DatasetFormatError, BadRequest) as e:
            msg = str(e) if str(e).startswith(where) else f"{where}: {e}"
            if not allow_skips:
                raise DatasetFormatError(msg) from None
            skipped.append({"index": i, "reason": msg})
    if not cases:
        raise DatasetFormatError(f"{path}: no usable records in the selection ({len(skipped)} skipped)")
    selection = {"n": n, "offset": offset, "sample_seed": sample_seed}
    return Dataset(cases, spec, kind, str(path), len(records), indices, selection, skipped, options)


def filled_prompt(case: EvalCase) -> str:
    """The edit prompt with the subject written in."""
    return fill(case.request.prompt, case.request.subject)
