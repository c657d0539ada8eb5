"""Training: the schedule under an injected clock, the loop, distributed equality, failing before any work."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import run_trainer, tiny_env

NO_STAGES = {"TRAIN_SEQ_SCHEDULE": "", "TRAIN_SEQ_LEN": "2048"}


class FakeClock:
    """Seconds that advance only when a test says so."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(cfg, durations_ms):
    """Drive plan_step and StepClock with scripted step durations; returns [(start_ms, plan, dur)]."""
    now = FakeClock()
    clock, out, prev = tg.StepClock(now), [], None
    for step, dur in enumerate(durations_ms):
        elapsed = clock.elapsed_ms()
        if step:
            clock.observe(elapsed)
        plan = tg.plan_step(cfg, step, elapsed, clock.next_step_ms(), cfg.train_budget_ms, prev)
        if plan is None:
            break
        out.append((elapsed, plan, dur))
        now.t += dur / 1000
        prev = plan
    return out


def spiky(n, base=50.0, spike=400.0, every=17):
    return [spike if i % every == every - 1 else base for i in range(n)]


@pytest.mark.parametrize("durations", [[1.0] * 20000, [7.3] * 5000, [55.0] * 1000, spiky(1000), spiky(1000, 20, 900, 9)])
def test_wallclock_schedule_never_crosses_the_cap_and_lr_ends_at_floor(durations):
    cfg, _ = tg.load_config(NO_STAGES | {"MAX_WALLCLOCK_SECONDS": "11", "GPTQ_RESERVE_SECONDS": "1",
                                         "WARMDOWN_FRAC": "0.5", "MIN_LR": "0.1", "ITERATIONS": "100000"})
    budget = cfg.train_budget_ms
    steps = simulate(cfg, durations)
    start, last, dur = steps[-1]
    assert len(steps) < len(durations), "the cap must stop the run"
    assert start + dur <= budget, "the last step must end inside the budget"
    spike = max(durations)
    assert budget - (start + dur) < 2 * spike, "the run stops no more than two step-times early"
    # the LR decays monotonically from 1 and holds its floor over the last steps (from 95% of the budget on)
    scales = [p.lr_scale for _, p, _ in steps]
    assert scales[0] == 1.0 and all(a >= b for a, b in zip(scales, scales[1:]))
    assert last.lr_scale == pytest.approx(max(0.1, (1 - start / budget) / 0.5))
    assert all(p.lr_scale == pytest.approx(0.1) for s, p, _ in steps if s >= 0.951 * budget)
    if spike < 0.02 * budget:
        assert last.lr_scale == pytest.approx(0.1)


def test_the_lr_is_1855s_clamped_linear_decay():
    """#1855 (after #1787): lr = max((1 - frac) / WARMDOWN_FRAC, MIN_LR) once frac >= 1 - WARMDOWN_FRAC, frac the
    fraction of the budget used when the step starts; the 0.1 floor is reached at frac = 1 - 0.1 * 0.85 = 0.915."""
    cfg, _ = tg.load_config(NO_STAGES | {"MAX_WALLCLOCK_SECONDS": "600", "GPTQ_RESERVE_SECONDS": "0",
                                         "WARMDOWN_FRAC": "0.85", "MIN_LR": "0.1", "ITERATIONS": "100000"})
    at = lambda frac: tg.plan_step(cfg, 100, frac * 600_000, 1.0, 600_000).lr_scale  # noqa: E731
    assert at(0.0) == 1.0 and at(0.15) == 1.0
    assert at(0.5) == pytest.approx(0.5 / 0.85) and at(0.8) == pytest.approx(0.2 / 0.85)
    assert at(0.915) == pytest.approx(0.1) and at(0.95) == pytest.approx(0.1) and at(0.999) == pytest.approx(0.1)
    assert at(0.9) == pytest.approx(0.1 / 0.85)  # the old form min_lr + (1 - min_lr) * left / warmdown gave 0.2


