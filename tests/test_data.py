"""Data: the CaseOps prep reproduces the published dataset, bad input fails cleanly, the data check names causes."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

import lossless_caps as lc
import prepare_caseops_data as prep
import synthetic_corpus
import train_gpt as tg
from conftest import SHARED_DATA, bytes_sentencepiece_keeps

CASEOPS_MODEL = SHARED_DATA / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
needs_shared = pytest.mark.skipif(not CASEOPS_MODEL.exists(),
                                  reason="../shared/data (published CaseOps tokenizer and samples) not present")


def shared_docs(name: str, every: int = 1) -> list[str]:
    lines = (SHARED_DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[::every]]


def surface_bytes_by_hand(surfaces: list[str]) -> list[int]:
    """An independent count, character by character over SentencePiece's surface strings: markers and an
    escaping ESC are free, the character after an ESC counts its own UTF-8 bytes, so does everything else."""
    out, escaped = [], False
    for s in surfaces:
        n = 0
        for ch in s:
            if escaped:
                n, escaped = n + len(ch.encode()), False
            elif ch == lc.ESC:
                escaped = True
            elif ch not in (lc.TITLE, lc.ALLCAPS, lc.CAPNEXT):
                n += len(ch.encode())
        out.append(n)
    return out


@needs_shared
@pytest.mark.parametrize("sample,every", [("web_sample", 1), ("wiki_sample", 10)])
def test_prep_matches_published_exporter_token_ids_and_sidecar(sample, every):
    sp = prep.load_tokenizer(str(CASEOPS_MODEL), "published")
    docs = shared_docs(sample, every)
    encoded = prep.encode_docs(sp, docs, 1, with_bytes=True)
    assert len(docs) > 1000
    folded = 0
    for text, (toks, nbytes) in zip(docs, encoded):
        caseops = lc.encode(text)
        assert toks[0] == 1 and nbytes[0] == 0  # BOS first, zero bytes
        assert toks[1:].tolist() == sp.encode(caseops)  # the model's own normalizer, as published
        surfaces = [p.surface for p in sp.encode(caseops, out_type="proto").pieces]
        assert nbytes[1:].tolist() == surface_bytes_by_hand(surfaces)
        assert int(nbytes.sum()) == bytes_sentencepiece_keeps(sp, text)
        controls = np.isin(toks[1:], [4, 5, 6]) & (toks[:-1] != 7)
        assert not nbytes[1:][controls].any()
        folded += sum(1 for s in surfaces if "\n" in s)
    assert folded > 0, "the sample must exercise whitespace folding"


@needs_shared
def test_published_worked_example():
    sp = prep.load_tokenizer(str(CASEOPS_MODEL), "published")
    (toks, nbytes), = prep.encode_docs(sp, ["Hello\n\nWorld  x"], 1, with_bytes=True)
    assert toks.tolist() == [1, 4, 8074, 8133, 4, 1858, 1898]
    assert nbytes.tolist() == [0, 0, 5, 2, 0, 5, 3]
    (toks, nbytes), = prep.encode_docs(sp, ["a" + lc.TITLE + "b é"], 1, with_bytes=True)
    assert nbytes.tolist()[1:5] == [1, 0, 3, 1]  # a, ESC (free), the escaped literal (3 bytes), b
    lossless = prep.load_tokenizer(str(CASEOPS_MODEL), "lossless")
    (toks_l, bytes_l), = prep.encode_docs(lossless, ["Hello\n\nWorld  x"], 1, with_bytes=True)
    assert toks_l.tolist() != [1, 4, 8074, 8133, 4, 1858, 1898] and int(bytes_l.sum()) == 15
    assert lc.decode(lossless.decode(toks_l[1:].tolist())) == "Hello\n\nWorld  x"


def test_prep_end_to_end(caseops_data):
    m, out = caseops_data["manifest"], caseops_data["data_path"]
    assert m["val_docs"] == 200 and m["train_docs"] == 1000 and m["tokenization"] == "published"
    val, train = tg.shard_paths(str(out), "val"), tg.shard_paths(str(out), "train")
    assert len(train) >= 3
    assert [s["tokens"] for s in m["shards"] if s["split"] == "train"][:-1] == [40_000] * (len(train) - 1)
    stream = np.concatenate([tg.load_shard(p) for p in val + train])
    assert int((stream == 1).sum()) == len(caseops_data["docs"])  # one BOS per document, shards cut mid-document
    val_stream = np.concatenate([tg.load_shard(p) for p in val])
    assert int((val_stream == 1).sum()) == 200
    train_stream = np.concatenate([tg.load_shard(p) for p in train])
    val_docs = {tuple(d.tolist()) for d in tg.split_docs(val_stream, 1)}
    assert not val_docs & {tuple(d.tolist()) for d in tg.split_docs(train_stream, 1)}
    for s in m["shards"]:
        assert prep.sha256_file(out / s["name"]) == s["sha256"]
    assert m["val_bytes"] == sum(len(d.encode("utf-8")) for d in caseops_data["docs"][:200])


def test_max_train_shards_stops_the_export(caseops_data, tmp_path):
    m = prep.prepare_shards(str(caseops_data["jsonl"]), str(caseops_data["tokenizer"]), tmp_path / "o", val_docs=200,
                            shard_tokens=40_000, max_train_shards=2, progress=False)
    assert [s["name"] for s in m["shards"] if s["split"] == "train"] == ["fineweb_train_000000.bin",
                                                                          "fineweb_train_000001.bin"]
    assert all(s["tokens"] == 40_000 for s in m["shards"] if s["split"] == "train")
    assert not (tmp_path / "o" / "fineweb_train_000002.bin").exists()


def _tree(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".bin"}


def _args(caseops_data):
    return dict(docs_path=str(caseops_data["jsonl"]), tokenizer=str(caseops_data["tokenizer"]), val_docs=200,
                shard_tokens=40_000, progress=False)


def _interrupt_after(monkeypatch, n: int):
    real, calls = prep.ShardStream._write, []

    def dying(self, k):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, k)

    monkeypatch.setattr(prep.ShardStream, "_write", dying)
    return real


def test_parallel_equals_serial_and_resume(caseops_data, tmp_path, monkeypatch):
    prep.prepare_shards(out=tmp_path / "par", workers=2, **_args(caseops_data))
    assert _tree(tmp_path / "par") == _tree(caseops_data["data_path"])
    real = _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_shards(out=tmp_path / "res", workers=1, **_args(caseops_data))
    assert (tmp_path / "res" / "prep_state.json").exists() and (tmp_path / "res" / "prep_carry.npz").exists()
    monkeypatch.setattr(prep.ShardStream, "_write", real)
    m = prep.prepare_shards(out=tmp_path / "res", workers=2, **_args(caseops_data))
    assert _tree(tmp_path / "res") == _tree(caseops_data["data_path"])
    assert m["train_docs"] == 1000 and not (tmp_path / "res" / "prep_state.json").exists()


def test_resume_refuses_a_changed_input(caseops_data, tmp_path, monkeypatch):
    docs = tmp_path / "docs.jsonl"
    shutil.copy(caseops_data["jsonl"], docs)
    args = _args(caseops_data) | {"docs_path": str(docs)}
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_shards(out=tmp_path / "o", **args)
    lines = docs.read_text().splitlines(keepends=True)
    lines[5] = json.dumps({"text": "an edited document"}) + "\n"
    docs.write_text("".join(lines))
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="changed since the interrupted run"):
        prep.prepare_shards(out=tmp_path / "o", **args)


BAD_LINES = {
    "invalid_json": (b'{"text": "unterminated\n', "invalid JSON"),
    "invalid_utf8": (b'{"text": "caf\xe9 au lait"}\n', "invalid UTF-8"),
    "lone_surrogate": (b'{"text": "half a pair \\ud800 here"}\n', "lone surrogate U+D800"),
    "missing_text": (b'{"title": "no text"}\n', "no 'text' field"),
    "null_text": (b'{"text": null}\n', "'text' is null"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_input_line_stops_with_location_and_no_trusted_partial_shard(caseops_data, tmp_path, case, capsys):
    raw, reason = BAD_LINES[case]
    lines = caseops_data["jsonl"].read_bytes().splitlines(keepends=True)
    bad_at = 700  # a training document: val shards and some train shards are already complete
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(b"".join(lines[:bad_at] + [raw] + lines[bad_at:]))
    out = tmp_path / "o"
    argv = _prep_args(caseops_data, out, docs)
    with pytest.raises(SystemExit) as e:
        prep.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1
    assert f"{docs}:{bad_at + 1}: document {bad_at}: {reason}" in err[-1]
    # every shard on disk is one the saved state lists as complete; nothing after the bad line was written
    state = json.loads((out / "prep_state.json").read_text())
    listed = {s["name"] for s in state["shards"]} | {s["sidecar"] for s in state["shards"] if "sidecar" in s}
    assert {p.name for p in out.glob("*.bin")} == listed and state["next_doc"] <= bad_at
    # --skip-bad on the same output resumes, skips the line and counts it; the rest equals a clean prep
    prep.main(argv + ["--skip-bad"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped_docs"] == 1 and manifest["skipped"][0]["line"] == bad_at + 1
    assert reason in manifest["skipped"][0]["reason"]
    assert _tree(out) == _tree(caseops_data["data_path"])


def _cfg(data_path, tokenizer, vocab=400):
    cfg, _ = tg.load_config({"DATA_PATH": str(data_path), "TOKENIZER_PATH": str(tokenizer),
                             "VOCAB_SIZE": str(vocab), "CASEOPS_ENABLED": "1"})
    return cfg


def _check(d, tokenizer):
    cfg = _cfg(d, tokenizer)
    return tg.check_dataset(cfg, tg.check_tokenizer(cfg))


def test_data_check_accepts_good_data(caseops_data):
    rep = _check(caseops_data["data_path"], caseops_data["tokenizer"])
    assert rep.val_docs == 200 and rep.overlap_hashes == [] and rep.val_bytes == caseops_data["manifest"]["val_bytes"]
    assert rep.tokenization == "published"


def _copy(caseops_data, tmp_path, name="data"):
    d = tmp_path / name
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


def _old_exporter(d):
    toks = tg.load_shard(d / "fineweb_val_000000.bin")
    _mutate(d / "fineweb_val_bytes_000000.bin", lambda b: np.where(np.isin(toks, [4, 5, 6]), 3, b))


def _overlap(d):
    val = tg.load_shard(d / "fineweb_val_000000.bin")
    _mutate(d / "fineweb_train_000000.bin", lambda t: np.concatenate([val, t]))


def _truncated(d):
    p = d / "fineweb_train_000001.bin"
    p.write_bytes(p.read_bytes()[:-7])


@pytest.mark.parametrize("breaker,needle", [
    (_no_bos, "no BOS"), (_misaligned, "misaligned sidecar"), (_shifted_sidecar, "misaligned sidecar"),
    (_old_exporter, "old exporter"), (_overlap, "validation data in training"), (_truncated, "truncated"),
])
def test_data_check_names_the_cause(caseops_data, tmp_path, breaker, needle):
    d = _copy(caseops_data, tmp_path)
    breaker(d)
    with pytest.raises(tg.DataError, match=needle) as e:
        _check(d, caseops_data["tokenizer"])
    assert "prepare_caseops_data.py" in str(e.value) or "re-" in str(e.value)


def test_data_check_rejects_wrong_tokenizer(caseops_data, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": t.upper() + " zz qq"}) + "\n"
                             for t in synthetic_corpus.generate_documents(600, seed=11)))
    wrong = prep.train_tokenizer(str(other), 400, str(tmp_path / "wrong"), skip_docs=0)
    with pytest.raises(tg.DataError, match="another tokenizer"):
        _check(caseops_data["data_path"], wrong)


def test_data_check_names_the_tokenization_option(caseops_data, tmp_path):
    made, claimed = "lossless", "published"  # (published ids re-encode the same under lossless: nothing to name)
    docs = tmp_path / "ws.jsonl"  # documents with newline runs, which the two tokenizations treat differently
    docs.write_text("".join(json.dumps({"text": t.replace(". ", ".\n\n")}) + "\n" for t in caseops_data["docs"]))
    d = tmp_path / "fineweb10B_sp400_lossless_caps_caseops_v1_reserved"
    prep.prepare_shards(str(docs), str(caseops_data["tokenizer"]), d, tokenization=made, val_docs=200,
                        shard_tokens=40_000, progress=False)
    assert _check(d, caseops_data["tokenizer"]).tokenization == made  # the preflight accepts both options
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(manifest | {"tokenization": claimed}))
    with pytest.raises(tg.DataError, match=f"tokenized with the {made} tokenization"):
        _check(d, caseops_data["tokenizer"])


def test_fingerprint_names_a_truncated_split(caseops_data, tmp_path):
    d = _copy(caseops_data, tmp_path, "fineweb10B_sp1024")
    with pytest.raises(tg.DataError, match="truncated validation split: 200 documents, the published split has 50000"):
        _check(d, caseops_data["tokenizer"])


def test_fingerprint_applies_to_the_published_tokenization_only(caseops_data, tmp_path, monkeypatch):
    d = _copy(caseops_data, tmp_path, "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved")
    n = tg.read_shard_header(d / "fineweb_val_000000.bin")
    monkeypatch.setitem(tg.KNOWN_VAL, d.name, tg.ValFingerprint(200, tg.targets_2048(n), n + 5))
    with pytest.raises(tg.DataError, match="tokenized differently"):
        _check(d, caseops_data["tokenizer"])
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(manifest | {"tokenization": "lossless"}))
    assert _check(d, caseops_data["tokenizer"]).tokenization == "lossless"  # no fingerprint for lossless shards


def test_check_data_cli(caseops_data, capsys):
    import check_data

    args = ["--data-path", str(caseops_data["data_path"]), "--tokenizer", str(caseops_data["tokenizer"]),
            "--vocab-size", "400", "--caseops"]
    assert check_data.main(args) == 0
    assert json.loads(capsys.readouterr().out)["val_docs"] == 200
    assert check_data.main(args[:-2] + ["512", "--caseops"]) == 1
    assert "VOCAB_SIZE" in capsys.readouterr().err


# ---- issue 17: every train shard, the sidecar's spaces and total, the prep's own output ----

def _last_train(d):
    return sorted(d.glob("fineweb_train_*.bin"))[-1]


def test_overlap_in_a_later_train_shard_is_found(caseops_data, tmp_path):
    d = _copy(caseops_data, tmp_path)
    assert len(list(d.glob("fineweb_train_*.bin"))) > 1
    val = tg.load_shard(d / "fineweb_val_000000.bin")
    _mutate(_last_train(d), lambda t: np.concatenate([t, val]))
    with pytest.raises(tg.DataError, match=f"{_last_train(d).name} has the most.*validation data in training"):
        _check(d, caseops_data["tokenizer"])


def test_a_bad_id_in_a_later_train_shard_fails_before_training(caseops_data, tmp_path):
    d = _copy(caseops_data, tmp_path)

    def bad(t):
        t[-5] = 999
        return t
    _mutate(_last_train(d), bad)
    with pytest.raises(tg.ConfigError, match=f"{_last_train(d).name} data has token id 999"):
        _check(d, caseops_data["tokenizer"])


def test_a_sidecar_that_miscounts_the_space_is_refused(caseops_data, tmp_path):
    import sentencepiece as spm

    d = _copy(caseops_data, tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(caseops_data["tokenizer"]))
    _, spaced = tg.plain_piece_lengths(sp, 400)
    toks = tg.load_shard(d / "fineweb_val_000000.bin")
    assert (spaced[toks] > 0).sum() > 100
    _mutate(d / "fineweb_val_bytes_000000.bin", lambda b: b + (spaced[toks] > 0))  # +1 byte on every U+2581 piece
    with pytest.raises(tg.DataError, match="U\\+2581 pieces"):
        _check(d, caseops_data["tokenizer"])


def test_the_published_byte_total_is_part_of_the_fingerprint(caseops_data, tmp_path, monkeypatch):
    d = _copy(caseops_data, tmp_path, "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved")
    n = sum(tg.read_shard_header(p) for p in d.glob("fineweb_val_[0-9]*.bin"))
    total = caseops_data["manifest"]["val_bytes"]
    monkeypatch.setitem(tg.KNOWN_VAL, d.name, tg.ValFingerprint(200, tg.targets_2048(n), n, total))
    assert _check(d, caseops_data["tokenizer"]).val_bytes == total
    monkeypatch.setitem(tg.KNOWN_VAL, d.name, tg.ValFingerprint(200, tg.targets_2048(n), n, total + 1))
    with pytest.raises(tg.DataError, match=f"totals {total} bytes; the published split has {total + 1}"):
        _check(d, caseops_data["tokenizer"])
    assert tg.KNOWN_VAL["fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"].bytes in (total + 1, 151_080_645)


def test_shards_of_another_prep_are_refused(caseops_data, tmp_path):
    d = _copy(caseops_data, tmp_path)
    shutil.copy(_last_train(d), d / "fineweb_train_000099.bin")  # left by an earlier, larger prep
    with pytest.raises(tg.DataError, match="not in its manifest.json.*fineweb_train_000099.bin"):
        _check(d, caseops_data["tokenizer"])


def _prep_args(caseops_data, out, docs=None):
    return ["shards", "--docs", str(docs or caseops_data["jsonl"]), "--tokenizer", str(caseops_data["tokenizer"]),
            "--out", str(out), "--val-docs", "200", "--shard-tokens", "40000", "--workers", "1", "--no-progress"]


def test_prep_refuses_a_folder_with_an_earlier_preps_shards(caseops_data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    shutil.copy(caseops_data["data_path"] / "fineweb_train_000000.bin", out / "fineweb_train_000007.bin")
    with pytest.raises(SystemExit, match="already holds 1 files of another prep"):
        prep.main(_prep_args(caseops_data, out))


def test_prep_refuses_zero_training_documents(caseops_data, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(caseops_data["jsonl"].read_text().splitlines(keepends=True)[:150]))
    with pytest.raises(SystemExit, match="no training data was written"):
        prep.main(_prep_args(caseops_data, tmp_path / "o", small))


def test_prep_refuses_a_token_over_the_sidecars_range(caseops_data, tmp_path, capsys):
    lines = caseops_data["jsonl"].read_text().splitlines(keepends=True)
    docs = tmp_path / "ws.jsonl"  # a val document with a 70,000-character whitespace run folded into one piece
    docs.write_text("".join(lines[:5] + [json.dumps({"text": "a" + " " * 70_000 + "b"}) + "\n"] + lines[5:]))
    with pytest.raises(SystemExit):
        prep.main(_prep_args(caseops_data, tmp_path / "o", docs))
    assert "more than the uint16 byte sidecar holds (65535)" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["docs", "tokenizer", "out"])
def test_prep_names_a_missing_input_or_an_unwritable_out(caseops_data, tmp_path, what):
    args = _prep_args(caseops_data, tmp_path / "o")
    if what == "out":  # a path under a file: unwritable even for root, for whom a read-only mode is no barrier
        (tmp_path / "a_file").write_text("")
        args[args.index("--out") + 1] = str(tmp_path / "a_file" / "o")
        needle = "is not writable"
    else:
        args[args.index(f"--{what}") + 1] = str(tmp_path / "missing")
        needle = f"--{what} {tmp_path / 'missing'} is not a readable file"
    with pytest.raises(SystemExit, match=needle):
        prep.main(args)


# ---- issue 25: the data the score depends on is verified as a whole; errors name the cause ----

def _plain(plain_data, tmp_path, **env):
    d = tmp_path / "fineweb10B_sp512"
    shutil.copytree(plain_data["data_path"], d)
    cfg, _ = tg.load_config({"DATA_PATH": str(d), "TOKENIZER_PATH": str(plain_data["tokenizer"]), "VOCAB_SIZE": "512",
                             "CASEOPS_ENABLED": "0"} | env)
    return d, cfg


def test_an_empty_val_split_is_refused_not_scored_zero(plain_data, tmp_path):
    """An empty val split scored val_bpb 0.00000000 with valid:1 and passed check_data.py."""
    d, cfg = _plain(plain_data, tmp_path)
    tg.write_shard(d / "fineweb_val_000000.bin", np.zeros(0, dtype=np.uint16))
    with pytest.raises(tg.DataError, match="val split .* is empty"):
        tg.check_dataset(cfg, tg.check_tokenizer(cfg))


def test_bos_markers_are_checked_whatever_the_settings(plain_data, tmp_path):
    """Without CaseOps and with TTT off the BOS checks were skipped: the val split was scored as one document and the
    leak check compared nothing. Every published shard has a BOS before each document."""
    d, cfg = _plain(plain_data, tmp_path, TTT_ENABLED="0")
    for p in d.glob("fineweb_*.bin"):
        _mutate(p, lambda t: t[t != 1])
    with pytest.raises(tg.DataError, match="no BOS"):
        tg.check_dataset(cfg, tg.check_tokenizer(cfg))


def test_a_stray_shard_in_a_published_layout_is_refused(plain_data, tmp_path):
    """A folder without a manifest (a download) is the published numbering 000000 onwards: a shard left from another
    download or prep was trained on; so were too many shards in a published CaseOps folder."""
    d, cfg = _plain(plain_data, tmp_path)
    tg.check_dataset(cfg, tg.check_tokenizer(cfg))
    shutil.copy(d / "fineweb_train_000000.bin", d / "fineweb_train_000057.bin")
    with pytest.raises(tg.DataError, match="train shards .* not numbered 0..2 .*57"):
        tg.check_dataset(cfg, tg.check_tokenizer(cfg))
    published = tmp_path / "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    published.mkdir()
    for i in range(81):
        (published / f"fineweb_train_{i:06d}.bin").touch()
    (published / "fineweb_val_000000.bin").touch()
    (published / "fineweb_val_bytes_000000.bin").touch()
    cfg = dataclasses.replace(cfg, data_path=str(published))
    train, val = tg.shard_paths(str(published), "train"), tg.shard_paths(str(published), "val")
    with pytest.raises(tg.DataError, match="81 train shards; the published dataset has 80"):
        tg.check_layout(cfg, train, val)


def test_a_shard_listed_in_the_manifest_must_be_there(caseops_data, tmp_path):
    d = _copy(caseops_data, tmp_path)
    _last_train(d).unlink()
    with pytest.raises(tg.DataError, match="listed in .*manifest.json are missing"):
        _check(d, caseops_data["tokenizer"])


def test_one_leaked_document_is_refused_and_natural_duplicates_are_accepted_by_count(plain_data, tmp_path):
    """Up to 5 + val_docs/1000 leaked documents used to pass with a log line. Now any overlap is refused, naming the
    count and the variable; VAL_OVERLAP_DOCS accepts exactly that many, and their hashes are reported."""
    d, cfg = _plain(plain_data, tmp_path)
    val = tg.load_shard(d / "fineweb_val_000000.bin")
    second = np.flatnonzero(val == 1)[1]
    _mutate(d / "fineweb_train_000001.bin", lambda t: np.concatenate([t, val[:second]]))  # one val document
    with pytest.raises(tg.DataError, match="1 training documents are validation documents.*VAL_OVERLAP_DOCS=1"):
        tg.check_dataset(cfg, tg.check_tokenizer(cfg))
    rep = tg.check_dataset(dataclasses.replace(cfg, val_overlap_docs=1), tg.check_tokenizer(cfg))
    assert len(rep.overlap_hashes) == 1 and len(rep.overlap_hashes[0]) == 16


def test_shard_faults_are_named(plain_data, tmp_path, monkeypatch):
    """A directory where a shard belongs was reported as "missing"; an unreadable shard gave a traceback."""
    d, cfg = _plain(plain_data, tmp_path)
    (d / "fineweb_train_000001.bin").unlink()
    (d / "fineweb_train_000001.bin").mkdir()
    with pytest.raises(tg.DataError, match="is a directory where a shard file belongs"):
        tg.check_dataset(cfg, tg.check_tokenizer(cfg))
    (d / "fineweb_train_000001.bin").rmdir()
    shutil.copy(plain_data["data_path"] / "fineweb_train_000001.bin", d)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(np, "fromfile", denied)  # root reads any file: deny it the way the kernel would
    with pytest.raises(tg.DataError, match="cannot read .*Permission denied.*permissions"):
        tg.load_shard(d / "fineweb_train_000001.bin")
