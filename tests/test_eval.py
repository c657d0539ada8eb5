"""Evaluation: exact byte accounting, windowed scoring, the #1855 phased score-first TTT recipe, equal target
sets in every mode, the budget plan, and distributed equality."""
from __future__ import annotations

import dataclasses
import json
import math
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

    def forward(self, ids, targets, seg=None, lora=None, last=0):
        return torch.full(targets[:, -last:].shape if last else targets.shape, math.log(self.vocab))


def _val(tokens, nbytes=None):
    t = torch.as_tensor(tokens, dtype=torch.long)
    b = torch.as_tensor(nbytes if nbytes is not None else np.random.default_rng(0).integers(0, 4, t.numel()), dtype=torch.int32)
    return tg.ValidationData(t, b, int((t == 1).sum()))


def test_uniform_model_bpb_is_log2_vocab_per_byte():
    val = _val(np.random.default_rng(1).integers(0, 97, 1001))
    s = tg.eval_windows(Uniform(97), val, 64, 16, 4096, CPU)
    assert s.tokens == 1000 and s.bytes == int(val.token_bytes[1:].sum())
    assert s.bpb == pytest.approx(math.log2(97) * s.tokens / s.bytes, rel=1e-7)


@pytest.mark.parametrize("n,seq,stride", [(1000, 64, 64), (1000, 64, 16), (1000, 64, 1), (777, 100, 37), (5, 64, 8)])
def test_every_target_scored_exactly_once_in_windows_of_one_shape(n, seq, stride):
    counts = np.zeros(n + 1, dtype=int)
    wins = tg.sliding_windows(n, seq, stride)
    for start, length, frm in wins:
        assert length == min(seq, n) and 0 <= frm < length  # one window shape: one compiled graph
        counts[start + 1 + frm:start + 1 + length] += 1
    assert counts[0] == 0 and (counts[1:] == 1).all()
    assert wins[-1][0] + wins[-1][1] == n  # the last window ends at the last target, with a full left context
    for b in tg.window_batches(n, seq, stride, 3, 0, 1):  # fixed rows; the head sees the stride unless more is scored
        assert b.rows == 3 and b.last in ((stride, 0) if stride < min(seq, n) else (0,))
        assert all(length - frm <= (b.last or length) for _, length, frm in b.windows)


def test_sliding_stride_equal_seq_len_is_plain_eval_and_ranks_partition(trained_tiny):
    cfg, model = tg.load_artifact_model(trained_tiny["out"] / "final_model.int6.ptz", CPU)
    val = _val(np.random.default_rng(2).integers(0, cfg.vocab_size, 2000))
    plain = tg.eval_windows(model, val, 64, 64, 1024, CPU)
    nll = 0.0  # an independent plain evaluation: non-overlapping 64-token windows, the last one ending at the end
    with torch.no_grad():
        for a in range(0, 1999 - 64, 64):
            x = val.tokens[a:a + 65]
            nll += float(model(x[None, :-1], x[None, 1:]).double().sum())
        tail = 1999 - 1999 // 64 * 64
        x = val.tokens[1999 - 64:2000]
        nll += float(model(x[None, :-1], x[None, 1:])[0, -tail:].double().sum())
    assert plain.nll == pytest.approx(nll, rel=1e-9) and plain.tokens == 1999
    seen = []
    for r in range(3):  # what each of 3 ranks scores covers every target once
        tg.eval_windows(model, val, 64, 16, 1024, tg.Runtime.cpu(rank=r, world_size=3),
                        hook=lambda idx, v: seen.extend(idx.tolist()))
    assert sorted(seen) == list(range(1, 2000))


def _ttt_cfg(cfg, **kw):
    base = dict(eval_seq_len=128, ttt_chunk_size=16, ttt_lora_rank=8, ttt_batch_docs=3, phased_ttt_prefix_docs=6,
                phased_ttt_num_phases=2, ttt_lora_lr=0.01, ttt_local_lr_mult=1.0, ttt_global_lr=0.01,
                ttt_global_chunk_tokens=128, ttt_short_chunks="")
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


