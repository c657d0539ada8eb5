"""The one prepared check for a lent GPU (one H100/H200, about 8 minutes), or the same code on a CPU in seconds:

  python3 tools/gpu_bench.py --text .bench/web_sample.jsonl --tokenizer .bench/caseops.model   # on the GPU
  python3 tools/gpu_bench.py --tiny          # the same code paths on the CPU (CI runs this)
  GPTQ_CAL_SAMPLES=16 python3 tools/gpu_bench.py --quant-only   # full-size artifact size check, CPU ok (~8 min)

What it measures, in this order, each figure with the configuration it came from (one summary table at the end,
and bench.json):
  1. setup: the attention backend the trainer picks (FA3 if importable and traceable, else flex), the loss
     kernel, compile settings;
  2. training shapes: compile time, then ms per optimizer step, tokens/s and MFU against 790 TFLOP/s for every
     (context, crawler depth) of TRAIN_SEQ_SCHEDULE, on this GPU's share of a step (TRAIN_BATCH_TOKENS / 8) of
     real document lengths; peak memory; the fused loss against the torch loss;
  3. real training: the trainer's own loop (priming, schedule, EMA) for --train-seconds on tokenized text
     (--text/--tokenizer: a JSONL of documents and the CaseOps SentencePiece model; --tiny: generated text), the
     loss curve, and whether anything compiled after priming;
  4. evaluation at real shapes on a slice of that text's validation documents: the warm-up (compile + cost
     probes), then roundtrip, sliding and TTT each timed against the planner's projection, and the projection
     for the published validation split on --world GPUs;
  5. the shipped (counted) wrapper run as a subprocess for a few steps on the same shards; the n-gram tilt's pass at
     full length; the DeltaNet's FLA kernels against the torch form (when fla is installed);
  6. calibration, loop-aware GPTQ and rate-controlled packing at full size (Gaussian rows: an upper bound).
Environment variables configure the model exactly as for train_gpt.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

TINY = {"VOCAB_SIZE": "512", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "NUM_FLAT_LAYERS": "3",
        "FLAT_ENCODER_LAYERS": "1", "NUM_CRAWLER_LAYERS": "1", "CRAWLER_LOOPS": "2", "ROPE_DIMS": "4",
        "GATE_WINDOW": "8", "PARALLEL_RESIDUAL_START": "3", "TRAIN_SEQ_LEN": "64", "TRAIN_SEQ_SCHEDULE": "32@0.5,64@1.0",
        "TRAIN_BATCH_TOKENS": "4096", "GPTQ_CAL_SAMPLES": "8", "GPTQ_CAL_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64",
        "EVAL_STRIDE": "16", "TTT_CHUNK_SIZE": "16", "TTT_SHORT_CHUNKS": "", "TTT_BATCH_DOCS": "4", "TTT_LORA_RANK": "4",
        "PHASED_TTT_PREFIX_DOCS": "8", "TTT_GLOBAL_CHUNK_TOKENS": "256", "EVAL_BATCH_TOKENS": "1024",
        "VAL_BATCH_TOKENS": "1024", "WARMUP_STEPS": "4", "TRAIN_LOG_EVERY": "5", "VAL_TOKEN_LIMIT": "2000"}
H100_BF16_FLOPS = 790e12  # the MFU reference of the GPU-readiness issue


def flat_batch(tokens: np.ndarray, n: int, seq: int, cfg: tg.Config, rt: tg.Runtime, at: int) -> list[tg.Micro]:
    """One micro-batch as the trainer reads it: a flat span of n tokens, segments cut at BOS and every seq."""
    chunk = torch.from_numpy(tokens[at:at + n + 1].astype(np.int64))
    x, y = chunk[None, :-1], chunk[None, 1:]
    return [tg.to_micro(x, y, cfg, seq, rt.device)]


def bench_shapes(model: tg.GPT, compiled, cfg: tg.Config, rt: tg.Runtime, tokens: np.ndarray, steps: int,
                 out: dict) -> None:
    opts = tg.build_optimizers(model, cfg, rt)
    n = cfg.train_batch_tokens // 8  # one GPU's share of an 8-GPU step
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for seq, loops in tg.compile_shapes(cfg):
        model.set_active_loops(loops)
        key = f"seq{seq}_loops{loops}"
        at = iter(range(0, max(1, tokens.size - n - 1), n))
        step = lambda: tg.train_step(compiled, flat_batch(tokens, n, seq, cfg, rt, next(at, 0)), opts, cfg, rt)  # noqa: E731
        out[f"compile_s_{key}"] = round(tg.timed_call(step, rt.device), 1)
        tg.reset_peak_memory(rt.device)
        ms = 1000 * tg.timed_call(lambda: [step() for _ in range(steps)], rt.device) / steps
        tok_s = n / (ms / 1000)
        out[f"train_ms_per_step_{key}"] = round(ms, 2)
        out[f"train_tokens_per_s_{key}"] = round(tok_s)
        out[f"train_mfu_vs_790tflops_{key}"] = float(f"{train_flops_per_token(model, cfg, seq, loops) * tok_s / H100_BF16_FLOPS:.3g}")
        out[f"train_peak_memory_mib_{key}"] = round(tg.peak_memory_mib(rt.device))
    out["train_graphs_after_shapes"] = tg.compiled_graph_count()
    out["train_tokens_per_gpu_step"] = n
    model.load_state_dict(saved)


def bench_fused_ce(cfg: tg.Config, rt: tg.Runtime, out: dict) -> None:
    x = (torch.randn(4096, cfg.vocab_size, device=rt.device) * 20).to(rt.autocast_dtype or torch.float32)
    y = torch.randint(0, cfg.vocab_size, (4096,), device=rt.device)
    fused = tg.softcapped_ce(x, y, cfg.logit_softcap, cfg.logit_softcap, rt.kernels.ce)
    ref = tg.softcapped_ce(x.float(), y, cfg.logit_softcap, cfg.logit_softcap, "off")
    out[f"fused_ce_{rt.kernels.ce}_max_abs_diff"] = float((fused - ref).abs().max())


def tokenized(text: Path | None, tokenizer: Path | None, cfg: tg.Config, work: Path, tiny: bool) -> Path:
    """CaseOps shards (train + val + sidecar) of the given documents, or of generated ones with --tiny."""
    import prepare_caseops_data as prep
    import synthetic_corpus

    data = work / "data"
    if text is None:
        text = work / "docs.jsonl"
        text.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_corpus.generate_documents(800, seed=0)))
    if tokenizer is None:
        tokenizer = prep.train_tokenizer(str(text), cfg.vocab_size, str(work / "tok"), skip_docs=200)
    prep.prepare_shards(str(text), str(tokenizer), data, val_docs=200 if tiny else 300,
                        shard_tokens=10**8, workers=max(1, (os.cpu_count() or 2) // 2), progress=False)
    (data / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return data


def bench_training(model: tg.GPT, compiled, cfg: tg.Config, rt: tg.Runtime, data: Path, seconds: float,
                   out: dict) -> tg.ValidationData:
    """The trainer's loop on the tokenized text for `seconds` (wallclock cap), its loss curve and graph count."""
    tcfg = dataclasses.replace(cfg, max_wallclock_seconds=seconds, gptq_reserve_seconds=0.0, iterations=100_000,
                               data_path=str(data))
    val = tg.load_validation(dataclasses.replace(tcfg, caseops_enabled=True), None)
    lines: list[str] = []
    t0 = time.perf_counter()
    result = tg.train(model, compiled, tcfg, rt, tg.TrainData(tg.shard_paths(str(data), "train"), tcfg, rt, 1), val,
                      lines.append)
    out["real_train_wall_s"] = round(time.perf_counter() - t0, 1)
    out["real_train_steps"] = result.steps
    out["real_train_ms_per_step"] = round(result.train_ms / max(1, result.steps), 2)
    out["real_train_loss_curve"] = [(int(l.split("/")[0][5:]), float(l.split("train_loss:")[1].split()[0]))
                                    for l in lines if l.startswith("step:") and "train_loss:" in l]
    out["real_train_recompiled"] = any("graphs grew" in l for l in lines)
    out["real_train_peak_memory_mib"] = round(result.peak_mem_mib)
    return val


