"""Flat + crawler GPT for the Parameter Golf challenge (10 min on 8xH100, 16,000,000-byte artifact).

Pipeline, in file order: config -> runtime -> data -> model -> optimizers -> training ->
calibration/quantization -> packing -> evaluation -> main.

Launch: `torchrun --standalone --nproc_per_node=8 train_gpt.py` (defaults are the reference run: the crawler
form of the late-April frontier, #2014/#1953 on #1855); on CPU `python train_gpt.py` or
`torchrun --nproc_per_node=2 train_gpt.py` (gloo). All configuration comes from environment variables named
after the `Config` fields (upper case).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import difflib
import glob
import hashlib
import io
import json
import math
import os
import platform
import queue
import resource
import sys
import threading
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch._dynamo
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# =============================================================================================
# Config
# =============================================================================================


class ConfigError(ValueError):
    """A configuration problem found before any work was done; the message names the fix."""


def _parse(name: str, raw: str, typ) -> object:
    raw = raw.strip()
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if typ is int:
            return int(float(raw)) if "e" in raw.lower() else int(raw)
        if typ is float:
            if not math.isfinite(float(raw)):  # nan passes every range check; inf overflows an int
                raise ValueError
            return float(raw)
        return raw
    except (ValueError, OverflowError):
        kind = {bool: "0 or 1", int: "an integer", float: "a finite number"}[typ]
        raise ConfigError(f"{name}={raw!r} is not {kind}") from None


def _f(default, help: str, spec: str, model: bool = False, evaluation: bool = False):
    """A config field: its default, its help line (README table) and its valid values: "lo..hi" (either side may
    be empty), "a|b|c" for a choice, or "" for anything of the type."""
    lo = hi = None
    choices: tuple = ()
    if "|" in spec:
        choices = tuple(spec.split("|"))
    elif ".." in spec:
        a, b = spec.split("..")
        lo, hi = (float(a) if a else None), (float(b) if b else None)
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "choices": choices, "model": model,
                                            "eval": evaluation})


def _m(default, help: str, spec: str):
    """A model field: it shapes the weights or the forward pass, so a checkpoint or an artifact carries it."""
    return _f(default, help, spec, model=True)


def _e(default, help: str, spec: str):
    """An evaluation field: it shapes what evaluation scores (EVAL_ONLY takes it from the artifact by default)."""
    return _f(default, help, spec, evaluation=True)


def env_defaults(cls):
    """Defaults are written as they would be typed in the environment ("1337", "0.85", "1"); parse them with the
    field's type before @dataclass reads them."""
    types = {"int": int, "float": float, "bool": bool, "str": str}
    for name, typ in cls.__annotations__.items():
        f = cls.__dict__[name]
        f.default = _parse(name.upper(), f.default, types[typ])
    return cls


@dataclass(frozen=True)
@env_defaults
class Config:
    """Every knob of the run. Env var name = field name in upper case. Defaults = the reference run: the
    crawler form of #2014/#1953 (3 flat + 3 shared blocks x3 loops from 35% + 5 flat, SP8192 CaseOps).
    The README's "Defaults and where they come from" table gives the source of each non-trivial default."""

    # --- run and data ---
    seed: int = _e("1337", "random seed (weights, data order)", "0..")
    run_id: str = _f("", "name of this run's log and summary; default: seed<SEED> (+_repack with SKIP_TRAIN, +_eval "
                     "with EVAL_ONLY)", "")
    output_dir: str = _f(".", "where final_model.pt, the artifact, logs/ and the summary go", "")
    data_dir: str = _f("./data", "root holding datasets/ and tokenizers/", "")
    data_path: str = _f("", "shard folder; default: DATA_DIR/datasets/<variant>", "")
    tokenizer_path: str = _f("", "SentencePiece model; default: DATA_DIR/tokenizers/<variant>.model", "")
    vocab_size: int = _m("8192", "must equal the tokenizer's piece count", "2..65536")
    caseops_enabled: bool = _e("1", "CaseOps data (#1736): byte counts come from the val byte sidecar", "")
    bos_id: int = _m("1", "document separator id; checked against the tokenizer", "0..")
    val_token_limit: int = _e("0", "score only the first N val tokens (0 = all; smoke tests only)", "0..")
    allow_unknown_env: bool = _f("0", "continue despite env vars that look like ours but are not read", "")
    val_overlap_docs: int = _f("0", "training documents identical to validation documents accepted as natural duplicates "
                               "(their hashes are logged); any overlap beyond this is refused", "0..")
    # --- schedule and batch ---
    iterations: int = _f("20000", "maximum optimizer steps", "1..")
    max_wallclock_seconds: float = _f("600.0", "training wallclock cap incl. calibration (0 = none)", "0..")
    gptq_reserve_seconds: float = _f("2.0", "seconds of the cap kept beyond GPTQ calibration's time, which is projected "
                                     "before training from a timed Hessian pass (the projection's margin)", "0..")
    train_batch_tokens: int = _f("786_432", "global tokens per optimizer step", "1..")
    train_seq_len: int = _f("2048", "training row length = the longest context of TRAIN_SEQ_SCHEDULE (#2135)", "8..")
    train_seq_schedule: str = _f("", "context growth LEN@UNTIL_FRACTION,... (#2014: 1024@0.1,2048@0.7,3072@1.0); "
                                 "empty = TRAIN_SEQ_LEN throughout (#2135)", "")
    seq_change_warmup_steps: int = _f("32", "LR re-warmup steps after each context change (#2014)", "0..")
    grad_accum_steps: int = _f("0", "micro-batches per rank per step (0 = 8 // world size)", "0..")
    warmup_steps: int = _f("20", "compile priming steps whose updates are discarded (CUDA only)", "0..")
    warmdown_iters: int = _f("0", "warmdown length in steps, converted to time under a cap (seeds)", "0..")
    warmdown_frac: float = _f("0.85", "warmdown as a fraction of the budget (#1855)", "0..1")
    min_lr: float = _f("0.1", "LR floor as a fraction of each group's peak LR (#1787)", "0..1")
    train_log_every: int = _f("500", "log a train line every N steps (and the first 10)", "1..")
    val_loss_every: int = _f("0", "validate every N steps (0 = only at the end)", "0..")
    val_batch_tokens: int = _f("524_288", "tokens per validation forward across all ranks", "1..")
    # --- model ---
    use_crawler: bool = _m("1", "flat + crawler model; 0 gives a plain GPT of NUM_LAYERS blocks", "")
    num_layers: int = _m("11", "blocks of the plain GPT (USE_CRAWLER=0)", "1..")
    num_flat_layers: int = _m("8", "unique blocks around the crawler", "0..")
    flat_encoder_layers: int = _m("3", "flat blocks before the crawler (-1 = NUM_FLAT_LAYERS // 2)", "-1..")
    num_crawler_layers: int = _m("3", "shared blocks in the crawler (#1736's looped layers 3-5)", "1..")
    crawler_loops: int = _m("3", "passes through the shared blocks (#1736: 3)", "1..")
    crawler_start_frac: float = _f("0.35", "training fraction before which the crawler runs once (#1736)", "0..1")
    crawler_mlp_mult: float = _m("4.0", "crawler MLP hidden = mult * MODEL_DIM", "0.25..")
    crawler_mlp_leaky_slope: float = _m("0.5", "crawler LeakyReLU slope (0 = ReLU^2)", "0..1")
    crawler_loop_rope_scales: str = _m("1,1,1", "per-loop RoPE frequency divisors (Nightcrawler: 9,1,1)", "")
    inst_dim: int = _m("0", "flow-instruction bottleneck width (0 = off; crawler seeds: 32)", "0..")
    unet_skips: str = _m("virtual", "U-Net skips over block applications (#1736) or flat blocks", "virtual|flat")
    skip_gates: bool = _m("1", "sigmoid gate on each U-Net skip (#1736)", "")
    model_dim: int = _m("512", "residual width", "16..")
    num_heads: int = _m("8", "query heads", "1..")
    num_kv_heads: int = _m("4", "key/value heads (GQA)", "1..")
    mlp_mult: float = _m("4.0", "flat MLP hidden = mult * MODEL_DIM (#1736)", "0.25..")
    mlp_leaky_slope: float = _m("0.5", "flat LeakyReLU slope (0 = ReLU^2)", "0..1")
    rope_base: float = _m("10000.0", "RoPE base", "1..")
    rope_dims: int = _m("16", "rotated dims per head (partial RoPE)", "2..")
    qk_gain_init: float = _m("5.0", "initial per-head query gain (#1855, #2135; #1953/#2014 use 5.25)", "0..")
    xsa_last_n: int = _m("11", "exclusive self-attention on the last N distinct blocks", "0..")
    xsa_scope: str = _m("all", "blocks XSA_LAST_N counts: all distinct blocks (#1736) or the crawler's (seeds)",
                        "all|crawler")
    sparse_attn_gate_enabled: bool = _m("1", "per-head sigmoid output gate read from GATE_WINDOW channels (#1787)", "")
    gated_attn_enabled: bool = _m("0", "per-head sigmoid output gate read from all channels (#1736)", "")
    gate_window: int = _m("12", "channels the sparse attention gate and window SmearGate read (#1787)", "1..")
    sparse_attn_gate_scale: float = _m("0.5", "logit scale of the sparse attention gate (#1855)", "0..")
    gated_attn_init_std: float = _m("0.005", "init std of the dense attention gate (#1736)", "0..")
    parallel_residual_start: int = _m("8", "first block with two parallel lanes (#1736; -1 = off)", "-1..")
    resid_mix: bool = _m("1", "each block mixes the embedding stream x0 into its input (Ouroboros, #1736)", "")
    doc_masked_attn: bool = _m("1", "attention never crosses a BOS: varlen segments (#1530)", "")
    bigram_vocab_size: int = _m("0", "BigramHash buckets (0 = off; crawler seeds: 2048)", "0..")
    bigram_dim: int = _m("128", "BigramHash embedding width", "1..")
    smear_gate: str = _m("window", "BOS-masked SmearGate: window (#1855) or channel (seeds)", "window|channel|off")
    ve_dim: int = _m("0", "value-embedding width (0 = off; Ouroboros: 128)", "0..")
    ve_layers: str = _m("", "distinct blocks whose values add the value embedding, comma list", "")
    delta_net_heads: int = _m("0", "DeltaNet crawler memory heads (ClownCar_II; 0 = off)", "0..")
    asym_logit_rescale: bool = _m("0", "learnable +/- logit softcaps, trained by TTT only (#1923)", "")
    ln_scale: bool = _m("1", "scale block inputs by 1/sqrt(layer+1)", "")
    ln_scale_order: str = _m("block", "LN_SCALE's layer: the block's position (#1855), or the flat blocks first and "
                             "the crawler after them (the crawler seeds)", "block|flat_first")
    logit_softcap: float = _m("30.0", "tanh soft cap on logits", "1..")
    tied_embed_init_std: float = _m("0.005", "init std of the tied embedding", "0..")
    fused_ce: str = _f("auto", "softcapped cross-entropy as one fused op (#1787): auto = Triton on CUDA, torch "
                       "elsewhere; triton on any device (CPU: TRITON_INTERPRET=1); torch; 0 = unfused", "auto|triton|torch|0")
    # --- optimizers ---
    matrix_lr: float = _f("0.028", "Muon LR for 2-D block matrices (#2135; #1736: 0.026)", "0..")
    embed_lr: float = _f("0.03", "AdamW LR for embeddings, tied head included (#1736)", "0..")
    scalar_lr: float = _f("0.02", "AdamW LR for gains, scales, gates (#1736)", "0..")
    muon_momentum: float = _f("0.97", "Muon momentum after warmup (#1736)", "0..1")
    muon_momentum_warmup_start: float = _f("0.92", "Muon momentum at step 0", "0..1")
    muon_momentum_warmup_steps: int = _f("1500", "steps to reach MUON_MOMENTUM", "0..")
    muon_backend_steps: int = _f("5", "Newton-Schulz iterations (Polar-Express coefficients for the first 5)", "1..20")
    muon_ns: str = _f("polar", "Newton-Schulz: Polar Express (#1787) or quintic", "polar|quintic")
    muon_row_norm: bool = _f("1", "normalise each update row before Newton-Schulz (MuonEq-R, #1736)", "")
    muon_momentum_dtype: str = _f("bf16", "Muon's momentum buffer (#1855 bf16; the crawler seeds fp32)", "bf16|fp32")
    muon_wd: float = _f("0.095", "decoupled weight decay on Muon matrices (#1736)", "0..")
    embed_wd: float = _f("0.085", "decoupled weight decay on embeddings (#1736)", "0..")
    adam_wd: float = _f("0.02", "decoupled weight decay on scalars and gates (#1855)", "0..")
    beta1: float = _f("0.9", "AdamW beta1", "0..1")
    beta2: float = _f("0.99", "AdamW beta2 (#1855)", "0..1")
    adam_eps: float = _f("1e-08", "AdamW epsilon", "0..")
    grad_clip_norm: float = _f("0.3", "per-rank grad-norm clip, before averaging (#1855; 0 = off)", "0..")
    skip_ema: bool = _f("0", "turn off the EMA of the weights (on by default, #1736)", "")
    ema_decay: float = _f("0.9965", "EMA decay (#1736)", "0..1")
    swa_every: int = _f("0", "SWA instead of EMA: average every N steps once LR scale < 0.2 (0 = off)", "0..")
    # --- calibration, quantization, packing ---
    skip_gptq: bool = _f("0", "round-to-nearest instead of GPTQ", "")
    loop_aware_gptq: bool = _f("1", "re-collect crawler Hessians through the quantized flat layers (#1283)", "")
    gptq_cal_samples: int = _f("1536", "calibration sequences of training data, all ranks (#2135's 32 batches; "
                               "#1855: 768)", "1..")
    gptq_cal_seq_len: int = _f("2048", "calibration sequence length (0 = TRAIN_SEQ_LEN)", "0..16384")
    gptq_damp: float = _f("0.01", "GPTQ damping as a fraction of the mean Hessian diagonal (#1855)", "0..")
    gptq_damp_embed: float = _f("0.0", "embedding damping (0 = GPTQ_DAMP; #2051: 0.005)", "0..")
    gptq_damp_mlp: float = _f("0.0", "MLP damping (0 = GPTQ_DAMP; #2051: 0.02)", "0..")
    embed_bits: int = _f("7", "bits of the tied embedding, quantized by GPTQ (#1855)", "6..8")
    mlp_clip_sigmas: float = _f("11.5", "MLP per-row step = k std devs / qmax (#1855; 0 = search the clip)", "0..")
    attn_clip_sigmas: float = _f("13.0", "attention per-row step = k std devs / qmax (#1855; 0 = search)", "0..")
    embed_clip_sigmas: float = _f("14.0", "embedding per-row step = k std devs / qmax (#1855; 0 = search)", "0..")
    gated_attn_quant_gate: bool = _f("1", "store attention gate rows as int8 instead of fp16 (#1736)", "")
    crawler_quant_int8: bool = _f("0", "crawler matrices as int8 per row instead of int6 GPTQ (ClownCar #990)", "")
    lqer_rank: int = _f("4", "LQER low-rank correction of the GPTQ error (#1797; 0 = off)", "0..")
    lqer_top_k: int = _f("3", "tensors with the largest GPTQ error that get LQER (#1797)", "0..")
    lqer_group: int = _f("32", "LQER's int4 right factor: one scale per this many entries of a row (#2135; #1797: 64)",
                         "1..")
    awq_groups: int = _f("1", "AWQ-lite: 64-column groups promoted to int8 by activation salience (#1908)", "0..")
    compressor: str = _f("pergroup", "per-group packing (#1855) or one stream", "pergroup|brotli|zstd|lzma")
    artifact_limit_bytes: int = _f("16_000_000", "cap on model + code bytes (decimal)", "1..")
    artifact_fit: bool = _f("1", "widen the int6 steps just enough that the estimated artifact fits the cap", "")
    skip_train: bool = _f("0", "skip training: calibrate, quantize, pack and evaluate INIT_MODEL_PATH", "")
    init_model_path: str = _f("", "float checkpoint for SKIP_TRAIN (default OUTPUT_DIR/final_model.pt)", "")
    eval_only: bool = _f("0", "evaluate the packed artifact ARTIFACT_PATH alone, as a reviewer does: no training, no "
                         "checkpoint; the model and the evaluation settings come from the artifact", "")
    artifact_path: str = _f("", "artifact for EVAL_ONLY (default OUTPUT_DIR/final_model.int6.ptz)", "")
    # --- evaluation and test-time training ---
    eval_seq_len: int = _e("2560", "evaluation window length (#2135; #2014: 3072)", "8..")
    eval_stride: int = _e("64", "sliding-window stride (tokens scored per window after the first)", "1..")
    sliding_eval: bool = _e("1", "run the sliding-window evaluation (dropped first when the budget is short)", "")
    eval_batch_tokens: int = _e("262_144", "tokens per evaluation forward on each rank", "1..")
    eval_budget_seconds: float = _e("600.0", "evaluation time budget; the plan is cut to fit before scoring", "1..")
    ttt_enabled: bool = _e("1", "phased score-first test-time training after the plain evaluations", "")
    ngram_tilt: bool = _e("1", "causal token n-gram tilt of the scored distribution (#2135, token-only as #1514)", "")
    ngram_tilt_order: int = _e("16", "n-gram order of the tilt: the hint for a target reads the 15 tokens before it",
                               "2..64")
    ngram_tilt_threshold: float = _e("0.8", "tilt when the context's top next token has this share of its count",
                                     "0..1")
    ngram_tilt_boost: float = _e("2.625", "logit boost (after the softcap) of the hinted token", "0..20")
    ttt_lora_rank: int = _e("80", "rank of the per-document LoRA (#1855)", "1..")
    ttt_lora_alpha: float = _e("144.0", "LoRA output scale alpha/rank (#1855)", "0..")
    ttt_lora_lr: float = _e("0.00008", "LoRA AdamW learning rate (#2135; #1736: 1e-4)", "0..")
    ttt_local_lr_mult: float = _e("1.0", "multiplier on TTT_LORA_LR (#1953: 0.75)", "0..")
    ttt_beta2: float = _e("0.99", "LoRA AdamW beta2, beta1 = 0 (#1855)", "0..1")
    ttt_weight_decay: float = _e("2.0", "decoupled weight decay on the LoRA (#2135; #1855: 0.5)", "0..")
    ttt_warm_start_a: bool = _e("1", "carry each LoRA slot's A to the next batch on the rank (#1855)", "")
    ttt_mask: str = _e("no_k", "LoRA adapters: all (Q,K,V,O,MLP,head), no_k (#2135) or no_qv (#1953)",
                       "all|no_k|no_qv")
    ttt_chunk_size: int = _e("48", "tokens scored per chunk before each LoRA step (#1855)", "1..")
    ttt_short_chunks: str = _e("", "MAXLEN:CHUNK for batches of short documents (#2014: 256:8,2000:24); empty = off",
                               "")
    ttt_batch_docs: int = _e("64", "documents adapted in parallel per batch (#2135; #2014: 24)", "1..")
    phased_ttt_prefix_docs: int = _e("2500", "scored documents whose tokens feed the global SGD phases (#1855)", "0..")
    phased_ttt_num_phases: int = _e("1", "global SGD phases over scored-document prefixes (#2014)", "0..")
    ttt_global_lr: float = _e("0.001", "peak SGD LR of the global phases, cosine to 0 (#1855)", "0..")
    ttt_global_chunk_tokens: int = _e("32768", "tokens per global SGD step (#1855)", "1..")
    # --- device ---
    attn_backend: str = _f("auto", "attention kernel: auto = FA3 if importable and traceable, else flex on CUDA, "
                           "SDPA on CPU", "auto|fa3|flex|sdpa")
    delta_backend: str = _f("auto", "DeltaNet kernel: auto = flash-linear-attention on CUDA if importable, else "
                            "torch", "auto|fla|torch")
    autocast: str = _f("auto", "precision of the forward: auto = bf16 autocast and a bf16 residual stream on CUDA, "
                       "fp32 elsewhere; bf16 runs the GPU's precision on any device", "auto|bf16|fp32")
    compile_enabled: str = _f("auto", "torch.compile the model: auto = on CUDA, 1 = on any device, 0 = never", "auto|1|0")
    compile_backend: str = _f("inductor", "torch.compile backend; aot_eager traces the same graphs without code "
                              "generation (CPU tests)", "inductor|aot_eager|eager")
    compile_fullgraph: bool = _f("1", "compile with fullgraph=True", "")
    dist_timeout_seconds: float = _f("300", "a collective waits this long for a rank before the run stops and names "
                                     "it (torch's default: 30 minutes)", "1..")

    # ---------------------------------------------------------------- derived properties
    @property
    def variant(self) -> str:
        if self.caseops_enabled:
            return f"fineweb10B_sp{self.vocab_size}_lossless_caps_caseops_v1_reserved"
        return f"fineweb10B_sp{self.vocab_size}"

    @property
    def n_encoder(self) -> int:
        if not self.use_crawler:
            return self.num_layers // 2
        return self.num_flat_layers // 2 if self.flat_encoder_layers < 0 else self.flat_encoder_layers

    @property
    def n_decoder(self) -> int:
        return (self.num_layers if not self.use_crawler else self.num_flat_layers) - self.n_encoder

    @property
    def n_crawler(self) -> int:
        return self.num_crawler_layers if self.use_crawler else 0

    @property
    def n_blocks(self) -> int:
        return self.n_encoder + self.n_crawler + self.n_decoder

    def xsa_at(self, idx: int) -> bool:
        """Whether distinct block `idx` uses XSA: the last XSA_LAST_N blocks, or, with XSA_SCOPE=crawler, the last
        XSA_LAST_N crawler blocks and no flat block (the crawler seeds' placement)."""
        if self.xsa_scope == "crawler":
            ci = idx - self.n_encoder
            return 0 <= ci < self.n_crawler and ci >= self.n_crawler - self.xsa_last_n
        return idx >= self.n_blocks - self.xsa_last_n

    @property
    def loop_rope_scales(self) -> tuple[int, ...]:
        return int_list(self.crawler_loop_rope_scales, "CRAWLER_LOOP_ROPE_SCALES")

    @property
    def ve_blocks(self) -> tuple[int, ...]:
        return int_list(self.ve_layers, "VE_LAYERS")

    @property
    def n_loops(self) -> int:
        """Passes through the crawler at full depth (0 without a crawler)."""
        return self.crawler_loops if self.use_crawler else 0

    @property
    def train_budget_ms(self) -> float:
        """Wallclock for the training loop: the cap minus the calibration reserve (0 = step budget)."""
        if not self.max_wallclock_seconds:
            return 0.0
        return (self.max_wallclock_seconds - self.gptq_reserve_seconds) * 1000

    @property
    def seq_stages(self) -> list[tuple[int, float]]:
        """(context length, until training fraction) stages; the last one runs to the end."""
        if not self.train_seq_schedule.strip():
            return [(self.train_seq_len, 1.0)]
        return [(int(a), float(b)) for a, b in (s.split("@") for s in self.train_seq_schedule.split(",") if s.strip())]

    @property
    def short_chunks(self) -> list[tuple[int, int]]:
        """(max document length, chunk size) for TTT batches of short documents, shortest first."""
        return sorted((int(a), int(b)) for a, b in (s.split(":") for s in self.ttt_short_chunks.split(",") if s.strip()))


ENV_NAMES = {f.name.upper(): f for f in dataclasses.fields(Config)}
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["model"])
EVAL_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["eval"])
# Names exported by the seeds' run scripts that this trainer deliberately does not read.
RETIRED_ENV = {
    "COMPLEMENT_ALPHA", "MTP_NUM_HEADS", "LATE_QAT_THRESHOLD", "NGRAM_EVAL_ORDER", "TORCHDYNAMO_OPTIMIZE_DDP",
    "CRAWLER_MLP_CHOKE_DIM", "CRAWLER_MLP_CHOKE_SHAPE", "CRAWLER_MLP_CHOKE_GROUPS", "CRAWLER_LOOP_SMEAR",
    "CRAWLER_TAP_DIM", "CRAWLER_TAP_LOOP_SPECIFIC", "CRAWLER_TAP_LAYERS", "ANCHOR_DIM", "FLAT_WEIGHT_SHARE",
    "MLP_ACT", "VE_ENABLED", "QAT_ENABLED", "DDP_FIND_UNUSED_PARAMETERS", "SWA_ENABLED", "TIE_EMBEDDINGS",
    "HEAD_LR", "TIED_EMBED_LR", "PHASED_TTT_ENABLED", "GPTQ_CALIBRATION_BATCHES", "LQER_ENABLED",
    "LQER_ASYM_ENABLED", "LQER_FACTOR_BITS", "LQER_ASYM_GROUP", "FUSED_CE_ENABLED", "SMEAR_GATE_ENABLED",
    "GLOBAL_TTT_MOMENTUM", "NUM_LOOPS", "LOOP_START", "LOOP_END", "ENABLE_LOOPING_AT",
    "PARALLEL_START_LAYER", "TTT_EVAL_SEQ_LEN", "TRAIN_SEQ_SCHEDULE_MODE", "EVAL_INCLUDE_TAIL",
    "TTT_SHORT_SCORE_FIRST_ENABLED", "TTT_SHORT_SCORE_FIRST_STEPS", "ASYM_LOGIT_RESCALE_ENABLED",
}
# Variables owned by run.sh, the launcher, Python or libraries; never ours.
FOREIGN_PREFIXES = ("TORCH", "NCCL", "CUDA", "OMP_", "PYTHON", "MASTER_", "GROUP_", "ROLE_", "LOCAL_",
                    "TRITON", "HF_", "PYTEST", "NPROC", "RANK", "WORLD_SIZE", "LC_", "XDG_", "DEVICE", "RECORD_DIR",
                    "RUN_DIR", "MIN_FREE_GB", "MATCHED_FINEWEB")
OUR_PREFIXES = {n.split("_")[0] for n in ENV_NAMES} - {"MAX", "MIN", "USE", "NUM", "RUN", "DATA", "OUTPUT"}
SEED_RENAMES = {  # names the frontier seeds use for what this trainer calls otherwise
    "TIED_EMBED_LR": "EMBED_LR", "GPTQ_CALIBRATION_BATCHES": "GPTQ_CAL_SAMPLES", "NUM_LOOPS": "CRAWLER_LOOPS",
    "ENABLE_LOOPING_AT": "CRAWLER_START_FRAC", "PARALLEL_START_LAYER": "PARALLEL_RESIDUAL_START",
    "SMEAR_GATE_ENABLED": "SMEAR_GATE=window", "TTT_EVAL_SEQ_LEN": "EVAL_SEQ_LEN", "FUSED_CE_ENABLED": "FUSED_CE",
    "TTT_SHORT_SCORE_FIRST_STEPS": "TTT_SHORT_CHUNKS", "LQER_ENABLED": "LQER_RANK",
    "ASYM_LOGIT_RESCALE_ENABLED": "ASYM_LOGIT_RESCALE",
}


def int_list(raw: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a comma list of integers") from None


def unknown_env_report(environ: typing.Mapping[str, str]) -> list[str]:
    """Env vars that look like ours but are not read: typos, case variants, retired seed names, seed spellings of
    ours."""
    out = []
    for name in sorted(environ):
        if name in ENV_NAMES or name.upper().startswith(FOREIGN_PREFIXES):
            continue
        close = difflib.get_close_matches(name.upper(), list(ENV_NAMES), n=1, cutoff=0.8)
        if name != name.upper() and close:  # matrix_lr: names are case-sensitive, and ours are upper case
            out.append(f"{name} is not read: variable names are upper case; did you mean {close[0]}?")
        elif name in SEED_RENAMES:
            out.append(f"{name} is a seed's name; here it is {SEED_RENAMES[name]}")
        elif name in RETIRED_ENV:
            out.append(f"{name} is a seed option this trainer does not have; unset it")
        elif close:
            out.append(f"{name} is not read; did you mean {close[0]}?")
        elif name.split("_")[0] in OUR_PREFIXES:
            guess = difflib.get_close_matches(name, list(ENV_NAMES), n=1, cutoff=0.0)
            out.append(f"{name} is not read (closest: {guess[0]}); see README configuration reference")
    return out


def load_config(environ: typing.Mapping[str, str] | None = None) -> tuple[Config, list[str]]:
    """Build and validate the config. Returns (config, warnings); raises ConfigError."""
    cfg, warnings, _ = load_config_explicit(environ)
    return cfg, warnings


def default_run_id(cfg: Config) -> str:
    return f"seed{cfg.seed}" + ("_repack" if cfg.skip_train else "_eval" if cfg.eval_only else "")


def config_from_dict(d: dict, source: str = "the saved config") -> Config:
    """A Config saved as a dict (checkpoint, artifact header). A field this version does not know, or a model field
    it lacks, means another version of this script wrote it: its weights would load into a different model."""
    known = {f.name for f in dataclasses.fields(Config)}
    unknown, missing = sorted(set(d) - known), sorted(set(MODEL_FIELDS) - set(d))
    if unknown or missing:
        raise ConfigError(f"{source} was written by another version of train_gpt.py ("
                          + "; ".join(([f"fields this version does not know: {', '.join(unknown)}"] if unknown else [])
                                      + ([f"model fields it lacks: {', '.join(missing)}"] if missing else []))
                          + "): evaluate or re-pack it with the train_gpt.py that wrote it (a run keeps its counted copy "
                          "as train_gpt.counted.py)")
    return Config(**d)


def load_config_explicit(environ: typing.Mapping[str, str] | None = None) -> tuple[Config, list[str], set[str]]:
    """load_config, plus the names of the variables the environment set explicitly."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(Config)
    values, explicit = {}, set()
    for env, f in ENV_NAMES.items():
        if env in environ:
            values[f.name] = _parse(env, environ[env], hints[f.name])
            explicit.add(env)
    cfg = Config(**values)
    unknown = unknown_env_report(environ)
    if unknown and not cfg.allow_unknown_env:
        raise ConfigError("unknown environment variables (set ALLOW_UNKNOWN_ENV=1 to run anyway):\n  "
                          + "\n  ".join(unknown))
    cfg = fill_defaults(cfg, explicit)
    validate_config(cfg, explicit)
    return cfg, unknown, explicit


def fill_defaults(cfg: Config, explicit: set[str]) -> Config:
    """The defaults that follow other fields, unless set: RUN_ID (SEED and the kind of run), DATA_PATH and
    TOKENIZER_PATH (the data variant: VOCAB_SIZE, CASEOPS_ENABLED). Filled again once a re-pack or EVAL_ONLY has
    taken fields from its checkpoint or artifact."""
    tok = (f"fineweb_{cfg.vocab_size}_bpe_lossless_caps_caseops_v1_reserved.model" if cfg.caseops_enabled
           else f"fineweb_{cfg.vocab_size}_bpe.model")
    derived = {"run_id": default_run_id(cfg), "data_path": os.path.join(cfg.data_dir, "datasets", cfg.variant),
               "tokenizer_path": os.path.join(cfg.data_dir, "tokenizers", tok)}
    return dataclasses.replace(cfg, **{k: v for k, v in derived.items()
                                       if k.upper() not in explicit or not getattr(cfg, k)})


def field_errors(cfg: Config) -> list[str]:
    errs = []
    for f in dataclasses.fields(cfg):
        v, m, env = getattr(cfg, f.name), f.metadata, f.name.upper()
        if m.get("lo") is not None and v < m["lo"]:
            errs.append(f"{env}={v} is below its minimum {m['lo']}")
        if m.get("hi") is not None and v > m["hi"]:
            errs.append(f"{env}={v} is above its maximum {m['hi']}")
        if m.get("choices") and v not in m["choices"]:
            errs.append(f"{env}={v!r} is not one of {', '.join(m['choices'])}")
    return errs


def shape_errors(cfg: Config) -> list[str]:
    errs, hd = [], cfg.model_dim // cfg.num_heads
    if cfg.model_dim % cfg.num_heads:
        errs.append(f"MODEL_DIM={cfg.model_dim} is not divisible by NUM_HEADS={cfg.num_heads}; "
                    "pick NUM_HEADS dividing MODEL_DIM")
    elif hd % 2:
        errs.append(f"head dim MODEL_DIM/NUM_HEADS={hd} must be even for RoPE")
    elif cfg.rope_dims > hd or cfg.rope_dims % 2:
        errs.append(f"ROPE_DIMS={cfg.rope_dims} must be even and at most the head dim {hd}")
    if cfg.num_heads % cfg.num_kv_heads:
        errs.append(f"NUM_HEADS={cfg.num_heads} is not divisible by NUM_KV_HEADS={cfg.num_kv_heads}")
    if cfg.sparse_attn_gate_enabled and cfg.gated_attn_enabled:
        errs.append("SPARSE_ATTN_GATE_ENABLED and GATED_ATTN_ENABLED are both on; choose one attention gate")
    if cfg.gate_window > cfg.model_dim:
        errs.append(f"GATE_WINDOW={cfg.gate_window} exceeds MODEL_DIM={cfg.model_dim}")
    if cfg.delta_net_heads and cfg.model_dim % cfg.delta_net_heads:
        errs.append(f"DELTA_NET_HEADS={cfg.delta_net_heads} does not divide MODEL_DIM={cfg.model_dim}")
    if cfg.bigram_vocab_size == 1:
        errs.append("BIGRAM_VOCAB_SIZE must be 0 (off) or at least 2")
    if any(not 0 <= i < cfg.n_blocks for i in cfg.ve_blocks):
        errs.append(f"VE_LAYERS={cfg.ve_layers} names blocks outside 0..{cfg.n_blocks - 1}")
    if cfg.ve_layers and not cfg.ve_dim:
        errs.append("VE_LAYERS is set but VE_DIM=0; set VE_DIM")
    if 0 <= cfg.parallel_residual_start < cfg.n_encoder + cfg.n_crawler:
        errs.append(f"PARALLEL_RESIDUAL_START={cfg.parallel_residual_start} must name a flat decoder block "
                    f"(>= {cfg.n_encoder + cfg.n_crawler}) or be -1")
    return errs


def crawler_errors(cfg: Config) -> list[str]:
    errs = []
    if cfg.use_crawler:
        if len(cfg.loop_rope_scales) < cfg.crawler_loops or min(cfg.loop_rope_scales, default=1) < 1:
            errs.append(f"CRAWLER_LOOP_ROPE_SCALES={cfg.crawler_loop_rope_scales} needs at "
                        f"least CRAWLER_LOOPS={cfg.crawler_loops} positive entries")
        if cfg.n_encoder > cfg.num_flat_layers:
            errs.append(f"FLAT_ENCODER_LAYERS={cfg.flat_encoder_layers} exceeds NUM_FLAT_LAYERS={cfg.num_flat_layers}")
    elif cfg.delta_net_heads or cfg.inst_dim:
        errs.append("DELTA_NET_HEADS and INST_DIM belong to the crawler; set USE_CRAWLER=1 or unset them")
    return errs


def schedule_errors(cfg: Config, explicit: set[str]) -> list[str]:
    errs = []
    try:
        stages, chunks = cfg.seq_stages, cfg.short_chunks
    except ValueError:
        return [f"TRAIN_SEQ_SCHEDULE={cfg.train_seq_schedule!r} must read LEN@FRACTION,... and TTT_SHORT_CHUNKS="
                f"{cfg.ttt_short_chunks!r} MAXLEN:CHUNK,..."]
    if max(s for s, _ in stages) != cfg.train_seq_len or stages[-1][1] < 1.0:
        errs.append(f"TRAIN_SEQ_SCHEDULE={cfg.train_seq_schedule} must end with TRAIN_SEQ_LEN={cfg.train_seq_len}@1.0")
    if len(stages) > 1 and not cfg.doc_masked_attn:
        errs.append("TRAIN_SEQ_SCHEDULE grows the attention span inside fixed rows; it needs DOC_MASKED_ATTN=1")
    if any(c < 1 for _, c in chunks):
        errs.append(f"TTT_SHORT_CHUNKS={cfg.ttt_short_chunks} chunk sizes must be positive")
    if cfg.train_batch_tokens % cfg.train_seq_len:
        errs.append(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} is not a multiple of TRAIN_SEQ_LEN={cfg.train_seq_len}")
    if "WARMDOWN_FRAC" in explicit and "WARMDOWN_ITERS" in explicit:
        errs.append("WARMDOWN_FRAC and WARMDOWN_ITERS are both set; keep one (FRAC is the budget fraction)")
    if cfg.max_wallclock_seconds and cfg.gptq_reserve_seconds >= cfg.max_wallclock_seconds:
        errs.append(f"GPTQ_RESERVE_SECONDS={cfg.gptq_reserve_seconds} leaves no training time under "
                    f"MAX_WALLCLOCK_SECONDS={cfg.max_wallclock_seconds}")
    if cfg.eval_stride > cfg.eval_seq_len:
        errs.append(f"EVAL_STRIDE={cfg.eval_stride} exceeds EVAL_SEQ_LEN={cfg.eval_seq_len}; tokens would be skipped")
    return errs


def run_errors(cfg: Config) -> list[str]:
    """Variables that only act in another kind of run would be silently ignored in this one."""
    errs = []
    if cfg.skip_train and cfg.eval_only:
        errs.append("SKIP_TRAIN and EVAL_ONLY are both set: SKIP_TRAIN re-packs a checkpoint, EVAL_ONLY scores an "
                    "artifact; choose one")
    if cfg.init_model_path and not cfg.skip_train:
        errs.append(f"INIT_MODEL_PATH={cfg.init_model_path} is read only with SKIP_TRAIN=1 (a re-pack of that checkpoint); "
                    "set SKIP_TRAIN=1 or unset INIT_MODEL_PATH")
    if cfg.artifact_path and not cfg.eval_only:
        errs.append(f"ARTIFACT_PATH={cfg.artifact_path} is read only with EVAL_ONLY=1; set EVAL_ONLY=1 or unset it")
    return errs


def validate_config(cfg: Config, explicit: set[str] = frozenset()) -> None:
    errs = field_errors(cfg)
    if not errs:  # the checks below divide by fields that a range error may have left at zero (NUM_HEADS=0)
        errs = shape_errors(cfg) + crawler_errors(cfg) + schedule_errors(cfg, explicit) + run_errors(cfg)
    if errs:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errs))


def validate_world(cfg: Config, world_size: int) -> int:
    """Checks that depend on the number of ranks; returns grad accumulation steps."""
    accum = cfg.grad_accum_steps or max(1, 8 // world_size)
    per_step = world_size * accum * cfg.train_seq_len
    if cfg.train_batch_tokens % per_step:
        raise ConfigError(
            f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} is not divisible by world_size({world_size}) x "
            f"GRAD_ACCUM_STEPS({accum}) x TRAIN_SEQ_LEN({cfg.train_seq_len}) = {per_step}; "
            f"use a multiple of {per_step}")
    return accum


def config_reference_markdown() -> str:
    """The README's configuration table, generated from the dataclass."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Config):
        d = int(f.default) if isinstance(f.default, bool) else f.default
        rows.append(f"| `{f.name.upper()}` | `{d}` | {f.metadata['help']} |")
    return "\n".join(rows)


# =============================================================================================
# Runtime: distributed, device, attention backend, logging (the one place these are decided)
# =============================================================================================


class Segments(typing.NamedTuple):
    """Document-masked attention for a batch of rows (#1530): positions attend only within their segment (a
    document, cut at BOS, every `max_len` tokens and at a row start). `ids` [B, T] (segment index within the
    row) drives the SDPA and flex masks and the DeltaNet resets; `cu` (int32 [segments + 1], offsets into the
    flattened batch) drives FlashAttention 3's varlen kernel. Its length changes from batch to batch, so it is a
    dynamic dimension of the compiled graph: one graph serves every batch of a shape (padding it to buckets
    instead gives a new graph per bucket, and fullgraph's recompile limit is a hard error mid-run)."""
    ids: Tensor
    cu: Tensor
    max_len: int


def same_dtype(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under autocast RMSNorm/RoPE leave q and k in fp32 while v is bf16; every kernel wants one dtype."""
    dt = v.dtype
    return q.to(dt), k.to(dt), v


def repeat_kv(t: Tensor, heads: int) -> Tensor:
    """[B, Hkv, T, D] -> [B, heads, T, D] (GQA expanded), so SDPA can pick its flash kernel."""
    return t if t.size(1) == heads else t.repeat_interleave(heads // t.size(1), dim=1)


class AttentionBackend:
    """Causal attention on [B, T, H, D] tensors (k, v may have fewer heads: GQA), optionally document-masked.
    Chosen once by `choose_attention` and handed to the model. `prepare` turns a batch's Segments into this
    backend's mask once per forward; every block application reuses it."""
    name = "base"

    def prepare(self, seg: Segments | None, T: int) -> typing.Any:
        return seg

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: typing.Any) -> Tensor:
        raise NotImplementedError

    def masked_call_bytes(self, rows: int, T: int, heads: int, max_len: int = 0) -> float:
        """Memory one document-masked call holds beyond q, k, v and the output (the preflight's fit check)."""
        return 0.0


class SdpaAttention(AttentionBackend):
    """PyTorch SDPA. Unmasked calls run `is_causal` with the K/V heads expanded (the flash kernel on CUDA).
    Document-masked calls take a boolean mask, which selects the math kernel (fp32 scores materialised and kept
    for the backward). A segment is never longer than its max_len C, so the span is cut into blocks of C and each
    block attends only to itself and the block before it: [B * T/C, H, C, 2C] scores instead of [B, H, T, T]
    (exact; fine on a CPU, still too big for CUDA at full size: the preflight says so)."""
    name = "sdpa"

    def prepare(self, seg: Segments | None, T: int) -> tuple | None:
        if seg is None:
            return None
        B, C = seg.ids.size(0), min(seg.max_len, T)
        n = -(-T // C)
        ids = F.pad(seg.ids, (0, n * C - T), value=-1).view(B, n, C)
        if n == 1:
            keys = ids
        else:
            keys = torch.cat([torch.cat([torch.full_like(ids[:, :1], -2), ids[:, :-1]], dim=1), ids], dim=-1)
        kpos = torch.arange(keys.size(-1), device=ids.device) - (keys.size(-1) - C)
        causal = kpos[None, :] <= torch.arange(C, device=ids.device)[:, None]
        return ((ids[..., :, None] == keys[..., None, :]) & causal).view(B * n, 1, C, keys.size(-1)), C

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: tuple | None) -> Tensor:
        q, k, v = same_dtype(q, k, v)
        if mask is None:
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(qt, repeat_kv(kt, qt.size(1)), repeat_kv(vt, qt.size(1)), is_causal=True)
            return y.transpose(1, 2)
        m, C = mask
        B, T, H, D = q.shape
        n = -(-T // C)

        def blocks(t: Tensor) -> Tensor:  # [B, T, h, D] -> [B, n, C, h, D]
            return F.pad(t, (0, 0, 0, 0, 0, n * C - T)).view(B, n, C, t.size(2), D)

        qb, kb, vb = blocks(q), blocks(k), blocks(v)
        if n > 1:  # each block's keys: the block before it, then itself
            kb, vb = (torch.cat([torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1]], dim=1), t], dim=2) for t in (kb, vb))
        flat = lambda t: t.reshape(B * n, t.size(2), t.size(3), D).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(flat(qb), flat(kb), flat(vb), attn_mask=m, enable_gqa=H != k.size(2))
        return y.transpose(1, 2).reshape(B, n * C, H, D)[:, :T]

    def masked_call_bytes(self, rows: int, T: int, heads: int, max_len: int = 0) -> float:
        C = min(max_len or T, T)
        return rows * heads * T * 2 * C * 5.0


