"""Flat + crawler GPT for the Parameter Golf challenge (10 min on 8xH100, 16,000,000-byte artifact).

Pipeline, in file order: config -> runtime -> data -> model -> optimizers -> training ->
calibration/quantization -> packing -> evaluation -> main.

Launch: `torchrun --standalone --nproc_per_node=8 train_gpt.py` (defaults are the reference run);
on CPU `python train_gpt.py` or `torchrun --nproc_per_node=2 train_gpt.py` (gloo).
All configuration comes from environment variables named after the `Config` fields (upper case).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import difflib
import glob
import hashlib
import json
import math
import os
import platform
import resource
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# =============================================================================================
# Config
# =============================================================================================


def _f(default, help: str, lo: float | None = None, hi: float | None = None, choices: tuple = (), model=False):
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "choices": choices, "model": model})


def _m(default, help: str, lo: float | None = None, hi: float | None = None, choices: tuple = ()):
    """A model field: it shapes the weights or the forward pass, so a checkpoint or an artifact carries it."""
    return _f(default, help, lo, hi, choices, model=True)


@dataclass(frozen=True)
class Config:
    """Every knob of the run. Env var name = field name in upper case. Defaults = reference run
    (Ouroboros #1283: 9 flat + 1 crawler x2, sp1024, loop-aware GPTQ, brotli)."""

    # --- run and data ---
    seed: int = _f(1337, "random seed (weights, data order)", 0)
    run_id: str = _f("", "name of this run; default: seed<SEED>")
    output_dir: str = _f(".", "where final_model.pt, the artifact, logs/ and the summary go")
    data_dir: str = _f("./data", "root holding datasets/ and tokenizers/")
    data_path: str = _f("", "shard folder; default: DATA_DIR/datasets/<variant>")
    tokenizer_path: str = _f("", "SentencePiece model; default: DATA_DIR/tokenizers/<variant>.model")
    vocab_size: int = _m(1024, "must equal the tokenizer's piece count", 2, 65536)
    caseops_enabled: bool = _f(False, "CaseOps data: byte counts come from the val byte sidecar")
    bos_id: int = _m(1, "document separator id; checked against the tokenizer", 0)
    val_token_limit: int = _f(0, "score only the first N val tokens (0 = all; smoke tests only)", 0)
    allow_unknown_env: bool = _f(False, "continue despite env vars that look like ours but are not read")
    # --- schedule and batch ---
    iterations: int = _f(20000, "maximum optimizer steps", 1)
    max_wallclock_seconds: float = _f(600.0, "training wallclock cap incl. calibration (0 = none)", 0)
    gptq_reserve_seconds: float = _f(15.0, "part of the cap kept for GPTQ calibration", 0)
    train_batch_tokens: int = _f(786_432, "global tokens per optimizer step", 1)
    train_seq_len: int = _f(2048, "training sequence length", 8)
    grad_accum_steps: int = _f(0, "micro-batches per rank per step (0 = 8 // world size)", 0)
    warmup_steps: int = _f(20, "compile priming steps whose updates are discarded (CUDA only)", 0)
    warmdown_iters: int = _f(2000, "warmdown length in steps, converted to time under a cap", 0)
    warmdown_frac: float = _f(0.0, "warmdown as a fraction of the budget (overrides WARMDOWN_ITERS)", 0, 1)
    min_lr: float = _f(0.0, "LR floor as a fraction of each group's peak LR", 0, 1)
    train_log_every: int = _f(500, "log a train line every N steps (and the first 10)", 1)
    val_loss_every: int = _f(4000, "validate every N steps (0 = only at the end)", 0)
    val_batch_tokens: int = _f(524_288, "tokens per validation forward across all ranks", 1)
    # --- model ---
    use_crawler: bool = _m(True, "flat + crawler model; 0 gives a plain GPT of NUM_LAYERS blocks")
    num_layers: int = _m(11, "blocks of the plain GPT (USE_CRAWLER=0)", 1)
    num_flat_layers: int = _m(9, "unique blocks around the crawler", 0)
    flat_encoder_layers: int = _m(-1, "flat blocks before the crawler (-1 = NUM_FLAT_LAYERS // 2)", -1)
    num_crawler_layers: int = _m(1, "shared blocks in the crawler", 1)
    crawler_loops: int = _m(2, "passes through the shared blocks", 1)
    crawler_start_frac: float = _f(0.0, "training fraction before which the crawler runs once", 0, 1)
    crawler_mlp_mult: float = _m(6.0, "crawler MLP hidden = mult * MODEL_DIM", 0.25)
    crawler_mlp_leaky_slope: float = _m(0.5, "crawler LeakyReLU slope (0 = ReLU^2)", 0, 1)
    crawler_loop_rope_scales: tuple = _m((9, 1, 1), "per-loop RoPE frequency divisors, comma list")
    inst_dim: int = _m(32, "flow-instruction bottleneck width (0 = off)", 0)
    model_dim: int = _m(512, "residual width", 16)
    num_heads: int = _m(8, "query heads", 1)
    num_kv_heads: int = _m(4, "key/value heads (GQA)", 1)
    mlp_mult: float = _m(3.0, "flat MLP hidden = mult * MODEL_DIM", 0.25)
    mlp_leaky_slope: float = _m(0.5, "flat LeakyReLU slope (0 = ReLU^2)", 0, 1)
    rope_base: float = _m(10000.0, "RoPE base", 1)
    rope_dims: int = _m(16, "rotated dims per head (partial RoPE)", 2)
    qk_gain_init: float = _m(4.0, "initial per-head query gain", 0)
    xsa_last_n: int = _m(11, "exclusive self-attention on the last N distinct blocks", 0)
    gated_attn_enabled: bool = _m(False, "per-head sigmoid output gate (#1736)")
    parallel_residual_start: int = _m(-1, "blocks from this index run attn and MLP in parallel (-1 = off)", -1)
    bigram_vocab_size: int = _m(2048, "BigramHash buckets (0 = off)", 0)
    bigram_dim: int = _m(128, "BigramHash embedding width", 1)
    smear_gate: bool = _m(True, "SmearGate: blend each position with the previous one (never across BOS)")
    ln_scale: bool = _m(True, "scale block inputs by 1/sqrt(layer+1)")
    logit_softcap: float = _m(30.0, "tanh soft cap on logits", 1)
    tied_embed_init_std: float = _m(0.005, "init std of the tied embedding", 0)
    # --- optimizers ---
    matrix_lr: float = _f(0.03, "Muon LR for 2-D block matrices", 0)
    embed_lr: float = _f(0.035, "AdamW LR for embeddings (tied head included)", 0)
    scalar_lr: float = _f(0.025, "AdamW LR for gains, scales, gates", 0)
    muon_momentum: float = _f(0.99, "Muon momentum after warmup", 0, 1)
    muon_momentum_warmup_start: float = _f(0.92, "Muon momentum at step 0", 0, 1)
    muon_momentum_warmup_steps: int = _f(1500, "steps to reach MUON_MOMENTUM", 0)
    muon_backend_steps: int = _f(5, "Newton-Schulz iterations", 1, 20)
    muon_wd: float = _f(0.04, "decoupled weight decay on Muon matrices", 0)
    adam_wd: float = _f(0.04, "decoupled weight decay on embeddings", 0)
    beta1: float = _f(0.9, "AdamW beta1", 0, 1)
    beta2: float = _f(0.95, "AdamW beta2", 0, 1)
    adam_eps: float = _f(1e-8, "AdamW epsilon", 0)
    grad_clip_norm: float = _f(0.3, "global grad-norm clip (0 = off)", 0)
    skip_ema: bool = _f(False, "turn off the EMA of the weights (on by default, #1855)")
    ema_decay: float = _f(0.9965, "EMA decay (#1855)", 0, 1)
    swa_every: int = _f(0, "SWA instead of EMA: average every N steps once LR scale < 0.2 (0 = off)", 0)
    # --- calibration, quantization, packing ---
    skip_gptq: bool = _f(False, "round-to-nearest instead of GPTQ")
    loop_aware_gptq: bool = _f(True, "re-collect crawler Hessians through the quantized flat layers")
    gptq_cal_samples: int = _f(128, "calibration sequences (training data)", 1)
    gptq_cal_seq_len: int = _f(2048, "calibration sequence length (0 = TRAIN_SEQ_LEN)", 0)
    embed_bits: int = _f(8, "bits of the tied embedding", 7, 8)
    mlp_clip_sigmas: float = _f(0.0, "MLP per-row clip at k std devs (0 = search the clip)", 0)
    attn_clip_sigmas: float = _f(0.0, "attention per-row clip at k std devs (0 = search)", 0)
    embed_clip_sigmas: float = _f(0.0, "embedding per-row clip at k std devs (0 = search)", 0)
    gated_attn_quant_gate: bool = _f(False, "store attention gate rows as int8 instead of fp16 (#1736)")
    compressor: str = _f("brotli", "artifact compressor", choices=("brotli", "zstd", "lzma"))
    artifact_limit_bytes: int = _f(16_000_000, "cap on model + code bytes (decimal)", 1)
    artifact_fit: bool = _f(True, "widen the int6 steps just enough that the estimated artifact fits the cap")
    skip_train: bool = _f(False, "skip training: calibrate, quantize, pack and evaluate INIT_MODEL_PATH")
    init_model_path: str = _f("", "float checkpoint for SKIP_TRAIN (default OUTPUT_DIR/final_model.pt)")
    # --- evaluation and test-time training ---
    eval_seq_len: int = _f(2048, "evaluation window length", 8)
    eval_stride: int = _f(64, "sliding-window stride (tokens scored per window after the first)", 1)
    eval_batch_tokens: int = _f(262_144, "tokens per evaluation forward on each rank", 1)
    eval_budget_seconds: float = _f(600.0, "evaluation time budget; projected overruns are reported early", 1)
    ttt_enabled: bool = _f(True, "phased score-first test-time training after the plain evaluations")
    ttt_lora_rank: int = _f(64, "rank of the per-document LoRA on Q/K/V/O/MLP/head", 1)
    ttt_chunk_size: int = _f(64, "tokens scored per chunk before each LoRA step", 1)
    ttt_lr: float = _f(0.001, "LoRA learning rate", 0)
    ttt_weight_decay: float = _f(0.5, "decoupled weight decay on the LoRA", 0)
    ttt_batch_docs: int = _f(64, "documents adapted in parallel per batch", 1)
    phased_ttt_prefix_docs: int = _f(2000, "documents whose scored tokens feed the global SGD phases", 0)
    phased_ttt_num_phases: int = _f(3, "global SGD phases over the prefix documents", 0)
    ttt_global_lr: float = _f(0.001, "SGD learning rate of the global phases (momentum 0.9)", 0)
    # --- device ---
    compile_enabled: bool = _f(True, "torch.compile the model on CUDA")
    compile_fullgraph: bool = _f(True, "compile with fullgraph=True")

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
    def n_loops(self) -> int:
        """Passes through the crawler at full depth (0 without a crawler)."""
        return self.crawler_loops if self.use_crawler else 0

    @property
    def train_budget_ms(self) -> float:
        """Wallclock for the training loop: the cap minus the calibration reserve (0 = step budget)."""
        if not self.max_wallclock_seconds:
            return 0.0
        return (self.max_wallclock_seconds - self.gptq_reserve_seconds) * 1000


ENV_NAMES = {f.name.upper(): f for f in dataclasses.fields(Config)}
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["model"])
# Names exported by the seeds' run scripts that this trainer deliberately does not read.
RETIRED_ENV = {
    "COMPLEMENT_ALPHA", "MTP_NUM_HEADS", "LATE_QAT_THRESHOLD", "NGRAM_EVAL_ORDER", "DELTA_NET_HEADS",
    "CRAWLER_QUANT_INT8", "TORCHDYNAMO_OPTIMIZE_DDP", "CRAWLER_MLP_CHOKE_DIM", "CRAWLER_MLP_CHOKE_SHAPE",
    "CRAWLER_MLP_CHOKE_GROUPS", "CRAWLER_LOOP_SMEAR", "CRAWLER_TAP_DIM", "CRAWLER_TAP_LOOP_SPECIFIC",
    "CRAWLER_TAP_LAYERS", "ANCHOR_DIM", "FLAT_WEIGHT_SHARE", "MLP_ACT", "VE_ENABLED", "QAT_ENABLED",
    "DDP_FIND_UNUSED_PARAMETERS", "SWA_ENABLED", "TIE_EMBEDDINGS", "HEAD_LR", "TIED_EMBED_LR",
}
# Variables owned by run.sh, the launcher, Python or libraries; never ours.
FOREIGN_PREFIXES = ("TORCH", "NCCL", "CUDA", "OMP_", "PYTHON", "MASTER_", "GROUP_", "ROLE_", "LOCAL_",
                    "TRITON", "HF_", "PYTEST", "NPROC", "RANK", "WORLD_SIZE", "LC_", "XDG_", "DEVICE", "RECORD_DIR",
                    "RUN_DIR", "MIN_FREE_GB")
