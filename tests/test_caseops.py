"""Issue 5: CaseOps transform, data preparation and the data check."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lossless_caps as lc
import prepare_caseops_data as prep
import train_gpt as tg
from conftest import SHARED_DATA

CASEOPS_MODEL = SHARED_DATA / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
ALPHABET = st.sampled_from(list("aAbBzZ xY.é😀\n") + list(lc.MARKERS))


@settings(max_examples=400, deadline=None)
@given(st.text(ALPHABET, max_size=40) | st.text(max_size=40))
def test_roundtrip_any_text(s):
    enc = lc.encode(s)
    assert lc.decode(enc) == s
    assert not any("A" <= c <= "Z" for c in enc)
    assert sum(lc.original_byte_weights(enc)) == len(s.encode("utf-8"))


@settings(max_examples=600, deadline=None)
@given(st.text(ALPHABET, max_size=30))
def test_decode_accepts_exactly_the_encodings(s):
    """Bijectivity: every string decode accepts is the encoding of its decoding."""
    try:
        d = lc.decode(s)
    except lc.CaseOpsError:
        return
    assert lc.encode(d) == s


@pytest.mark.parametrize("word,enc", [
    ("hello", "hello"), ("Hello", lc.TITLE + "hello"), ("NASA", lc.ALLCAPS + "nasa"), ("A", lc.TITLE + "a"),
    ("McDonald", lc.TITLE + "mc" + lc.CAPNEXT + "donald"), ("iPhone", "i" + lc.CAPNEXT + "phone"),
    ("x" + lc.TITLE, "x" + lc.ESC + lc.TITLE), ("Äb", "Äb"), ("AB1cD", lc.ALLCAPS + "ab1c" + lc.CAPNEXT + "d"),
])
def test_known_encodings(word, enc):
    assert lc.encode(word) == enc and lc.decode(enc) == word


@pytest.mark.parametrize("bad,why", [
    (lc.TITLE, "TITLE must be followed"), (lc.ALLCAPS + "a", "non-canonical"), (lc.CAPNEXT + "a", "CAPNEXT"),
    ("a" + lc.CAPNEXT, "CAPNEXT must be followed"), (lc.ESC + "a", "ESC"), ("Abc", "raw uppercase"),
    (lc.TITLE + "a" + lc.CAPNEXT + "b", "non-canonical"), ("a" + lc.TITLE + "b", "inside a word"),
    (lc.ALLCAPS + "a" + lc.CAPNEXT + "b", "ALLCAPS"),
])
def test_decode_rejects_malformed(bad, why):
    with pytest.raises(lc.CaseOpsError, match=why):
        lc.decode(bad)


@pytest.mark.skipif(not CASEOPS_MODEL.exists(), reason="../shared/data (published CaseOps model) not present")
def test_compatible_with_published_caseops_model():
    sp = prep.load_lossless_sp(str(CASEOPS_MODEL))
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(lc.MARKERS)
    assert sp.bos_id() == 1 and sp.is_byte(8) and sp.is_byte(263)
    docs = [json.loads(line)["text"] for line in open(SHARED_DATA / "web_sample.jsonl", encoding="utf-8")]
    assert len(docs) > 1000
    for d in docs:
        toks, nbytes = prep.encode_doc(sp, d, 1)
        assert lc.decode(sp.decode(toks[1:].tolist())) == d
        assert int(nbytes.astype(np.int64).sum()) == len(d.encode("utf-8"))
        assert nbytes[0] == 0 and all(nbytes[toks == i].sum() == 0 for i in (4, 5, 6))


def _docs_of(path, bos=1):
    return {tuple(d.tolist()) for d in tg.split_docs(tg.load_shard(path), bos)}


def test_prep_end_to_end(caseops_data):
    m, out = caseops_data["manifest"], caseops_data["data_path"]
    assert m["val_docs"] == 200 and m["train_docs"] == 1000
    val = tg.shard_paths(str(out), "val")
    train = tg.shard_paths(str(out), "train")
    assert len(train) >= 3
    bos = sum(int((tg.load_shard(p) == 1).sum()) for p in val + train)
    assert bos == len(caseops_data["docs"])
    val_docs = set().union(*(_docs_of(p) for p in val))
    for p in train:
        assert not (_docs_of(p) & val_docs), "a validation document reached a training shard"
    for s in m["shards"]:
        assert prep.sha256_file(out / s["name"]) == s["sha256"]
    sp = prep.load_lossless_sp(str(caseops_data["tokenizer"]))
    first = tg.split_docs(tg.load_shard(val[0]), 1)[0]
    assert lc.decode(sp.decode(first[1:].tolist())) == caseops_data["docs"][0]
    assert m["val_bytes"] == sum(len(d.encode()) for d in caseops_data["docs"][:200])


def _tree(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".bin"}


def test_parallel_equals_serial_and_resume(caseops_data, tmp_path, monkeypatch):
    args = dict(docs_path=str(caseops_data["jsonl"]), tokenizer=str(caseops_data["tokenizer"]), val_docs=200,
                shard_tokens=40_000, progress=False)
    prep.prepare_shards(out=tmp_path / "par", workers=2, **args)
    assert _tree(tmp_path / "par") == _tree(caseops_data["data_path"])
    real_flush, calls = prep.ShardWriter.flush, []

    def dying_flush(self, next_doc, on_flush):
        if self.n and len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        real_flush(self, next_doc, on_flush)

    monkeypatch.setattr(prep.ShardWriter, "flush", dying_flush)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_shards(out=tmp_path / "res", workers=1, **args)
    assert (tmp_path / "res" / "prep_state.json").exists()
    monkeypatch.setattr(prep.ShardWriter, "flush", real_flush)
    m = prep.prepare_shards(out=tmp_path / "res", workers=1, **args)
    assert _tree(tmp_path / "res") == _tree(caseops_data["data_path"])
    assert m["train_docs"] == 1000 and not (tmp_path / "res" / "prep_state.json").exists()


def _cfg(data_path, tokenizer, vocab=400):
    cfg, _ = tg.load_config({"DATA_PATH": str(data_path), "TOKENIZER_PATH": str(tokenizer),
                             "VOCAB_SIZE": str(vocab), "CASEOPS_ENABLED": "1"})
    return cfg


def test_data_check_accepts_good_data(caseops_data):
    cfg = _cfg(caseops_data["data_path"], caseops_data["tokenizer"])
    rep = tg.check_dataset(cfg, tg.check_tokenizer(cfg), need_bos=True)
    assert rep.val_docs == 200 and rep.overlap_docs == 0 and rep.val_bytes == caseops_data["manifest"]["val_bytes"]


def _copy(caseops_data, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(caseops_data["data_path"], d)
    return d


def _mutate(path, fn):
    tg.write_shard(path, fn(tg.load_shard(path).copy()))


def _no_bos(d):
    for p in d.glob("fineweb_*.bin"):
        if "bytes" not in p.name:
            _mutate(p, lambda t: t[t != 1])
    for p in d.glob("fineweb_val_bytes_*.bin"):
        _mutate(p, lambda b: b[: tg.read_shard_header(d / p.name.replace("_bytes", ""))])


def _misaligned(d):
    _mutate(d / "fineweb_val_bytes_000000.bin", lambda b: b[:-1])


def _shifted_sidecar(d):
    _mutate(d / "fineweb_val_bytes_000000.bin", lambda b: np.roll(b, 1))


def _overlap(d):
    val = tg.load_shard(d / "fineweb_val_000000.bin")
    _mutate(d / "fineweb_train_000000.bin", lambda t: np.concatenate([val, t]))


def _truncated(d):
    p = d / "fineweb_train_000001.bin"
    p.write_bytes(p.read_bytes()[:-7])


@pytest.mark.parametrize("breaker,needle", [
    (_no_bos, "no BOS"), (_misaligned, "misaligned sidecar"), (_shifted_sidecar, "sidecar"),
    (_overlap, "leaked into training"), (_truncated, "truncated"),
])
def test_data_check_rejects_bad_data(caseops_data, tmp_path, breaker, needle):
    d = _copy(caseops_data, tmp_path)
    breaker(d)
    cfg = _cfg(d, caseops_data["tokenizer"])
    with pytest.raises(tg.DataError, match=needle) as e:
        tg.check_dataset(cfg, tg.check_tokenizer(cfg), need_bos=True)
    assert "prepare_caseops_data.py" in str(e.value) or "re-" in str(e.value)


def test_data_check_rejects_wrong_tokenizer(caseops_data, tmp_path):
    other = tmp_path / "other.jsonl"
    import synthetic_corpus

    other.write_text("".join(json.dumps({"text": t.upper() + " zz qq"}) + "\n"
                             for t in synthetic_corpus.generate_documents(600, seed=11)))
    wrong = prep.train_tokenizer(str(other), 400, str(tmp_path / "wrong"), skip_docs=0)
    cfg = _cfg(caseops_data["data_path"], wrong)
    with pytest.raises(tg.DataError, match="TOKENIZER_PATH|another tokenizer"):
        tg.check_dataset(cfg, tg.check_tokenizer(cfg), need_bos=True)


def test_known_split_fingerprint(caseops_data, tmp_path):
    d = tmp_path / "fineweb10B_sp1024"
    shutil.copytree(caseops_data["data_path"], d)
    cfg = _cfg(d, caseops_data["tokenizer"])
    with pytest.raises(tg.DataError, match="62021632"):
        tg.check_dataset(cfg, tg.check_tokenizer(cfg), need_bos=True)


def test_check_data_cli(caseops_data, capsys):
    import check_data

    args = ["--data-path", str(caseops_data["data_path"]), "--tokenizer", str(caseops_data["tokenizer"]),
            "--vocab-size", "400", "--caseops"]
    assert check_data.main(args) == 0
    assert json.loads(capsys.readouterr().out)["val_docs"] == 200
    assert check_data.main(args[:-2] + ["512", "--caseops"]) == 1
    assert "VOCAB_SIZE" in capsys.readouterr().err
