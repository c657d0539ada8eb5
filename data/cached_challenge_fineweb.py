"""Download the challenge's tokenized FineWeb shards and tokenizers from the Hugging Face Hub.

  python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80
  python data/cached_challenge_fineweb.py --variant sp8192_caseops          # the published CaseOps data (#1729)
  python data/cached_challenge_fineweb.py --docs-only                       # docs_selected.jsonl (~45 GB), to prep yourself

Files land in data/datasets/<dataset>/ and data/tokenizers/ (the layout train_gpt.py expects). Each variant
knows its repository: the plain SentencePiece exports live in willdepueoai/parameter-golf, the CaseOps
export every CaseOps record since April uses (train shards, val shard, val byte sidecar, tokenizer) in
romeerp/parameter-golf-caseops-v1. The remote manifest.json says how many shards a variant has.
Re-running resumes: files already present are verified (shard header and size, sidecar length) and skipped;
a corrupt, partial or damaged file is downloaded again. Every file is checked against the Hub's own hash (sha256
for LFS files) and its structure (shard header and size, sidecar length against the val shard).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER_BYTES, MAGIC = 1024, 20240520


@dataclass(frozen=True)
class Variant:
    repo_id: str
    remote_root: str
    dataset: str
    sidecar: bool = False  # the val byte sidecar (CaseOps)


OFFICIAL = "willdepueoai/parameter-golf"
CASEOPS = Variant("romeerp/parameter-golf-caseops-v1", "datasets",
                  "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", sidecar=True)
VARIANTS = {
    "sp1024": Variant(OFFICIAL, "datasets", "fineweb10B_sp1024"),
    "sp4096": Variant(OFFICIAL, "datasets", "fineweb10B_sp4096"),
    "sp8192": Variant(OFFICIAL, "datasets", "fineweb10B_sp8192"),
    "byte260": Variant(OFFICIAL, "datasets", "fineweb10B_byte260"),
    "sp8192_caseops": CASEOPS,
    "sp8192_lossless_caps_caseops_v1_reserved": CASEOPS,  # the name #1729's downloader used
}


class DownloadError(RuntimeError):
    pass


def shard_tokens(path: Path) -> int | None:
    """Token count of a complete shard (valid header, exactly the tokens it declares), else None."""
    if not path.is_file() or path.stat().st_size < HEADER_BYTES:
        return None
    with open(path, "rb") as fh:
        head = fh.read(12)
    magic, version, n = (int.from_bytes(head[i:i + 4], "little", signed=True) for i in (0, 4, 8))
    ok = magic == MAGIC and version == 1 and path.stat().st_size == HEADER_BYTES + 2 * n
    return n if ok else None


def shard_ok(path: Path) -> bool:
    return shard_tokens(path) is not None


class Hub:
    """The real download path: huggingface_hub into a staging folder under data/, checked against the Hub's own
    hash of the file (sha256 for LFS files, the git blob sha1 for small ones), then moved into place. Nothing is
    hard-linked or kept in a cache: a file damaged in place is found and fetched again by the next run."""

    def __init__(self, repo_id: str, remote_root: str, endpoint: str | None, stage: Path):
        self.repo_id, self.remote_root, self.endpoint, self.stage = repo_id, remote_root, endpoint, stage

    def _split(self, remote: str) -> tuple[str, str | None, str]:
        full = f"{self.remote_root}/{remote}" if self.remote_root else remote
        sub, name = os.path.split(full)
        return full, sub or None, name

    def expected_hash(self, remote: str) -> str:
        """The Hub's hash of a file: its LFS sha256 (64 hex digits) or git blob sha1 (40)."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        full, sub, name = self._split(remote)
        try:
            meta = get_hf_file_metadata(hf_hub_url(self.repo_id, name, subfolder=sub, repo_type="dataset",
                                                   endpoint=self.endpoint))
        except Exception as e:  # noqa: BLE001 - network/hub errors all mean the same thing to the user
            raise DownloadError(f"could not reach {full} on {self.repo_id}: {e}") from e
        return (meta.etag or "").strip('"').removeprefix("W/").strip('"')

    def fetch(self, remote: str, dest: Path, expected: str | None = None) -> None:
        """Download `remote` to `dest` (atomically), checked against the Hub's hash (`expected` when the caller has
        already asked for it: one metadata request per file)."""
        from huggingface_hub import hf_hub_download

        full, sub, name = self._split(remote)
        expected = expected or self.expected_hash(remote)
        try:
            got = Path(hf_hub_download(repo_id=self.repo_id, filename=name, subfolder=sub, repo_type="dataset",
                                       endpoint=self.endpoint, local_dir=self.stage))
        except Exception as e:  # noqa: BLE001
            raise DownloadError(f"could not download {full} from {self.repo_id}: {e}") from e
        actual = file_hash(got, expected)
        if actual != expected:
            got.unlink(missing_ok=True)
            raise DownloadError(f"{full} from {self.repo_id} does not match the Hub's hash ({actual} != {expected}): "
                                "the transfer was damaged; re-run the same command")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, dest)