OUR_PREFIXES = {n.split("_")[0] for n in ENV_NAMES} - {"MAX", "MIN", "USE", "NUM", "RUN", "DATA", "OUTPUT"}


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
            return float(raw)
        if typ is tuple:
            return tuple(int(x) for x in raw.split(",") if x.strip())
        return raw
    except ValueError:
        kind = {bool: "0 or 1", int: "an integer", float: "a number", tuple: "a comma list of integers"}[typ]
        raise ConfigError(f"{name}={raw!r} is not {kind}") from None


def unknown_env_report(environ: typing.Mapping[str, str]) -> list[str]:
    """Env vars that look like ours but are not read: typos and retired seed names."""
    out = []
    for name in sorted(environ):
        if name in ENV_NAMES or name.startswith(FOREIGN_PREFIXES):
            continue
        close = difflib.get_close_matches(name, list(ENV_NAMES), n=1, cutoff=0.8)
        if name in RETIRED_ENV:
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


def config_from_dict(d: dict) -> Config:
    """A Config saved as a dict (checkpoint, artifact header); JSON turns tuples into lists."""
    hints = typing.get_type_hints(Config)
    return Config(**{k: (tuple(v) if hints[k] is tuple else v) for k, v in d.items()})


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
    if not cfg.run_id:
        cfg = dataclasses.replace(cfg, run_id=f"seed{cfg.seed}")
    if not cfg.data_path:
        cfg = dataclasses.replace(cfg, data_path=os.path.join(cfg.data_dir, "datasets", cfg.variant))
    if not cfg.tokenizer_path:
        tok = (f"fineweb_{cfg.vocab_size}_bpe_lossless_caps_caseops_v1_reserved.model" if cfg.caseops_enabled
               else f"fineweb_{cfg.vocab_size}_bpe.model")
        cfg = dataclasses.replace(cfg, tokenizer_path=os.path.join(cfg.data_dir, "tokenizers", tok))
    validate_config(cfg, explicit)
    return cfg, unknown, explicit


def validate_config(cfg: Config, explicit: set[str] = frozenset()) -> None:
    errs = []
    for f in dataclasses.fields(cfg):
        v, m, env = getattr(cfg, f.name), f.metadata, f.name.upper()
        if m.get("lo") is not None and v < m["lo"]:
            errs.append(f"{env}={v} is below its minimum {m['lo']}")
        if m.get("hi") is not None and v > m["hi"]:
            errs.append(f"{env}={v} is above its maximum {m['hi']}")
        if m.get("choices") and v not in m["choices"]:
            errs.append(f"{env}={v!r} is not one of {', '.join(m['choices'])}")
    if cfg.model_dim % cfg.num_heads:
        errs.append(f"MODEL_DIM={cfg.model_dim} is not divisible by NUM_HEADS={cfg.num_heads}; "
                    "pick NUM_HEADS dividing MODEL_DIM")
    elif (cfg.model_dim // cfg.num_heads) % 2:
        errs.append(f"head dim MODEL_DIM/NUM_HEADS={cfg.model_dim // cfg.num_heads} must be even for RoPE")
    elif cfg.rope_dims > cfg.model_dim // cfg.num_heads or cfg.rope_dims % 2:
        errs.append(f"ROPE_DIMS={cfg.rope_dims} must be even and at most the head dim "
                    f"{cfg.model_dim // cfg.num_heads}")
    if cfg.num_heads % cfg.num_kv_heads:
        errs.append(f"NUM_HEADS={cfg.num_heads} is not divisible by NUM_KV_HEADS={cfg.num_kv_heads}")
    if cfg.use_crawler:
        if len(cfg.crawler_loop_rope_scales) < cfg.crawler_loops or min(cfg.crawler_loop_rope_scales, default=1) < 1:
            errs.append(f"CRAWLER_LOOP_ROPE_SCALES={','.join(map(str, cfg.crawler_loop_rope_scales))} needs at "
                        f"least CRAWLER_LOOPS={cfg.crawler_loops} positive entries")
        if cfg.n_encoder > cfg.num_flat_layers:
            errs.append(f"FLAT_ENCODER_LAYERS={cfg.flat_encoder_layers} exceeds NUM_FLAT_LAYERS={cfg.num_flat_layers}")
    if cfg.train_batch_tokens % cfg.train_seq_len:
        errs.append(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} is not a multiple of "
                    f"TRAIN_SEQ_LEN={cfg.train_seq_len}")
    if "WARMDOWN_FRAC" in explicit and "WARMDOWN_ITERS" in explicit:
        errs.append("WARMDOWN_FRAC and WARMDOWN_ITERS are both set; keep one (FRAC is the budget fraction)")
    if cfg.max_wallclock_seconds and cfg.gptq_reserve_seconds >= cfg.max_wallclock_seconds:
        errs.append(f"GPTQ_RESERVE_SECONDS={cfg.gptq_reserve_seconds} leaves no training time under "
                    f"MAX_WALLCLOCK_SECONDS={cfg.max_wallclock_seconds}")
    if cfg.eval_stride > cfg.eval_seq_len:
        errs.append(f"EVAL_STRIDE={cfg.eval_stride} exceeds EVAL_SEQ_LEN={cfg.eval_seq_len}; tokens would be skipped")
    if cfg.bigram_vocab_size == 1:
        errs.append("BIGRAM_VOCAB_SIZE must be 0 (off) or at least 2")
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
        d = f.default
        d = ",".join(map(str, d)) if isinstance(d, tuple) else (int(d) if isinstance(d, bool) else d)
        rows.append(f"| `{f.name.upper()}` | `{d}` | {f.metadata['help']} |")
    return "\n".join(rows)


# =============================================================================================
# Runtime: distributed, device, logging (the one place these are decided)
# =============================================================================================


class AttentionBackend:
    """Causal attention on [B, T, H, D] tensors (k, v may have fewer heads: GQA). Chosen once by
    `setup_runtime` and handed to the model: FlashAttention 3 on Hopper when importable, PyTorch SDPA
    otherwise (said in the log)."""

    def __init__(self, name: str, fa3=None):
        self.name, self.fa3 = name, fa3

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.fa3 is not None:
            dt = q.dtype
            if dt not in (torch.bfloat16, torch.float16):  # RMSNorm/RoPE run in fp32 under autocast; FA3 needs bf16
                q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
            y = self.fa3(q, k, v, causal=True)
            return (y[0] if isinstance(y, tuple) else y).to(dt)  # some FA3 builds also return the LSE
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=q.size(2) != k.size(2))
        return y.transpose(1, 2)


SDPA = AttentionBackend("sdpa")


def load_fa3():
    """FlashAttention 3's function, or None when it is not importable."""
    try:
        from flash_attn_interface import flash_attn_func
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return flash_attn_func


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    compile: bool
    attn: AttentionBackend = SDPA
    hardware: str = "cpu"

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


def setup_runtime(cfg: Config) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    if not cuda and "OMP_NUM_THREADS" not in os.environ:  # CPU ranks share the cores instead of fighting over them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    fa3 = load_fa3() if cuda else None
    attn = AttentionBackend("fa3", fa3) if fa3 is not None else SDPA
    hardware = torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu")
    return Runtime(rank, world_size, local_rank, device, torch.bfloat16 if cuda else None,
                   cuda and cfg.compile_enabled, attn, hardware)


class Logger:
    """Rank-0 `key:value` lines to stdout and OUTPUT_DIR/logs/RUN_ID.txt."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str) -> None:
        if self.path is None:
            return
        print(msg, flush=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(msg + "\n")


def all_reduce_(t: Tensor, op=None) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_reduce_flat_(tensors: list[Tensor], rt: Runtime, average: bool) -> None:
    """Sum (or average) a list of tensors over ranks in place with one flat all-reduce: the single
    place gradients and shared updates cross ranks."""
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
    if not path.is_file():
        raise DataError(f"missing shard {path}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header (truncated?)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
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
    return np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES)


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= 2**16:
        raise ValueError("token id does not fit uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(header.tobytes())
        fh.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def shard_paths(data_path: str, split: str) -> list[str]:
    return sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_[0-9]*.bin")))


def sidecar_paths(data_path: str) -> list[str]:
    """The CaseOps val byte sidecar, one file per val shard."""
    return sorted(glob.glob(os.path.join(data_path, "fineweb_val_bytes_[0-9]*.bin")))


class TrainLoader:
    """Each optimizer step reads one contiguous global chunk of TRAIN_BATCH_TOKENS(+1) tokens that
    starts at a document boundary; rank r takes micro-batch rows r, r+W, r+2W, ... so the global
    batch is independent of the world size. Shard order and start offset depend only on SEED."""

    def __init__(self, paths: list[str], cfg: Config, bos_id: int, rank: int, world_size: int, accum: int,
                 device: torch.device):
        self.paths, self.cfg, self.bos_id = list(paths), cfg, bos_id
        self.rank, self.world, self.accum, self.device = rank, world_size, accum, device
        rng = np.random.default_rng(cfg.seed)
        self.order = rng.permutation(len(self.paths))
        self.shard_i, self.tokens = 0, load_shard(self.paths[self.order[0]])
        self.pos = int(rng.integers(0, max(1, len(self.tokens) // 2)))

    def _advance_to_bos(self) -> None:
        hits = np.flatnonzero(self.tokens[self.pos:self.pos + 1_000_000] == self.bos_id)
        if hits.size:
            self.pos += int(hits[0])

    def _take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.shard_i = (self.shard_i + 1) % len(self.paths)
                self.tokens, self.pos = load_shard(self.paths[self.order[self.shard_i]]), 0
            chunk = self.tokens[self.pos:self.pos + n]
            parts.append(chunk)
            self.pos += len(chunk)
            n -= len(chunk)
        return np.concatenate(parts)

    def next_batch(self) -> list[tuple[Tensor, Tensor]]:
        """Micro-batches (x, y) of this rank for one optimizer step."""
        T = self.cfg.train_seq_len
        rows = self.cfg.train_batch_tokens // T
        self._advance_to_bos()
        chunk = torch.from_numpy(self._take(rows * T + 1).astype(np.int64))
        self.pos -= 1  # the extra target token is the next step's first input
        x, y = chunk[:-1].view(rows, T), chunk[1:].view(rows, T)
        mine = torch.arange(self.rank, rows, self.world)
        out = []
        for part in mine.chunk(self.accum):
            out.append((x[part].to(self.device, non_blocking=True), y[part].to(self.device, non_blocking=True)))
        return out


@dataclass(frozen=True)
class TrainData:
    """The training shards and how this rank reads them; calibration draws from here too, never from val."""
    paths: list[str]
    cfg: Config
    rt: Runtime
    accum: int

    def loader(self) -> TrainLoader:
        return TrainLoader(self.paths, self.cfg, self.cfg.bos_id, self.rt.rank, self.rt.world_size, self.accum,
                           self.rt.device)

    def calibration_batches(self) -> list[Tensor]:
        """GPTQ_CAL_SAMPLES training sequences, this rank's share, 8 per batch (a seed of their own)."""
        cfg = self.cfg
        seq = cfg.gptq_cal_seq_len or cfg.train_seq_len
        cal = dataclasses.replace(cfg, seed=cfg.seed + 1, train_seq_len=seq, train_batch_tokens=cfg.gptq_cal_samples * seq)
        (x, _), = TrainLoader(self.paths, cal, cfg.bos_id, self.rt.rank, self.rt.world_size, 1, self.rt.device).next_batch()
        return list(x.split(8))