def test_step_budget_lr_reaches_floor_exactly_and_loops_start_on_time():
    cfg, _ = tg.load_config(NO_STAGES | {"MAX_WALLCLOCK_SECONDS": "0", "ITERATIONS": "200", "WARMDOWN_FRAC": "0.4",
                                         "MIN_LR": "0.05", "CRAWLER_START_FRAC": "0.35", "CRAWLER_LOOPS": "3"})
    plans = [tg.plan_step(cfg, s, 0.0, 0.0, 0.0) for s in range(201)]
    assert plans[200] is None and plans[199].lr_scale == pytest.approx(0.05)
    assert [p.loops for p in plans[:200]].index(3) == 70 and plans[69].loops == 1
    assert plans[0].momentum == cfg.muon_momentum_warmup_start


def test_warmdown_iters_converts_to_time_under_a_cap():
    cfg, _ = tg.load_config(NO_STAGES | {"MAX_WALLCLOCK_SECONDS": "11", "GPTQ_RESERVE_SECONDS": "1",
                                         "WARMDOWN_ITERS": "100", "MIN_LR": "0.0", "ITERATIONS": "100000"})
    steps = simulate(cfg, [20.0] * 1000)  # 500 steps fit: the warmdown is the last 100 of them
    decayed = [i for i, (_, p, _) in enumerate(steps) if p.lr_scale < 1.0]
    assert len(steps) == 500 and abs(decayed[0] - 400) <= 2 and steps[-1][1].lr_scale < 0.02


def test_context_grows_in_stages_and_each_change_rewarms_the_lr():
    """#2014: 1024 until 10% of the budget, 2048 until 70%, then 3072; 32 steps of LR re-warmup after each change."""
    cfg, _ = tg.load_config({"MAX_WALLCLOCK_SECONDS": "0", "ITERATIONS": "1000", "WARMDOWN_FRAC": "0.1",
                             "TRAIN_SEQ_LEN": "3072", "TRAIN_SEQ_SCHEDULE": "1024@0.1,2048@0.7,3072@1.0"})  # pr2014
    plans, prev = [], None
    for s in range(1000):
        prev = tg.plan_step(cfg, s, 0.0, 0.0, 0.0, prev)
        plans.append(prev)
    seqs = [p.seq_len for p in plans]
    assert seqs.index(2048) == 101 and seqs.index(3072) == 701 and seqs[0] == 1024
    assert plans[101].lr_scale == pytest.approx(1 / 32) and plans[132].lr_scale == 1.0
    assert plans[701].lr_scale == pytest.approx(1 / 32) and plans[0].lr_scale == 1.0
    assert tg.compile_shapes(cfg) == [(1024, 1), (2048, 1), (2048, 3), (3072, 3)]


