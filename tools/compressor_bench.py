"""Repack a real artifact with every packing candidate and print bytes and times:

  python3 tools/compressor_bench.py runs/seed42/final_model.int6.ptz

Candidates: one stream under brotli / zstd / lzma (the whole quantized state, int8 region + byte-shuffled fp16),
and per-group packing (#1855: one stream per role, column-major, rows of tok_emb / c_q / mlp.fc similarity-
sorted) with ZPAQ, brotli, or the smaller of the two per stream (the default), with and without the row sort.
Every candidate is unpacked again and checked to rebuild the same weights.
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


def pergroup(qm: dict, cfg: tg.Config, codecs: str, sort_rows: bool) -> bytes:
    """pack_artifact's per-group layout with the role codecs and the row sort fixed by the caller."""
    plan = tg.PackPlan.build(qm, "pergroup")
    plan = tg.PackPlan(plan.groups, plan.sorted_rows if sort_rows else frozenset(), codecs)
    return tg.pack_artifact(qm, cfg, "pergroup", plan)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    a = ap.parse_args(argv)
    cfg, qm = tg.unpack_artifact(a.artifact.read_bytes())
    ref = tg.dequantize_state(qm)
    six = np.concatenate([v.q.numpy().ravel() for v in qm.values() if isinstance(v, tg.QTensor) and v.bits <= 7])
    p = np.bincount(six.astype(np.int64) + 128) / six.size
    h = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    print(f"artifact:{a.artifact} int_codes:{six.size} order0_entropy_bytes:{int(six.size * h / 8)}")
    candidates = {f"single:{c}": (lambda c=c: tg.pack_artifact(qm, cfg, c)) for c in ("brotli", "zstd", "lzma")}
    for codecs in ("zpaq,brotli", "zpaq", "brotli"):
        for sort_rows in (True, False):
            name = f"pergroup:{codecs}:{'sorted' if sort_rows else 'unsorted'}"
            candidates[name] = lambda c=codecs, s=sort_rows: pergroup(qm, cfg, c, s)
    base = None
    for name, pack in candidates.items():
        t0 = time.perf_counter()
        blob = pack()
        t1 = time.perf_counter()
        _, back = tg.unpack_artifact(blob)
        t2 = time.perf_counter()
        same = all(torch.equal(ref[k], v) for k, v in tg.dequantize_state(back).items())
        base = base or len(blob)
        print(f"candidate:{name} bytes:{len(blob)} vs_single_brotli:{len(blob) - base:+d} pack_s:{t1 - t0:.1f} "
              f"unpack_s:{t2 - t1:.1f} lossless:{int(same)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
