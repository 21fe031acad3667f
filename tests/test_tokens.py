import pytest

from kedit.errors import BadRequest
from kedit.requests import EditRequest, read_requests
from kedit.tokens import encode_with_subject, target_ids, teacher_forced


def test_decisive_token_is_last_subject_token(tiny_tok):
    enc = encode_with_subject(tiny_tok, "The mother tongue of {} is", "Danielle Darrieux")
    text = "The mother tongue of Danielle Darrieux is"
    pieces = [tiny_tok.decode([i]) for i in enc.ids]
    assert "".join(pieces) == text
    upto = "".join(pieces[: enc.decisive + 1])
    assert upto.endswith("Darrieux") or upto.endswith("Darrieux".rstrip())
    assert "is" in "".join(pieces[enc.decisive + 1:])


def test_decisive_with_subject_at_start(tiny_tok):
    enc = encode_with_subject(tiny_tok, "{} plays basketball", "Michael Jordan")
    assert tiny_tok.decode(enc.ids[: enc.decisive + 1]) == "Michael Jordan"


def test_target_ids_include_leading_space(tiny_tok):
    ids = target_ids(tiny_tok, "The capital of France is", "Paris")
    assert tiny_tok.decode(ids) == " Paris"
    assert target_ids(tiny_tok, "The capital of France is ", "Paris") != []


def test_teacher_forced_positions(tiny_tok):
    p = [tiny_tok("a b")["input_ids"], tiny_tok("a b c d")["input_ids"]]
    t = [[7, 8], [9]]
    tf = teacher_forced(p, t, 0)
    assert tf.input_ids.shape[0] == 2
    assert tf.labels.tolist() == [7, 8, 9]
    assert tf.positions.tolist() == [len(p[0]) - 1, len(p[0]), len(p[1]) - 1]
    assert tf.input_ids[0, len(p[0])].item() == 7  # target[:-1] appended


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt="{} and {}", subject="A", target_new="B"), "2 '{}' slots"),
    (dict(prompt="The capital is", subject="France", target_new="B"), "absent"),
    (dict(prompt="France, France", subject="France", target_new="B"), "occurs 2 times"),
    (dict(prompt="{} is", subject=" ", target_new="B"), "empty subject"),
    (dict(prompt="{} is", subject="A", target_new="  "), "target_new is empty"),
])
def test_request_validation(kwargs, match):
    with pytest.raises(BadRequest, match=match):
        EditRequest(**kwargs)


def test_prompt_with_subject_written_in_becomes_template():
    r = EditRequest("The capital of France is", "France", " Berlin ")
    assert r.prompt == "The capital of {} is" and r.target_new == "Berlin"


def test_read_requests_shapes_and_errors(tmp_path):
    good = tmp_path / "r.jsonl"
    good.write_text('{"prompt": "{} is in", "subject": "Rome", "target": "Spain", "true": "Italy"}\n\n'
                    '{"case_id": 3, "requested_rewrite": {"prompt": "{} plays", "subject": "Jordan", '
                    '"target_new": {"str": "golf"}, "target_true": {"str": "basketball"}}}\n')
    rs = read_requests(good)
    assert [r.target_new for r in rs] == ["Spain", "golf"] and rs[1].case_id == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "{} is in", "subject": "Rome", "target": "Spain"}\n{"prompt": "{} x", "subject": "A"}\n')
    with pytest.raises(BadRequest, match=r"bad.jsonl:2: missing field 'target'"):
        read_requests(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(BadRequest, match="broken.jsonl:1: invalid JSON"):
        read_requests(broken)
