"""The CUDA-only branches, reached and tested on a CPU: torch.compile with the same fullgraph / dynamic / recompile
settings as on CUDA (backend aot_eager: the same graphs without code generation), FlashAttention 3 and
flash-linear-attention through stand-ins with the real signatures (tests/stand_ins), the Triton loss under
TRITON_INTERPRET=1, flex_attention's block mask, the shipped wrapper as a subprocess, and the evaluation plan on
two gloo ranks."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import ROOT, clean_env, log_value, run_trainer, tiny_env

STAND_INS = ROOT / "tests" / "stand_ins"
CPU = tg.Runtime.cpu()


@pytest.fixture()
def stand_ins(monkeypatch):
    """FlashAttention 3 and FLA stand-ins importable, as a pod with both installed would have them."""
    monkeypatch.syspath_prepend(str(STAND_INS))
    import flash_attn_interface
    from fla.ops import delta_rule

    for calls in (flash_attn_interface.CALLS, delta_rule.CALLS):
        for k in calls:
            calls[k] = 0
    return flash_attn_interface, delta_rule


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------- the fused loss

CE_CHECK = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import train_gpt as tg
torch.manual_seed(0)
x = (torch.randn(6, 3000) * 20).requires_grad_()
y = torch.randint(0, 3000, (6,))
g = torch.randn(6)
out = {}
for impl in ("triton", "torch", "off"):
    xi = x.detach().clone().requires_grad_()
    loss = tg.softcapped_ce(xi, y, 30.0, 30.0, impl)
    (loss * g).sum().backward()
    out[impl] = (loss.detach(), xi.grad)
ref_l, ref_g = out["off"]
for impl in ("triton", "torch"):
    print("MAXDIFF", impl, float((out[impl][0] - ref_l).abs().max()), float((out[impl][1] - ref_g).abs().max()))

# the kernel's last rows past 2^31 elements: rows x 8192 with int32 offsets wrap (a crash); run only row OFF
import triton.runtime.interpreter as ti
fwd, bwd = tg._ce_kernels()
V, OFF = 8192, 262_144
big = torch.empty(OFF + 1, V, dtype=torch.bfloat16)  # 4.3 GB of address space, one row touched
big[OFF] = (torch.randn(V) * 20).bfloat16()
t = torch.zeros(OFF + 1, dtype=torch.long)
t[OFF] = 4321
loss, lse = torch.zeros(OFF + 1), torch.zeros(OFF + 1)
grid_dim, grid_idx = ti.interpreter_builder.set_grid_dim, ti.interpreter_builder.set_grid_idx
ti.interpreter_builder.set_grid_dim = lambda a, b, c: grid_dim(a + OFF, b, c)
ti.interpreter_builder.set_grid_idx = lambda a, b, c: grid_idx(a + OFF, b, c)
ti.GridExecutor._restore_args_dev = lambda *a, **k: None  # CPU tensors: the kernel wrote them in place
fwd[(1,)](big, t, loss, lse, V, big.stride(0), 30.0, BLOCK=1024)
dx = torch.empty_like(big)
bwd[(1,)](torch.ones(OFF + 1), big, t, lse, dx, V, big.stride(0), 30.0, BLOCK=1024)
xr = big[OFF:].float().requires_grad_()
ref = tg.softcapped_ce(xr, t[OFF:], 30.0, 30.0, "off")
ref.sum().backward()
print("BIGROW", float((loss[OFF] - ref[0]).abs()), float((dx[OFF].float() - xr.grad[0]).abs().max()))
"""


