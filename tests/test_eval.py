"""Issue 4: exact byte accounting, windowed evaluation, legal phased TTT, distributed equality."""
from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import lossless_caps as lc
import train_gpt as tg
from conftest import ROOT, SHARED_DATA, clean_env, run_trainer

CPU = tg.Runtime.cpu()
CASEOPS_MODEL = SHARED_DATA / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def random_text(rng: random.Random, words: list[str]) -> str:
    pieces = []
    for _ in range(rng.randrange(5, 60)):
        r = rng.random()
        if r < 0.1:
            pieces.append("".join(rng.choice("éü漢字😀ß€\u0301") for _ in range(rng.randrange(1, 4))))
        elif r < 0.15:
            pieces.append(rng.choice(["  ", "\n", "\t", "  x"]))
        else:
            pieces.append(rng.choice(words))
    return rng.choice(["", " ", "A"]) + " ".join(pieces)


def test_bpb_bytes_match_decoded_text_plain_sentencepiece(plain_data):
    sp = tg.load_sentencepiece(str(plain_data["tokenizer"]))
    luts = tg.build_sentencepiece_luts(sp, sp.get_piece_size())
    rng = random.Random(0)
    words = " ".join(plain_data["docs"][:50]).split()
    docs = [sp.encode(random_text(rng, words)) for _ in range(300)]
    assert any(sp.is_byte(i) for d in docs for i in d), "the sample must exercise byte fallback"
    stream = np.concatenate([[1] + d for d in docs])
    tb = tg.token_bytes_from_luts(stream, luts)
    pos = 0
    for d in docs:
        assert tb[pos] == 0  # BOS is a control token: no bytes
        assert int(tb[pos + 1:pos + 1 + len(d)].sum()) == len(sp.decode(d).encode("utf-8"))
        pos += 1 + len(d)


@pytest.mark.skipif(not CASEOPS_MODEL.exists(), reason="../shared/data (published CaseOps model) not present")
def test_bpb_bytes_caseops_sidecar_counts_controls_as_zero():
    import prepare_caseops_data as prep
    from conftest import bytes_sentencepiece_keeps

    sp = prep.load_tokenizer(str(CASEOPS_MODEL), "published")
    rng = random.Random(1)
    words = ["The", "NASA", "McDonald", "iPhone", "hello", "WORLD", "x", lc.TITLE, "Ünïcode", "😀"]
    texts = [random_text(rng, words) for _ in range(200)]
    for text, (toks, nb) in zip(texts, prep.encode_docs(sp, texts, 1, with_bytes=True)):
        assert int(nb.sum()) == bytes_sentencepiece_keeps(sp, text)
        # a marker token is free unless ESC (id 7) made it a literal character of the original text
        marker = np.isin(toks[1:], [4, 5, 6]) & (toks[:-1] != 7)
        assert all(nb[1:][marker] == 0)


class Uniform(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids, adapter=None):
        return torch.zeros(*ids.shape, self.vocab)


def _val(tokens, nbytes=None):
    t = torch.as_tensor(tokens, dtype=torch.long)
    b = torch.as_tensor(nbytes if nbytes is not None else np.random.default_rng(0).integers(0, 4, t.numel()), dtype=torch.int32)
    return tg.ValidationData(t, b, int((t == 1).sum()))


def test_uniform_model_bpb_is_log2_vocab_per_byte():
    val = _val(np.random.default_rng(1).integers(0, 97, 1001))
    s = tg.eval_windows(Uniform(97), val, 64, 16, 4096, CPU)
    assert s.tokens == 1000 and s.bytes == int(val.token_bytes[1:].sum())
    # per-token NLL is float32 (ln 97 to ~3e-8 relative); the sums are float64
    assert s.bpb == pytest.approx(math_log2(97) * s.tokens / s.bytes, rel=1e-7)


def math_log2(x):
    return float(np.log2(x))