@dataclass
class ValidationData:
    tokens: Tensor  # int64 [N+1]
    token_bytes: Tensor  # int32 [N+1]: bytes of token i when it is a target
    n_docs: int


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
    return ValidationData(torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(tb), n_docs)


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


KNOWN_VAL = {"fineweb10B_sp1024": ValFingerprint(50_000, 62_021_632),
             "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved": ValFingerprint(50_000, 47_851_520, 47_853_344)}


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
    overlap_docs: int
    tokenization: str


def split_docs(tokens: np.ndarray, bos_id: int) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == bos_id)
    return np.split(tokens, starts[1:]) if starts.size else []


def fix_hint(cfg: Config) -> str:
    if cfg.caseops_enabled:
        return ("re-download with `python3 data/cached_challenge_fineweb.py --variant sp8192_caseops` or re-run "
                "prepare_caseops_data.py")
    return "re-download with data/cached_challenge_fineweb.py"


def check_dataset(cfg: Config, sp, need_bos: bool) -> DataReport:
    """Everything about the data that can go wrong, checked in seconds before training. Raises
    DataError/ConfigError naming the cause and the command that fixes it."""
    if not os.path.isdir(cfg.data_path):
        raise DataError(f"DATA_PATH={cfg.data_path} is not a directory; download or prepare the shards "
                        "(see README) or set DATA_PATH")
    if "datasets/datasets" in cfg.data_path.replace(os.sep, "/") and not shard_paths(cfg.data_path, "val"):
        raise DataError(f"DATA_PATH={cfg.data_path} has a doubled datasets/datasets and no shards; point it at the "
                        "shard folder")
    train, val = shard_paths(cfg.data_path, "train"), shard_paths(cfg.data_path, "val")
    if not train or not val:
        raise DataError(f"DATA_PATH={cfg.data_path} has {len(train)} train and {len(val)} val shards; both are "
                        f"needed: {fix_hint(cfg)}")
    for p in train + val:
        read_shard_header(p)
    val_parts = [load_shard(p) for p in val]
    vt, first = np.concatenate(val_parts), load_shard(train[0])
    check_ids(cfg, {"val": vt, "train": first}, need_bos)
    docs = split_docs(vt, cfg.bos_id)
    tokenization = data_tokenization(cfg.data_path)
    check_fingerprint(cfg, vt, len(docs), tokenization)
    check_tokenizer_roundtrip(cfg, sp, docs, tokenization)  # first: a wrong tokenizer fails every later check
    side = check_sidecar(cfg, sp, val, val_parts) if cfg.caseops_enabled else None
    val_hashes = {hash(d.tobytes()) for d in docs if d.size >= 16}
    train_docs = split_docs(first, cfg.bos_id)
    overlap = sum(hash(d.tobytes()) in val_hashes for d in train_docs if d.size >= 16)
    if overlap > 5 + len(docs) // 1000:  # exact duplicates are rare in FineWeb; thousands mean a bad split
        raise DataError(f"{overlap} validation documents also appear in {os.path.basename(train[0])}: validation "
                        f"data leaked into training: {fix_hint(cfg)} (prep with the default --val-docs 50000)")
    val_bytes = int(side.astype(np.int64).sum()) if side is not None else None
    return DataReport(len(train), len(val), int(vt.size), len(docs), val_bytes, len(train_docs), overlap, tokenization)


def check_ids(cfg: Config, parts: dict[str, np.ndarray], need_bos: bool) -> None:
    for name, toks in parts.items():
        top = int(toks.max()) if toks.size else 0
        if top >= cfg.vocab_size:
            raise ConfigError(f"{name} data has token id {top} >= VOCAB_SIZE={cfg.vocab_size}; the shards were made "
                              "with a larger tokenizer: set VOCAB_SIZE/TOKENIZER_PATH to match the data")
        if need_bos and not (toks == cfg.bos_id).any():
            raise DataError(f"{name} shards contain no BOS ({cfg.bos_id}) markers, so documents cannot be split "
                            f"(CaseOps data or TTT need them): {fix_hint(cfg)}")


def check_fingerprint(cfg: Config, vt: np.ndarray, n_docs: int, tokenization: str) -> None:
    """A published split must be complete: 50,000 documents and the known token count. Applies to the
    published tokenization only (lossless shards of the same documents have other counts)."""
    fp = KNOWN_VAL.get(os.path.basename(cfg.data_path.rstrip("/")))
    if fp is None or cfg.val_token_limit or tokenization != "published":
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


def check_sidecar(cfg: Config, sp, val: list[str], val_parts: list[np.ndarray]) -> np.ndarray:
    """The CaseOps byte sidecar must align with the val tokens: one entry per token, BOS and CaseOps markers
    0 (the old #1736 exporter counted markers as bytes), and a plain ASCII piece exactly its own length
    (a shifted sidecar fails this at once). Returns it, concatenated like the val tokens."""
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
    plain_len = plain_piece_lengths(sp, cfg.vocab_size)
    known = plain_len[tokens] > 0
    agree = float((side_all[known] == plain_len[tokens][known]).mean()) if known.any() else 1.0
    if agree < 0.99:
        raise DataError(f"the sidecar disagrees with the tokens ({agree:.1%} of plain ASCII pieces get their own "
                        f"length): misaligned sidecar, or TOKENIZER_PATH is not the data's tokenizer: {fix_hint(cfg)}")
    return side_all


MARKER_IDS, ESC_ID = (4, 5, 6, 7), 7  # TITLE, ALLCAPS, CAPNEXT, ESC in the CaseOps tokenizer (SPEC 4)


def plain_piece_lengths(sp, vocab_size: int) -> np.ndarray:
    """Length of each piece that is printable ASCII without a leading U+2581 (its surface is itself), else 0."""
    out = np.zeros(vocab_size, dtype=np.int64)
    for i in range(min(vocab_size, sp.get_piece_size())):
        piece = sp.id_to_piece(i)
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)) and piece.isascii() and piece.isprintable():
            out[i] = len(piece)
    return out


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
    rep = check_dataset(cfg, sp, need_bos=cfg.caseops_enabled or cfg.ttt_enabled)
    log(f"train_loader:dataset:{os.path.basename(cfg.data_path.rstrip('/'))} train_shards:{rep.train_shards}")
    log(f"val_tokens: {targets_2048(rep.val_tokens)} (targets rounded down to 2048, as older trainers log) "
        f"file_tokens:{rep.val_tokens} val_docs:{rep.val_docs} val_bytes:{rep.val_bytes}")
    log(f"data_check: tokenization:{rep.tokenization} overlap_docs:{rep.overlap_docs}/{rep.train_docs_checked} "
        f"time:{time.perf_counter() - t0:.1f}s")
    return sp, shard_paths(cfg.data_path, "train")


# =============================================================================================
# Model: flat encoder -> crawler (shared blocks, looped) -> flat decoder, tied head
# =============================================================================================


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rope_tables(T: int, rope_dims: int, base: float, scale: float, device, dtype) -> tuple[Tensor, Tensor]:
    """cos/sin for the first `rope_dims` dims of each head; `scale` divides the frequencies."""
    inv = 1.0 / (base ** (torch.arange(0, rope_dims, 2, device=device, dtype=torch.float32) / rope_dims))
    ang = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv / scale)
    return ang.cos().to(dtype)[None, :, None, :], ang.sin().to(dtype)[None, :, None, :]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    rd = cos.size(-1) * 2
    xr, xp = x[..., :rd], x[..., rd:]
    a, b = xr[..., : rd // 2], xr[..., rd // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos, xp], dim=-1)


class Adapter(typing.Protocol):
    """Low-rank deltas added to a block's linear outputs (test-time training)."""

    def __call__(self, key: str, x: Tensor) -> Tensor | None: ...


def with_delta(y: Tensor, x: Tensor, adapter: Adapter | None, key: str) -> Tensor:
    """y plus the adapter's low-rank delta for input x, when there is one for `key`."""
    d = adapter(key, x) if adapter is not None else None
    return y if d is None else y + d


def lin(layer: nn.Linear, x: Tensor, adapter: Adapter | None, key: str) -> Tensor:
    return with_delta(layer(x), x, adapter, key)


class Attention(nn.Module):
    def __init__(self, cfg: Config, xsa: bool, backend: AttentionBackend):
        super().__init__()
        self.backend = backend
        self.h, self.hkv = cfg.num_heads, cfg.num_kv_heads
        self.hd = cfg.model_dim // cfg.num_heads
        self.c_q = nn.Linear(cfg.model_dim, cfg.model_dim, bias=False)
        self.c_k = nn.Linear(cfg.model_dim, self.hkv * self.hd, bias=False)
        self.c_v = nn.Linear(cfg.model_dim, self.hkv * self.hd, bias=False)
        self.proj = nn.Linear(cfg.model_dim, cfg.model_dim, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.q_gain = nn.Parameter(torch.full((self.h,), cfg.qk_gain_init))
        self.xsa = xsa
        # Gated attention (#1736): sigmoid(0)=0.5 at init, learned per head and position.
        self.gate = nn.Linear(cfg.model_dim, self.h, bias=False) if cfg.gated_attn_enabled else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], adapter: Adapter | None, pfx: str) -> Tensor:
        B, T, _ = x.shape
        q = lin(self.c_q, x, adapter, pfx + "q").view(B, T, self.h, self.hd)
        k = lin(self.c_k, x, adapter, pfx + "k").view(B, T, self.hkv, self.hd)
        v = lin(self.c_v, x, adapter, pfx + "v").view(B, T, self.hkv, self.hd)
        q, k = apply_rope(rms_norm(q), *rope), apply_rope(rms_norm(k), *rope)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = self.backend(q, k, v)
        if self.xsa:  # XSA: remove the component along the token's own value (GQA-aware)
            yg = y.view(B, T, self.hkv, self.h // self.hkv, self.hd)
            vn = F.normalize(v, dim=-1).unsqueeze(-2)
            y = (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, T, self.h, self.hd)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x)).unsqueeze(-1)
        return lin(self.proj, y.reshape(B, T, -1), adapter, pfx + "o")