def test_every_mode_scores_the_same_targets_including_document_ends(trained_tiny):
    """TTT scores each document's targets up to and including the next BOS, like the windowed modes (#1736);
    the run logs each mode's target count and they agree."""
    art = trained_tiny["out"] / "final_model.int6.ptz"
    cfg = _ttt_cfg(tg.unpack_artifact(art.read_bytes())[0])
    val = _val_docs(cfg)
    s, scores = _scores(art, val, cfg)
    assert sorted(scores) == list(range(1, val.tokens.numel()))
    windows = tg.eval_windows(tg.load_artifact_model(art, CPU)[1], val, 64, 16, 1024, CPU)
    assert (s.tokens, s.bytes) == (windows.tokens, windows.bytes)
    log = trained_tiny["stdout"]
    counts = {k: int(log.split(f"{k}_targets:")[1].split()[0]) for k in ("roundtrip", "sliding", "ttt")}
    assert len(set(counts.values())) == 1 and counts["ttt"] == 8192, counts


def test_ttt_score_first_flip_test(trained_tiny):
    """A document's scores depend only on its own earlier tokens and on documents scored before it (the global
    SGD phases learn only from those): changing anything scored later changes none of its scores."""
    art = trained_tiny["out"] / "final_model.int6.ptz"
    cfg = _ttt_cfg(tg.unpack_artifact(art.read_bytes())[0])
    val = _val_docs(cfg, n_docs=12)
    docs = tg.document_spans(val.tokens, 1)
    sched = tg.ttt_schedule(docs, cfg, 1, cfg.phased_ttt_num_phases, cfg.phased_ttt_prefix_docs)
    order = [d for b in sched.batches for d in b]  # scoring order: longest batches first
    base_s, base = _scores(art, val, cfg)
    rng = np.random.default_rng(4)
    for k in (2, len(order) // 2, len(order) - 2):
        s, e = order[k]
        t = s + (e - s) // 2
        flipped = val.tokens.clone()
        later = [torch.arange(t + 1, e)] + [torch.arange(a + 1, b) for a, b in order[k + 1:]]
        for idx in later:  # this document after t, and every document scored after it (BOS kept)
            flipped[idx] = torch.as_tensor(rng.integers(4, cfg.vocab_size, idx.numel()))
        _, after = _scores(art, tg.ValidationData(flipped, val.token_bytes, val.n_docs), cfg)
        earlier = [i for a, b in order[:k] for i in range(a + 1, b + 1)] + list(range(s + 1, t + 1))
        changed = [i for i in earlier if base[i] != after[i]]
        assert not changed, f"scores at {changed[:5]} depend on tokens scored after them"
        assert any(base[i] != after[i] for i in range(t + 1, e + 1)), "later scores should react"


# the evaluation settings of #2014 (our previous default; the README's pr2014 block), for tests written against them
PR2014_EVAL = {"EVAL_SEQ_LEN": "3072", "TRAIN_SEQ_LEN": "3072", "TRAIN_SEQ_SCHEDULE": "1024@0.1,2048@0.7,3072@1.0",
               "TTT_SHORT_CHUNKS": "256:8,2000:24", "TTT_BATCH_DOCS": "24"}


def test_lora_recipe_is_1855s():
    cfg, _ = tg.load_config({})
    shapes = tg.lora_shapes(cfg, "all")
    assert len([k for k in shapes if k.endswith(".q")]) == 17 and shapes["head"] == (512, 8192)  # one per application
    assert not any(k.endswith((".q", ".v")) for k in tg.lora_shapes(cfg, "no_qv"))  # #1953
    lora = tg.BatchedLoRA({"0.k": (512, 256)}, 2, 80, 144.0, torch.device("cpu"))
    lora.reset(7)
    a = lora.a["0_k"]
    top = float(a.detach().abs().max())
    assert 0.9 / math.sqrt(512) < top <= 1 / math.sqrt(512)
    assert not lora.b["0_k"].any() and lora.scale == pytest.approx(144 / 80)
    before = a.detach().clone()
    lora.reset(None)  # warm start: A carried to the next batch, B zeroed
    assert torch.equal(lora.a["0_k"], before)
    opt = tg.new_lora(cfg, CPU, 0)[1]  # #2135's LR and weight decay
    assert opt.defaults["lr"] == pytest.approx(8e-5) and opt.defaults["betas"] == (0.0, 0.99)
    assert opt.defaults["weight_decay"] == 2.0 and opt.defaults["eps"] == 1e-10


def test_phases_train_on_cumulative_prefixes_of_scored_documents():
    cfg, _ = tg.load_config({"TTT_BATCH_DOCS": "64", "PHASED_TTT_NUM_PHASES": "3", "PHASED_TTT_PREFIX_DOCS": "2500"})
    docs = [(i * 100, i * 100 + 1 + (i * 7919) % 97) for i in range(5000)]
    sched = tg.ttt_schedule(docs, cfg, 8, 3, 2500)
    assert sched.phase_docs == [833, 1666, 2500]  # #1855's boundaries
    lens = [max(e - s for s, e in b) for b in sched.batches]
    assert lens == sorted(lens, reverse=True)  # longest batches first
    scored = np.cumsum([len(b) for b in sched.batches])
    for end, n in zip(sched.phase_ends, sched.phase_docs):
        assert scored[end - 1] >= n and (end == 1 or scored[end - 2] < n)  # the phase waits for exactly enough


def test_a_phase_trains_on_the_shortest_scored_documents_in_length_order():
    """#1855: at a phase boundary of b documents, the global SGD stream is the b shortest of the documents scored
    so far, in length order (batch id in the length-sorted list, then position), not the order they were scored
    in (longest first); each document's slice runs to the next document's BOS."""
    cfg, _ = tg.load_config({"TTT_BATCH_DOCS": "4", "PHASED_TTT_NUM_PHASES": "2", "PHASED_TTT_PREFIX_DOCS": "10"})
    rng = np.random.default_rng(0)
    lens = rng.integers(2, 60, 40)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    docs = [(int(s), int(s + n)) for s, n in zip(starts, lens)]
    sched = tg.ttt_schedule(docs, cfg, 2, 2, 10)
    for end, n in zip(sched.phase_ends, sched.phase_docs):
        scored = [d for b in sched.batches[:end] for d in b]
        want = sorted(scored, key=lambda d: d[1] - d[0])[:n]
        got = sched.phase_training_docs(end, n)
        assert [e - s for s, e in got] == [e - s for s, e in want] and set(got) <= set(scored)
        assert got != scored[:n]  # the scoring order (longest first) would train on the longest ones
    # equal longest documents: the stable sort keeps their batches in length order
    ties = [(i * 10, i * 10 + 5) for i in range(8)]
    sched = tg.ttt_schedule(ties, cfg, 1, 0, 0)
    assert sched.rank_of == [0, 1]


def test_global_sgd_cosine_runs_over_n_chunks_minus_one_and_skips_the_last_chunk(trained_tiny, monkeypatch):
    """#1855's rule: n chunks give n - 1 steps (the last chunk is not trained on) at
    lr_i = TTT_GLOBAL_LR * (1 + cos(pi * i / (n - 1))) / 2, so the last step's LR is not yet 0."""
    art = trained_tiny["out"] / "final_model.int6.ptz"
    cfg = _ttt_cfg(tg.unpack_artifact(art.read_bytes())[0], ttt_global_chunk_tokens=64)
    val = _val_docs(cfg)
    docs = tg.document_spans(val.tokens, 1)[:4]
    lrs = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a: (lrs.append(self.param_groups[0]["lr"]), real_step(self, *a))[1])
    _, model = tg.load_artifact_model(art, CPU)
    steps = tg.global_sgd(model, val, docs, cfg, CPU)
    n_chunks = math.ceil(sum(e - s + 1 for s, e in docs) / 64)
    assert steps == len(lrs) == n_chunks - 1
    assert lrs == pytest.approx([0.01 * (1 + math.cos(math.pi * i / (n_chunks - 1))) / 2 for i in range(n_chunks - 1)])