class FlexAttention(SdpaAttention):
    """Document-masked calls go to PyTorch's flex_attention (a block-sparse kernel that torch.compile generates:
    nothing of size T x T exists; no extra package). The block mask comes from the segment ids per 128-token
    block, without evaluating the mask over T x T: a block pair is empty, full (one segment, strictly below the
    diagonal) or partial. Unmasked calls go to SDPA's flash path. When the run compiles, the kernel itself is
    compiled on its own, so that eager callers (GPTQ calibration's Hessian passes, on the training clock) run the
    fused kernel too: eager flex_attention materialises every [B, H, T, T] score matrix. Inside a compiled model the
    compiled kernel is traced like the plain function."""
    name = "flex"
    BLOCK = 128

    def __init__(self, compiled: bool = False, backend: str = "inductor"):
        from torch.nn.attention.flex_attention import flex_attention

        self.kernel = torch.compile(flex_attention, dynamic=False, backend=backend) if compiled else flex_attention

    def prepare(self, seg: Segments | None, T: int) -> typing.Any:
        return None if seg is None else doc_block_mask(seg.ids, self.BLOCK)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: typing.Any) -> Tensor:
        if mask is None:
            return super().__call__(q, k, v, None)
        qt, kt, vt = (t.transpose(1, 2) for t in same_dtype(q, k, v))
        return self.kernel(qt, kt, vt, block_mask=mask, enable_gqa=qt.size(1) != kt.size(1)).transpose(1, 2)

    def masked_call_bytes(self, rows: int, T: int, heads: int, max_len: int = 0) -> float:
        n = -(-T // self.BLOCK)
        return rows * n * n * 16.0


def doc_block_mask(ids: Tensor, block: int):
    """flex_attention's BlockMask for causal attention within segments. Segment ids never decrease along a row, so
    for a kv block j at or below a q block i, some pair shares a segment iff the kv block's last id reaches the q
    block's first id, and every pair does iff the kv block's first id equals the q block's last (j < i)."""
    from torch.nn.attention.flex_attention import BlockMask

    B, T = ids.shape
    n = -(-T // block)
    padded = torch.cat([ids, ids[:, -1:].expand(B, n * block - T)], dim=1).view(B, n, block)
    lo, hi = padded[..., 0], padded[..., -1]
    qi, kj = torch.arange(n, device=ids.device)[:, None], torch.arange(n, device=ids.device)[None]
    some = (kj <= qi) & (hi[:, None, :] >= lo[:, :, None])
    full = (kj < qi) & (lo[:, None, :] == hi[:, :, None])
    partial = some & ~full

    def table(m: Tensor) -> tuple[Tensor, Tensor]:
        order = torch.argsort(m.to(torch.int32), dim=-1, descending=True, stable=True)
        return m.sum(-1).to(torch.int32)[:, None], order.to(torch.int32)[:, None]

    keyed = torch.cat([ids, torch.full_like(ids[:, :1], -1).expand(B, n * block - T)], dim=1)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (keyed[b, q_idx] == keyed[b, kv_idx])

    return BlockMask.from_kv_blocks(*table(partial), *table(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(T, T))


class FA3Attention(AttentionBackend):
    """FlashAttention 3 (Hopper): the dense kernel for unmasked calls, the varlen kernel over the flattened batch
    with Segments.cu for document-masked ones (#1530). Keyword arguments as in flash_attn_interface; builds that
    also return the LSE give a tuple."""
    name = "fa3"

    def __init__(self, dense: typing.Callable, varlen: typing.Callable):
        self.dense, self.varlen = dense, varlen

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, seg: Segments | None) -> Tensor:
        dt = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if seg is None:
            y = self.dense(q, k, v, causal=True)
        else:
            B, T = q.shape[:2]
            y = self.varlen(q.reshape(B * T, *q.shape[2:]), k.reshape(B * T, *k.shape[2:]),
                            v.reshape(B * T, *v.shape[2:]), cu_seqlens_q=seg.cu, cu_seqlens_k=seg.cu,
                            max_seqlen_q=seg.max_len, max_seqlen_k=seg.max_len, causal=True)
        y = y[0] if isinstance(y, tuple) else y
        return y.reshape(q.shape)


SDPA = SdpaAttention()


def load_fa3() -> tuple[typing.Callable, typing.Callable] | None:
    """FlashAttention 3's dense and varlen functions, or None when `flash_attn_interface` is not importable."""
    try:
        from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return flash_attn_func, flash_attn_varlen_func


def probe_traceable(backend: AttentionBackend, device: torch.device, doc_masked: bool) -> str | None:
    """None when `torch.compile(fullgraph=True)` traces the backend's forward and backward, as training compiles it
    (AOT autograd, backend aot_eager: the joint graph without code generation), else why not. Only FA3 builds that
    register torch custom ops, their backward included, trace; a build whose forward or backward breaks the graph
    is a hard error at warm-up step 1 (a forward-only probe passes a build whose backward op does not trace)."""
    q = torch.zeros(1, 128, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    seg = make_segments(torch.zeros(1, 128, dtype=torch.long), 0, 128, device) if doc_masked else None
    torch._dynamo.reset()
    try:
        out = torch.compile(lambda a: backend(a, a, a, backend.prepare(seg, 128)), fullgraph=True,
                            backend="aot_eager")(q)
        out.float().sum().backward()
    except Exception as e:  # noqa: BLE001 - whatever the failure, this backend cannot run compiled
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        torch._dynamo.reset()
    return None


def choose_attention(cfg: Config, device: torch.device, compiled: bool, notes: list[str]) -> AttentionBackend:
    """ATTN_BACKEND: fa3 takes FlashAttention 3 whenever `flash_attn_interface` imports (any device) and fails
    if it cannot; auto takes it on CUDA when it imports and, compiled, traces, else flex on CUDA and SDPA on a CPU,
    saying why in the log."""
    want = cfg.attn_backend
    fa3 = load_fa3() if want == "fa3" or (want == "auto" and device.type == "cuda") else None
    if want == "fa3" and fa3 is None:
        raise ConfigError("ATTN_BACKEND=fa3 but flash_attn_interface is not importable: install FlashAttention 3 "
                          "(see README, GPU section) or set ATTN_BACKEND=auto")
    if fa3 is not None:
        backend = FA3Attention(*fa3)
        why = probe_traceable(backend, device, cfg.doc_masked_attn) if compiled else None
        if why is None:
            return backend
        if want == "fa3":
            raise ConfigError(f"ATTN_BACKEND=fa3 but FlashAttention 3 does not trace under torch.compile(fullgraph="
                              f"True) ({why}): install a build that registers torch custom ops, or ATTN_BACKEND=auto")
        notes.append(f"WARNING: FlashAttention 3 is importable but does not trace under torch.compile(fullgraph=True) "
                     f"({why}); install a build with torch custom ops for full speed")
    if want == "flex" or (want == "auto" and device.type == "cuda"):
        return FlexAttention(compiled, cfg.compile_backend)
    return SDPA


def check_attention_fits(cfg: Config, rt: "Runtime", accum: int) -> None:
    """Refuse, before any work, a backend whose document-masked calls cannot fit the device at the configured
    training and evaluation shapes (SDPA's math kernel at full size needs hundreds of GB)."""
    if not cfg.doc_masked_attn or rt.attn.name == "fa3":
        return
    T = cfg.train_batch_tokens // (rt.world_size * accum)  # tokens per micro-batch: one flat span (TrainLoader)
    apps = len(application_plan(cfg, cfg.n_loops))
    eager_flex = rt.attn.name == "flex" and not rt.compile  # flex without compile falls back to the math kernel
    per_call = (lambda r, t, h, c=0: SDPA.masked_call_bytes(r, t, h)) if eager_flex else rt.attn.masked_call_bytes
    # kept for the backward, per block application (EVAL_ONLY trains nothing)
    train = 0 if cfg.eval_only else apps * per_call(1, T, cfg.num_heads, cfg.train_seq_len)
    evaluate = per_call(max(1, cfg.eval_batch_tokens // cfg.eval_seq_len), cfg.eval_seq_len, cfg.num_heads)
    need, have = max(train, evaluate), device_memory_bytes(rt.device)
    if need > 0.5 * have:
        raise ConfigError(
            f"ATTN_BACKEND resolved to {rt.attn.name}{' (not compiled)' if eager_flex else ''}: its document-masked "
            f"attention needs about {need / 1e9:.0f} GB for a micro-batch of {T} tokens "
            f"(EVAL_BATCH_TOKENS={cfg.eval_batch_tokens} at EVAL_SEQ_LEN={cfg.eval_seq_len}), over half of this "
            f"device's {have / 1e9:.0f} GB: use ATTN_BACKEND=flex with COMPILE_ENABLED=auto, or install FlashAttention 3")


def device_memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def resolve_fused_ce(cfg: Config, device: torch.device) -> str:
    """FUSED_CE -> the loss implementation: triton | torch (the same fused op computed by torch) | off."""
    if cfg.fused_ce == "0":
        return "off"
    if cfg.fused_ce == "auto":
        return "triton" if device.type == "cuda" and fused_ce_available() else "torch"
    if cfg.fused_ce == "triton":
        if not fused_ce_available():
            raise ConfigError("FUSED_CE=triton but triton is not importable: pip install triton, or FUSED_CE=auto")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("FUSED_CE=triton on a CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return cfg.fused_ce


def resolve_delta(cfg: Config, device: torch.device) -> str:
    """DELTA_BACKEND -> the DeltaNet implementation: fla (flash-linear-attention's chunk_delta_rule) | torch."""
    if cfg.delta_backend == "torch" or not cfg.delta_net_heads:
        return "torch"
    import importlib.util

    found = importlib.util.find_spec("fla") is not None
    if cfg.delta_backend == "fla" and not found:
        raise ConfigError("DELTA_BACKEND=fla but flash-linear-attention is not importable: pip install fla-core, or "
                          "DELTA_BACKEND=auto")
    return "fla" if found and (cfg.delta_backend == "fla" or device.type == "cuda") else "torch"


@dataclass(frozen=True)
class Kernels:
    """The device-dependent implementations the model calls, chosen once by `setup_runtime` and logged."""
    attn: AttentionBackend = SDPA
    ce: str = "torch"  # softcapped cross-entropy: triton | torch | off (resolve_fused_ce)
    delta: str = "torch"  # DeltaNet memory: fla | torch (resolve_delta)


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    compile: bool
    kernels: Kernels = Kernels()
    hardware: str = "cpu"
    notes: tuple = ()  # what setup decided that the log should say
    compile_backend: str = "inductor"

    @property
    def attn(self) -> AttentionBackend:
        return self.kernels.attn

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @classmethod
    def cpu(cls, rank: int = 0, world_size: int = 1) -> "Runtime":
        """One CPU process in fp32, uncompiled: what the tools and tests run on."""
        return cls(rank, world_size, 0, torch.device("cpu"), None, False)


def watch_launcher(poll_s: float = 1.0) -> None:
    """Under torchrun, a worker whose launcher is gone (killed by SIGKILL or the OOM killer, or stopped in the moment
    it spawns its workers, before it knows them) would train on alone, holding its GPU and the log's pipe open: it
    stops as if torchrun had passed on SIGTERM (in training, the rescue saves the weights)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # a plain `python train_gpt.py` may outlive its shell on purpose (nohup)
    import signal

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        Logger._stderr(f"[pid {os.getpid()}] the launcher (pid {parent}) is gone: stopping as if it sent SIGTERM")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="launcher").start()


def setup_runtime(cfg: Config) -> Runtime:
    watch_launcher()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif "OMP_NUM_THREADS" not in os.environ:  # CPU ranks share the cores instead of fighting over them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if world_size > 1 and not dist.is_initialized():
        import datetime

        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout_seconds))
    compiled = cfg.compile_enabled == "1" or (cfg.compile_enabled == "auto" and cuda)
    notes: list[str] = []
    attn = choose_attention(cfg, device, compiled, notes)
    hardware = torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu")
    kernels = Kernels(attn, resolve_fused_ce(cfg, device), resolve_delta(cfg, device))
    bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and cuda)
    return Runtime(rank, world_size, local_rank, device, torch.bfloat16 if bf16 else None, compiled, kernels, hardware,
                   tuple(notes), cfg.compile_backend)


# A graph per (context, crawler depth) of the schedule, two for the windowed evaluation and a few for TTT: far
# below this. The limit is raised from dynamo's default of 8 only so that a surprise costs a recompile, not the run;
# the log counts graphs after priming and at the end of training, and the tests bound them.
RECOMPILE_LIMIT = 64


def compile_model(model: nn.Module, cfg: Config, rt: Runtime, dynamic: bool = False) -> nn.Module:
    """The one place models are compiled (on CUDA by default; COMPILE_ENABLED=1 on any device): training and the
    windowed evaluations with static shapes (cu_seqlens marked dynamic), TTT with dynamic ones (its chunk widths
    and active rows vary). The residual stream runs in the autocast dtype (bf16 on CUDA, as Ouroboros) instead of
    fp32: half the activation bytes per block."""
    model.act_dtype = rt.autocast_dtype
    if not rt.compile:
        return model
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    torch._dynamo.config.accumulated_recompile_limit = 4 * RECOMPILE_LIMIT
    return torch.compile(model, fullgraph=cfg.compile_fullgraph, dynamic=dynamic, backend=rt.compile_backend)


class Logger:
    """Rank-0 `key:value` lines to OUTPUT_DIR/logs/RUN_ID.txt (one run per file: a run refuses to start where its log
    exists) and to stdout. Logging never stops a run: when stdout's pipe closes (Ctrl-C or SIGTERM reached run.sh's
    `tee` first) the file keeps the log and stdout goes to /dev/null; when the disk is full the file misses lines
    and stderr says so once."""

    def __init__(self, path: str | None):
        self.path, self.console, self.file_ok = path, True, True
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str) -> None:
        if self.path is None:
            return
        if self.file_ok:
            try:
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(msg + "\n")
            except OSError as e:
                self.file_ok = False
                self._stderr(f"WARNING: cannot write the log {self.path} ({e.strerror or e}); later lines go to stdout only")
        if self.console:
            try:
                print(msg, flush=True)
            except OSError:  # BrokenPipeError and friends: the reader of stdout is gone
                self.console = False
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # exit's flush must not fail either

    @staticmethod
    def _stderr(msg: str) -> None:
        try:
            print(msg, file=sys.stderr, flush=True)
        except OSError:
            pass


def write_atomic(path: str | Path, parts: bytes | list[bytes]) -> None:
    """Every file a run leaves (checkpoint, artifact, counted code, summary, shards, record files) is written whole or
    not at all: to a temporary name of this thread beside it, flushed, fsynced, then renamed over the target. A full
    disk, an exception or a stop mid-write leaves the previous file (or none) and no temporary file (only SIGKILL
    can leave one, `.NAME.PID.TID.tmp`); a failed write says what to do."""
    import errno

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_native_id()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            for part in [parts] if isinstance(parts, bytes) else parts:
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        fix = f"free disk space under {path.parent.resolve()} or write elsewhere" if full else \
            f"check that {path.parent.resolve()} exists and is writable, or write elsewhere"
        err = OSError(f"could not write {path} ({e.strerror or e}); nothing was replaced: {fix}")
        err.errno = e.errno
        raise err from None


COLLECTIVES = [0]  # collectives this rank has entered: after a timeout, the rank with fewer is the late one


def all_reduce_(t: Tensor, op=None) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        COLLECTIVES[0] += 1
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_reduce_flat_(tensors: list[Tensor], rt: Runtime, average: bool) -> None:
    """Sum (or average) a list of tensors over ranks in place with one flat all-reduce: the single
    place gradients and shared updates cross ranks outside the overlapped training reducer."""
    if rt.world_size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    all_reduce_(flat)
    if average:
        flat /= rt.world_size
    off = 0
    for t in tensors:
        t.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()


def sync_grads_(params: list[nn.Parameter], rt: Runtime, average: bool = True) -> None:
    """Average (or sum) gradients over ranks. A parameter without a gradient on this step (a crawler loop's
    instruction before the loops start) contributes zeros, so every rank sends the same layout."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_flat_([p.grad for p in params], rt, average)


HOST = torch.device("cpu")


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without stalling the host: copied asynchronously from pinned memory (CUDA stages an
    "asynchronous" copy from pageable memory synchronously). On the host, the tensor itself."""
    if device == HOST or t.device == device:
        return t
    if t.device.type != "cpu":  # another device's tensor: pinning is for host memory only
        return t.to(device, non_blocking=True)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Every rank waits for the others before the process group goes (gloo tears down noisily otherwise)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
# =============================================================================================
# Data: shards, preflight checks, training loader, validation tokens, byte accounting
# =============================================================================================

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4


class DataError(ValueError):
    """Bad or missing data, found before training; the message says what to run."""


def read_shard_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory where a shard file belongs: remove it, or re-download the shard")
    if not path.is_file():
        raise DataError(f"missing shard {path}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header (truncated?)")
    header = read_array(path, "<i4", HEADER_INTS, 0)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: magic {header[0]} != {SHARD_MAGIC}; not a token shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: version {header[1]} != {SHARD_VERSION}")
    n = int(header[2])
    if size != HEADER_BYTES + 2 * n:
        raise DataError(f"{path}: size {size} != {HEADER_BYTES} + 2*{n} tokens (truncated or corrupt); "
                        "re-download or re-run the prep script")
    return n


def load_shard(path: str | Path) -> np.ndarray:
    n = read_shard_header(path)
    return read_array(path, "<u2", n, HEADER_BYTES)


def read_array(path: str | Path, dtype: str, count: int, offset: int) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=dtype, count=count, offset=offset)
    except OSError as e:  # permissions, an I/O error of the disk
        raise DataError(f"cannot read {path} ({e.strerror or e}): fix its permissions, or re-download it") from None


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= 2**16:
        raise ValueError("token id does not fit uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    write_atomic(path, [header.tobytes(), tokens.astype("<u2").tobytes()])


def shard_paths(data_path: str, split: str) -> list[str]:
    return sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_[0-9]*.bin")))


def sidecar_paths(data_path: str) -> list[str]:
    """The CaseOps val byte sidecar, one file per val shard."""
    return sorted(glob.glob(os.path.join(data_path, "fineweb_val_bytes_[0-9]*.bin")))


def segment_starts(rows: np.ndarray, bos_id: int, max_len: int) -> np.ndarray:
    """[B, T] bool: where a document-masked attention segment starts: at every BOS, every `max_len` tokens
    into a document (#1530 chunks long documents so no span exceeds the training context), and at the start
    of a row (the tail of a document begun in an earlier row)."""
    B, T = rows.shape
    bos = rows == bos_id
    bos[:, 0] = True
    last_bos = np.maximum.accumulate(np.where(bos, np.arange(T)[None], 0), axis=1)
    return bos | ((np.arange(T)[None] - last_bos) % max_len == 0)


def segment_arrays(rows: np.ndarray, bos_id: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment ids [B, T] int64, cu_seqlens int32 over the flattened rows) of a CPU batch."""
    starts = segment_starts(rows, bos_id, max_len)
    return np.cumsum(starts, axis=1) - 1, np.append(np.flatnonzero(starts.reshape(-1)), rows.size).astype(np.int32)


def host_segments(arrays: tuple[np.ndarray, np.ndarray], pin: bool) -> tuple[Tensor, Tensor]:
    """(segment ids, cu_seqlens) as host tensors, pinned when they go to another device."""
    ids, cu = (torch.from_numpy(a) for a in arrays)
    return (ids.pin_memory(), cu.pin_memory()) if pin else (ids, cu)


def device_segments(host: tuple[Tensor, Tensor], max_len: int, device: torch.device) -> Segments:
    """Segments on `device`; the length of cu_seqlens is marked as the graph's one dynamic dimension."""
    ids, cu = (to_device(t, device) for t in host)
    torch._dynamo.mark_dynamic(cu, 0)
    return Segments(ids, cu, max_len)


def make_segments(rows: Tensor, bos_id: int, max_len: int, device: torch.device) -> Segments:
    """Segments of a host batch of rows, on `device`."""
    return device_segments(host_segments(segment_arrays(rows.numpy(), bos_id, max_len), device != HOST), max_len, device)


class Micro(typing.NamedTuple):
    """One micro-batch on the device: inputs, targets and their attention segments (None = plain causal)."""
    x: Tensor
    y: Tensor
    seg: Segments | None


def to_micro(x: Tensor, y: Tensor, cfg: Config, seq_len: int, device: torch.device) -> Micro:
    seg = make_segments(x, cfg.bos_id, seq_len, device) if cfg.doc_masked_attn else None
    return Micro(to_device(x, device), to_device(y, device), seg)


class TrainLoader:
    """Each optimizer step reads the next TRAIN_BATCH_TOKENS(+1) tokens of the training stream. They split into
    world x accum equal consecutive spans; micro-batch m of rank r is span r * accum + m, so the step reads the
    same tokens for any world size (its update differs: gradients are clipped per rank before averaging, as
    #1736/#1855 do, so 8 ranks clip 8 partial gradients where 1 rank clips their sum). With document masking (`flat`) a micro-batch is one flat span [1, n] whose
    attention is cut only at BOS and every `max_len` tokens (#1855: a document continues across micro-batch and
    step boundaries, a segment of its own on each side); without it (the crawler seeds) the span is cut into
    rows of TRAIN_SEQ_LEN. Shard order and the start offset depend only on SEED; each shard's token ids are
    checked when it is opened, before any of them is used. A background thread reads ahead `prefetch` steps
    into pinned memory (#1736), tokens and segments (cut for the context of the latest request) alike, so the
    training thread only queues asynchronous copies."""

    def __init__(self, paths: list[str], cfg: Config, rank: int, world_size: int, accum: int, device: torch.device,
                 prefetch: int = 2, flat: bool | None = None):
        self.paths, self.cfg, self.rank, self.world = list(paths), cfg, rank, world_size
        self.accum, self.device, self.pin = accum, device, device != HOST
        self.flat = cfg.doc_masked_attn if flat is None else flat
        self.n = cfg.train_batch_tokens // (world_size * accum)  # tokens per micro-batch
        rng = np.random.default_rng(cfg.seed)
        self.order = rng.permutation(len(self.paths))
        self.shard_i, self.tokens = 0, self._open(0)
        self.pos = int(rng.integers(0, max(1, len(self.tokens) // 2)))
        hits = np.flatnonzero(self.tokens[self.pos:self.pos + 1_000_000] == cfg.bos_id)
        self.pos += int(hits[0]) if hits.size else 0  # the stream starts at a document
        self.seq_len = cfg.train_seq_len  # the context the prefetcher cuts segments for
        self.host_x: Tensor | None = None  # the host rows of the last batch handed out (recut reads them)
        self.queue: queue.Queue | None = None
        if prefetch:
            self.queue = queue.Queue(maxsize=prefetch)
            threading.Thread(target=self._fill, daemon=True).start()

    def _open(self, i: int) -> np.ndarray:
        path = self.paths[self.order[i]]
        tokens = load_shard(path)
        check_ids(self.cfg, {path: tokens})  # again at open: the file may have changed since the preflight
        return tokens

    def _take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.shard_i = (self.shard_i + 1) % len(self.paths)
                self.tokens, self.pos = self._open(self.shard_i), 0
            chunk = self.tokens[self.pos:self.pos + n]
            parts.append(chunk)
            self.pos += len(chunk)
            n -= len(chunk)
        return np.concatenate(parts)

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's micro-batches of the next global chunk: x, y int64 [accum, rows, T]."""
        chunk = self._take(self.cfg.train_batch_tokens + 1).astype(np.int64)
        self.pos -= 1  # the extra target token is the next step's first input
        lo, n = self.rank * self.accum * self.n, self.accum * self.n
        shape = (self.accum, 1, self.n) if self.flat else (self.accum, -1, self.cfg.train_seq_len)
        return chunk[lo:lo + n].reshape(shape), chunk[lo + 1:lo + 1 + n].reshape(shape)

    def _prepare(self, seq_len: int) -> tuple:
        x, y = self.read()
        segs = [host_segments(segment_arrays(xm, self.cfg.bos_id, seq_len), self.pin) for xm in x] \
            if self.cfg.doc_masked_attn else None
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        return (xt.pin_memory(), yt.pin_memory()) if self.pin else (xt, yt), seq_len, segs

    def _fill(self) -> None:
        try:
            while True:
                self.queue.put(self._prepare(self.seq_len))
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self.queue.put(e)

    def next_batch(self, seq_len: int | None = None) -> list[Micro]:
        """Micro-batches of this rank for one optimizer step, on the device; segments no longer than `seq_len`."""
        seq_len = seq_len or self.cfg.train_seq_len
        self.seq_len = seq_len
        item = self.queue.get() if self.queue is not None else self._prepare(seq_len)
        if isinstance(item, BaseException):
            raise item
        (x, y), cut, segs = item
        self.host_x = x
        if segs is not None and cut != seq_len:  # the context changed after this batch was prefetched
            segs = [host_segments(segment_arrays(xm.numpy(), self.cfg.bos_id, seq_len), self.pin) for xm in x]
        return [Micro(to_device(x[m], self.device), to_device(y[m], self.device),
                      device_segments(segs[m], seq_len, self.device) if segs else None) for m in range(self.accum)]

    def recut(self, batch: list[Micro], seq_len: int) -> list[Micro]:
        """The last batch handed out, with segments for another context length (at a context change: twice a run),
        cut from its host rows (reading them back from the device would stall)."""
        return [Micro(m.x, m.y, make_segments(self.host_x[i], self.cfg.bos_id, seq_len, self.device))
                for i, m in enumerate(batch)]


@dataclass(frozen=True)
class TrainData:
    """The training shards and how this rank reads them; calibration draws from here too, never from val."""
    paths: list[str]
    cfg: Config
    rt: "Runtime"
    accum: int

    def loader(self, prefetch: int = 2) -> TrainLoader:
        return TrainLoader(self.paths, self.cfg, self.rt.rank, self.rt.world_size, self.accum, self.rt.device, prefetch)

    def calibration_batches(self) -> list[Micro]:
        """GPTQ_CAL_SAMPLES contiguous training rows over all ranks (a seed of their own), this rank's share, 8
        per batch, each row document-masked on its own."""
        cfg, rt = self.cfg, self.rt
        seq = cfg.gptq_cal_seq_len or cfg.train_seq_len
        n = max(rt.world_size, cfg.gptq_cal_samples // rt.world_size * rt.world_size)
        cal = dataclasses.replace(cfg, seed=cfg.seed + 1, train_seq_len=seq, train_batch_tokens=n * seq)
        x, y = TrainLoader(self.paths, cal, rt.rank, rt.world_size, 1, rt.device, prefetch=0, flat=False).read()
        x, y = torch.from_numpy(x[0]), torch.from_numpy(y[0])
        return [to_micro(xs, ys, cfg, seq, rt.device) for xs, ys in zip(x.split(8), y.split(8))]


@dataclass
class ValidationData:
    tokens: Tensor  # int64 [N+1]
    token_bytes: Tensor  # int32 [N+1]: bytes of token i when it is a target
    n_docs: int
    bos_id: int = 1


def build_sentencepiece_luts(sp, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-id byte counts for plain SentencePiece BPB (SPEC 3): piece bytes without the leading
    U+2581, a flag for that leading space, and whether the id is a boundary (control/unknown/unused)."""
    base = np.zeros(vocab_size, dtype=np.int32)
    space = np.zeros(vocab_size, dtype=bool)
    boundary = np.ones(vocab_size, dtype=bool)
    for i in range(min(vocab_size, sp.get_piece_size())):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1  # a byte-fallback token is exactly one byte of the original text
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return base, space, boundary


def token_bytes_from_luts(tokens: np.ndarray, luts) -> np.ndarray:
    """Bytes each token contributes as a prediction target (position 0 has no predecessor)."""
    base, space, boundary = luts
    t = tokens.astype(np.int64)
    out = base[t].astype(np.int32)
    prev_is_boundary = np.concatenate([[True], boundary[t[:-1]]])
    out += (space[t] & ~prev_is_boundary).astype(np.int32)
    return out


def load_validation(cfg: Config, sp) -> ValidationData:
    paths = shard_paths(cfg.data_path, "val")
    if not paths:
        raise DataError(f"no fineweb_val_*.bin in {cfg.data_path}; run the data download or prep script")
    tokens = np.concatenate([load_shard(p) for p in paths])
    if cfg.caseops_enabled:
        side = sidecar_paths(cfg.data_path)
        if not side:
            raise DataError(f"CASEOPS_ENABLED=1 but no fineweb_val_bytes_*.bin sidecar in {cfg.data_path}; "
                            "re-run prepare_caseops_data.py")
        tb = np.concatenate([load_shard(p) for p in side]).astype(np.int32)
        if len(tb) != len(tokens):
            raise DataError(f"val byte sidecar has {len(tb)} entries but val has {len(tokens)} tokens; "
                            "re-run prepare_caseops_data.py")
    else:
        tb = token_bytes_from_luts(tokens, build_sentencepiece_luts(sp, cfg.vocab_size))
    if cfg.val_token_limit:
        tokens, tb = tokens[:cfg.val_token_limit + 1], tb[:cfg.val_token_limit + 1]
    n_docs = int((tokens == cfg.bos_id).sum())
    return ValidationData(torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(tb), n_docs, cfg.bos_id)


def load_sentencepiece(path: str, lossless: bool = False):
    """SentencePiece processor. By default the model's own normalizer (nmt_nfkc, whitespace folding), as
    the published data was tokenized; `lossless` keeps the pieces and ids but turns normalization off, so
    encode/decode round-trips any text (data prepared with --tokenization lossless)."""
    import sentencepiece as spm

    if not lossless:
        return spm.SentencePieceProcessor(model_file=path)
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.precompiled_charsmap = b""
    proto.normalizer_spec.remove_extra_whitespaces = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def data_tokenization(data_path: str) -> str:
    """How the shards were tokenized: our prep's manifest says so; published downloads are 'published'."""
    manifest = Path(data_path) / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("tokenization", "published")
    return "published"


@dataclass(frozen=True)
class ValFingerprint:
    """A published validation split (reviewers compare these, PR #2146). `targets_2048` is what older
    trainers log as val_tokens: the targets rounded down to a multiple of 2048."""
    docs: int
    targets_2048: int
    tokens: int | None = None  # exact token count of the val file, where known
    bytes: int | None = None  # the byte sidecar's total, where known (CaseOps)
    train_shards: int | None = None  # the published train shards, where known (a download may take fewer)


KNOWN_VAL = {"fineweb10B_sp1024": ValFingerprint(50_000, 62_021_632),
             "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved": ValFingerprint(50_000, 47_851_520, 47_853_344,
                                                                                   151_080_645, 80)}


def targets_2048(n_tokens: int) -> int:
    return (n_tokens - 1) // 2048 * 2048


@dataclass
class DataReport:
    train_shards: int
    val_shards: int
    val_tokens: int
    val_docs: int
    val_bytes: int | None
    train_docs_checked: int
    overlap_hashes: list[str]  # train documents equal to val documents, accepted by VAL_OVERLAP_DOCS
    tokenization: str


def split_docs(tokens: np.ndarray, bos_id: int) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == bos_id)
    return np.split(tokens, starts[1:]) if starts.size else []


def fix_hint(cfg: Config) -> str:
    if cfg.caseops_enabled:
        return ("re-download with `python3 data/cached_challenge_fineweb.py --variant sp8192_caseops` or re-run "
                "prepare_caseops_data.py")
    return "re-download with data/cached_challenge_fineweb.py"


def check_dataset(cfg: Config, sp, train_too: bool = True) -> DataReport:
    """Everything about the data that can go wrong, checked in seconds before training (the val split alone for an
    EVAL_ONLY run). Raises DataError/ConfigError naming the cause and the command that fixes it."""
    if not os.path.isdir(cfg.data_path):
        raise DataError(f"DATA_PATH={cfg.data_path} is not a directory; download or prepare the shards "
                        "(see README) or set DATA_PATH")
    if "datasets/datasets" in cfg.data_path.replace(os.sep, "/") and not shard_paths(cfg.data_path, "val"):
        raise DataError(f"DATA_PATH={cfg.data_path} has a doubled datasets/datasets and no shards; point it at the "
                        "shard folder")
    train, val = shard_paths(cfg.data_path, "train"), shard_paths(cfg.data_path, "val")
    if (train_too and not train) or not val:
        raise DataError(f"DATA_PATH={cfg.data_path} has {len(train)} train and {len(val)} val shards; "
                        f"{'both are' if train_too else 'val shards are'} needed: {fix_hint(cfg)}")
    train = train if train_too else []
    for p in train + val:
        read_shard_header(p)
    check_layout(cfg, train, val)
    val_parts = [load_shard(p) for p in val]
    vt = np.concatenate(val_parts)
    if vt.size < 2:
        raise DataError(f"the val split in {cfg.data_path} is empty ({vt.size} tokens): nothing can be scored: "
                        f"{fix_hint(cfg)}")
    check_ids(cfg, {"val": vt})
    docs = split_docs(vt, cfg.bos_id)
    tokenization = data_tokenization(cfg.data_path)
    check_fingerprint(cfg, vt, len(docs), tokenization)
    check_tokenizer_roundtrip(cfg, sp, docs, tokenization)  # first: a wrong tokenizer fails every later check
    side = check_sidecar(cfg, sp, val, val_parts, tokenization) if cfg.caseops_enabled else None
    train_docs, overlap = check_train_shards(cfg, train, vt) if train_too else (0, [])
    val_bytes = int(side.astype(np.int64).sum()) if side is not None else None
    return DataReport(len(train), len(val), int(vt.size), len(docs), val_bytes, train_docs, overlap, tokenization)


def doc_keys(tokens: np.ndarray, bos_id: int, k: int = 64) -> np.ndarray:
    """One uint64 key per BOS-started document: a hash of its first k tokens and its length. Equal keys mean,
    in practice, the same document; computed with array ops, ~0.1 s per 100M-token shard."""
    starts = np.flatnonzero(tokens == bos_id)
    if not starts.size:
        return np.zeros(0, dtype=np.uint64)
    ends = np.append(starts[1:], tokens.size)
    idx = starts[:, None] + 1 + np.arange(k)[None]
    head = np.where(idx < ends[:, None], tokens[np.minimum(idx, tokens.size - 1)], 65535).astype(np.uint64)
    powers = np.array([pow(0x100000001B3, j, 1 << 64) for j in range(k)], dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic mod 2^64
        return (head * powers).sum(axis=1, dtype=np.uint64) ^ ((ends - starts).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def check_train_shards(cfg: Config, train: list[str], vt: np.ndarray) -> tuple[int, list[str]]:
    """Every train shard, in one parallel pass before training: token ids below VOCAB_SIZE, BOS present, and no
    validation document among its documents (#2127: 15 of 34 CaseOps PRs trained on validation documents; one
    leaked document is a leak). Natural duplicates are accepted only as many as VAL_OVERLAP_DOCS names, and their
    hashes go to the log. Returns (train documents checked, hashes of the overlapping documents)."""
    from concurrent.futures import ThreadPoolExecutor

    val_keys = np.unique(doc_keys(vt, cfg.bos_id))

    def one(path: str) -> tuple[int, np.ndarray]:
        toks = load_shard(path)
        if not toks.size:
            raise DataError(f"{path} holds no tokens (an interrupted export?): {fix_hint(cfg)}")
        check_ids(cfg, {os.path.basename(path): toks})
        keys = doc_keys(toks, cfg.bos_id)
        return keys.size, keys[np.isin(keys, val_keys)]

    with ThreadPoolExecutor(min(8, len(train))) as ex:  # numpy releases the GIL: reads and scans overlap
        counts = list(ex.map(one, train))
    n_docs, overlap = sum(c[0] for c in counts), sum(c[1].size for c in counts)
    hashes = [f"{k:016x}" for c in counts for k in c[1].tolist()]
    if overlap > cfg.val_overlap_docs:
        worst = max(zip(counts, train), key=lambda ct: ct[0][1].size)[1]
        raise DataError(f"{overlap} training documents are validation documents ({os.path.basename(worst)} has the "
                        f"most; hashes {', '.join(hashes[:5])}{', ...' if overlap > 5 else ''}): validation data in "
                        f"training: {fix_hint(cfg)} (prep with the default --val-docs 50000). If they are natural "
                        f"duplicates in the published split, accept exactly these with VAL_OVERLAP_DOCS={overlap}")
    return n_docs, hashes


def shard_index(path: str) -> int:
    return int(Path(path).stem.rsplit("_", 1)[1])


def check_layout(cfg: Config, train: list[str], val: list[str]) -> None:
    """The shards are exactly the dataset's. Our prep lists its shards in manifest.json: every listed shard must be
    there, and nothing else may be. Without a manifest (a published download) each kind is numbered 000000 onwards
    without a gap, a sidecar for each val shard, and a published folder holds at most its published train shards:
    a shard left from another download or prep would otherwise be trained on."""
    side, folder = sidecar_paths(cfg.data_path), Path(cfg.data_path)
    present = {os.path.basename(p) for p in train + val + side}
    manifest = folder / "manifest.json"
    if manifest.is_file():
        listed = {n for s in json.loads(manifest.read_text()).get("shards", [])
                  for n in (s.get("name"), s.get("sidecar")) if n}
        stray, missing = sorted(present - listed), sorted(n for n in listed - present
                                                          if train or not n.startswith("fineweb_train_"))
        if stray:
            raise DataError(f"{len(stray)} shards in {cfg.data_path} are not in its manifest.json "
                            f"({', '.join(stray[:3])}): left from another prep; delete them, or prep into an empty folder")
        if missing:
            raise DataError(f"{len(missing)} shards listed in {manifest} are missing ({', '.join(missing[:3])}): "
                            "re-run prepare_caseops_data.py (it resumes)")
        return
    for kind, paths in (("train", train), ("val", val), ("val byte sidecar", side)):
        idx = sorted(shard_index(p) for p in paths)
        if idx != list(range(len(idx))):
            odd = sorted(set(idx) ^ set(range(len(idx))))
            raise DataError(f"the {kind} shards in {cfg.data_path} are not numbered 0..{len(idx) - 1} (at "
                            f"{', '.join(map(str, odd[:3]))}): a shard is missing, or left from another download or "
                            f"prep: {fix_hint(cfg)}")
    fp = KNOWN_VAL.get(folder.name)
    if fp is not None and fp.train_shards is not None and len(train) > fp.train_shards:
        raise DataError(f"{cfg.data_path} holds {len(train)} train shards; the published dataset has {fp.train_shards}: "
                        f"the others are left from another download or prep; remove them")


def check_ids(cfg: Config, parts: dict[str, np.ndarray]) -> None:
    """Token ids below VOCAB_SIZE, and BOS markers: documents are split at BOS everywhere (document-masked attention,
    the validation leak check, TTT, the n-gram tilt's document spans)."""
    for name, toks in parts.items():
        top = int(toks.max()) if toks.size else 0
        if top >= cfg.vocab_size:
            raise ConfigError(f"{name} data has token id {top} >= VOCAB_SIZE={cfg.vocab_size}; the shards were made "
                              "with a larger tokenizer: set VOCAB_SIZE/TOKENIZER_PATH to match the data")
        if not (toks == cfg.bos_id).any():
            raise DataError(f"{name} shards contain no BOS ({cfg.bos_id}) markers, so documents cannot be split: "
                            f"{fix_hint(cfg)}")


def published_fingerprint(cfg: Config, tokenization: str):
    """The published split's fingerprint (KNOWN_VAL) when the data claims to be it: its folder name, the published
    tokenization (lossless shards of the same documents have other counts) and the whole split; else None."""
    fp = KNOWN_VAL.get(os.path.basename(cfg.data_path.rstrip("/")))
    return None if fp is None or cfg.val_token_limit or tokenization != "published" else fp


def check_fingerprint(cfg: Config, vt: np.ndarray, n_docs: int, tokenization: str) -> None:
    """A published split must be complete: 50,000 documents and the known token count."""
    fp = published_fingerprint(cfg, tokenization)
    if fp is None:
        return
    if n_docs != fp.docs:
        raise DataError(f"truncated validation split: {n_docs} documents, the published split has {fp.docs}: "
                        f"{fix_hint(cfg)} (prep with the default --val-docs 50000)")
    got = vt.size if fp.tokens else targets_2048(vt.size)
    want = fp.tokens or fp.targets_2048
    if got != want:
        raise DataError(f"the {fp.docs} validation documents have {vt.size} tokens, the published split "
                        f"{fp.tokens or 'about ' + str(fp.targets_2048)}: they were tokenized differently (another "
                        f"tokenizer, or prep with --tokenization lossless into the published folder name): {fix_hint(cfg)}")


def check_sidecar(cfg: Config, sp, val: list[str], val_parts: list[np.ndarray], tokenization: str) -> np.ndarray:
    """The CaseOps byte sidecar must align with the val tokens: one entry per token, BOS and CaseOps markers
    0 (the old #1736 exporter counted markers as bytes), a plain ASCII piece exactly its own length (a shifted
    sidecar fails this at once), a U+2581 piece its text plus the one space (inside a document), and the
    published split's total (its document count is check_fingerprint's, which runs first). Returns it, concatenated
    like the val tokens."""
    side = sidecar_paths(cfg.data_path)
    if len(side) != len(val):
        raise DataError(f"{len(side)} val byte sidecars for {len(val)} val shards in {cfg.data_path}; {fix_hint(cfg)}")
    parts = []
    for p, toks in zip(side, val_parts):
        b = load_shard(p)
        if b.size != toks.size:
            raise DataError(f"{p} has {b.size} entries for {toks.size} val tokens (misaligned sidecar): {fix_hint(cfg)}")
        parts.append(b)
    tokens, side_all = np.concatenate(val_parts), np.concatenate(parts)
    if side_all[tokens == cfg.bos_id].any():
        raise DataError(f"the sidecar gives bytes to BOS tokens (misaligned sidecar): {fix_hint(cfg)}")
    markers = np.isin(tokens, MARKER_IDS) & ~np.concatenate([[False], tokens[:-1] == ESC_ID])
    if side_all[markers].any():
        raise DataError("the sidecar counts CaseOps control symbols as bytes: it was written by the old exporter "
                        f"(#1736's folder), which inflates bytes by ~7%: {fix_hint(cfg)}")
    plain_len, space_len = plain_piece_lengths(sp, cfg.vocab_size)
    known = plain_len[tokens] > 0
    agree = float((side_all[known] == plain_len[tokens][known]).mean()) if known.any() else 1.0
    if agree < 0.99:
        raise DataError(f"the sidecar disagrees with the tokens ({agree:.1%} of plain ASCII pieces get their own "
                        f"length): misaligned sidecar, or TOKENIZER_PATH is not the data's tokenizer: {fix_hint(cfg)}")
    spaced = (space_len[tokens] > 0) & np.concatenate([[False], tokens[:-1] != cfg.bos_id])
    agree = float((side_all[spaced] == space_len[tokens][spaced]).mean()) if spaced.any() else 1.0
    if agree < 0.9:  # a folded run of several whitespace characters carries them all: a few percent differ
        raise DataError(f"the sidecar disagrees with the tokens on U+2581 pieces ({agree:.1%} count their text plus "
                        f"one space): the space is miscounted: {fix_hint(cfg)}")
    fp = published_fingerprint(cfg, tokenization)
    total = int(side_all.astype(np.int64).sum())
    if fp and fp.bytes and total != fp.bytes:
        raise DataError(f"the val byte sidecar totals {total} bytes; the published split has {fp.bytes}: "
                        f"{fix_hint(cfg)}")
    return side_all


MARKER_IDS, ESC_ID = (4, 5, 6, 7), 7  # TITLE, ALLCAPS, CAPNEXT, ESC in the CaseOps tokenizer (SPEC 4)


def plain_piece_lengths(sp, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(length of each piece that is printable ASCII without a leading U+2581: its surface is itself; 1 + the
    length of the rest for a U+2581 piece with a printable ASCII rest: a space and itself), 0 elsewhere."""
    plain, spaced = np.zeros(vocab_size, dtype=np.int64), np.zeros(vocab_size, dtype=np.int64)
    for i in range(min(vocab_size, sp.get_piece_size())):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        if piece.isascii() and piece.isprintable():
            plain[i] = len(piece)
        elif piece.startswith("\u2581") and len(piece) > 1 and piece[1:].isascii() and piece[1:].isprintable():
            spaced[i] = len(piece)
    return plain, spaced


def check_tokenizer_roundtrip(cfg: Config, sp, docs: list[np.ndarray], tokenization: str, n: int = 16) -> None:
    """Decoding the first val documents and encoding the (model-normalized) text again must give the same
    ids. When it does not, the other tokenization option is tried to name the cause."""
    sample = [d[1:].tolist() for d in docs[:n]]
    if not sample or roundtrip_share(sp, sample) >= 0.5:
        return
    other = "lossless" if tokenization == "published" else "published"
    if roundtrip_share(load_sentencepiece(cfg.tokenizer_path, lossless=other == "lossless"), sample) >= 0.5:
        raise DataError(f"the val shards were tokenized with the {other} tokenization but {cfg.data_path} says "
                        f"{tokenization}: re-run prepare_caseops_data.py with the tokenization you mean (default: "
                        "published), or fix manifest.json")
    raise DataError(f"val documents do not re-encode to the same ids with TOKENIZER_PATH={cfg.tokenizer_path}: "
                    "the data was made with another tokenizer; point TOKENIZER_PATH at the data's tokenizer")


def roundtrip_share(sp, sample: list[list[int]]) -> float:
    return sum(sp.encode(sp.decode(ids)) == ids for ids in sample) / len(sample)


def check_tokenizer(cfg: Config):
    """Load the tokenizer (with the data's tokenization) and check it against VOCAB_SIZE and BOS_ID."""
    if not os.path.isfile(cfg.tokenizer_path):
        raise DataError(f"TOKENIZER_PATH={cfg.tokenizer_path} does not exist; download it with "
                        "`python data/cached_challenge_fineweb.py` or set TOKENIZER_PATH")
    sp = load_sentencepiece(cfg.tokenizer_path, lossless=data_tokenization(cfg.data_path) == "lossless")
    if sp.get_piece_size() != cfg.vocab_size:
        raise ConfigError(f"VOCAB_SIZE={cfg.vocab_size} but {cfg.tokenizer_path} has {sp.get_piece_size()} "
                          f"pieces; set VOCAB_SIZE={sp.get_piece_size()} or use the matching tokenizer")
    if sp.bos_id() != cfg.bos_id:
        raise ConfigError(f"BOS_ID={cfg.bos_id} but the tokenizer's BOS is {sp.bos_id()}; set BOS_ID={sp.bos_id()}")
    return sp


def preflight(cfg: Config, log: Logger):
    """Everything checkable before paying for training: tokenizer, vocab, shards, BOS, split, overlap."""
    sp = check_tokenizer(cfg)
    t0 = time.perf_counter()
    rep = check_dataset(cfg, sp, train_too=not cfg.eval_only)
    log(f"train_loader:dataset:{os.path.basename(cfg.data_path.rstrip('/'))} train_shards:{rep.train_shards}")
    log(f"val_tokens: {targets_2048(rep.val_tokens)} (targets rounded down to 2048, as older trainers log) "
        f"file_tokens:{rep.val_tokens} val_docs:{rep.val_docs} val_bytes:{rep.val_bytes}")
    log(f"data_check: tokenization:{rep.tokenization} overlap_docs:{len(rep.overlap_hashes)}/{rep.train_docs_checked}"
        + (f" accepted_by:VAL_OVERLAP_DOCS={cfg.val_overlap_docs} hashes:{','.join(rep.overlap_hashes)}"
           if rep.overlap_hashes else "") + ("" if not cfg.eval_only else " train_shards:not_checked(EVAL_ONLY)")
        + f" time:{time.perf_counter() - t0:.1f}s")
    return sp, shard_paths(cfg.data_path, "train")




# =============================================================================================
# Model: embeddings -> flat encoder -> crawler (shared blocks, looped) -> flat decoder, tied head
# =============================================================================================


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rope_tables(T: int, rope_dims: int, base: float, scale: float, device, dtype) -> tuple[Tensor, Tensor]:
    """cos/sin for the first `rope_dims` dims of each head; `scale` divides the frequencies (per-loop RoPE)."""
    inv = 1.0 / (base ** (torch.arange(0, rope_dims, 2, device=device, dtype=torch.float32) / rope_dims))
    ang = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv / scale)
    return ang.cos().to(dtype)[None, :, None, :], ang.sin().to(dtype)[None, :, None, :]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    rd = cos.size(-1) * 2
    xr, xp = x[..., :rd], x[..., rd:]
    a, b = xr[..., : rd // 2], xr[..., rd // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos, xp], dim=-1)


class BatchedLoRA(nn.Module):
    """Test-time adapters, one independent low-rank pair per document of a batch (#1736). `keys` name the
    sites ("<slot>.q", "<slot>.o", ..., "head"; a slot is one block application, so each crawler loop has its
    own). A [B, r, in] starts uniform in +-1/sqrt(in), B [B, out, r] at zero, output scaled by alpha/r (#1855)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], batch: int, rank: int, alpha: float, device: torch.device):
        super().__init__()
        self.names = {k: k.replace(".", "_") for k in shapes}
        self.scale = alpha / rank
        self.rows: Tensor | None = None  # the documents still being scored; finished rows are skipped
        self.a = nn.ParameterDict({self.names[k]: nn.Parameter(torch.empty(batch, rank, i, device=device))
                                   for k, (i, o) in shapes.items()})
        self.b = nn.ParameterDict({self.names[k]: nn.Parameter(torch.zeros(batch, o, rank, device=device))
                                   for k, (i, o) in shapes.items()})

    @torch.no_grad()
    def reset(self, seed: int | None) -> None:
        """B back to zero (the model is unchanged); A drawn afresh from `seed` (None: A is warm-started, #1855).
        A seeded draw keeps the scores independent of which rank processes which batch."""
        for b in self.b.values():
            b.zero_()
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            for a in self.a.values():
                bound = 1 / math.sqrt(a.size(-1))
                a.copy_(torch.rand(a.shape, generator=g).mul_(2 * bound).sub_(bound))

    def delta(self, key: str, x: Tensor) -> Tensor | None:
        k = self.names.get(key)
        if k is None:
            return None
        a, b = (self.a[k], self.b[k]) if self.rows is None else (self.a[k][self.rows], self.b[k][self.rows])
        return (x @ a.transpose(1, 2).to(x.dtype)) @ b.transpose(1, 2).to(x.dtype) * self.scale


def lora_delta(lora: BatchedLoRA | None, key: str, x: Tensor) -> Tensor | None:
    return None if lora is None else lora.delta(key, x)


def plus(y: Tensor, d: Tensor | None) -> Tensor:
    return y if d is None else y + d


class AttentionGate(nn.Module):
    """Per-head sigmoid gate on the attention output, read from the normalised block input: sparse reads the
    first GATE_WINDOW channels with a zero-initialised weight and a logit scale (#1787, 0.5 in #1855), dense
    reads all channels (#1736, init std 0.005). Either way the gate starts at about 0.5."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.window = cfg.gate_window if cfg.sparse_attn_gate_enabled else cfg.model_dim
        self.scale = cfg.sparse_attn_gate_scale if cfg.sparse_attn_gate_enabled else 1.0
        self.weight = nn.Parameter(torch.zeros(cfg.num_heads, self.window))
        if cfg.gated_attn_enabled:
            nn.init.normal_(self.weight, std=cfg.gated_attn_init_std)

    def forward(self, n: Tensor) -> Tensor:
        return torch.sigmoid(self.scale * F.linear(n[..., :self.window], self.weight.to(n.dtype)))


class Attention(nn.Module):
    def __init__(self, cfg: Config, xsa: bool, backend: AttentionBackend):
        super().__init__()
        self.backend, self.xsa = backend, xsa
        self.h, self.hkv = cfg.num_heads, cfg.num_kv_heads
        self.hd = cfg.model_dim // cfg.num_heads
        self.c_q = nn.Linear(cfg.model_dim, cfg.model_dim, bias=False)
        self.c_k = nn.Linear(cfg.model_dim, self.hkv * self.hd, bias=False)
        self.c_v = nn.Linear(cfg.model_dim, self.hkv * self.hd, bias=False)
        for m in (self.c_q, self.c_k, self.c_v):  # #1855 and the crawler seeds: orthogonal, gain 1
            nn.init.orthogonal_(m.weight, gain=1.0)
        self.proj = nn.Linear(cfg.model_dim, cfg.model_dim, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.q_gain = nn.Parameter(torch.full((self.h,), cfg.qk_gain_init))
        self.gate = AttentionGate(cfg) if (cfg.sparse_attn_gate_enabled or cfg.gated_attn_enabled) else None

    def forward(self, n: Tensor, rope, mask: typing.Any, ve: Tensor | None, lora, slot: str) -> Tensor:
        B, T, _ = n.shape
        q = plus(self.c_q(n), lora_delta(lora, slot + "q", n)).view(B, T, self.h, self.hd)
        k = plus(self.c_k(n), lora_delta(lora, slot + "k", n)).view(B, T, self.hkv, self.hd)
        v = plus(plus(self.c_v(n), lora_delta(lora, slot + "v", n)), ve).view(B, T, self.hkv, self.hd)
        q, k = apply_rope(rms_norm(q), *rope), apply_rope(rms_norm(k), *rope)
        y = self.backend(q * self.q_gain.to(q.dtype)[None, None, :, None], k, v, mask)
        if self.xsa:  # XSA: remove the component along the token's own value (GQA-aware)
            yg = y.view(B, T, self.hkv, self.h // self.hkv, self.hd)
            vn = F.normalize(v, dim=-1).unsqueeze(-2)
            y = (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, T, self.h, self.hd)
        if self.gate is not None:
            y = y * self.gate(n).unsqueeze(-1)
        return plus(self.proj(y.reshape(B, T, -1)), lora_delta(lora, slot + "o", n))  # O adapter bypasses (#1855)


class MLP(nn.Module):
    def __init__(self, dim: int, mult: float, slope: float):
        super().__init__()
        self.fc = nn.Linear(dim, int(mult * dim), bias=False)
        nn.init.orthogonal_(self.fc.weight, gain=1.0)  # #1855 and the crawler seeds
        self.proj = nn.Linear(int(mult * dim), dim, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.slope = slope

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), self.slope).square())


def ln_layer(cfg: Config, idx: int) -> int:
    """The layer number LN_SCALE uses for block `idx` (encoder, crawler, decoder in that order). The crawler
    seeds number their flat blocks 0..F-1 (encoder then decoder) and the crawler blocks F.. after them."""
    if cfg.ln_scale_order == "block" or idx < cfg.n_encoder:
        return idx
    if idx < cfg.n_encoder + cfg.n_crawler:
        return cfg.n_encoder + cfg.n_decoder + idx - cfg.n_encoder
    return idx - cfg.n_crawler


class Block(nn.Module):
    """Pre-norm attention and MLP with per-channel output scales. `resid_mix` mixes the embedding stream x0
    into the input (Ouroboros, #1736); a parallel block keeps two lanes, attention reading lane 0 and the MLP
    lane 1, recombined by learned lambdas (#1736)."""

    def __init__(self, cfg: Config, idx: int, crawler: bool, backend: AttentionBackend):
        super().__init__()
        d, self.idx = cfg.model_dim, idx
        self.attn = Attention(cfg, cfg.xsa_at(idx), backend)
        self.mlp = MLP(d, cfg.crawler_mlp_mult if crawler else cfg.mlp_mult,
                       cfg.crawler_mlp_leaky_slope if crawler else cfg.mlp_leaky_slope)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)])) if cfg.resid_mix else None
        self.in_scale = 1.0 / math.sqrt(ln_layer(cfg, idx) + 1) if cfg.ln_scale else 1.0
        self.parallel = 0 <= cfg.parallel_residual_start <= idx
        if self.parallel:
            self.lane_resid = nn.Parameter(torch.full((2,), 1.1))
            self.lane_post = nn.Parameter(torch.ones(2, 2))

    def mix(self, x: Tensor, x0: Tensor) -> Tensor:
        if self.resid_mix is None:
            return x
        m = self.resid_mix.to(x.dtype)
        return m[0] * x + m[1] * x0

    def mlp_out(self, x: Tensor, lora, slot: str) -> Tensor:
        m = rms_norm(x) * self.in_scale
        return self.mlp_scale.to(x.dtype) * plus(self.mlp(m), lora_delta(lora, slot + "mlp", m))

    def forward(self, x: Tensor, x0: Tensor, rope, mask, ve, lora, slot: str) -> Tensor:
        x = self.mix(x, x0)
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.in_scale, rope, mask, ve, lora, slot)
        return x + self.mlp_out(x, lora, slot)

    def forward_lanes(self, lanes: tuple[Tensor, Tensor], x0: Tensor, rope, mask, ve, lora, slot: str):
        l0, l1 = lanes
        a = self.attn_scale.to(l0.dtype) * self.attn(rms_norm(self.mix(l0, x0)) * self.in_scale, rope, mask, ve, lora, slot)
        m = self.mlp_out(l1, lora, slot)
        r, p = self.lane_resid.to(l0.dtype), self.lane_post.to(l0.dtype)
        return r[0] * l0 + p[0, 0] * a + p[1, 0] * m, r[1] * l1 + p[0, 1] * a + p[1, 1] * m


class BigramHash(nn.Module):
    """Hashed (previous, current) token pair embedding. Position 0 and every BOS get the reserved 'no
    predecessor' bucket, so nothing leaks across document boundaries. The projection starts orthogonal and
    small (Ouroboros): with both factors at zero neither would ever receive a gradient."""

    def __init__(self, buckets: int, dim: int, model_dim: int, bos_id: int, proj_gain: float):
        super().__init__()
        self.buckets, self.bos_id = buckets, bos_id
        self.embed = nn.Embedding(buckets, dim)
        self.proj = nn.Linear(dim, model_dim, bias=False)
        nn.init.zeros_(self.embed.weight)
        nn.init.orthogonal_(self.proj.weight, gain=proj_gain)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.to(torch.int64)
        null = self.buckets - 1
        h = torch.bitwise_xor(36313 * t[:, 1:], 27191 * t[:, :-1]) % null
        h = torch.where(t[:, 1:] == self.bos_id, torch.full_like(h, null), h)
        h = torch.cat([torch.full_like(t[:, :1], null), h], dim=1)
        return self.proj(self.embed(h).to(self.proj.weight.dtype)) * self.scale


def previous_token(x: Tensor, ids: Tensor, bos_id: int) -> Tensor:
    """x shifted one position right, zero at position 0 and wherever the current token is BOS (#1855 fix)."""
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    return prev * (ids != bos_id).unsqueeze(-1).to(x.dtype)


class SmearGate(nn.Module):
    """Blend each position with the previous one, never across a BOS. `window` (#1855): on the raw embedding,
    e_t += lambda * sigmoid(w . e_t[:GATE_WINDOW]) * e_{t-1}, both zero at init. `channel` (crawler seeds):
    after the norm, x_t <- x_t + sigmoid(g) * (x_{t-1} - x_t) with one gate per channel."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.mode, self.bos_id, self.window = cfg.smear_gate, cfg.bos_id, cfg.gate_window
        if self.mode == "window":
            self.weight = nn.Parameter(torch.zeros(1, cfg.gate_window))
            self.lam = nn.Parameter(torch.zeros(1))
        else:
            self.gate = nn.Parameter(torch.zeros(cfg.model_dim))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        prev = previous_token(x, ids, self.bos_id)
        if self.mode == "window":
            g = self.lam.to(x.dtype) * torch.sigmoid(F.linear(x[..., :self.window], self.weight.to(x.dtype)))
            return x + g * prev
        keep = (ids != self.bos_id).unsqueeze(-1).to(x.dtype)
        return x + keep * torch.sigmoid(self.gate.to(x.dtype)) * (prev - x)


class ValueEmbedding(nn.Module):
    """A second token embedding added to the values of the blocks in VE_LAYERS, each with its own scale
    (Ouroboros lineage)."""

    def __init__(self, cfg: Config, proj_gain: float):
        super().__init__()
        kv = cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.ve_dim)
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj = nn.Linear(cfg.ve_dim, kv, bias=False)
        nn.init.orthogonal_(self.proj.weight, gain=proj_gain)
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.layer_scales = nn.Parameter(torch.ones(len(cfg.ve_blocks)))
        self.slot_of = {b: i for i, b in enumerate(cfg.ve_blocks)}

    def forward(self, ids: Tensor) -> Tensor:
        return self.proj(self.embed(ids).to(self.proj.weight.dtype)) * self.scale

    def for_block(self, ve: Tensor | None, block: int) -> Tensor | None:
        i = self.slot_of.get(block)
        return None if ve is None or i is None else ve * self.layer_scales[i].to(ve.dtype)


def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, seg: Tensor | None = None,
                       chunk: int = 64) -> Tensor:
    """Causal delta rule on [B, H, T, D] (q, k L2-normalised), read after write:
    S_t = S_{t-1} + k_t beta_t (v_t - S_{t-1}^T k_t)^T, o_t = S_t^T q_t / sqrt(D), with the memory cleared
    wherever the segment id `seg` [B, T] changes (a new document). Chunkwise form with the WY representation
    (Yang et al. 2024), the plain-torch twin of flash-linear-attention's chunk_delta_rule."""
    B, H, T, D = k.shape
    seg = torch.zeros(B, T, dtype=torch.long, device=k.device) if seg is None else seg
    pad = (-T) % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        beta = F.pad(beta, (0, pad))
        seg = F.pad(seg, (0, pad), value=-2)  # padding is a document of its own (ids are >= 0; -1 marks "none")
    n = (T + pad) // chunk
    q, k, v = (t.float().reshape(B, H, n, chunk, -1) for t in (q * D ** -0.5, k, v))
    beta = beta.float().reshape(B, H, n, chunk, 1)
    sc = seg.reshape(B, n, chunk)
    same = (sc[..., :, None] == sc[..., None, :])[:, None]  # [B, 1, n, C, C]: rows of one document
    strict = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril(-1)
    a = torch.eye(chunk, device=k.device) + (beta * (k @ k.transpose(-1, -2))).masked_fill(~(strict & same), 0)
    w = torch.linalg.solve_triangular(a, beta * k, upper=False, unitriangular=True)
    u = torch.linalg.solve_triangular(a, beta * v, upper=False, unitriangular=True)
    prev_last = torch.cat([torch.full_like(sc[:, :1, :1], -1), sc[:, :-1, -1:]], dim=1)  # [B, n, 1]
    carried = (sc == prev_last).float()[:, None, :, :, None]  # rows continuing the document of the last chunk
    in_last = (sc == sc[..., -1:]).float()[:, None, :, :, None]  # rows of the chunk's last document
    incl = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
    s = torch.zeros(B, H, D, v.size(-1), device=k.device)
    out = []
    for c in range(n):
        u_c = u[:, :, c] - (w[:, :, c] @ s) * carried[:, :, c]
        qk = (q[:, :, c] @ k[:, :, c].transpose(-1, -2)).masked_fill(~(incl & same[:, :, c]), 0)
        out.append((q[:, :, c] @ s) * carried[:, :, c] + qk @ u_c)
        s = s * carried[:, :, c, -1:] + (k[:, :, c] * in_last[:, :, c]).transpose(-1, -2) @ u_c
    return torch.cat(out, dim=2)[:, :, :T]


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, seg: Segments | None, impl: str) -> Tensor:
    """The delta rule on [B, H, T, D] with the memory cleared at each segment start: flash-linear-attention's
    chunk_delta_rule over the flattened rows (`cu` = segment starts, row starts included) when impl is fla, else
    the torch form above (segment ids)."""
    if impl == "fla":  # FLA asserts one non-fp32 dtype for q, k, v: bf16 in, bf16 out
        B, H, T, D = q.shape
        cu = seg.cu if seg is not None else torch.arange(0, B * T + 1, T, device=q.device, dtype=torch.int32)
        flat = [t.transpose(1, 2).reshape(1, B * T, H, -1).to(torch.bfloat16) for t in (q, k, v)]
        bf = beta.transpose(1, 2).reshape(1, B * T, H).to(torch.bfloat16)
        o, _ = torch.ops.pgcrawl.fla_delta_rule(*flat, bf, cu.long())
        return o.view(B, T, H, -1).transpose(1, 2).to(v.dtype)
    return delta_rule_chunked(q, k, v, beta, None if seg is None else seg.ids).to(v.dtype)


# FLA's public chunk_delta_rule is @torch.compiler.disable'd (a graph break: fatal under fullgraph=True), and its
# autograd Function would run inside our graph as an opaque Python object. So two custom ops call FLA's own kernels,
# chunk_delta_rule_fwd and chunk_delta_rule_bwd (fla/ops/delta_rule/chunk.py), on bf16 inputs, and autograd links them:
# no torch.autograd inside an op (a nested backward on CUDA's autograd device thread deadlocks) and no helper thread.
# The forward keeps FLA's WY matrix A for the backward, as FLA's own Function does. Keyword arguments only: the
# signatures grew chunk_indices / chunk_size over versions, with these names unchanged since fla 0.2.1.

def _fla_kernels():
    from fla.ops.delta_rule.chunk import chunk_delta_rule_bwd, chunk_delta_rule_fwd

    return chunk_delta_rule_fwd, chunk_delta_rule_bwd


def _on_device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("pgcrawl::fla_delta_rule", mutates_args=())
def _fla_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, cu: Tensor) -> tuple[Tensor, Tensor]:
    """(o, A) of the delta rule over [1, N, H, D] bf16 inputs with sequences at `cu` (int64 offsets)."""
    fwd, _ = _fla_kernels()
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    with _on_device(q):
        o, a, _ = fwd(q=q, k=k, v=v, beta=beta, scale=q.size(-1) ** -0.5, initial_state=None, output_final_state=False,
                      cu_seqlens=cu)
    return o.contiguous(), a.contiguous()


@_fla_delta_rule.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, cu: Tensor) -> tuple[Tensor, Tensor]:
    return v.new_empty(v.shape), k.new_empty(*k.shape[:3], 64)  # A: [1, N, H, chunk size 64]


@torch.library.custom_op("pgcrawl::fla_delta_rule_backward", mutates_args=())
def _fla_delta_rule_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, a: Tensor, cu: Tensor
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _, bwd = _fla_kernels()
    q, k, v, beta, a, do = (t.contiguous() for t in (q, k, v, beta, a, do))  # saved as given: FLA reads dense rows
    with _on_device(q):
        dq, dk, dv, db, _ = bwd(q=q, k=k, v=v, beta=beta, A=a, scale=q.size(-1) ** -0.5, initial_state=None, do=do,
                                dht=None, cu_seqlens=cu)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), db.contiguous()


@_fla_delta_rule_backward.register_fake
def _(do: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, a: Tensor, cu: Tensor
      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), beta.new_empty(beta.shape)


def _fla_setup(ctx, inputs, output):
    q, k, v, beta, cu = inputs
    ctx.save_for_backward(q, k, v, beta, output[1], cu)
    ctx.mark_non_differentiable(output[1])


def _fla_backward(ctx, do, da):
    q, k, v, beta, a, cu = ctx.saved_tensors
    return (*torch.ops.pgcrawl.fla_delta_rule_backward(do, q, k, v, beta, a, cu), None)


torch.library.register_autograd("pgcrawl::fla_delta_rule", _fla_backward, setup_context=_fla_setup)


class DeltaMemory(nn.Module):
    """A delta-rule memory carried from one crawler loop to the next (ClownCar_II, DELTA_NET_HEADS). ClownCar_II
    handed loop k the state after *all* of loop k-1's positions, so position t read later tokens (its own
    authors retired it). Here loop k replays loop k-1's writes interleaved with its own, position by position:
    at position t the memory holds writes from positions <= t of both loops only, so it stays causal."""

    def __init__(self, cfg: Config, impl: str = "torch"):
        super().__init__()
        d, self.h, self.impl = cfg.model_dim, cfg.delta_net_heads, impl
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        for m in (self.q_proj, self.k_proj, self.v_proj):  # orthogonal, as ClownCar_II's init loop makes them
            nn.init.orthogonal_(m.weight, gain=1.0)
        nn.init.zeros_(self.o_proj.weight)  # ClownCar_II's is orthogonal but frozen; ours trains from "no memory"
        self.b_proj = nn.Linear(d, self.h)
        self.q_conv, self.k_conv, self.v_conv = (nn.Conv1d(d, d, 4, groups=d, bias=False) for _ in range(3))

    def _heads(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        return x.view(B, T, self.h, d // self.h).transpose(1, 2)

    def _conv(self, conv: nn.Conv1d, x: Tensor, keep: Tensor | None) -> Tensor:
        """Causal depthwise conv (t sees t-3..t) that never reaches back across a document start."""
        if keep is None:
            return conv(F.pad(x.transpose(1, 2), (3, 0))).transpose(1, 2)
        w = conv.weight[:, 0].to(x.dtype)  # [d, 4]: w[:, 3 - j] multiplies x_{t-j}
        return sum(F.pad(x, (0, 0, j, 0))[:, :x.size(1)] * keep[..., j:j + 1].to(x.dtype) * w[:, 3 - j]
                   for j in range(4))  # keep[..., j]: t-j lies in t's document

    def forward(self, x: Tensor, prev: tuple | None, seg: Segments | None) -> tuple[Tensor, tuple]:
        ids = seg.ids if seg is not None else None
        keep = same_doc_back(ids, 4) if ids is not None else None
        q = F.normalize(self._heads(self._conv(self.q_conv, self.q_proj(x), keep)), dim=-1)
        k = F.normalize(self._heads(self._conv(self.k_conv, self.k_proj(x), keep)), dim=-1)
        v = self._heads(self._conv(self.v_conv, self.v_proj(x), keep))
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)
        writes = (k, v, beta)
        if prev is None:
            o = delta_rule(q, k, v, beta, seg, self.impl)
        else:  # positions 2t: loop k-1's write at t; 2t+1: this loop's write at t, then its read
            inter = [torch.stack([a, b], dim=3).flatten(2, 3) for a, b in zip(prev, writes)]
            seg2 = None if seg is None else Segments(ids.repeat_interleave(2, dim=1), 2 * seg.cu, 2 * seg.max_len)
            q2 = torch.stack([torch.zeros_like(q), q], dim=3).flatten(2, 3)
            o = delta_rule(q2, *inter, seg2, self.impl)[:, :, 1::2]
        B, H, T, D = o.shape
        return rms_norm(x + self.o_proj(o.transpose(1, 2).reshape(B, T, H * D).to(x.dtype))), writes


def same_doc_back(ids: Tensor, n: int) -> Tensor:
    """[B, T, n] float: 1 where position t-j (j < n) lies in t's segment (0 before the row start)."""
    cols = [torch.ones_like(ids, dtype=torch.bool)]
    for j in range(1, n):
        prev = F.pad(ids, (j, 0), value=-1)[:, :ids.size(1)]
        cols.append(prev == ids)
    return torch.stack(cols, dim=-1).float()


@dataclass(frozen=True)
class App:
    """One block application in execution order: which block, which crawler loop (-1 = flat), whether its
    output is kept for a U-Net skip, and which skip (if any) it reads first."""
    block: int
    loop: int
    push: bool
    pop: int  # index into the skip weights, -1 = none


def application_plan(cfg: Config, loops: int) -> tuple[App, ...]:
    """The execution order at a crawler depth. UNET_SKIPS=flat pairs flat encoder and decoder blocks around the
    crawler (Ouroboros); virtual splits the whole application list in half, so crawler passes are skip
    sources and sinks too (#1736's looped layers 3-5)."""
    enc, dec = list(range(cfg.n_encoder)), list(range(cfg.n_encoder + cfg.n_crawler, cfg.n_blocks))
    crawl = [(cfg.n_encoder + c, k) for k in range(loops) for c in range(cfg.n_crawler)]
    order = [(b, -1) for b in enc] + crawl + [(b, -1) for b in dec]
    if cfg.unet_skips == "flat":
        pushes = [True] * len(enc) + [False] * (len(order) - len(enc))
        first_pop = len(enc) + len(crawl)
    else:
        half = len(order) // 2
        pushes, first_pop = [i < half for i in range(len(order))], half
    n_pop = min(n_skip_weights(cfg), sum(pushes))
    return tuple(App(b, k, pushes[i], i - first_pop if 0 <= i - first_pop < n_pop else -1)
                 for i, (b, k) in enumerate(order))


def n_skip_weights(cfg: Config) -> int:
    """Skip connections at full crawler depth (the widest plan)."""
    if cfg.unet_skips == "flat":
        return min(cfg.n_encoder, cfg.n_decoder)
    n = cfg.n_encoder + cfg.n_crawler * cfg.n_loops + cfg.n_decoder if cfg.use_crawler else cfg.num_layers
    return min(n // 2, n - n // 2)


def round_init_through_bf16(model: nn.Module) -> None:
    """#1855 and the crawler seeds build the model, cast it to bf16 and restore fp32 masters: every initial value
    is bf16-rounded, and the embedding tables (tok_emb; the seeds' bigram and value embeddings too) stay bf16
    master weights, so their AdamW state is bf16 as well (#1855's float checkpoint: 135,417,533 bytes)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16) if id(p) in tables else p.data.to(torch.bfloat16).float()


class GPT(nn.Module):
    def __init__(self, cfg: Config, kernels: Kernels = Kernels()):
        super().__init__()
        self.cfg, d = cfg, cfg.model_dim
        self.kernels, backend = kernels, kernels.attn  # chosen by the runtime for its device
        small = 1 / math.sqrt(2 * cfg.n_blocks)  # Ouroboros's scale for projections into the residual stream
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        self.bigram = BigramHash(cfg.bigram_vocab_size, cfg.bigram_dim, d, cfg.bos_id, small) \
            if cfg.bigram_vocab_size else None
        self.smear = SmearGate(cfg) if cfg.smear_gate != "off" else None
        self.ve = ValueEmbedding(cfg, small) if cfg.ve_dim else None
        self.blocks = nn.ModuleList(Block(cfg, i, cfg.n_encoder <= i < cfg.n_encoder + cfg.n_crawler, backend)
                                    for i in range(cfg.n_blocks))
        n_skips = n_skip_weights(cfg)
        self.skip_weights = nn.Parameter(torch.ones(n_skips, d))
        self.skip_gates = nn.Parameter(torch.zeros(n_skips, d)) if cfg.skip_gates else None
        # Flow instructions: one shared projection, a zero-initialised up-projection per loop.
        self.inst_proj = nn.Linear(d, cfg.inst_dim, bias=False) if (cfg.n_crawler and cfg.inst_dim) else None
        self.inst_up = nn.ModuleList(nn.Linear(cfg.inst_dim, d, bias=False) for _ in range(cfg.n_loops)) \
            if self.inst_proj is not None else None
        if self.inst_proj is not None:
            nn.init.normal_(self.inst_proj.weight, std=0.01)  # the crawler seeds' loop_inst_proj
        for m in self.inst_up or []:
            nn.init.zeros_(m.weight)
        self.delta = DeltaMemory(cfg, kernels.delta) if (cfg.n_crawler and cfg.delta_net_heads) else None
        # Asymmetric logit softcaps (#1923): start equal to LOGIT_SOFTCAP, frozen in training, trained by TTT.
        self.softcaps = nn.Parameter(torch.full((2,), cfg.logit_softcap)) if cfg.asym_logit_rescale else None
        self.rope_scales = tuple(float(s) for s in cfg.loop_rope_scales[:cfg.n_loops])
        self.active_loops = cfg.n_loops if cfg.crawler_start_frac == 0 else min(cfg.n_loops, 1)
        self.plans = {n: application_plan(cfg, n) for n in range(cfg.n_loops + 1)}  # static: nothing built in forward
        self.act_dtype: torch.dtype | None = None  # bf16 on CUDA: the residual stream stays in it (build_model)
        round_init_through_bf16(self)

    def set_active_loops(self, n: int) -> None:
        self.active_loops = n

    def plan(self) -> tuple[App, ...]:
        return self.plans[self.active_loops]

    def embed(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids).float()  # a bf16 table (round_init_through_bf16); the stream starts in fp32
        if self.bigram is not None:
            x = x + self.bigram(ids)
        if self.smear is not None and self.smear.mode == "window":
            x = self.smear(x, ids)
        x = rms_norm(x)
        if self.smear is not None and self.smear.mode == "channel":
            x = self.smear(x, ids)
        return x

    def skip(self, x: Tensor, s: Tensor, j: int) -> Tensor:
        w = self.skip_weights[j].to(x.dtype) * s
        if self.skip_gates is None:
            return x + w
        g = torch.sigmoid(self.skip_gates[j].to(x.dtype))  # #1736: a learned blend of stream and skip
        return g * x + (1 - g) * w

    def hidden(self, ids: Tensor, seg: Segments | None = None, lora: BatchedLoRA | None = None) -> Tensor:
        """The final-normed hidden state (the tied head's input)."""
        cfg, T = self.cfg, ids.size(1)
        x = self.embed(ids)
        x = x0 = x if self.act_dtype is None else x.to(self.act_dtype)
        ve = self.ve(ids) if self.ve is not None else None
        ropes = {1.0: rope_tables(T, cfg.rope_dims, cfg.rope_base, 1.0, ids.device, x.dtype)}
        for s in self.rope_scales:
            ropes.setdefault(s, rope_tables(T, cfg.rope_dims, cfg.rope_base, s, ids.device, x.dtype))
        mask = self.kernels.attn.prepare(seg, T)  # once per forward, shared by every block application
        plan, skips, lanes, writes = self.plan(), [], None, None
        for slot, app in enumerate(plan):
            blk = self.blocks[app.block]
            if app.loop >= 0 and app.block == cfg.n_encoder and self.inst_proj is not None:
                x = x + self.inst_up[app.loop](self.inst_proj(x))
            if blk.parallel and lanes is None:  # the two lanes start equal; a skip then enters lane 0 only
                lanes = (x, x)
            if app.pop >= 0:
                if lanes is None:
                    x = self.skip(x, skips.pop(), app.pop)
                else:
                    lanes = (self.skip(lanes[0], skips.pop(), app.pop), lanes[1])
            rope = ropes[self.rope_scales[app.loop] if app.loop >= 0 else 1.0]
            vb = self.ve.for_block(ve, app.block) if self.ve is not None else None
            if blk.parallel:
                lanes = blk.forward_lanes(lanes, x0, rope, mask, vb, lora, f"{slot}.")
            else:
                x = blk(x, x0, rope, mask, vb, lora, f"{slot}.")
            if app.loop >= 0 and app.block == cfg.n_encoder + cfg.n_crawler - 1 and self.delta is not None:
                x, writes = self.delta(x, writes, seg)
            if app.push:
                skips.append(x)
        if lanes is not None:
            x = 0.5 * (lanes[0] + lanes[1])
        return rms_norm(x)

    def logits(self, ids: Tensor, seg: Segments | None = None, lora: BatchedLoRA | None = None) -> Tensor:
        """Softcapped logits (fp32)."""
        h = self.hidden(ids, seg, lora)
        return softcap(plus(F.linear(h, self.tok_emb.weight.to(h.dtype)), lora_delta(lora, "head", h)).float(),
                       *self.caps())

    def caps(self) -> tuple:
        c = self.cfg.logit_softcap
        return (c, c) if self.softcaps is None else (self.softcaps[0], self.softcaps[1])

    def forward(self, ids: Tensor, targets: Tensor, seg: Segments | None = None,
                lora: BatchedLoRA | None = None, last: int = 0, read: Tensor | None = None):
        """Per-token negative log-likelihood (fp32), the loss computed inside the (compiled) graph: [B, T], or
        [B, last] for the last `last` positions only (the sliding window scores 64 of 3,072; the head and the loss
        of the other positions would be wasted work). With `read` (token ids, shaped like targets) also the
        model's log-probability of those ids, from the same logits: (nll, log_q), for the n-gram tilt."""
        h = self.hidden(ids, seg, lora)
        if last:
            h, targets = h[:, -last:], targets[:, -last:]
            read = None if read is None else read[:, -last:]
        z = plus(F.linear(h, self.tok_emb.weight.to(h.dtype)), lora_delta(lora, "head", h))
        impl = self.kernels.ce if self.softcaps is None else "off"  # the fused op takes one cap
        nll = softcapped_ce(z, targets, *self.caps(), impl=impl)
        if read is None:
            return nll
        zc = softcap(z.gather(-1, torch.stack([targets, read], -1)).float(), *self.caps())
        return nll, zc[..., 1] - (nll + zc[..., 0])  # log q = z_read - logsumexp, logsumexp = nll + z_target


def softcap(z: Tensor, pos, neg) -> Tensor:
    """c * tanh(z / c), with separate caps for positive and negative logits when they differ (#1923)."""
    if isinstance(pos, float) and pos == neg:
        return pos * torch.tanh(z / pos)
    return torch.where(z > 0, pos * torch.tanh(z / pos), neg * torch.tanh(z / neg))


def softcapped_ce(z: Tensor, targets: Tensor, pos, neg, impl: str) -> Tensor:
    """Per-token CE of softcapped logits. impl: triton or torch run the fused op below (the same maths, Triton's
    kernel or torch's ops); off is the plain softcap + F.cross_entropy."""
    if impl != "off":
        loss, _ = torch.ops.pgcrawl.softcap_ce(z.reshape(-1, z.size(-1)), targets.reshape(-1), float(pos), impl)
        return loss.view(targets.shape)
    zc = softcap(z.float(), pos, neg)
    return F.cross_entropy(zc.reshape(-1, zc.size(-1)), targets.reshape(-1), reduction="none").view(targets.shape)


# Fused softcapped cross-entropy (#1787): one pass over the logits computes the softcap, log-sum-exp and the
# target's log-probability; the backward recomputes them from the raw logits instead of storing fp32 copies.
# z = 2c*sigmoid(2x/c) equals c*tanh(x/c) + c, a constant shift that cancels in the softmax. A torch custom op, so
# torch.compile(fullgraph=True) sees one opaque node; `impl` picks Triton's kernels or the same maths in torch.

@torch.library.custom_op("pgcrawl::softcap_ce", mutates_args=())
def _softcap_ce(x: Tensor, y: Tensor, cap: float, impl: str) -> tuple[Tensor, Tensor]:
    """Per-row softcapped CE and the row's log-sum-exp (kept for the backward)."""
    return _fused_ce_forward(x, y, cap) if impl == "triton" else _torch_ce_forward(x, y, cap)


@_softcap_ce.register_fake
def _(x: Tensor, y: Tensor, cap: float, impl: str) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.size(0), dtype=torch.float32), x.new_empty(x.size(0), dtype=torch.float32)


@torch.library.custom_op("pgcrawl::softcap_ce_backward", mutates_args=())
def _softcap_ce_backward(g: Tensor, x: Tensor, y: Tensor, lse: Tensor, cap: float, impl: str) -> Tensor:
    return _fused_ce_backward(g, x, y, lse, cap) if impl == "triton" else _torch_ce_backward(g, x, y, lse, cap)


@_softcap_ce_backward.register_fake
def _(g: Tensor, x: Tensor, y: Tensor, lse: Tensor, cap: float, impl: str) -> Tensor:
    return x.new_empty(x.shape)


def _ce_setup(ctx, inputs, output):
    x, y, cap, impl = inputs
    ctx.save_for_backward(x, y, output[1])
    ctx.cap, ctx.impl = cap, impl


def _ce_backward(ctx, g_loss, g_lse):
    x, y, lse = ctx.saved_tensors
    return torch.ops.pgcrawl.softcap_ce_backward(g_loss, x, y, lse, ctx.cap, ctx.impl), None, None, None


torch.library.register_autograd("pgcrawl::softcap_ce", _ce_backward, setup_context=_ce_setup)


def _torch_ce_forward(x: Tensor, y: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    z = 2 * cap * torch.sigmoid(2 * x.float() / cap)
    lse = torch.logsumexp(z, dim=-1)
    return lse - z.gather(1, y[:, None].long())[:, 0], lse


def _torch_ce_backward(g: Tensor, x: Tensor, y: Tensor, lse: Tensor, cap: float) -> Tensor:
    sg = torch.sigmoid(2 * x.float() / cap)
    dz = torch.exp(2 * cap * sg - lse[:, None])
    dz.scatter_add_(1, y[:, None].long(), -torch.ones_like(lse[:, None]))
    return (g.float()[:, None] * dz * 4 * sg * (1 - sg)).to(x.dtype).contiguous()


def fused_ce_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


_CE_KERNELS: dict = {}


def _ce_kernels():
    """Build the Triton kernels on first use (TRITON_INTERPRET=1 runs them on the CPU for tests). Row offsets are
    64-bit: row * stride passes 2^31 at 262,144 rows of an 8,192-token vocabulary (a sliding batch is 261,120)."""
    if _CE_KERNELS:
        return _CE_KERNELS["fwd"], _CE_KERNELS["bwd"]
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(x_ptr, y_ptr, loss_ptr, lse_ptr, V, stride, cap, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        target = tl.load(y_ptr + row)
        m = -float("inf")
        s = 0.0
        zt = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < V
            x = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
            z = 2 * cap * tl.sigmoid(2 * x / cap)
            z = tl.where(ok, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
            zt += tl.sum(tl.where(cols == target, z, 0.0), 0)
        lse = m + tl.log(s)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, lse - zt)

    @triton.jit
    def bwd(g_ptr, x_ptr, y_ptr, lse_ptr, dx_ptr, V, stride, cap, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(y_ptr + row)
        g = tl.load(g_ptr + row)
        lse = tl.load(lse_ptr + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < V
            x = tl.load(x_ptr + row * stride + cols, mask=ok, other=0.0).to(tl.float32)
            sg = tl.sigmoid(2 * x / cap)
            p = tl.exp(2 * cap * sg - lse)
            dz = g * (p - tl.where(cols == target, 1.0, 0.0))
            tl.store(dx_ptr + row * stride + cols, (dz * 4 * sg * (1 - sg)).to(dx_ptr.dtype.element_ty), mask=ok)

    _CE_KERNELS.update(fwd=fwd, bwd=bwd)
    return fwd, bwd


def _fused_ce_forward(x: Tensor, y: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    fwd, _ = _ce_kernels()
    x = x.contiguous()
    loss = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
    lse = torch.empty_like(loss)
    fwd[(x.size(0),)](x, y.contiguous(), loss, lse, x.size(1), x.stride(0), cap, BLOCK=1024)
    return loss, lse


def _fused_ce_backward(g: Tensor, x: Tensor, y: Tensor, lse: Tensor, cap: float) -> Tensor:
    _, bwd = _ce_kernels()
    x = x.contiguous()
    dx = torch.empty_like(x)
    bwd[(x.size(0),)](g.contiguous().float(), x, y.contiguous(), lse, dx, x.size(1), x.stride(0), cap, BLOCK=1024)
    return dx


# =============================================================================================
# Optimizers: Muon (matrices, sharded across ranks) + AdamW (embeddings, scalars)
# =============================================================================================

# Polar-Express Newton-Schulz coefficients, one (a, b, c) per iteration (#1344 -> #1787); more iterations
# repeat the last, converged polynomial. The classic quintic (modded-nanogpt) repeats one tuple.
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
QUINTIC = (3.4445, -4.7750, 2.0315)


def ns_coefficients(kind: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    if kind == "quintic":
        return (QUINTIC,) * steps
    return tuple(POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps))


def newton_schulz(g: Tensor, coeffs: tuple) -> Tensor:
    """Approximately orthogonalise each matrix of a [n, rows, cols] stack (bf16 on CUDA)."""
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.transpose(-1, -2)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in coeffs:
        m = x @ x.transpose(-1, -2)
        x = a * x + (b * m + c * m @ m) @ x
    return (x.transpose(-1, -2) if tall else x).to(g.dtype)


class Comm:
    """Collectives for sharded updates: NCCL's reduce-scatter / all-gather, emulated with all-reduce on gloo."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.nccl = dist.is_initialized() and dist.get_backend() == "nccl"

    def reduce_scatter_avg(self, full: Tensor) -> tuple[Tensor, typing.Any]:
        """This rank's slice (dim 0) of the rank-average of `full`, and a handle to wait on (or None)."""
        n = full.size(0) // self.rt.world_size
        if self.rt.world_size == 1:
            return full, None
        if self.nccl:
            out = torch.empty_like(full[:n])
            COLLECTIVES[0] += 1
            return out, dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.AVG, async_op=True)
        all_reduce_(full)
        return full[self.rt.rank * n:(self.rt.rank + 1) * n] / self.rt.world_size, None

    def all_gather(self, shard: Tensor) -> tuple[Tensor, typing.Any]:
        """Every rank's `shard` stacked along dim 0, and a handle to wait on before reading it (None: ready)."""
        if self.rt.world_size == 1:
            return shard, None
        out = torch.empty((shard.size(0) * self.rt.world_size, *shard.shape[1:]), dtype=shard.dtype, device=shard.device)
        COLLECTIVES[0] += 1
        if self.nccl:
            return out, dist.all_gather_into_tensor(out, shard, async_op=True)
        return out, dist.all_gather(list(out.chunk(self.rt.world_size)), shard, async_op=True)


class Muon(torch.optim.Optimizer):
    """Momentum (Nesterov) + Newton-Schulz orthogonalised update. Matrices of one shape are stacked into a bank
    padded to a multiple of the world size (#1736); each rank reduce-scatters the bank's gradients, keeps
    momentum for and orthogonalises only its slice, and all-gathers the updates: one reduce-scatter and one
    all-gather per bank instead of an all-reduce of the gradients plus one of the updates. The updates are gathered in
    the momentum's dtype (bf16 by default, as #1855) and asynchronously: bank i's gather runs while bank i+1's
    Newton-Schulz computes, and bank i's parameters change only after that. Rows are normalised before
    Newton-Schulz (MuonEq-R, #1736); update scale sqrt(max(1, rows/cols))."""

    def __init__(self, params, lr: float, momentum: float, wd: float, coeffs: tuple, row_norm: bool, rt: Runtime,
                 ns=newton_schulz, momentum_dtype: torch.dtype = torch.float32):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, wd=wd))
        self.coeffs, self.row_norm, self.rt, self.ns, self.comm = coeffs, row_norm, rt, ns, Comm(rt)
        self.momentum_dtype = momentum_dtype
        banks: dict[tuple, list] = collections.defaultdict(list)
        for p in self.param_groups[0]["params"]:
            banks[tuple(p.shape)].append(p)
        self.banks = list(banks.values())

    def launch(self) -> list:
        """Start the gradient reduce-scatter of every bank (asynchronous on NCCL)."""
        out = []
        for bank in self.banks:
            n = -(-len(bank) // self.rt.world_size) * self.rt.world_size
            full = torch.zeros((n, *bank[0].shape), dtype=torch.float32, device=bank[0].device)
            for i, p in enumerate(bank):
                if p.grad is not None:
                    full[i].copy_(p.grad)
            out.append(self.comm.reduce_scatter_avg(full))
        return out

    @torch.no_grad()
    def step(self, closure=None, launched: list | None = None):
        group = self.param_groups[0]
        lr, mom, pending = group["lr"], group["momentum"], None
        for bank, (shard, work) in zip(self.banks, launched if launched is not None else self.launch()):
            if work is not None:
                work.wait()
            state = self.state[bank[0]]
            g = shard.to(self.momentum_dtype)  # #1855: bf16 gradient and momentum; the seeds: fp32
            buf = state.setdefault("momentum", torch.zeros_like(g))
            buf.mul_(mom).add_(g)
            u = g.add(buf, alpha=mom)
            if self.row_norm:
                u = u / u.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(u.dtype)
            u = self.ns(u, self.coeffs) * max(1.0, u.size(-2) / u.size(-1)) ** 0.5
            if pending is not None:  # the previous bank's gather ran during this bank's Newton-Schulz
                self.apply(*pending, lr, group["wd"])
            pending = (bank, *self.comm.all_gather(u))
        if pending is not None:
            self.apply(*pending, lr, group["wd"])

    @staticmethod
    def apply(bank: list[nn.Parameter], full: Tensor, work, lr: float, wd: float) -> None:
        if work is not None:
            work.wait()
        for i, p in enumerate(bank):
            p.mul_(1 - lr * wd)
            p.add_(full[i].to(p.dtype), alpha=-lr)


# Optimizer routing table (first match wins): name pattern -> group. Everything 2-D that is left is a Muon
# matrix; everything else (vectors, gates, mixes, lane lambdas, convolutions) is a scalar for AdamW.
PARAM_ROUTES = (
    ("tok_emb.weight", "embed"), ("bigram.embed.weight", "embed"), ("ve.embed.weight", "embed"),
    ("softcaps", "frozen"),  # asymmetric softcaps (#1923) learn only during TTT
    ("skip_*", "scalar"), ("*.resid_mix", "scalar"), ("*.lane_*", "scalar"), ("*.attn.gate.weight", "scalar"),
    ("smear.*", "scalar"), ("*conv.weight", "scalar"),
)


def param_route(name: str, p: nn.Parameter) -> str:
    import fnmatch

    for pattern, group in PARAM_ROUTES:
        if fnmatch.fnmatchcase(name, pattern):
            return group
    return "matrix" if p.ndim == 2 else "scalar"


@dataclass
class Optimizers:
    muon: Muon
    adam: torch.optim.AdamW
    params: list[nn.Parameter]  # everything trained (all but the frozen group)
    adam_params: list[nn.Parameter]

    def all(self) -> list[torch.optim.Optimizer]:
        return [self.muon, self.adam]


def build_optimizers(model: nn.Module, cfg: Config, rt: Runtime) -> Optimizers:
    groups: dict[str, list] = {"embed": [], "matrix": [], "scalar": [], "frozen": []}
    for name, p in model.named_parameters():
        groups[param_route(name, p)].append(p)
    for p in groups["frozen"]:
        p.requires_grad_(False)
    ns = torch.compile(newton_schulz, backend=rt.compile_backend) if rt.compile else newton_schulz
    muon = Muon(groups["matrix"], cfg.matrix_lr, cfg.muon_momentum, cfg.muon_wd,
                ns_coefficients(cfg.muon_ns, cfg.muon_backend_steps), cfg.muon_row_norm, rt, ns,
                {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.muon_momentum_dtype])
    adam = torch.optim.AdamW(
        [dict(params=groups["embed"], lr=cfg.embed_lr, weight_decay=cfg.embed_wd),
         dict(params=groups["scalar"], lr=cfg.scalar_lr, weight_decay=cfg.adam_wd)],
        betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=rt.device.type == "cuda")
    for opt in (muon, adam):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    trained = groups["matrix"] + groups["embed"] + groups["scalar"]
    return Optimizers(muon, adam, trained, groups["embed"] + groups["scalar"])


# =============================================================================================
# Training: one pure schedule of the (injected) clock, a step, a loop that only calls these
# =============================================================================================


@dataclass(frozen=True)
class StepPlan:
    """What the next optimizer step does. Decided by `plan_step` from the clock alone, so every rank (which
    shares rank 0's clock) makes the same decision, and tests drive it with a fake clock."""
    lr_scale: float
    momentum: float
    loops: int
    seq_len: int
    seq_changed_at: int  # step at which the current context length began (its LR re-warmup runs from there)


def warmdown_fraction(cfg: Config, mean_step_ms: float, budget_ms: float) -> float:
    """WARMDOWN_FRAC directly, or WARMDOWN_ITERS converted to a budget fraction using the measured step time
    (so an iteration-based setting still fires under a wallclock cap, cf. PR #1681). Not capped at 1: a warmdown
    longer than the run starts below the peak LR, as the crawler seeds' `remaining_ms / warmdown_ms` does."""
    if cfg.warmdown_iters:
        if budget_ms > 0:
            return cfg.warmdown_iters * mean_step_ms / budget_ms if mean_step_ms else 0.0
        return cfg.warmdown_iters / cfg.iterations
    return cfg.warmdown_frac


def lr_multiplier(frac: float, warmdown: float, min_lr: float) -> float:
    """The LR scale at `frac`, the fraction of the budget used when the step starts (time under a wallclock
    cap, steps otherwise): 1, then over the last `warmdown` of the budget a linear decay towards 0 clamped at the
    MIN_LR floor (#1787, #1855: max((1 - frac) / warmdown, min_lr); the floor is reached at 1 - min_lr * warmdown
    and held). With MIN_LR=0 it is the crawler seeds' linear decay to 0."""
    if warmdown <= 0 or 1 - frac >= warmdown:
        return 1.0
    return max((1 - frac) / warmdown, min_lr)


def stage_seq_len(cfg: Config, progress: float) -> int:
    """The context length of the first stage whose fraction has not passed (#2014)."""
    return next((s for s, until in cfg.seq_stages if progress <= until), cfg.seq_stages[-1][0])


def plan_step(cfg: Config, step: int, elapsed_ms: float, next_step_ms: float, budget_ms: float,
              prev: StepPlan | None = None) -> StepPlan | None:
    """The plan for step `step` (0-based), or None when training stops before it. Under a wallclock budget a
    step starts only if it will end inside the budget by the honest estimate `next_step_ms`; the LR follows the
    fraction of the budget used (#1855), so it holds its floor over the last steps."""
    if step >= cfg.iterations:
        return None
    if budget_ms:
        if step and elapsed_ms + next_step_ms > budget_ms:
            return None
        progress, mean_ms = elapsed_ms / budget_ms, elapsed_ms / step if step else 0.0
    else:
        progress, mean_ms = step / cfg.iterations, 0.0
    scale = lr_multiplier(progress, warmdown_fraction(cfg, mean_ms, budget_ms), cfg.min_lr)
    seq = stage_seq_len(cfg, progress)
    changed = prev.seq_changed_at if (prev is not None and prev.seq_len == seq) else (step if prev else 0)
    if changed and cfg.seq_change_warmup_steps:  # a new context length re-warms the LR (#2014)
        scale *= min(1.0, (step - changed + 1) / cfg.seq_change_warmup_steps)
    mom_t = min(1.0, step / cfg.muon_momentum_warmup_steps) if cfg.muon_momentum_warmup_steps else 1.0
    momentum = (1 - mom_t) * cfg.muon_momentum_warmup_start + mom_t * cfg.muon_momentum
    loops = cfg.n_loops if progress >= cfg.crawler_start_frac else min(cfg.n_loops, 1)
    return StepPlan(scale, momentum, loops, seq, changed)


class StepClock:
    """Training time in ms, paused around validation. The estimate of the next step is the longest of the
    last WINDOW steps, not the mean since the start: on a noisy machine a spike that happened recently is
    assumed to happen again, so the run never starts a step it cannot finish."""

    WINDOW = 32

    def __init__(self, now: typing.Callable[[], float]):
        self.now, self.base_ms, self.t0 = now, 0.0, now()
        self.last_ms, self.recent = 0.0, collections.deque(maxlen=self.WINDOW)

    def elapsed_ms(self) -> float:
        return self.base_ms + 1000 * (self.now() - self.t0)

    def observe(self, elapsed_ms: float) -> None:
        """Record the step that ended at `elapsed_ms` (rank 0's clock, shared by all ranks)."""
        self.recent.append(elapsed_ms - self.last_ms)
        self.last_ms = elapsed_ms

    def next_step_ms(self) -> float:
        return max(self.recent, default=0.0)

    def pause(self) -> None:
        self.base_ms = self.elapsed_ms()

    def resume(self) -> None:
        self.t0 = self.now()


@dataclass
class TrainResult:
    steps: int
    train_ms: float
    stopped_early: bool
    final_state: dict[str, Tensor]
    peak_mem_mib: float


class WeightAverager:
    """EMA of the weights in fp32, every step (on by default: EMA_DECAY 0.9965, constant from step 1, #1855), or
    SWA snapshots every SWA_EVERY steps once the LR has decayed below SWA_LR_SCALE (Ouroboros lineage)."""

    SWA_LR_SCALE = 0.2

    def __init__(self, model: nn.Module, cfg: Config):
        self.cfg = cfg
        use_ema = not cfg.skip_ema and not cfg.swa_every
        self.live = list(model.state_dict().values())  # views of the parameters: updated in place by the optimizers
        self.ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()} if use_ema else None
        self.swa, self.swa_n = None, 0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, lr_scale: float, log: Logger) -> None:
        if self.ema is not None:
            decay = self.cfg.ema_decay  # constant from the first step, as #1855 and ClownCar: no decay warmup
            live = [v if v.dtype == torch.float32 else v.float() for v in self.live]
            torch._foreach_lerp_(list(self.ema.values()), live, 1 - decay)  # one fused launch, not ~150
        if self.cfg.swa_every and lr_scale < self.SWA_LR_SCALE and step % self.cfg.swa_every == 0:
            if self.swa is None:
                log(f"swa:start step:{step}")
                self.swa = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in model.state_dict().items()}
            for k, v in model.state_dict().items():
                self.swa[k] += v.float()
            self.swa_n += 1

    def current(self, model: nn.Module) -> dict[str, Tensor]:
        """The weights a stop now would save (the EMA, else the live weights), without a copy."""
        return self.ema if self.ema is not None else model.state_dict()

    def final(self, model: nn.Module, host: bool = False) -> dict[str, Tensor]:
        """The averaged weights in the model's dtypes, as new tensors; `host`: built on the host, with nothing
        allocated on the device (a failed step may have left it out of memory)."""
        live, n = model.state_dict(), max(self.swa_n, 1)
        src = self.swa if self.swa_n else self.ema if self.ema is not None else live
        out = {}
        for k in live:
            t = src[k].detach().to(HOST) if host else src[k].detach()
            out[k] = (t / n if n > 1 else t).to(live[k].dtype).clone()
        return out


def train_step(model: nn.Module, micro: list[Micro], opts: Optimizers, cfg: Config, rt: Runtime) -> Tensor:
    """One optimizer step; returns this rank's mean loss as a tensor (no host sync here). Gradients are clipped
    on each rank before averaging, as #1736/#1855 do; that lets the Muon banks' reduce-scatter run while AdamW's
    small all-reduce and step proceed."""
    total = torch.zeros((), device=rt.device)
    for m in micro:
        with rt.autocast():
            loss = model(m.x, m.y, m.seg).mean() / len(micro)
        loss.backward()
        total += loss.detach()
    if cfg.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(opts.params, cfg.grad_clip_norm)
    launched = opts.muon.launch()
    sync_grads_(opts.adam_params, rt)
    opts.adam.step()
    opts.muon.step(launched=launched)
    for opt in opts.all():
        opt.zero_grad(set_to_none=False)
    return total


def apply_plan(model: GPT, opts: Optimizers, plan: StepPlan, prev: StepPlan | None, step: int, log: Logger) -> None:
    for opt in opts.all():
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * plan.lr_scale
    for g in opts.muon.param_groups:
        g["momentum"] = plan.momentum
    if plan.loops != model.active_loops:
        model.set_active_loops(plan.loops)
        log(f"crawler:loops_enabled loops:{plan.loops} step:{step}")
    if prev is not None and plan.seq_len != prev.seq_len:
        log(f"growth_stage:seq_len:{plan.seq_len} step:{step}")


def compile_shapes(cfg: Config) -> list[tuple[int, int]]:
    """Every (context length, crawler depth) the schedule can reach (#2014 traces them all before the clock)."""
    out = []
    for i, (seq, until) in enumerate(cfg.seq_stages):
        start = cfg.seq_stages[i - 1][1] if i else 0.0
        for loops in {min(cfg.n_loops, 1) if start < cfg.crawler_start_frac else cfg.n_loops,
                      cfg.n_loops if until >= cfg.crawler_start_frac else min(cfg.n_loops, 1)}:
            out.append((seq, loops))
    return sorted(set(out))


def prime_compile(model: GPT, compiled: nn.Module, opts: Optimizers, data: TrainData, cfg: Config, rt: Runtime,
                  log: Logger) -> None:
    """Run WARMUP_STEPS real steps on training data (never validation) spread over every (context, depth)
    shape the schedule reaches, and the validation forward at each depth it runs at (on random tokens), so
    torch.compile is warm before the clock starts; then restore weights and optimizer state, so the timed run
    starts from the initial state."""
    if not rt.compile or not cfg.warmup_steps:
        return
    saved = ({k: v.detach().clone() for k, v in model.state_dict().items()},
             [copy.deepcopy(o.state_dict()) for o in opts.all()])
    start_loops, loader, shapes = model.active_loops, data.loader(prefetch=0), compile_shapes(cfg)
    for s in range(cfg.warmup_steps):
        seq, loops = shapes[s * len(shapes) // cfg.warmup_steps]
        model.set_active_loops(loops)
        train_step(compiled, loader.next_batch(seq), opts, cfg, rt)
        log(f"warmup_step:{s + 1}/{cfg.warmup_steps} seq_len:{seq} loops:{loops}")
    depths = sorted({loops for _, loops in shapes} if cfg.val_loss_every else {cfg.n_loops})
    rows = max(1, cfg.val_batch_tokens // rt.world_size // cfg.eval_seq_len)
    x = random_rows(cfg, rows, cfg.eval_seq_len, torch.Generator().manual_seed(cfg.seed))
    seg = make_segments(x[:, :-1], cfg.bos_id, cfg.eval_seq_len, rt.device) if cfg.doc_masked_attn else None
    x = to_device(x, rt.device)
    model.eval()
    for loops in depths:
        model.set_active_loops(loops)
        with torch.no_grad(), rt.autocast():
            compiled(x[:, :-1], x[:, 1:], seg)
    model.train()
    model.set_active_loops(start_loops)
    model.load_state_dict(saved[0])
    for o, st in zip(opts.all(), saved[1]):
        o.load_state_dict(st)
    log(f"compile:graphs:{compiled_graph_count()} shapes:{shapes} validation_depths:{depths}")


def compiled_graph_count() -> int:
    """Graphs torch.compile has produced in this process so far (dynamo's own counter; reset() keeps it)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Diverged(RuntimeError):
    """The training loss stopped being finite; nothing after this step is worth paying for."""


def peer_store(rt: Runtime, prefix: str):
    """The launcher's key-value store (torchrun's agent holds it, so it outlives any rank), or None for one process.
    Used where no collective can be trusted: naming a lost rank, choosing the rank that saves."""
    if rt.world_size == 1 or "MASTER_ADDR" not in os.environ:
        return None
    import datetime

    try:
        return dist.PrefixStore(prefix + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=datetime.timedelta(seconds=30)))
    except Exception:  # noqa: BLE001 - without a store the run still stops; rank 0 alone then saves
        return None


def repack_hint(path: Path | None) -> str:
    """What to do with saved weights: every message that says a checkpoint was saved ends with it."""
    return f"calibrate, pack and evaluate them with SKIP_TRAIN=1 INIT_MODEL_PATH={path} and the same variables"


class Rescue:
    """What an interrupted run leaves. SIGTERM / SIGINT (a preemption, `timeout`, Ctrl-C, torchrun stopping the
    group) set a flag that the next step's shared all-reduce hands to every rank, so all ranks stop after the same
    step; a failure inside the loop (a peer gone, a bug) stops it too. Every rank holds the same averaged weights, so
    any rank can save them: the first rank to claim the save in the launcher's store writes them (rank 0 alone when
    there is no store), so losing rank 0 loses nothing. A rank blocked in a collective (a lost peer) never reaches the
    next step: a watcher thread, woken by the signal itself (a wakeup fd), waits GRACE_S for the loop, then writes
    this rank's latest complete host snapshot of the averaged weights and exits; a loop stalled for half the
    collective timeout writes it too (NCCL's watchdog ends the process at the timeout without a signal). Snapshots
    are taken every SNAPSHOT_EVERY steps by an asynchronous copy (~7 ms of copy engine per 144 MB) into one of two
    host buffers, so the last complete one is never the one being written. One lock orders the savers: a save
    and the exit after it are never interleaved with another save, nor with a snapshot into the buffer it reads."""
    GRACE_S = 10.0
    SNAPSHOT_EVERY = 100
    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self, path: Path | None = None, cfg: Config | None = None, rt: Runtime | None = None,
                 log: Logger | None = None, streams=None):
        self.path, self.cfg, self.rt, self.log = path, cfg, rt, log
        self.signal, self.handled, self.lock = 0, threading.Event(), threading.Lock()
        self.buffers: list[dict[str, Tensor]] = []
        # (buffer, step) of the last copy known complete, and (buffer, step, event) of the copy in flight
        self.complete: tuple[dict[str, Tensor], int] | None = None
        self.pending: tuple[dict[str, Tensor], int, typing.Any] | None = None
        self.stream, self.previous, self.claimed = None, {}, None
        self.staging: dict[str, Tensor] | None = None
        # the CUDA stream API (torch.cuda, or a stand-in in the tests): copies run on a side stream
        self.streams = streams if streams is not None else (torch.cuda if rt is not None and rt.device.type == "cuda"
                                                              else None)
        self.store = peer_store(rt, "rescue") if rt is not None else None

    def install(self) -> None:
        import signal

        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self.previous[sig] = signal.signal(sig, lambda num, frame: setattr(self, "signal", self.signal or num))
        r, w = os.pipe()
        os.set_blocking(w, False)
        self.previous["wakeup"] = signal.set_wakeup_fd(w)
        threading.Thread(target=self._watch, args=(r,), daemon=True, name="rescue").start()

    def uninstall(self) -> None:
        """The handlers as they were (a failure that ends the run)."""
        import signal

        self.handled.set()
        for sig, handler in self.previous.items():
            if sig == "wakeup":
                signal.set_wakeup_fd(handler)
            else:
                signal.signal(sig, handler)
        self.previous = {}

    def after_training(self, left: str) -> None:
        """The loop is over and its weights are saved (or could not be): a signal from now on, or one that came since
        the loop ended, raises Stopped, which unwinds calibration, packing or evaluation (removing any temporary
        file) and says what the run left (`left`); a second signal stops the process at once."""
        import signal

        pending = self.signal
        self.uninstall()
        if threading.current_thread() is not threading.main_thread():
            return

        def late(num, frame):
            for name in self.SIGNALS:
                signal.signal(getattr(signal, name), signal.SIG_DFL)
            raise Stopped(num, left)

        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), late)
        if pending:
            late(pending, None)

    def note(self, msg: str) -> None:
        """Rank 0 logs; another rank (saving because rank 0 is gone) writes to stderr, which torchrun passes on."""
        if self.rt is None or self.rt.is_main:
            (self.log or print)(msg)
        else:
            Logger._stderr(f"[rank {self.rt.rank}] {msg}")

    def claim(self) -> bool:
        """Whether this rank saves: the first rank to ask, through the launcher's store (every rank holds the same
        averaged weights); without a store, rank 0. Asked once per process: a rank that saved a stalled loop's
        snapshot also saves the weights of the stop that follows."""
        if self.claimed is None:
            self.claimed = self.rt is None or self.rt.world_size == 1 or self.rt.is_main
            if self.store is not None and self.rt.world_size > 1:
                try:
                    self.claimed = self.store.add("claims", 1) == 1
                except Exception:  # noqa: BLE001 - the store is gone too: rank 0 saves
                    pass
        return self.claimed

    def save(self, state: dict[str, Tensor], step: int) -> str:
        """Save the averaged weights of `step` if this rank claims the save (the caller holds the lock); what to tell
        the user either way. Whatever stops the write (a full disk, a broken pickle) is told, not raised."""
        if self.path is None or not self.claim():
            return f"another rank saves the averaged weights to {self.path}"
        try:
            save_checkpoint(self.path, self.cfg, state, lambda m: None)
        except Exception as err:  # noqa: BLE001 - the caller still has to exit with the stop's status
            return f"saving the averaged weights of step {step} failed: {err}"
        return f"the averaged weights of step {step} are in {self.path} (saved by rank {self.rt.rank if self.rt else 0})"

    def finish(self, e: "Interrupted") -> typing.NoReturn:
        """The training loop stopped early on every rank that can still run it: save, say how to re-pack, exit at once
        with the stop's status (no teardown: a lost peer would hang the process group's shutdown)."""
        self.handled.set()
        try:
            with self.lock:
                where = f"{self.save(e.state, e.steps)}; {repack_hint(self.path)}" if e.state is not None else \
                    "no training step was taken, so nothing was saved (the folder stays free for a new run)"
                if e.trace:  # a failure, not a signal: its traceback, for whoever fixes it
                    Logger._stderr(e.trace)
                self.note(f"ERROR: {e} after {e.steps} steps: {where}")
        finally:
            os._exit(e.code)

    def latest(self) -> tuple[dict[str, Tensor], int] | None:
        """The last snapshot known complete (the caller holds the lock, or is the loop's own thread)."""
        if self.pending is not None and (self.pending[2] is None or self.pending[2].query()):
            self.complete, self.pending = self.pending[:2], None
        return self.complete

    def save_snapshot(self, why: str) -> None:
        """From a thread beside a blocked loop: save the last complete snapshot and say so (the caller decides
        whether the process goes on)."""
        with self.lock:
            snap = self.latest()
            if snap is None:
                self.note(f"{why}; no host snapshot was taken yet, so nothing was saved")
                return
            self.note(f"{why}; {self.save(*snap)}; {repack_hint(self.path)}")

    def _watch(self, fd: int) -> None:
        sig = os.read(fd, 1)[0]
        if self.handled.wait(self.GRACE_S):
            return  # the training loop took the stop itself
        try:
            self.save_snapshot(f"interrupted by signal {sig} while blocked (a rank stopped answering?)")
        finally:
            os._exit(128 + sig)

    def snapshot(self, state: dict[str, Tensor], step: int) -> None:
        """Every rank: copy the averaged weights to (pinned) host memory every SNAPSHOT_EVERY steps, into the buffer
        that does not hold the last complete snapshot. On CUDA the main stream copies them to a device staging buffer
        (~0.1 ms for 144 MB) and a side stream copies that to the host: the main stream never waits for the host
        copy, and the next update of the weights cannot tear it. Skipped while a copy is in flight or a save reads
        the snapshot."""
        if self.rt is None or not step or step % self.SNAPSHOT_EVERY or not self.lock.acquire(blocking=False):
            return
        try:
            self.latest()
            if self.pending is not None:
                return  # the last copy is still in flight
            if not self.buffers:
                pin = self.rt.device.type == "cuda"
                self.buffers = [{k: torch.empty(v.shape, dtype=v.dtype, pin_memory=pin) for k, v in state.items()}
                                for _ in range(2)]
            host = self.buffers[1] if self.complete is not None and self.complete[0] is self.buffers[0] else \
                self.buffers[0]
            keys, event = list(state), None
            if self.streams is None:
                torch._foreach_copy_([host[k] for k in keys], [state[k] for k in keys])
            else:
                if self.staging is None:
                    self.staging = {k: torch.empty_like(v) for k, v in state.items()}
                torch._foreach_copy_([self.staging[k] for k in keys], [state[k] for k in keys])
                self.stream = self.stream or self.streams.Stream(self.rt.device)
                self.stream.wait_stream(self.streams.current_stream())  # the side stream waits for the staging copy
                with self.streams.stream(self.stream):
                    torch._foreach_copy_([host[k] for k in keys], [self.staging[k] for k in keys], non_blocking=True)
                    event = self.streams.Event()
                    event.record(self.stream)
            self.pending = (host, step, event)
        finally:
            self.lock.release()


class Stopped(BaseException):
    """A signal after training: not an Exception, so that no handler of one takes it for a failure on the way up to
    main, which logs what the run left and exits 128 + the signal."""

    def __init__(self, signum: int, left: str):
        super().__init__(f"stopped by signal {signum} after training: {left}")
        self.signum = signum


class Interrupted(RuntimeError):
    """Training stopped early (a signal, a rank that stopped answering, a failure) after `steps` steps; `state` holds
    the averaged weights to save, `code` the exit status, `trace` a failure's traceback (empty for a signal)."""

    def __init__(self, why: str, steps: int, state: dict[str, Tensor] | None, code: int, trace: str = ""):
        super().__init__(why)
        self.steps, self.state, self.code, self.trace = steps, state, code, trace


class Heartbeat:
    """Names the rank that stopped answering, through the launcher's key-value store (no collective can be trusted
    then). Every BEAT_EVERY steps a rank writes its step (one small TCP write). When the loop stalls, each rank that
    can still run Python writes how many collectives it has entered (COLLECTIVES): the ranks blocked in a
    collective have entered one more than a rank hung elsewhere, and a dead rank writes nothing."""
    BEAT_EVERY = 10
    ANSWER_S = 3.0  # how long describe() waits for the other ranks' stall reports

    def __init__(self, rt: Runtime):
        self.rt, self.last, self.step = rt, time.monotonic(), 0
        self.store = peer_store(rt, "heartbeat")  # without one a stall still fails the run, unnamed

    def beat(self, step: int) -> None:
        self.last, self.step = time.monotonic(), step
        if self.store is not None and step % self.BEAT_EVERY == 0:
            try:
                self.store.set(f"step{self.rt.rank}", str(step))
            except Exception:  # noqa: BLE001 - the store is gone (the launcher with it): train on, unnamed
                self.store = None

    def _read(self, key: str) -> int | None:
        try:
            return int(self.store.get(key)) if self.store.check([key]) else None
        except Exception:  # noqa: BLE001 - the store itself is gone
            return None

    def describe(self) -> str:
        if self.store is None:
            return "a rank stopped answering"
        try:
            self.store.set(f"stall{self.rt.rank}", str(COLLECTIVES[0]))
        except Exception:  # noqa: BLE001
            return "a rank stopped answering (the launcher's store is gone too)"
        world, t0 = range(self.rt.world_size), time.monotonic()
        while time.monotonic() - t0 < self.ANSWER_S:
            entered = {r: self._read(f"stall{r}") for r in world}
            if all(v is not None for v in entered.values()):
                break
            time.sleep(0.1)
        top = max(v for v in entered.values() if v is not None)
        late = [r for r in world if entered[r] is None or entered[r] < top]
        if not late:
            return f"no rank is behind (all entered {top} collectives); the interconnect or the launcher failed"
        steps = {r: self._read(f"step{r}") for r in late}
        return ", ".join(f"rank {r} stopped answering (" + ("no stall report" if entered[r] is None else
                         f"{top - entered[r]} collective(s) behind") + f", last reported step {steps[r]})"
                         for r in late) + f"; rank {self.rt.rank} is at step {self.step}"

    @contextlib.contextmanager
    def watching(self, timeout_s: float, log: Logger, stalled: typing.Callable[[str], None] | None = None):
        """While training, a host thread names the late rank once no step has finished for half the collective
        timeout, and hands that to `stalled` (Rescue.save_snapshot): under NCCL the watchdog ends the process at the
        timeout itself, before any Python error or signal."""
        done = threading.Event()

        def watch() -> None:
            while not done.wait(1.0):
                if time.monotonic() - self.last > max(timeout_s / 2, 2.0):
                    why = f"no training step finished for {time.monotonic() - self.last:.0f}s: {self.describe()}"
                    log(f"WARNING: {why}")
                    if stalled is not None:
                        stalled(why)
                    return

        self.last = time.monotonic()
        if self.rt.world_size > 1:
            threading.Thread(target=watch, daemon=True, name="heartbeat").start()
        try:
            yield
        finally:
            done.set()


def shared_state(clock: StepClock, rt: Runtime, loss: Tensor | None, stop: Rescue) -> tuple[float, float, bool]:
    """Rank 0's training time, the mean of the last step's loss (not finite on any rank: not finite) and whether any
    rank was asked to stop, on every rank, from one all-reduce: the step's one host sync, so stop and LR decisions
    agree. Rank 0 reads its clock after its previous step has finished on the device."""
    if rt.is_main:
        sync(rt.device)
    t = torch.tensor([clock.elapsed_ms() if rt.is_main else 0.0, 0.0, float(stop.signal != 0)], dtype=torch.float64)
    t = to_device(t, rt.device)
    if loss is not None:
        t[1] = loss.detach().double()
    elapsed, loss_sum, stopping = all_reduce_(t).tolist()
    return elapsed, loss_sum / rt.world_size, stopping > 0


def log_train_step(cfg: Config, step: int, loss: float, ms: float, plan: StepPlan, log: Logger) -> None:
    log(f"step:{step}/{cfg.iterations} train_loss:{loss:.4f} train_time:{ms:.0f}ms step_avg:{ms / step:.2f}ms "
        f"tok_s:{cfg.train_batch_tokens * step / max(ms / 1000, 1e-9):.0f} lr_scale:{plan.lr_scale:.4f}")


def validate_and_log(compiled: nn.Module, val: ValidationData, cfg: Config, rt: Runtime, step: int, train_ms: float,
                     log: Logger) -> None:
    vl, vb = evaluate_val(compiled, val, cfg, rt)
    log(f"step:{step}/{cfg.iterations} val_loss:{vl:.4f} val_bpb:{vb:.4f} train_time:{train_ms:.0f}ms "
        f"step_avg:{train_ms / max(step, 1):.2f}ms")


def train(model: GPT, compiled: nn.Module, cfg: Config, rt: Runtime, data: TrainData, val: ValidationData,
          log: Logger, now: typing.Callable[[], float] = time.perf_counter, stop: Rescue | None = None,
          reserve_s: float = 0.0) -> TrainResult:
    """The training loop, inside MAX_WALLCLOCK_SECONDS minus GPTQ_RESERVE_SECONDS minus `reserve_s` (the projected
    calibration). Time is read only through `now`, so tests inject a clock. The next step's batch is read, cut into
    segments and copied while the current step runs on the device. Any failure inside the loop stops it as an
    Interrupted that carries the averaged weights (a diverged loss excepted: those weights are lost), built on the
    host once the failure's frames (and the activations they hold) are let go."""
    budget_ms = cfg.train_budget_ms - 1000 * reserve_s if cfg.train_budget_ms else 0.0
    opts = build_optimizers(model, cfg, rt)
    prime_compile(model, compiled, opts, data, cfg, rt, log)
    graphs, stop, heartbeat = compiled_graph_count(), stop or Rescue(), Heartbeat(rt)
    loader, averager = data.loader(), WeightAverager(model, cfg)
    reset_peak_memory(rt.device)
    sync(rt.device)
    clock, step, prev, loss, failure = StepClock(now), 0, None, None, None
    batch = loader.next_batch(stage_seq_len(cfg, 0.0))
    with heartbeat.watching(cfg.dist_timeout_seconds, log, stop.save_snapshot):
        while True:
            try:
                heartbeat.beat(step)
                elapsed, mean_loss, stopping = shared_state(clock, rt, loss, stop)
                if loss is not None and not math.isfinite(mean_loss):
                    raise Diverged(f"training diverged at step {step}: train_loss is {mean_loss} (the weights are "
                                   "lost); lower MATRIX_LR / EMBED_LR / SCALAR_LR, or set GRAD_CLIP_NORM")
                if step and (step <= 10 or step % cfg.train_log_every == 0):
                    log_train_step(cfg, step, mean_loss, elapsed, prev, log)
                if stopping:
                    stop.handled.set()
                    log(f"stopping: signal received; train_time:{elapsed:.0f}ms step:{step}/{cfg.iterations}")
                    raise Interrupted(f"interrupted by signal {stop.signal or 'on another rank'}", step,
                                      averager.final(model) if step else None, 128 + (stop.signal or 15))
                if step:
                    clock.observe(elapsed)
                plan = plan_step(cfg, step, elapsed, clock.next_step_ms(), budget_ms, prev)
                if plan is None:
                    break
                apply_plan(model, opts, plan, prev, step, log)
                if batch[0].seg is not None and batch[0].seg.max_len != plan.seq_len:
                    batch = loader.recut(batch, plan.seq_len)
                loss = train_step(compiled, batch, opts, cfg, rt)
                batch = loader.next_batch(plan.seq_len)
                step, prev = step + 1, plan
                averager.update(model, step, plan.lr_scale, log)
                stop.snapshot(averager.current(model), step)
                if cfg.val_loss_every and step % cfg.val_loss_every == 0:
                    clock.pause()
                    validate_and_log(compiled, val, cfg, rt, step, clock.base_ms, log)
                    clock.resume()
            except (Diverged, Interrupted):
                raise
            except Exception as e:  # noqa: BLE001 - whatever stops the loop, the weights so far are saved
                failure = (e, "".join(traceback.format_exception(e)))
                e.__traceback__ = None
                break
    if failure is not None:
        raise training_failure(*failure, step, heartbeat, averager, model, rt)
    if compiled_graph_count() > graphs:
        log(f"WARNING: compile:graphs grew from {graphs} to {compiled_graph_count()} during training: a shape was "
            "not primed and compiled on the training clock")
    return finish_training(model, averager, cfg, rt, step, elapsed, log)


def training_failure(e: Exception, trace: str, step: int, heartbeat: Heartbeat, averager: WeightAverager,
                     model: GPT, rt: Runtime) -> Interrupted:
    """The Interrupted a failed step leaves: a lost peer named (exit 3), else the failure itself (exit 1), carrying
    the averaged weights built on the host after the device's cache is emptied (an out-of-memory step leaves no room
    for a device copy)."""
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    first = (str(e).splitlines() or [""])[0][:160]
    collective = collective_failure(e, rt)
    why = f"{heartbeat.describe()} ({type(e).__name__}: {first})" if collective else \
        f"training failed at step {step}: {type(e).__name__}: {first}"
    return Interrupted(why, step, averager.final(model, host=True) if step else None, 3 if collective else 1, trace)


def collective_failure(e: Exception, rt: Runtime) -> bool:
    """Whether a failure is a collective's (a peer gone or hung: name it), not this rank's own (an out-of-memory, a
    bug: its traceback). torch raises DistError for NCCL and timeouts; gloo, a RuntimeError naming itself."""
    return rt.world_size > 1 and (isinstance(e, dist.DistError) or any(
        k in str(e).lower() for k in ("gloo", "nccl", "c10d", "connection closed by peer", "timed out", "timeout")))


def finish_training(model: GPT, averager: WeightAverager, cfg: Config, rt: Runtime, steps: int, train_ms: float,
                    log: Logger) -> TrainResult:
    """Load the averaged weights and log the stop reason (the final validation runs after the checkpoint is
    saved: a failure there must not lose the training)."""
    final_state = averager.final(model)
    model.load_state_dict(final_state)
    model.set_active_loops(cfg.n_loops)
    stopped = steps < cfg.iterations
    if stopped:
        log(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{steps}/{cfg.iterations}")
    log(f"ranks_in_sync:{int(ranks_in_sync(model, rt))}")
    peak = peak_memory_mib(rt.device)
    log(f"peak_memory_mib:{peak:.0f}")
    return TrainResult(steps, train_ms, stopped, final_state, peak)


@torch.no_grad()
def ranks_in_sync(model: nn.Module, rt: Runtime) -> bool:
    """Every rank must hold bit-identical weights; compare per-tensor checksums across ranks."""
    if rt.world_size == 1:
        return True
    h = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for p in model.parameters()])
    lo, hi = all_reduce_(h.clone(), dist.ReduceOp.MIN), all_reduce_(h.clone(), dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


# =============================================================================================
# Calibration and quantization: loop-aware GPTQ (#1283), int7 embedding GPTQ, LQER, AWQ-lite
# =============================================================================================

PASSTHROUGH_NUMEL = 65_536  # smaller float tensors (gains, scales, mixes, lane lambdas) stay fp16 (#1855)
GPTQ_BLOCK = 128
AWQ_GROUP = 64  # AWQ-lite promotes 64 contiguous input columns to int8 (#1908)
CLIP_SEARCH = torch.linspace(0.5, 1.0, 11)


@dataclass(frozen=True)
class QuantPlan:
    """How one state-dict entry is stored: method gptq | rtn | int8row | fp16, its bits, clip (k std devs per
    row; 0 = search the clip), GPTQ damping, and whether LQER / AWQ-lite may pick it."""
    method: str
    bits: int
    clip_sigmas: float = 0.0
    damp: float = 0.01
    extras: bool = False  # a candidate for LQER and AWQ-lite


FP16 = QuantPlan("fp16", 16)


def _gptq(cfg: Config, bits: int, sigmas: float, damp: float) -> QuantPlan:
    return QuantPlan("rtn" if cfg.skip_gptq else "gptq", bits, sigmas, damp or cfg.gptq_damp, True)


# One ordered table of (name pattern, plan); first match wins.
GATE_PATTERN = "*.attn.gate.weight"
QUANT_RULES: tuple[tuple[str, typing.Callable[[Config], QuantPlan]], ...] = (
    (GATE_PATTERN, lambda c: QuantPlan("int8row", 8) if c.gated_attn_quant_gate else FP16),
    ("tok_emb.weight", lambda c: _gptq(c, c.embed_bits, c.embed_clip_sigmas, c.gptq_damp_embed)),
    ("blocks.*.mlp.*", lambda c: _gptq(c, 6, c.mlp_clip_sigmas, c.gptq_damp_mlp)),
    ("blocks.*.attn.*", lambda c: _gptq(c, 6, c.attn_clip_sigmas, c.gptq_damp)),
    ("delta.*_proj.weight", lambda c: _gptq(c, 6, c.attn_clip_sigmas, c.gptq_damp)),
    ("*", lambda c: QuantPlan("int8row", 8)),  # large tensors without a Hessian (bigram/value embeddings)
)


def is_crawler(name: str, cfg: Config) -> bool:
    parts = name.split(".")
    return name.startswith("delta.") or (parts[0] == "blocks" and cfg.n_encoder <= int(parts[1]) < cfg.n_encoder + cfg.n_crawler)


def quant_plan(name: str, t: Tensor, cfg: Config) -> QuantPlan:
    """The first rule matching `name`. Block linears and the embedding follow their rule at any size; any
    other tensor of at most PASSTHROUGH_NUMEL entries (gains, mixes, lane lambdas, skip weights) stays fp16."""
    import fnmatch

    pattern, rule = next((p, r) for p, r in QUANT_RULES if fnmatch.fnmatchcase(name, p))
    if t.ndim != 2 or (pattern == "*" and t.numel() <= PASSTHROUGH_NUMEL):
        return FP16
    if cfg.crawler_quant_int8 and pattern != GATE_PATTERN and is_crawler(name, cfg):  # ClownCar #990: int8 rows
        return QuantPlan("int8row", 8)
    return rule(cfg)


@dataclass
class QTensor:
    """Symmetric per-row integer weights, W ~= q * scale[:, None], plus the optional extras that rebuild it:
    AWQ-lite's promoted columns (int8 with their own row scales, #1908) and LQER's low-rank correction of the
    quantization error (int2 left factor with one scale, int4 right factor in groups of 64, #1797)."""
    q: Tensor  # int8
    scale: Tensor  # fp16 [rows]
    bits: int
    hi_start: int = -1
    hi_scale: Tensor | None = None  # fp16 [rows]
    lqer: tuple | None = None  # (qa int8 [rows, r], sa fp16 [1], qb int8 [r, cols], sb fp16 [groups])

    def dequant(self) -> Tensor:
        w = self.q.float() * self.scale.float()[:, None]
        if self.hi_start >= 0:
            s = slice(self.hi_start, self.hi_start + AWQ_GROUP)
            w[:, s] = self.q[:, s].float() * self.hi_scale.float()[:, None]
        if self.lqer is not None:
            qa, sa, qb, sb = self.lqer
            b = (qb.float().reshape(sb.numel(), -1) * sb.float()[:, None]).reshape(qb.shape)  # LQER_GROUP per scale
            w = w + (qa.float() * sa.float()) @ b
        return w


def row_scales(w: Tensor, bits: int, sigmas: float, hdiag: Tensor | None = None) -> Tensor:
    """Per-row step: k * std(row) / qmax (#1855's meaning of *_CLIP_SIGMAS; no cap at the row max), or, with
    k = 0, the clip in CLIP_SEARCH x max|w| whose rounding error (Hessian-diagonal weighted) is smallest."""
    qmax = 2 ** (bits - 1) - 1
    if sigmas > 0:
        return (sigmas * w.std(dim=1) / qmax).clamp_min(1e-10)
    absmax = w.abs().amax(dim=1).clamp_min(1e-8)
    wt = torch.ones(w.size(1), device=w.device) if hdiag is None else hdiag.clamp_min(1e-8)
    best_err, best = None, None
    for f in CLIP_SEARCH.tolist():
        s = (absmax * f / qmax)[:, None]
        err = ((w - (w / s).round().clamp(-qmax, qmax) * s) ** 2 * wt).sum(dim=1)
        if best is None:
            best_err, best = err, s[:, 0].clone()
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, s[:, 0], best)
    return best


def quantize_rtn(w: Tensor, bits: int, sigmas: float, step: float = 1.0) -> QTensor:
    w = w.float()
    qmax = 2 ** (bits - 1) - 1
    s = (row_scales(w, bits, sigmas) * step).half().float()
    return QTensor((w / s[:, None]).round().clamp(-qmax, qmax).to(torch.int8), s.half(), bits)


def quantize_int8_rows(w: Tensor) -> QTensor:
    """Symmetric int8 per row at the row's absolute maximum (attention gates, #1736; crawler int8, #990)."""
    w = w.float()
    s = (w.abs().amax(dim=1) / 127).clamp_min(1e-10).half().float()
    return QTensor((w / s[:, None]).round().clamp(-127, 127).to(torch.int8), s.half(), 8)


def quantize_gptq(w: Tensor, h: Tensor, bits: int, sigmas: float, damp: float = 0.01, step: float = 1.0,
                  hi_start: int = -1) -> QTensor:
    """GPTQ (Frantar et al. 2022): quantize columns in order of decreasing Hessian diagonal and push each
    column's rounding error onto the not-yet-quantized columns via the inverse Hessian. Columns
    [hi_start, hi_start + 64) are AWQ-lite's salient group: int8 with their own row step (#1908)."""
    w, h = w.float().clone(), h.float().clone()
    qmax = 2 ** (bits - 1) - 1
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    s = (row_scales(w, bits, sigmas, torch.diag(h)) * step).half().float()
    s_hi = (s * qmax / 127).half().float() if hi_start >= 0 else None
    steps = s[:, None].expand_as(w).clone()
    lim = torch.full((w.size(1),), float(qmax), device=w.device)
    if hi_start >= 0:
        steps[:, hi_start:hi_start + AWQ_GROUP] = s_hi[:, None]
        lim[hi_start:hi_start + AWQ_GROUP] = 127
    perm = torch.argsort(torch.diag(h), descending=True)
    w, h, steps, lim = w[:, perm], h[perm][:, perm], steps[:, perm], lim[perm]
    h += damp * torch.diag(h).mean() * torch.eye(h.size(0), device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i0 in range(0, w.size(1), GPTQ_BLOCK):
        i1 = min(i0 + GPTQ_BLOCK, w.size(1))
        wb, err = w[:, i0:i1].clone(), torch.zeros(w.size(0), i1 - i0, device=w.device)
        for j in range(i1 - i0):
            col, st, lj = wb[:, j], steps[:, i0 + j], lim[i0 + j]
            qc = (col / st).round().clamp(-lj, lj)
            q[:, i0 + j] = qc
            e = (col - qc * st) / hinv[i0 + j, i0 + j]
            wb[:, j:] -= e[:, None] * hinv[i0 + j, i0 + j:i1][None, :]
            err[:, j] = e
        w[:, i1:] -= err @ hinv[i0:i1, i1:]
    q = q[:, torch.argsort(perm)]
    return QTensor(q.to(torch.int8), s.half(), bits, hi_start, s_hi.half() if s_hi is not None else None)


def lqer_factors(err: Tensor, rank: int, group: int) -> tuple | None:
    """Rank-r SVD of a quantization error, packed as #1797's asymmetric form: left factor (singular values folded
    in) int2 in [-2, 1] with one scale, right factor int4 in [-8, 7] in groups of `group` along its rows."""
    if err.size(1) % group:
        return None
    u, sv, vh = torch.linalg.svd(err.float(), full_matrices=False)
    a, b = u[:, :rank] * sv[:rank], vh[:rank]
    sa = (a.abs().max() / 1.5).clamp_min(1e-10).half().float()
    qa = (a / sa).round().clamp(-2, 1).to(torch.int8)
    bg = b.reshape(-1, group)
    sb = (bg.abs().amax(dim=1) / 7.5).clamp_min(1e-10).half().float()
    qb = (bg / sb[:, None]).round().clamp(-8, 7).to(torch.int8).reshape(b.shape)
    return qa, sa.half().reshape(1), qb, sb.half()


def add_lqer(qm: dict[str, "QTensor | Tensor"], sd: dict[str, Tensor], names: list[str], cfg: Config,
             log: Logger) -> None:
    """LQER (#1797): the LQER_TOP_K tensors with the largest quantization error get a low-rank correction."""
    if not cfg.lqer_rank or not cfg.lqer_top_k:
        return
    errs = {n: sd[n].float() - qm[n].dequant() for n in names}
    top = sorted(errs, key=lambda n: -float(errs[n].norm()))[:cfg.lqer_top_k]
    for n in top:
        qm[n].lqer = lqer_factors(errs[n], min(cfg.lqer_rank, min(errs[n].shape)), cfg.lqer_group)
    log(f"lqer: rank:{cfg.lqer_rank} tensors:{','.join(top)}")


def awq_groups(sd: dict[str, Tensor], hs: dict[str, Tensor], counts: dict[str, int], names: list[str],
               n_groups: int) -> dict[str, int]:
    """AWQ-lite (#1908): score every 64-column group of every candidate by activation RMS x mean |weight|
    (RMS from the Hessian diagonal, sum x^2 / tokens) and promote the top AWQ_GROUPS groups overall."""
    scored = []
    for n in names:
        w = sd[n].float()  # the host copy: the Hessian's diagonal comes to it, not the weight to the device
        if w.size(1) % AWQ_GROUP:
            continue
        sal = (torch.diag(hs[n]).float().cpu() / max(counts[n], 1)).sqrt() * w.abs().mean(dim=0)
        for g, v in enumerate(sal.view(-1, AWQ_GROUP).sum(dim=1).tolist()):
            scored.append((v, n, g * AWQ_GROUP))
    return {n: start for _, n, start in sorted(scored, reverse=True)[:n_groups]}


def collect_hessians(model: GPT, batches: list[Micro], names: set[str], rt: Runtime
                     ) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Sum of X^T X (and the row count) over every call of each named linear, summed over ranks: a crawler
    linear sees every loop's input; the tied embedding's Hessian is the head input (final-norm output, #1855)."""
    hs: dict[str, Tensor] = {}
    counts: dict[str, int] = collections.Counter()
    mods = {n: m for n, m in model.named_modules() if n + ".weight" in names and isinstance(m, nn.Linear)}

    def add(name: str, x: Tensor) -> None:
        x = x.detach().float().reshape(-1, x.size(-1))
        if name not in hs:
            hs[name] = torch.zeros(x.size(1), x.size(1), device=x.device)
        hs[name].addmm_(x.T, x)
        counts[name] += x.size(0)

    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: add(n + ".weight", inp[0])) for n, m in mods.items()]
    model.eval()
    with torch.no_grad(), rt.autocast():
        for b in batches:
            h = model.hidden(b.x, b.seg)
            if "tok_emb.weight" in names:
                add("tok_emb.weight", h)
    for h in handles:
        h.remove()
    model.train()
    for n in sorted(names):  # a fixed order: every rank must issue the same collectives
        if n not in hs:
            dim = sd_in_features(model, n)
            hs[n] = torch.zeros(dim, dim, device=rt.device)
        all_reduce_(hs[n])
    c = torch.tensor([counts[n] for n in sorted(names)], dtype=torch.float64, device=rt.device)
    all_reduce_(c)
    return hs, {n: int(v) for n, v in zip(sorted(names), c.tolist())}


def sd_in_features(model: GPT, name: str) -> int:
    return model.state_dict()[name].size(1)


def quantize_one(w: Tensor, p: QuantPlan, h: Tensor | None, step: float, hi_start: int) -> QTensor:
    k = step if p.bits == 6 else 1.0
    if p.method == "int8row":
        return quantize_int8_rows(w)
    if p.method == "gptq" and h is not None:
        return quantize_gptq(w, h, p.bits, p.clip_sigmas, p.damp, k, hi_start)
    return quantize_rtn(w, p.bits, p.clip_sigmas, k)


def quantize_names(sd: dict[str, Tensor], plans: dict[str, QuantPlan], names: list[str],
                   hs: dict[str, Tensor] | None, rt: Runtime, step: float = 1.0,
                   awq: dict[str, int] | None = None) -> dict[str, QTensor]:
    """Quantize `names` (weights from the host state `sd`, Hessians on the device): rank r quantizes every
    world_size-th tensor, all of its own first, so the ranks work in parallel; then each tensor is broadcast from
    its owner, and all come to the host together at the end (a copy to the host inside the loop would make every
    rank wait for each owner in turn)."""
    awq = awq or {}
    out = {n: quantize_one(to_device(sd[n], rt.device), plans[n], hs.get(n) if hs else None, step, awq.get(n, -1))
           for i, n in enumerate(names) if i % rt.world_size == rt.rank}
    if rt.world_size > 1:
        for i, n in enumerate(names):
            shape, hi, owner = sd[n].shape, awq.get(n, -1), i % rt.world_size
            if owner != rt.rank:
                empty = lambda *s, dt=torch.float16: torch.empty(*s, dtype=dt, device=rt.device)  # noqa: E731
                out[n] = QTensor(empty(*shape, dt=torch.int8), empty(shape[0]), plans[n].bits, hi,
                                 empty(shape[0]) if hi >= 0 else None)
            for t in (out[n].q, out[n].scale) + ((out[n].hi_scale,) if hi >= 0 else ()):
                dist.broadcast(t, src=owner)
    return {n: QTensor(out[n].q.cpu(), out[n].scale.cpu(), out[n].bits, out[n].hi_start,
                       out[n].hi_scale.cpu() if out[n].hi_start >= 0 else None) for n in names}


HEADER_ALLOWANCE = 16_384  # JSON header and container bytes
FIT_ATTEMPTS = 3  # packs tried by the rate control before a run is reported over the cap
FIT_SLACK = 0.001  # aim this fraction under the cap when re-fitting from a measured pack
NATIVE_TRY = 0.02  # the entropy estimate runs ~0.5% over a ZPAQ pack at full size: pack native steps first if
#                    the estimate is within 2% of the cap (a Gaussian full-size checkpoint: +0.4%, and it fit)


def entropy_bytes(q: Tensor) -> float:
    """Order-0 entropy of integer symbols in bytes: the rate control's size model (ZPAQ/brotli land within
    ~1% of it on int6 symbols; the measured ratio corrects the rest)."""
    counts = torch.bincount(q.flatten().long() + 128)
    p = counts[counts > 0].double() / q.numel()
    return float(-(p * p.log2()).sum()) * q.numel() / 8


def int6_bytes(mats: list[tuple[Tensor, Tensor]], k: float) -> float:
    """Estimated bytes of the int6 symbols with every per-row step multiplied by k."""
    return sum(entropy_bytes((w / (s * k)[:, None]).round().clamp(-31, 31)) for w, s in mats)


def fit_step(mats: list[tuple[Tensor, Tensor]], budget: float) -> float | None:
    """Smallest common multiplier k >= 1 of the int6 per-row steps whose symbol entropy fits `budget` bytes
    (None if even 64x steps do not). Wider steps cost accuracy, so k = 1 whenever it already fits."""
    if int6_bytes(mats, 1.0) <= budget:
        return 1.0
    lo, hi = 1.0, 2.0
    while int6_bytes(mats, hi) > budget:
        lo, hi = hi, hi * 2
        if hi > 64:
            return None
    for _ in range(16):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if int6_bytes(mats, mid) <= budget else (mid, hi)
    return hi


@dataclass
class Calibration:
    """Everything quantization needs from the trained model and the training batches: the float state, each
    tensor's plan, phase-1 Hessians (summed over ranks) and the AWQ-lite choices."""
    sd: dict[str, Tensor]
    plans: dict[str, QuantPlan]
    hs: dict[str, Tensor]
    awq: dict[str, int]
    batches: list[Micro]
    seconds: float = 0.0  # time spent reading training batches (phase 1 and phase 2): inside the cap
    # the loop-aware phase-2 Hessians, collected once by the first pack (calibration_reserve projects that pass)
    hs2: dict[str, Tensor] | None = None

    def names(self, method: str | tuple[str, ...]) -> list[str]:
        methods = (method,) if isinstance(method, str) else method
        return sorted(n for n, p in self.plans.items() if p.method in methods)

    def int6_rows(self, rt: Runtime) -> list[tuple[Tensor, Tensor]]:
        """(weight, native per-row step) of every 6-bit tensor, for the rate control."""
        out = []
        for n in (n for n, p in self.plans.items() if p.bits == 6):
            w = self.sd[n].to(rt.device)
            hd = torch.diag(self.hs[n]) if n in self.hs else None
            out.append((w, row_scales(w, 6, self.plans[n].clip_sigmas, hd)))
        return out

    def fixed_bytes(self) -> float:
        """Estimated bytes of everything but the int6 symbols: other tensors, int6 row scales, the header."""
        other = sum(other_entropy_bytes(self.sd[n], p) for n, p in self.plans.items() if p.bits != 6)
        return other + sum(2 * self.sd[n].size(0) for n, p in self.plans.items() if p.bits == 6) + HEADER_ALLOWANCE


def other_entropy_bytes(t: Tensor, p: QuantPlan) -> float:
    """Estimated bytes of a tensor that is not int6: fp16 at 2 bytes, other ints by their RTN entropy."""
    if p.method == "fp16":
        return 2 * t.numel()
    return entropy_bytes(quantize_rtn(t, p.bits, p.clip_sigmas).q) + 2 * t.size(0)


def calibrate(model: GPT, cfg: Config, rt: Runtime, batches: list[Micro], log: Logger) -> Calibration:
    """Phase-1 Hessians of every GPTQ tensor from training batches (inside the training budget), and AWQ-lite's
    salient groups from them."""
    t0 = time.perf_counter()
    model.set_active_loops(cfg.n_loops)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    plans = {n: quant_plan(n, t, cfg) for n, t in sd.items()}
    gptq = sorted(n for n, p in plans.items() if p.method == "gptq")
    hs, counts = collect_hessians(model, batches, set(gptq), rt) if gptq else ({}, {})
    awq = awq_groups(sd, hs, counts, [n for n in gptq if plans[n].extras], cfg.awq_groups) if cfg.awq_groups else {}
    if awq:
        log("awq_lite: " + ",".join(f"{n}[{s}:{s + AWQ_GROUP}]" for n, s in awq.items()))
    return Calibration(sd, plans, hs, awq, batches, time.perf_counter() - t0)


def quantize_model(model: GPT, cal: Calibration, cfg: Config, rt: Runtime, log: Logger,
                   step: float = 1.0) -> dict[str, QTensor | Tensor]:
    """Quantize every tensor, int6 steps times `step`. Loop-aware: flat layers first from phase-1 Hessians,
    patch them in, then collect the crawler's Hessians through the quantized flat layers (phase 2). LQER
    corrects the worst tensors last."""
    gptq = cal.names("gptq")
    crawler = [n for n in gptq if is_crawler(n, cfg)]
    flat = [n for n in gptq if not is_crawler(n, cfg)]
    two_phase = bool(cfg.loop_aware_gptq and crawler and flat)
    log(f"gptq:phase1 hessians:{len(gptq)} samples:{cfg.gptq_cal_samples} loop_aware:{int(two_phase)} "
        f"int6_step:{step:.4f}")
    out: dict[str, QTensor | Tensor] = {n: cal.sd[n].half() for n in cal.names("fp16")}
    out |= quantize_names(cal.sd, cal.plans, cal.names(("rtn", "int8row")), None, rt, step)
    out |= quantize_names(cal.sd, cal.plans, flat if two_phase else gptq, cal.hs, rt, step, cal.awq)
    if two_phase:
        if cal.hs2 is None:  # the rate control's later packs reuse the first pack's: two passes in all, as projected
            t0 = time.perf_counter()
            cal.hs2, _ = crawler_hessians_through_quantized_flat(model, out, flat, crawler, cal.hs, cal.batches, rt, log)
            cal.seconds += time.perf_counter() - t0
        out |= quantize_names(cal.sd, cal.plans, crawler, cal.hs2, rt, step, cal.awq)
    extras = sorted(n for n in gptq + cal.names(("rtn", "int8row")) if cal.plans[n].extras and isinstance(out[n], QTensor))
    add_lqer(out, cal.sd, extras, cfg, log)
    return out


def pack_within_cap(model: GPT, cal: Calibration, cfg: Config, rt: Runtime, code_bytes: int, log: Logger) -> bytes:
    """Quantize and pack; rate control against ARTIFACT_LIMIT_BYTES. The first pack keeps the native int6 steps
    unless the entropy estimate is clearly over the cap (then it starts from the step the estimate fits); a pack
    that lands over the cap re-fits the step with the measured packed/estimated ratio and packs again. Returns
    the artifact; every rank takes the same decisions."""
    mats = cal.int6_rows(rt) if cfg.artifact_fit else []
    fixed, room, step = cal.fixed_bytes(), cfg.artifact_limit_bytes - code_bytes, 1.0
    if mats:
        est = int6_bytes(mats, 1.0) + fixed
        log(f"artifact_estimate: {est + code_bytes:.0f} bytes at native int6 steps (order-0 entropy; cap "
            f"{cfg.artifact_limit_bytes})")
        if est > room * (1 + NATIVE_TRY):
            step = fit_step(mats, room - fixed) or 1.0
    for attempt in range(1, FIT_ATTEMPTS + 1):
        qm = quantize_model(model, cal, cfg, rt, log, step)
        blob = pack_artifact(qm, cfg, cfg.compressor)
        log(f"artifact_fit: attempt {attempt} int6 step multiplier {step:.4f} (1.0 = native): "
            f"{len(blob) + code_bytes} bytes")
        if len(blob) <= room or not mats or attempt == FIT_ATTEMPTS:
            break
        ratio = len(blob) / (int6_bytes(mats, step) + fixed)
        new = fit_step(mats, room * (1 - FIT_SLACK) / ratio - fixed)
        if new is None:
            log("artifact_fit: cannot fit the cap by widening the int6 steps up to 64x")
            break
        step = max(new, step * (1 + FIT_SLACK))
    return blob


def crawler_hessians_through_quantized_flat(model: GPT, out: dict, flat: list[str], crawler: list[str],
                                            hs: dict[str, Tensor], batches: list[Micro], rt: Runtime,
                                            log: Logger) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Loop-aware phase 2 (#1283): with the flat layers temporarily replaced by their quantized weights, the
    shared crawler blocks' Hessians are collected again, so they are quantized for the activations they will
    really see. The model's own weights are restored afterwards."""
    live = model.state_dict()
    saved = {n: live[n].detach().clone() for n in flat}
    with torch.no_grad():
        for n in flat:
            live[n].copy_(out[n].dequant().to(live[n].dtype))
    hs2, counts = collect_hessians(model, batches, set(crawler), rt)
    with torch.no_grad():
        for n in flat:
            live[n].copy_(saved[n])
    shift = max((hs2[n] - hs[n]).norm().item() / hs[n].norm().clamp_min(1e-12).item() for n in crawler)
    log(f"gptq:phase2 crawler_hessians:{len(crawler)} through quantized flat layers:{len(flat)} "
        f"max_rel_change:{shift:.4f}")
    return hs2, counts


def dequantize_state(qm: dict[str, QTensor | Tensor]) -> dict[str, Tensor]:
    return {n: (v.dequant() if isinstance(v, QTensor) else v.float()) for n, v in qm.items()}


# =============================================================================================
# Packing: one self-describing artifact, and the counted code wrapper
# =============================================================================================

ARTIFACT_MAGIC, ARTIFACT_VERSION = b"PGCRAWL\x00", 2
# Per-group packing (#1855): the int codes of one role (all layers' c_q, all mlp.fc, ...) are one stream, laid
# out column by column; the rows of the roles below are first reordered so similar rows sit together.
PACK_ROLES = ("tok_emb", "attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj", "delta")
SORTED_ROLES = ("tok_emb", "attn.c_q", "mlp.fc")


class ArtifactError(ValueError):
    pass


def compress(data: bytes, codec: str) -> bytes:
    if codec == "brotli":
        import brotli
        return brotli.compress(data, quality=11, lgwin=24)
    if codec == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=22).compress(data)
    if codec == "zpaq":
        import zpaq
        return zpaq.compress(data, 5, threads=1)  # one block: the best ratio (ZPAQ max, as #1855's lrzip -z)
    import lzma
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def decompress(data: bytes, codec: str) -> bytes:
    if codec == "brotli":
        import brotli
        return brotli.decompress(data)
    if codec == "zstd":
        import zstandard
        return zstandard.ZstdDecompressor().decompress(data)
    if codec == "zpaq":
        import zpaq
        return zpaq.decompress(data)
    import lzma
    return lzma.decompress(data)


def byte_shuffle(raw: bytes, width: int) -> bytes:
    """Group the k-th byte of every element together (exponent bytes compress far better together)."""
    a = np.frombuffer(raw, dtype=np.uint8)
    return a.reshape(-1, width).T.copy().tobytes() if width > 1 else raw


def byte_unshuffle(raw: bytes, width: int) -> bytes:
    a = np.frombuffer(raw, dtype=np.uint8)
    return a.reshape(width, -1).T.copy().tobytes() if width > 1 else raw


def similarity_order(q: Tensor) -> Tensor:
    """Greedy nearest-neighbour chain over rows by L1 distance of their codes (#1855): start at row 0, always
    append the unused row closest to the last one. Neighbouring rows then share statistics for the coder."""
    x = q.float().to("cuda" if torch.cuda.is_available() else "cpu")
    n = x.size(0)
    used = torch.zeros(n, dtype=torch.bool, device=x.device)
    order, last = [0], 0
    used[0] = True
    for _ in range(n - 1):
        d = (x - x[last]).abs().sum(dim=1).masked_fill(used, float("inf"))
        last = int(d.argmin())
        order.append(last)
        used[last] = True
    return torch.tensor(order, dtype=torch.int64)


@dataclass(frozen=True)
class PackPlan:
    """How the quantized state is laid out: which tensors' codes form each role stream (in order), whose rows
    are similarity-sorted, and the codecs a role stream may use (the smaller result is kept; ZPAQ wins on
    large streams, brotli on small ones). The remainder and the row orders use brotli."""
    groups: dict[str, list[str]]
    sorted_rows: frozenset
    codec: str

    @classmethod
    def build(cls, qm: dict, compressor: str) -> "PackPlan":
        if compressor != "pergroup":
            return cls({}, frozenset(), compressor)
        groups: dict[str, list[str]] = {r: [] for r in PACK_ROLES}
        for name in sorted(qm, key=layer_order):
            role = tensor_role(name)
            if role in groups and isinstance(qm[name], QTensor) and qm[name].bits <= 7:
                groups[role].append(name)
        sorted_rows = frozenset(n for r in SORTED_ROLES for n in groups[r] if qm[n].q.size(0) <= 65535)
        return cls({r: v for r, v in groups.items() if v}, sorted_rows, "zpaq,brotli")


def tensor_role(name: str) -> str | None:
    if name == "tok_emb.weight":
        return "tok_emb"
    parts = name.split(".")
    if parts[0] == "delta":
        return "delta"
    return ".".join(parts[-3:-1]) if parts[0] == "blocks" and len(parts) >= 4 else None


def layer_order(name: str) -> tuple:
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blocks" else -1, name)


def tensor_entry(name: str, v: "QTensor | Tensor", where: dict[str, dict]) -> dict:
    """The table row of one tensor; `where` gives a grouped tensor's stream, byte offset and row-order offset."""
    if not isinstance(v, QTensor):
        return {"name": name, "kind": "f16", "shape": list(v.shape)}
    e = {"name": name, "kind": "q", "shape": list(v.q.shape), "bits": v.bits, "hi_start": v.hi_start}
    if v.lqer is not None:
        e["lqer"] = [list(v.lqer[0].shape), list(v.lqer[2].shape)]
    return e | where.get(name, {"group": None})


def remainder_parts(table: list[dict], qm: dict) -> tuple[bytes, bytes]:
    """(int8 region, fp16 region) of everything not in a role stream, in table order."""
    ints, halves = [], []
    for e in table:
        v = qm[e["name"]]
        if e["kind"] == "f16":
            halves.append(v.numpy().astype("<f2").tobytes())
            continue
        if e["group"] is None:
            ints.append(v.q.numpy().tobytes())
        halves.append(v.scale.numpy().astype("<f2").tobytes())
        if v.hi_start >= 0:
            halves.append(v.hi_scale.numpy().astype("<f2").tobytes())
        if v.lqer is not None:
            qa, sa, qb, sb = v.lqer
            ints += [qa.numpy().tobytes(), qb.numpy().tobytes()]
            halves += [sa.numpy().astype("<f2").tobytes(), sb.numpy().astype("<f2").tobytes()]
    return b"".join(ints), b"".join(halves)


def role_streams(qm: dict, plan: PackPlan) -> tuple[list[tuple[str, bytes]], bytes, dict[str, dict]]:
    """The codes of each role, each tensor (rows sorted if planned) written column by column (#1855); the row
    orders as uint16; and where each tensor sits (stream, byte offset, order offset)."""
    streams, orders, where, n_orders = [], [], {}, 0
    for g, names in plan.groups.items():
        out, at = [], 0
        for n in names:
            q = qm[n].q
            where[n] = {"group": g, "at": at, "order_at": -1}
            if n in plan.sorted_rows:
                order = similarity_order(q)
                orders.append(order)
                where[n]["order_at"], n_orders = n_orders, n_orders + order.numel()
                q = q[order]
            out.append(q.T.contiguous().numpy().tobytes())
            at += q.numel()
        streams.append((g, b"".join(out)))
    order_bytes = torch.cat(orders).numpy().astype("<u2").tobytes() if orders else b""
    return streams, order_bytes, where


def pack_artifact(qm: dict[str, QTensor | Tensor], cfg: Config, compressor: str, plan: PackPlan | None = None) -> bytes:
    """magic | u16 version | u32 crc32 | u64 length | payload. Payload: u32 header length | JSON header
    (config, pack plan, tensor table, stream lengths) | streams: one per role (its codec), the remainder
    (int8 region + byte-shuffled fp16 region) and the row orders (uint16), each compressed."""
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    plan = plan or PackPlan.build(qm, compressor)
    roles, order_bytes, where = role_streams(qm, plan)
    table = [tensor_entry(n, qm[n], where) for n in sorted(qm)]
    ints, halves = remainder_parts(table, qm)
    rest_codec = compressor if compressor != "pergroup" else "brotli"
    streams = [(g, plan.codec, raw) for g, raw in roles]
    streams += [("remainder", rest_codec, ints + byte_shuffle(halves, 2)), ("orders", "brotli", order_bytes)]
    with ThreadPoolExecutor(len(streams)) as ex:  # ZPAQ and brotli release the GIL: streams pack in parallel
        packed = [(name,) + cb for (name, _, _), cb in
                  zip(streams, ex.map(lambda s: smallest(s[2], s[1].split(",")), streams))]
    header = compress(json.dumps({
        "format": "parameter-golf flat+crawler int-quantized", "version": ARTIFACT_VERSION,
        "config": dataclasses.asdict(cfg), "tensors": table, "ints": len(ints),
        "streams": [[n, c, len(b), len(raw)] for (n, c, b), (_, _, raw) in zip(packed, streams)]},
        separators=(",", ":")).encode(), "brotli")
    payload = len(header).to_bytes(4, "little") + header + b"".join(b for _, _, b in packed)
    return (ARTIFACT_MAGIC + ARTIFACT_VERSION.to_bytes(2, "little") + zlib.crc32(payload).to_bytes(4, "little")
            + len(payload).to_bytes(8, "little") + payload)


def smallest(raw: bytes, codecs: list[str]) -> tuple[str, bytes]:
    """(codec, bytes) of the codec that compresses `raw` best."""
    return min(((c, compress(raw, c)) for c in codecs), key=lambda cb: len(cb[1]))


def read_header(blob: bytes) -> tuple[dict, bytes, int]:
    """Check the container (magic, version, length, crc32) and read its JSON header: (header, payload, offset of the
    first stream in the payload)."""
    import zlib

    if len(blob) < 22 or blob[:8] != ARTIFACT_MAGIC:
        raise ArtifactError("not a flat+crawler artifact (bad magic)")
    version = int.from_bytes(blob[8:10], "little")
    if version != ARTIFACT_VERSION:
        raise ArtifactError(f"artifact format version {version}; this script reads {ARTIFACT_VERSION}")
    crc, n, payload = int.from_bytes(blob[10:14], "little"), int.from_bytes(blob[14:22], "little"), blob[22:]
    if len(payload) != n:
        raise ArtifactError(f"artifact truncated: payload is {len(payload)} bytes, header says {n}")
    if zlib.crc32(payload) != crc:
        raise ArtifactError("artifact corrupted: checksum mismatch")
    hlen = int.from_bytes(payload[:4], "little")
    return json.loads(decompress(payload[4:4 + hlen], "brotli")), payload, 4 + hlen


def read_artifact(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read the artifact {path} ({e.strerror or e}); check ARTIFACT_PATH") from None


def artifact_config(path: str | Path) -> Config:
    """The config an artifact was packed with, from its header alone (no stream is decompressed)."""
    try:
        return config_from_dict(read_header(read_artifact(path))[0]["config"], str(path))
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None


def read_container(blob: bytes) -> tuple[dict, dict[str, bytes]]:
    """Check the container and decompress its streams (role streams in parallel threads)."""
    from concurrent.futures import ThreadPoolExecutor

    header, payload, pos = read_header(blob)
    jobs = []
    for name, codec, size, _ in header["streams"]:
        jobs.append((name, codec, payload[pos:pos + size]))
        pos += size
    with ThreadPoolExecutor(max(1, len(jobs))) as ex:
        raw = dict(zip([j[0] for j in jobs], ex.map(lambda j: decompress(j[2], j[1]), jobs)))
    return header, raw


def unpack_artifact(blob: bytes) -> tuple[Config, dict[str, QTensor | Tensor]]:
    header, raw = read_container(blob)
    table, rest = header["tensors"], raw["remainder"]
    ints = np.frombuffer(rest, dtype=np.int8, count=header["ints"])
    halves = np.frombuffer(byte_unshuffle(rest[header["ints"]:], 2), dtype="<f2")
    orders = np.frombuffer(raw["orders"], dtype="<u2").astype(np.int64)
    cur = {"i": 0, "h": 0}

    def take(kind: str, arr: np.ndarray, k: int) -> np.ndarray:
        out = arr[cur[kind]:cur[kind] + k].copy()
        cur[kind] += k
        return out

    out: dict[str, QTensor | Tensor] = {}
    for e in table:
        shape, k = e["shape"], math.prod(e["shape"])
        if e["kind"] == "f16":
            out[e["name"]] = torch.from_numpy(take("h", halves, k)).view(shape)
            continue
        if e["group"] is None:
            q = torch.from_numpy(take("i", ints, k)).view(shape)
        else:
            codes = np.frombuffer(raw[e["group"]], dtype=np.int8, count=k, offset=e["at"]).reshape(shape[1], shape[0])
            q = torch.from_numpy(codes.T.copy())
            if e["order_at"] >= 0:
                order = torch.from_numpy(orders[e["order_at"]:e["order_at"] + shape[0]].copy())
                q = torch.empty_like(q).index_copy_(0, order, q)
        scale = torch.from_numpy(take("h", halves, shape[0]))
        hi = torch.from_numpy(take("h", halves, shape[0])) if e["hi_start"] >= 0 else None
        lqer = None
        if "lqer" in e:
            (ra, ca), (rb, cb) = e["lqer"]
            qa = torch.from_numpy(take("i", ints, ra * ca)).view(ra, ca)
            qb = torch.from_numpy(take("i", ints, rb * cb)).view(rb, cb)
            lqer = (qa, torch.from_numpy(take("h", halves, 1)), qb,
                    torch.from_numpy(take("h", halves, rb * cb // header["config"]["lqer_group"])))
        out[e["name"]] = QTensor(q, scale, e["bits"], e["hi_start"], hi, lqer)
    return config_from_dict(header["config"], "the artifact"), out


def load_artifact_model(path: str | Path, rt: Runtime) -> tuple[Config, GPT]:
    """Rebuild the model from the artifact alone, as a reviewer would."""
    cfg, qm = unpack_artifact(read_artifact(path))
    return cfg, model_from_quantized(cfg, qm, rt)


def model_from_quantized(cfg: Config, qm: dict, rt: Runtime) -> GPT:
    model = GPT(cfg, rt.kernels).to(rt.device)
    load_weights(model, dequantize_state(qm))
    return model


def load_weights(model: GPT, weights: dict[str, Tensor]) -> None:
    """Put the artifact's weights back (a global SGD phase changes them), at full crawler depth."""
    sd = model.state_dict()
    model.load_state_dict({k: v.to(sd[k].dtype) for k, v in weights.items()})
    model.set_active_loops(model.cfg.n_loops)
    model.requires_grad_(True)


def minify_source(src: str) -> str:
    """Drop comments, docstrings and the type annotations nothing reads (ast round trip); behaviour is unchanged."""
    import ast

    tree = ast.parse(src)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(_Unannotated().visit(tree))


class _Unannotated:
    """What the shipped file never reads: the annotations of undecorated functions and of their local assignments
    (with `from __future__ import annotations` they are strings; 3% of the counted code), and the config fields'
    help lines. Class bodies keep their annotations (dataclass fields, read by the config loader), and so does every
    decorated function (custom_op infers its schema from them, Triton reads tl.constexpr)."""

    def visit(self, node, in_function: bool = False):
        import ast

        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.decorator_list:
                return node
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
                if arg is not None:
                    arg.annotation = None
            node.returns, in_function = None, True
        elif isinstance(node, ast.ClassDef):
            in_function = False
        elif in_function and isinstance(node, ast.AnnAssign) and node.value is not None:
            return ast.copy_location(ast.Assign([node.target], node.value), node)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_f" and len(node.args) > 1:
            node.args[1] = ast.Constant("")  # a config field's help line is for the README table only (1.2 KB)
        for name, value in ast.iter_fields(node):
            if isinstance(value, list):
                setattr(node, name, [self.visit(v, in_function) if isinstance(v, ast.AST) else v for v in value])
            elif isinstance(value, ast.AST):
                setattr(node, name, self.visit(value, in_function))
        return node


# The wrapper registers the decompressed source in linecache under a file name of its own before running it:
# @triton.jit reads its kernel's source through inspect (exec of a bare string fails with "@jit functions should
# be defined in a Python file"), and tracebacks then show real lines.
WRAPPER_HEAD = b"# -*- coding: latin-1 -*-\nimport linecache,zpaq\n_src=zpaq.decompress('"
WRAPPER_TAIL = (b"'.encode('latin-1')).decode()\n_name=__file__+':source'\n"
                b"linecache.cache[_name]=(len(_src),None,_src.splitlines(True),_name)\nexec(compile(_src,_name,'exec'))\n")
LITERAL_ESCAPES = {0: b"\\x00", 10: b"\\n", 13: b"\\r", 39: b"\\'", 92: b"\\\\"}


def counted_code(src: str) -> bytes:
    """The script as it is counted and shipped: minified, ZPAQ-compressed (level 5: 14% smaller than lzma on this
    file) and stored as a latin-1 string literal (2% escapes, where base85 costs 25%), self-extracting."""
    packed = compress(minify_source(src).encode(), "zpaq")
    return WRAPPER_HEAD + b"".join(LITERAL_ESCAPES.get(c, bytes((c,))) for c in packed) + WRAPPER_TAIL


# =============================================================================================
# Evaluation: exact BPB from the artifact, windowed scoring, phased score-first TTT, the budget plan
# =============================================================================================

ScoreHook = typing.Callable[[Tensor, Tensor], None]  # (absolute target indices, nll) of scored tokens


@dataclass
class EvalSums:
    nll: float = 0.0  # what is scored (tilted when the n-gram tilt is on)
    tokens: int = 0
    bytes: int = 0
    raw_nll: float = 0.0  # the model's own NLL of the same targets, for the log's untilted figure

    def merge(self, other: "EvalSums") -> None:
        self.nll, self.tokens, self.bytes = self.nll + other.nll, self.tokens + other.tokens, self.bytes + other.bytes
        self.raw_nll += other.raw_nll

    def reduce(self, rt: Runtime) -> "EvalSums":
        t = torch.tensor([self.nll, self.tokens, self.bytes, self.raw_nll], dtype=torch.float64, device=rt.device)
        all_reduce_(t)
        return EvalSums(float(t[0]), int(t[1]), int(t[2]), float(t[3]))

    @property
    def raw_bpb(self) -> float:
        return self.raw_nll / math.log(2) / max(self.bytes, 1)

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def bpb(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)


class Accumulator:
    """Scored NLL summed on the device (no host sync per batch); target and byte counts on the host, where the
    window plan already knows them."""

    def __init__(self, device: torch.device):
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.raw = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = self.bytes = 0

    def add(self, nll: Tensor, mask: Tensor, tgt: Tensor, token_bytes: Tensor, raw: Tensor | None = None) -> Tensor:
        """nll [B, W] on the device (raw: the untilted NLL, when it differs); mask [B, W] (host) marks the scored
        positions, tgt [B, W] their indices. Returns the mask on the device, for a caller that needs it too."""
        m = to_device(mask, nll.device)
        scored = (nll.double() * m).sum()
        self.nll += scored
        self.raw += scored if raw is None or raw is nll else (raw.double() * m).sum()  # untilted: the same sum
        self.tokens += int(mask.sum())
        self.bytes += int(token_bytes[tgt[mask]].long().sum())
        return m

    def sums(self) -> EvalSums:
        return EvalSums(float(self.nll), self.tokens, self.bytes, float(self.raw))


def sliding_windows(n_targets: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, length, score_from) per window: inputs tokens[start:start+length], targets shifted by one,
    scoring window positions >= score_from. Every target is scored exactly once, with the longest left context
    the window allows; every window is seq_len long (the last one ends at the last target), so all batches of an
    evaluation have one shape. stride == seq_len gives plain non-overlapping evaluation."""
    out, start, scored_to = [], 0, 0
    while scored_to < n_targets:
        s = min(start, max(0, n_targets - seq_len))
        length = min(seq_len, n_targets - s)
        out.append((s, length, scored_to - s))
        scored_to = s + length
        start += stride
    return out


@dataclass(frozen=True)
class WindowBatch:
    """One forward of a windowed evaluation: `rows` windows, padded with unscored copies to a fixed row count so
    that every forward has the same shape; `last` = the positions sent through the head (the stride, or 0 = the
    whole window when a window scores more than a stride or the stride is the window)."""
    windows: tuple[tuple[int, int, int], ...]
    rows: int
    last: int


def window_batches(n_targets: int, seq_len: int, stride: int, batch_rows: int, rank: int, world: int
                   ) -> list[WindowBatch]:
    """This rank's forwards of a windowed evaluation (every world-th window, batch_rows at a time)."""
    wins = sliding_windows(n_targets, seq_len, stride)[rank::world]
    L = min(seq_len, n_targets)
    out = []
    for i in range(0, len(wins), batch_rows):
        group = tuple(wins[i:i + batch_rows])
        last = stride if stride < L and all(n - frm <= stride for _, n, frm in group) else 0
        out.append(WindowBatch(group, batch_rows, last))
    return out


def window_inputs(val: ValidationData, b: WindowBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Token rows [rows, L + 1] of a batch (padding rows repeat the first window), the scored mask of the `last`
    positions and the target indices of all L positions."""
    L = b.windows[0][1]
    last = b.last or L
    starts = torch.tensor([w[0] for w in b.windows] + [b.windows[0][0]] * (b.rows - len(b.windows)))
    idx = starts[:, None] + torch.arange(L + 1)[None]
    pos = torch.arange(L - last, L)[None]
    frm = torch.tensor([w[2] for w in b.windows] + [L] * (b.rows - len(b.windows)))
    return val.tokens[idx], pos >= frm[:, None], idx[:, 1:]


def scored_nll(model: nn.Module, x: Tensor, y: Tensor, tgt: Tensor, seg, lora, last: int,
               hints: "NgramHints | None") -> tuple[Tensor, Tensor]:
    """(the model's NLL, the NLL that is scored) of one forward: the same tensor without the n-gram tilt; with
    it, the tilted NLL of the hinted positions (`tgt`: the target indices of y, on the host)."""
    if hints is None:
        nll = model(x, y, seg, lora, last).float()
        return nll, nll
    read, fired = hints.gather(tgt, y)
    nll, log_q = model(x, y, seg, lora, last, read)
    if last:
        y, read, fired = y[:, -last:], read[:, -last:], fired[:, -last:]
    return nll.float(), hints.tilt(nll.float(), log_q, y, read, fired)


def eval_windows(model: nn.Module, val: ValidationData, seq_len: int, stride: int, batch_tokens: int, rt: Runtime,
                 doc_masked: bool = False, hook: ScoreHook | None = None, hints: "NgramHints | None" = None
                 ) -> EvalSums:
    """Windowed scoring split across ranks; exact sums all-reduced. With document masking a window's tokens
    attend only within their own document, as in training."""
    acc = Accumulator(rt.device)
    model.eval()
    with torch.no_grad():
        for b in window_batches(val.tokens.numel() - 1, seq_len, stride, max(1, batch_tokens // seq_len), rt.rank,
                                rt.world_size):
            chunk, mask, tgt_all = window_inputs(val, b)
            tgt = tgt_all[:, tgt_all.size(1) - (b.last or tgt_all.size(1)):]
            seg = make_segments(chunk[:, :-1], val.bos_id, seq_len, rt.device) if doc_masked else None
            chunk = to_device(chunk, rt.device)
            with rt.autocast():
                raw, nll = scored_nll(model, chunk[:, :-1], chunk[:, 1:], tgt_all, seg, None, b.last, hints)
            acc.add(nll, mask, tgt, val.token_bytes, raw)
            if hook:
                hook(tgt[mask], nll.cpu()[mask])
    model.train()
    return acc.sums().reduce(rt)


def evaluate_val(model: nn.Module, val: ValidationData, cfg: Config, rt: Runtime) -> tuple[float, float]:
    s = eval_windows(model, val, cfg.eval_seq_len, cfg.eval_seq_len, cfg.val_batch_tokens // rt.world_size, rt,
                     cfg.doc_masked_attn)
    return s.loss, s.bpb


# ------------------------------------------------------------------------------------- the n-gram tilt (#2135)


@dataclass(frozen=True)
class NgramHints:
    """The tilt's hint for every target of the validation stream: `hint[i]` for the target tokens[i] (i >= 1),
    -1 where the tilt does not fire. Built by one causal pass (ngram_hints)."""
    hint: Tensor  # [n_tokens] int64, on the scoring device
    fired: int
    seconds: float
    boost: float

    def gather(self, tgt: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """For target indices `tgt` [B, T] (host) and their targets `y` (device): the ids to read the model's
        probability of (the hint where it fires, else the target itself: a valid id, ignored) and the fired
        mask, both on y's device."""
        h = self.hint[to_device(tgt, self.hint.device)].to(y.device)
        fired = h >= 0
        return torch.where(fired, h, y), fired

    def tilt(self, nll: Tensor, log_q: Tensor, y: Tensor, ids: Tensor, fired: Tensor) -> Tensor:
        """The tilted NLL: the hinted token's logit + boost (after the softcap), renormalised exactly over the
        vocabulary: Z = 1 + q (e^b - 1), loss = nll - b [y = h] + log Z (unchanged where it does not fire)."""
        b = self.boost
        z = torch.log1p(log_q.exp() * math.expm1(b))
        return torch.where(fired, nll - b * (y == ids).float() + z, nll)


def context_keys(tokens: Tensor, context: int) -> Tensor:
    """A 64-bit hash (wrapping int64 arithmetic, random odd multipliers) of the `context` tokens before each
    position: key[i] depends only on tokens[i - context:i]. The first `context` positions share one key that
    no full context is likely to have (2^-64 per context); they never fire (ngram_hints)."""
    n = tokens.numel()
    t = tokens.long()
    key = torch.zeros(n, dtype=torch.int64, device=tokens.device)
    g = torch.Generator().manual_seed(2135)
    mult = (torch.randint(1, 2 ** 62, (context,), generator=g) * 2 + 1).tolist()
    for j in range(1, context + 1):
        key[j:] += t[:n - j] * mult[j - 1]
    key[:context] = -1
    return key


def group_starts(sorted_keys: Tensor) -> Tensor:
    """For a sorted key array: the index of the first element of each element's run of equal keys."""
    n = sorted_keys.numel()
    new = torch.ones(n, dtype=torch.bool, device=sorted_keys.device)
    new[1:] = sorted_keys[1:] != sorted_keys[:-1]
    idx = torch.arange(n, device=sorted_keys.device)
    return torch.cummax(torch.where(new, idx, 0), 0).values


def ngram_hints(tokens: Tensor, cfg: Config, device: torch.device, now=time.perf_counter) -> NgramHints:
    """One causal left-to-right pass, vectorised (two stable sorts instead of a Python loop): for each target
    tokens[i], its context (the ORDER - 1 tokens before it) is looked up in a table of everything before i --
    the context's count n and its running most frequent next token h with count c (the first token to reach a
    new highest count takes the lead) -- before position i is added, so the hint depends on tokens[:i] only. The
    tilt fires when n > 0 and c / n >= THRESHOLD. The context runs across BOS, as #2135's does: it only ever
    reads validation tokens before the target, in stream order."""
    t0 = now()
    tok = to_device(tokens, device).long()
    n = tok.numel()
    keys = context_keys(tok, cfg.ngram_tilt_order - 1)
    idx = torch.arange(n, device=device)
    # time order within each context: a stable sort by key keeps positions ascending
    ks, by_key = torch.sort(keys, stable=True)
    first = group_starts(ks)
    seen = idx - first  # the context's count before this position
    # occurrence number of (context, next token) in time order, from a stable sort of the pair
    pair = keys * 1_000_003 ^ tok  # wrapping; exactness is by hash, 2^64 buckets
    ps, by_pair = torch.sort(pair, stable=True)
    pair_count = torch.empty(n, dtype=torch.int64, device=device)
    pair_count[by_pair] = idx - group_starts(ps) + 1  # count of this pair including this position
    pc = pair_count[by_key]  # in (context, time) order
    # running top count within the context; a new lead wherever a count passes the previous maximum
    big = n + 1
    run = torch.cummax(pc + first * big, 0).values - first * big  # first * big orders the contexts' runs
    prev_run = torch.zeros_like(run)
    prev_run[1:] = run[:-1]
    prev_run[seen == 0] = 0
    lead = pc > prev_run
    leader = torch.cummax(torch.where(lead, idx, 0), 0).values  # the last new lead at or before each element
    # the state before each element: its predecessor in the context's run
    before = (idx - 1).clamp_min(0)
    top_tok = tok[by_key][leader[before]]
    top_cnt = run[before]
    full = by_key >= cfg.ngram_tilt_order - 1  # a whole context before the position
    fire = full & (seen > 0) & (top_cnt.double() >= cfg.ngram_tilt_threshold * seen.double())
    hint = torch.full((n,), -1, dtype=torch.int64, device=device)
    hint[by_key[fire]] = top_tok[fire]  # never position 0 (tokens[0] is no target): its context has seen nothing
    return NgramHints(hint, int(fire.sum()), now() - t0, cfg.ngram_tilt_boost)


def shared_hints(val: ValidationData, cfg: Config, rt: Runtime, log: Logger, now=time.perf_counter
                 ) -> NgramHints | None:
    """Every rank builds the hints for the whole stream on its own device (integer ops and stable sorts: the
    same on every rank) and the group checks that all ranks agree before any of them scores."""
    if not cfg.ngram_tilt:
        return None
    hints = ngram_hints(val.tokens, cfg, rt.device, now)
    if rt.world_size > 1:
        check = torch.tensor([hints.fired, int((hints.hint * torch.arange(hints.hint.numel(), device=rt.device)
                                                 % 1_000_000_007).sum())], dtype=torch.int64, device=rt.device)
        lo, hi = all_reduce_(check.clone(), dist.ReduceOp.MIN), all_reduce_(check.clone(), dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError("the n-gram tilt's hints differ between ranks; scoring stopped before it started")
    log(f"ngram_tilt_fired:{hints.fired} targets:{val.tokens.numel() - 1} pass_s:{hints.seconds:.1f}")
    return hints


# ------------------------------------------------------------------------------------- test-time training


def lora_shapes(cfg: Config, mask: str) -> dict[str, tuple[int, int]]:
    """Adapter sites at full crawler depth: per block application (slot), K and the O / MLP bypasses, plus Q
    and V unless TTT_MASK=no_qv (#1953), no K with TTT_MASK=no_k (#2135); one adapter on the tied head."""
    d, kv = cfg.model_dim, cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
    names = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "mlp": (d, d)}
    drop = {"no_qv": ("q", "v"), "no_k": ("k",)}.get(mask, ())
    names = {k: v for k, v in names.items() if k not in drop}
    shapes = {f"{slot}.{n}": s for slot in range(len(application_plan(cfg, cfg.n_loops))) for n, s in names.items()}
    return shapes | {"head": (d, cfg.vocab_size)}


def document_spans(tokens: Tensor, bos_id: int) -> list[tuple[int, int]]:
    """(start, end) of each document: tokens[start] is its BOS and its targets are tokens[start+1:end+1], up to
    and including the next document's BOS (#1736): every target of the stream belongs to exactly one
    document, as in the windowed modes."""
    starts = torch.nonzero(tokens == bos_id).flatten().tolist()
    ends = starts[1:] + [tokens.numel() - 1]
    return [(s, e) for s, e in zip(starts, ends) if e > s]


@dataclass(frozen=True)
class TTTSchedule:
    """Batches of similar-length documents in processing order (longest first, #1736), each assigned to a rank
    by its exact token-pass cost, and the batch indices after which a global SGD phase runs."""
    batches: list[list[tuple[int, int]]]
    owner: list[int]
    phase_ends: list[int]  # a phase runs after batches[:i] for each i here
    phase_docs: list[int]  # ... training on that many of the scored documents (phase_training_docs)
    rank_of: list[int]  # each batch's index in length order (shortest first), #1855's batch id

    def phase_training_docs(self, end: int, n_docs: int) -> list[tuple[int, int]]:
        """#1855's choice: the documents scored so far, ordered by (batch id, position in batch), the first
        n_docs: the shortest of the scored documents, whatever order they were scored in."""
        scored = sorted((self.rank_of[i], j, d) for i in range(end) for j, d in enumerate(self.batches[i]))
        return [d for _, _, d in scored[:n_docs]]


def chunk_size_for(cfg: Config, longest: int) -> int:
    """#2014: batches of short documents take smaller chunks (more score-then-adapt steps per document)."""
    return next((c for limit, c in cfg.short_chunks if longest <= limit), cfg.ttt_chunk_size)


def batch_cost(docs: list[tuple[int, int]], cfg: Config) -> int:
    """Token positions the batch's forwards process: chunk k runs only the rows still active, padded to the
    widest window, the longest document's (chunk_rows; at least two rows and two columns)."""
    n = np.sort(np.array([e - s for s, e in docs]))
    c, L = chunk_size_for(cfg, int(n[-1])), cfg.eval_seq_len
    k = np.arange(math.ceil(n[-1] / c))
    active = n.size - np.searchsorted(n, k * c, side="right")
    width = np.minimum(np.minimum((k + 1) * c, n[-1]), L)
    return int((np.maximum(2, active) * np.maximum(2, width)).sum())


def ttt_schedule(docs: list[tuple[int, int]], cfg: Config, world: int, phases: int, prefix: int) -> TTTSchedule:
    order = sorted(docs, key=lambda d: d[1] - d[0])
    by_length = [order[i:i + cfg.ttt_batch_docs] for i in range(0, len(order), cfg.ttt_batch_docs)]
    # longest batch first; a stable sort, so batches of equal longest document keep length order (#1855)
    ranked = sorted(enumerate(by_length), key=lambda ib: -max(e - s for s, e in ib[1]))
    batches, rank_of = [b for _, b in ranked], [i for i, _ in ranked]
    prefix = min(prefix, len(docs)) if phases else 0
    bounds = [prefix * (k + 1) // phases for k in range(phases)] if prefix else []
    seen, ends = np.cumsum([len(b) for b in batches]), []
    for b in bounds:
        ends.append(int(np.searchsorted(seen, b)) + 1)
    owner, segs = [0] * len(batches), [0] + ends + [len(batches)]
    for a, z in zip(segs, segs[1:]):  # balance each segment between phases separately
        load = [0] * world
        for i in sorted(range(a, z), key=lambda j: -batch_cost(batches[j], cfg)):
            r = load.index(min(load))
            owner[i], load[r] = r, load[r] + batch_cost(batches[i], cfg)
    return TTTSchedule(batches, owner, ends, bounds, rank_of)


def chunk_rows(val: ValidationData, docs: list[tuple[int, int]], k: int, c: int, L: int):
    """Inputs, targets, score mask and target indices of chunk k for the documents that still have targets
    there, each row its own document's window (position 0 = the window start). At least two rows and two
    columns (padding is never scored): a size of 1 would be a shape of its own under dynamic compilation."""
    n = [e - s for s, e in docs]
    rows = [i for i, p in enumerate(n) if k * c < p]
    ends = [min((k + 1) * c, n[i]) for i in rows]
    starts = [max(0, e - L) for e in ends]
    T, R = max(2, max(e - s for s, e in zip(starts, ends))), max(2, len(rows))
    x, y, tgt = (torch.zeros(R, T, dtype=torch.long) for _ in range(3))
    mask = torch.zeros(R, T, dtype=torch.bool)
    for r, (i, s, e) in enumerate(zip(rows, starts, ends)):
        span = torch.arange(docs[i][0] + s, docs[i][0] + e)
        x[r, :e - s], y[r, :e - s], tgt[r, :e - s] = val.tokens[span], val.tokens[span + 1], span + 1
        mask[r, k * c - s:e - s] = True
    return torch.tensor(rows + rows[:1] * (R - len(rows))), x, y, mask, tgt


def ttt_score_batch(model: nn.Module, lora: BatchedLoRA, opt: torch.optim.Optimizer, val: ValidationData,
                    docs: list[tuple[int, int]], cfg: Config, rt: Runtime, adapt: bool, hook: ScoreHook | None,
                    hints: "NgramHints | None" = None) -> EvalSums:
    """Score a batch of documents chunk by chunk; after a chunk is scored, one optimizer step on that same
    chunk adapts each document's own LoRA for the chunks after it (score first, then adapt; #1736). A
    document's last chunk is scored but not trained on."""
    lens = [e - s for s, e in docs]
    c, L = chunk_size_for(cfg, max(lens)), cfg.eval_seq_len
    acc = Accumulator(rt.device)
    for k in range(math.ceil(max(lens) / c)):
        rows, x, y, mask, tgt = chunk_rows(val, docs, k, c, L)
        lora.rows = to_device(rows, rt.device)
        with rt.autocast():  # the LoRA trains on the untilted NLL; the tilt changes only what is scored (#2135)
            nll, scored = scored_nll(model, to_device(x, rt.device), to_device(y, rt.device), tgt, None, lora, 0, hints)
        raw = nll.detach()
        shown = raw if scored is nll else scored.detach()  # one tensor when nothing is tilted: summed once
        m = acc.add(shown, mask, tgt, val.token_bytes, raw)
        if hook:
            hook(tgt[mask], shown.cpu()[mask])
        more = [lens[i] > (k + 1) * c for i in rows.tolist()]  # from the host's lengths: no device sync
        if adapt and any(more):
            per_doc = (nll * m).sum(1) / m.sum(1).clamp_min(1)
            (per_doc * to_device(torch.tensor(more), rt.device)).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    lora.rows = None
    return acc.sums()


def new_lora(cfg: Config, rt: Runtime, seed: int) -> tuple[BatchedLoRA, torch.optim.Optimizer]:
    """One adapter set per rank, reused batch after batch (A warm-started, #1855): AdamW with beta1 = 0."""
    lora = BatchedLoRA(lora_shapes(cfg, cfg.ttt_mask), cfg.ttt_batch_docs, cfg.ttt_lora_rank, cfg.ttt_lora_alpha,
                       rt.device)
    lora.reset(seed)
    opt = torch.optim.AdamW(lora.parameters(), lr=cfg.ttt_lora_lr * cfg.ttt_local_lr_mult,
                            betas=(0.0, cfg.ttt_beta2), eps=1e-10, weight_decay=cfg.ttt_weight_decay)
    return lora, opt


def reset_lora(lora: BatchedLoRA, opt: torch.optim.Optimizer, cfg: Config, batch: int) -> None:
    lora.reset(None if cfg.ttt_warm_start_a else cfg.seed * 1_000_003 + batch)
    opt.state.clear()


def sgd_span(chunk: Tensor, cfg: Config, rt: Runtime) -> Tensor | None:
    """This rank's share of a global SGD chunk (#1855): the chunk's whole EVAL_SEQ_LEN rows split between ranks
    in order, as one flat span of tokens (+1 target), or None when the rank gets no row. Its attention is cut at
    BOS and every EVAL_SEQ_LEN tokens, so a document continues across row boundaries."""
    L = cfg.eval_seq_len
    n = (chunk.numel() - 1) // L
    a, b = n * rt.rank // rt.world_size, n * (rt.rank + 1) // rt.world_size
    return chunk[a * L:b * L + 1] if b > a else None


def sgd_span_backward(compiled: nn.Module, span: Tensor, cfg: Config, rt: Runtime, bos_id: int) -> None:
    """Forward and backward of one rank's span at mean loss (the same call in the evaluation's cost probe)."""
    x, y = span[None, :-1].clone(), span[None, 1:].clone()  # standalone: dynamo guards a view's base tensor too
    seg = make_segments(x, bos_id, cfg.eval_seq_len, rt.device) if cfg.doc_masked_attn else None
    with rt.autocast():
        loss = compiled(to_device(x, rt.device), to_device(y, rt.device), seg).mean()
    loss.backward()


def global_sgd(model: GPT, val: ValidationData, docs: list[tuple[int, int]], cfg: Config, rt: Runtime,
               compiled: nn.Module | None = None) -> int:
    """One pass of SGD (momentum 0.9) over the base model on documents that have all been scored already, as
    #1855: the documents' tokens in one stream, TTT_GLOBAL_CHUNK_TOKENS per step, each rank a span of the chunk's
    rows, gradients averaged over ranks and clipped at 1, cosine LR from TTT_GLOBAL_LR over n_chunks - 1 steps,
    the last chunk skipped. Returns the number of steps."""
    stream = torch.cat([val.tokens[s:e + 1] for s, e in docs])
    n_chunks = global_sgd_chunks(stream.numel(), cfg)
    params = [p for p in model.parameters()]
    model.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=cfg.ttt_global_lr, momentum=0.9)
    c = cfg.ttt_global_chunk_tokens
    for ci in range(n_chunks - 1):
        for g in opt.param_groups:
            g["lr"] = cfg.ttt_global_lr * 0.5 * (1 + math.cos(math.pi * ci / (n_chunks - 1)))
        span = sgd_span(stream[ci * c:(ci + 1) * c + 1], cfg, rt)
        if span is not None:
            sgd_span_backward(model if compiled is None else compiled, span, cfg, rt, val.bos_id)
        sync_grads_(params, rt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return n_chunks - 1


def global_sgd_chunks(n_tokens: int, cfg: Config) -> int:
    """TTT_GLOBAL_CHUNK_TOKENS chunks of an n_tokens stream (global_sgd steps on all but the last)."""
    return max(1, math.ceil((n_tokens - 1) / cfg.ttt_global_chunk_tokens))


def sgd_rows_per_rank(n_tokens: int, cfg: Config, world: int) -> int:
    """EVAL_SEQ_LEN rows the busiest rank runs in a global SGD pass over an n_tokens stream (global_sgd's cut)."""
    return (global_sgd_chunks(n_tokens, cfg) - 1) * math.ceil(cfg.ttt_global_chunk_tokens // cfg.eval_seq_len / world)


def ttt_eval(model: GPT, val: ValidationData, cfg: Config, rt: Runtime, log: Logger, adapt: bool = True,
             hook: ScoreHook | None = None, compiled: nn.Module | None = None,
             hints: "NgramHints | None" = None) -> EvalSums:
    """Phased score-first TTT (#1736 lineage): documents are scored in batches, longest first, each adapting
    its own LoRA chunk by chunk. After the first b_k documents have been scored (b_k = cumulative prefix
    boundaries of PHASED_TTT_PREFIX_DOCS over PHASED_TTT_NUM_PHASES), the base model takes a global SGD pass
    over exactly those documents, and the LoRA starts afresh."""
    docs = document_spans(val.tokens, val.bos_id)
    if not docs:
        raise DataError("validation has no BOS-delimited documents; TTT needs BOS markers")
    sched = ttt_schedule(docs, cfg, rt.world_size, cfg.phased_ttt_num_phases if adapt else 0, cfg.phased_ttt_prefix_docs)
    log(f"ttt:docs:{len(docs)} batches:{len(sched.batches)} phases_after_docs:{sched.phase_docs}")
    model.requires_grad_(False)
    lora, opt = new_lora(cfg, rt, cfg.seed * 7919 + rt.rank)
    sums, t0, start = EvalSums(), time.perf_counter(), 0
    for end, n_docs in list(zip(sched.phase_ends, sched.phase_docs)) + [(len(sched.batches), 0)]:
        for i in range(start, end):
            if sched.owner[i] == rt.rank:
                reset_lora(lora, opt, cfg, i)
                sums.merge(ttt_score_batch(model if compiled is None else compiled, lora, opt, val, sched.batches[i],
                                           cfg, rt, adapt, hook, hints))
        start = end
        if n_docs:
            barrier()
            steps = global_sgd(model, val, sched.phase_training_docs(end, n_docs), cfg, rt, compiled)
            lora, opt = new_lora(cfg, rt, cfg.seed * 7919 + rt.rank + 104_729 * end)  # a fresh A after each phase (#1855)
            log(f"ttt:phase docs:{n_docs} global_sgd_steps:{steps} elapsed:{time.perf_counter() - t0:.1f}s")
    return sums.reduce(rt)


# ------------------------------------------------------------------------------------- the evaluation plan


@dataclass(frozen=True)
class EvalPlan:
    """What the evaluation will do: decided from Config, then cut by the budget projector before any
    validation token is scored; the log shows both plans."""
    sliding: bool
    ttt: bool
    phases: int
    prefix_docs: int

    def describe(self) -> str:
        return (f"roundtrip sliding:{int(self.sliding)} ttt:{int(self.ttt)} phases:{self.phases} "
                f"prefix_docs:{self.prefix_docs}")


@dataclass(frozen=True)
class EvalCosts:
    """The time model, measured by `measure_costs` at the evaluation's real shapes on random tokens (never
    validation), the slowest rank's figures on every rank: seconds per windowed forward (the whole window through
    the head, or its last stride), per TTT token position and per TTT step (LoRA forward + backward + AdamW,
    fitted over a chunk-wide and a window-wide step of a full batch), per global SGD row (forward + backward of one
    EVAL_SEQ_LEN row), and per token of the n-gram tilt's hint pass."""
    full_call_s: float
    strided_call_s: float
    ttt_token_s: float
    ttt_call_s: float = 0.0
    sgd_row_s: float = 0.0
    tilt_token_s: float = 0.0

    def seconds(self, work: dict) -> dict:
        (rf, rs), (sf, ss), (tt, tc, sg) = work["roundtrip"], work["sliding"], work["ttt"]
        return {"roundtrip": rf * self.full_call_s + rs * self.strided_call_s,
                "sliding": sf * self.full_call_s + ss * self.strided_call_s,
                "ttt": tt * self.ttt_token_s + tc * self.ttt_call_s + sg * self.sgd_row_s}

    def as_tensor(self, device: torch.device) -> Tensor:
        return torch.tensor(dataclasses.astuple(self), dtype=torch.float64, device=device)


def n_windows(n_targets: int, seq_len: int, stride: int) -> int:
    """len(sliding_windows(n_targets, seq_len, stride)), in closed form."""
    return 1 if n_targets <= seq_len else math.ceil((n_targets - seq_len) / stride) + 1


def eval_rows(cfg: Config, n_targets: int, world: int) -> int:
    """Windows per windowed forward, the same for roundtrip and sliding (one compiled shape): EVAL_BATCH_TOKENS /
    EVAL_SEQ_LEN, but no more than a rank's share of the sliding (else the roundtrip) windows, so that a short
    validation set is not padded to a full batch, in its forwards nor in the cost probes."""
    L = cfg.eval_seq_len
    windows = n_windows(n_targets, L, cfg.eval_stride if cfg.sliding_eval else L)
    return max(1, min(cfg.eval_batch_tokens // L, math.ceil(windows / world)))


def window_work(n_targets: int, cfg: Config, stride: int, world: int) -> tuple[int, int]:
    """(whole-window forwards, last-stride forwards) of a windowed evaluation on rank 0, the busiest rank, counted
    as window_batches cuts them: rank 0's first batch holds window 0, which scores a whole window."""
    L, rows = cfg.eval_seq_len, eval_rows(cfg, n_targets, world)
    batches = math.ceil(math.ceil(n_windows(n_targets, L, stride) / world) / rows)
    strided = batches - 1 if stride < min(L, n_targets) else 0
    return batches - strided, strided


def ttt_work(plan: EvalPlan, docs: list[tuple[int, int]], cfg: Config, world: int) -> tuple[float, int, int]:
    """(token positions, LoRA steps) of TTT on the busiest rank, and the global SGD rows each rank runs."""
    sched = ttt_schedule(docs, cfg, world, plan.phases, plan.prefix_docs)
    tokens, calls = [0.0] * world, [0] * world
    for b, r in zip(sched.batches, sched.owner):
        tokens[r] += batch_cost(b, cfg)
        calls[r] += math.ceil(max(e - s for s, e in b) / chunk_size_for(cfg, max(e - s for s, e in b)))
    lens = [e - s + 1 for b in sched.batches for s, e in b]
    rows = sum(sgd_rows_per_rank(sum(lens[:n]), cfg, world) for n in sched.phase_docs)
    r = max(range(world), key=lambda i: tokens[i])
    return tokens[r], calls[r], rows


def plan_token_work(plan: EvalPlan, docs: list[tuple[int, int]], n_targets: int, cfg: Config, world: int) -> dict:
    """What each stage runs on the busiest rank: the time model's inputs."""
    return {"roundtrip": window_work(n_targets, cfg, cfg.eval_seq_len, world),
            "sliding": window_work(n_targets, cfg, cfg.eval_stride, world) if plan.sliding else (0, 0),
            "ttt": ttt_work(plan, docs, cfg, world) if plan.ttt else (0.0, 0, 0)}


def project_seconds(plan: EvalPlan, docs, n_targets: int, cfg: Config, world: int, costs: EvalCosts) -> dict:
    return costs.seconds(plan_token_work(plan, docs, n_targets, cfg, world))


# documents and targets of the published (CaseOps) validation split, the default data
PUBLISHED_SPLIT = (lambda fp: (fp.docs, fp.tokens - 1))(KNOWN_VAL["fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"])


def published_docs(docs: list[tuple[int, int]], n_docs: int = PUBLISHED_SPLIT[0],
                   n_targets: int = PUBLISHED_SPLIT[1]) -> list[tuple[int, int]]:
    """The published split at full size, modelled from the documents at hand: their lengths, repeated in order to
    n_docs documents and scaled to n_targets targets (the real split, when `docs` is it)."""
    lens = np.array([e - s for s, e in docs] or [1], dtype=np.float64)
    lens = np.resize(lens, n_docs) * n_targets / np.resize(lens, n_docs).sum()
    ends = np.round(np.cumsum(lens)).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    return [(int(s), int(max(e, s + 1))) for s, e in zip(starts, ends)]


def fit_plan(cfg: Config, docs, n_targets: int, world: int, costs: EvalCosts, budget_s: float,
             log: Logger, spent: dict[str, float] | None = None, label: str = "eval_plan") -> EvalPlan:
    """The configured plan, cut step by step until its projection fits 90% of the budget: drop the sliding
    window first (a diagnostic; TTT is the score), then halve the global SGD prefix, then drop the phases,
    then TTT itself. `spent`: what already ran on the evaluation clock before the plan (the n-gram tilt's pass),
    logged with the projection; `budget_s` is what it left. The log adds the configured plan's projection for the
    published split at full size on this many ranks (published_docs), whatever split is loaded."""
    plan = EvalPlan(cfg.sliding_eval, cfg.ttt_enabled, cfg.phased_ttt_num_phases, cfg.phased_ttt_prefix_docs)
    cuts = [lambda p: dataclasses.replace(p, sliding=False)]
    cuts += [lambda p: dataclasses.replace(p, prefix_docs=p.prefix_docs // 2)] * 3
    cuts += [lambda p: dataclasses.replace(p, phases=0), lambda p: dataclasses.replace(p, ttt=False)]
    first = plan
    for cut in [None] + cuts:
        plan = cut(plan) if cut else plan
        secs = project_seconds(plan, docs, n_targets, cfg, world, costs)
        if sum(secs.values()) <= 0.9 * budget_s:
            break
    full = project_seconds(first, published_docs(docs), PUBLISHED_SPLIT[1], cfg, world, costs)
    log(f"{label}: configured [{first.describe()}] -> planned [{plan.describe()}] projected:"
        + " ".join(f"{k}={v:.0f}s" for k, v in secs.items()) + f" budget:{budget_s:.0f}s"
        + "".join(f" {k}={v:.1f}s(spent)" for k, v in (spent or {}).items())
        + f" published_split_on_{world}_ranks:" + " ".join(f"{k}={v:.0f}s" for k, v in full.items())
        + f" ngram_tilt={costs.tilt_token_s * PUBLISHED_SPLIT[1]:.0f}s")
    if plan != first:
        log(f"WARNING: the configured evaluation does not fit EVAL_BUDGET_SECONDS; {label} runs the reduced plan above")
    return plan


def rank0_decides(rt: Runtime, values: list[int]) -> list[int]:
    """Rank 0's integers on every rank: ranks that decide apart near a cut would issue mismatched collectives."""
    if rt.world_size == 1:
        return values
    t = to_device(torch.tensor(values, dtype=torch.int64), rt.device)
    dist.broadcast(t, src=0)
    return t.tolist()


def agreed_plan(cfg: Config, docs, n_targets: int, rt: Runtime, costs: EvalCosts, budget_s: float,
                log: Logger, spent: dict[str, float] | None = None) -> EvalPlan:
    """Rank 0 fits the plan (with the slowest rank's costs and its own clock) and every rank runs what it decided."""
    plan = fit_plan(cfg, docs, n_targets, rt.world_size, costs, budget_s, log, spent) if rt.is_main else None
    s, tt, ph, pd = rank0_decides(rt, [0, 0, 0, 0] if plan is None else
                                  [plan.sliding, plan.ttt, plan.phases, plan.prefix_docs])
    return EvalPlan(bool(s), bool(tt), ph, pd)


def slowest_costs(costs: EvalCosts, rt: Runtime) -> EvalCosts:
    """Every rank's measured costs replaced by the maximum over ranks (the slowest rank sets the time)."""
    t = all_reduce_(costs.as_tensor(rt.device), dist.ReduceOp.MAX) if rt.world_size > 1 else costs.as_tensor(rt.device)
    return EvalCosts(*t.tolist())


def random_rows(cfg: Config, rows: int, T: int, g: torch.Generator) -> Tensor:
    """[rows, T + 1] random tokens with a BOS every ~T/3 positions: documents for the masks, never validation."""
    x = torch.randint(0, cfg.vocab_size, (rows, T + 1), generator=g)
    x[torch.rand(rows, T + 1, generator=g) < 3 / T] = cfg.bos_id
    x[:, 0] = cfg.bos_id
    return x


def measure_costs(model: GPT, static: nn.Module, dynamic: nn.Module, cfg: Config, rt: Runtime, rows: int,
                  docs: list[tuple[int, int]]) -> EvalCosts:
    """Compile (on CUDA) and time every evaluation shape the configuration can run, before any validation token is
    scored, on random tokens: the windowed forward at [rows, EVAL_SEQ_LEN] (whole window, and last stride for the
    sliding window), a LoRA TTT step of a full batch (at most as many documents as there are) at a chunk's and at a
    window's width (at most the longest document), a global SGD span, and the n-gram tilt's hint pass over 2^18
    random tokens (per token). Each is timed on its second call, after the first has compiled it. A stage that is
    off costs 0. Sizes follow the validation set at hand (`rows`, `docs`), so a short one is probed briefly."""
    g = torch.Generator().manual_seed(0)
    L = cfg.eval_seq_len
    B = max(2, min(cfg.ttt_batch_docs, len(docs)))
    x = random_rows(cfg, rows, L, g)
    seg = make_segments(x[:, :-1], cfg.bos_id, L, rt.device) if cfg.doc_masked_attn else None
    xd = to_device(x, rt.device)

    # the tilt reads one more log-probability: its own graph, primed with a standalone tensor (as scoring passes)
    read = xd[:, 1:].clone() if cfg.ngram_tilt else None

    def window(last: int) -> None:
        with torch.no_grad(), rt.autocast():
            static(xd[:, :-1], xd[:, 1:], seg, None, last, read)

    model.eval()
    full = warm_and_time(lambda: window(0), rt.device)
    strided = warm_and_time(lambda: window(cfg.eval_stride), rt.device) if cfg.sliding_eval else 0.0
    model.train()
    per_token = per_call = sgd_row = tilt = 0.0
    if cfg.ttt_enabled:
        model.requires_grad_(False)
        lora, opt = new_lora(dataclasses.replace(cfg, ttt_batch_docs=B), rt, 0)
        lora.rows = torch.arange(B, device=rt.device)
        longest = max([e - s for s, e in docs] or [L])
        widths = (max(2, min(cfg.ttt_chunk_size, L, longest)), max(2, min(L, longest)))
        steps = [warm_and_time(lambda w=w: ttt_probe_step(dynamic, random_rows(cfg, B, w, g), lora, opt, rt,
                                                          cfg.ngram_tilt), rt.device) for w in widths]
        per_token = max(0.0, (steps[1] - steps[0]) / (B * (widths[1] - widths[0]))) if widths[1] > widths[0] else 0.0
        per_call = max(0.0, steps[0] - per_token * B * widths[0])
    if cfg.ttt_enabled and cfg.phased_ttt_num_phases:
        span_rows = max(1, cfg.ttt_global_chunk_tokens // L // rt.world_size)
        sgd_row = warm_and_time(lambda: sgd_probe(model, dynamic, span_rows, cfg, rt, g), rt.device) / span_rows
    if cfg.ngram_tilt:
        probe = torch.randint(0, cfg.vocab_size, (1 << 18,), generator=g)
        tilt = warm_and_time(lambda: ngram_hints(probe, cfg, rt.device), rt.device) / probe.numel()
    return EvalCosts(full, strided, per_token, per_call, sgd_row, tilt)


def warm_and_time(fn: typing.Callable[[], None], device: torch.device) -> float:
    """Seconds of fn's fastest of two calls after a first (compiling) one."""
    fn()
    return min(timed_call(fn, device) for _ in range(2))


def ttt_probe_step(model: nn.Module, x: Tensor, lora: BatchedLoRA, opt, rt: Runtime, tilt: bool = False) -> None:
    """A LoRA TTT step called as ttt_score_batch calls it (contiguous inputs: strides are guarded too)."""
    xi, y = to_device(x[:, :-1].contiguous(), rt.device), to_device(x[:, 1:].contiguous(), rt.device)
    with rt.autocast():
        out = model(xi, y, None, lora, 0, y.clone()) if tilt else model(xi, y, None, lora)  # no alias: own guard
    (out[0] if tilt else out).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sgd_probe(model: GPT, dynamic: nn.Module, rows: int, cfg: Config, rt: Runtime, g: torch.Generator) -> None:
    """Forward + backward of a global SGD span of `rows` EVAL_SEQ_LEN rows (the weights do not change; the
    gradients are dropped)."""
    model.requires_grad_(True)
    sgd_span_backward(dynamic, random_rows(cfg, 1, rows * cfg.eval_seq_len, g)[0], cfg, rt, cfg.bos_id)
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)


def timed_call(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@dataclass
class Evaluator:
    """One model and its evaluation graphs, compiled and timed on random tokens before anything is scored (in a
    training run: before training, on the training model itself, so the artifact's weights are later loaded into
    graphs that are already built): the compile warm-up and cost probes, outside the evaluation timer (README: "The
    evaluation clock")."""
    model: GPT
    static: nn.Module
    dynamic: nn.Module
    costs: EvalCosts
    warmup_s: float


def prepare_evaluation(model: GPT, cfg: Config, rt: Runtime, val: ValidationData, log: Logger,
                       now: typing.Callable[[], float] = time.perf_counter) -> Evaluator:
    """Compile and time the evaluation's graphs on `model` (its weights, modes and flags are as before afterwards),
    then refuse, before anything is paid for, a budget that even the smallest plan cannot meet, and preview the
    plan the budget allows."""
    t0, g0 = now(), compiled_graph_count()
    static, dynamic = compile_model(model, cfg, rt), compile_model(model, cfg, rt, dynamic=True)
    docs, n = document_spans(val.tokens, val.bos_id), val.tokens.numel() - 1
    flags, loops, training = [p.requires_grad for p in model.parameters()], model.active_loops, model.training
    model.set_active_loops(cfg.n_loops)
    costs = slowest_costs(measure_costs(model, static, dynamic, cfg, rt, eval_rows(cfg, n, rt.world_size), docs), rt)
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)
    model.set_active_loops(loops)
    model.train(training)
    model.zero_grad(set_to_none=True)
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()  # the probes' activations are not training's
    ev = Evaluator(model, static, dynamic, costs, now() - t0)
    log(f"eval_warmup: compile and cost probes {ev.warmup_s:.1f}s on random tokens, outside the eval timer, graphs:"
        f"{compiled_graph_count() - g0} costs:" + ",".join(f"{k}={v:.3g}" for k, v in dataclasses.asdict(costs).items()))
    smallest = EvalPlan(False, False, 0, 0)
    floor = sum(project_seconds(smallest, docs, n, cfg, rt.world_size, costs).values()) + costs.tilt_token_s * n
    if floor > cfg.eval_budget_seconds:
        raise ConfigError(f"EVAL_BUDGET_SECONDS={cfg.eval_budget_seconds:.0f} cannot be met: the roundtrip evaluation "
                          f"alone projects to {floor:.0f}s on this hardware ({n} targets on {rt.world_size} ranks"
                          + (", with the n-gram tilt's pass" if cfg.ngram_tilt else "") + "); raise the budget, or "
                          "score fewer tokens (VAL_TOKEN_LIMIT, smoke tests only)")
    if rt.is_main:
        fit_plan(cfg, docs, n, rt.world_size, costs, cfg.eval_budget_seconds - costs.tilt_token_s * n, log,
                 label="eval_plan_preview")
    return ev


def run_evaluation(artifact: Path, val: ValidationData, cfg: Config, rt: Runtime, log: Logger,
                   ev: Evaluator | None = None, now: typing.Callable[[], float] = time.perf_counter) -> dict:
    """All evaluations from the packed artifact (read once), into the evaluator's model and graphs (EVAL_ONLY: a model
    built from the artifact's config, warmed up here). Reading, decompressing and dequantizing the artifact and the
    warm-up are outside the evaluation timer; the timer starts at the first read of validation tokens (the n-gram
    tilt's pass) and covers the plan, roundtrip, TTT and the sliding window, which runs last and only if the
    projection says it fits what TTT left (it is informational; TTT is the score). The model is reloaded from the
    artifact's weights before every stage, as a fresh load would give. Every mode scores the same targets."""
    t_load = now()
    acfg, qm = unpack_artifact(read_artifact(artifact))
    weights = {k: v.to(rt.device) for k, v in dequantize_state(qm).items()}
    load_s = now() - t_load
    log(f"artifact_load_time:{load_s:.1f}s (read, decompress, dequantize: outside the eval timer)")
    if ev is None:
        ev = prepare_evaluation(GPT(acfg, rt.kernels).to(rt.device), cfg, rt, val, log, now)
    elif any(getattr(acfg, f) != getattr(ev.model.cfg, f) for f in MODEL_FIELDS):
        raise ArtifactError(f"{artifact} holds another model than this run's: evaluate it with EVAL_ONLY=1")
    model, docs, n_targets = ev.model, document_spans(val.tokens, val.bos_id), val.tokens.numel() - 1
    g0 = compiled_graph_count()
    t_all = now()  # the evaluation timer
    hints = shared_hints(val, cfg, rt, log, now)
    plan = agreed_plan(cfg, docs, n_targets, rt, ev.costs, cfg.eval_budget_seconds - (now() - t_all), log,
                       {"ngram_tilt": hints.seconds} if hints is not None else None)
    stage_cfg = dataclasses.replace(cfg, phased_ttt_num_phases=plan.phases, phased_ttt_prefix_docs=plan.prefix_docs)
    lines = {"roundtrip": "final_int6_roundtrip_exact", "ttt": "quantized_ttt_phased",
             "sliding": "final_int6_sliding_window_exact"}
    results = {}
    for key, run in (("roundtrip", True), ("ttt", plan.ttt), ("sliding", plan.sliding)):
        if not run:
            continue
        if key == "sliding":
            left = cfg.eval_budget_seconds - (now() - t_all)
            need = project_seconds(EvalPlan(True, False, 0, 0), docs, n_targets, cfg, rt.world_size, ev.costs)["sliding"]
            if not rank0_decides(rt, [int(need <= 0.9 * left)])[0]:
                log(f"eval: sliding window skipped: it projects to {need:.0f}s and {left:.0f}s of the budget are left")
                plan = dataclasses.replace(plan, sliding=False)  # the summary's plan is what ran
                continue
        t0 = now()
        load_weights(model, weights)
        s = run_stage(key, ev.dynamic if key == "ttt" else ev.static, model, val, stage_cfg, rt, log, hints)
        ms = 1000 * (now() - t0)
        log(f"{lines[key]} val_loss:{s.loss:.8f} val_bpb:{s.bpb:.8f} eval_time:{ms:.0f}ms" +
            (f" ngram_tilt:1 untilted_val_bpb:{s.raw_bpb:.8f}" if hints is not None else ""))
        log(f"{key}_targets:{s.tokens} {key}_bytes:{s.bytes}")
        results[key] = {"val_loss": s.loss, "val_bpb": s.bpb, "eval_ms": ms, "tokens": s.tokens, "bytes": s.bytes,
                        "untilted_val_bpb": s.raw_bpb}
    total = now() - t_all
    log(f"eval_graphs_compiled_while_scoring:{compiled_graph_count() - g0}")
    log(f"eval_outside_timer: artifact_load:{load_s:.1f}s warmup:{ev.warmup_s:.1f}s")
    return finish_evaluation(results, plan, cfg, total, log)


def run_stage(key: str, compiled: nn.Module, model: GPT, val: ValidationData, cfg: Config, rt: Runtime,
              log: Logger, hints: NgramHints | None = None) -> EvalSums:
    if key == "ttt":
        return ttt_eval(model, val, cfg, rt, log, compiled=compiled, hints=hints)
    stride = cfg.eval_seq_len if key == "roundtrip" else cfg.eval_stride
    rows = eval_rows(cfg, val.tokens.numel() - 1, rt.world_size)
    return eval_windows(compiled, val, cfg.eval_seq_len, stride, rows * cfg.eval_seq_len, rt, cfg.doc_masked_attn,
                        hints=hints)


def finish_evaluation(results: dict, plan: EvalPlan, cfg: Config, total: float, log: Logger) -> dict:
    counts = {k: v["tokens"] for k, v in results.items()}
    if len(set(counts.values())) > 1:
        log(f"ERROR: the evaluation modes scored different target counts {counts}; this run is NOT valid")
    results |= {"eval_total_s": total, "eval_within_budget": total <= cfg.eval_budget_seconds,
                "plan": dataclasses.asdict(plan), "same_targets": len(set(counts.values())) == 1}
    log(f"eval_total_time:{total:.1f}s budget:{cfg.eval_budget_seconds:.0f}s")
    if total > cfg.eval_budget_seconds:
        log(f"WARNING: evaluation took {total:.1f}s > EVAL_BUDGET_SECONDS={cfg.eval_budget_seconds:.0f}; "
            "this run is NOT a valid submission")
    return results


# =============================================================================================
# Main: the pipeline, one stage per call
# =============================================================================================


@dataclass
class RunInputs:
    """What preflight hands to the stages: the tokenizer, the training data and the validation set."""
    sp: typing.Any
    train: TrainData
    val: ValidationData


def build_model(cfg: Config, rt: Runtime) -> tuple[GPT, nn.Module]:
    torch.manual_seed(cfg.seed)
    model = GPT(cfg, rt.kernels).to(rt.device)
    return model, compile_model(model, cfg, rt)


def log_header(cfg: Config, rt: Runtime, log: Logger, warnings: list[str]) -> None:
    log(f"versions: python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__}")
    log(f"hardware: device:{rt.device.type} name:{rt.hardware} world_size:{rt.world_size}")
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        log(f"config: {f.name.upper()}={v}")
    for w in warnings + list(rt.notes):
        log(w if w.startswith("WARNING") else f"WARNING: {w}")
    if cfg.ve_dim and not cfg.ve_layers:
        log("WARNING: VE_DIM is set but VE_LAYERS is empty: the value embedding feeds no block (as in the seeds)")
    log(f"attention_backend:{rt.attn.name} ATTN_BACKEND={cfg.attn_backend}" + ATTENTION_NOTES.get(
        (rt.device.type, rt.attn.name), ""))
    log(f"compile:enabled={int(rt.compile)} backend={rt.compile_backend} fullgraph={int(cfg.compile_fullgraph)} "
        f"recompile_limit={RECOMPILE_LIMIT} fused_ce={rt.kernels.ce} delta={rt.kernels.delta} "
        f"autocast={'bf16' if rt.autocast_dtype == torch.bfloat16 else 'fp32'}")


# What each backend costs where it runs (the log says it before training).
ATTENTION_NOTES = {
    ("cuda", "flex"): " (FlashAttention 3 not importable or not traceable: PyTorch flex_attention, a compiled "
                      "block-sparse kernel, slower than FA3 on H100; see the README's GPU section)",
    ("cuda", "sdpa"): " (PyTorch SDPA: document-masked calls use the math kernel, T x T memory per call)",
    ("cpu", "fa3"): " (a flash_attn_interface module on a CPU: a stand-in, tests only)",
}


CHECKPOINT_NAME, ARTIFACT_NAME, CODE_NAME = "final_model.pt", "final_model.int6.ptz", "train_gpt.counted.py"


def checkpoint_path(cfg: Config) -> Path:
    return Path(cfg.init_model_path or Path(cfg.output_dir) / CHECKPOINT_NAME)


def artifact_path(cfg: Config) -> Path:
    return Path(cfg.artifact_path or Path(cfg.output_dir) / ARTIFACT_NAME)


def config_from_saved(cfg: Config, saved: Config, fields: tuple[str, ...], explicit: set[str], source: Path,
                      kind: str) -> Config:
    """cfg with `fields` taken from a saved run's config (a checkpoint's or an artifact's). A model variable set in
    the environment that disagrees with it is an error, never a silent mismatch; other fields set explicitly win."""
    diff = [f"{n.upper()}={getattr(cfg, n)} ({kind}: {getattr(saved, n)})" for n in MODEL_FIELDS
            if n.upper() in explicit and getattr(cfg, n) != getattr(saved, n)]
    if diff:
        raise ConfigError(f"{source} was trained with a different model; unset or set " + ", ".join(diff))
    return dataclasses.replace(cfg, **{n: getattr(saved, n) for n in fields
                                       if n in MODEL_FIELDS or n.upper() not in explicit})


def check_compressor(cfg: Config) -> None:
    """Every codec the artifact needs must be importable now, not after ten paid minutes of training: ZPAQ for the
    counted code (always), brotli for the artifact header (always) and COMPRESSOR's own."""
    codecs = {"zpaq", "brotli", cfg.compressor} - {"pergroup"}  # pergroup packs with ZPAQ and brotli
    missing = []
    for codec in sorted(codecs):
        try:
            compress(b"probe", codec)
        except ImportError:
            missing.append({"zstd": "zstandard"}.get(codec, codec))
    if missing:
        raise ConfigError(f"the artifact and the counted code need the Python packages {', '.join(missing)} "
                          f"(COMPRESSOR={cfg.compressor}): pip install {' '.join(missing)}")


def shipped_code() -> bytes:
    """The counted code of this run: this file's wrapper, or the file itself when it is the wrapper."""
    src = Path(__file__).read_bytes()
    return src if src.startswith(WRAPPER_HEAD) else counted_code(src.decode())


def check_code_fits(cfg: Config) -> None:
    """A cap the counted code alone reaches cannot be met by any artifact: refused before anything is paid for. The
    wrapper is built (about a second) only for a cap it could reach: ZPAQ never grows the source by more than a
    header, and the literal spends at most 4 bytes on one."""
    src = Path(__file__).stat().st_size
    if 4 * (src + 4096) + len(WRAPPER_HEAD) + len(WRAPPER_TAIL) < cfg.artifact_limit_bytes:
        return
    code = len(shipped_code())
    if code >= cfg.artifact_limit_bytes:
        raise ConfigError(f"ARTIFACT_LIMIT_BYTES={cfg.artifact_limit_bytes} cannot be met: the counted code alone is "
                          f"{code} bytes; raise the cap")


def summary_path(cfg: Config) -> Path:
    """The run's JSON summary: written last, so its presence means the pipeline ran to its end (run.sh reads it)."""
    return Path(cfg.output_dir) / "logs" / f"{cfg.run_id}.summary.json"


def run_outputs(cfg: Config) -> list[Path]:
    """The files this run writes: its log and summary; a training run or a re-pack also the artifact and the
    counted code; a training run also the checkpoint (a re-pack reads it)."""
    out = Path(cfg.output_dir)
    files = [out / "logs" / f"{cfg.run_id}.txt", summary_path(cfg)]
    if not cfg.eval_only:
        files += [out / ARTIFACT_NAME, out / CODE_NAME]
    if not cfg.eval_only and not cfg.skip_train:
        files.append(out / CHECKPOINT_NAME)
    return files


def check_outputs_free(cfg: Config) -> None:
    """No run overwrites another's files, whatever its seed and however it ends: a run whose files exist is refused
    before any work (run.sh calls this in its preflight too)."""
    taken = [p for p in run_outputs(cfg) if p.exists()]
    if not taken:
        return
    hint = ""
    if Path(cfg.output_dir, CHECKPOINT_NAME) in taken and not Path(cfg.output_dir, ARTIFACT_NAME).exists():
        hint = f"; to re-pack that run's checkpoint, set SKIP_TRAIN=1 (it writes beside it, as RUN_ID {cfg.run_id}_repack)"
    raise ConfigError(f"OUTPUT_DIR={cfg.output_dir} already holds another run's files ("
                      + ", ".join(str(p.relative_to(cfg.output_dir)) for p in taken) + "): a run never overwrites "
                      "them; choose another OUTPUT_DIR (run.sh: RUN_DIR) or RUN_ID, or move them away" + hint)


def lock_output_dir(cfg: Config, create: bool = True) -> None:
    """Two runs launched into one OUTPUT_DIR before either wrote a file would both pass check_outputs_free and
    overwrite each other: rank 0 holds an exclusive lock on the folder for the life of its process (the kernel lets
    it go however the process ends; the descriptor is never closed). run.sh's preflight takes it for a moment too,
    without creating the folder (`create`): a folder that does not exist has no run writing into it."""
    if int(os.environ.get("RANK", "0")) != 0 or not (create or os.path.isdir(cfg.output_dir)):
        return
    import fcntl

    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(cfg.output_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another run is writing into OUTPUT_DIR={cfg.output_dir} now: wait for it to end, or "
                          "choose another OUTPUT_DIR (run.sh: RUN_DIR)") from None
    except OSError:  # a filesystem without locks (some network mounts): the checks for existing files still hold
        os.close(fd)


def write_outputs(blob: bytes, code: bytes, cfg: Config, rt: Runtime, log: Logger) -> dict:
    """Rank 0 writes the artifact and the counted code wrapper (atomically); sizes go to the log and the summary.
    Every rank learns whether the writes succeeded, so that a full disk stops all of them with the same error."""
    out, error = Path(cfg.output_dir), ""
    if rt.is_main:
        try:
            write_atomic(out / ARTIFACT_NAME, blob)
            write_atomic(out / CODE_NAME, code)
        except OSError as e:
            error = str(e)
    if not rank0_decides(rt, [int(not error)])[0]:
        raise OSError(error or "rank 0 could not write the artifact")
    return artifact_sizes(len(blob), code, cfg, log)


def artifact_sizes(model_bytes: int, code: bytes, cfg: Config, log: Logger) -> dict:
    sizes = {"bytes_model": model_bytes, "bytes_code": len(code), "bytes_total": model_bytes + len(code)}
    sizes["valid_size"] = sizes["bytes_total"] <= cfg.artifact_limit_bytes
    log(f"Serialized model int6+{cfg.compressor}: {sizes['bytes_model']} bytes")
    log(f"Code size: {sizes['bytes_code']} bytes")
    log(f"code_sha256:{hashlib.sha256(code).hexdigest()}")
    log(f"Total submission size int6+{cfg.compressor}: {sizes['bytes_total']} bytes")
    if not sizes["valid_size"]:
        log(f"ERROR: ARTIFACT OVER LIMIT: {sizes['bytes_total']} > ARTIFACT_LIMIT_BYTES={cfg.artifact_limit_bytes}; "
            "this run is NOT a valid submission (files are kept)")
    else:
        log(f"artifact_margin_bytes:{cfg.artifact_limit_bytes - sizes['bytes_total']}")
    return sizes


@dataclass
class Run:
    """What configure decides once: the config, the runtime and the logger; for a re-pack, the checkpoint's weights
    (verified there, before any work, and loaded once)."""
    cfg: Config
    rt: Runtime
    log: Logger
    checkpoint: dict[str, Tensor] | None = None


def configure() -> Run:
    """Config from the environment (a re-pack's model from its checkpoint, EVAL_ONLY's model and evaluation settings
    from its artifact), the runtime and the logger. Everything checkable without data is checked here, in seconds:
    a config error exits before any work."""
    try:
        cfg, warnings, explicit, state = *load_config_explicit(), None
        if cfg.skip_train:
            saved, state = load_checkpoint(checkpoint_path(cfg))  # verified now, not after the compile warm-up
            cfg = config_from_saved(cfg, saved, MODEL_FIELDS, explicit, checkpoint_path(cfg), "checkpoint")
        if cfg.eval_only:
            saved = artifact_config(artifact_path(cfg))
            cfg = config_from_saved(cfg, saved, MODEL_FIELDS + EVAL_FIELDS, explicit, artifact_path(cfg), "artifact")
        cfg = fill_defaults(cfg, explicit)
        check_compressor(cfg)
        check_code_fits(cfg)
        lock_output_dir(cfg)
        check_outputs_free(cfg)
        rt = setup_runtime(cfg)
        check_attention_fits(cfg, rt, validate_world(cfg, rt.world_size))
    except (ConfigError, ArtifactError) as e:
        sys.exit(f"config error: {e}")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    log = Logger(str(Path(cfg.output_dir) / "logs" / f"{cfg.run_id}.txt") if rt.is_main else None)
    log_header(cfg, rt, log, warnings)
    return Run(cfg, rt, log, state)


def prepare_inputs(cfg: Config, rt: Runtime, log: Logger) -> RunInputs:
    """Preflight (every data check before anything is paid for), then the validation set."""
    try:
        sp, train_paths = preflight(cfg, log)
        val = load_validation(cfg, sp)
    except (ConfigError, DataError) as e:
        sys.exit(f"preflight error: {e}")
    log(f"val_loader:tokens:{val.tokens.numel() - 1} bytes:{int(val.token_bytes[1:].sum())} docs:{val.n_docs}")
    data = TrainData(train_paths, cfg, rt, validate_world(cfg, rt.world_size))
    log(f"train_batch_tokens:{cfg.train_batch_tokens} grad_accum_steps:{data.accum} world_size:{rt.world_size}")
    return RunInputs(sp, data, val)


def state_digest(config: dict, state: dict[str, Tensor]) -> str:
    """sha256 of a checkpoint's config and every tensor's name, dtype, shape and bytes: a flipped bit anywhere in the
    weights changes it (torch.load itself checks nothing)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path, cfg: Config, state: dict[str, Tensor], log: Logger) -> None:
    """The float checkpoint with its digest, serialised in memory and written atomically (write_atomic): a full disk
    or a kill mid-write leaves the previous file (or none), never a truncated one."""
    config, host = dataclasses.asdict(cfg), {k: v.detach().cpu() for k, v in state.items()}
    buf = io.BytesIO()
    torch.save({"config": config, "state_dict": host, "sha256": state_digest(config, host)}, buf)
    write_atomic(path, buf.getbuffer().tobytes())
    log(f"saved:{path}")


def load_checkpoint(path: Path) -> tuple[Config, dict[str, Tensor]]:
    """A checkpoint's config and weights (on the host), refused with the cause when it is missing, unreadable, from
    another version of this script, or corrupted (its digest differs)."""
    if not path.is_file():
        raise ConfigError(f"the checkpoint {path} does not exist (INIT_MODEL_PATH, default OUTPUT_DIR/final_model.pt)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        config, state, digest = ck["config"], ck["state_dict"], ck.get("sha256")
    except Exception as e:  # noqa: BLE001 - a truncated zip, a damaged pickle, another kind of file
        raise ConfigError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:120]}): it is damaged or "
                          "not a final_model.pt; use another copy") from None
    if digest is None:
        raise ConfigError(f"{path} has no digest: it was not written by this train_gpt.py, so its bytes cannot be trusted")
    if state_digest(config, state) != digest:
        raise ConfigError(f"{path} is corrupted: its weights do not match the digest saved with them; use another copy")
    return config_from_dict(config, str(path)), state


def calibration_reserve(model: GPT, cfg: Config, rt: Runtime, data: TrainData, log: Logger,
                        now: typing.Callable[[], float] = time.perf_counter) -> float:
    """The part of MAX_WALLCLOCK_SECONDS kept for GPTQ calibration, projected before the training clock starts from
    the real thing: one calibration batch's Hessian pass, timed after an untimed one, times this rank's batches,
    times the passes calibration makes (phase 1 and the loop-aware phase 2, which the rate control's later packs
    reuse), 10% over, plus GPTQ_RESERVE_SECONDS; the slowest rank's. A reserve that leaves no training is refused."""
    if not cfg.max_wallclock_seconds:
        return 0.0
    batches = data.calibration_batches()
    names = {n for n, t in model.state_dict().items() if quant_plan(n, t, cfg).method == "gptq"}
    passes = 1 + int(cfg.loop_aware_gptq and any(is_crawler(n, cfg) for n in names)
                     and any(not is_crawler(n, cfg) for n in names))
    loops = model.active_loops
    model.set_active_loops(cfg.n_loops)
    collect_hessians(model, batches[:1], names, rt)
    sync(rt.device)
    t0 = now()
    collect_hessians(model, batches[:1], names, rt)
    sync(rt.device)
    per_batch = all_reduce_(torch.tensor([now() - t0], dtype=torch.float64, device=rt.device),
                            dist.ReduceOp.MAX if rt.world_size > 1 else None).item()
    model.set_active_loops(loops)
    projected = per_batch * len(batches) * passes if names else 0.0
    reserve = 1.1 * projected + cfg.gptq_reserve_seconds
    log(f"calibration_projection: {1000 * per_batch:.0f}ms per batch x {len(batches)} batches x {passes} passes = "
        f"{projected:.1f}s; reserve {reserve:.1f}s of MAX_WALLCLOCK_SECONDS={cfg.max_wallclock_seconds:.0f}")
    if reserve >= cfg.max_wallclock_seconds:  # training gets MAX_WALLCLOCK_SECONDS less the whole reserve
        raise ConfigError(f"calibration projects to {projected:.0f}s, which leaves no training inside "
                          f"MAX_WALLCLOCK_SECONDS={cfg.max_wallclock_seconds:.0f}: lower GPTQ_CAL_SAMPLES or raise the cap")
    return reserve - cfg.gptq_reserve_seconds  # GPTQ_RESERVE_SECONDS is already out of cfg.train_budget_ms


def train_or_load(model: GPT, compiled: nn.Module, cfg: Config, rt: Runtime, inputs: RunInputs, log: Logger,
                  reserve_s: float = 0.0, checkpoint: dict[str, Tensor] | None = None) -> TrainResult:
    """Train and save the float checkpoint (then validate it), or (SKIP_TRAIN) load `checkpoint`, the weights
    configure read and verified: both give a TrainResult.
    A signal or a failure during training saves the averaged weights (Rescue) and exits saying how to re-pack them;
    a diverged loss exits at once."""
    if cfg.skip_train:
        model.load_state_dict(checkpoint)
        model.set_active_loops(cfg.n_loops)
        log(f"skip_train: loaded {checkpoint_path(cfg)}")
        return TrainResult(0, 0.0, False, checkpoint, 0.0)
    path = Path(cfg.output_dir) / CHECKPOINT_NAME
    stop = Rescue(path, cfg, rt, log)
    stop.install()
    try:
        result = train(model, compiled, cfg, rt, inputs.train, inputs.val, log, stop=stop, reserve_s=reserve_s)
    except Interrupted as e:
        stop.finish(e)
    except BaseException as e:
        stop.uninstall()
        if isinstance(e, Diverged):
            log(f"ERROR: {e}")
            sys.exit(f"error: {e}")
        raise
    # The loop is over: a signal from here on waits for this save (the rescue's watcher has nothing left to save)
    stop.handled.set()
    left = "no checkpoint was written (see the ERROR above)"
    if rt.is_main:
        try:
            save_checkpoint(path, cfg, result.final_state, log)
            left = f"the trained weights are in {path}; {repack_hint(path)}"
        except OSError as e:  # the disk filled during the run: the artifact, 10x smaller, is what a submission needs
            log(f"ERROR: {e}; going on to calibration, packing and evaluation, which need no checkpoint")
    stop.after_training(left)
    barrier()
    validate_and_log(compiled, inputs.val, cfg, rt, result.steps, result.train_ms, log)
    return result


def calibrate_and_pack(model: GPT, cfg: Config, rt: Runtime, inputs: RunInputs, result: TrainResult,
                       log: Logger) -> tuple[dict, float]:
    """GPTQ calibration on training data (inside the training budget), then quantization and packing under the
    cap. Only the passes over training batches (phase-1 and the loop-aware phase-2 Hessian collection) count
    against MAX_WALLCLOCK_SECONDS."""
    cal = calibrate(model, cfg, rt, inputs.train.calibration_batches(), log)
    t0, phase1_s, code = time.perf_counter(), cal.seconds, shipped_code()
    blob = pack_within_cap(model, cal, cfg, rt, len(code), log)
    total_s = result.train_ms / 1000 + cal.seconds
    log(f"gptq:calibration time:{cal.seconds:.1f}s train+calibration:{total_s:.1f}s "
        f"quantize_and_pack_time:{time.perf_counter() - t0 - (cal.seconds - phase1_s):.1f}s")
    if cfg.max_wallclock_seconds and total_s > cfg.max_wallclock_seconds:
        over = math.ceil(total_s - cfg.max_wallclock_seconds)  # the projected reserve fell short by this much
        log(f"WARNING: training + calibration took {total_s:.1f}s > MAX_WALLCLOCK_SECONDS="
            f"{cfg.max_wallclock_seconds}; raise GPTQ_RESERVE_SECONDS by at least {over}s "
            f"(to {cfg.gptq_reserve_seconds + over:g})")
    sizes = write_outputs(blob, code, cfg, rt, log)
    barrier()
    return sizes, cal.seconds


def run_verdict(cfg: Config, result: TrainResult | None, sizes: dict, cal_s: float, evals: dict
                ) -> tuple[list[str], list[str]]:
    """(broken, not_a_submission): rules of the challenge the run broke (over the cap, over a budget, unequal
    target counts: the process exits non-zero), and what makes it no submission by the user's own choice (a val
    prefix, a re-pack without training, an evaluation of an artifact alone)."""
    broken = []
    if not sizes["valid_size"]:
        broken.append(f"artifact {sizes['bytes_total']} bytes > {cfg.artifact_limit_bytes}")
    if result is not None and cfg.max_wallclock_seconds and result.train_ms / 1000 + cal_s > cfg.max_wallclock_seconds:
        broken.append(f"training + calibration {result.train_ms / 1000 + cal_s:.1f}s > {cfg.max_wallclock_seconds:.0f}s")
    if not evals["eval_within_budget"]:
        broken.append(f"evaluation {evals['eval_total_s']:.1f}s > {cfg.eval_budget_seconds:.0f}s")
    if not evals["same_targets"]:
        broken.append("the evaluation modes scored different targets")
    chosen = (["VAL_TOKEN_LIMIT scores a prefix of the val split"] if cfg.val_token_limit else []) + \
             (["SKIP_TRAIN re-packs a checkpoint: no training time"] if cfg.skip_train else []) + \
             (["EVAL_ONLY scores an artifact: its training is another run's"] if cfg.eval_only else [])
    return broken, chosen


def write_summary(cfg: Config, rt: Runtime, inputs: RunInputs, result: TrainResult | None, sizes: dict, cal_s: float,
                  evals: dict, log: Logger) -> bool:
    """The machine-readable summary (written atomically); returns whether the run kept the challenge's rules."""
    val = inputs.val
    broken, chosen = run_verdict(cfg, result, sizes, cal_s, evals)
    summary = {
        "run_id": cfg.run_id, "seed": cfg.seed, "config": dataclasses.asdict(cfg),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "hardware": {"device": rt.hardware, "world_size": rt.world_size},
        "val": {"tokens": val.tokens.numel() - 1, "bytes": int(val.token_bytes[1:].sum()), "docs": val.n_docs},
        "train": None if result is None else {
            "steps": result.steps, "train_ms": result.train_ms, "stopped_early": result.stopped_early,
            "peak_memory_mib": result.peak_mem_mib, "skipped": cfg.skip_train},
        "calibration_s": cal_s, "sizes": sizes, "eval": evals,
        "valid": not broken and not chosen, "invalid_reasons": broken + chosen,
    }
    if rt.is_main:
        path = summary_path(cfg)
        write_atomic(path, json.dumps(json_safe(summary), indent=1, allow_nan=False).encode())
        log(f"summary:{path} valid:{int(summary['valid'])}" + (f" reasons:{'; '.join(broken + chosen)}"
                                                                if broken or chosen else ""))
    return not broken


def json_safe(x):
    """JSON has no NaN or infinity: a non-finite figure (a broken model's loss) is written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def pipeline(run: Run) -> bool:
    """preflight -> the evaluation's warm-up -> train (or load) -> calibrate, quantize, pack -> evaluate -> summary
    (EVAL_ONLY: preflight -> evaluate the artifact -> summary). Returns whether the run kept the challenge's rules."""
    cfg, rt, log = run.cfg, run.rt, run.log
    inputs = prepare_inputs(cfg, rt, log)
    if cfg.eval_only:
        artifact = artifact_path(cfg)
        evals = run_evaluation(artifact, inputs.val, cfg, rt, log)
        sizes = artifact_sizes(artifact.stat().st_size, shipped_code(), cfg, log)
        return write_summary(cfg, rt, inputs, None, sizes, 0.0, evals, log)
    model, compiled = build_model(cfg, rt)
    log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    ev = prepare_evaluation(model, cfg, rt, inputs.val, log)
    reserve = 0.0 if cfg.skip_train else calibration_reserve(model, cfg, rt, inputs.train, log)
    result = train_or_load(model, compiled, cfg, rt, inputs, log, reserve, run.checkpoint)
    sizes, cal_s = calibrate_and_pack(model, cfg, rt, inputs, result, log)
    evals = run_evaluation(Path(cfg.output_dir) / ARTIFACT_NAME, inputs.val, cfg, rt, log, ev)
    return write_summary(cfg, rt, inputs, result, sizes, cal_s, evals, log)


def main() -> None:
    run = configure()
    try:
        kept_rules = pipeline(run)
    except (ConfigError, DataError, ArtifactError, OSError) as e:  # a budget no plan meets, a damaged artifact, a
        run.log(f"ERROR: {e}")  # full disk: one line with the cause and the fix, no traceback
        sys.exit(f"error: {e}")
    except Stopped as e:
        run.log(f"ERROR: {e}")
        os._exit(128 + e.signum)  # no teardown: the other ranks are being stopped too, or are gone
    shutdown()
    if not kept_rules:
        sys.exit("error: this run broke a rule of the challenge (see summary reasons above); its files are kept")


if __name__ == "__main__":
    main()