@pytest.mark.parametrize("n,seq,stride", [(1000, 64, 64), (1000, 64, 16), (1000, 64, 1), (777, 100, 37), (5, 64, 8)])
def test_every_target_scored_exactly_once(n, seq, stride):
    counts = np.zeros(n + 1, dtype=int)
    for start, length, frm in tg.sliding_windows(n, seq, stride):
        assert length <= seq and 0 <= frm < length
        counts[start + 1 + frm:start + 1 + length] += 1
    assert counts[0] == 0 and (counts[1:] == 1).all()


def test_sliding_stride_equal_seq_len_is_plain_eval_and_ranks_partition(trained_tiny):
    cfg, model = tg.load_artifact_model(trained_tiny["out"] / "final_model.int6.ptz", CPU)
    val = _val(np.random.default_rng(2).integers(0, cfg.vocab_size, 2000))
    plain = tg.eval_windows(model, val, 64, 64, 1024, CPU)
    # an independent plain evaluation: non-overlapping 64-token windows, the tail window shorter
    nll = 0.0
    with torch.no_grad():
        for a in range(0, 1999, 64):
            x = val.tokens[a:min(a + 65, 2000)]
            nll += float(tg.token_losses(model, x[None, :-1], x[None, 1:]).double().sum())
    assert plain.nll == pytest.approx(nll, rel=1e-9) and plain.tokens == 1999
    seen = []
    for r in range(3):  # what each of 3 ranks scores covers every target once
        rt = tg.Runtime.cpu(rank=r, world_size=3)
        tg.eval_windows(model, val, 64, 16, 1024, rt, hook=lambda idx, v: seen.extend(idx.tolist()))
    assert sorted(seen) == list(range(1, 2000))


def _ttt_cfg(cfg, **kw):
    base = dict(eval_seq_len=128, ttt_chunk_size=16, ttt_lora_rank=8, ttt_batch_docs=3, phased_ttt_prefix_docs=6,
                phased_ttt_num_phases=2, ttt_lr=0.01, ttt_global_lr=0.01)
    return dataclasses.replace(cfg, **(base | kw))


def _val_docs(cfg, n_docs=10, seed=3):
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[1], rng.integers(4, cfg.vocab_size, rng.integers(20, 90))]) for _ in range(n_docs)]
    return _val(np.concatenate(docs))


def _scores(art, val, cfg, adapt=True):
    _, m = tg.load_artifact_model(art, CPU)
    got = {}
    s = tg.ttt_eval(m, val, cfg, CPU, lambda msg: None, adapt=adapt, hook=lambda i, v: got.update(zip(i.tolist(), v.tolist())))
    return s, got


