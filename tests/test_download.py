"""data/cached_challenge_fineweb.py through the real huggingface_hub client against a fake Hub on loopback."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import train_gpt as tg
from conftest import ROOT

spec = importlib.util.spec_from_file_location("dl", ROOT / "data" / "cached_challenge_fineweb.py")
dl = importlib.util.module_from_spec(spec)
sys.modules["dl"] = dl  # dataclasses look their module up while the file executes
spec.loader.exec_module(dl)

CASEOPS_DS = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
CASEOPS_TOK = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved"


def _publish(repo_root, dataset, tok, n_train, sidecar, rng):
    """One repository laid out as the exporters publish it: <root>/datasets/datasets/<name>/..., tokenizers, manifest."""
    root = repo_root / "datasets"
    ds = root / "datasets" / dataset
    ds.mkdir(parents=True)
    val = rng.integers(0, 1024, 5000)
    tg.write_shard(ds / "fineweb_val_000000.bin", val)
    if sidecar:
        tg.write_shard(ds / "fineweb_val_bytes_000000.bin", rng.integers(0, 6, val.size))
    for i in range(n_train):
        tg.write_shard(ds / f"fineweb_train_{i:06d}.bin", rng.integers(0, 1024, 7000 + i))
    (root / "docs_selected.jsonl").write_text('{"text": "a document"}\n')
    (root / "docs_selected.source_manifest.json").write_text("{}")
    (root / "tokenizers").mkdir()
    (root / "tokenizers" / f"{tok}.model").write_bytes(b"model-bytes-" + tok.encode())
    entry = {"name": dataset, "tokenizer_name": tok, "stats": {"files_train": n_train, "files_val": 1}}
    if sidecar:
        entry["val_bytes_glob"] = f"datasets/{dataset}/fineweb_val_bytes_*.bin"
    (root / "manifest.json").write_text(json.dumps({
        "datasets": [entry], "tokenizers": [{"name": tok, "model_path": f"tokenizers/{tok}.model"}]}))
    return ds


@pytest.fixture()
def fake_hub(tmp_path):
    rng = np.random.default_rng(0)
    repos = {"willdepueoai/parameter-golf": tmp_path / "official", "romeerp/parameter-golf-caseops-v1": tmp_path / "caseops"}
    ds = {"sp1024": _publish(repos["willdepueoai/parameter-golf"], "fineweb10B_sp1024", "fineweb_1024_bpe", 3, False, rng),
          "caseops": _publish(repos["romeerp/parameter-golf-caseops-v1"], CASEOPS_DS, CASEOPS_TOK, 3, True, rng)}
    gets = Counter()

    class Handler(BaseHTTPRequestHandler):
        def _file(self):
            for repo, root in repos.items():
                pre = f"/datasets/{repo}/resolve/main/"
                if self.path.startswith(pre):
                    p = root / self.path[len(pre):].split("?")[0]
                    return p if p.is_file() else None
            return None

        def _respond(self, with_body: bool):
            p = self._file()
            if p is None:
                self.send_response(404)
                self.end_headers()
                return
            body = p.read_bytes()
            self.send_response(200)
            self.send_header("X-Repo-Commit", "a" * 40)
            self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                gets[p.name] += 1
                self.wfile.write(body)

        def do_HEAD(self):  # noqa: N802
            self._respond(with_body=False)

        def do_GET(self):  # noqa: N802
            self._respond(with_body=True)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield {"endpoint": f"http://127.0.0.1:{srv.server_address[1]}", "gets": gets, "ds": ds}
    srv.shutdown()


def _run(fake_hub, data_dir, variant="sp1024", shards=2):
    return dl.main(["--variant", variant, "--train-shards", str(shards), "--data-dir", str(data_dir),
                    "--endpoint", fake_hub["endpoint"]])


def test_download_resume_and_verify(fake_hub, tmp_path):
    data = tmp_path / "data"
    assert _run(fake_hub, data) == 0
    ds = data / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                    "fineweb_val_000000.bin"]
    assert (data / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"model-bytes-fineweb_1024_bpe"
    for p in ds.iterdir():
        assert p.read_bytes() == (fake_hub["ds"]["sp1024"] / p.name).read_bytes()
    assert fake_hub["gets"]["fineweb_train_000000.bin"] == 1
    # a truncated local shard is noticed and fetched again; complete files are not
    bad = ds / "fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-100])
    assert _run(fake_hub, data) == 0
    assert dl.shard_ok(bad)
    assert fake_hub["gets"]["fineweb_train_000001.bin"] == 2
    assert fake_hub["gets"]["fineweb_train_000000.bin"] == 1


def test_caseops_variant_in_one_command(fake_hub, tmp_path):
    """The published CaseOps data comes from its own repository, with the val byte sidecar and tokenizer."""
    data = tmp_path / "data"
    assert _run(fake_hub, data, "sp8192_caseops", shards=3) == 0
    ds = data / "datasets" / CASEOPS_DS
    assert sorted(p.name for p in ds.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin",
        "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]
    for p in ds.iterdir():
        assert p.read_bytes() == (fake_hub["ds"]["caseops"] / p.name).read_bytes()
    assert (data / "tokenizers" / f"{CASEOPS_TOK}.model").is_file()
    # the layout is the one train_gpt.py reads for CASEOPS_ENABLED=1 VOCAB_SIZE=8192
    cfg, _ = tg.load_config({"DATA_DIR": str(data), "CASEOPS_ENABLED": "1", "VOCAB_SIZE": "8192"})
    assert cfg.data_path == str(ds) and cfg.tokenizer_path == str(data / "tokenizers" / f"{CASEOPS_TOK}.model")
    # a damaged sidecar is fetched again on the next run
    side = ds / "fineweb_val_bytes_000000.bin"
    side.write_bytes(side.read_bytes()[:-2])
    assert _run(fake_hub, data, "sp8192_caseops", shards=3) == 0
    assert fake_hub["gets"]["fineweb_val_bytes_000000.bin"] == 2 and dl.shard_ok(side)


def test_remote_sidecar_that_does_not_match_val_is_rejected(fake_hub, tmp_path, capsys):
    side = fake_hub["ds"]["caseops"] / "fineweb_val_bytes_000000.bin"
    tg.write_shard(side, np.zeros(4999, dtype=np.uint16))
    assert _run(fake_hub, tmp_path / "d", "sp8192_caseops", shards=1) == 1
    assert "4999 sidecar entries for 5000 val tokens" in capsys.readouterr().err
    assert not (tmp_path / "d" / "datasets" / CASEOPS_DS / "fineweb_val_bytes_000000.bin").exists()


def test_docs_for_the_prep(fake_hub, tmp_path):
    assert dl.main(["--docs-only", "--data-dir", str(tmp_path), "--endpoint", fake_hub["endpoint"]]) == 0
    assert (tmp_path / "docs_selected.jsonl").read_text() == '{"text": "a document"}\n'


def test_too_many_shards_and_unknown_dataset(fake_hub, tmp_path, capsys):
    assert _run(fake_hub, tmp_path / "d", shards=5) == 1
    assert "has 3 train shards" in capsys.readouterr().err
    assert _run(fake_hub, tmp_path / "e", "sp8192") == 1
    assert "not in the remote manifest" in capsys.readouterr().err


def test_corrupt_remote_shard_is_rejected(fake_hub, tmp_path, capsys):
    p = fake_hub["ds"]["sp1024"] / "fineweb_train_000000.bin"
    p.write_bytes(p.read_bytes()[:-2])
    assert _run(fake_hub, tmp_path / "d", shards=1) == 1
    assert "failed verification" in capsys.readouterr().err
    assert not (tmp_path / "d" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").exists()


def test_damage_in_place_is_found_by_hash_and_fixed_by_re_running(fake_hub, tmp_path):
    """A flipped byte keeps a shard's header and size; the Hub's sha256 finds it. Files are not hard-linked into a
    cache (damage in place used to damage the cache too, and "re-run the same command" then failed forever)."""
    data = tmp_path / "data"
    assert _run(fake_hub, data) == 0
    shard = data / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin"
    assert shard.stat().st_nlink == 1  # its own copy
    raw = bytearray(shard.read_bytes())
    raw[5000] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert dl.shard_ok(shard)  # structurally fine: only the hash can tell
    assert _run(fake_hub, data) == 0
    assert shard.read_bytes() == (fake_hub["ds"]["sp1024"] / shard.name).read_bytes()
    assert fake_hub["gets"]["fineweb_train_000000.bin"] == 2
    assert _run(fake_hub, data) == 0 and fake_hub["gets"]["fineweb_train_000000.bin"] == 2  # verified: not fetched


def test_a_transfer_that_does_not_match_the_hubs_hash_is_refused(fake_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dl.Hub, "expected_hash", lambda self, remote: "0" * 64)
    assert _run(fake_hub, tmp_path / "d", shards=1) == 1
    err = capsys.readouterr().err
    assert "does not match the Hub's hash" in err and "re-run the same command" in err
