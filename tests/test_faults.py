"""Faults cost nothing paid for (issue 17): a diverging run stops at once, an interrupted or broken run leaves a
checkpoint that SKIP_TRAIN re-packs, a hung rank is named within the collective timeout, and checkpoints are
written atomically."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_gpt as tg
from conftest import ROOT, clean_env, run_trainer, tiny_env


def test_a_diverging_run_stops_within_a_few_steps_and_says_what_to_lower(plain_data, tmp_path):
    env = tiny_env(plain_data, ITERATIONS=300, MATRIX_LR=1000, EMBED_LR=1000, SCALAR_LR=1000, GRAD_CLIP_NORM=0)
    r = run_trainer(env, tmp_path)
    assert r.returncode != 0
    msg = [l for l in (r.stdout + r.stderr).splitlines() if "diverged at step" in l][0]
    step = int(msg.split("diverged at step ")[1].split(":")[0])
    assert step <= 10 and "MATRIX_LR" in msg and ("nan" in msg or "inf" in msg), msg
    assert "final_int6" not in r.stdout and not (tmp_path / "final_model.int6.ptz").exists()


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A full disk (or a kill) while saving leaves the previous checkpoint whole, never a truncated one."""
    cfg, _ = tg.load_config({})
    path = tmp_path / "final_model.pt"
    tg.save_checkpoint(path, cfg, {"w": torch.ones(3)}, lambda s: None)
    before = path.read_bytes()

    def full_disk(obj, fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="free disk space"):
        tg.save_checkpoint(path, cfg, {"w": torch.zeros(3)}, lambda s: None)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def _wait_for(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    seen, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} not seen: " + "".join(seen[-20:]))


def test_sigterm_saves_the_averaged_weights_and_skip_train_repacks_them(plain_data, tmp_path):
    env = clean_env() | {"OUTPUT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"} | tiny_env(
        plain_data, ITERATIONS=100_000, TRAIN_LOG_EVERY=1)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(proc, "step:12/")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert "SKIP_TRAIN=1" in out and "saved:" in out
    state = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert state["config"]["seed"] == 1337 and state["state_dict"]
    repack = tmp_path / "repack"
    repack.mkdir()
    r = run_trainer(tiny_env(plain_data, SKIP_TRAIN=1, INIT_MODEL_PATH=tmp_path / "final_model.pt",
                             TTT_ENABLED=0, SLIDING_EVAL=0), repack)
    assert r.returncode == 0 and "final_int6_roundtrip_exact" in r.stdout, r.stderr[-2000:]


def _fault_run(plain_data, tmp_path, timeout_s: int, hang_step: int):
    env = clean_env() | {"OUTPUT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "FAULT_HANG_RANK": "1",
                         "FAULT_HANG_STEP": str(hang_step)} | tiny_env(
        plain_data, ITERATIONS=100_000, TRAIN_LOG_EVERY=1, DIST_TIMEOUT_SECONDS=timeout_s)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_fault_worker.py")]
    return subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_a_hung_rank_is_named_within_the_timeout_and_the_run_is_saved(plain_data, tmp_path):
    proc = _fault_run(plain_data, tmp_path, timeout_s=5, hang_step=14)
    try:
        out = proc.communicate(timeout=240)[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert "rank 1 stopped answering (1 collective(s) behind, last reported step 10)" in out, out[-3000:]
    assert "SKIP_TRAIN=1" in out and (tmp_path / "final_model.pt").is_file()


def test_sigterm_while_blocked_on_a_lost_rank_saves_the_last_snapshot(plain_data, tmp_path):
    """torchrun stops the group when a rank dies; the others may be blocked in a collective and never reach the
    next step: the rescue thread writes rank 0's last host snapshot of the averaged weights."""
    proc = _fault_run(plain_data, tmp_path, timeout_s=600, hang_step=14)
    try:
        _wait_for(proc, "FAULT: rank 1 hangs")
        time.sleep(2)  # rank 0 is now blocked in the step's all-reduce
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert "while blocked" in out and "of step 10 are in" in out, out[-3000:]
    assert torch.load(tmp_path / "final_model.pt", weights_only=True)["state_dict"]
