"""Time the n-gram tilt's hint pass (train_gpt.ngram_hints) on a full-length validation stream (prints figures).

    python3 tools/tilt_bench.py                       # 47,853,344 tokens on CPU (and on CUDA when there is one)
    python3 tools/tilt_bench.py --data-path data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved

Without --data-path the stream is synthetic: documents of Zipf-distributed tokens with repeated phrases, as
long as the published CaseOps validation split, so the sorts and gathers do the full amount of work. With it,
the real val shards (the fired share is then the real one; #2135 logs 1.31%).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

CASEOPS_VAL_TOKENS = 47_853_344


def synthetic_stream(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.minimum(rng.zipf(1.2, n), vocab - 1).astype(np.int64)
    phrases = rng.integers(8, vocab, (4096, 24))  # recurring 24-token phrases: contexts that predict
    at = rng.integers(0, n - 24, n // 200)
    t[at[:, None] + np.arange(24)] = phrases[rng.integers(0, 4096, at.size)]
    t[rng.integers(0, n, n // 950)] = 1  # BOS about every 950 tokens
    t[0] = 1
    return torch.from_numpy(t)


def time_pass(tokens: torch.Tensor, cfg: tg.Config, device: torch.device) -> tuple[tg.NgramHints, float]:
    """The hint pass over `tokens` on `device` and its seconds, after a warm-up pass on a prefix (allocator, kernels)."""
    tg.ngram_hints(tokens[:100_000], cfg, device)
    tg.sync(device)
    t0 = time.perf_counter()
    hints = tg.ngram_hints(tokens, cfg, device)
    tg.sync(device)
    return hints, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=CASEOPS_VAL_TOKENS)
    ap.add_argument("--data-path", type=Path, help="a shard folder: time the pass on its real val tokens")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg, _ = tg.load_config({})
    if a.data_path:
        tokens = torch.from_numpy(np.concatenate([tg.load_shard(p) for p in tg.shard_paths(str(a.data_path), "val")])
                                  .astype(np.int64))
    else:
        tokens = synthetic_stream(a.tokens, cfg.vocab_size)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        h, s = time_pass(tokens, cfg, dev)
        print(f"ngram_tilt_pass device:{dev.type} threads:{torch.get_num_threads()} targets:{tokens.numel() - 1} "
              f"fired:{h.fired} ({h.fired / (tokens.numel() - 1):.2%}) pass_s:{s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
