"""Measure the reference configuration on one GPU (or a tiny one on the CPU) with synthetic tokens:

  python3 tools/gpu_bench.py                 # full size on CUDA: prints key:value lines, writes bench.json
  python3 tools/gpu_bench.py --tiny          # the same code paths on the CPU in seconds (CI runs this)
  GPTQ_CAL_SAMPLES=16 python3 tools/gpu_bench.py --quant-only   # full-size artifact size check, CPU ok (~8 min)

What it measures, each figure with the configuration it came from:
  attention backend and whether FlashAttention 3 traces under torch.compile;
  training: compile time and graph count over every (context, depth) the schedule reaches, then ms per optimizer
    step on this GPU's share of the batch (TRAIN_BATCH_TOKENS / 8 tokens), tokens/s, MFU against 790 TFLOP/s
    (model FLOPs: train_flops_per_token), peak memory;
  the fused softcapped cross-entropy against the torch loss (max abs difference);
  evaluation: forward seconds per token, forward+backward seconds per token (the eval planner's costs), and the
    planner's projection for the published validation split (47,853,343 targets in 50,000 documents; document
    lengths from DATA_PATH's val shard when present, else a log-normal with the split's mean length);
  calibration and packing on Gaussian rows (an upper bound on a trained checkpoint's bytes): Hessian collection,
    loop-aware GPTQ and rate-controlled packing time, the entropy estimate, artifact bytes, unpack time;
  with --tiny, a real small evaluation timed stage by stage against the planner's projection.
Environment variables configure the model exactly as for train_gpt.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

TINY = {"VOCAB_SIZE": "97", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "NUM_FLAT_LAYERS": "3",
        "FLAT_ENCODER_LAYERS": "1", "NUM_CRAWLER_LAYERS": "1", "CRAWLER_LOOPS": "2", "ROPE_DIMS": "4",
        "GATE_WINDOW": "8", "PARALLEL_RESIDUAL_START": "3", "TRAIN_SEQ_LEN": "64", "TRAIN_SEQ_SCHEDULE": "32@0.5,64@1.0",
        "TRAIN_BATCH_TOKENS": "2048", "GPTQ_CAL_SAMPLES": "8", "GPTQ_CAL_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64",
        "EVAL_STRIDE": "16", "TTT_CHUNK_SIZE": "16", "TTT_SHORT_CHUNKS": "", "TTT_BATCH_DOCS": "4", "TTT_LORA_RANK": "4",
        "PHASED_TTT_PREFIX_DOCS": "8", "TTT_GLOBAL_CHUNK_TOKENS": "256", "EVAL_BATCH_TOKENS": "1024"}
H100_BF16_FLOPS = 790e12  # the MFU reference of the GPU-readiness issue
PUBLISHED_VAL = (47_853_343, 50_000)  # targets and documents of the CaseOps val split


def synthetic_rows(cfg: tg.Config, rows: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens with a BOS every ~T/3 positions (documents for the masked attention)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, cfg.vocab_size, (rows, T + 1), generator=g)
    x[torch.rand(rows, T + 1, generator=g) < 3 / T] = cfg.bos_id
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def bench_training(cfg: tg.Config, rt: tg.Runtime, steps: int, out: dict) -> tg.GPT:
    model, compiled = tg.build_model(cfg, rt)
    opts = tg.build_optimizers(model, cfg, rt)
    rows = max(1, cfg.train_batch_tokens // 8 // cfg.train_seq_len)  # one GPU's share of an 8-GPU step

    def step(seq: int) -> None:
        x, y = synthetic_rows(cfg, rows, cfg.train_seq_len, seed=seq)
        tg.train_step(compiled, [tg.to_micro(x, y, cfg, seq, rt.device)], opts, cfg, rt)

    t_compile = 0.0
    for seq, loops in tg.compile_shapes(cfg):
        model.set_active_loops(loops)
        t_compile += tg.timed_call(lambda: step(seq), rt.device)
    out["train_compile_s"] = round(t_compile, 1)
    out["train_graphs"] = tg.compiled_graph_count()
    tg.reset_peak_memory(rt.device)
    for seq, loops in tg.compile_shapes(cfg):
        model.set_active_loops(loops)
        ms = 1000 * tg.timed_call(lambda: [step(seq) for _ in range(steps)], rt.device) / steps
        tok_s = rows * cfg.train_seq_len / (ms / 1000)
        out[f"train_ms_per_step_seq{seq}_loops{loops}"] = round(ms, 2)
        out[f"train_tokens_per_s_seq{seq}_loops{loops}"] = round(tok_s)
        mfu = train_flops_per_token(model, cfg, seq, loops) * tok_s / H100_BF16_FLOPS
        out[f"train_mfu_vs_790tflops_seq{seq}_loops{loops}"] = float(f"{mfu:.3g}")
    out["train_tokens_per_gpu_step"] = rows * cfg.train_seq_len
    out["train_peak_memory_mib"] = round(tg.peak_memory_mib(rt.device))
    return model


def bench_fused_ce(cfg: tg.Config, rt: tg.Runtime, out: dict) -> None:
    if rt.device.type != "cuda" or not tg.fused_ce_available():
        out["fused_ce"] = "not run (needs CUDA and triton)"
        return
    x = (torch.randn(4096, cfg.vocab_size, device=rt.device) * 20).bfloat16().requires_grad_()
    y = torch.randint(0, cfg.vocab_size, (4096,), device=rt.device)
    fused = tg.softcapped_ce(x, y, cfg.logit_softcap, cfg.logit_softcap, fused=True)
    ref = tg.softcapped_ce(x.float(), y, cfg.logit_softcap, cfg.logit_softcap, fused=False)
    out["fused_ce_max_abs_diff"] = float((fused - ref).abs().max())


def val_doc_lengths(cfg: tg.Config, scale: float) -> tuple[list[tuple[int, int]], str]:
    paths = tg.shard_paths(cfg.data_path, "val")
    if paths:
        tokens = torch.from_numpy(np.concatenate([tg.load_shard(p) for p in paths]).astype(np.int64))
        return tg.document_spans(tokens, cfg.bos_id), f"{cfg.data_path}"
    n_targets, n_docs = (int(v * scale) for v in PUBLISHED_VAL)
    rng = np.random.default_rng(0)
    lens = rng.lognormal(0.0, 1.0, n_docs)
    lens = np.maximum(2, np.round(lens * n_targets / lens.sum())).astype(int)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return [(int(s), int(s + n)) for s, n in zip(starts, lens)], "log-normal (no val shard found)"


def bench_eval(model: tg.GPT, cfg: tg.Config, rt: tg.Runtime, world: int, scale: float, out: dict) -> None:
    costs = tg.measure_costs(tg.compile_model(model, cfg, rt), cfg, rt, seq=min(cfg.eval_seq_len, 1024))
    out["eval_fwd_s_per_token"], out["eval_train_s_per_token"] = costs.fwd_s, costs.train_s
    docs, source = val_doc_lengths(cfg, scale)
    n_targets = docs[-1][1] if docs else 0
    plan = tg.EvalPlan(cfg.sliding_eval, cfg.ttt_enabled, cfg.phased_ttt_num_phases, cfg.phased_ttt_prefix_docs)
    secs = tg.project_seconds(plan, docs, n_targets, cfg, world, costs)
    out["eval_projection_docs"] = f"{source}, {len(docs)} documents"
    out |= {f"eval_projected_{k}_s_on_{world}_gpus": round(v, 1) for k, v in secs.items()}
    fitted = tg.fit_plan(cfg, docs, n_targets, world, costs, cfg.eval_budget_seconds, lambda s: None)
    out["eval_plan_within_budget"] = fitted.describe()


def bench_quant(model: tg.GPT, cfg: tg.Config, rt: tg.Runtime, out: dict) -> None:
    """Calibration, loop-aware GPTQ and packing under the cap, on Gaussian rows with each matrix's init std: for a
    given row std the Gaussian has the largest entropy, so this artifact bounds a trained one's from above."""
    with torch.no_grad():  # the zero-initialised output projections would otherwise pack to nothing
        for name, p in model.named_parameters():
            if p.ndim == 2 and tg.param_route(name, p) == "matrix":
                p.normal_(0, 1 / math.sqrt(p.size(1)))
    seq = cfg.gptq_cal_seq_len or cfg.train_seq_len
    batches = [tg.to_micro(*synthetic_rows(cfg, 8, seq, seed=i), cfg, seq, rt.device)
               for i in range(max(1, cfg.gptq_cal_samples // 8))]
    cal, packed, lines = None, None, []

    def calibrate():
        nonlocal cal
        cal = tg.calibrate(model, cfg, rt, batches, lines.append)

    def quantize_and_pack():
        nonlocal packed
        packed = tg.pack_within_cap(model, cal, cfg, rt, len(code), lines.append)

    code = tg.shipped_code()
    out["calibrate_s"] = round(tg.timed_call(calibrate, rt.device), 1)
    out["quantize_and_pack_s"] = round(tg.timed_call(quantize_and_pack, rt.device), 1)
    out["artifact_estimate_bytes"] = next(l.split()[1] for l in lines if l.startswith("artifact_estimate:"))
    out["artifact_fit"] = [l.split(": ", 1)[1] for l in lines if l.startswith("artifact_fit:")]
    out["artifact_model_bytes"] = len(packed)
    out["code_bytes"] = len(code)
    out["artifact_total_bytes"] = len(packed) + len(code)
    out["unpack_s"] = round(tg.timed_call(lambda: tg.unpack_artifact(packed), rt.device), 1)


def train_flops_per_token(model: tg.GPT, cfg: tg.Config, seq: int, loops: int) -> float:
    """Model FLOPs per trained token: 6 per weight application (forward + backward) over the blocks' linear
    layers (crawler blocks once per loop) and the tied head, plus causal attention 6 * dim * seq per block application
    (PaLM's convention halved for the causal mask; document masking does less work than this counts)."""
    applied = sum(m.weight.numel() * (loops if tg.is_crawler(n + ".weight", cfg) else 1)
                  for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks."))
    blocks = cfg.num_flat_layers + cfg.num_crawler_layers * loops if cfg.use_crawler else cfg.num_layers
    return 6 * (applied + cfg.vocab_size * cfg.model_dim) + 6 * blocks * cfg.model_dim * seq


def eval_check(cfg: tg.Config, rt: tg.Runtime, out: dict) -> None:
    """A real small evaluation, stage by stage, against the planner's projection (the time model's check)."""
    x, _ = synthetic_rows(cfg, 1, 1500, seed=7)
    tokens = torch.cat([torch.tensor([cfg.bos_id]), x[0]])
    val = tg.ValidationData(tokens, torch.ones_like(tokens, dtype=torch.int32), int((tokens == cfg.bos_id).sum()),
                            cfg.bos_id)
    model = tg.GPT(cfg)
    docs = tg.document_spans(val.tokens, cfg.bos_id)
    costs = tg.measure_costs(model, cfg, rt)
    plan = tg.EvalPlan(True, True, cfg.phased_ttt_num_phases, cfg.phased_ttt_prefix_docs)
    projected = tg.project_seconds(plan, docs, val.tokens.numel() - 1, cfg, 1, costs)
    measured = {k: tg.timed_call(lambda k=k: tg.run_stage(k, model, model, val, cfg, rt, lambda s: None), rt.device)
                for k in ("roundtrip", "sliding", "ttt")}
    for k in measured:
        out[f"eval_check_{k}_measured_s"] = round(measured[k], 2)
        out[f"eval_check_{k}_projected_s"] = round(projected[k], 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run of every code path)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per shape")
    ap.add_argument("--world", type=int, default=8, help="GPUs the eval projection is for")
    ap.add_argument("--quant-only", action="store_true",
                    help="only calibration, GPTQ and packing (a full-size size check that a CPU can run)")
    ap.add_argument("--out", type=Path, default=Path("bench.json"))
    a = ap.parse_args(argv)
    import os

    env = dict(os.environ) | (TINY if a.tiny else {}) | {"MAX_WALLCLOCK_SECONDS": "0", "ALLOW_UNKNOWN_ENV": "1"}
    cfg, _ = tg.load_config(env)
    rt = tg.setup_runtime(cfg)
    out: dict = {"device": rt.hardware, "torch": torch.__version__, "attention_backend": rt.attn.name,
                 "notes": list(rt.notes), "model_params": None}
    if a.quant_only:
        torch.manual_seed(cfg.seed)
        model = tg.GPT(cfg, rt.attn).to(rt.device)
    else:
        model = bench_training(cfg, rt, a.steps, out)
        bench_fused_ce(cfg, rt, out)
        bench_eval(model, cfg, rt, a.world, 0.002 if a.tiny else 1.0, out)
    out["model_params"] = sum(p.numel() for p in model.parameters())
    bench_quant(model, cfg, rt, out)
    if a.tiny:
        eval_check(dataclasses.replace(cfg, ttt_enabled=True), tg.Runtime.cpu(), out)
    for k, v in out.items():
        print(f"{k}:{v}")
    a.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
