"""Download the challenge's tokenized FineWeb shards and tokenizers from the Hugging Face Hub.

  python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80
  python data/cached_challenge_fineweb.py --variant sp8192 --train-shards 10

Files land in data/datasets/<dataset>/ and data/tokenizers/ (the layout train_gpt.py expects).
The remote manifest.json says which shards and tokenizer files a variant has. Re-running resumes:
files already present are verified (shard header and size) and skipped; a corrupt or partial file
is downloaded again. Every shard is verified after download.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ID = "willdepueoai/parameter-golf"
REMOTE_PREFIX = "matched_10B_docs2m_seed1337"
VARIANTS = {
    "sp1024": "fineweb10B_sp1024",
    "sp4096": "fineweb10B_sp4096",
    "sp8192": "fineweb10B_sp8192",
    "sp8192_caseops": "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
}
HEADER_BYTES, MAGIC = 1024, 20240520


class DownloadError(RuntimeError):
    pass


def shard_ok(path: Path) -> bool:
    """A shard is complete when its header is valid and the file holds exactly the tokens it declares."""
    if not path.is_file() or path.stat().st_size < HEADER_BYTES:
        return False
    with open(path, "rb") as fh:
        head = fh.read(12)
    magic, version, n = (int.from_bytes(head[i:i + 4], "little", signed=True) for i in (0, 4, 8))
    return magic == MAGIC and version == 1 and path.stat().st_size == HEADER_BYTES + 2 * n


class Hub:
    """The real download path: huggingface_hub into a cache under data/, then a link or copy."""

    def __init__(self, repo_id: str, prefix: str, endpoint: str | None, cache: Path):
        self.repo_id, self.prefix, self.endpoint, self.cache = repo_id, prefix, endpoint, cache

    def fetch(self, remote: str, dest: Path) -> None:
        from huggingface_hub import hf_hub_download

        full = f"{self.prefix}/{remote}" if self.prefix else remote
        sub, name = os.path.split(full)
        try:
            cached = Path(hf_hub_download(repo_id=self.repo_id, filename=name, subfolder=sub or None,
                                          repo_type="dataset", endpoint=self.endpoint, cache_dir=self.cache))
        except Exception as e:  # noqa: BLE001 - network/hub errors all mean the same thing to the user
            raise DownloadError(f"could not download {full} from {self.repo_id}: {e}") from e
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        tmp.unlink(missing_ok=True)
        try:
            os.link(cached.resolve(), tmp)
        except OSError:
            shutil.copyfile(cached.resolve(), tmp)
        os.replace(tmp, dest)


def plan(manifest: dict, dataset: str, train_shards: int) -> tuple[list[tuple[str, str]], dict]:
    """(remote path, local path relative to data/) for every file of the variant, and its dataset entry."""
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset), None)
    if entry is None:
        names = [d.get("name") for d in manifest.get("datasets", [])]
        raise DownloadError(f"{dataset} is not in the remote manifest (it has {names})")
    stats = entry.get("stats", {})
    n_train, n_val = int(stats["files_train"]), int(stats["files_val"])
    if train_shards > n_train:
        raise DownloadError(f"{dataset} has {n_train} train shards; asked for {train_shards}")
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tok is None:
        raise DownloadError(f"tokenizer {entry.get('tokenizer_name')} of {dataset} is not in the manifest")
    files = [(f"datasets/{dataset}/fineweb_val_{i:06d}.bin",) * 2 for i in range(n_val)]
    if entry.get("val_bytes_files"):
        files += [(f"datasets/{dataset}/fineweb_val_bytes_{i:06d}.bin",) * 2 for i in range(int(entry["val_bytes_files"]))]
    files += [(f"datasets/{dataset}/fineweb_train_{i:06d}.bin",) * 2 for i in range(train_shards)]
    for key in ("model_path", "vocab_path"):
        if tok.get(key):
            files.append((tok[key], f"tokenizers/{Path(tok[key]).name}"))
    return files, entry


def download(variant: str, train_shards: int, data_dir: Path, source: Hub, log=print) -> list[Path]:
    dataset = VARIANTS.get(variant, variant)
    manifest_path = data_dir / "manifest.json"
    source.fetch("manifest.json", manifest_path)
    files, _ = plan(json.loads(manifest_path.read_text()), dataset, train_shards)
    done = []
    for i, (remote, local) in enumerate(files, 1):
        dest = data_dir / local
        is_shard = dest.suffix == ".bin"
        if dest.exists() and (not is_shard or shard_ok(dest)):
            log(f"[{i}/{len(files)}] ok (present) {local}")
        else:
            if dest.exists():
                log(f"[{i}/{len(files)}] {local} is incomplete or corrupt; downloading again")
                dest.unlink()
            source.fetch(remote, dest)
            if is_shard and not shard_ok(dest):
                dest.unlink()
                raise DownloadError(f"{remote} failed verification after download (header/size mismatch)")
            log(f"[{i}/{len(files)}] downloaded {local} ({dest.stat().st_size} bytes)")
        done.append(dest)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="sp1024", help=f"one of {sorted(VARIANTS)} or a dataset name")
    ap.add_argument("--train-shards", type=int, default=80)
    ap.add_argument("--data-dir", type=Path, default=HERE)
    ap.add_argument("--repo-id", default=REPO_ID)
    ap.add_argument("--remote-prefix", default=REMOTE_PREFIX, help="folder of the export inside the repo")
    ap.add_argument("--endpoint", default=None, help="Hub endpoint (default: huggingface.co or HF_ENDPOINT)")
    a = ap.parse_args(argv)
    if a.train_shards < 0:
        ap.error("--train-shards must be >= 0")
    hub = Hub(a.repo_id, a.remote_prefix, a.endpoint, a.data_dir / ".hf_cache")
    try:
        files = download(a.variant, a.train_shards, a.data_dir, hub)
    except DownloadError as e:
        print(f"download failed: {e}\nre-run the same command to resume", file=sys.stderr)
        return 1
    print(f"{len(files)} files ready under {a.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