def test_short_documents_get_smaller_chunks_and_costs_are_exact():
    cfg, _ = tg.load_config(PR2014_EVAL)
    assert [tg.chunk_size_for(cfg, n) for n in (100, 256, 257, 2000, 2001)] == [8, 8, 24, 24, 48]  # #2014
    docs = [(0, 100), (200, 230), (300, 305)]
    small = dataclasses.replace(cfg, ttt_short_chunks="", ttt_chunk_size=16, eval_seq_len=40)
    n = [100, 30, 5]
    expect = sum(max(2, len([p for p in n if k * 16 < p])) * max(min((k + 1) * 16, p) - max(0, min((k + 1) * 16, p) - 40)
                                                                    for p in n if k * 16 < p) for k in range(7))
    assert tg.batch_cost(docs, small) == expect


def test_ttt_lr_zero_equals_plain_scoring_and_ttt_helps_on_repeats(trained_tiny):
    art = trained_tiny["out"] / "final_model.int6.ptz"
    cfg = _ttt_cfg(tg.unpack_artifact(art.read_bytes())[0])
    val = _val_docs(cfg)
    zero, _ = _scores(art, val, dataclasses.replace(cfg, ttt_lora_lr=0.0, ttt_global_lr=0.0))
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


def test_budget_plan_cuts_in_order_until_the_projection_fits():
    cfg, _ = tg.load_config(PR2014_EVAL | {"PHASED_TTT_NUM_PHASES": "3", "PHASED_TTT_PREFIX_DOCS": "2000"})
    docs = [(i * 1000, i * 1000 + 999) for i in range(2000)]
    n = 2_000_000
    lines = []
    plans = {}
    costs = tg.EvalCosts(0.25, 0.25, 3e-6, 0.0, 0.0125)
    for budget in (1e9, 30.0, 22.0, 10.0):  # projected: roundtrip 0.25 s, sliding 11.5 s, TTT 17 s + 4.6 s of phases
        plans[budget] = tg.fit_plan(cfg, docs, n, 8, costs, budget, lines.append)
    assert plans[1e9] == tg.EvalPlan(True, True, 3, 2000)
    assert plans[30.0] == tg.EvalPlan(False, True, 3, 2000)
    assert plans[22.0].ttt and (plans[22.0].prefix_docs < 2000 or plans[22.0].phases == 0)
    assert not plans[10.0].ttt and not plans[10.0].sliding
    for b, p in plans.items():
        secs = tg.project_seconds(p, docs, n, cfg, 8, costs)
        assert sum(secs.values()) <= 0.9 * b or not p.ttt
    assert any("does not fit EVAL_BUDGET_SECONDS" in l for l in lines)


