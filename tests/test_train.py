"""Issue 2: model semantics, optimisation, distribution, wallclock and config errors."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import run_trainer, tiny_env

ALL_ON = {
    "VOCAB_SIZE": "97", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "NUM_FLAT_LAYERS": "3",
    "NUM_CRAWLER_LAYERS": "2", "CRAWLER_LOOPS": "3", "CRAWLER_LOOP_ROPE_SCALES": "9,1,2", "INST_DIM": "8",
    "ROPE_DIMS": "4", "BIGRAM_VOCAB_SIZE": "31", "BIGRAM_DIM": "8", "GATED_ATTN_ENABLED": "1",
    "PARALLEL_RESIDUAL_START": "3", "XSA_LAST_N": "4", "CRAWLER_MLP_MULT": "3", "TRAIN_SEQ_LEN": "16",
    "TRAIN_BATCH_TOKENS": "64",
}


def make_model(env: dict, seed: int = 0) -> tg.GPT:
    cfg, _ = tg.load_config(env)
    torch.manual_seed(seed)
    model = tg.GPT(cfg)
    with torch.no_grad():  # zero-initialised projections would hide most paths; randomise everything
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_causality_all_options_and_bos_smear():
    model = make_model(ALL_ON).eval()
    torch.manual_seed(1)
    T = 24
    ids = torch.randint(2, 97, (2, T))
    ids[:, 0] = 1
    ids[:, 9] = 1  # a document boundary inside the window: SmearGate/bigram must not cross it
    base = model(ids)
    for t in range(T - 1):
        pert = ids.clone()
        pert[:, t + 1:] = torch.randint(2, 97, (2, T - t - 1))
        out = model(pert)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"logits at <= {t} changed"
    # The first token of a document must not see the previous document through token mixing.
    a, b = ids.clone(), ids.clone()
    b[:, 8] = (b[:, 8] + 5) % 95 + 2
    with torch.no_grad():
        ea, eb = model.smear(model.tok_emb(a) + model.bigram(a), a), model.smear(model.tok_emb(b) + model.bigram(b), b)
    assert torch.equal(ea[:, 9], eb[:, 9]), "BOS position mixed in the previous document's last token"
    assert not torch.equal(ea[:, 8], eb[:, 8])


def test_parameter_count_independent_of_loops():
    counts = {n: sum(p.numel() for p in tg.GPT(tg.load_config(ALL_ON | {"CRAWLER_LOOPS": str(n),
              "CRAWLER_LOOP_ROPE_SCALES": "1,1,1,1,1", "INST_DIM": "0"})[0]).parameters()) for n in (1, 2, 5)}
    assert len(set(counts.values())) == 1, counts
    with_inst = [sum(p.numel() for p in tg.GPT(tg.load_config(ALL_ON | {"CRAWLER_LOOPS": str(n),
                 "CRAWLER_LOOP_ROPE_SCALES": "1,1,1,1,1"})[0]).parameters()) for n in (1, 2, 5)]
    # flow instructions add exactly one INST_DIM x MODEL_DIM up-projection per loop, nothing else
    assert with_inst[2] - with_inst[1] == 3 * 8 * 32


def test_shared_block_gets_gradient_from_every_loop():
    model = make_model(ALL_ON)
    fc = model.crawler[0].mlp.fc
    contribs = []

    def hook(mod, inp, out):
        x = inp[0].detach()
        out.register_hook(lambda g: contribs.append(torch.einsum("bto,bti->oi", g, x)))

    h = fc.register_forward_hook(hook)
    ids = torch.randint(0, 97, (2, 16))
    tg.token_losses(model, ids[:, :-1], ids[:, 1:]).mean().backward()
    h.remove()
    assert len(contribs) == 3, "the shared block must run once per loop"
    for c in contribs:
        assert c.norm() > 1e-6
    torch.testing.assert_close(sum(contribs), fc.weight.grad, rtol=1e-4, atol=1e-6)


def test_plain_gpt_when_crawler_off():
    cfg, _ = tg.load_config({"USE_CRAWLER": "0", "NUM_LAYERS": "5", "MODEL_DIM": "32", "NUM_HEADS": "4",
                             "NUM_KV_HEADS": "2", "ROPE_DIMS": "4", "VOCAB_SIZE": "64"})
    m = tg.GPT(cfg)
    assert len(m.encoder) + len(m.decoder) == 5 and len(m.crawler) == 0 and m.inst_proj is None


def test_delayed_loop_activation_changes_depth_only():
    model = make_model(ALL_ON | {"CRAWLER_START_FRAC": "0.35"})
    assert model.active_loops == 1
    ids = torch.randint(0, 97, (1, 12))
    one = model(ids)
    model.set_active_loops(3)
    assert not torch.allclose(one, model(ids))


class FakeClock:
    """Seconds that advance only when a test says so."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(cfg, durations_ms):
    """Drive plan_step and StepClock with scripted step durations; returns [(start_ms, plan, dur)]."""
    now = FakeClock()
    clock, out = tg.StepClock(now), []
    for step, dur in enumerate(durations_ms):
        elapsed = clock.elapsed_ms()
        if step:
            clock.observe(elapsed)
        plan = tg.plan_step(cfg, step, elapsed, clock.next_step_ms(), cfg.train_budget_ms)
        if plan is None:
            break
        out.append((elapsed, plan, dur))
        now.t += dur / 1000
    return out


