"""Dataset loaders: every format, both zsRE conventions, slices, malformed records (index + field), skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kedit.errors import DatasetFormatError
from kedit.eval.datasets import filled_prompt, load_dataset, parse_spec, select_indices

CF = {"case_id": 7, "requested_rewrite": {"prompt": "{} is located in", "subject": "Angola", "relation_id": "P30",
                                          "target_new": {"str": "Antarctica"}, "target_true": {"str": "Africa"}},
      "paraphrase_prompts": ["Angola belongs to", "the Angola is in"], "neighborhood_prompts": ["Ghana is in"],
      "generation_prompts": ["Angola is"]}
EE = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
      "subject": "Danielle Darrieux", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux speaks",
      "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
ZS = {"subject": "Angola", "src": "Where is Angola located?", "pred": "x", "rephrase": "Angola is on which continent?",
      "alt": "Antarctica", "answers": ["Africa", "Afrika"], "loc": "nq question: who wrote hamlet",
      "loc_ans": "Shakespeare", "cond": ""}


def _write(tmp_path: Path, name: str, records: list, jsonl: bool = False) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return p


def test_counterfact_record(tmp_path):
    d = load_dataset(f"counterfact:{_write(tmp_path, 'cf.json', [CF])}")
    c = d.cases[0]
    assert (c.kind, c.case_id, c.index) == ("counterfact", 7, 0)
    assert c.request.prompt == "{} is located in" and filled_prompt(c) == "Angola is located in"
    assert (c.request.target_new, c.request.target_true) == ("Antarctica", "Africa")
    assert c.paraphrases == ("Angola belongs to", "the Angola is in")
    assert c.neighborhood == (("Ghana is in", "Africa"),) and c.generation_prompts == ("Angola is",)


def test_easyedit_record_templates_the_subject(tmp_path):
    c = load_dataset(f"easyedit:{_write(tmp_path, 'ee.json', [EE])}").cases[0]
    assert c.request.prompt == "The mother tongue of {} is" and c.request.target_true == "French"
    assert c.paraphrases == ("Danielle Darrieux speaks",)
    assert c.neighborhood == (("Michel Rocard is a native speaker of", "French"),)


def test_counterfact_spec_detects_the_mend_format(tmp_path):
    rec = {**EE, "prompt": "Danielle Darrieux, whose mother tongue as Danielle Darrieux knows, is"}
    d = load_dataset(f"counterfact:{_write(tmp_path, 'mend.json', [EE, rec])}")
    assert d.describe()["format"] == "mend" and d.kind == "counterfact"
    a, b = d.cases
    assert a.kind == "counterfact" and a.request.prompt == "The mother tongue of {} is"
    assert (a.request.target_new, a.request.target_true) == ("English", "French")
    assert a.paraphrases == ("Danielle Darrieux speaks",)                               # one paraphrase
    assert a.neighborhood == (("Michel Rocard is a native speaker of", "French"),)      # one neighbour
    assert b.request.prompt == "{}, whose mother tongue as Danielle Darrieux knows, is"  # first occurrence only
    assert load_dataset(f"counterfact:{_write(tmp_path, 'cf.json', [CF])}").describe()["format"] == "rome"
    # the neighbour is scored with its ground truth against target_new (NS), as in the ROME format
    from kedit.eval.results import pairs

    assert (("nb", 0, "ans"), "Michel Rocard is a native speaker of", "French", True) in pairs(a)
    assert (("nb", 0, "new"), "Michel Rocard is a native speaker of", "English", False) in pairs(a)
    for drop, field in (("rephrase_prompt", "rephrase_prompt"), ("ground_truth", "ground_truth")):
        bad = {k: v for k, v in EE.items() if k != drop} if drop != "ground_truth" else {**EE, "ground_truth": 3}
        path = _write(tmp_path, f"bad-{drop}.json", [EE, bad])
        with pytest.raises(DatasetFormatError) as e:
            load_dataset(f"counterfact:{path}")
        msg = str(e.value)
        assert "\n" not in msg and f"{path} record 1" in msg and repr(field) in msg, msg


def test_zsre_both_conventions_are_explicit(tmp_path):
    path = _write(tmp_path, "z.json", [ZS])
    a = load_dataset(f"zsre:{path}", zsre_target="answers")
    b = load_dataset(f"zsre:{path}", zsre_target="alt")
    ca, cb = a.cases[0], b.cases[0]
    assert ca.kind == "zsre" and ca.request.prompt == "Where is {} located?"
    assert (ca.request.target_new, ca.request.target_true) == ("Africa", None)        # ROME/MEMIT
    assert (cb.request.target_new, cb.request.target_true) == ("Antarctica", "Africa")  # EasyEdit
    assert ca.neighborhood == (("nq question: who wrote hamlet?", "Shakespeare"),)
    assert (ca.loc, ca.loc_ans) == ("nq question: who wrote hamlet", "Shakespeare")
    assert a.describe()["zsre_target"] == "answers" and b.describe()["zsre_target"] == "alt"
    with pytest.raises(DatasetFormatError, match="zsre_target"):
        load_dataset(f"zsre:{path}")


def test_kedit_jsonl(tmp_path):
    rec = {"prompt": "{} is located in", "subject": "Angola", "target": "Antarctica", "true": "Africa",
           "paraphrases": ["Angola belongs to"], "neighbors": [["Ghana is in", "Africa"]], "case_id": "x1"}
    c = load_dataset(f"kedit:{_write(tmp_path, 'k.jsonl', [rec, rec], jsonl=True)}").cases[1]
    assert c.case_id == "x1" and c.index == 1 and c.neighborhood == (("Ghana is in", "Africa"),)


@pytest.mark.parametrize("kind,record,field", [
    ("counterfact", {**CF, "requested_rewrite": {**CF["requested_rewrite"], "target_new": {}}},
     "requested_rewrite.target_new.str"),
    ("counterfact", {k: v for k, v in CF.items() if k != "paraphrase_prompts"}, "paraphrase_prompts"),
    ("easyedit", {k: v for k, v in EE.items() if k != "locality_ground_truth"}, "locality_ground_truth"),
    ("zsre", {k: v for k, v in ZS.items() if k != "loc_ans"}, "loc_ans"),
    ("kedit", {"prompt": "{} is", "subject": "A"}, "target"),
])
def test_missing_field_names_file_index_and_field(tmp_path, kind, record, field):
    good = {"counterfact": CF, "easyedit": EE, "zsre": ZS, "kedit": {"prompt": "{} is", "subject": "A",
                                                                     "target": "B"}}[kind]
    path = _write(tmp_path, f"{kind}.json", [good, record, good])
    with pytest.raises(DatasetFormatError) as e:
        load_dataset(f"{kind}:{path}", zsre_target="alt")
    assert str(path) in str(e.value) and "record 1" in str(e.value) and repr(field) in str(e.value)


def test_subject_absent_is_malformed_and_skips_are_counted(tmp_path):
    bad = {**ZS, "subject": "Namibia"}
    path = _write(tmp_path, "z.json", [ZS, bad, ZS])
    with pytest.raises(DatasetFormatError, match=r"record 1: subject 'Namibia' is absent from src"):
        load_dataset(f"zsre:{path}", zsre_target="answers")
    d = load_dataset(f"zsre:{path}", zsre_target="answers", allow_skips=True)
    assert [c.index for c in d.cases] == [0, 2]
    assert d.describe()["n_skipped"] == 1 and d.skipped[0]["index"] == 1 and "Namibia" in d.skipped[0]["reason"]


def test_slices_are_recorded_and_seeded():
    assert select_indices(10, n=3, offset=2) == [2, 3, 4]
    s = select_indices(100, n=5, sample_seed=1)
    assert s == select_indices(100, n=5, sample_seed=1) == sorted(s) and s != select_indices(100, n=5, sample_seed=2)
    assert select_indices(5, n=10) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        select_indices(5, n=10, sample_seed=0)
    with pytest.raises(DatasetFormatError, match="KIND:PATH"):
        parse_spec("squad:x.json")


def test_shared_files_load():
    from conftest import shared_data

    d = load_dataset(f"counterfact:{shared_data('counterfact_subset500.json')}", n=5, offset=10)
    assert d.indices == list(range(10, 15)) and len(d.cases[0].neighborhood) == 10
    assert d.describe()["selection"] == {"n": 5, "offset": 10, "sample_seed": None}
    z = load_dataset(f"zsre:{shared_data('zsre_mend_eval_portability_gpt4.json')}", n=50, sample_seed=0,
                     zsre_target="answers")
    assert len(z.cases) == 50 and all(c.kind == "zsre" for c in z.cases)
    e = load_dataset(f"easyedit:{shared_data('counterfact_mend_format/counterfact-val.json')}", n=3)
    assert e.cases[0].request.target_true
    m = load_dataset(f"counterfact:{shared_data('counterfact_mend_format/counterfact-edit.json')}", n=1000)
    assert m.describe()["format"] == "mend" and m.n_records == 10000 and len(m.cases) == 1000