def test_fused_loss_implementations_agree_and_the_kernel_addresses_rows_past_2_31(tmp_path):
    """FUSED_CE=triton (Triton's interpreter) and torch equal the unfused loss and gradient; the kernel's row offset
    is 64-bit: at row 262,144 of an 8,192-token vocabulary an int32 offset wraps and the kernel reads outside the
    logits (before the fix this process died with a segmentation fault)."""
    pytest.importorskip("triton", reason="triton is not installed (requirements-dev.txt installs it)")
    script = tmp_path / "check.py"
    script.write_text(CE_CHECK)
    r = subprocess.run([sys.executable, str(script), str(ROOT)], env=clean_env() | {"TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for line in (l for l in r.stdout.splitlines() if l.startswith("MAXDIFF")):
        _, impl, d_loss, d_grad = line.split()
        assert float(d_loss) < 1e-4 and float(d_grad) < 1e-5, line
    d_loss, d_grad = map(float, r.stdout.split("BIGROW")[1].split())
    assert d_loss < 1e-3 and d_grad < 8e-3, (d_loss, d_grad)  # the gradient is stored in bf16, like the logits


def test_fused_ce_choice_per_device():
    cfg, _ = tg.load_config({})
    assert tg.resolve_fused_ce(cfg, torch.device("cpu")) == "torch"
    assert tg.resolve_fused_ce(dataclasses.replace(cfg, fused_ce="0"), torch.device("cpu")) == "off"
    with pytest.raises(tg.ConfigError, match="TRITON_INTERPRET"):
        tg.resolve_fused_ce(dataclasses.replace(cfg, fused_ce="triton"), torch.device("cpu"))


# ------------------------------------------------------------------------------------------- attention kernels

SMALL = {"VOCAB_SIZE": "97", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "NUM_FLAT_LAYERS": "2",
         "FLAT_ENCODER_LAYERS": "1", "NUM_CRAWLER_LAYERS": "1", "CRAWLER_LOOPS": "2", "ROPE_DIMS": "4",
         "GATE_WINDOW": "8", "PARALLEL_RESIDUAL_START": "2", "TRAIN_SEQ_LEN": "64", "TRAIN_SEQ_SCHEDULE": "",
         "TRAIN_BATCH_TOKENS": "256", "CRAWLER_START_FRAC": "0"}


def long_tail_rows(rows: int, T: int, seed: int, vocab: int = 97, median: float = 12.0) -> torch.Tensor:
    """[rows, T + 1] tokens in documents (BOS = 1) of log-normal lengths whose median changes from stretch to stretch
    (a few hundred to a few thousand tokens of short documents, then of long ones, as FineWeb's mix of forum posts
    and articles): the number of attention segments per batch varies severalfold from one batch to the next."""
    rng = np.random.default_rng(seed)
    out = rng.integers(2, vocab, rows * (T + 1))
    pos, stretch_end, med = 0, 0, median
    while pos < out.size:
        if pos >= stretch_end:
            stretch_end, med = pos + int(rng.integers(500, 3000)), float(rng.choice([median / 2, median * 7]))
        out[pos] = 1
        pos += max(2, int(rng.lognormal(np.log(med), 0.8)))
    return torch.from_numpy(out.reshape(rows, T + 1))


def test_fa3_branch_is_taken_whenever_flash_attn_interface_imports_and_matches_sdpa(stand_ins):
    """ATTN_BACKEND=fa3 takes FlashAttention 3 on any device (here the stand-in); document-masked calls run the
    varlen kernel over the flattened rows, unmasked ones (TTT) the dense kernel; both give SDPA's loss."""
    fa3, _ = stand_ins
    cfg, _ = tg.load_config(SMALL | {"ATTN_BACKEND": "fa3"})
    backend = tg.choose_attention(cfg, torch.device("cpu"), False, [])
    assert backend.name == "fa3"
    torch.manual_seed(0)
    ref = tg.GPT(cfg)
    model = tg.GPT(cfg, tg.Kernels(backend))
    model.load_state_dict(ref.state_dict())
    with torch.no_grad():  # the zero-initialised output projections would hide attention altogether
        for p in list(ref.parameters()) + list(model.parameters()):
            if p.ndim == 2 and (p == 0).all():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    x = long_tail_rows(3, 64, seed=1)
    seg = tg.make_segments(x[:, :-1], 1, 64, torch.device("cpu"))
    for s in (seg, None):
        a, b = ref(x[:, :-1], x[:, 1:], s), model(x[:, :-1], x[:, 1:], s)
        torch.testing.assert_close(b, a, atol=0.05, rtol=0.02)  # FA3 computes in bf16
        ref.zero_grad(), model.zero_grad()
        a.mean().backward(), b.mean().backward()
        for (name, pa), pb in zip(ref.named_parameters(), model.parameters()):
            if pa.grad is not None and "c_" in name:
                torch.testing.assert_close(pb.grad, pa.grad, atol=2e-3, rtol=0.1, msg=name)
    assert fa3.CALLS["varlen"] > 0 and fa3.CALLS["dense"] > 0


def test_fa3_refuses_clearly_when_missing_and_auto_falls_back(monkeypatch):
    cfg, _ = tg.load_config(SMALL | {"ATTN_BACKEND": "fa3"})
    monkeypatch.setattr(tg, "load_fa3", lambda: None)
    with pytest.raises(tg.ConfigError, match="flash_attn_interface is not importable"):
        tg.choose_attention(cfg, torch.device("cpu"), False, [])
    auto = dataclasses.replace(cfg, attn_backend="auto")
    assert tg.choose_attention(auto, torch.device("cpu"), False, []).name == "sdpa"
    assert tg.choose_attention(auto, torch.device("cuda"), False, []).name == "flex"  # no FA3 on a pod: flex


def test_flex_block_mask_is_the_document_mask_and_flex_matches_sdpa():
    """doc_block_mask builds flex_attention's BlockMask from per-block segment ranges (no T x T mask): it equals
    create_block_mask's, and flex_attention's output equals attention with the dense boolean mask (forward only:
    flex has no CPU backward); so does SDPA's blocked form."""
    from torch.nn.attention.flex_attention import create_block_mask

    x = long_tail_rows(2, 300, seed=2, median=40.0)[:, :-1]  # 300 = 2 blocks of 128 and a partial one
    seg = tg.make_segments(x, 1, 96, torch.device("cpu"))
    ours = tg.doc_block_mask(seg.ids, 128)
    ids = seg.ids
    dense = create_block_mask(lambda b, h, q, kv: (q >= kv) & (ids[b, q] == ids[b, kv]), 2, None, 300, 300,
                              device="cpu")
    assert torch.equal(ours.to_dense(), dense.to_dense())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, h, 16, generator=g) for h in (4, 2, 2))
    full = ((ids[:, :, None] == ids[:, None, :]) & torch.ones(300, 300, dtype=torch.bool).tril())[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=full, enable_gqa=True).transpose(1, 2)
    flex, sdpa = tg.FlexAttention(), tg.SDPA
    torch.testing.assert_close(flex(q, k, v, flex.prepare(seg, 300)), ref, atol=1e-5, rtol=1e-5)
    # SDPA's blocked form (each block of max_len against itself and the block before) is the same attention
    torch.testing.assert_close(sdpa(q, k, v, sdpa.prepare(seg, 300)), ref, atol=1e-5, rtol=1e-5)


