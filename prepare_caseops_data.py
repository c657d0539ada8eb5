"""FineWeb documents -> CaseOps token shards + per-token val byte sidecar, identical to the published
dataset every CaseOps record trains and is scored on (HF romeerp/parameter-golf-caseops-v1, written by
PR #1729's exporter).

  python prepare_caseops_data.py shards --docs docs_selected.jsonl \\
      --tokenizer data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model \\
      --out data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved
  python prepare_caseops_data.py tokenizer --docs docs.jsonl --vocab-size 8192 --out my_caseops_8192

What the default (`--tokenization published`) reproduces, rule by rule:
  * token ids = sp.encode(caseops_encode(text)) with the tokenizer's own normalizer (nmt_nfkc, whitespace
    folding: a newline becomes U+2581); BOS (id 1) before every document, no EOS;
  * the first 50,000 documents are the validation split, all in fineweb_val_000000.bin, never in training;
  * train shards hold exactly 100,000,000 tokens, cut wherever the stream is (mid-document), and the
    export stops after 80 of them;
  * the val sidecar gives each token the original UTF-8 bytes of its SentencePiece surface (the span of
    the input it covers): CaseOps markers, an escaping ESC and BOS count 0, an escaped literal its own 3
    bytes. A folded whitespace run counts all its original bytes on the piece that covers it.
`--tokenization lossless` keeps the pieces and ids but switches the normalizer off (identity, no folding),
so the shards decode back to the documents byte for byte; its scores are not comparable to the
leaderboard's. A bad input line stops the prep with file:line and the document index (exit code 2)
unless `--skip-bad` counts and skips it. An interrupted run resumes from its last complete shard.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

import lossless_caps
import train_gpt

VAL_DOCS_DEFAULT = 50_000  # the challenge's validation split: the first 50,000 documents
SHARD_TOKENS_DEFAULT = 100_000_000  # published shard size (#1729 exporter)
MAX_TRAIN_SHARDS_DEFAULT = 80  # the published export stops after 80 train shards
BATCH_DOCS = 256  # documents per worker task; fixed so the output never depends on --workers
SIDECAR_MAX = 65_535  # a val token's byte count is stored as uint16
PUBLISHED_TOKENIZER_SHA256 = "97754754561f20def5edd99765ca0668f880bd94e67316d54aa10ab25f45cc4d"
TOKENIZATIONS = {
    "published": "the tokenizer's own normalizer (nmt_nfkc, whitespace folding), as the published dataset",
    "lossless": "identity normalization, no whitespace folding (decodes to the documents byte for byte)",
}


class BadInput(ValueError):
    """A line of the documents file that is not a usable document."""

    def __init__(self, path: str, line: int, doc: int, reason: str):
        super().__init__(f"{path}:{line}: document {doc}: {reason}; fix or remove the line and re-run the same "
                         "command (it resumes), or pass --skip-bad to skip and count such lines")
        self.line, self.doc, self.reason = line, doc, reason


def parse_line(raw: bytes) -> str:
    """The `text` of one jsonl line; raises ValueError with the reason."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict) or "text" not in obj:
        raise ValueError("no 'text' field")
    text = obj["text"]
    if not isinstance(text, str):
        raise ValueError("'text' is null" if text is None else f"'text' is a {type(text).__name__}, not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"lone surrogate U+{ord(text[e.start]):04X} at character {e.start} (not valid Unicode)") from None
    return text


@dataclass
class DocReader:
    """Documents of a jsonl file in order. Blank lines are not documents; a bad line raises BadInput, or
    with `skip_bad` is counted and skipped. `sha` hashes every line read, for the manifest and resume;
    `verify` = (lines, sha256) of an interrupted run's input, which must be unchanged."""
    path: str
    skip_bad: bool = False
    verify: tuple[int, str] | None = None
    lines: int = 0
    bytes: int = 0
    docs: int = 0
    skipped: list = field(default_factory=list)
    sha: "hashlib._Hash" = field(default_factory=hashlib.sha256)

    def __iter__(self) -> Iterator[str]:
        with open(self.path, "rb") as fh:
            for raw in fh:
                self.lines += 1
                self.bytes += len(raw)
                self.sha.update(raw)
                if self.verify and self.lines == self.verify[0] and self.sha.hexdigest() != self.verify[1]:
                    raise SystemExit(f"{self.path} changed since the interrupted run (its first {self.lines} lines "
                                     "differ); use a fresh --out")
                if not raw.strip():
                    continue
                try:
                    text = parse_line(raw)
                except ValueError as e:
                    if not self.skip_bad:
                        raise BadInput(self.path, self.lines, self.docs, str(e)) from None
                    self.skipped.append({"line": self.lines, "reason": str(e)})
                    continue
                self.docs += 1
                yield text


def load_tokenizer(path: str, tokenization: str):
    return train_gpt.load_sentencepiece(path, lossless=tokenization == "lossless")


def surface_protos(sp, texts: list[str]) -> list:
    """SentencePiece's proto output (piece ids and surface byte spans); the API changed in 0.2.2."""
    try:
        return sp.encode(texts, out_type="proto")
    except (ValueError, TypeError, RuntimeError):
        return [sp.encode_as_immutable_proto(t) for t in texts]


def encode_docs(sp, texts: list[str], bos_id: int, with_bytes: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(tokens with BOS first, original bytes per token or None) for each document. Ids come from
    sp.encode of the CaseOps text; a val token's bytes are those of its surface in the original text."""
    encoded = [lossless_caps.encode(t) for t in texts]
    if not with_bytes:
        return [(np.array([bos_id, *ids], dtype=np.uint16), None) for ids in sp.encode(encoded)]
    out = []
    for enc, proto in zip(encoded, surface_protos(sp, encoded)):
        pieces = proto.pieces
        ids = np.array([bos_id] + [p.id for p in pieces], dtype=np.uint16)
        nbytes = lossless_caps.span_original_bytes(enc, [p.begin for p in pieces], [p.end for p in pieces])
        if nbytes.size and int(nbytes.max()) > SIDECAR_MAX:
            out.append((ids, ValueError(f"one token covers {int(nbytes.max())} original bytes (a run of whitespace "
                                        f"folded into one piece), more than the uint16 byte sidecar holds "
                                        f"({SIDECAR_MAX})")))
            continue
        out.append((ids, np.concatenate([[0], nbytes]).astype(np.uint16)))
    return out


_SP = None


def _worker_init(model_path: str, tokenization: str) -> None:
    global _SP  # one tokenizer per worker process, loaded once
    _SP = load_tokenizer(model_path, tokenization)


def _encode_batch(args: tuple[list[str], int, bool]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    texts, bos_id, with_bytes = args
    return encode_docs(_SP, texts, bos_id, with_bytes)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardStream:
    """One split's token stream (and, for val, its byte sidecar) cut into files of exactly `size` tokens
    wherever the cut falls, as the published exporter does; the remainder is kept as the carry."""

    def __init__(self, out: Path, split: str, size: int, index: int, with_bytes: bool, carry=None,
                 limit: int | None = None):
        self.out, self.split, self.size, self.index, self.with_bytes = out, split, size, index, with_bytes
        self.limit = limit
        toks, nbytes = carry if carry is not None else (np.zeros(0, np.uint16), np.zeros(0, np.uint16))
        self.toks, self.bytes = [toks], [nbytes]
        self.n = toks.size

    def add(self, toks: np.ndarray, nbytes: np.ndarray | None) -> list[dict]:
        self.toks.append(toks)
        if self.with_bytes:
            self.bytes.append(nbytes)
        self.n += toks.size
        written = []
        while self.n >= self.size and not self.full:
            written.append(self._write(self.size))
        return written

    @property
    def full(self) -> bool:
        """The split has all the shards it may have (train: --max-train-shards); the rest is dropped."""
        return self.limit is not None and self.index >= self.limit

    def close(self) -> list[dict]:
        """Write what is left as a final, shorter shard."""
        return [self._write(self.n)] if self.n else []

    def carry(self) -> tuple[np.ndarray, np.ndarray]:
        t = np.concatenate(self.toks)
        b = np.concatenate(self.bytes) if self.with_bytes else np.zeros(0, np.uint16)
        return t, b

    def _write(self, k: int) -> dict:
        t, b = self.carry()
        name = f"fineweb_{self.split}_{self.index:06d}.bin"
        train_gpt.write_shard(self.out / name, t[:k])
        entry = {"name": name, "split": self.split, "tokens": int(k), "docs_started": int((t[:k] == 1).sum())}
        if self.with_bytes:
            side = f"fineweb_{self.split}_bytes_{self.index:06d}.bin"
            train_gpt.write_shard(self.out / side, b[:k])
            entry |= {"sidecar": side, "bytes": int(b[:k].astype(np.int64).sum())}
        self.toks, self.bytes, self.n = [t[k:]], [b[k:]], t.size - k
        self.index += 1
        return entry


@dataclass
class PrepJob:
    docs_path: str
    tokenizer: str
    out: Path
    tokenization: str = "published"
    val_docs: int = VAL_DOCS_DEFAULT
    shard_tokens: int = SHARD_TOKENS_DEFAULT
    max_train_shards: int = MAX_TRAIN_SHARDS_DEFAULT
    max_docs: int = 0
    bos_id: int = 1

    def params(self) -> dict:
        return {"docs": os.path.abspath(self.docs_path), "tokenizer_sha256": sha256_file(self.tokenizer),
                "tokenization": self.tokenization, "val_docs": self.val_docs, "shard_tokens": self.shard_tokens,
                "max_train_shards": self.max_train_shards, "max_docs": self.max_docs, "bos_id": self.bos_id}


class PrepState:
    """Progress saved after every shard: documents consumed, the hash of the input lines read so far (a
    resume refuses a changed input), the split being written and its carry (prep_carry.npz)."""

    def __init__(self, out: Path, params: dict):
        self.path, self.carry_path = out / "prep_state.json", out / "prep_carry.npz"
        saved = json.loads(self.path.read_text()) if self.path.exists() else None
        if saved and saved["params"] != params:
            raise SystemExit(f"{out} holds an unfinished prep with other parameters ({self.path}); use a fresh --out")
        self.d = saved or {"params": params, "next_doc": 0, "lines": 0, "prefix_sha256": hashlib.sha256().hexdigest(),
                           "split": "val", "index": 0, "shards": [], "skipped": []}

    def load_carry(self):
        if not self.carry_path.exists():
            return None
        z = np.load(self.carry_path)
        return z["tokens"], z["bytes"]

    def save(self, stream: ShardStream, next_doc: int, mark: "InputMark", reader: DocReader,
             entries: list[dict]) -> None:
        """Everything before document `next_doc` (input read up to `mark`) is in the written shards or the carry."""
        t, b = stream.carry()
        buf = io.BytesIO()
        np.savez(buf, tokens=t, bytes=b)
        train_gpt.write_atomic(self.carry_path, buf.getvalue())
        self.d |= {"next_doc": next_doc, "lines": mark.lines, "prefix_sha256": mark.sha.hexdigest(),
                   "split": stream.split, "index": stream.index,
                   "skipped": [x for x in reader.skipped if x["line"] <= mark.lines]}
        self.d["shards"].extend(entries)
        train_gpt.write_atomic(self.path, json.dumps(self.d, indent=1).encode())

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
        self.carry_path.unlink(missing_ok=True)


@dataclass
class InputMark:
    """How far the input had been read just after a document: lines and their running sha256."""
    lines: int
    sha: "hashlib._Hash"


@dataclass
class Batch:
    start: int  # index of the first document
    texts: list[str]
    marks: list[InputMark]  # the input position after each document


def doc_batches(reader: DocReader, job: PrepJob, skip: int) -> Iterator[Batch]:
    """Fixed-size batches of documents that never straddle the val/train boundary."""
    batch = Batch(0, [], [])
    for i, text in enumerate(reader):
        if job.max_docs and i >= job.max_docs:
            break
        if i < skip:
            continue
        if not batch.texts:
            batch.start = i
        batch.texts.append(text)
        batch.marks.append(InputMark(reader.lines, reader.sha.copy()))
        if len(batch.texts) == BATCH_DOCS or i + 1 == job.val_docs:
            yield batch
            batch = Batch(0, [], [])
    if batch.texts:
        yield batch


def encoded_batches(job: PrepJob, batches: Iterator[Batch], workers: int):
    """(batch, encoded documents) in order, encoded on `workers` processes with a bounded number in flight.
    A bad input line raises from `batches` here, in the main process, before anything after it is written."""
    if workers <= 1:
        _worker_init(job.tokenizer, job.tokenization)
        for b in batches:
            yield b, _encode_batch((b.texts, job.bos_id, b.start < job.val_docs))
        return
    with mp.get_context("fork").Pool(workers, _worker_init, (job.tokenizer, job.tokenization)) as pool:
        pending = []
        for b in batches:
            pending.append((b, pool.apply_async(_encode_batch, ((b.texts, job.bos_id, b.start < job.val_docs),))))
            if len(pending) >= 2 * workers:
                b0, r = pending.pop(0)
                yield b0, r.get()
        for b0, r in pending:
            yield b0, r.get()


def resume_reader(job: PrepJob, state: PrepState, skip_bad: bool) -> DocReader:
    if not state.d["next_doc"]:
        return DocReader(job.docs_path, skip_bad)
    print(f"resuming at document {state.d['next_doc']} ({len(state.d['shards'])} shards already written)",
          file=sys.stderr)
    return DocReader(job.docs_path, skip_bad, verify=(state.d["lines"], state.d["prefix_sha256"]))


def open_stream(job: PrepJob, split: str, index: int, carry=None) -> ShardStream:
    limit = job.max_train_shards if split == "train" else None
    return ShardStream(job.out, split, job.shard_tokens, index, split == "val", carry, limit)


def prepare_shards(docs_path: str, tokenizer: str, out: Path, tokenization: str = "published",
                   val_docs: int = VAL_DOCS_DEFAULT, shard_tokens: int = SHARD_TOKENS_DEFAULT,
                   max_train_shards: int = MAX_TRAIN_SHARDS_DEFAULT, workers: int = 1, max_docs: int = 0,
                   bos_id: int = 1, skip_bad: bool = False, progress: bool = True) -> dict:
    job = PrepJob(docs_path, tokenizer, Path(out), tokenization, val_docs, shard_tokens, max_train_shards, max_docs, bos_id)
    check_job(job)
    job.out.mkdir(parents=True, exist_ok=True)
    state = PrepState(job.out, job.params())
    t0, skip = time.perf_counter(), state.d["next_doc"]
    reader = resume_reader(job, state, skip_bad)
    stream = open_stream(job, state.d["split"], state.d["index"], state.load_carry())
    bar, doc, mark = _progress(progress), skip - 1, InputMark(state.d["lines"], reader.sha.copy())
    for batch, encoded in encoded_batches(job, doc_batches(reader, job, skip), workers):
        for j, (toks, nbytes) in enumerate(encoded):
            doc = batch.start + j
            if isinstance(nbytes, ValueError):  # a document the sidecar cannot represent
                if not skip_bad:
                    raise BadInput(job.docs_path, batch.marks[j].lines, doc, str(nbytes))
                reader.skipped.append({"line": batch.marks[j].lines, "reason": str(nbytes)})
                continue
            if doc == val_docs and stream.split == "val":  # the val split is complete: close its last shard
                state.save(stream, doc, mark, reader, stream.close())
                stream = open_stream(job, "train", 0)
            mark = batch.marks[j]
            written = stream.add(toks, nbytes)
            if written:
                state.save(stream, doc + 1, mark, reader, written)
            if stream.full:
                break
        bar(len(encoded))
        if stream.full:
            break
    if not stream.full:
        state.save(stream, doc + 1, mark, reader, stream.close())
    bar(0, finished=True)
    manifest = build_manifest(job, state, reader, time.perf_counter() - t0, skip)
    if not manifest["train_docs"]:
        raise SystemExit(f"{job.docs_path} has {manifest['val_docs']} documents, all taken by the validation split "
                         f"(--val-docs {job.val_docs}): no training data was written; give more documents (the "
                         "challenge's split is the first 50,000) or, for a test, a smaller --val-docs")
    train_gpt.write_atomic(job.out / "manifest.json", json.dumps(manifest, indent=1).encode())
    state.finish()
    return manifest


def check_job(job: PrepJob) -> None:
    for path, what in ((job.docs_path, "--docs"), (job.tokenizer, "--tokenizer")):
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise SystemExit(f"{what} {path} is not a readable file")
    try:
        job.out.mkdir(parents=True, exist_ok=True)
        probe = job.out / ".write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"--out {job.out} is not writable ({e.strerror}); choose another folder") from None
    fresh = not (job.out / "prep_state.json").exists()
    old = sorted(p.name for p in job.out.glob("fineweb_*.bin")) + (["manifest.json"] if (job.out / "manifest.json").exists() else [])
    if fresh and old:
        raise SystemExit(f"--out {job.out} already holds {len(old)} files of another prep ({', '.join(old[:3])}...); "
                         "they would mix with this one's: delete them or choose an empty --out")
    if job.tokenization not in TOKENIZATIONS:
        raise SystemExit(f"--tokenization {job.tokenization}: choose one of {', '.join(TOKENIZATIONS)}")
    if job.val_docs != VAL_DOCS_DEFAULT:
        print(f"WARNING: --val-docs {job.val_docs}: the challenge validation split is the first {VAL_DOCS_DEFAULT} "
              "documents; scores on this data are not comparable to the leaderboard", file=sys.stderr)
    sp = load_tokenizer(job.tokenizer, job.tokenization)
    if sp.bos_id() != job.bos_id or sp.piece_to_id(lossless_caps.TITLE) != 4:
        raise SystemExit(f"{job.tokenizer} is not a CaseOps tokenizer (BOS {sp.bos_id()}, TITLE id "
                         f"{sp.piece_to_id(lossless_caps.TITLE)}); train one with `prepare_caseops_data.py tokenizer`")
    if job.tokenization == "published" and sha256_file(job.tokenizer) != PUBLISHED_TOKENIZER_SHA256:
        print(f"note: {job.tokenizer} is not the published CaseOps tokenizer; the shards follow the published "
              "recipe but cannot equal the published dataset", file=sys.stderr)


def build_manifest(job: PrepJob, state: PrepState, reader: DocReader, seconds: float, resumed_at: int) -> dict:
    shards = state.d["shards"]
    for s in shards:
        s["sha256"] = sha256_file(job.out / s["name"])
        if "sidecar" in s:
            s["sidecar_sha256"] = sha256_file(job.out / s["sidecar"])
    val = [s for s in shards if s["split"] == "val"]
    train = [s for s in shards if s["split"] == "train"]
    docs = state.d["next_doc"]
    input_mb = reader.bytes / 1e6
    return {
        "format": "parameter-golf shards v1 (256 x int32 header, uint16 tokens)",
        "transform": "lossless_caps CaseOps (TITLE U+E001, ALLCAPS U+E002, CAPNEXT U+E003, ESC U+E004)",
        "tokenization": job.tokenization, "tokenization_meaning": TOKENIZATIONS[job.tokenization],
        "tokenizer": os.path.basename(job.tokenizer), "tokenizer_sha256": state.d["params"]["tokenizer_sha256"],
        "published_tokenizer": state.d["params"]["tokenizer_sha256"] == PUBLISHED_TOKENIZER_SHA256,
        "input": os.path.abspath(job.docs_path), "input_lines_read": reader.lines, "input_bytes_read": reader.bytes,
        "input_read_sha256": reader.sha.hexdigest(), "bos_id": job.bos_id,
        "val_docs": min(docs, job.val_docs), "train_docs": max(0, docs - job.val_docs),
        "val_tokens": sum(s["tokens"] for s in val), "train_tokens": sum(s["tokens"] for s in train),
        "val_bytes": sum(s["bytes"] for s in val), "skipped_docs": len(state.d["skipped"]),
        "skipped": state.d["skipped"][:100], "seconds": round(seconds, 2),
        "docs_per_s": round((docs - resumed_at) / max(seconds, 1e-9), 1),
        "mb_per_s": round(input_mb / max(seconds, 1e-9), 3), "resumed_at_doc": resumed_at,
        "shards": shards,
    }


def _progress(enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(unit="doc", desc="prep", file=sys.stderr) if (enabled and tqdm) else None

    def update(n: int, finished: bool = False) -> None:
        if bar is not None:
            bar.update(n)
            if finished:
                bar.close()
    return update


def train_tokenizer(docs_path: str, vocab_size: int, out_prefix: str, skip_docs: int = VAL_DOCS_DEFAULT,
                    max_docs: int = 2_000_000, tokenization: str = "published") -> Path:
    """Train a CaseOps BPE SentencePiece model with the published layout and trainer settings (#1729): pad 0,
    BOS 1, EOS 2, unk 3, TITLE/ALLCAPS/CAPNEXT/ESC at 4..7, byte fallback 8..263, nmt_nfkc without a dummy
    prefix. Trains on documents after the validation split (the tokenizer must not see validation text)."""
    import sentencepiece as spm

    def sentences():
        for i, text in enumerate(DocReader(docs_path)):
            if i >= skip_docs + max_docs:
                break
            if i >= skip_docs:
                yield lossless_caps.encode(text)

    norm = {"normalization_rule_name": "nmt_nfkc"} if tokenization == "published" else {
        "normalization_rule_name": "identity", "remove_extra_whitespaces": False}
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_prefix=out_prefix, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, user_defined_symbols=list(lossless_caps.MARKERS),
        byte_fallback=True, character_coverage=0.999, split_digits=True, add_dummy_prefix=False,
        hard_vocab_limit=False, max_sentence_length=1 << 20, num_threads=os.cpu_count() or 1, minloglevel=2, **norm)
    return Path(out_prefix + ".model")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("shards", help="documents -> CaseOps train/val shards + val byte sidecar")
    s.add_argument("--docs", required=True, help="jsonl with a 'text' field (e.g. docs_selected.jsonl)")
    s.add_argument("--tokenizer", required=True, help="CaseOps SentencePiece model")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--tokenization", choices=sorted(TOKENIZATIONS), default="published",
                   help="published: as the published dataset (default); lossless: no normalization, not comparable")
    s.add_argument("--val-docs", type=int, default=VAL_DOCS_DEFAULT)
    s.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS_DEFAULT)
    s.add_argument("--max-train-shards", type=int, default=MAX_TRAIN_SHARDS_DEFAULT)
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    s.add_argument("--max-docs", type=int, default=0, help="stop after N documents (0 = all)")
    s.add_argument("--skip-bad", action="store_true", help="skip bad input lines and count them in the manifest")
    s.add_argument("--no-progress", action="store_true")
    t = sub.add_parser("tokenizer", help="train a CaseOps SentencePiece model")
    t.add_argument("--docs", required=True)
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True, help="output prefix; writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--skip-docs", type=int, default=VAL_DOCS_DEFAULT, help="leading (validation) docs to skip")
    t.add_argument("--max-docs", type=int, default=2_000_000)
    t.add_argument("--tokenization", choices=sorted(TOKENIZATIONS), default="published")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "tokenizer":
            print(train_tokenizer(a.docs, a.vocab_size, a.out, a.skip_docs, a.max_docs, a.tokenization))
            return
        m = prepare_shards(a.docs, a.tokenizer, a.out, a.tokenization, a.val_docs, a.shard_tokens, a.max_train_shards,
                           a.workers, a.max_docs, skip_bad=a.skip_bad, progress=not a.no_progress)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: v for k, v in m.items() if k not in ("shards", "skipped")}, indent=1))


if __name__ == "__main__":
    main()