def test_time_model_counts_what_the_evaluation_runs(trained_tiny):
    """The projector's token counts equal the positions the real evaluation feeds through the model."""
    art = trained_tiny["out"] / "final_model.int6.ptz"
    cfg = _ttt_cfg(tg.unpack_artifact(art.read_bytes())[0], phased_ttt_num_phases=0, eval_batch_tokens=256)
    val = _val_docs(cfg, n_docs=9)
    _, model = tg.load_artifact_model(art, CPU)
    fed = []
    model.register_forward_pre_hook(lambda m, args: fed.append((args[0].shape, args[4] if len(args) > 4 else 0)))
    tg.ttt_eval(model, val, cfg, CPU, lambda s: None)
    work = tg.plan_token_work(tg.EvalPlan(False, True, 0, 0), tg.document_spans(val.tokens, 1), val.tokens.numel() - 1, cfg, 1)
    assert work["ttt"] == (sum(s.numel() for s, _ in fed), len(fed), 0)
    fed.clear()
    tg.eval_windows(model, val, cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_tokens, CPU)
    full, strided = tg.plan_token_work(tg.EvalPlan(True, False, 0, 0), [], val.tokens.numel() - 1, cfg, 1)["sliding"]
    rows = cfg.eval_batch_tokens // cfg.eval_seq_len
    assert {s for s, _ in fed} == {torch.Size([rows, cfg.eval_seq_len])}  # one shape for every forward
    assert (full, strided) == (sum(last == 0 for _, last in fed), sum(last == cfg.eval_stride for _, last in fed))
    assert strided > full  # the sliding window sends only its last stride through the head