class MLP(nn.Module):
    def __init__(self, dim: int, mult: float, slope: float):
        super().__init__()
        self.fc = nn.Linear(dim, int(mult * dim), bias=False)
        self.proj = nn.Linear(int(mult * dim), dim, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.slope = slope

    def forward(self, x: Tensor, adapter: Adapter | None, pfx: str) -> Tensor:
        h = F.leaky_relu(lin(self.fc, x, adapter, pfx + "fc"), self.slope).square()
        return lin(self.proj, h, adapter, pfx + "mlp_proj")


class Block(nn.Module):
    def __init__(self, cfg: Config, idx: int, mlp_mult: float, slope: float, xsa: bool, parallel: bool,
                 backend: AttentionBackend):
        super().__init__()
        self.idx = idx
        self.attn = Attention(cfg, xsa, backend)
        self.mlp = MLP(cfg.model_dim, mlp_mult, slope)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.in_scale = 1.0 / math.sqrt(idx + 1) if cfg.ln_scale else 1.0
        self.parallel = parallel

    def forward(self, x: Tensor, rope, adapter: Adapter | None = None) -> Tensor:
        pfx = f"{self.idx}."
        a = self.attn(rms_norm(x) * self.in_scale, rope, adapter, pfx)
        if self.parallel:  # parallel lanes: attention and MLP read the same input
            return x + self.attn_scale * a + self.mlp_scale * self.mlp(rms_norm(x) * self.in_scale, adapter, pfx)
        x = x + self.attn_scale * a
        return x + self.mlp_scale * self.mlp(rms_norm(x) * self.in_scale, adapter, pfx)


class BigramHash(nn.Module):
    """Hashed (previous, current) token pair embedding. Position 0 and every BOS get the reserved
    'no predecessor' bucket, so nothing leaks across document boundaries."""

    def __init__(self, buckets: int, dim: int, model_dim: int, bos_id: int):
        super().__init__()
        self.buckets, self.bos_id = buckets, bos_id
        self.embed = nn.Embedding(buckets, dim)
        self.proj = nn.Linear(dim, model_dim, bias=False)
        nn.init.zeros_(self.embed.weight)
        nn.init.zeros_(self.proj.weight)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.to(torch.int64)
        null = self.buckets - 1
        h = torch.bitwise_xor(36313 * t[:, 1:], 27191 * t[:, :-1]) % null
        h = torch.where(t[:, 1:] == self.bos_id, torch.full_like(h, null), h)
        h = torch.cat([torch.full_like(t[:, :1], null), h], dim=1)
        return self.proj(self.embed(h)) * self.scale


class SmearGate(nn.Module):
    """x_t <- (1-g) x_t + g x_{t-1}; never mixes into position 0 or into a BOS (#1855 fix)."""

    def __init__(self, dim: int, bos_id: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))
        self.bos_id = bos_id

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        keep = (ids != self.bos_id).unsqueeze(-1).to(x.dtype)
        return x + keep * g * (prev - x)


class GPT(nn.Module):
    def __init__(self, cfg: Config, backend: AttentionBackend = SDPA):
        super().__init__()
        self.cfg = cfg
        d = cfg.model_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        self.bigram = BigramHash(cfg.bigram_vocab_size, cfg.bigram_dim, d, cfg.bos_id) if cfg.bigram_vocab_size else None
        self.smear = SmearGate(d, cfg.bos_id) if cfg.smear_gate else None
        n_enc, n_cr, n_dec = cfg.n_encoder, cfg.n_crawler, cfg.n_decoder
        n_total = n_enc + n_cr + n_dec  # distinct blocks in execution order

        def block(i: int, crawler: bool) -> Block:
            return Block(cfg, i, cfg.crawler_mlp_mult if crawler else cfg.mlp_mult,
                         cfg.crawler_mlp_leaky_slope if crawler else cfg.mlp_leaky_slope,
                         xsa=i >= n_total - cfg.xsa_last_n,
                         parallel=0 <= cfg.parallel_residual_start <= i, backend=backend)

        self.encoder = nn.ModuleList(block(i, False) for i in range(n_enc))
        self.crawler = nn.ModuleList(block(n_enc + i, True) for i in range(n_cr))
        self.decoder = nn.ModuleList(block(n_enc + n_cr + i, False) for i in range(n_dec))
        self.skip_weights = nn.Parameter(torch.ones(min(n_enc, n_dec), d))
        loops = cfg.crawler_loops if n_cr else 0
        # Flow instructions: one shared projection, a zero-initialised up-projection per loop.
        self.inst_proj = nn.Linear(d, cfg.inst_dim, bias=False) if (loops and cfg.inst_dim) else None
        self.inst_up = nn.ModuleList(nn.Linear(cfg.inst_dim, d, bias=False) for _ in range(loops)) \
            if self.inst_proj is not None else None
        if self.inst_up is not None:
            for m in self.inst_up:
                nn.init.zeros_(m.weight)
        self.rope_scales = tuple(float(s) for s in cfg.crawler_loop_rope_scales[:loops])
        self.active_loops = loops if cfg.crawler_start_frac == 0 else min(loops, 1)

    def set_active_loops(self, n: int) -> None:
        self.active_loops = n

    def forward(self, ids: Tensor, adapter: Adapter | None = None) -> Tensor:
        cfg = self.cfg
        T = ids.size(1)
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids)
        if self.smear is not None:
            x = self.smear(x, ids)
        x = rms_norm(x)
        rope = rope_tables(T, cfg.rope_dims, cfg.rope_base, 1.0, ids.device, x.dtype)
        skips = []
        for blk in self.encoder:
            x = blk(x, rope, adapter)
            skips.append(x)
        for k in range(self.active_loops):
            if self.inst_proj is not None:
                x = x + self.inst_up[k](self.inst_proj(x))
            loop_rope = rope if self.rope_scales[k] == 1 else rope_tables(
                T, cfg.rope_dims, cfg.rope_base, self.rope_scales[k], ids.device, x.dtype)
            for blk in self.crawler:
                x = blk(x, loop_rope, adapter)
        for i, blk in enumerate(self.decoder):
            if i < len(skips):  # U-Net: decoder i reads the mirrored encoder output
                x = x + self.skip_weights[i].to(x.dtype) * skips[-1 - i]
            x = blk(x, rope, adapter)
        x = rms_norm(x)
        logits = with_delta(F.linear(x, self.tok_emb.weight.to(x.dtype)), x, adapter, "head")
        c = cfg.logit_softcap
        return c * torch.tanh(logits.float() / c)


def token_losses(model: nn.Module, x: Tensor, y: Tensor, adapter: Adapter | None = None) -> Tensor:
    logits = model(x, adapter)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="none").view_as(y)


# =============================================================================================
# Optimizers: Muon (matrices, sharded across ranks) + AdamW (embeddings, scalars)
# =============================================================================================


def newton_schulz(g: Tensor, steps: int) -> Tensor:
    """Approximately orthogonalise g (quintic Newton-Schulz, coefficients from modded-nanogpt)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum + Newton-Schulz orthogonalised update. Each matrix is orthogonalised by one rank
    (round-robin) and the updates are shared with a single all-reduce of a flat buffer."""

    def __init__(self, params, lr: float, momentum: float, steps: int, wd: float, rt: Runtime):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, steps=steps, wd=wd))
        self.rt = rt

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            updates = [torch.zeros_like(p, dtype=torch.float32) for p in params]
            for i, (p, u) in enumerate(zip(params, updates)):
                if i % self.rt.world_size == self.rt.rank and p.grad is not None:
                    buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    o = newton_schulz(p.grad.add(buf, alpha=group["momentum"]), group["steps"])
                    u.copy_(o * max(1.0, p.size(0) / p.size(1)) ** 0.5)
            all_reduce_flat_(updates, self.rt, average=False)  # each rank filled only its own matrices
            for p, u in zip(params, updates):
                p.mul_(1 - group["lr"] * group["wd"])
                p.add_(u.to(p.dtype), alpha=-group["lr"])


def param_route(name: str, p: nn.Parameter) -> str:
    """Optimizer routing table: embeddings -> AdamW(embed), block matrices -> Muon, rest -> AdamW(scalar)."""
    if name in ("tok_emb.weight", "bigram.embed.weight"):
        return "embed"
    if p.ndim == 2 and name != "skip_weights":
        return "matrix"
    return "scalar"


@dataclass
class Optimizers:
    muon: Muon
    adam: torch.optim.AdamW
    params: list[nn.Parameter]

    def all(self) -> list[torch.optim.Optimizer]:
        return [self.muon, self.adam]


def build_optimizers(model: nn.Module, cfg: Config, rt: Runtime) -> Optimizers:
    groups: dict[str, list] = {"embed": [], "matrix": [], "scalar": []}
    for name, p in model.named_parameters():
        groups[param_route(name, p)].append(p)
    muon = Muon(groups["matrix"], cfg.matrix_lr, cfg.muon_momentum, cfg.muon_backend_steps, cfg.muon_wd, rt)
    adam = torch.optim.AdamW(
        [dict(params=groups["embed"], lr=cfg.embed_lr, weight_decay=cfg.adam_wd),
         dict(params=groups["scalar"], lr=cfg.scalar_lr, weight_decay=0.0)],
        betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=rt.device.type == "cuda")
    for opt in (muon, adam):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return Optimizers(muon, adam, [p for p in model.parameters() if p.requires_grad])


# =============================================================================================
# Training: one pure schedule of the (injected) clock, a step, a loop that only calls these
# =============================================================================================


@dataclass(frozen=True)
class StepPlan:
    """What the next optimizer step does. Decided by `plan_step` from the clock alone, so every rank
    (which shares rank 0's clock) makes the same decision, and tests drive it with a fake clock."""
    lr_scale: float
    momentum: float
    loops: int


def warmdown_fraction(cfg: Config, mean_step_ms: float, budget_ms: float) -> float:
    """WARMDOWN_FRAC directly, or WARMDOWN_ITERS converted to a budget fraction using the measured
    step time (so an iteration-based setting still fires under a wallclock cap, cf. PR #1681)."""
    if cfg.warmdown_frac:
        return cfg.warmdown_frac
    if budget_ms > 0:
        return min(1.0, cfg.warmdown_iters * mean_step_ms / budget_ms)
    return min(1.0, cfg.warmdown_iters / cfg.iterations)


def lr_multiplier(left: float, warmdown: float, min_lr: float) -> float:
    """`left` is the fraction of the budget still to run after this step starts; the last `warmdown`
    of the budget decays linearly to MIN_LR, which is reached by the last step."""
    if warmdown <= 0 or left >= warmdown:
        return 1.0
    return min_lr + (1 - min_lr) * max(0.0, left) / warmdown


def plan_step(cfg: Config, step: int, elapsed_ms: float, next_step_ms: float, budget_ms: float) -> StepPlan | None:
    """The plan for step `step` (0-based), or None when training stops before it. Under a wallclock
    budget a step starts only if it will end inside the budget by the honest estimate `next_step_ms`,
    and the warmdown counts towards that predicted stop, so the LR meets its floor on the last step."""
    if step >= cfg.iterations:
        return None
    if budget_ms:
        if step and elapsed_ms + next_step_ms > budget_ms:
            return None
        progress = elapsed_ms / budget_ms
        left = (budget_ms - next_step_ms - elapsed_ms) / budget_ms
        mean_ms = elapsed_ms / step if step else 0.0
    else:
        progress, left, mean_ms = step / cfg.iterations, (cfg.iterations - 1 - step) / cfg.iterations, 0.0
    scale = lr_multiplier(left, warmdown_fraction(cfg, mean_ms, budget_ms), cfg.min_lr)
    mom_t = min(1.0, step / cfg.muon_momentum_warmup_steps) if cfg.muon_momentum_warmup_steps else 1.0
    momentum = (1 - mom_t) * cfg.muon_momentum_warmup_start + mom_t * cfg.muon_momentum
    loops = cfg.n_loops if progress >= cfg.crawler_start_frac else min(cfg.n_loops, 1)
    return StepPlan(scale, momentum, loops)