def spiky(n, base=50.0, spike=400.0, every=17):
    return [spike if i % every == every - 1 else base for i in range(n)]


@pytest.mark.parametrize("durations", [[1.0] * 20000, [7.3] * 5000, [55.0] * 1000, spiky(1000), spiky(1000, 20, 900, 9)])
def test_wallclock_schedule_never_crosses_the_cap_and_lr_ends_at_floor(durations):
    cfg, _ = tg.load_config({"MAX_WALLCLOCK_SECONDS": "11", "GPTQ_RESERVE_SECONDS": "1", "WARMDOWN_FRAC": "0.5",
                             "MIN_LR": "0.1", "ITERATIONS": "100000"})
    budget = cfg.train_budget_ms
    steps = simulate(cfg, durations)
    start, last, dur = steps[-1]
    assert len(steps) < len(durations), "the cap must stop the run"
    assert start + dur <= budget, "the last step must end inside the budget"
    spike = max(durations)
    assert budget - (start + dur) < 2 * spike, "the run stops no more than two step-times early"
    # the LR decays monotonically from 1 and meets its floor on the last step
    scales = [p.lr_scale for _, p, _ in steps]
    assert scales[0] == 1.0 and all(a >= b for a, b in zip(scales, scales[1:]))
    assert last.lr_scale - 0.1 <= 0.9 * spike / (0.5 * budget) + 1e-9


def test_step_budget_lr_reaches_floor_exactly_and_loops_start_on_time():
    cfg, _ = tg.load_config({"MAX_WALLCLOCK_SECONDS": "0", "ITERATIONS": "200", "WARMDOWN_FRAC": "0.4",
                             "MIN_LR": "0.05", "CRAWLER_START_FRAC": "0.35", "CRAWLER_LOOPS": "3"})
    plans = [tg.plan_step(cfg, s, 0.0, 0.0, 0.0) for s in range(201)]
    assert plans[200] is None and plans[199].lr_scale == pytest.approx(0.05)
    assert [p.loops for p in plans[:200]].index(3) == 70 and plans[69].loops == 1
    assert plans[0].momentum == cfg.muon_momentum_warmup_start


def test_warmdown_iters_converts_to_time_under_a_cap():
    cfg, _ = tg.load_config({"MAX_WALLCLOCK_SECONDS": "11", "GPTQ_RESERVE_SECONDS": "1", "WARMDOWN_ITERS": "100",
                             "MIN_LR": "0.0", "ITERATIONS": "100000"})
    steps = simulate(cfg, [20.0] * 1000)  # 500 steps fit: the warmdown is the last 100 of them
    decayed = [i for i, (_, p, _) in enumerate(steps) if p.lr_scale < 1.0]
    assert len(steps) == 500 and abs(decayed[0] - 400) <= 2 and steps[-1][1].lr_scale < 0.02


def test_training_loop_with_injected_clock(plain_data, monkeypatch):
    """The real loop on the tiny model: the fake clock advances 45 ms per step with spikes; the run stops
    inside the cap, says so, and its LR is at the floor on the last step."""
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
    assert len(scales) == res.steps and scales[0] == 1.0 and scales[-1] < 0.1 + 0.9 * 200 / (0.3 * 2000)


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


def test_two_rank_training_matches_single_process(plain_data, tmp_path):
    env = tiny_env(plain_data, ITERATIONS=4, TRAIN_LOG_EVERY=1)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    r1 = run_trainer(env | {"GRAD_ACCUM_STEPS": "2"}, one)
    r2 = run_trainer(env | {"GRAD_ACCUM_STEPS": "1"}, two, nproc=2)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "ranks_in_sync:1" in r2.stdout and "world_size:2" in r2.stdout
    loss = lambda out: [l.split("train_loss:")[1].split()[0] for l in out.splitlines() if "train_loss:" in l]  # noqa: E731
    assert loss(r1.stdout)[0] == loss(r2.stdout)[0], "the first global batch must be the same"
    s1 = torch.load(one / "final_model.pt")["state_dict"]
    s2 = torch.load(two / "final_model.pt")["state_dict"]
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-3, atol=1e-4, msg=k)


