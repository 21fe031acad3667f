"""Seeded, bounded fuzzing of the input edges: corrupted patches and request files.

Through the API every input must either load (and then apply and undo cleanly) or raise a
KeditError subclass, and a refused input never changes a weight. Through the CLI (in process) a
handful must exit 2 with one line on stderr and no traceback.
"""

import json
import random
import warnings

import pytest
import torch
from conftest import make_tiny

from kedit.arch import ArchitectureAdapter
from kedit.edit import Edit, content_digest
from kedit.editor import Editor
from kedit.errors import KeditError
from kedit.requests import EditRequest, read_requests

SEED = 1234
N_PATCHES = 160
N_REQUEST_FILES = 160


@pytest.fixture(scope="module")
def setup(tiny_tok, tmp_path_factory):
    model = make_tiny("llama", tiny_tok)
    f = ArchitectureAdapter.from_model(model).d_ff
    editor = Editor(model, tiny_tok, layers=[1, 2], stats={i: torch.eye(f, dtype=torch.float64) for i in (1, 2)},
                    anchor={"steps": 2, "lr": 1.0}, diagnostics=False)
    edit = editor.apply([EditRequest("The capital of {} is", "France", "Berlin", "Paris"),
                         EditRequest("{} plays", "Michael Jordan", "the violin")])
    path = edit.save(tmp_path_factory.mktemp("fuzz") / "good.safetensors")
    edit.undo()
    return model, path