class StepClock:
    """Training time in ms, paused around validation. The estimate of the next step is the longest of
    the last WINDOW steps, not the mean since the start: on a noisy machine a spike that happened
    recently is assumed to happen again, so the run never starts a step it cannot finish."""

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
    """EMA of the weights every step (on by default, EMA_DECAY 0.9965 as in #1855), or SWA snapshots
    every SWA_EVERY steps once the LR has decayed below SWA_LR_SCALE (Ouroboros lineage)."""

    SWA_LR_SCALE = 0.2

    def __init__(self, model: nn.Module, cfg: Config):
        self.cfg = cfg
        use_ema = not cfg.skip_ema and not cfg.swa_every
        self.ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()} if use_ema else None
        self.swa, self.swa_n = None, 0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, lr_scale: float, log: Logger) -> None:
        if self.ema is not None:
            # decay warmup (1+t)/(10+t): a short run is not dominated by its initial weights; from step ~2,560 on
            # (half of a full 8xH100 run) it is EMA_DECAY exactly, as in #1855
            decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
            for k, v in model.state_dict().items():
                self.ema[k].lerp_(v.float(), 1 - decay)
        if self.cfg.swa_every and lr_scale < self.SWA_LR_SCALE and step % self.cfg.swa_every == 0:
            if self.swa is None:
                log(f"swa:start step:{step}")
                self.swa = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in model.state_dict().items()}
            for k, v in model.state_dict().items():
                self.swa[k] += v.float()
            self.swa_n += 1

    def final(self, model: nn.Module) -> dict[str, Tensor]:
        live = model.state_dict()
        if self.swa_n:
            src = {k: v / self.swa_n for k, v in self.swa.items()}
        else:
            src = self.ema if self.ema is not None else live
        return {k: src[k].to(live[k].dtype).detach().clone() for k in live}


def train_step(model: nn.Module, micro: list[tuple[Tensor, Tensor]], opts: Optimizers, cfg: Config,
               rt: Runtime) -> Tensor:
    """One optimizer step; returns this rank's mean loss as a tensor (no host sync here)."""
    params = opts.params
    total = torch.zeros((), device=rt.device)
    for x, y in micro:
        with rt.autocast():
            loss = token_losses(model, x, y).mean() / len(micro)
        loss.backward()
        total += loss.detach()
    sync_grads_(params, rt)
    if cfg.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
    for opt in opts.all():
        opt.step()
    for opt in opts.all():
        opt.zero_grad(set_to_none=False)
    return total


def apply_plan(model: GPT, opts: Optimizers, plan: StepPlan, step: int, log: Logger) -> None:
    for opt in opts.all():
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * plan.lr_scale
    for g in opts.muon.param_groups:
        g["momentum"] = plan.momentum
    if plan.loops != model.active_loops:
        model.set_active_loops(plan.loops)
        log(f"crawler:loops_enabled loops:{plan.loops} step:{step}")


def prime_compile(model: GPT, compiled: nn.Module, opts: Optimizers, data: "TrainData", cfg: Config, rt: Runtime,
                  log: Logger) -> None:
    """Run WARMUP_STEPS real steps on training data so torch.compile is warm, then restore weights and
    optimizer state: the timed run starts from the same initial state. With delayed crawler loops both
    depths are compiled here, so enabling the loops mid-run costs no recompilation on the clock."""
    if not rt.compile or not cfg.warmup_steps:
        return
    saved = ({k: v.detach().clone() for k, v in model.state_dict().items()},
             [copy.deepcopy(o.state_dict()) for o in opts.all()])
    start_loops, loader = model.active_loops, data.loader()
    for s in range(cfg.warmup_steps):
        if s == cfg.warmup_steps // 2:
            model.set_active_loops(cfg.n_loops)
        train_step(compiled, loader.next_batch(), opts, cfg, rt)
        log(f"warmup_step:{s + 1}/{cfg.warmup_steps}")
    model.set_active_loops(start_loops)
    model.load_state_dict(saved[0])
    for o, st in zip(opts.all(), saved[1]):
        o.load_state_dict(st)


def shared_elapsed(clock: StepClock, rt: Runtime) -> float:
    """Rank 0's training time, on every rank (one tiny all-reduce): stop and LR decisions agree."""
    t = torch.tensor([clock.elapsed_ms() if rt.is_main else 0.0], dtype=torch.float64, device=rt.device)
    return float(all_reduce_(t)[0])


def log_train_step(cfg: Config, rt: Runtime, step: int, loss: Tensor, ms: float, plan: StepPlan, log: Logger) -> None:
    """Every rank takes part (the loss is averaged over ranks); rank 0 writes the line."""
    mean = float(all_reduce_(loss.detach().clone()) / rt.world_size)
    log(f"step:{step}/{cfg.iterations} train_loss:{mean:.4f} train_time:{ms:.0f}ms step_avg:{ms / step:.2f}ms "
        f"tok_s:{cfg.train_batch_tokens * step / max(ms / 1000, 1e-9):.0f} lr_scale:{plan.lr_scale:.4f}")


def validate_and_log(compiled: nn.Module, val: ValidationData, cfg: Config, rt: Runtime, step: int, train_ms: float,
                     log: Logger) -> None:
    vl, vb = evaluate_val(compiled, val, cfg.train_seq_len, cfg.val_batch_tokens, rt)
    log(f"step:{step}/{cfg.iterations} val_loss:{vl:.4f} val_bpb:{vb:.4f} train_time:{train_ms:.0f}ms "
        f"step_avg:{train_ms / max(step, 1):.2f}ms")


def train(model: GPT, compiled: nn.Module, cfg: Config, rt: Runtime, data: "TrainData", val: ValidationData,
          log: Logger, now: typing.Callable[[], float] = time.perf_counter) -> TrainResult:
    """The training loop. Time is read only through `now`, so tests inject a clock."""
    opts = build_optimizers(model, cfg, rt)
    prime_compile(model, compiled, opts, data, cfg, rt, log)
    loader, averager = data.loader(), WeightAverager(model, cfg)
    reset_peak_memory(rt.device)
    sync(rt.device)
    clock, step, plan = StepClock(now), 0, None
    while True:
        elapsed = shared_elapsed(clock, rt)
        if step:
            clock.observe(elapsed)
        plan = plan_step(cfg, step, elapsed, clock.next_step_ms(), cfg.train_budget_ms)
        if plan is None:
            break
        apply_plan(model, opts, plan, step, log)
        loss = train_step(compiled, loader.next_batch(), opts, cfg, rt)
        step += 1
        averager.update(model, step, plan.lr_scale, log)
        if step <= 10 or step % cfg.train_log_every == 0:
            log_train_step(cfg, rt, step, loss, clock.elapsed_ms(), plan, log)
        if cfg.val_loss_every and step % cfg.val_loss_every == 0:
            clock.pause()
            validate_and_log(compiled, val, cfg, rt, step, clock.base_ms, log)
            clock.resume()
    return finish_training(model, compiled, averager, cfg, rt, val, step, shared_elapsed(clock, rt), log)


def finish_training(model: GPT, compiled: nn.Module, averager: WeightAverager, cfg: Config, rt: Runtime,
                    val: ValidationData, steps: int, train_ms: float, log: Logger) -> TrainResult:
    """Load the averaged weights, log the final validation and the stop reason."""
    final_state = averager.final(model)
    model.load_state_dict(final_state)
    model.set_active_loops(cfg.n_loops)
    validate_and_log(compiled, val, cfg, rt, steps, train_ms, log)
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


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# =============================================================================================
# Calibration and quantization: loop-aware GPTQ int6 (#1283), int7/8 embedding, fp16 passthrough
# =============================================================================================

GPTQ_BITS, AUX_BITS = 6, 8
GPTQ_BLOCK, GPTQ_DAMP = 128, 0.01
AUX_MIN_NUMEL = 4096  # smaller tensors (gains, scales, skip weights) stay fp16
CLIP_SEARCH = torch.linspace(0.5, 1.0, 11)


@dataclass
class QTensor:
    """Symmetric per-row integer weights: W ~= q * scale[:, None]."""
    q: Tensor  # int8, values in [-(2^(bits-1)-1), 2^(bits-1)-1]
    scale: Tensor  # fp16 [rows]
    bits: int

    def dequant(self) -> Tensor:
        return self.q.float() * self.scale.float()[:, None]


@dataclass(frozen=True)
class QuantPlan:
    """How one state-dict entry is stored: method gptq | rtn | fp16, bits, clip (k std devs, 0 = search)."""
    method: str
    bits: int
    clip_sigmas: float = 0.0


FP16 = QuantPlan("fp16", 16)


def quant_plan(name: str, t: Tensor, cfg: Config) -> QuantPlan:
    parts = name.split(".")
    if parts[0] in ("encoder", "crawler", "decoder") and parts[-2] in ("c_q", "c_k", "c_v", "proj", "fc"):
        sig = cfg.mlp_clip_sigmas if parts[-3] == "mlp" else cfg.attn_clip_sigmas
        return QuantPlan("rtn" if cfg.skip_gptq else "gptq", GPTQ_BITS, sig)
    if name == "tok_emb.weight":
        return QuantPlan("rtn", cfg.embed_bits, cfg.embed_clip_sigmas)
    if parts[-2:] == ["gate", "weight"]:
        return QuantPlan("rtn", AUX_BITS) if cfg.gated_attn_quant_gate else FP16
    if t.ndim == 2 and t.numel() >= AUX_MIN_NUMEL:
        return QuantPlan("rtn", AUX_BITS)
    return FP16


def row_scales(w: Tensor, bits: int, sigmas: float, hdiag: Tensor | None = None) -> Tensor:
    """Per-row scale: clip at `sigmas` std devs, or the clip in CLIP_SEARCH x max|w| whose
    round-to-nearest error (weighted by the input Hessian diagonal when known) is smallest."""
    qmax = 2 ** (bits - 1) - 1
    absmax = w.abs().amax(dim=1).clamp_min(1e-8)
    if sigmas > 0:
        return (torch.minimum(sigmas * w.std(dim=1), absmax) / qmax).clamp_min(1e-8)
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


def quantize_gptq(w: Tensor, h: Tensor, bits: int, sigmas: float, step: float = 1.0) -> QTensor:
    """GPTQ (Frantar et al. 2022): quantize columns in order of decreasing Hessian diagonal and push
    each column's rounding error onto the not-yet-quantized columns via the inverse Hessian."""
    w, h = w.float().clone(), h.float().clone()
    qmax = 2 ** (bits - 1) - 1
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    s = (row_scales(w, bits, sigmas, torch.diag(h)) * step).half().float()
    perm = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    h += GPTQ_DAMP * torch.diag(h).mean() * torch.eye(h.size(0), device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i0 in range(0, w.size(1), GPTQ_BLOCK):
        i1 = min(i0 + GPTQ_BLOCK, w.size(1))
        wb, err = w[:, i0:i1].clone(), torch.zeros(w.size(0), i1 - i0, device=w.device)
        for j in range(i1 - i0):
            col = wb[:, j]
            qc = (col / s).round().clamp(-qmax, qmax)
            q[:, i0 + j] = qc
            e = (col - qc * s) / hinv[i0 + j, i0 + j]
            wb[:, j:] -= e[:, None] * hinv[i0 + j, i0 + j:i1][None, :]
            err[:, j] = e
        w[:, i1:] -= err @ hinv[i0:i1, i1:]
    q = q[:, torch.argsort(perm)]
    return QTensor(q.to(torch.int8), s.half(), bits)


def collect_hessians(model: GPT, batches: list[Tensor], names: set[str], rt: Runtime) -> dict[str, Tensor]:
    """Sum of X^T X over every call of each named linear (a crawler linear sees every loop's input),
    summed over ranks."""
    hs: dict[str, Tensor] = {}
    mods = {n: m for n, m in model.named_modules() if n + ".weight" in names}

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0].detach().float().reshape(-1, inp[0].size(-1))
            if name not in hs:
                hs[name] = torch.zeros(x.size(1), x.size(1), device=x.device)
            hs[name].addmm_(x.T, x)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    model.eval()
    with torch.no_grad(), rt.autocast():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    for n in sorted(mods):  # a fixed order: every rank must issue the same collectives
        if n not in hs:
            hs[n] = torch.zeros(mods[n].in_features, mods[n].in_features, device=rt.device)
        all_reduce_(hs[n])
    return {n + ".weight": h for n, h in hs.items()}