def test_no_validation_token_reaches_warmups(trained_tiny, plain_data):
    """Compile priming runs on training data and the eval cost probe on random tokens (#1530's lesson)."""
    env = trained_tiny["env"]
    cfg, _ = tg.load_config(env | {"WARMUP_STEPS": "4", "DATA_PATH": str(plain_data["data_path"])})
    val = tg.load_validation(cfg, tg.load_sentencepiece(str(plain_data["tokenizer"])))
    grams = {tuple(val.tokens[i:i + 12].tolist()) for i in range(val.tokens.numel() - 12)}
    rt = dataclasses.replace(CPU, compile=True)
    model = tg.GPT(cfg)
    fed = []
    model.register_forward_pre_hook(lambda m, args: fed.append(args[0].clone()))
    opts = tg.build_optimizers(model, cfg, CPU)
    tg.prime_compile(model, model, opts, tg.TrainData(tg.shard_paths(cfg.data_path, "train"), cfg, CPU, 1), cfg, rt,
                     lambda s: None)
    tg.measure_costs(model, model, model, cfg, CPU, tg.eval_rows(cfg, val.tokens.numel() - 1, 1),
                     tg.document_spans(val.tokens, 1))
    assert len(fed) >= 5
    hits = sum(tuple(x[r, i:i + 12].tolist()) in grams for x in fed for r in range(x.size(0))
               for i in range(0, x.size(1) - 12, 7))
    assert hits == 0


def test_two_ranks_match_one_for_every_eval_mode(trained_tiny, plain_data):
    env = trained_tiny["env"] | {"EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "32", "TTT_CHUNK_SIZE": "32",
                                 "TTT_BATCH_DOCS": "4", "PHASED_TTT_PREFIX_DOCS": "12", "PHASED_TTT_NUM_PHASES": "2",
                                 "VAL_TOKEN_LIMIT": "2000", "TTT_LORA_RANK": "8", "TTT_WARM_START_A": "0"}
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
                 "quantized_ttt_phased val_loss:", "eval_total_time:", "val_tokens: ", "data_check: tokenization:",
                 "eval_plan: configured", "gptq:phase2", "awq_lite:", "lqer:", "ttt:phase docs:"):
        assert line in log, line
    summary = json.loads((out / "logs" / "seed1337.summary.json").read_text())
    assert summary["eval"]["same_targets"] is True  # a val prefix is never a submission, but broke no budget
    assert summary["valid"] is False and summary["invalid_reasons"] == ["VAL_TOKEN_LIMIT scores a prefix of the val split"]
    assert summary["sizes"]["bytes_total"] == summary["sizes"]["bytes_model"] + summary["sizes"]["bytes_code"]
    assert set(summary["eval"]) >= {"roundtrip", "sliding", "ttt", "eval_total_s", "plan"}
    assert summary["eval"]["sliding"]["tokens"] == summary["val"]["tokens"]


def _fake_costs(monkeypatch, costs: "tg.EvalCosts"):
    """measure_costs still compiles and runs its probes, but reports these costs."""
    real = tg.measure_costs
    monkeypatch.setattr(tg, "measure_costs", lambda *a, **k: (real(*a, **k), costs)[1])


def test_a_budget_no_plan_can_meet_is_refused_before_training(trained_tiny, plain_data, monkeypatch):
    """EVAL_BUDGET_SECONDS that even the roundtrip alone cannot meet was found only after the whole training: the
    evaluation's warm-up (before training) projects the smallest plan and refuses it, and training never starts."""
    _fake_costs(monkeypatch, tg.EvalCosts(50.0, 50.0, 1e-3, 0.1, 0.1, 1e-4))
    called = []
    monkeypatch.setattr(tg, "train_or_load", lambda *a, **k: called.append(1))
    cfg, _ = tg.load_config(trained_tiny["env"] | {"DATA_DIR": str(plain_data["data_dir"]), "EVAL_BUDGET_SECONDS": "30"})
    lines = []
    with pytest.raises(tg.ConfigError, match="EVAL_BUDGET_SECONDS=30 cannot be met: the roundtrip evaluation alone "
                                             "projects to"):
        tg.pipeline(tg.Run(cfg, CPU, lines.append))
    assert not called and any(l.startswith("eval_warmup:") for l in lines)