def test_ttt_score_first_flip_test(trained_tiny):
    art = trained_tiny["out"] / "final_model.int6.ptz"
    cfg = _ttt_cfg(tg.unpack_artifact(art.read_bytes())[0])
    val = _val_docs(cfg)
    base, scores = _scores(art, val, cfg)
    assert sorted(scores) == [i for i in range(1, val.tokens.numel()) if val.tokens[i] != 1]
    rng = np.random.default_rng(4)
    n = val.tokens.numel()
    for t in [5, n // 4, n // 2, 3 * n // 4, n - 3]:  # early, around the phases, in the remainder
        flipped = val.tokens.clone()
        later = torch.arange(t + 1, n)
        later = later[flipped[later] != 1]  # keep document boundaries
        flipped[later] = torch.as_tensor(rng.integers(4, cfg.vocab_size, later.numel()))
        _, after = _scores(art, tg.ValidationData(flipped, val.token_bytes, val.n_docs), cfg)
        changed = [i for i in scores if i <= t and scores[i] != after[i]]
        assert not changed, f"scores at {changed[:5]} depend on tokens after {t}"
        assert any(scores[i] != after[i] for i in scores if i > t), "later scores should react"


def test_ttt_lr_zero_equals_plain_scoring_and_ttt_helps_on_repeats(trained_tiny):
    art = trained_tiny["out"] / "final_model.int6.ptz"
    cfg = _ttt_cfg(tg.unpack_artifact(art.read_bytes())[0])
    val = _val_docs(cfg)
    zero, _ = _scores(art, val, dataclasses.replace(cfg, ttt_lr=0.0, ttt_global_lr=0.0))
    plain, _ = _scores(art, val, cfg, adapt=False)
    assert (zero.nll, zero.tokens, zero.bytes) == (plain.nll, plain.tokens, plain.bytes)
    g = torch.Generator().manual_seed(0)
    rep = torch.cat([torch.cat([torch.tensor([1]), torch.randint(4, cfg.vocab_size, (24,), generator=g).repeat(6)])
                     for _ in range(12)])
    rval = _val(rep, torch.ones_like(rep))
    adapted, _ = _scores(art, rval, cfg)
    frozen, _ = _scores(art, rval, cfg, adapt=False)
    print(f"repeated docs bpb: ttt {adapted.bpb:.3f} vs no-ttt {frozen.bpb:.3f}")
    assert adapted.bpb < 0.85 * frozen.bpb


def test_ttt_requires_bos(trained_tiny):
    art = trained_tiny["out"] / "final_model.int6.ptz"
    cfg = _ttt_cfg(tg.unpack_artifact(art.read_bytes())[0])
    with pytest.raises(tg.DataError, match="BOS"):
        _scores(art, _val(np.full(100, 7)), cfg)


def test_two_ranks_match_one_for_every_eval_mode(trained_tiny, plain_data):
    env = trained_tiny["env"] | {"EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "32", "TTT_CHUNK_SIZE": "32",
                                 "TTT_BATCH_DOCS": "4", "PHASED_TTT_PREFIX_DOCS": "12", "PHASED_TTT_NUM_PHASES": "2",
                                 "VAL_TOKEN_LIMIT": "4000", "TTT_LORA_RANK": "8"}
    art = str(trained_tiny["out"] / "final_model.int6.ptz")
    res = {}
    for nproc in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "tests" / "dist_eval_worker.py"), art, json.dumps(env)]
        r = subprocess.run(cmd, env=clean_env() | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        res[nproc] = json.loads([l for l in r.stdout.splitlines() if l.startswith("RESULT ")][0][7:])
    for mode in ("roundtrip", "sliding", "ttt"):
        (n1, t1, b1), (n2, t2, b2) = res[1][mode], res[2][mode]
        assert (t1, b1) == (t2, b2), mode
        assert n1 == pytest.approx(n2, rel=1e-6), mode


def test_pipeline_summary_and_final_lines(trained_tiny):
    out, log = trained_tiny["out"], trained_tiny["stdout"]
    for line in ("final_int6_roundtrip_exact val_loss:", "final_int6_sliding_window_exact val_loss:",
                 "quantized_ttt_phased val_loss:", "eval_total_time:", "val_tokens: ", "data_check: tokenization:"):
        assert line in log, line
    summary = json.loads((out / "logs" / "seed1337.summary.json").read_text())
    assert summary["valid"] is True
    assert summary["sizes"]["bytes_total"] == summary["sizes"]["bytes_model"] + summary["sizes"]["bytes_code"]
    assert set(summary["eval"]) >= {"roundtrip", "sliding", "ttt", "eval_total_s"}
    assert summary["eval"]["sliding"]["tokens"] == summary["val"]["tokens"]


def test_eval_budget_overrun_is_reported(trained_tiny, tmp_path):
    env = trained_tiny["env"] | {"SKIP_TRAIN": "1", "INIT_MODEL_PATH": str(trained_tiny["out"] / "final_model.pt"),
                                 "EVAL_BUDGET_SECONDS": "1", "EVAL_STRIDE": "8"}
    r = run_trainer(env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "WARNING: phased TTT is projected to take" in r.stdout or "ttt:projected_time" in r.stdout
    assert "NOT a valid submission" in r.stdout
    assert json.loads((tmp_path / "logs" / "seed1337.summary.json").read_text())["valid"] is False
