"""Artifact size of a configuration (default: the full-size reference) under each compressor, plus the
empirical entropy of the int6 symbols as a floor. Random weights with trained-like scale; no data needed.

  python tools/artifact_sizes.py            # env vars configure the model as for train_gpt.py
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def main() -> None:
    cfg, _ = tg.load_config()
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg)
    with torch.no_grad():  # zero-initialised projections would compress to nothing; use 1/sqrt(fan_in)
        for name, p in model.named_parameters():
            if p.ndim == 2 and name != "skip_weights":
                p.normal_(0, 1 / math.sqrt(p.size(1)))
    print(f"model_params:{sum(p.numel() for p in model.parameters())}")
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    qm = {}
    for n, t in sd.items():
        p = tg.quant_plan(n, t, cfg)
        qm[n] = t.half() if p.method == "fp16" else tg.quantize_rtn(t, p.bits, p.clip_sigmas)
    code = len(tg.counted_code((Path(tg.__file__)).read_text()))
    six = np.concatenate([v.q.numpy().ravel() for v in qm.values() if isinstance(v, tg.QTensor) and v.bits == 6])
    p = np.bincount(six.astype(np.int64) + 32) / six.size
    h = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    other = sum(v.q.numel() + 2 * v.scale.numel() if isinstance(v, tg.QTensor) and v.bits != 6 else
                (2 * v.scale.numel() if isinstance(v, tg.QTensor) else 2 * v.numel()) for v in qm.values())
    print(f"int6_symbols:{six.size} entropy_bits_per_symbol:{h:.3f} int6_floor_bytes:{int(six.size * h / 8)} "
          f"other_raw_bytes:{other}")
    for comp in tg.COMPRESSORS:
        t0 = time.perf_counter()
        blob = tg.pack_artifact(qm, cfg, comp)
        print(f"compressor:{comp} bytes_model:{len(blob)} bytes_code:{code} bytes_total:{len(blob) + code} "
              f"time:{time.perf_counter() - t0:.1f}s")
    # what ARTIFACT_FIT does to this model under the cap
    plan = {n: tg.quant_plan(n, t, cfg) for n, t in sd.items()}
    other = {n: v for n, v in qm.items() if plan[n].bits != tg.GPTQ_BITS}
    rt = tg.Runtime.cpu()
    step = tg.choose_step(sd, plan, None, other, cfg, code, rt, print)
    fitted = other | {n: tg.quantize_rtn(sd[n], p.bits, p.clip_sigmas, step) for n, p in plan.items() if p.bits == tg.GPTQ_BITS}
    blob = tg.pack_artifact(fitted, cfg, cfg.compressor)
    print(f"fitted: step_multiplier:{step:.4f} compressor:{cfg.compressor} bytes_total:{len(blob) + code} "
          f"limit:{cfg.artifact_limit_bytes}")


if __name__ == "__main__":
    main()