def _quantize_names(model: GPT, sd: dict[str, Tensor], names: list[str], hs: dict[str, Tensor] | None,
                    cfg: Config, rt: Runtime, step: float = 1.0) -> dict[str, QTensor]:
    """Quantize `names`; rank r does every world_size-th tensor, then each is broadcast from its owner."""
    out = {}
    for i, n in enumerate(names):
        p = quant_plan(n, sd[n], cfg)
        bits, w = p.bits, sd[n].to(rt.device)
        k = step if bits == GPTQ_BITS else 1.0
        if i % rt.world_size == rt.rank:
            qt = (quantize_gptq(w, hs[n], bits, p.clip_sigmas, k) if (p.method == "gptq" and hs is not None)
                  else quantize_rtn(w, bits, p.clip_sigmas, k))
        else:
            qt = QTensor(torch.empty(w.shape, dtype=torch.int8, device=rt.device),
                         torch.empty(w.size(0), dtype=torch.float16, device=rt.device), bits)
        if rt.world_size > 1:
            dist.broadcast(qt.q, src=i % rt.world_size)
            dist.broadcast(qt.scale, src=i % rt.world_size)
        out[n] = QTensor(qt.q.cpu(), qt.scale.cpu(), bits)
    return out


ARTIFACT_MARGIN = 0.01  # compressed sizes vary by a few KB run to run (PR #1978): aim 1% under the cap
HEADER_ALLOWANCE = 16_384  # JSON header and container bytes


def entropy_bytes(q: Tensor) -> float:
    """Order-0 entropy of integer symbols in bytes. With fp16 counted at 2 bytes this bounds the packed size
    from above: 0.1% over brotli on the full-size model, ~7% over on tiny ones where fp16 tensors dominate."""
    counts = torch.bincount(q.flatten().long() + 128)
    p = counts[counts > 0].double() / q.numel()
    return float(-(p * p.log2()).sum()) * q.numel() / 8


def fit_step(mats: list[tuple[Tensor, Tensor]], bits: int, budget: float) -> float | None:
    """Smallest common multiplier k >= 1 of the per-row steps whose symbol entropy fits `budget` bytes
    (None if even 64x steps do not). Wider steps cost accuracy, so k = 1 whenever it already fits."""
    qmax = 2 ** (bits - 1) - 1

    def size(k: float) -> float:
        return sum(entropy_bytes((w / (s * k)[:, None]).round().clamp(-qmax, qmax)) for w, s in mats)

    if size(1.0) <= budget:
        return 1.0
    lo, hi = 1.0, 2.0
    while size(hi) > budget:
        lo, hi = hi, hi * 2
        if hi > 64:
            return None
    for _ in range(16):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if size(mid) <= budget else (mid, hi)
    return hi


def choose_step(sd: dict[str, Tensor], plan: dict, hs: dict[str, Tensor] | None, other: dict, cfg: Config,
                code_bytes: int, rt: Runtime, log: Logger) -> float:
    """Rate control: estimate the artifact from symbol entropies; if it would exceed the cap, widen the
    int6 steps of every 6-bit matrix by one common factor so that it fits."""
    six = [n for n, p in plan.items() if p.bits == GPTQ_BITS]
    if not cfg.artifact_fit or not six:
        return 1.0
    mats = []
    for n in six:
        w = sd[n].to(rt.device)
        hd = torch.diag(hs[n]) if (hs is not None and n in hs) else None
        mats.append((w, row_scales(w, GPTQ_BITS, plan[n].clip_sigmas, hd)))
    fixed = sum(entropy_bytes(v.q) + 2 * v.scale.numel() if isinstance(v, QTensor) else 2 * v.numel()
                for v in other.values()) + sum(2 * sd[n].size(0) for n in six) + HEADER_ALLOWANCE
    budget = cfg.artifact_limit_bytes * (1 - ARTIFACT_MARGIN) - code_bytes - fixed
    step = fit_step(mats, GPTQ_BITS, budget) if budget > 0 else None
    if step is None:
        log(f"artifact_fit: cannot fit {cfg.artifact_limit_bytes} bytes (code {code_bytes}, other tensors "
            f"{fixed:.0f}); keeping the native int6 steps")
        return 1.0
    log(f"artifact_fit: int6 step multiplier {step:.4f} (1.0 = native) for an estimated "
        f"{budget + fixed + code_bytes:.0f}-byte budget")
    return step


def quantize_model(model: GPT, cfg: Config, rt: Runtime, batches: list[Tensor], log: Logger,
                   code_bytes: int = 0) -> dict[str, QTensor | Tensor]:
    """Quantize every tensor of the model. Loop-aware: flat layers first from phase-1 Hessians, patch
    them in, then collect the crawler's Hessians through the quantized flat layers (phase 2)."""
    model.set_active_loops(cfg.n_loops)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    plan = {n: quant_plan(n, t, cfg) for n, t in sd.items()}
    gptq_names = sorted(n for n, p in plan.items() if p.method == "gptq")
    crawler = [n for n in gptq_names if n.startswith("crawler.")]
    flat = [n for n in gptq_names if not n.startswith("crawler.")]
    hs = collect_hessians(model, batches, set(gptq_names), rt) if gptq_names else None
    two_phase = cfg.loop_aware_gptq and crawler and flat and hs is not None
    log(f"gptq:phase1 hessians:{len(gptq_names)} samples:{cfg.gptq_cal_samples} loop_aware:{int(bool(two_phase))}")
    rest = sorted(n for n, p in plan.items() if p.method == "rtn" and p.bits != GPTQ_BITS)
    out: dict[str, QTensor | Tensor] = dict(_quantize_names(model, sd, rest, None, cfg, rt))
    out |= {n: sd[n].half() for n, p in plan.items() if p.method == "fp16"}
    step = choose_step(sd, plan, hs, out, cfg, code_bytes, rt, log)
    six_rtn = sorted(n for n, p in plan.items() if p.method == "rtn" and p.bits == GPTQ_BITS)  # SKIP_GPTQ=1
    out |= _quantize_names(model, sd, six_rtn, None, cfg, rt, step)
    out |= _quantize_names(model, sd, flat if two_phase else gptq_names, hs, cfg, rt, step)
    if two_phase:
        hs2 = crawler_hessians_through_quantized_flat(model, out, flat, crawler, hs, batches, rt, log)
        out |= _quantize_names(model, sd, crawler, hs2, cfg, rt, step)
    return out


def crawler_hessians_through_quantized_flat(model: GPT, out: dict, flat: list[str], crawler: list[str],
                                            hs: dict[str, Tensor], batches: list[Tensor], rt: Runtime,
                                            log: Logger) -> dict[str, Tensor]:
    """Loop-aware phase 2 (#1283): with the flat layers temporarily replaced by their quantized weights,
    the shared crawler block's Hessians are collected again, so it is quantized for the activations it
    will really see. The model's own weights are restored afterwards."""
    live = model.state_dict()
    saved = {n: live[n].detach().clone() for n in flat}
    with torch.no_grad():
        for n in flat:
            live[n].copy_(out[n].dequant().to(live[n].dtype))
    hs2 = collect_hessians(model, batches, set(crawler), rt)
    with torch.no_grad():
        for n in flat:
            live[n].copy_(saved[n])
    shift = max((hs2[n] - hs[n]).norm().item() / hs[n].norm().clamp_min(1e-12).item() for n in crawler)
    log(f"gptq:phase2 crawler_hessians:{len(crawler)} through quantized flat layers:{len(flat)} "
        f"max_rel_change:{shift:.4f}")
    return hs2


def dequantize_state(qm: dict[str, QTensor | Tensor]) -> dict[str, Tensor]:
    return {n: (v.dequant() if isinstance(v, QTensor) else v.float()) for n, v in qm.items()}


# =============================================================================================
# Packing: one self-describing artifact, and the counted code wrapper
# =============================================================================================

ARTIFACT_MAGIC, ARTIFACT_VERSION = b"PGCRAWL\x00", 1
COMPRESSORS = ("brotli", "zstd", "lzma")


class ArtifactError(ValueError):
    pass


def _compress(data: bytes, kind: str) -> bytes:
    if kind == "brotli":
        import brotli
        return brotli.compress(data, quality=11, lgwin=24)
    if kind == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=22).compress(data)
    import lzma
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def _decompress(data: bytes, kind: str) -> bytes:
    if kind == "brotli":
        import brotli
        return brotli.decompress(data)
    if kind == "zstd":
        import zstandard
        return zstandard.ZstdDecompressor().decompress(data)
    import lzma
    return lzma.decompress(data)


def byte_shuffle(raw: bytes, width: int) -> bytes:
    """Group the k-th byte of every element together (exponent bytes compress far better together)."""
    a = np.frombuffer(raw, dtype=np.uint8)
    return a.reshape(-1, width).T.copy().tobytes() if width > 1 else raw


def byte_unshuffle(raw: bytes, width: int) -> bytes:
    a = np.frombuffer(raw, dtype=np.uint8)
    return a.reshape(width, -1).T.copy().tobytes() if width > 1 else raw


def pack_artifact(qm: dict[str, QTensor | Tensor], cfg: Config, compressor: str) -> bytes:
    """magic | u16 version | u8 compressor | u32 crc32 | u64 payload length | compressed payload.
    Payload: u32 header length | JSON header (config, tensor table) | int8 region | shuffled fp16 region."""
    import zlib

    ints, halves, table = [], [], []
    for name in sorted(qm):
        v = qm[name]
        if isinstance(v, QTensor):
            ints.append(v.q.numpy().tobytes())
            halves.append(v.scale.numpy().astype("<f2").tobytes())
            table.append({"name": name, "kind": "q", "shape": list(v.q.shape), "bits": v.bits})
        else:
            halves.append(v.numpy().astype("<f2").tobytes())
            table.append({"name": name, "kind": "f16", "shape": list(v.shape)})
    header = json.dumps({"format": "parameter-golf flat+crawler int-quantized", "version": ARTIFACT_VERSION,
                         "config": dataclasses.asdict(cfg), "tensors": table}, separators=(",", ":")).encode()
    body = b"".join(ints) + byte_shuffle(b"".join(halves), 2)
    payload = _compress(len(header).to_bytes(4, "little") + header + body, compressor)
    return (ARTIFACT_MAGIC + ARTIFACT_VERSION.to_bytes(2, "little") + bytes([COMPRESSORS.index(compressor)])
            + zlib.crc32(payload).to_bytes(4, "little") + len(payload).to_bytes(8, "little") + payload)