def test_two_ranks_with_delayed_loops(plain_data, tmp_path):
    """Before CRAWLER_START_FRAC the second loop's parameters get no gradient; ranks must still agree."""
    env = tiny_env(plain_data, ITERATIONS=6, CRAWLER_START_FRAC=0.5, TRAIN_LOG_EVERY=1, TTT_ENABLED=0,
                   GRAD_ACCUM_STEPS=1)
    r = run_trainer(env, tmp_path, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "crawler:loops_enabled loops:2 step:3" in r.stdout and "ranks_in_sync:1" in r.stdout


@pytest.mark.parametrize("env,needle", [
    ({"MODEL_DIM": "100", "NUM_HEADS": "8"}, "NUM_HEADS"),
    ({"NUM_HEADS": "8", "NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_SEQ_LEN"),
    ({"WARMDOWN_ITER": "100"}, "did you mean WARMDOWN_ITERS"),
    ({"CRAWLER_QUANT_INT8": "0"}, "CRAWLER_QUANT_INT8"),
    ({"MATRIX_LR": "fast"}, "MATRIX_LR"),
    ({"CRAWLER_LOOPS": "4"}, "CRAWLER_LOOP_ROPE_SCALES"),
    ({"WARMDOWN_ITERS": "10", "WARMDOWN_FRAC": "0.2"}, "both set"),
    ({"MAX_WALLCLOCK_SECONDS": "10", "GPTQ_RESERVE_SECONDS": "20"}, "GPTQ_RESERVE_SECONDS"),
])
def test_bad_config_names_the_variable(env, needle):
    with pytest.raises(tg.ConfigError, match=needle):
        tg.load_config(env)


def test_world_divisibility_error():
    cfg, _ = tg.load_config({"TRAIN_BATCH_TOKENS": str(2048 * 12)})
    with pytest.raises(tg.ConfigError, match="multiple of"):
        tg.validate_world(cfg, 8)


def test_unrelated_env_is_ignored():
    assert tg.unknown_env_report({"PATH": "/bin", "HOME": "/root", "LOCAL_RANK": "0", "NCCL_DEBUG": "1",
                                  "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0"}) == []


@pytest.mark.parametrize("over,needle", [
    ({"DATA_DIR": "/nonexistent"}, "TOKENIZER_PATH"),
    ({"VOCAB_SIZE": "1024"}, "VOCAB_SIZE=1024"),
    ({"WARMDOWN_ITER": "5"}, "WARMDOWN_ITERS"),
])
def test_bad_setup_fails_before_any_work(plain_data, tmp_path, over, needle):
    env = tiny_env(plain_data, **over)
    if "VOCAB_SIZE" in over:
        env["TOKENIZER_PATH"] = str(plain_data["tokenizer"])
        env["DATA_PATH"] = str(plain_data["data_path"])
    r = run_trainer(env, tmp_path)
    assert r.returncode != 0 and needle in r.stderr, r.stderr[-2000:]
    assert "model_params:" not in r.stdout and not (tmp_path / "final_model.pt").exists()


def test_missing_data_path_fails_early(plain_data, tmp_path):
    env = tiny_env(plain_data, DATA_PATH=str(tmp_path / "nope"))
    r = run_trainer(env, tmp_path)
    assert r.returncode != 0 and "DATA_PATH" in r.stderr


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


def test_config_reference_lists_every_field():
    ref = tg.config_reference_markdown()
    for name in tg.ENV_NAMES:
        assert f"`{name}`" in ref


def test_readme_config_table_is_current():
    from conftest import ROOT

    assert tg.config_reference_markdown() in (ROOT / "README.md").read_text()


def test_compile_priming_warms_both_depths_and_restores_state(plain_data, monkeypatch):
    from conftest import TINY

    cfg, _ = tg.load_config(TINY | {"CRAWLER_START_FRAC": "0.5", "WARMUP_STEPS": "4",
                                    "DATA_PATH": str(plain_data["data_path"])})
    rt = dataclasses.replace(tg.Runtime.cpu(), compile=True)  # as if compiled: priming runs
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts, seen = tg.build_optimizers(model, cfg, rt), []
    real = tg.train_step
    monkeypatch.setattr(tg, "train_step", lambda c, *a: (seen.append(model.active_loops), real(c, *a))[1])
    data = tg.TrainData(tg.shard_paths(cfg.data_path, "train"), cfg, rt, 1)
    tg.prime_compile(model, model, opts, data, cfg, rt, lambda s: None)
    assert seen == [1, 1, 2, 2] and model.active_loops == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not opts.muon.state, "optimizer state must be restored to empty"