def test_calibration_runs_flex_through_its_compiled_kernel(monkeypatch):
    """GPTQ calibration's Hessian passes run the model eagerly, on the training clock, and eager flex_attention
    materialises every [B, H, T, T] score matrix ([8, 8, 2048, 2048] fp32 per call, hundreds of calls per pass). When
    the run compiles, flex's kernel is compiled on its own and eager callers go through it (here backend eager traces
    it as inductor would generate it on CUDA); a run that does not compile uses the plain function, and its preflight
    refuses shapes that cannot fit (the next test)."""
    from torch.nn.attention.flex_attention import flex_attention

    assert tg.FlexAttention().kernel is flex_attention
    flex = tg.FlexAttention(compiled=True, backend="eager")
    assert flex.kernel is not flex_attention
    calls, kernel = [], flex.kernel
    monkeypatch.setattr(flex, "kernel", lambda *a, **k: (calls.append(a[0].shape), kernel(*a, **k))[1])
    cfg, _ = tg.load_config(SMALL)
    model = tg.GPT(cfg, tg.Kernels(flex))
    x = long_tail_rows(2, 64, seed=6)
    batches = [tg.to_micro(x[:, :-1], x[:, 1:], cfg, 64, torch.device("cpu"))]
    names = {n for n, t in model.state_dict().items() if tg.quant_plan(n, t, cfg).method == "gptq"}
    tg.collect_hessians(model, batches, names, CPU)
    assert len(calls) == len(tg.application_plan(cfg, model.active_loops)) and calls[0] == (2, 4, 64, 16)


def test_preflight_refuses_an_attention_backend_that_cannot_fit(monkeypatch):
    """SDPA's math kernel at the default shapes needs ~150 GB per micro-batch: refused before any work on an 80 GB
    device, with the fix; flex and FA3 pass."""
    cfg, _ = tg.load_config({})
    monkeypatch.setattr(tg, "device_memory_bytes", lambda device: 80e9)
    rt = lambda attn, compiled=True: dataclasses.replace(CPU, world_size=8, compile=compiled, kernels=tg.Kernels(attn))  # noqa: E731
    with pytest.raises(tg.ConfigError, match="ATTN_BACKEND=flex"):
        tg.check_attention_fits(cfg, rt(tg.SDPA), 1)
    with pytest.raises(tg.ConfigError, match="not compiled"):
        tg.check_attention_fits(cfg, rt(tg.FlexAttention(), compiled=False), 1)
    tg.check_attention_fits(cfg, rt(tg.FlexAttention()), 1)
    tg.check_attention_fits(cfg, rt(tg.FA3Attention(None, None)), 1)