def file_hash(path: Path, like: str) -> str:
    """sha256 of the file (a 64-digit `like`) or its git blob sha1 (40 digits), as the Hub reports them."""
    h = hashlib.sha256() if len(like) == 64 else hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


class Verified:
    """data/.verified.json: each file's size, mtime and the Hub hash it matched, so a re-run re-hashes only files
    that changed since (16 GB of shards are not hashed twice)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.d = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):  # unreadable: every file is simply hashed again
            self.d = {}

    def matches(self, dest: Path, expected: str) -> bool:
        st, rec = dest.stat(), self.d.get(str(dest))
        if rec and rec == [st.st_size, st.st_mtime_ns, expected]:
            return True
        return file_hash(dest, expected) == expected

    def record(self, dest: Path, expected: str) -> None:
        st = dest.stat()
        self.d[str(dest)] = [st.st_size, st.st_mtime_ns, expected]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")  # atomic, as train_gpt.write_atomic
        with open(tmp, "w") as fh:
            fh.write(json.dumps(self.d, indent=0))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


@dataclass(frozen=True)
class RemoteFile:
    remote: str  # path under the remote root
    local: str  # path under data/
    kind: str  # shard | sidecar | tokenizer

    def verify(self, path: Path, data_dir: Path) -> str | None:
        """None when `path` is complete and consistent, else why not."""
        if self.kind == "tokenizer":
            return None if path.is_file() and path.stat().st_size > 0 else "empty or missing"
        n = shard_tokens(path)
        if n is None:
            return "header/size mismatch"
        if self.kind == "sidecar":
            val = data_dir / self.local.replace("fineweb_val_bytes_", "fineweb_val_")
            if shard_tokens(val) != n:
                return f"{n} sidecar entries for {shard_tokens(val)} val tokens"
        return None


def plan(manifest: dict, variant: Variant, train_shards: int) -> list[RemoteFile]:
    """Every file of the variant: val shards (and their sidecars), train shards, tokenizer files."""
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == variant.dataset), None)
    if entry is None:
        names = [d.get("name") for d in manifest.get("datasets", [])]
        raise DownloadError(f"{variant.dataset} is not in the remote manifest of {variant.repo_id} (it has {names})")
    stats = entry.get("stats", {})
    n_train, n_val = int(stats["files_train"]), int(stats["files_val"])
    if train_shards > n_train:
        raise DownloadError(f"{variant.dataset} has {n_train} train shards; asked for {train_shards}")
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tok is None:
        raise DownloadError(f"tokenizer {entry.get('tokenizer_name')} of {variant.dataset} is not in the manifest")
    ds = f"datasets/{variant.dataset}"
    files = [RemoteFile(f"{ds}/fineweb_val_{i:06d}.bin", f"{ds}/fineweb_val_{i:06d}.bin", "shard") for i in range(n_val)]
    if variant.sidecar or entry.get("val_bytes_glob"):
        files += [RemoteFile(f"{ds}/fineweb_val_bytes_{i:06d}.bin", f"{ds}/fineweb_val_bytes_{i:06d}.bin", "sidecar")
                  for i in range(n_val)]
    files += [RemoteFile(f"{ds}/fineweb_train_{i:06d}.bin", f"{ds}/fineweb_train_{i:06d}.bin", "shard")
              for i in range(train_shards)]
    for key in ("model_path", "vocab_path", "path"):
        if tok.get(key):
            files.append(RemoteFile(tok[key], f"tokenizers/{Path(tok[key]).name}", "tokenizer"))
    return files


def download(variant: Variant, train_shards: int, data_dir: Path, source: Hub, log=print) -> list[Path]:
    manifest_path = data_dir / "manifests" / f"{variant.repo_id.replace('/', '__')}.json"
    source.fetch("manifest.json", manifest_path)
    files = plan(json.loads(manifest_path.read_text()), variant, train_shards)
    verified, done = Verified(data_dir / ".verified.json"), []
    for i, f in enumerate(files, 1):
        dest = data_dir / f.local
        expected = source.expected_hash(f.remote)
        if dest.exists() and f.verify(dest, data_dir) is None and verified.matches(dest, expected):
            log(f"[{i}/{len(files)}] ok (present, hash verified) {f.local}")
        else:
            if dest.exists():
                log(f"[{i}/{len(files)}] {f.local}: damaged or incomplete; downloading again")
                dest.unlink()
            source.fetch(f.remote, dest, expected)
            why = f.verify(dest, data_dir)
            if why is not None:
                dest.unlink()
                raise DownloadError(f"{f.remote} from {variant.repo_id} failed verification after download ({why}): "
                                    "the published file itself is inconsistent; report it to the dataset's owner")
            log(f"[{i}/{len(files)}] downloaded {f.local} ({dest.stat().st_size} bytes, hash verified)")
        verified.record(dest, expected)
        done.append(dest)
    return done


DOCS = ("docs_selected.jsonl", "docs_selected.source_manifest.json")  # the FineWeb documents, in the official repo


def download_docs(data_dir: Path, source: Hub, log=print) -> list[Path]:
    """The selected FineWeb documents every export was made from (first 50,000 = validation)."""
    out = []
    for name in DOCS:
        dest = data_dir / name
        if not dest.is_file():
            source.fetch(name, dest)
        log(f"ready {dest} ({dest.stat().st_size} bytes)")
        out.append(dest)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="sp1024", help=f"one of {', '.join(VARIANTS)}")
    ap.add_argument("--train-shards", type=int, default=80)
    ap.add_argument("--data-dir", type=Path, default=HERE)
    ap.add_argument("--repo-id", default=os.environ.get("MATCHED_FINEWEB_REPO_ID"),
                    help="override the variant's repository (also MATCHED_FINEWEB_REPO_ID)")
    ap.add_argument("--remote-root", default=os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"),
                    help="override the folder of the export inside the repository")
    ap.add_argument("--endpoint", default=None, help="Hub endpoint (default: huggingface.co or HF_ENDPOINT)")
    ap.add_argument("--docs-only", action="store_true", help="download docs_selected.jsonl for prepare_caseops_data.py")
    a = ap.parse_args(argv)
    if a.train_shards < 0:
        ap.error("--train-shards must be >= 0")
    if a.variant not in VARIANTS:
        ap.error(f"unknown --variant {a.variant}; choose one of {', '.join(VARIANTS)}")
    v = VARIANTS[a.variant]
    v = Variant(a.repo_id or v.repo_id, v.remote_root if a.remote_root is None else a.remote_root, v.dataset, v.sidecar)
    if a.docs_only:
        v = Variant(a.repo_id or OFFICIAL, "datasets" if a.remote_root is None else a.remote_root, "")
    hub = Hub(v.repo_id, v.remote_root, a.endpoint, a.data_dir / ".hf_stage")
    try:
        files = download_docs(a.data_dir, hub) if a.docs_only else download(v, a.train_shards, a.data_dir, hub)
    except DownloadError as e:
        print(f"download failed: {e}\nre-run the same command to resume", file=sys.stderr)
        return 1
    print(f"{len(files)} files ready under {a.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