def test_the_plan_is_cut_before_scoring_and_the_sliding_window_never_cuts_ttt(trained_tiny, monkeypatch):
    """A budget the configured plan does not fit is cut before any validation token is scored (sliding first), and
    the informational sliding window runs after TTT, only if what TTT left fits it: a TTT that overran its projection
    drops the sliding window instead of the run going over the budget."""
    art = trained_tiny["out"] / "final_model.int6.ptz"
    cfg = dataclasses.replace(tg.load_config(trained_tiny["env"])[0], eval_budget_seconds=100.0)
    val = _val_docs(cfg, n_docs=24)
    _fake_costs(monkeypatch, tg.EvalCosts(30.0, 30.0, 1e-9, 1e-6, 1e-6, 0.0))  # roundtrip 30 s, sliding 60 s
    lines = []
    res = tg.run_evaluation(art, val, cfg, CPU, lines.append)
    plan = next(l for l in lines if l.startswith("eval_plan:"))
    assert "-> planned [roundtrip sliding:0 ttt:1" in plan and "does not fit EVAL_BUDGET_SECONDS" in "\n".join(lines)
    assert set(res) >= {"roundtrip", "ttt"} and "sliding" not in res
    _fake_costs(monkeypatch, tg.EvalCosts(3.0, 3.0, 1e-9, 1e-6, 1e-6, 0.0))  # 9 s projected: the plan keeps all
    clock = {"t": 0.0}
    real = tg.ttt_eval
    monkeypatch.setattr(tg, "ttt_eval", lambda *a, **k: (clock.__setitem__("t", clock["t"] + 95.0), real(*a, **k))[1])
    lines = []
    res = tg.run_evaluation(art, val, cfg, CPU, lines.append, now=lambda: clock["t"])
    assert "-> planned [roundtrip sliding:1 ttt:1" in next(l for l in lines if l.startswith("eval_plan:"))
    order = [l.split()[0] for l in lines if l.startswith(("final_int6", "quantized_ttt", "eval: sliding"))]
    assert order == ["final_int6_roundtrip_exact", "quantized_ttt_phased", "eval:"], order
    assert "sliding" not in res and res["eval_within_budget"]
    assert res["plan"]["ttt"] and not res["plan"]["sliding"]  # the summary's plan is what ran


def _final_lines(out: str) -> dict:
    keys = ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "quantized_ttt_phased")
    return {l.split()[0]: l.split(" eval_time")[0] for l in out.splitlines() if l.startswith(keys)}