def _header_len(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _mutate_json(rng: random.Random, obj, depth=0):
    """One random structural change somewhere in a JSON value (type swap, deletion, odd values)."""
    odd = [None, -1, 0, 1.5, "", "x" * 3, [], {}, [1, 2], {"a": None}, True, float("1e308")]
    if isinstance(obj, dict) and obj and (depth < 3 and rng.random() < 0.6):
        key = rng.choice(sorted(obj))
        return {**obj, key: _mutate_json(rng, obj[key], depth + 1)}
    if isinstance(obj, list) and obj and (depth < 3 and rng.random() < 0.6):
        i = rng.randrange(len(obj))
        return obj[:i] + [_mutate_json(rng, obj[i], depth + 1)] + obj[i + 1:]
    if isinstance(obj, dict) and obj and rng.random() < 0.4:
        key = rng.choice(sorted(obj))
        return {k: v for k, v in obj.items() if k != key}
    return rng.choice(odd)


def _corrupt_patch(rng: random.Random, data: bytes, header: dict, tensors: dict) -> tuple[str, bytes | None, dict]:
    """(kind, raw bytes) for byte-level damage, or (kind, None, metadata) for a re-digested metadata change."""
    kind = rng.choice(["flip-header", "flip-tensor", "truncate", "meta", "meta-nodigest", "garbage"])
    b = bytearray(data)
    hl = _header_len(data)
    if kind == "flip-header":
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(0, hl)] ^= 1 << rng.randrange(8)
        return kind, bytes(b), {}
    if kind == "flip-tensor":
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(hl, len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b), {}
    if kind == "truncate":
        return kind, bytes(b[:rng.randrange(0, len(b))]), {}
    if kind == "garbage":
        return kind, rng.randbytes(rng.randrange(0, 400)), {}
    meta = _mutate_json(rng, json.loads(header["kedit"]))
    return kind, None, {"meta": meta}


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fuzzed_patches_raise_kedit_errors_only_and_never_change_weights(setup, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, good = setup
    data = good.read_bytes()
    with safe_open(str(good), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    reference = Edit.load(good)
    base = _weights(model)
    rng = random.Random(SEED)
    outcomes: dict[str, int] = {}
    for i in range(N_PATCHES):
        kind, raw, extra = _corrupt_patch(rng, data, header, tensors)
        path = tmp_path / f"p{i}.safetensors"
        if raw is not None:
            path.write_bytes(raw)
        else:
            text = json.dumps(extra["meta"], sort_keys=True)
            digest = content_digest(text, tensors) if kind == "meta" else header["kedit_sha256"]
            save_file(tensors, str(path), metadata={"kedit": text, "kedit_sha256": digest})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                edit = Edit.load(path)
            edit.apply(model)
        except KeditError as e:
            assert "\n" not in str(e), (kind, str(e))
            outcomes[kind + ":refused"] = outcomes.get(kind + ":refused", 0) + 1
        except Exception as e:  # noqa: BLE001 - the point: nothing but KeditError may escape
            pytest.fail(f"case {i} ({kind}): {type(e).__name__}: {e}")
        else:
            # accepted: only metadata the digest covers but apply ignores may differ (e.g. the record)
            assert kind == "meta", (i, kind)
            assert all(torch.equal(reference.deltas[k].dense(), edit.deltas[k].dense()) for k in reference.deltas)
            edit.undo()
            outcomes[kind + ":accepted"] = outcomes.get(kind + ":accepted", 0) + 1
        assert all(torch.equal(base[k], v) for k, v in model.state_dict().items()), (i, kind)
    # the generator must really have exercised every kind of damage
    assert {k.split(":")[0] for k in outcomes} == {"flip-header", "flip-tensor", "truncate", "meta",
                                                   "meta-nodigest", "garbage"}, outcomes
    assert not any(k.startswith(("flip-tensor", "truncate", "meta-nodigest")) and k.endswith("accepted")
                   for k in outcomes), outcomes


def _request_file(rng: random.Random) -> bytes:
    good = {"prompt": "The capital of {} is", "subject": "France", "target": "Berlin", "true": "Paris",
            "neighbors": [["Lyon is in", "France"]], "paraphrases": ["France's capital is"]}
    cf = {"case_id": 1, "requested_rewrite": {"prompt": "{} is in", "subject": "Paris",
                                              "target_new": {"str": "Rome"}, "target_true": {"str": "France"}},
          "paraphrase_prompts": ["Paris lies in"], "neighborhood_prompts": ["Lyon is in"]}
    kind = rng.choice(["bytes", "types", "missing", "utf8", "jsonl", "cf"])
    if kind == "bytes":
        return rng.randbytes(rng.randrange(0, 200))
    if kind == "utf8":
        text = json.dumps([good]).encode()
        i = rng.randrange(len(text))
        return text[:i] + bytes([rng.choice([0x80, 0xC3, 0xFF, 0xFE])]) + text[i:]
    base = cf if kind == "cf" else good
    rec = _mutate_json(rng, base) if kind in ("types", "cf") else {k: v for k, v in base.items()
                                                                 if k != rng.choice(sorted(base))}
    if kind == "jsonl":
        return (json.dumps(good) + "\n" + json.dumps(_mutate_json(rng, good)) + "\n").encode()
    return json.dumps([rec]).encode()


def test_fuzzed_request_files_raise_kedit_errors_only(tmp_path):
    rng = random.Random(SEED + 1)
    ok = refused = 0
    for i in range(N_REQUEST_FILES):
        path = tmp_path / f"r{i}.json"
        path.write_bytes(_request_file(rng))
        try:
            reqs = read_requests(path)
        except KeditError as e:
            assert "\n" not in str(e) and str(path) in str(e), (i, str(e))
            refused += 1
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"request file {i} ({path.read_bytes()[:120]!r}): {type(e).__name__}: {e}")
        else:
            assert all(isinstance(r, EditRequest) for r in reqs)
            ok += 1
    assert refused > N_REQUEST_FILES // 2 and ok > 0


@pytest.mark.parametrize("case", range(6))
def test_cli_refuses_bad_inputs_with_one_line(setup, tmp_path, capsys, case):
    from kedit.cli import main

    _, good = setup
    rng = random.Random(SEED + 100 + case)
    data = good.read_bytes()
    if case < 3:
        path = tmp_path / "bad.safetensors"
        hl = _header_len(data)
        b = bytearray(data)
        if case == 0:
            b[rng.randrange(hl, len(b))] ^= 0x08
        elif case == 1:
            b = b[: rng.randrange(1, len(b))]
        else:
            b[rng.randrange(8, hl)] ^= 0x20
        path.write_bytes(bytes(b))
        argv = ["apply", str(path)]
    else:
        path = tmp_path / "bad.json"
        path.write_bytes([b"\xff\xfe[]", b'[{"requested_rewrite": []}]', b'{"prompt": 3}'][case - 3])
        argv = ["edit", "--requests", str(path)]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and str(path) in err, err