# ------------------------------------------------------------------------------------------- the compiled run

COMPILED = SMALL | {
    "TRAIN_SEQ_LEN": "64", "TRAIN_SEQ_SCHEDULE": "16@0.1,32@0.7,64@1.0", "SEQ_CHANGE_WARMUP_STEPS": "2",
    "TRAIN_BATCH_TOKENS": "1024", "GRAD_ACCUM_STEPS": "1", "CRAWLER_START_FRAC": "0.35", "ITERATIONS": "12",
    "WARMUP_STEPS": "4", "MAX_WALLCLOCK_SECONDS": "0", "GPTQ_RESERVE_SECONDS": "0", "TRAIN_LOG_EVERY": "100",
    "VAL_BATCH_TOKENS": "256", "EVAL_SEQ_LEN": "64", "EVAL_STRIDE": "16", "EVAL_BATCH_TOKENS": "256",
    "TTT_LORA_RANK": "4", "TTT_CHUNK_SIZE": "16", "TTT_SHORT_CHUNKS": "24:8", "TTT_BATCH_DOCS": "4",
    "PHASED_TTT_PREFIX_DOCS": "8", "PHASED_TTT_NUM_PHASES": "1", "TTT_GLOBAL_CHUNK_TOKENS": "256",
    "COMPILE_ENABLED": "1", "COMPILE_BACKEND": "eager", "ATTN_BACKEND": "fa3", "BOS_ID": "1",
}