def unpack_artifact(blob: bytes) -> tuple[Config, dict[str, QTensor | Tensor]]:
    import zlib

    if len(blob) < 23 or blob[:8] != ARTIFACT_MAGIC:
        raise ArtifactError("not a flat+crawler artifact (bad magic)")
    version = int.from_bytes(blob[8:10], "little")
    if version != ARTIFACT_VERSION:
        raise ArtifactError(f"artifact format version {version}; this script reads {ARTIFACT_VERSION}")
    comp, crc, n = COMPRESSORS[blob[10]], int.from_bytes(blob[11:15], "little"), int.from_bytes(blob[15:23], "little")
    payload = blob[23:]
    if len(payload) != n:
        raise ArtifactError(f"artifact truncated: payload is {len(payload)} bytes, header says {n}")
    if zlib.crc32(payload) != crc:
        raise ArtifactError("artifact corrupted: checksum mismatch")
    raw = _decompress(payload, comp)
    hlen = int.from_bytes(raw[:4], "little")
    header = json.loads(raw[4:4 + hlen])
    cfg = config_from_dict(header["config"])
    n_int = sum(math.prod(t["shape"]) for t in header["tensors"] if t["kind"] == "q")
    ints = np.frombuffer(raw, dtype=np.int8, count=n_int, offset=4 + hlen)
    halves = np.frombuffer(byte_unshuffle(raw[4 + hlen + n_int:], 2), dtype="<f2")
    out, io, ho = {}, 0, 0
    for t in header["tensors"]:
        shape, k = t["shape"], math.prod(t["shape"])
        if t["kind"] == "q":
            q = torch.from_numpy(ints[io:io + k].copy()).view(shape)
            out[t["name"]] = QTensor(q, torch.from_numpy(halves[ho:ho + shape[0]].copy()), t["bits"])
            io, ho = io + k, ho + shape[0]
        else:
            out[t["name"]] = torch.from_numpy(halves[ho:ho + k].copy()).view(shape)
            ho += k
    return cfg, out


def load_artifact_model(path: str | Path, rt: Runtime) -> tuple[Config, GPT]:
    """Rebuild the model from the artifact alone, as a reviewer would."""
    cfg, qm = unpack_artifact(Path(path).read_bytes())
    model = GPT(cfg, rt.attn).to(rt.device)
    sd = model.state_dict()
    model.load_state_dict({k: v.to(sd[k].dtype) for k, v in dequantize_state(qm).items()})
    return cfg, model


def minify_source(src: str) -> str:
    """Drop comments and docstrings (ast round trip); behaviour is unchanged."""
    import ast

    tree = ast.parse(src)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def counted_code(src: str) -> bytes:
    """The script as it is counted and shipped: minified, lzma-compressed, base85, self-extracting."""
    import base64
    import lzma

    packed = base64.b85encode(lzma.compress(minify_source(src).encode(), preset=9 | lzma.PRESET_EXTREME))
    return b"import lzma,base64\nexec(lzma.decompress(base64.b85decode(b'" + packed + b"')))\n"


# =============================================================================================
# Evaluation: exact BPB from the artifact, windowed scoring, phased score-first TTT
# =============================================================================================

ScoreHook = typing.Callable[[Tensor, Tensor], None]  # (absolute target indices, nll) of scored tokens


@dataclass
class EvalSums:
    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0

    def add(self, nll: Tensor, nbytes: Tensor) -> None:
        self.nll += float(nll.double().sum())
        self.tokens += nll.numel()
        self.bytes += int(nbytes.long().sum())

    def merge(self, other: "EvalSums") -> None:
        self.nll, self.tokens, self.bytes = self.nll + other.nll, self.tokens + other.tokens, self.bytes + other.bytes

    def reduce(self, rt: Runtime) -> "EvalSums":
        t = torch.tensor([self.nll, self.tokens, self.bytes], dtype=torch.float64, device=rt.device)
        all_reduce_(t)
        return EvalSums(float(t[0]), int(t[1]), int(t[2]))

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def bpb(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)


def sliding_windows(n_targets: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, length, score_from) per window: inputs tokens[start:start+length], targets shifted by one,
    scoring window positions >= score_from. Every target is scored exactly once, with the longest left
    context the window allows. stride == seq_len gives plain non-overlapping evaluation."""
    out, start, scored_to = [], 0, 0
    while scored_to < n_targets:
        length = min(seq_len, n_targets - start)
        out.append((start, length, scored_to - start))
        scored_to = start + length
        start += stride
    return out


def eval_windows(model: nn.Module, val: ValidationData, seq_len: int, stride: int, batch_tokens: int, rt: Runtime,
                 hook: ScoreHook | None = None) -> EvalSums:
    """Windowed scoring split across ranks; exact sums all-reduced."""
    wins = sliding_windows(val.tokens.numel() - 1, seq_len, stride)[rt.rank::rt.world_size]
    per_batch = max(1, batch_tokens // seq_len)
    sums = EvalSums()
    model.eval()
    with torch.no_grad():
        i = 0
        while i < len(wins):
            group = [w for w in wins[i:i + per_batch] if w[1] == wins[i][1]]  # equal lengths stack
            i += len(group)
            length = group[0][1]
            idx = torch.tensor([w[0] for w in group])[:, None] + torch.arange(length + 1)[None]
            chunk = val.tokens[idx].to(rt.device)
            with rt.autocast():
                nll = token_losses(model, chunk[:, :-1], chunk[:, 1:]).float().cpu()
            keep = torch.arange(length)[None] >= torch.tensor([w[2] for w in group])[:, None]
            tgt = idx[:, 1:][keep]
            sums.add(nll[keep], val.token_bytes[tgt])
            if hook:
                hook(tgt, nll[keep])
    model.train()
    return sums.reduce(rt)


def evaluate_val(model: nn.Module, val: ValidationData, seq_len: int, batch_tokens: int, rt: Runtime) -> tuple[float, float]:
    s = eval_windows(model, val, seq_len, seq_len, batch_tokens, rt)
    return s.loss, s.bpb


class BatchedLoRA(nn.Module):
    """One low-rank adapter per document of a batch, on every Q/K/V/O/MLP linear and the head. A starts
    from a fixed random draw (the same for every document), B from zero, so the model starts unchanged."""

    def __init__(self, shapes: dict[str, tuple[int, int]], batch: int, rank: int, device: torch.device, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.keys = {k: k.replace(".", "_") for k in shapes}
        self.a = nn.ParameterDict({self.keys[k]: nn.Parameter(
            (torch.randn(i, rank, generator=g) / math.sqrt(i)).expand(batch, i, rank).contiguous().to(device))
            for k, (i, o) in shapes.items()})
        self.b = nn.ParameterDict({self.keys[k]: nn.Parameter(torch.zeros(batch, rank, o, device=device))
                                   for k, (i, o) in shapes.items()})

    def forward(self, key: str, x: Tensor) -> Tensor | None:
        k = self.keys.get(key)
        if k is None:
            return None
        return (x @ self.a[k].to(x.dtype)) @ self.b[k].to(x.dtype)


def lora_shapes(model: GPT) -> dict[str, tuple[int, int]]:
    shapes = {"head": (model.cfg.model_dim, model.cfg.vocab_size)}
    for blk in [*model.encoder, *model.crawler, *model.decoder]:
        a, m = blk.attn, blk.mlp
        for name, lin_ in (("q", a.c_q), ("k", a.c_k), ("v", a.c_v), ("o", a.proj), ("fc", m.fc), ("mlp_proj", m.proj)):
            shapes[f"{blk.idx}.{name}"] = (lin_.in_features, lin_.out_features)
    return shapes


def document_spans(tokens: Tensor, bos_id: int) -> list[tuple[int, int]]:
    """(start, end) of each document: tokens[start] is BOS, targets are tokens[start+1:end]."""
    starts = torch.nonzero(tokens == bos_id).flatten().tolist()
    ends = starts[1:] + [tokens.numel()]
    return [(s, e) for s, e in zip(starts, ends) if e - s >= 2]


def ttt_score_batch(model: GPT, val: ValidationData, docs: list[tuple[int, int]], cfg: Config, rt: Runtime,
                    adapt: bool, hook: ScoreHook | None) -> EvalSums:
    """Score a batch of documents chunk by chunk; after a chunk is scored, one optimizer step on that
    chunk adapts the document's own LoRA for the chunks after it (score first, then adapt)."""
    B, C, L = len(docs), cfg.ttt_chunk_size, cfg.eval_seq_len
    n = [e - s - 1 for s, e in docs]  # targets per document
    lora = BatchedLoRA(lora_shapes(model), B, cfg.ttt_lora_rank, rt.device, cfg.seed)
    opt = torch.optim.AdamW(lora.parameters(), lr=cfg.ttt_lr, betas=(0.0, 0.999), weight_decay=cfg.ttt_weight_decay)
    sums = EvalSums()
    n_chunks = math.ceil(max(n) / C)
    for c in range(n_chunks):
        p1 = [min((c + 1) * C, k) for k in n]
        w0 = [max(0, p - L) for p in p1]
        T = max(p - w for p, w in zip(p1, w0))
        x = torch.zeros(B, T, dtype=torch.long)
        y = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        tgt = torch.zeros(B, T, dtype=torch.long)
        for i, (s, _) in enumerate(docs):
            if n[i] <= c * C:
                continue
            span = torch.arange(s + w0[i], s + p1[i])
            x[i, :span.numel()] = val.tokens[span]
            y[i, :span.numel()] = val.tokens[span + 1]
            tgt[i, :span.numel()] = span + 1
            mask[i, c * C - w0[i]:p1[i] - w0[i]] = True
        with rt.autocast():
            nll = token_losses(model, x.to(rt.device), y.to(rt.device), lora).float()
        scored = nll.detach().cpu()[mask]
        sums.add(scored, val.token_bytes[tgt[mask]])
        if hook:
            hook(tgt[mask], scored)
        if adapt and c + 1 < n_chunks:
            m = mask.to(rt.device)
            per_doc = (nll * m).sum(1) / m.sum(1).clamp_min(1)
            per_doc.sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return sums


def global_sgd(model: GPT, val: ValidationData, docs: list[tuple[int, int]], cfg: Config, rt: Runtime) -> None:
    """One SGD pass of the base model over documents that have all been scored already."""
    L, rows_per_step = cfg.eval_seq_len, 32
    stream = torch.cat([val.tokens[s:e] for s, e in docs])
    rows = [stream[i:i + L + 1] for i in range(0, stream.numel() - 1, L)]
    params = [p for p in model.parameters()]
    opt = torch.optim.SGD(params, lr=cfg.ttt_global_lr, momentum=0.9)
    model.requires_grad_(True)
    for k in range(0, len(rows), rows_per_step):
        step_rows = rows[k:k + rows_per_step]
        total = sum(r.numel() - 1 for r in step_rows)
        for r in step_rows[rt.rank::rt.world_size]:
            r = r.to(rt.device)
            with rt.autocast():
                loss = token_losses(model, r[None, :-1], r[None, 1:]).sum() / total
            loss.backward()
        sync_grads_(params, rt, average=False)  # each rank's loss is already divided by the global token count
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.requires_grad_(False)


def balance(batches: list[list[tuple[int, int]]], world: int) -> list[list[int]]:
    """Greedy longest-first assignment of batches to ranks by token cost (same on every rank)."""
    cost = [sum((e - s) ** 2 for s, e in b) for b in batches]
    load, out = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(batches)), key=lambda j: -cost[j]):
        r = load.index(min(load))
        out[r].append(i)
        load[r] += cost[i]
    return [sorted(o) for o in out]


