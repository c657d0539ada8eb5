"""Shared fixtures: a small SentencePiece model and token shards made from generated text."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import synthetic_corpus  # noqa: E402
import train_gpt  # noqa: E402

# One intra-op thread per test process: on a 2-core machine shared with trainer subprocesses (or anything
# else), OpenMP threads spinning against each other make small matmuls 20x slower.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = ROOT.parent / "shared" / "data"


def bytes_sentencepiece_keeps(sp, text: str) -> int:
    """The byte rule of the published sidecar: a document's bytes minus the leading and trailing characters
    the tokenizer's normalizer turns into whitespace or deletes (SentencePiece drops those; an inner run of
    them is folded into one piece that carries all of its bytes)."""
    vanish = lambda c: sp.normalize(c) == ""  # noqa: E731
    a, b = 0, len(text)
    while a < b and vanish(text[a]):
        a += 1
    while b > a and vanish(text[b - 1]):
        b -= 1
    return len(text[a:b].encode())


def train_sentencepiece(docs: list[str], prefix: Path, vocab_size: int = 512) -> Path:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=3, bos_id=1, eos_id=2, pad_id=0,
        max_sentence_length=100000, num_threads=2, minloglevel=2)
    return prefix.with_suffix(".model")


def write_plain_shards(docs: list[str], model: Path, out: Path, n_val_docs: int, train_shards: int = 2) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    out.mkdir(parents=True, exist_ok=True)
    ids = sp.encode(docs)
    stream = lambda part: np.concatenate([[1] + x for x in part]).astype(np.uint16)  # noqa: E731
    train_gpt.write_shard(out / "fineweb_val_000000.bin", stream(ids[:n_val_docs]))
    rest = ids[n_val_docs:]
    per = len(rest) // train_shards
    for i in range(train_shards):
        train_gpt.write_shard(out / f"fineweb_train_{i:06d}.bin", stream(rest[i * per:(i + 1) * per]))


def built_once(tmp_path_factory, name: str, build, paths: tuple[str, ...]) -> dict:
    """build(folder) -> dict, run once per test session however many pytest-xdist workers share it: the first
    worker to ask builds under a folder every worker sees, the others wait on its lock and read the result (the
    keys in `paths` come back as Paths). Fixtures built this way must be read-only for the tests."""
    import json

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"shared_{name}"
    with FileLock(str(folder) + ".lock"):
        done = folder / "result.json"
        if not done.exists():
            folder.mkdir(exist_ok=True)
            result = build(folder)
            done.write_text(json.dumps(result, default=str))
        out = json.loads(done.read_text())
    return out | {k: Path(out[k]) for k in paths}


@pytest.fixture(scope="session")
def plain_data(tmp_path_factory) -> dict:
    """data_dir with tokenizers/fineweb_512_bpe.model and datasets/fineweb10B_sp512/ shards."""
    def build(root: Path) -> dict:
        docs = synthetic_corpus.generate_documents(2400, seed=1)
        (root / "tokenizers").mkdir()
        model = train_sentencepiece(docs[:1500], root / "tokenizers" / "fineweb_512_bpe")
        write_plain_shards(docs, model, root / "datasets" / "fineweb10B_sp512", n_val_docs=200)
        return {"data_dir": root, "tokenizer": model, "data_path": root / "datasets" / "fineweb10B_sp512", "docs": docs}

    return built_once(tmp_path_factory, "plain_data", build, ("data_dir", "tokenizer", "data_path"))


TINY = {  # the frontier defaults, shrunk to a model that learns the generated corpus in a CPU minute
    "VOCAB_SIZE": "512", "CASEOPS_ENABLED": "0", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "NUM_FLAT_LAYERS": "2", "FLAT_ENCODER_LAYERS": "1", "NUM_CRAWLER_LAYERS": "1", "CRAWLER_LOOPS": "2",
    "CRAWLER_START_FRAC": "0", "CRAWLER_MLP_MULT": "2", "MLP_MULT": "2", "INST_DIM": "8", "ROPE_DIMS": "8",
    "PARALLEL_RESIDUAL_START": "2", "BIGRAM_VOCAB_SIZE": "64", "BIGRAM_DIM": "16",
    "TRAIN_SEQ_LEN": "64", "TRAIN_SEQ_SCHEDULE": "", "TRAIN_BATCH_TOKENS": "2048", "GRAD_ACCUM_STEPS": "1",
    "MAX_WALLCLOCK_SECONDS": "0", "GPTQ_RESERVE_SECONDS": "0", "VAL_TOKEN_LIMIT": "8192", "VAL_BATCH_TOKENS": "4096",
    "WARMDOWN_FRAC": "0.3", "TRAIN_LOG_EVERY": "10", "VAL_LOSS_EVERY": "0", "MUON_MOMENTUM_WARMUP_STEPS": "10",
    "MATRIX_LR": "0.02", "EMBED_LR": "0.05", "SCALAR_LR": "0.02",
    "EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "32", "EVAL_BATCH_TOKENS": "4096", "TTT_LORA_RANK": "8",
    "TTT_CHUNK_SIZE": "32", "TTT_SHORT_CHUNKS": "", "TTT_BATCH_DOCS": "8", "PHASED_TTT_PREFIX_DOCS": "16",
    "PHASED_TTT_NUM_PHASES": "2", "TTT_GLOBAL_CHUNK_TOKENS": "512", "GPTQ_CAL_SAMPLES": "16", "GPTQ_CAL_SEQ_LEN": "64",
}


def clean_env() -> dict:
    """The parent environment minus anything that looks like one of our variables."""
    return {k: v for k, v in os.environ.items() if k not in train_gpt.ENV_NAMES and not k.startswith("PYTEST")}


def run_trainer(env: dict, out: Path, nproc: int = 1, timeout: int = 300, emulate: bool = False
                ) -> subprocess.CompletedProcess:
    """train_gpt.py as a subprocess (under torchrun for nproc > 1); with `emulate`, through tests/host_device_main.py:
    host and device told apart, CUDA's rules on mixing them enforced (issue 24)."""
    full = clean_env() | {"OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"} | env
    script = str(ROOT / "tests" / "host_device_main.py") if emulate else str(ROOT / "train_gpt.py")
    if nproc == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    # its own session: a run that outlives `timeout` is stopped with every process it started (torchrun's ranks)
    proc = subprocess.Popen(cmd, env=full, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def tiny_env(plain_data: dict, **over) -> dict:
    return TINY | {"DATA_DIR": str(plain_data["data_dir"])} | {k: str(v) for k, v in over.items()}


@pytest.fixture(scope="session")
def caseops_data(tmp_path_factory) -> dict:
    """A CaseOps tokenizer trained on generated docs and shards prepared from them (200 val docs)."""
    import json

    import prepare_caseops_data as prep

    def build(root: Path) -> dict:
        docs = synthetic_corpus.generate_documents(1200, seed=3)
        jsonl = root / "docs.jsonl"
        jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        (root / "tokenizers").mkdir()
        model = prep.train_tokenizer(str(jsonl), 400, str(root / "tokenizers" /
                                                          "fineweb_400_bpe_lossless_caps_caseops_v1_reserved"), skip_docs=200)
        out = root / "datasets" / "fineweb10B_sp400_lossless_caps_caseops_v1_reserved"
        manifest = prep.prepare_shards(str(jsonl), str(model), out, val_docs=200, shard_tokens=40_000, workers=1,
                                       progress=False)
        return {"root": root, "jsonl": jsonl, "docs": docs, "tokenizer": model, "data_path": out, "manifest": manifest}

    return built_once(tmp_path_factory, "caseops_data", build, ("root", "jsonl", "tokenizer", "data_path"))


@pytest.fixture(scope="session")
def trained_tiny(plain_data, tmp_path_factory) -> dict:
    """One real run of the whole pipeline on the tiny config (150 steps), shared by several tests (the same pipeline
    with host and device told apart: test_host_device.py)."""
    def build(out: Path) -> dict:
        env = tiny_env(plain_data, ITERATIONS=150, GPTQ_CAL_SAMPLES=32, GPTQ_CAL_SEQ_LEN=64)
        r = run_trainer(env, out)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return {"out": out, "env": env, "stdout": r.stdout}

    return built_once(tmp_path_factory, "trained_tiny", build, ("out",))


def log_value(stdout: str, prefix: str, key: str) -> float:
    line = [l for l in stdout.splitlines() if l.startswith(prefix)][-1]
    return float(line.split(key)[1].split()[0].rstrip("ms"))


def pytest_configure(config):
    """Under pytest-xdist (`-n 2`) hand tests out two at a time (its default sends each worker a quarter of its
    share at once), so that the long tests sorted first below go to different workers."""
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 2


def pytest_collection_modifyitems(items):
    """The long (`release`, `slow`) tests first, so that the two workers of `-n 2` finish together. A stable sort:
    every worker collects the same order, as pytest-xdist requires."""
    items.sort(key=lambda item: (item.get_closest_marker("release") is None, item.get_closest_marker("slow") is None))