def write_long_tail_data(root: Path, vocab: int = 97) -> tuple[list[str], tg.ValidationData]:
    """Train shards and a val stream of random tokens in documents with FineWeb-like long-tailed lengths, so the
    number of attention segments per micro-batch varies widely from step to step."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(2):
        p = root / f"fineweb_train_{i:06d}.bin"
        tg.write_shard(p, long_tail_rows(1, 60_000, seed=10 + i, vocab=vocab)[0].numpy().astype(np.uint16))
        paths.append(str(p))
    val = long_tail_rows(1, 3000, seed=20, vocab=vocab, median=40.0)[0]
    val[0] = 1
    return paths, tg.ValidationData(val, torch.ones_like(val, dtype=torch.int32), int((val == 1).sum()), 1)


def test_compiled_schedule_primes_every_shape_and_never_recompiles(tmp_path, stand_ins, fresh_dynamo):
    """The whole schedule compiled as on CUDA (fullgraph, dynamo's guards and recompile limit; backend eager, as
    graphs and guards are dynamo's: the backward's tracing is the next test's), the FA3 varlen branch, every context of
    TRAIN_SEQ_SCHEDULE, the crawler's loop switch at 35%, long-tailed document lengths), then the three evaluations
    of the artifact, in the pipeline's order: the evaluation's graphs are compiled on the training model before
    training (prepare_evaluation: 2 windowed graphs, TTT's LoRA step and the global SGD step, plus their backward, at
    most 6), priming compiles every training shape before the clock, nothing compiles after it (cu_seqlens of every
    length share one graph: padded to buckets, new lengths compiled mid-run, and fullgraph's 9th graph is fatal),
    and the evaluation, loading the artifact into the same model, reuses its graphs: nothing compiles while it
    scores (it compiled everything again after a dynamo reset, inside its clock, before)."""
    fa3, _ = stand_ins
    cfg, _ = tg.load_config(COMPILED)
    paths, val = write_long_tail_data(tmp_path / "data")
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), None, True,
                    tg.Kernels(tg.choose_attention(cfg, torch.device("cpu"), True, [])), compile_backend="eager")
    assert rt.attn.name == "fa3"
    torch.manual_seed(0)
    model, compiled = tg.build_model(cfg, rt)
    lines = []
    ev = tg.prepare_evaluation(model, cfg, rt, val, lines.append)
    warm = int(next(l for l in lines if l.startswith("eval_warmup:")).split("graphs:")[1].split()[0])
    ticks = iter(range(10**6))
    result = tg.train(model, compiled, cfg, rt, tg.TrainData(paths, cfg, rt, 1), val, lines.append,
                      now=lambda: next(ticks) * 0.001)
    primed = int(next(l for l in lines if l.startswith("compile:graphs:")).split(":")[2].split()[0])
    assert not [l for l in lines if "graphs grew" in l], lines
    assert tg.compiled_graph_count() == primed and result.steps == 12
    seen = {(l.split("seq_len:")[1].split()[0]) for l in lines if l.startswith("warmup_step:")}
    assert seen == {"16", "32", "64"}
    tg.validate_and_log(compiled, val, cfg, rt, result.steps, 0.0, lines.append)  # the final validation: primed too
    assert tg.compiled_graph_count() == primed
    art = tmp_path / "a.ptz"
    art.write_bytes(tg.pack_artifact({k: v.half() for k, v in result.final_state.items()}, cfg, "brotli"))
    res = tg.run_evaluation(art, val, cfg, rt, lines.append, ev)
    scoring = int(next(l for l in lines if l.startswith("eval_graphs_compiled_while_scoring:")).split(":")[1])
    print(f"graphs: evaluation {warm} training {primed - warm}")
    assert 0 < warm <= 6 and scoring == 0, (warm, scoring)
    assert tg.compiled_graph_count() == primed
    assert res["same_targets"] and {"roundtrip", "sliding", "ttt"} <= set(res)
    assert fa3.CALLS["varlen"] > 0 and fa3.CALLS["dense"] > 0


def test_custom_ops_trace_their_backward_under_aot_autograd(stand_ins, fresh_dynamo):
    """A compiled training step through AOT autograd (backend aot_eager, fullgraph): the FA3 varlen op and the
    fused loss op trace forward and backward through their fake implementations and give eager's gradients."""
    cfg, _ = tg.load_config(SMALL | {"ATTN_BACKEND": "fa3"})
    kernels = tg.Kernels(tg.choose_attention(cfg, torch.device("cpu"), True, []), "torch")
    torch.manual_seed(0)
    model = tg.GPT(cfg, kernels)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = long_tail_rows(1, 256, seed=4)
    seg = tg.make_segments(x[:, :-1], 1, 64, torch.device("cpu"))
    compiled(x[:, :-1], x[:, 1:], seg).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x[:, :-1], x[:, 1:], seg).mean().backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    assert len(grads) > 10


def test_deltanet_runs_flash_linear_attention_with_segments_compiled_whole(stand_ins, fresh_dynamo):
    """DELTA_BACKEND=fla: FLA's own kernels chunk_delta_rule_fwd / chunk_delta_rule_bwd (here the stand-in, with FLA's
    signatures and dtype asserts) run in bf16 over the flattened rows with the segments' cu_seqlens, also when
    document-masked and when a loop replays the previous loop's writes; as two custom ops linked by autograd they
    compile with fullgraph=True, and output and gradients equal the torch form's. The backward calls FLA's backward
    kernel: no nested torch.autograd (which deadlocks on CUDA's autograd device thread), and the public
    chunk_delta_rule (a graph break) is never called."""
    _, fla = stand_ins
    cfg, _ = tg.load_config(SMALL | {"DELTA_NET_HEADS": "2", "DELTA_BACKEND": "fla"})
    assert tg.resolve_delta(cfg, torch.device("cpu")) == "fla"
    torch.manual_seed(0)
    ref = tg.GPT(cfg)
    model = tg.GPT(cfg, tg.Kernels(delta="fla"))
    model.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for m in (ref, model):
            m.delta.o_proj.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    x = long_tail_rows(2, 48, seed=3)
    seg = tg.make_segments(x[:, :-1], 1, 48, torch.device("cpu"))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    a, b = ref(x[:, :-1], x[:, 1:], seg), compiled(x[:, :-1], x[:, 1:], seg)
    torch.testing.assert_close(b, a, atol=0.02, rtol=0.02)  # FLA runs in bf16
    a.mean().backward()
    b.mean().backward()
    for (name, pa), pb in zip(ref.delta.named_parameters(), model.delta.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-3, rtol=0.1, msg=name)
    assert fla.CALLS["chunk_delta_rule_fwd"] >= 2 and fla.CALLS["chunk_delta_rule_bwd"] >= 2  # two loops
    assert fla.CALLS["chunk_delta_rule"] == 0
    # inputs as a caller may hand them (beta a transposed view): FLA's kernels read dense rows, the backward's too
    g = torch.Generator().manual_seed(2)
    q, k = (torch.nn.functional.normalize(torch.randn(1, 2, 40, 8, generator=g), dim=-1) for _ in range(2))
    v, beta = torch.randn(1, 2, 40, 8, generator=g), torch.rand(1, 40, 2, generator=g).transpose(1, 2)
    for impl in ("fla", "torch"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, beta)]
        tg.delta_rule(*leaves, None, impl).square().sum().backward()
        grads = [t.grad for t in leaves] if impl == "fla" else grads
        ref = [t.grad for t in leaves]
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)


