"""The whole pipeline on a CPU in a few minutes, with nothing downloaded:

  python tools/cpu_pipeline.py            # -> runs/cpu_pipeline/records/track_10min_16mb/<date>_CPUPipeline/

generated English-like corpus (with capitals) -> CaseOps tokenizer -> CaseOps shards + byte sidecar
-> two seeds through run.sh (2 gloo ranks each: train, loop-aware GPTQ, per-group pack, roundtrip /
sliding / phased-TTT evaluation from the artifact) -> a complete record folder.

It prints its timings as it goes and `cpu_pipeline_seconds:N` at the end; `--max-seconds S` turns the total
into a benchmark check (exit 3 when slower). Tests never assert it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare_caseops_data as prep  # noqa: E402
import synthetic_corpus  # noqa: E402
from tools import make_record  # noqa: E402

VAL_DOCS = 200
TINY = {  # the frontier defaults on a tiny flat + crawler model that learns this corpus in about a CPU minute
    "CASEOPS_ENABLED": "1", "VOCAB_SIZE": "512", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "NUM_FLAT_LAYERS": "2", "FLAT_ENCODER_LAYERS": "1", "NUM_CRAWLER_LAYERS": "1", "CRAWLER_LOOPS": "2",
    "CRAWLER_START_FRAC": "0.35", "CRAWLER_MLP_MULT": "2", "MLP_MULT": "2", "ROPE_DIMS": "8",
    "PARALLEL_RESIDUAL_START": "2", "TRAIN_SEQ_LEN": "128", "TRAIN_SEQ_SCHEDULE": "", "TRAIN_BATCH_TOKENS": "2048",
    "GRAD_ACCUM_STEPS": "1", "ITERATIONS": "160",
    "MAX_WALLCLOCK_SECONDS": "0", "GPTQ_RESERVE_SECONDS": "0", "WARMDOWN_FRAC": "0.3", "TRAIN_LOG_EVERY": "25",
    "VAL_LOSS_EVERY": "100", "VAL_BATCH_TOKENS": "16384", "MATRIX_LR": "0.02", "EMBED_LR": "0.05", "SCALAR_LR": "0.02",
    "MUON_MOMENTUM_WARMUP_STEPS": "50", "GPTQ_CAL_SAMPLES": "32", "GPTQ_CAL_SEQ_LEN": "128", "EVAL_SEQ_LEN": "160",
    "EVAL_STRIDE": "32", "EVAL_BATCH_TOKENS": "8192", "TTT_LORA_RANK": "8", "TTT_CHUNK_SIZE": "32",
    "TTT_SHORT_CHUNKS": "", "TTT_BATCH_DOCS": "32", "PHASED_TTT_PREFIX_DOCS": "100", "PHASED_TTT_NUM_PHASES": "1",
    "TTT_GLOBAL_CHUNK_TOKENS": "2048", "EVAL_BUDGET_SECONDS": "300",
    # scaled to 160 steps: the default EMA (0.9965, a ~285-step horizon over ~6,500 steps) would average in the
    # initial weights here; and the default 15-token n-gram context never repeats in 35k val tokens
    "EMA_DECAY": "0.9", "NGRAM_TILT_ORDER": "6",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "cpu_pipeline")
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=0.0, help="exit 3 if the whole run takes longer (0 = off)")
    a = ap.parse_args(argv)
    t0 = time.time()
    work = a.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    (work / "tokenizers").mkdir(parents=True)
    docs = work / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_corpus.generate_documents(a.docs, seed=0)))
    print(f"[{time.time() - t0:5.1f}s] corpus: {a.docs} documents -> {docs}")
    tok = prep.train_tokenizer(str(docs), 512, str(work / "tokenizers" / "fineweb_512_bpe_lossless_caps_caseops_v1_reserved"),
                               skip_docs=VAL_DOCS)
    print(f"[{time.time() - t0:5.1f}s] tokenizer: {tok}")
    data = work / "datasets" / "fineweb10B_sp512_lossless_caps_caseops_v1_reserved"
    m = prep.prepare_shards(str(docs), str(tok), data, val_docs=VAL_DOCS, shard_tokens=200_000, workers=2, progress=False)
    print(f"[{time.time() - t0:5.1f}s] shards: {m['val_tokens']} val / {m['train_tokens']} train tokens")
    record_dir = work / "records" / "logs"
    logs = []
    for seed in a.seeds.split(","):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")} | TINY | {
            "SEED": seed, "DATA_DIR": str(work), "DEVICE": "cpu", "NPROC": str(a.nproc), "OMP_NUM_THREADS": "1",
            "RECORD_DIR": str(record_dir), "RUN_DIR": str(work / "runs" / f"seed{seed}"), "MIN_FREE_GB": "1"}
        r = subprocess.run(["bash", str(ROOT / "run.sh")], env=env, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-4000:] + r.stderr[-4000:], file=sys.stderr)
            return r.returncode
        final = [l for l in r.stdout.splitlines() if l.startswith(("quantized_ttt_phased", "Total submission"))]
        print(f"[{time.time() - t0:5.1f}s] seed {seed}: " + " | ".join(final))
        for line in r.stdout.splitlines():  # the n-gram tilt on this val set: positions tilted, bpb with and without
            if line.startswith("ngram_tilt_fired:") or "untilted_val_bpb:" in line:
                print(f"    {line}")
        logs.append(record_dir / f"train_seed{seed}.log")
    folder = make_record.build_record(logs, "CPUPipeline", "cpu-pipeline", "none", work / "records",
                                      train_budget=3600.0,
                                      eval_budget=float(TINY["EVAL_BUDGET_SECONDS"]))
    print(f"[{time.time() - t0:5.1f}s] record: {folder}")
    for f in sorted(folder.iterdir()):
        print(f"    {f.name} ({f.stat().st_size} bytes)")
    total = time.time() - t0
    print(f"cpu_pipeline_seconds:{total:.1f}")
    if a.max_seconds and total > a.max_seconds:
        print(f"slower than --max-seconds {a.max_seconds:.0f}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
