"""FineWeb documents -> CaseOps token shards + per-token byte sidecar (SPEC 3, 4).

  python prepare_caseops_data.py shards --docs docs_selected.jsonl \
      --tokenizer data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model \
      --out data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved
  python prepare_caseops_data.py tokenizer --docs docs.jsonl --vocab-size 8192 --out my_caseops_8192

Rules this script enforces (both were bugs of the published prep, Issue #2127 / #1736):
  * every document starts with BOS (id 1), so evaluation can split documents;
  * the first 50,000 documents are the validation split and never reach a training shard.
Tokenization uses the tokenizer's pieces and ids with identity normalization and no whitespace
folding, so decode(shards) reproduces the documents byte for byte and the sidecar is exact.
Shards end at document boundaries, which makes a resumed run identical to an uninterrupted one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

import lossless_caps
import train_gpt

VAL_DOCS_DEFAULT = 50_000  # the challenge's validation split: the first 50,000 documents
BATCH_DOCS = 256  # documents per worker task; fixed so the task boundaries never depend on --workers


def load_lossless_sp(model_path: str):
    return train_gpt.load_sentencepiece(model_path, lossless=True)


_SP, _LUT = None, None


def _worker_init(model_path: str) -> None:
    global _SP, _LUT  # one tokenizer per worker process, loaded once
    _SP = load_lossless_sp(model_path)
    _LUT = piece_lengths(_SP)


def piece_lengths(sp) -> np.ndarray:
    """Bytes of the (CaseOps) text each id stands for: byte-fallback ids 1, U+2581 is one space."""
    return np.array([1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
                     for i in range(sp.get_piece_size())], dtype=np.int64)


def encode_doc(sp, text: str, bos_id: int, lens_lut: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, original bytes per token) for one document, BOS first (0 bytes)."""
    lut = piece_lengths(sp) if lens_lut is None else lens_lut
    enc = lossless_caps.encode(text)
    ids = np.array(sp.encode(enc), dtype=np.int64)
    nbytes = lossless_caps.piece_original_bytes(enc, lut[ids])
    return (np.concatenate([[bos_id], ids]).astype(np.uint16), np.concatenate([[0], nbytes]).astype(np.uint16))


def _encode_batch(args: tuple[list[str], int]) -> list[tuple[np.ndarray, np.ndarray]]:
    texts, bos_id = args
    return [encode_doc(_SP, t, bos_id, _LUT) for t in texts]