# ------------------------------------------------------------------------------------------- the shipped file


def test_shipped_wrapper_builds_its_triton_kernels(tmp_path):
    """The counted wrapper (what a record ships) exec()s its code from a string; @triton.jit needs the kernel's
    source, so before the fix it failed at the first loss with "@jit functions should be defined in a Python
    file". Loaded as a script, the wrapper builds compiled (not interpreted) kernels with their source."""
    pytest.importorskip("triton", reason="triton is not installed (requirements-dev.txt installs it)")
    wrapper = tmp_path / "train_gpt.py"
    wrapper.write_bytes(tg.shipped_code())
    check = ("import runpy, sys; g = runpy.run_path(sys.argv[1], run_name='shipped'); fwd, bwd = g['_ce_kernels'](); "
             "print(type(fwd).__name__, 'def fwd(' in fwd.src)")
    built = subprocess.run([sys.executable, "-c", check, str(wrapper)], env=clean_env(), capture_output=True, text=True,
                           timeout=120)
    assert built.returncode == 0 and built.stdout.split() == ["JITFunction", "True"], built.stderr[-2000:]


@pytest.mark.slow
def test_shipped_wrapper_reproduces_the_development_file_with_triton_and_fa3(plain_data, tmp_path):
    """Run with the Triton loss (interpreter) and the FA3 stand-in, the shipped wrapper trains and evaluates
    exactly as the development file does."""
    pytest.importorskip("triton", reason="triton is not installed (requirements-dev.txt installs it)")
    # Triton's interpreter takes ~6 ms per row of logits: a handful of 128-token steps and a 256-token val set
    env = tiny_env(plain_data, ITERATIONS=4, TRAIN_BATCH_TOKENS=128, FUSED_CE="triton", ATTN_BACKEND="fa3",
                   VAL_TOKEN_LIMIT=256, VAL_BATCH_TOKENS=128, EVAL_SEQ_LEN=64, EVAL_BATCH_TOKENS=128, SLIDING_EVAL=0,
                   TTT_ENABLED=0, GPTQ_CAL_SAMPLES=4, TRAIN_LOG_EVERY=1) | {"TRITON_INTERPRET": "1",
                                                                            "PYTHONPATH": str(STAND_INS)}
    (tmp_path / "dev").mkdir()
    dev = run_trainer(env, tmp_path / "dev")
    assert dev.returncode == 0, dev.stdout[-2000:] + dev.stderr[-3000:]
    assert "attention_backend:fa3" in dev.stdout and "fused_ce=triton" in dev.stdout
    wrapper = tmp_path / "ship" / "train_gpt.py"
    wrapper.parent.mkdir()
    wrapper.write_bytes((tmp_path / "dev" / "train_gpt.counted.py").read_bytes())
    full = clean_env() | {"OMP_NUM_THREADS": "1", "OUTPUT_DIR": str(tmp_path / "ship")} | env
    shipped = subprocess.run([sys.executable, str(wrapper)], env=full, cwd=wrapper.parent, capture_output=True,
                             text=True, timeout=600)
    assert shipped.returncode == 0, shipped.stderr[-3000:]
    keys = ("step:", "final_int6_roundtrip_exact")
    lines = lambda out: [l.split(" eval_time")[0].split(" train_time")[0] for l in out.splitlines() if l.startswith(keys)]  # noqa: E731
    assert lines(shipped.stdout) == lines(dev.stdout) and len(lines(dev.stdout)) == 6


# ------------------------------------------------------------------------------------------- the GPU's precision