def bench_guards(model: tg.GPT, rt: tg.Runtime, out: dict) -> None:
    """Issue 17's host snapshot on this device: the host time a training step pays for it (the launch of the
    asynchronous copy on CUDA), and the copy's own time on its side stream."""
    rescue, state = tg.Rescue(rt=rt), {k: v.detach() for k, v in model.state_dict().items()}
    rescue.snapshot(state, 0)
    tg.sync(rt.device)
    host, copy = [], []
    for i in range(1, 11):
        t0 = time.perf_counter()
        rescue.snapshot(state, i * rescue.SNAPSHOT_EVERY)
        host.append(time.perf_counter() - t0)
        if rescue.pending is not None and rescue.pending[2] is not None:
            rescue.pending[2].synchronize()
        copy.append(time.perf_counter() - t0)
    out["snapshot_host_ms"] = round(1e3 * sorted(host)[5], 3)
    out["snapshot_copy_ms"] = round(1e3 * sorted(copy)[5], 3)


def bench_fla(rt: tg.Runtime, tiny: bool, out: dict) -> None:
    """DELTA_BACKEND=fla (a seed option): flash-linear-attention's own forward and backward kernels through our two
    custom ops, against the torch form, on document segments, and the time of a forward + backward of each. Skipped
    when fla is not installed (carry fla-core as a wheel)."""
    import importlib.util

    if importlib.util.find_spec("fla") is None:
        out["fla"] = "not installed"
        return
    B, H, T, D = 1, 4, 256 if tiny else 8192, 64
    g = torch.Generator().manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=g), dim=-1) for _ in range(2))
    v, beta = torch.randn(B, H, T, D, generator=g), torch.rand(B, H, T, generator=g)
    rows = tg.random_rows(tg.load_config({"VOCAB_SIZE": "512"})[0], B, T, g)[:, :-1]
    seg = tg.make_segments(rows, 1, T, rt.device)
    res = {}
    for impl in ("torch", "fla"):
        leaves = [t.to(rt.device, copy=True).requires_grad_() for t in (q, k, v, beta)]  # own leaves per impl
        step = lambda: tg.delta_rule(*leaves, seg, impl).float().square().sum().backward()  # noqa: E731
        o = tg.delta_rule(*leaves, seg, impl)
        o.float().square().sum().backward()
        res[impl] = (o.detach().float(), [t.grad.float().clone() for t in leaves])
        out[f"fla_fwd_bwd_ms_{impl}"] = round(1000 * tg.timed_call(step, rt.device), 2)
    out["fla_output_max_abs_diff"] = float((res["fla"][0] - res["torch"][0]).abs().max())
    out["fla_grad_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(res["fla"][1], res["torch"][1]))


def bench_tilt(cfg: tg.Config, rt: tg.Runtime, tiny: bool, out: dict) -> None:
    """The n-gram tilt's hint pass on this device over a stream as long as the CaseOps val split (1M tokens with
    --tiny); tools/tilt_bench.py times the same pass on the CPU."""
    from tilt_bench import CASEOPS_VAL_TOKENS, synthetic_stream, time_pass

    n = 1_000_000 if tiny else CASEOPS_VAL_TOKENS
    h, seconds = time_pass(synthetic_stream(n, cfg.vocab_size), cfg, rt.device)
    out["ngram_tilt_pass_s"] = round(seconds, 2)
    out["ngram_tilt_pass_targets"] = n - 1
    out["ngram_tilt_fired_share"] = round(h.fired / (n - 1), 4)


def bench_eval(model: tg.GPT, cfg: tg.Config, rt: tg.Runtime, val: tg.ValidationData, world: int,
               out: dict) -> None:
    """The evaluation on the val slice, stage by stage against the plan's projection, on the graphs the trainer
    prepares before training (prepare_evaluation: compile and cost probes on random tokens, outside the eval timer);
    then the projection for the published split on `world` GPUs (published_docs: this slice's document lengths
    scaled to 50,000 documents and 47,853,343 targets), and the tilt's share of it."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g0, lines = tg.compiled_graph_count(), []
    ev = tg.prepare_evaluation(model, cfg, rt, val, lines.append)
    out["eval_warmup_s"] = round(ev.warmup_s, 1)
    out["eval_warmup_graphs"] = tg.compiled_graph_count() - g0
    out |= {f"eval_cost_{k}": float(f"{v:.3g}") for k, v in dataclasses.asdict(ev.costs).items()}
    docs, n = tg.document_spans(val.tokens, val.bos_id), val.tokens.numel() - 1
    plan = tg.EvalPlan(cfg.sliding_eval, cfg.ttt_enabled, cfg.phased_ttt_num_phases, cfg.phased_ttt_prefix_docs)
    projected = tg.project_seconds(plan, docs, n, cfg, 1, ev.costs)
    for key in ("roundtrip", "sliding", "ttt"):
        tg.load_weights(model, weights)
        s = {}
        secs = tg.timed_call(lambda: s.setdefault("r", tg.run_stage(key, ev.dynamic if key == "ttt" else ev.static,
                                                                      model, val, cfg, rt, lambda m: None)), rt.device)
        out[f"eval_slice_{key}_measured_s"] = round(secs, 2)
        out[f"eval_slice_{key}_projected_s"] = round(projected[key], 2)
        out[f"eval_slice_{key}_bpb"] = round(s["r"].bpb, 4)
    out["eval_graphs_after_warmup"] = tg.compiled_graph_count() - g0 - out["eval_warmup_graphs"]
    full_docs = tg.published_docs(docs)
    full = tg.project_seconds(plan, full_docs, tg.PUBLISHED_SPLIT[1], cfg, world, ev.costs)
    out |= {f"eval_projected_{k}_s_on_{world}_gpus": round(v, 1) for k, v in full.items()}
    out[f"eval_projected_ngram_tilt_s_on_{world}_gpus"] = round(ev.costs.tilt_token_s * tg.PUBLISHED_SPLIT[1], 1)
    out["eval_plan_within_budget"] = tg.fit_plan(
        cfg, full_docs, tg.PUBLISHED_SPLIT[1], world, ev.costs,
        cfg.eval_budget_seconds - ev.costs.tilt_token_s * tg.PUBLISHED_SPLIT[1], lambda s: None).describe()


def bench_wrapper(cfg_env: dict, data: Path, work: Path, out: dict) -> None:
    """The counted wrapper a record ships, run as a subprocess for a few steps on the same shards."""
    wrapper = work / "ship" / "train_gpt.py"
    wrapper.parent.mkdir()
    wrapper.write_bytes(tg.shipped_code())
    env = {k: v for k, v in os.environ.items() if k not in tg.ENV_NAMES} | cfg_env | {
        "DATA_PATH": str(data), "TOKENIZER_PATH": str(data / "tokenizer.model"), "ITERATIONS": "5",
        "MAX_WALLCLOCK_SECONDS": "0", "GPTQ_RESERVE_SECONDS": "0", "TTT_ENABLED": "0", "SLIDING_EVAL": "0",
        "VAL_TOKEN_LIMIT": "20000", "OUTPUT_DIR": str(wrapper.parent), "ALLOW_UNKNOWN_ENV": "1",
        "GPTQ_CAL_SAMPLES": "8", "TRAIN_LOG_EVERY": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(wrapper)], env=env, cwd=wrapper.parent, capture_output=True, text=True,
                       timeout=900)
    out["wrapper_s"] = round(time.perf_counter() - t0, 1)
    out["wrapper_ok"] = r.returncode == 0 and "final_int6_roundtrip_exact" in r.stdout
    if not out["wrapper_ok"]:
        out["wrapper_error"] = (r.stdout + r.stderr)[-1500:]
    out["wrapper_losses"] = [l.split("train_loss:")[1].split()[0] for l in r.stdout.splitlines() if "train_loss:" in l]


def bench_quant(model: tg.GPT, cfg: tg.Config, rt: tg.Runtime, out: dict) -> None:
    """Calibration, loop-aware GPTQ and packing under the cap, on Gaussian rows with each matrix's init std: for a
    given row std the Gaussian has the largest entropy, so this artifact bounds a trained one's from above."""
    with torch.no_grad():  # the zero-initialised output projections would otherwise pack to nothing
        for name, p in model.named_parameters():
            if p.ndim == 2 and tg.param_route(name, p) == "matrix":
                p.normal_(0, 1 / math.sqrt(p.size(1)))
    seq = cfg.gptq_cal_seq_len or cfg.train_seq_len
    g = torch.Generator().manual_seed(1)
    batches = [tg.to_micro(*(lambda x: (x[:, :-1], x[:, 1:]))(tg.random_rows(cfg, 8, seq, g)), cfg, seq, rt.device)
               for _ in range(max(1, cfg.gptq_cal_samples // 8))]
    state: dict = {}
    lines: list[str] = []
    code = tg.shipped_code()
    out["calibrate_s"] = round(tg.timed_call(lambda: state.setdefault(
        "cal", tg.calibrate(model, cfg, rt, batches, lines.append)), rt.device), 1)
    out["quantize_and_pack_s"] = round(tg.timed_call(lambda: state.setdefault(
        "blob", tg.pack_within_cap(model, state["cal"], cfg, rt, len(code), lines.append)), rt.device), 1)
    packed = state["blob"]
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


def summary_table(out: dict) -> str:
    rows = ["| figure | value |", "|---|---|"]
    for k, v in out.items():
        if k in ("notes", "real_train_loss_curve", "wrapper_error"):
            continue
        rows.append(f"| {k} | {v} |")
    curve = out.get("real_train_loss_curve") or []
    if curve:
        rows.append("| real_train_loss_curve | " + " ".join(f"{s}:{l:.3f}" for s, l in curve[::max(1, len(curve) // 12)]) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on generated text (CPU smoke run of every path)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per training shape")
    ap.add_argument("--world", type=int, default=8, help="GPUs the evaluation projection is for")
    ap.add_argument("--text", type=Path, help="JSONL of documents to train and evaluate on (e.g. web_sample.jsonl)")
    ap.add_argument("--tokenizer", type=Path, help="the CaseOps SentencePiece model for --text")
    ap.add_argument("--train-seconds", type=float, default=90.0, help="wallclock of the real training section")
    ap.add_argument("--quant-only", action="store_true",
                    help="only calibration, GPTQ and packing (a full-size size check that a CPU can run)")
    ap.add_argument("--out", type=Path, default=Path("bench.json"))
    a = ap.parse_args(argv)
    cfg_env = (TINY if a.tiny else {}) | {"ALLOW_UNKNOWN_ENV": "1"}
    cfg, _ = tg.load_config(dict(os.environ) | cfg_env)
    rt = tg.setup_runtime(cfg)
    out: dict = {"device": rt.hardware, "torch": torch.__version__, "attention_backend": rt.attn.name,
                 "fused_ce": rt.kernels.ce, "compile": f"{int(rt.compile)} {rt.compile_backend}", "notes": list(rt.notes)}
    torch.manual_seed(cfg.seed)
    model, compiled = tg.build_model(cfg, rt)
    out["model_params"] = sum(p.numel() for p in model.parameters())
    def section(name: str, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        out[f"section_s_{name}"] = round(time.perf_counter() - t0, 1)
        return result

    if not a.quant_only:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            data = section("tokenize", tokenized, a.text, a.tokenizer, cfg, work, a.tiny)
            tokens = np.concatenate([tg.load_shard(p) for p in tg.shard_paths(str(data), "train")])
            section("shapes", bench_shapes, model, compiled, cfg, rt, tokens, a.steps, out)
            bench_fused_ce(cfg, rt, out)
            val = section("train", bench_training, model, compiled, cfg, rt, data, 5.0 if a.tiny else a.train_seconds, out)
            section("eval", bench_eval, model, cfg, rt, val, a.world, out)
            bench_guards(model, rt, out)
            section("tilt", bench_tilt, cfg, rt, a.tiny, out)
            section("fla", bench_fla, rt, a.tiny, out)
            section("wrapper", bench_wrapper, cfg_env, data, work, out)
    section("quant", bench_quant, model, cfg, rt, out)
    print(summary_table(out))
    a.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