def iter_docs(path: str, hasher) -> Iterator[str]:
    with open(path, "rb") as fh:
        for line in fh:
            hasher.update(line)
            if line.strip():
                yield json.loads(line)["text"]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Accumulates whole documents and writes a shard when the next one would not fit."""

    def __init__(self, out: Path, split: str, shard_tokens: int, start_index: int, sidecar: bool):
        self.out, self.split, self.limit, self.index, self.sidecar = out, split, shard_tokens, start_index, sidecar
        self.toks, self.bytes, self.n = [], [], 0
        self.written: list[dict] = []

    def add(self, toks: np.ndarray, nbytes: np.ndarray, next_doc: int, on_flush) -> None:
        if self.n and self.n + len(toks) > self.limit:
            self.flush(next_doc, on_flush)
        self.toks.append(toks)
        self.bytes.append(nbytes)
        self.n += len(toks)

    def flush(self, next_doc: int, on_flush) -> None:
        if not self.n:
            return
        name = f"fineweb_{self.split}_{self.index:06d}.bin"
        train_gpt.write_shard(self.out / name, np.concatenate(self.toks))
        entry = {"name": name, "tokens": self.n, "docs": len(self.toks)}
        if self.sidecar:
            side = f"fineweb_{self.split}_bytes_{self.index:06d}.bin"
            b = np.concatenate(self.bytes)
            train_gpt.write_shard(self.out / side, b)
            entry |= {"sidecar": side, "bytes": int(b.astype(np.int64).sum())}
        self.written.append(entry)
        self.index += 1
        self.toks, self.bytes, self.n = [], [], 0
        on_flush(self, next_doc)


def prepare_shards(docs_path: str, tokenizer: str, out: Path, val_docs: int = VAL_DOCS_DEFAULT,
                   shard_tokens: int = 100_000_000, workers: int = 1, max_docs: int = 0, bos_id: int = 1,
                   progress: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if val_docs != VAL_DOCS_DEFAULT:
        print(f"WARNING: --val-docs {val_docs}: the challenge validation split is the first {VAL_DOCS_DEFAULT} "
              "documents; scores on this data are not comparable to the leaderboard", file=sys.stderr)
    sp = load_lossless_sp(tokenizer)
    if sp.bos_id() != bos_id or sp.piece_to_id(lossless_caps.TITLE) != 4:
        raise SystemExit(f"{tokenizer} is not a CaseOps tokenizer (BOS {sp.bos_id()}, TITLE id "
                         f"{sp.piece_to_id(lossless_caps.TITLE)}); train one with `prepare_caseops_data.py tokenizer`")
    params = {"docs": os.path.abspath(docs_path), "tokenizer_sha256": sha256_file(tokenizer), "val_docs": val_docs,
              "shard_tokens": shard_tokens, "max_docs": max_docs, "bos_id": bos_id}
    state_path = out / "prep_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    if state and state["params"] != params:
        raise SystemExit(f"{out} holds a run with other parameters ({state_path}); use a fresh --out")
    state = state or {"params": params, "next_doc": 0, "next_index": {"val": 0, "train": 0}, "shards": []}
    skip = state["next_doc"]
    if skip:
        print(f"resuming at document {skip} ({len(state['shards'])} shards already written)", file=sys.stderr)

    def on_flush(writer: ShardWriter, next_doc: int) -> None:
        state["shards"].append(writer.written[-1] | {"split": writer.split})
        state["next_doc"] = next_doc
        state["next_index"][writer.split] = writer.index
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_path)

    writers = {"val": ShardWriter(out, "val", shard_tokens, state["next_index"]["val"], sidecar=True),
               "train": ShardWriter(out, "train", shard_tokens, state["next_index"]["train"], sidecar=False)}
    hasher = hashlib.sha256()

    def batches():
        batch, start = [], 0
        for i, text in enumerate(iter_docs(docs_path, hasher)):
            if max_docs and i >= max_docs:
                break
            if i < skip:
                continue
            if not batch:
                start = i
            batch.append(text)
            # a batch never straddles the val/train boundary
            if len(batch) == BATCH_DOCS or i + 1 == val_docs:
                yield start, batch
                batch = []
        if batch:
            yield start, batch

    pool = mp.get_context("fork").Pool(workers, _worker_init, (tokenizer,)) if workers > 1 else None
    if pool is None:
        _worker_init(tokenizer)
    gen = batches()
    starts: list[int] = []

    def tasks():
        for start, batch in gen:
            starts.append(start)
            yield batch, bos_id

    results = pool.imap(_encode_batch, tasks()) if pool else map(_encode_batch, tasks())
    bar = _progress(progress)
    for k, encoded in enumerate(results):
        for j, (toks, nb) in enumerate(encoded):
            doc = starts[k] + j
            writers["val" if doc < val_docs else "train"].add(toks, nb, doc, on_flush)
            if doc + 1 == val_docs:  # the val split is complete: close its last shard
                writers["val"].flush(doc + 1, on_flush)
        bar(len(encoded))
    total_docs = (starts[-1] + len(encoded)) if starts else skip
    for w in writers.values():
        w.flush(total_docs, on_flush)
    if pool:
        pool.close()
        pool.join()
    bar(0, done=True)
    manifest = build_manifest(state, out, docs_path, hasher.hexdigest(), tokenizer, total_docs)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    state_path.unlink()
    return manifest


def build_manifest(state: dict, out: Path, docs_path: str, docs_sha: str, tokenizer: str, total_docs: int) -> dict:
    shards = state["shards"]
    for s in shards:
        s["sha256"] = sha256_file(out / s["name"])
        if "sidecar" in s:
            s["sidecar_sha256"] = sha256_file(out / s["sidecar"])
    val = [s for s in shards if s["split"] == "val"]
    train = [s for s in shards if s["split"] == "train"]
    return {
        "format": "parameter-golf shards v1 (256 x int32 header, uint16 tokens)",
        "transform": "lossless_caps CaseOps (TITLE U+E001, ALLCAPS U+E002, CAPNEXT U+E003, ESC U+E004)",
        "tokenizer": os.path.basename(tokenizer), "tokenizer_sha256": state["params"]["tokenizer_sha256"],
        "tokenization": "identity normalization, no whitespace folding (lossless)",
        "input": os.path.abspath(docs_path), "input_sha256": docs_sha, "bos_id": state["params"]["bos_id"],
        "val_docs": sum(s["docs"] for s in val), "train_docs": sum(s["docs"] for s in train),
        "total_docs": total_docs,
        "val_tokens": sum(s["tokens"] for s in val), "train_tokens": sum(s["tokens"] for s in train),
        "val_bytes": sum(s["bytes"] for s in val), "shards": shards,
    }


def _progress(enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(unit="doc", desc="prep", file=sys.stderr) if (enabled and tqdm) else None

    def update(n: int, done: bool = False) -> None:
        if bar is not None:
            bar.update(n)
            if done:
                bar.close()
    return update


def train_tokenizer(docs_path: str, vocab_size: int, out_prefix: str, skip_docs: int = VAL_DOCS_DEFAULT,
                    max_docs: int = 2_000_000) -> Path:
    """Train a CaseOps BPE SentencePiece model with the published layout: pad 0, BOS 1, EOS 2, unk 3,
    TITLE/ALLCAPS/CAPNEXT/ESC at 4..7, byte fallback 8..263. Trains on documents after the
    validation split (the tokenizer must not see validation text)."""
    import sentencepiece as spm

    def sentences():
        for i, text in enumerate(iter_docs(docs_path, hashlib.sha256())):
            if i < skip_docs:
                continue
            if i >= skip_docs + max_docs:
                break
            yield lossless_caps.encode(text)

    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_prefix=out_prefix, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, user_defined_symbols=list(lossless_caps.MARKERS),
        byte_fallback=True, character_coverage=0.9999, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, max_sentence_length=1 << 20,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    return Path(out_prefix + ".model")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("shards", help="documents -> CaseOps train/val shards + val byte sidecar")
    s.add_argument("--docs", required=True, help="jsonl with a 'text' field (e.g. docs_selected.jsonl)")
    s.add_argument("--tokenizer", required=True, help="CaseOps SentencePiece model")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--val-docs", type=int, default=VAL_DOCS_DEFAULT)
    s.add_argument("--shard-tokens", type=int, default=100_000_000)
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    s.add_argument("--max-docs", type=int, default=0, help="stop after N documents (0 = all)")
    s.add_argument("--no-progress", action="store_true")
    t = sub.add_parser("tokenizer", help="train a CaseOps SentencePiece model")
    t.add_argument("--docs", required=True)
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True, help="output prefix; writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--skip-docs", type=int, default=VAL_DOCS_DEFAULT, help="leading (validation) docs to skip")
    t.add_argument("--max-docs", type=int, default=2_000_000)
    a = ap.parse_args(argv)
    if a.cmd == "tokenizer":
        print(train_tokenizer(a.docs, a.vocab_size, a.out, a.skip_docs, a.max_docs))
        return
    m = prepare_shards(a.docs, a.tokenizer, a.out, a.val_docs, a.shard_tokens, a.workers, a.max_docs,
                       progress=not a.no_progress)
    print(json.dumps({k: v for k, v in m.items() if k != "shards"}, indent=1))


if __name__ == "__main__":
    main()