def ttt_eval(model: GPT, val: ValidationData, cfg: Config, rt: Runtime, log: Logger, adapt: bool = True,
             hook: ScoreHook | None = None, budget_left: float = float("inf")) -> EvalSums:
    """Phased score-first TTT (#1736 lineage): the first PHASED_TTT_PREFIX_DOCS documents are scored in
    PHASED_TTT_NUM_PHASES groups; after each group the base model takes one SGD pass over that group's
    (already scored) tokens. The remaining documents are then scored. Every document gets a fresh LoRA."""
    docs = document_spans(val.tokens, cfg.bos_id)
    if not docs:
        raise DataError("validation has no BOS-delimited documents; TTT needs BOS markers")
    prefix = min(cfg.phased_ttt_prefix_docs, len(docs)) if cfg.phased_ttt_num_phases else 0
    cuts = np.linspace(0, prefix, cfg.phased_ttt_num_phases + 1).astype(int).tolist() if prefix else [0]
    groups = [docs[a:b] for a, b in zip(cuts, cuts[1:])] + [docs[prefix:]]
    model.requires_grad_(False)
    sums, t0, done_cost = EvalSums(), time.perf_counter(), 0
    total_cost, projected = sum((e - s) ** 2 for s, e in docs), False
    for gi, group in enumerate(groups):
        order = sorted(group, key=lambda d: d[1] - d[0], reverse=True)  # similar lengths share a batch
        batches = [order[i:i + cfg.ttt_batch_docs] for i in range(0, len(order), cfg.ttt_batch_docs)]
        for bi in balance(batches, rt.world_size)[rt.rank]:
            sums.merge(ttt_score_batch(model, val, batches[bi], cfg, rt, adapt, hook))
            done_cost += sum((e - s_) ** 2 for s_, e in batches[bi]) * rt.world_size
            if not projected and done_cost >= 0.02 * total_cost:
                projected = True
                est = (time.perf_counter() - t0) * total_cost / done_cost
                log(f"ttt:projected_time:{est:.0f}s budget_left:{budget_left:.0f}s")
                if est > budget_left:
                    log(f"WARNING: phased TTT is projected to take {est:.0f}s but only {budget_left:.0f}s of "
                        f"EVAL_BUDGET_SECONDS remain; lower PHASED_TTT_PREFIX_DOCS/TTT_CHUNK_SIZE cost or disable TTT")
        if adapt and gi < len(groups) - 1 and cfg.ttt_global_lr > 0:
            global_sgd(model, val, group, cfg, rt)
            log(f"ttt:phase:{gi + 1}/{len(groups) - 1} docs:{len(group)} global_sgd_done "
                f"elapsed:{time.perf_counter() - t0:.1f}s")
    return sums.reduce(rt)


def run_evaluation(artifact: Path, val: ValidationData, cfg: Config, rt: Runtime, log: Logger) -> dict:
    """All evaluations, each from a fresh load of the packed artifact, timed against EVAL_BUDGET_SECONDS."""
    results, t_all = {}, time.perf_counter()
    stages = [("roundtrip", "final_int6_roundtrip_exact", cfg.eval_seq_len),
              ("sliding", "final_int6_sliding_window_exact", cfg.eval_stride)]
    for key, line, stride in stages:
        t0 = time.perf_counter()
        _, model = load_artifact_model(artifact, rt)
        s = eval_windows(model, val, cfg.eval_seq_len, stride, cfg.eval_batch_tokens, rt)
        ms = 1000 * (time.perf_counter() - t0)
        log(f"{line} val_loss:{s.loss:.8f} val_bpb:{s.bpb:.8f} stride:{stride} eval_time:{ms:.0f}ms")
        results[key] = {"val_loss": s.loss, "val_bpb": s.bpb, "eval_ms": ms, "tokens": s.tokens, "bytes": s.bytes}
    if cfg.ttt_enabled:
        t0 = time.perf_counter()
        _, model = load_artifact_model(artifact, rt)
        left = cfg.eval_budget_seconds - (time.perf_counter() - t_all)
        s = ttt_eval(model, val, cfg, rt, log, budget_left=left)
        ms = 1000 * (time.perf_counter() - t0)
        log(f"quantized_ttt_phased val_loss:{s.loss:.8f} val_bpb:{s.bpb:.8f} eval_time:{ms:.0f}ms")
        results["ttt"] = {"val_loss": s.loss, "val_bpb": s.bpb, "eval_ms": ms, "tokens": s.tokens, "bytes": s.bytes}
    total = time.perf_counter() - t_all
    results["eval_total_s"] = total
    results["eval_within_budget"] = total <= cfg.eval_budget_seconds
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
    model = GPT(cfg, rt.attn).to(rt.device)
    compiled = torch.compile(model, fullgraph=cfg.compile_fullgraph) if rt.compile else model
    return model, compiled


def log_header(cfg: Config, rt: Runtime, log: Logger, warnings: list[str]) -> None:
    log(f"versions: python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__}")
    log(f"hardware: device:{rt.device.type} name:{rt.hardware} world_size:{rt.world_size}")
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        log(f"config: {f.name.upper()}={','.join(map(str, v)) if isinstance(v, tuple) else v}")
    for w in warnings:
        log(f"WARNING: {w}")
    slow = rt.device.type == "cuda" and rt.attn.name != "fa3"
    log(f"attention_backend:{rt.attn.name}"
        + (" (FlashAttention 3 not importable: using PyTorch SDPA, slower on H100)" if slow else ""))
    log(f"compile:enabled={int(rt.compile)} fullgraph={int(cfg.compile_fullgraph)}")


def checkpoint_path(cfg: Config) -> Path:
    return Path(cfg.init_model_path or Path(cfg.output_dir) / "final_model.pt")


def config_from_checkpoint(cfg: Config, explicit: set[str]) -> Config:
    """SKIP_TRAIN: the model is rebuilt from the architecture saved in the checkpoint (every field
    marked `model`), as the artifact loader does. A model variable set in the environment that
    disagrees with the checkpoint is an error, never a silent mismatch."""
    path = checkpoint_path(cfg)
    if not path.is_file():
        raise ConfigError(f"SKIP_TRAIN=1 but INIT_MODEL_PATH={path} does not exist")
    saved = config_from_dict(torch.load(path, map_location="cpu", weights_only=True)["config"])
    diff = [f"{n.upper()}={getattr(cfg, n)} (checkpoint: {getattr(saved, n)})" for n in MODEL_FIELDS
            if n.upper() in explicit and getattr(cfg, n) != getattr(saved, n)]
    if diff:
        raise ConfigError(f"{path} was trained with a different model; unset or set " + ", ".join(diff))
    return dataclasses.replace(cfg, **{n: getattr(saved, n) for n in MODEL_FIELDS})


def check_compressor(cfg: Config) -> None:
    try:
        _compress(b"probe", cfg.compressor)
    except ImportError:
        pkg = {"brotli": "brotli", "zstd": "zstandard"}.get(cfg.compressor, cfg.compressor)
        raise ConfigError(f"COMPRESSOR={cfg.compressor} but its package is missing: pip install {pkg} "
                          "(or set COMPRESSOR=lzma)") from None


def shipped_code() -> bytes:
    """The counted code of this run: this file's wrapper, or the file itself when it is the wrapper."""
    src = Path(__file__).read_text(encoding="utf-8")
    return src.encode() if src.startswith("import lzma,base64\nexec(") else counted_code(src)


def write_outputs(qm: dict, code: bytes, cfg: Config, rt: Runtime, log: Logger) -> dict:
    """Rank 0 writes the artifact and the counted code wrapper; sizes go to the log and the summary."""
    out = Path(cfg.output_dir)
    blob = pack_artifact(qm, cfg, cfg.compressor)
    sizes = {"bytes_model": len(blob), "bytes_code": len(code), "bytes_total": len(blob) + len(code)}
    sizes["valid_size"] = sizes["bytes_total"] <= cfg.artifact_limit_bytes
    if rt.is_main:
        (out / "final_model.int6.ptz").write_bytes(blob)
        (out / "train_gpt.counted.py").write_bytes(code)
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


def configure() -> tuple[Config, Runtime, Logger, list[str]]:
    """Config from the environment, the runtime and the logger; a config error exits before any work."""
    try:
        cfg, warnings, explicit = load_config_explicit()
        if cfg.skip_train:
            cfg = config_from_checkpoint(cfg, explicit)
        check_compressor(cfg)
        rt = setup_runtime(cfg)
        validate_world(cfg, rt.world_size)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    log = Logger(str(Path(cfg.output_dir) / "logs" / f"{cfg.run_id}.txt") if rt.is_main else None)
    log_header(cfg, rt, log, warnings)
    return cfg, rt, log, warnings


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


def train_or_load(model: GPT, compiled: nn.Module, cfg: Config, rt: Runtime, inputs: RunInputs,
                  log: Logger) -> TrainResult:
    """Train and save the float checkpoint, or (SKIP_TRAIN) load it: both give a TrainResult."""
    if cfg.skip_train:
        state = torch.load(checkpoint_path(cfg), map_location=rt.device, weights_only=True)["state_dict"]
        model.load_state_dict(state)
        model.set_active_loops(cfg.n_loops)
        log(f"skip_train: loaded {checkpoint_path(cfg)}")
        return TrainResult(0, 0.0, False, state, 0.0)
    result = train(model, compiled, cfg, rt, inputs.train, inputs.val, log)
    if rt.is_main:
        path = Path(cfg.output_dir) / "final_model.pt"
        torch.save({"config": dataclasses.asdict(cfg), "state_dict": result.final_state}, path)
        log(f"saved:{path}")
    return result


def calibrate_and_pack(model: GPT, cfg: Config, rt: Runtime, inputs: RunInputs, result: TrainResult,
                       log: Logger) -> tuple[dict, float]:
    """GPTQ calibration on training data (inside the training budget), quantization and packing."""
    t0 = time.perf_counter()
    code = shipped_code()
    qm = quantize_model(model, cfg, rt, inputs.train.calibration_batches(), log, len(code))
    cal_s = time.perf_counter() - t0
    total_s = result.train_ms / 1000 + cal_s
    log(f"gptq:calibrated_and_quantized time:{cal_s:.1f}s train+calibration:{total_s:.1f}s")
    if cfg.max_wallclock_seconds and total_s > cfg.max_wallclock_seconds:
        log(f"WARNING: training + calibration took {total_s:.1f}s > MAX_WALLCLOCK_SECONDS="
            f"{cfg.max_wallclock_seconds}; raise GPTQ_RESERVE_SECONDS above {cal_s:.0f}")
    sizes = write_outputs(qm, code, cfg, rt, log)
    barrier()
    return sizes, cal_s


def write_summary(cfg: Config, rt: Runtime, inputs: RunInputs, result: TrainResult, sizes: dict, cal_s: float,
                  evals: dict, log: Logger) -> None:
    val = inputs.val
    within_train = not cfg.max_wallclock_seconds or result.train_ms / 1000 + cal_s <= cfg.max_wallclock_seconds
    summary = {
        "run_id": cfg.run_id, "seed": cfg.seed, "config": dataclasses.asdict(cfg),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "hardware": {"device": rt.hardware, "world_size": rt.world_size},
        "val": {"tokens": val.tokens.numel() - 1, "bytes": int(val.token_bytes[1:].sum()), "docs": val.n_docs},
        "train": {"steps": result.steps, "train_ms": result.train_ms, "stopped_early": result.stopped_early,
                  "peak_memory_mib": result.peak_mem_mib, "skipped": cfg.skip_train},
        "calibration_s": cal_s, "sizes": sizes, "eval": evals,
        "valid": bool(sizes["valid_size"] and evals["eval_within_budget"] and within_train),
    }
    if rt.is_main:
        path = Path(cfg.output_dir) / "logs" / f"{cfg.run_id}.summary.json"
        path.write_text(json.dumps(summary, indent=1))
        log(f"summary:{path} valid:{int(summary['valid'])}")


def main() -> None:
    cfg, rt, log, _ = configure()
    inputs = prepare_inputs(cfg, rt, log)
    model, compiled = build_model(cfg, rt)
    log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    result = train_or_load(model, compiled, cfg, rt, inputs, log)
    sizes, cal_s = calibrate_and_pack(model, cfg, rt, inputs, result, log)
    evals = run_evaluation(Path(cfg.output_dir) / "final_model.int6.ptz", inputs.val, cfg, rt, log)
    write_summary(cfg, rt, inputs, result, sizes, cal_s, evals, log)
    shutdown()


if __name__ == "__main__":
    main()