def test_the_gpus_bf16_precision_runs_the_whole_pipeline_on_a_cpu(plain_data, tmp_path):
    """On CUDA the forward runs under bf16 autocast with a bf16 residual stream; the other CPU tests run fp32.
    AUTOCAST=bf16 takes the CUDA precision on a CPU, here with the FA3 stand-in (bf16/fp16 only, as FA3 checks):
    the run trains, calibrates, packs and evaluates every mode, and its roundtrip score is the fp32 score of the
    same artifact to bf16's precision."""
    # a CPU multiplies bf16 ~10x slower than fp32: a few 512-token steps and a 512-token val prefix
    env = tiny_env(plain_data, ITERATIONS=4, TRAIN_BATCH_TOKENS=512, AUTOCAST="bf16", ATTN_BACKEND="fa3",
                   VAL_TOKEN_LIMIT=512, VAL_BATCH_TOKENS=512, EVAL_BATCH_TOKENS=512, GPTQ_CAL_SAMPLES=8,
                   TTT_BATCH_DOCS=4, PHASED_TTT_PREFIX_DOCS=4, PHASED_TTT_NUM_PHASES=1)
    r = run_trainer(env | {"PYTHONPATH": str(STAND_INS)}, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "autocast=bf16" in r.stdout and "attention_backend:fa3" in r.stdout
    assert all(m in r.stdout for m in ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact",
                                       "quantized_ttt_phased"))
    cfg, _ = tg.load_config(env | {"AUTOCAST": "fp32", "ATTN_BACKEND": "sdpa", "SLIDING_EVAL": "0", "TTT_ENABLED": "0"})
    lines = []
    tg.run_evaluation(tmp_path / "final_model.int6.ptz", tg.load_validation(cfg, tg.load_sentencepiece(
        cfg.tokenizer_path)), cfg, CPU, lines.append)
    fp32 = log_value("\n".join(lines), "final_int6_roundtrip_exact", "val_bpb:")
    bf16 = log_value(r.stdout, "final_int6_roundtrip_exact", "val_bpb:")
    print(f"roundtrip val_bpb: bf16 autocast {bf16:.6f}, fp32 {fp32:.6f}")
    assert abs(bf16 - fp32) < 0.002 * fp32 and bf16 != fp32, (bf16, fp32)  # measured: 2e-5 relative