def test_prefetching_loader_yields_the_same_batches(plain_data):
    from conftest import TINY

    cfg, _ = tg.load_config(TINY | {"DATA_PATH": str(plain_data["data_path"])})
    data = tg.TrainData(tg.shard_paths(cfg.data_path, "train"), cfg, tg.Runtime.cpu(), 2)
    a, b = data.loader(prefetch=2), data.loader(prefetch=0)
    for _ in range(5):
        for (xa, ya, sa), (xb, yb, sb) in zip(a.next_batch(32), b.next_batch(32)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(sa.ids, sb.ids)


def test_training_loop_with_injected_clock(plain_data, monkeypatch):
    """The real loop on the tiny model: the fake clock advances 45 ms per step with spikes; the run stops
    inside the cap, says so, and its last LR is #1855's max((1 - frac) / 0.3, 0.1) at a frac within two spikes of
    the cap."""
    from conftest import TINY

    cfg, _ = tg.load_config(TINY | {"DATA_PATH": str(plain_data["data_path"]), "TOKENIZER_PATH": str(plain_data["tokenizer"]),
                                    "MAX_WALLCLOCK_SECONDS": "2.5", "GPTQ_RESERVE_SECONDS": "0.5",
                                    "ITERATIONS": "100000", "TRAIN_LOG_EVERY": "1", "MIN_LR": "0.1"})
    rt = tg.Runtime.cpu()
    now, durations = FakeClock(), iter(spiky(1000, 45.0, 200.0, 11))
    real_step = tg.train_step

    def timed_step(*a):
        out = real_step(*a)
        now.t += next(durations) / 1000
        return out

    monkeypatch.setattr(tg, "train_step", timed_step)
    model = tg.GPT(cfg)
    sp = tg.load_sentencepiece(cfg.tokenizer_path)
    lines = []
    res = tg.train(model, model, cfg, rt, tg.TrainData(tg.shard_paths(cfg.data_path, "train"), cfg, rt, 1),
                   tg.load_validation(cfg, sp), lines.append, now=now)
    assert res.stopped_early and res.train_ms <= cfg.train_budget_ms
    assert any(l.startswith("stopping_early: wallclock_cap") for l in lines)
    scales = [float(l.split("lr_scale:")[1]) for l in lines if "lr_scale:" in l]
    assert len(scales) == res.steps and scales[0] == 1.0 and 0.1 <= scales[-1] <= (2 * 200 / 2000) / 0.3


def test_learning_beats_unigram_entropy(plain_data, trained_tiny):
    toks = np.concatenate([tg.load_shard(p) for p in tg.shard_paths(str(plain_data["data_path"]), "train")])
    p = np.bincount(toks, minlength=512) / toks.size
    unigram = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    out = trained_tiny["stdout"]
    losses = [float(l.split("train_loss:")[1].split()[0]) for l in out.splitlines() if "train_loss:" in l]
    val_loss = float([l for l in out.splitlines() if "val_loss:" in l and l.startswith("step:")][-1]
                     .split("val_loss:")[1].split()[0])
    assert losses[-1] < unigram - 0.7, (losses[-1], unigram)
    assert val_loss < unigram - 0.7, (val_loss, unigram)
    assert (trained_tiny["out"] / "final_model.pt").is_file()


@pytest.mark.slow
def test_two_rank_training_matches_single_process(plain_data, tmp_path):
    """Two gloo ranks train exactly what one process does with the same global batch (accumulated in two
    halves), also across the crawler's loop switch: before CRAWLER_START_FRAC the second loop's parameters get no
    gradient, and the ranks must still agree. The two ranks run with host and device told apart
    (tests/host_device.py), through the whole pipeline: calibration, packing and every evaluation, TTT's phases
    included."""
    env = tiny_env(plain_data, ITERATIONS=6, CRAWLER_START_FRAC=0.5, TRAIN_LOG_EVERY=1, VAL_TOKEN_LIMIT=2048,
                   PHASED_TTT_PREFIX_DOCS=8)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    env["GRAD_CLIP_NORM"] = "0"  # gradients are clipped per rank before averaging (#1736), so only unclipped runs agree
    r1 = run_trainer(env | {"GRAD_ACCUM_STEPS": "2", "TTT_ENABLED": "0", "SLIDING_EVAL": "0"}, one)
    r2 = run_trainer(env | {"GRAD_ACCUM_STEPS": "1"}, two, nproc=2, emulate=True)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "ranks_in_sync:1" in r2.stdout and "world_size:2" in r2.stdout
    assert all(m in r2.stdout for m in ("gptq:phase2", "awq_lite:", "lqer:", "final_int6_roundtrip_exact",
                                        "quantized_ttt_phased", "ttt:phase docs:", "final_int6_sliding_window_exact"))
    assert "crawler:loops_enabled loops:2 step:3" in r2.stdout
    loss = lambda out: [l.split("train_loss:")[1].split()[0] for l in out.splitlines() if "train_loss:" in l]  # noqa: E731
    assert loss(r1.stdout)[0] == loss(r2.stdout)[0], "the first global batch must be the same"
    s1 = torch.load(one / "final_model.pt")["state_dict"]
    s2 = torch.load(two / "final_model.pt")["state_dict"]
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("over,needle", [  # each a trainer process; the checks themselves have in-process tests
    ({"DATA_DIR": "/nonexistent"}, "TOKENIZER_PATH"),
    pytest.param({"VOCAB_SIZE": "1024"}, "VOCAB_SIZE=1024", marks=pytest.mark.slow),
    pytest.param({"WARMDOWN_ITER": "5"}, "WARMDOWN_ITERS", marks=pytest.mark.slow),
])
def test_bad_setup_fails_before_any_work(plain_data, tmp_path, over, needle):
    env = tiny_env(plain_data, **over)
    if "VOCAB_SIZE" in over:
        env["TOKENIZER_PATH"] = str(plain_data["tokenizer"])
        env["DATA_PATH"] = str(plain_data["data_path"])
    r = run_trainer(env, tmp_path)
    assert r.returncode != 0 and needle in r.stderr, r.stderr[-2000:]
    assert "model_params:" not in r.stdout and not (tmp_path / "final_model.pt").exists()


@pytest.mark.slow  # the CLI form of an in-process test (test_data, test_records' run.sh)
def test_missing_data_path_fails_early(plain_data, tmp_path):
    env = tiny_env(plain_data, DATA_PATH=str(tmp_path / "nope"))
    r = run_trainer(env, tmp_path)
    assert r.returncode != 0 and "DATA_PATH" in r.stderr


@pytest.mark.slow  # the CLI form of an in-process test (test_data, test_records' run.sh)
def test_data_with_ids_beyond_vocab_rejected(plain_data, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    for p in tg.shard_paths(str(plain_data["data_path"]), "train") + tg.shard_paths(str(plain_data["data_path"]), "val"):
        t = tg.load_shard(p).copy()
        t[5] = 600  # an id the 512-piece tokenizer cannot produce
        tg.write_shard(data / p.split("/")[-1], t)
    env = tiny_env(plain_data, DATA_PATH=str(data), TOKENIZER_PATH=str(plain_data["tokenizer"]))
    r = run_trainer(env, tmp_path)
    assert r.returncode != 0 and "token id 600" in r.stderr


def test_shard_header_checks(tmp_path):
    p = tmp_path / "fineweb_train_000000.bin"
    tg.write_shard(p, np.arange(100))
    assert tg.read_shard_header(p) == 100
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(tg.DataError, match="truncated"):
        tg.read_shard_header(p)
    bad = bytearray(np.zeros(256, "<i4").tobytes())
    (tmp_path / "x.bin").write_bytes(bytes(bad))
    with pytest.raises(tg.DataError, match="magic"):
        tg.read_shard_header(tmp_path / "x.bin")


def test_compile_priming_warms_both_depths_and_restores_state(plain_data, monkeypatch):
    from conftest import TINY

    cfg, _ = tg.load_config(TINY | {"CRAWLER_START_FRAC": "0.5", "WARMUP_STEPS": "4",
                                    "DATA_PATH": str(plain_data["data_path"])})
    rt = dataclasses.replace(tg.Runtime.cpu(), compile=True)  # as if compiled: priming runs
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts, seen = tg.build_optimizers(model, cfg, tg.Runtime.cpu()), []  # eager Newton-Schulz: no CPU inductor here
    real = tg.train_step
    monkeypatch.setattr(tg, "train_step", lambda c, *a: (seen.append(model.active_loops), real(c, *a))[1])
    data = tg.TrainData(tg.shard_paths(cfg.data_path, "train"), cfg, rt, 1)
    tg.prime_compile(model, model, opts, data, cfg, rt, lambda s: None)
    assert seen == [1, 1, 2, 2] and model.active_loops == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not opts.muon.state, "optimizer state must be restored to empty"


@pytest.mark.parametrize("step", [1, 5, 5000])
def test_ema_is_one_fused_update_with_a_constant_decay(monkeypatch, step):
    """The EMA updates every tensor with one foreach launch (~150 separate lerp_ launches per step otherwise), in
    fp32, with EMA_DECAY from the first step on (#1855: 0.9965, no decay warmup)."""
    cfg, _ = tg.load_config({"VOCAB_SIZE": "97", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                             "ROPE_DIMS": "4", "GATE_WINDOW": "8"})
    model = tg.GPT(cfg)
    avg = tg.WeightAverager(model, cfg)
    ref = {k: v.clone() for k, v in avg.ema.items()}
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: (calls.append(1), real(*a))[1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg.update(model, step, 1.0, lambda s: None)
    decay = 0.9965
    assert cfg.ema_decay == decay and all(v.dtype == torch.float32 for v in avg.ema.values())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(avg.ema[k], ref[k] * decay + v.float() * (1 - decay))
    assert calls == [1]


def test_segments_are_cut_on_the_loader_thread(plain_data, monkeypatch):
    """With a prefetching loader the training thread neither reads tokens nor cuts segments (they would sit on
    the critical path between two steps); it only re-cuts when the context changes."""
    import threading

    from conftest import TINY

    cfg, _ = tg.load_config(TINY | {"DATA_PATH": str(plain_data["data_path"])})
    where = []
    real = tg.segment_arrays
    monkeypatch.setattr(tg, "segment_arrays", lambda *a: (where.append(threading.current_thread().name), real(*a))[1])
    loader = tg.TrainData(tg.shard_paths(cfg.data_path, "train"), cfg, tg.Runtime.cpu(), 1).loader(prefetch=2)
    for _ in range(4):
        loader.next_batch(64)
    main = threading.main_thread().name
    assert where and main not in where[:4]
    n = len(where)
    loader.next_batch(32)  # a context change: the prefetched batch is re-cut here, once
    assert where[n:].count(main) <= 1


@pytest.mark.parametrize("dtype,want", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_muon_momentum_is_bf16_as_1855_keeps_it(dtype, want):
    """#1855 keeps Muon's momentum (and the gradient it accumulates) in bf16; the crawler seeds in fp32
    (MUON_MOMENTUM_DTYPE=fp32 in their README block). The tied embedding trains as a bf16 master weight."""
    cfg, _ = tg.load_config({"VOCAB_SIZE": "97", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                             "ROPE_DIMS": "4", "GATE_WINDOW": "8", "MUON_MOMENTUM_DTYPE": dtype})
    assert tg.load_config({})[0].muon_momentum_dtype == "bf16"
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), None, False)
    model = tg.GPT(cfg)
    opts = tg.build_optimizers(model, cfg, rt)
    x = torch.randint(0, 97, (1, 16))
    model(x, x).mean().backward()
    opts.muon.step()
    opts.adam.step()
    assert {s["momentum"].dtype for s in opts.muon.state.values()} == {want}
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert opts.adam.state[model.tok_emb.weight]["exp_avg"].dtype == torch.bfloat16


def test_a_micro_batch_is_one_flat_span_cut_only_at_bos_and_the_context_length(tmp_path):
    """#1855's rule (issue 18, item 4): each rank trains on one flat span of its micro-batch; a document runs on
    across what would be a row boundary, and attention is cut only at a BOS and every TRAIN_SEQ_LEN tokens into
    a document. Documents here are a BOS and 90 tokens, the context 64, the span 512: segments start at 0, 64, 91,
    155, 182, ... and never at the row boundaries 128, 192, ... that fall inside a document."""
    doc = np.concatenate([[1], np.arange(10, 100)]).astype(np.uint16)  # 91 tokens
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", np.tile(doc, 200))
    cfg, _ = tg.load_config({"VOCAB_SIZE": "512", "TRAIN_SEQ_LEN": "64", "TRAIN_SEQ_SCHEDULE": "",
                             "TRAIN_BATCH_TOKENS": "512", "GRAD_ACCUM_STEPS": "1", "BOS_ID": "1"})
    loader = tg.TrainLoader([str(tmp_path / "fineweb_train_000000.bin")], cfg, 0, 1, 1, torch.device("cpu"), prefetch=0)
    (micro,) = loader.next_batch()
    assert micro.x.shape == (1, 512) and torch.equal(micro.x[0, 1:], micro.y[0, :-1])
    assert micro.x[0, 0] == 1  # the span starts at a document
    starts = micro.seg.cu[:-1].tolist()
    assert starts == [d + k for d in range(0, 512, 91) for k in (0, 64) if d + k < 512]
    row_boundaries_inside_documents = [p for p in range(64, 512, 64) if p % 91 not in (0, 64)]
    assert row_boundaries_inside_documents and not set(row_boundaries_inside_documents) & set(starts)
    assert micro.seg.max_len == 64
    rows = tg.TrainLoader([str(tmp_path / "fineweb_train_000000.bin")], cfg, 0, 1, 1, torch.device("cpu"), prefetch=0,
                          flat=False)
    assert rows.next_batch()[0].x.shape == (8, 64)  # the crawler seeds' rows (no document masking)


def test_the_calibration_reserve_is_projected_before_the_clock(plain_data, monkeypatch):
    """GPTQ calibration runs on the training clock. Its reserve was a constant GPTQ_RESERVE_SECONDS=10 (#2135 kept
    0.5 s and ran 606.5 s); it is now projected before training from a timed Hessian pass on a real calibration batch:
    per batch x this rank's batches x two passes (phase 1 and the loop-aware phase 2), 10% over, plus the margin; the
    training loop stops that much earlier. A projection that leaves no training is refused before training."""
    from conftest import TINY

    cfg, _ = tg.load_config(TINY | {"DATA_PATH": str(plain_data["data_path"]), "MAX_WALLCLOCK_SECONDS": "100",
                                    "GPTQ_RESERVE_SECONDS": "2", "GPTQ_CAL_SAMPLES": "32", "GPTQ_CAL_SEQ_LEN": "64"})
    rt = tg.Runtime.cpu()
    clock, real, lines = FakeClock(), tg.collect_hessians, []

    def timed(*a, **k):  # each Hessian pass over one batch takes 0.5 s of the (fake) clock
        clock.t += 0.5 * len(a[1])
        return real(*a, **k)

    monkeypatch.setattr(tg, "collect_hessians", timed)
    model = tg.GPT(cfg)
    data = tg.TrainData(tg.shard_paths(cfg.data_path, "train"), cfg, rt, 1)
    reserve = tg.calibration_reserve(model, cfg, rt, data, lines.append, now=clock)
    assert len(data.calibration_batches()) == 4
    assert reserve == pytest.approx(1.1 * 0.5 * 4 * 2)  # GPTQ_RESERVE_SECONDS is already out of train_budget_ms
    assert lines == ["calibration_projection: 500ms per batch x 4 batches x 2 passes = 4.0s; reserve 6.4s of "
                     "MAX_WALLCLOCK_SECONDS=100"]
    assert cfg.train_budget_ms - 1000 * reserve == pytest.approx(100_000 - 6_400)
    with pytest.raises(tg.ConfigError, match="leaves no training"):
        tg.calibration_reserve(model, dataclasses.replace(cfg, max_wallclock_seconds=6.4), rt, data, lines.append,
                               now=clock)
    assert tg.calibration_reserve(model, dataclasses.replace(cfg, max_wallclock_seconds=6.5), rt, data, lines.append,
                                  now=clock) == pytest.approx(4.4)  # 0.1 s of training is left: the user's choice