@pytest.mark.slow
def test_an_artifact_alone_is_scored_as_the_training_run_scored_it(trained_tiny, plain_data, tmp_path):
    """Reviewers reproduce a record from its artifact; an artifact could not be scored without its float checkpoint.
    EVAL_ONLY=1 ARTIFACT_PATH=... takes the model and the evaluation settings from the artifact (the environment names
    only where the data is), and scores every mode exactly as the training run did, with the same logs and a summary
    of its own. A damaged artifact is refused in its first second, with the cause."""
    art = tmp_path / "given" / "final_model.int6.ptz"
    art.parent.mkdir()
    art.write_bytes((trained_tiny["out"] / "final_model.int6.ptz").read_bytes())
    env = {"EVAL_ONLY": "1", "ARTIFACT_PATH": str(art), "DATA_DIR": str(plain_data["data_dir"])}
    (tmp_path / "eval").mkdir()
    r = run_trainer(env, tmp_path / "eval")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ours, trained = _final_lines(r.stdout), _final_lines(trained_tiny["stdout"])
    assert len(trained) == 3 and ours == trained, (ours, trained)
    assert "train_shards:not_checked(EVAL_ONLY)" in r.stdout and "step:" not in r.stdout
    summary = json.loads((tmp_path / "eval" / "logs" / "seed1337_eval.summary.json").read_text())
    assert summary["train"] is None and summary["sizes"]["bytes_model"] == art.stat().st_size
    assert "EVAL_ONLY scores an artifact: its training is another run's" in summary["invalid_reasons"]
    blob = bytearray(art.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    art.write_bytes(bytes(blob))
    (tmp_path / "again").mkdir()
    r = run_trainer(env, tmp_path / "again")
    assert r.returncode != 0 and f"config error: {art}: artifact corrupted: checksum mismatch" in r.stderr
    assert "Traceback" not in r.stderr and "model_params:" not in r.stdout


def test_the_plan_projects_the_published_split_with_the_cost_model():
    """A smoke run on a prefix of the val split fits its plan to the prefix; its log also projects the configured plan
    for the published split at full size on the same ranks (its 50,000 documents, 47,853,343 targets, lengths
    modelled on the documents at hand), with the same cost model, and the tilt's pass at that length."""
    cfg, _ = tg.load_config({"PHASED_TTT_NUM_PHASES": "1", "PHASED_TTT_PREFIX_DOCS": "2500"})
    rng = np.random.default_rng(0)
    ends = np.cumsum(rng.integers(20, 3000, 300))
    docs = [(int(s), int(e)) for s, e in zip(np.concatenate([[0], ends[:-1]]), ends)]
    costs = tg.EvalCosts(0.25, 0.05, 3e-6, 0.01, 0.0125, 4e-6)
    lines = []
    tg.fit_plan(cfg, docs, int(ends[-1]), 8, costs, 600.0, lines.append)
    full = tg.published_docs(docs)
    assert len(full) == 50_000 and sum(e - s for s, e in full) == 47_853_343 == tg.PUBLISHED_SPLIT[1]
    plan = tg.EvalPlan(cfg.sliding_eval, cfg.ttt_enabled, cfg.phased_ttt_num_phases, cfg.phased_ttt_prefix_docs)
    want = tg.project_seconds(plan, full, 47_853_343, cfg, 8, costs)
    logged = lines[0].split("published_split_on_8_ranks:")[1].split()
    assert logged == [f"{k}={v:.0f}s" for k, v in want.items()] + [f"ngram_tilt={4e-6 * 47_853_343:.0f}s"]
    assert want["ttt"] > 60 and want["sliding"] > want["roundtrip"]  # full-size figures, not the prefix's


def test_the_cost_probes_are_sized_to_the_validation_set():
    """The warm-up's probes ran at the full EVAL_BATCH_TOKENS (262,144 tokens a forward) and a full TTT batch however
    short the validation set: on the tiny CPU config they took 192 s, longer than the three evaluations (17 + 32 +
    113 s). A windowed forward now holds at most this rank's windows (and so do the evaluation's own forwards: one
    shape for both), and the TTT probe at most the documents there are, no wider than the longest one."""
    cfg, _ = tg.load_config({"VOCAB_SIZE": "97", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                             "ROPE_DIMS": "4", "GATE_WINDOW": "8", "EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "32",
                             "TTT_CHUNK_SIZE": "16", "PHASED_TTT_NUM_PHASES": "0", "NGRAM_TILT": "0"})
    assert cfg.eval_batch_tokens == 262_144 and cfg.ttt_batch_docs == 64
    assert tg.eval_rows(cfg, 10**7, 8) == 262_144 // 128  # a full split fills the batch
    val = _val_docs(cfg, n_docs=5)  # 5 documents of 20-90 tokens: 9 sliding windows of 128
    n = val.tokens.numel() - 1
    rows = tg.eval_rows(cfg, n, 1)
    assert rows == tg.n_windows(n, 128, 32) < 20
    model, fed = tg.GPT(cfg), []
    model.register_forward_pre_hook(lambda m, args: fed.append(tuple(args[0].shape)))
    tg.measure_costs(model, model, model, cfg, CPU, rows, tg.document_spans(val.tokens, 1))
    longest = max(e - s for s, e in tg.document_spans(val.tokens, 1))
    assert set(fed) == {(rows, 128), (5, 16), (5, longest)}, set(fed)


def test_a_summary_with_a_non_finite_figure_is_still_json():
    """A broken model's NaN loss made json.dumps(allow_nan=False) fail after the whole run; JSON has no NaN: null."""
    summary = {"eval": {"ttt": {"val_loss": float("nan"), "val_bpb": float("inf")}}, "steps": [1.0, float("-inf")]}
    assert json.loads(json.dumps(tg.json_safe(summary), allow_nan=False)) == \
        {"eval": {"ttt": {"val_loss": None, "val_bpb": None}}, "steps": [1.0, None]}