def test_muons_nccl_collectives_give_the_gloo_update_on_two_ranks(tmp_path):
    """Comm's NCCL branch (an asynchronous reduce-scatter with AVG, then an asynchronous all_gather_into_tensor) runs
    every step on 8xH100 and never on gloo. Through stand-ins of the two NCCL collectives with their signatures, whose
    outputs are only written when waited on (tests/dist_comm_worker.py), two ranks' Muon updates are the gloo
    branch's bit for bit, and the same on both ranks. The updates are gathered in bf16 (#1855; fp32 before), and
    asynchronously: each bank's gather is waited on only after the next bank's Newton-Schulz has run (before, each
    gather blocked before the next bank started)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_comm_worker.py")]
    r = subprocess.run(cmd, env=clean_env() | {"OMP_NUM_THREADS": "1", "COMM_OUT": str(tmp_path)}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    for res in ranks:
        assert res["calls"]["reduce_scatter_tensor"] >= 3 and res["calls"]["all_gather_into_tensor"] >= 3
        assert res["nccl"].keys() == res["gloo"].keys() and len(res["gloo"]) > 10
        for name, p in res["gloo"].items():
            assert torch.equal(res["nccl"][name], p), name
            assert torch.equal(ranks[1]["nccl"][name], ranks[0]["nccl"][name]), name
        assert res["gathered_dtypes"] == ["torch.bfloat16"]
        events, banks = res["events"], 1 + max(b for _, b in res["events"])
        assert banks > 2 and len(events) == 2 * 3 * banks  # three steps, one NS and one gathered per bank
        for step in range(3):
            one = events[step * 2 * banks:(step + 1) * 2 * banks]
            for b in range(1, banks):
                assert one.index(("ns", b)) < one.index(("gathered", b - 1)), one


def test_the_evaluation_plan_is_one_plan_on_every_rank(tmp_path):
    """Two gloo ranks whose measured costs differ would each fit a different plan near a cut (and then issue
    different collectives); the group takes the slowest rank's costs and rank 0's decision."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_plan_worker.py")]
    r = subprocess.run(cmd, env=clean_env() | {"OMP_NUM_THREADS": "1", "PLAN_OUT": str(tmp_path)}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert len(res) == 2
    assert res[0]["alone"] != res[1]["alone"], "the costs must straddle a cut, or this test proves nothing"
    assert res[0]["agreed"] == res[1]["agreed"] == res[1]["alone"]


def test_the_evaluation_timer_starts_after_the_warmup_and_the_artifact_load(trained_tiny, monkeypatch):
    """The evaluation clock (README: "The evaluation clock"): reading and decompressing the artifact and compiling
    and timing the evaluation's graphs on random tokens (#2014 logs 136-149 s for TTT's compile alone) run before the
    timer, as the accepted records keep them (#1855, #2135); the timer starts at the first read of validation
    tokens, the n-gram tilt's pass, so the plan gets the whole budget less that pass. Before, a 250 s warm-up left
    350 s of the budget."""
    cfg, _ = tg.load_config(trained_tiny["env"] | {"EVAL_BUDGET_SECONDS": "600"})
    val = tg.ValidationData(*(lambda t: (t, torch.ones_like(t, dtype=torch.int32), int((t == 1).sum()), 1))(
        long_tail_rows(1, 600, seed=5, vocab=cfg.vocab_size)[0]))
    clock = {"t": 0.0}
    real_costs, real_unpack = tg.measure_costs, tg.unpack_artifact

    def slow_warmup(*a, **k):
        clock["t"] += 250.0  # a compile as slow as a full-size TTT warm-up
        return real_costs(*a, **k)

    def slow_unpack(*a, **k):
        clock["t"] += 40.0  # ZPAQ at full size on a slow host
        return real_unpack(*a, **k)

    monkeypatch.setattr(tg, "measure_costs", slow_warmup)
    monkeypatch.setattr(tg, "unpack_artifact", slow_unpack)
    lines = []
    res = tg.run_evaluation(trained_tiny["out"] / "final_model.int6.ptz", val, cfg, CPU, lines.append,
                            now=lambda: clock["t"])
    plan = next(l for l in lines if l.startswith("eval_plan:"))
    assert "budget:600s" in plan, plan
    assert next(l for l in lines if l.startswith("eval_outside_timer:")) == \
        "eval_outside_timer: artifact_load:40.0s warmup:250.0s"
    assert res["eval_total_s"] == 0.0 and res["eval_within_budget"]


def untraceable(q, k, v, **kw):  # an FA3 build without torch custom ops behaves like this
    torch._dynamo.graph_break()
    return q


def test_probe_tells_a_traceable_kernel_from_one_that_breaks_the_graph():
    def traceable(q, k, v, **kw):
        return q * 1.0

    for masked in (False, True):
        assert tg.probe_traceable(tg.FA3Attention(untraceable, untraceable), torch.device("cpu"), masked)
        assert tg.probe_traceable(tg.FA3Attention(traceable, traceable), torch.device("cpu"), masked) is None


@torch.library.custom_op("probe_test::attention", mutates_args=())
def _probe_attention(q: torch.Tensor) -> torch.Tensor:
    return q.clone()


@_probe_attention.register_fake
def _(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("probe_test::attention_backward", mutates_args=())
def _probe_attention_backward(g: torch.Tensor) -> torch.Tensor:
    return g.clone()  # no fake implementation: compile cannot trace it, as a build whose backward op is not registered


torch.library.register_autograd("probe_test::attention", lambda ctx, g: torch.ops.probe_test.attention_backward(g))


def forward_only_build(q, k, v, **kw):  # an FA3 build whose forward traces and whose backward does not
    return torch.ops.probe_test.attention(q)


@pytest.mark.parametrize("masked", [False, True])
def test_the_probe_traces_the_backward_too(masked, fresh_dynamo):
    """FA3's backward is an op of its own. A build whose backward op does not trace passed the forward-only probe
    (backend eager, no gradients), then died at training step 1 under fullgraph=True instead of falling back to
    flex: the probe now compiles forward and backward through AOT autograd, as training does."""
    q = torch.zeros(1, 128, 2, 64, dtype=torch.bfloat16)
    torch.compile(lambda a: forward_only_build(a, a, a), fullgraph=True, backend="eager")(q)  # the old probe passed
    assert tg.probe_traceable(tg.FA3Attention(forward_only_build, forward_only_build), torch.device("cpu"), masked)
    traceable = tg.FA3Attention(lambda q, k, v, **kw: q * 1.0, lambda q, k, v, **kw: q * 1.0)
    assert tg.probe_traceable(traceable, torch.device("cpu"), masked) is None


def test_an_fa3_that_does_not_trace_is_refused_when_asked_for_and_replaced_by_flex_on_auto(monkeypatch):
    monkeypatch.setattr(tg, "load_fa3", lambda: (untraceable, untraceable))
    cfg, _ = tg.load_config(SMALL | {"ATTN_BACKEND": "fa3"})
    with pytest.raises(tg.ConfigError, match="does not trace"):
        tg.choose_attention(cfg, torch.device("cpu"), True, [])
    monkeypatch.setattr(tg, "probe_traceable", lambda *a: "Unsupported: graph break")  # as on a pod (CUDA)
    notes = []
    backend = tg.choose_attention(dataclasses.replace(cfg, attn_backend="auto"), torch.device("cuda"), True, notes)
    assert backend.name == "flex" and "does not trace" in notes[0]
