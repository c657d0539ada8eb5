"""data/cached_challenge_fineweb.py through the real huggingface_hub client against a fake Hub on loopback."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import train_gpt as tg
from conftest import ROOT

spec = importlib.util.spec_from_file_location("dl", ROOT / "data" / "cached_challenge_fineweb.py")
dl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dl)

REPO = "someone/parameter-golf"
PREFIX = "export_v1"


@pytest.fixture()
def fake_hub(tmp_path):
    root = tmp_path / "remote"
    ds = root / PREFIX / "datasets" / "fineweb10B_sp1024"
    ds.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tg.write_shard(ds / "fineweb_val_000000.bin", rng.integers(0, 1024, 5000))
    for i in range(3):
        tg.write_shard(ds / f"fineweb_train_{i:06d}.bin", rng.integers(0, 1024, 7000 + i))
    (root / PREFIX / "tokenizers").mkdir()
    (root / PREFIX / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model-bytes")
    (root / PREFIX / "tokenizers" / "fineweb_1024_bpe.vocab").write_bytes(b"vocab-bytes")
    (root / PREFIX / "manifest.json").write_text(json.dumps({
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                      "stats": {"files_train": 3, "files_val": 1}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]}))
    gets = Counter()

    class Handler(BaseHTTPRequestHandler):
        def _file(self):
            pre = f"/datasets/{REPO}/resolve/main/"
            if not self.path.startswith(pre):
                return None
            p = root / self.path[len(pre):].split("?")[0]
            return p if p.is_file() else None

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
    yield {"endpoint": f"http://127.0.0.1:{srv.server_address[1]}", "root": root, "gets": gets, "ds": ds}
    srv.shutdown()


def _run(fake_hub, data_dir, shards=2):
    return dl.main(["--variant", "sp1024", "--train-shards", str(shards), "--data-dir", str(data_dir),
                    "--repo-id", REPO, "--remote-prefix", PREFIX, "--endpoint", fake_hub["endpoint"]])


def test_download_resume_and_verify(fake_hub, tmp_path):
    data = tmp_path / "data"
    assert _run(fake_hub, data) == 0
    ds = data / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                    "fineweb_val_000000.bin"]
    assert (data / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"model-bytes"
    for p in ds.iterdir():
        assert p.read_bytes() == (fake_hub["ds"] / p.name).read_bytes()
    assert fake_hub["gets"]["fineweb_train_000000.bin"] == 1
    # a truncated local shard is noticed and fetched again; complete files are not
    bad = ds / "fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-100])
    (data / ".hf_cache").rename(tmp_path / "old_cache")  # force a real transfer for the re-download
    assert _run(fake_hub, data) == 0
    assert dl.shard_ok(bad)
    assert fake_hub["gets"]["fineweb_train_000001.bin"] == 2
    assert fake_hub["gets"]["fineweb_train_000000.bin"] == 1


def test_too_many_shards_and_unknown_variant(fake_hub, tmp_path, capsys):
    assert _run(fake_hub, tmp_path / "d", shards=5) == 1
    assert "has 3 train shards" in capsys.readouterr().err
    assert dl.main(["--variant", "sp8192", "--data-dir", str(tmp_path / "e"), "--repo-id", REPO,
                    "--remote-prefix", PREFIX, "--endpoint", fake_hub["endpoint"]]) == 1
    assert "not in the remote manifest" in capsys.readouterr().err


def test_corrupt_remote_shard_is_rejected(fake_hub, tmp_path, capsys):
    p = fake_hub["ds"] / "fineweb_train_000000.bin"
    p.write_bytes(p.read_bytes()[:-2])
    assert _run(fake_hub, tmp_path / "d", shards=1) == 1
    assert "failed verification" in capsys.readouterr().err
    assert not (tmp_path / "d" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").exists()
