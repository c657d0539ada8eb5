"""Faults cost nothing paid for (issue 17): a diverging run stops at once, an interrupted or broken run leaves a
checkpoint that SKIP_TRAIN re-packs, a hung rank is named within the collective timeout, and checkpoints are
written atomically."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from conftest import ROOT, TINY, clean_env, run_trainer, tiny_env


def test_a_diverging_run_stops_within_a_few_steps_and_says_what_to_lower(plain_data, tmp_path):
    env = tiny_env(plain_data, ITERATIONS=300, MATRIX_LR=1000, EMBED_LR=1000, SCALAR_LR=1000, GRAD_CLIP_NORM=0)
    r = run_trainer(env, tmp_path)
    assert r.returncode != 0
    msg = [l for l in (r.stdout + r.stderr).splitlines() if "diverged at step" in l][0]
    step = int(msg.split("diverged at step ")[1].split(":")[0])
    assert step <= 10 and "MATRIX_LR" in msg and ("nan" in msg or "inf" in msg), msg
    assert "final_int6" not in r.stdout and not (tmp_path / "final_model.int6.ptz").exists()


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A full disk (or a kill) while saving leaves the previous checkpoint whole, never a truncated one, and no
    temporary file. A full disk inside torch.save surfaced as a RuntimeError that nothing caught: the checkpoint is
    now serialised in memory and written by write_atomic, whose only failure is an OSError with the fix."""
    cfg, _ = tg.load_config({})
    path = tmp_path / "final_model.pt"
    tg.save_checkpoint(path, cfg, {"w": torch.ones(3)}, lambda s: None)
    before = path.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # where a delayed allocation on a full disk fails
    with pytest.raises(OSError, match="No space left on device.*nothing was replaced: free disk space"):
        tg.save_checkpoint(path, cfg, {"w": torch.zeros(3)}, lambda s: None)
    assert path.read_bytes() == before and not [p for p in tmp_path.iterdir() if p.name != path.name]


def _wait_for(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    """The output lines up to the first with `needle`; fails after `timeout` seconds even when the process prints
    nothing. It reads the pipe's descriptor a byte at a time, never through Python's buffers: select cannot see lines
    already buffered (a needle seen seconds late), and a later communicate() gets exactly the rest."""
    fd, seen, line, deadline = proc.stdout.fileno(), [], b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, min(1.0, deadline - time.monotonic())))
        if not ready:
            continue
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
        if byte == b"\n":
            seen.append(line.decode(errors="replace"))
            line = b""
            if needle in seen[-1]:
                return seen
    raise AssertionError(f"{needle!r} not seen: " + "".join(seen[-20:]) + line.decode(errors="replace"))


def _processes_of(run_dir: Path) -> list[int]:
    """The live processes whose environment names this run's folder: torchrun starts its workers in sessions of
    their own, so the process group of run.sh does not hold them."""
    needle, found = f"OUTPUT_DIR={run_dir}\0".encode(), []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (d / "environ").read_bytes() + b"\0" and (d / "stat").read_text().split()[2] != "Z":
                    found.append(int(d.name))
    return found


def _stop_group(proc: subprocess.Popen) -> None:
    """However a test ends, nothing it started outlives it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


QUICK = {"TTT_ENABLED": "0", "SLIDING_EVAL": "0", "NGRAM_TILT": "0"}  # a run that is stopped in training


@pytest.mark.slow
def test_sigterm_saves_the_averaged_weights_and_skip_train_repacks_them(plain_data, tmp_path):
    """SIGTERM saves the averaged weights; a new training run into that folder is refused (it would overwrite them),
    and SKIP_TRAIN re-packs them beside them, under a RUN_ID of its own, leaving the interrupted run's log as it was."""
    env = clean_env() | {"OUTPUT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"} | tiny_env(
        plain_data, ITERATIONS=100_000, TRAIN_LOG_EVERY=1, **QUICK)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(proc, "step:12/")
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        _stop_group(proc)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert "SKIP_TRAIN=1" in out and "the averaged weights of step 1" in out
    cfg, state = tg.load_checkpoint(tmp_path / "final_model.pt")  # whole: its digest matches
    assert cfg.seed == 1337 and state
    log = (tmp_path / "logs" / "seed1337.txt").read_text()
    r = run_trainer(tiny_env(plain_data), tmp_path)
    assert r.returncode != 0 and "to re-pack that run's checkpoint, set SKIP_TRAIN=1" in r.stderr
    r = run_trainer(tiny_env(plain_data, SKIP_TRAIN=1, TTT_ENABLED=0, SLIDING_EVAL=0), tmp_path)
    assert r.returncode == 0 and "final_int6_roundtrip_exact" in r.stdout, r.stderr[-2000:]
    assert (tmp_path / "logs" / "seed1337.txt").read_text() == log and (tmp_path / "final_model.int6.ptz").is_file()
    assert (tmp_path / "logs" / "seed1337_repack.summary.json").is_file()


def _fault_run(plain_data, tmp_path, timeout_s: int, step: int, mode: str = "hang", rank: int = 1, nproc: int = 2,
               **over):
    env = clean_env() | {"OUTPUT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "FAULT_RANK": str(rank),
                         "FAULT_STEP": str(step), "FAULT_MODE": mode} | tiny_env(
        plain_data, **{"ITERATIONS": 100_000, "TRAIN_LOG_EVERY": 1, "DIST_TIMEOUT_SECONDS": timeout_s} | QUICK | over)
    worker = str(ROOT / "tests" / "dist_fault_worker.py")
    cmd = [sys.executable, worker] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", worker]
    return subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_a_hung_rank_is_named_within_the_timeout_and_the_run_is_saved(plain_data, tmp_path):
    proc = _fault_run(plain_data, tmp_path, timeout_s=5, step=14)
    try:
        out = proc.communicate(timeout=240)[0]
    finally:
        _stop_group(proc)
    assert "rank 1 stopped answering (1 collective(s) behind, last reported step 10)" in out, out[-3000:]
    assert "SKIP_TRAIN=1" in out and (tmp_path / "final_model.pt").is_file()


@pytest.mark.slow
def test_sigterm_while_blocked_on_a_lost_rank_saves_the_last_snapshot(plain_data, tmp_path):
    """torchrun stops the group when a rank dies; the others may be blocked in a collective and never reach the
    next step: the rescue thread writes rank 0's last host snapshot of the averaged weights."""
    proc = _fault_run(plain_data, tmp_path, timeout_s=600, step=14)
    try:
        _wait_for(proc, "FAULT: rank 1 hangs")
        time.sleep(2)  # rank 0 is now blocked in the step's all-reduce
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        _stop_group(proc)
    assert "while blocked" in out and "of step 10 are in" in out, out[-3000:]
    assert tg.load_checkpoint(tmp_path / "final_model.pt")[1]


@pytest.mark.slow
def test_losing_rank_0_loses_nothing(plain_data, tmp_path):
    """Every rank holds the same averaged weights, but only rank 0 saved: when rank 0 died, nothing was saved. Now
    the first surviving rank to claim the save in the launcher's store writes its own copy (here rank 1, with the
    weights of the step it stopped at, or its last snapshot when it was blocked)."""
    proc = _fault_run(plain_data, tmp_path, timeout_s=600, step=14, mode="kill", rank=0)
    try:
        out = proc.communicate(timeout=240)[0]
    finally:
        _stop_group(proc)
    assert "FAULT: rank 0 kills" in out and "saved by rank 1" in out, out[-3000:]
    cfg, state = tg.load_checkpoint(tmp_path / "final_model.pt")
    assert cfg.seed == 1337 and state


@pytest.mark.slow
def test_a_worker_whose_launcher_is_killed_stops_and_saves(plain_data, tmp_path):
    """torchrun killed by SIGKILL (the OOM killer, a scheduler's last resort), or stopped in the moment it spawns its
    workers (before it knows them, so it cannot pass the stop on), left its workers training alone: holding their
    GPUs and the log's pipe, so run.sh's `tee` never ended. A worker now notices its launcher is gone and stops as
    if torchrun had sent SIGTERM: it saves the averaged weights and exits."""
    env = clean_env() | {"OUTPUT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"} | tiny_env(
        plain_data, ITERATIONS=100_000, TRAIN_LOG_EVERY=1, **QUICK)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                             str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(proc, "step:12/")
        proc.kill()  # torchrun alone; its worker lives on in the group
        proc.wait(timeout=30)
        out = "".join(_wait_for(proc, "SKIP_TRAIN=1", timeout=90))  # the worker's lines, on the pipe it shares
    finally:
        _stop_group(proc)
    assert "the launcher (pid" in out and "is gone: stopping as if it sent SIGTERM" in out, out[-3000:]
    assert "SKIP_TRAIN=1" in out and "the averaged weights of step" in out
    assert tg.load_checkpoint(tmp_path / "final_model.pt")[1]


def test_a_failure_inside_the_training_loop_leaves_a_checkpoint(plain_data, tmp_path):
    """Only RuntimeError and DistError on several ranks stopped the loop with a save: any other failure (a logging
    pipe closing, a bug) lost the training. Now any exception inside the loop saves the averaged weights, built on
    the host once the failure's frames are let go (an out-of-memory step leaves no room on the device), and says how
    to re-pack them, with the traceback; the run exits 1."""
    proc = _fault_run(plain_data, tmp_path, timeout_s=600, step=14, mode="raise-keyerror", rank=0, nproc=1)
    try:
        out = proc.communicate(timeout=240)[0]
    finally:
        _stop_group(proc)
    assert proc.returncode == 1, out[-3000:]
    assert "training failed at step 13: KeyError: 'a fault injected into the training step'" in out, out[-3000:]
    assert "SKIP_TRAIN=1" in out and "Traceback" in out and "the averaged weights of step 13 are in" in out
    assert tg.load_checkpoint(tmp_path / "final_model.pt")[1]


@pytest.mark.parametrize("stage", ["save", "calibrate"])
def test_a_signal_after_the_training_loop_keeps_the_weights_and_says_so(plain_data, tmp_path, stage):
    """The rescue's handlers were taken away when the loop returned, before the final checkpoint was written: a
    signal in those seconds (a wall-clock timeout is likely then) killed the process with no checkpoint, and a signal
    while the final weights were loaded was swallowed (the run went on). Now a signal from the loop's end on waits
    for the checkpoint, then stops the run, in calibration, packing or evaluation too, with a line saying what it
    left, and exit 128 + the signal."""
    proc = _fault_run(plain_data, tmp_path, timeout_s=600, step=0, mode=f"slow-{stage}", rank=0, nproc=1,
                      ITERATIONS=6)
    try:
        _wait_for(proc, "waits")
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        _stop_group(proc)
    assert proc.returncode == 143, out[-3000:]
    assert "ERROR: stopped by signal 15 after training: the trained weights are in" in out, out[-3000:]
    assert "SKIP_TRAIN=1" in out and "final_int6_roundtrip_exact" not in out
    assert tg.load_checkpoint(tmp_path / "final_model.pt")[1] and not list(tmp_path.glob(".*.tmp"))


def test_a_stop_before_the_first_step_saves_nothing(plain_data, tmp_path):
    """A stop in the warm-up saved the untrained weights as a checkpoint, which then blocked the folder for a new
    run (and invited a re-pack of random weights). Step 0 has nothing to save, nor a snapshot of it."""
    cfg, _ = tg.load_config(TINY | {"DATA_PATH": str(plain_data["data_path"]), "TOKENIZER_PATH": str(
        plain_data["tokenizer"]), "OUTPUT_DIR": str(tmp_path)})
    rt = tg.Runtime.cpu()
    stop = tg.Rescue(tmp_path / "final_model.pt", cfg, rt)
    stop.signal = 15  # came during the warm-up: the loop stops before its first update
    val = tg.load_validation(cfg, tg.load_sentencepiece(cfg.tokenizer_path))
    with pytest.raises(tg.Interrupted) as e:
        tg.train(tg.GPT(cfg), tg.GPT(cfg), cfg, rt, tg.TrainData(tg.shard_paths(cfg.data_path, "train"), cfg, rt, 1),
                 val, lambda m: None, stop=stop)
    assert e.value.steps == 0 and e.value.state is None and e.value.code == 143
    stop.snapshot({"w": torch.ones(2)}, 0)
    assert stop.latest() is None  # no snapshot of step 0 either
    notes = []
    stop.note = notes.append
    stop.save_snapshot("interrupted by signal 15 while blocked")
    assert notes == ["interrupted by signal 15 while blocked; no host snapshot was taken yet, so nothing was saved"]
    assert not (tmp_path / "final_model.pt").exists()


def test_a_write_stopped_half_way_leaves_no_temporary_file(tmp_path):
    class Stopped(list):
        def __iter__(self):
            yield b"half"
            raise KeyboardInterrupt  # a signal's exception in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        tg.write_atomic(tmp_path / "f.bin", Stopped())
    assert not list(tmp_path.iterdir())


def test_the_weights_a_failure_saves_are_built_on_the_host():
    """What a failed step saves equals the averaged weights of a normal stop, in the model's dtypes, without a
    tensor allocated on the device (host and device told apart: tests/host_device.py)."""
    from host_device import DEVICE, HostDevice, place

    cfg, _ = tg.load_config(TINY)
    with HostDevice():
        torch.manual_seed(0)
        model = tg.GPT(cfg).to(DEVICE)
        averager = tg.WeightAverager(model, cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        averager.update(model, 1, 1.0, lambda s: None)
        on_device, on_host = averager.final(model), averager.final(model, host=True)
        assert {place(t) for t in on_host.values()} == {"host"}
        for k, t in on_device.items():
            assert t.dtype == on_host[k].dtype and torch.equal(t.cpu(), on_host[k]), k


# ---- issue 25: stopping run.sh, its log pipe, and a full disk ----

def _run_sh(plain_data, tmp_path, **over) -> subprocess.Popen:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = clean_env() | tiny_env(plain_data, ITERATIONS=100_000, TRAIN_LOG_EVERY=1, **QUICK) | {
        "RECORD_DIR": str(tmp_path / "rec"), "RUN_DIR": str(tmp_path / "run"), "DEVICE": "cpu", "NPROC": "1",
        "MIN_FREE_GB": "0", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "TMPDIR": str(tmp_path / "tmp")} | {
        k: str(v) for k, v in over.items()}
    return subprocess.Popen(["bash", str(ROOT / "run.sh")], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _stopped_run_left(tmp_path, proc, out: str, code: int) -> str:
    """What a stopped run must leave: its checkpoint, an honest (.partial) log, the signal's exit status."""
    assert proc.returncode == code, out[-3000:]
    assert tg.load_checkpoint(tmp_path / "run" / "final_model.pt")[1]
    assert not (tmp_path / "rec" / "train_seed1337.log").exists()  # never promoted to a finished log
    assert "stopped or failed" in out
    return (tmp_path / "rec" / "train_seed1337.log.partial").read_text()


@pytest.mark.slow
def test_ctrl_c_through_run_sh_saves_the_training_and_keeps_an_honest_log(plain_data, tmp_path):
    """Ctrl-C reaches run.sh's whole process group, `tee` included: tee died first, the trainer's next print raised
    BrokenPipeError, the rescue never saved, torchrun exited 1 and run.sh promoted the .partial log to a finished one.
    Now tee ignores the signal and keeps logging, the trainer saves, and run.sh exits 130 with the log .partial."""
    proc = _run_sh(plain_data, tmp_path)
    try:
        _wait_for(proc, "step:12/")
        os.killpg(proc.pid, signal.SIGINT)
        out = proc.communicate(timeout=180)[0]
    finally:
        _stop_group(proc)
    log = _stopped_run_left(tmp_path, proc, out, 130)
    assert "stopping: signal received" in log and "the averaged weights of step" in log and "SKIP_TRAIN=1" in log
    assert log.splitlines()[-1].startswith("run: stopped or failed (exit 130)")  # how it ended, in the log too
    # the re-pack the log asks for, through run.sh with the same seed and folders: it was refused (the seed's log
    # exists); its files are named by the trainer's RUN_ID
    repack = _run_sh(plain_data, tmp_path, SKIP_TRAIN=1, INIT_MODEL_PATH=tmp_path / "run" / "final_model.pt",
                     ITERATIONS=6)
    try:
        out = repack.communicate(timeout=300)[0]
    finally:
        _stop_group(repack)
    assert repack.returncode == 0, out[-3000:]
    assert (tmp_path / "rec" / "train_seed1337_repack.log").is_file() and (tmp_path / "run" / "final_model.int6.ptz").is_file()
    assert (tmp_path / "rec" / "train_seed1337.log.partial").read_text() == log


@pytest.mark.slow
def test_ctrl_c_while_the_trainer_starts_stops_everything_at_once(plain_data, tmp_path):
    """A background command of a script starts with SIGINT ignored, and torchrun installs its handlers only once it
    starts workers: a Ctrl-C in the first seconds reached nothing that would act on it. run.sh passes INT on as
    TERM, which stops torchrun and its workers at any moment: the run exits 130, its log stays .partial and says so,
    and no process of the run is left."""
    proc = _run_sh(plain_data, tmp_path)
    try:
        _wait_for(proc, "run: ")
        os.killpg(proc.pid, signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
        left = _processes_of(tmp_path / "run")  # run.sh has waited for torchrun, torchrun for its workers
    finally:
        _stop_group(proc)
    assert proc.returncode == 130 and "stopped or failed (exit 130)" in out, out[-3000:]
    assert not left, left
    log = (tmp_path / "rec" / "train_seed1337.log.partial").read_text()
    assert log.splitlines()[-1].startswith("run: stopped or failed (exit 130)")  # never an empty log
    assert not (tmp_path / "rec" / "train_seed1337.log").exists()
    assert not list((tmp_path / "tmp").glob("run_sh.*"))  # the log's FIFO is unlinked as soon as it is open


@pytest.mark.slow
def test_a_scheduler_stopping_run_sh_alone_is_passed_on_even_without_a_log_pipe(plain_data, tmp_path):
    """SIGTERM to run.sh alone (docker stop, a scheduler that signals the job's first process) never reached the
    trainer while bash waited on its pipeline; and a trainer whose stdout reader is gone (tee killed) died at its next
    print. Now run.sh passes the signal on at once, and the trainer logs to its file when stdout is gone."""
    proc = _run_sh(plain_data, tmp_path)
    try:
        _wait_for(proc, "step:8/")
        tee = subprocess.run(["pgrep", "-g", str(proc.pid), "-x", "tee"], capture_output=True, text=True).stdout.split()
        assert len(tee) == 1
        os.kill(int(tee[0]), signal.SIGKILL)  # the log pipe is gone: every print from now on hits a broken pipe
        time.sleep(1)  # several steps' log lines hit the broken pipe
        os.kill(proc.pid, signal.SIGTERM)  # to run.sh alone
        out = proc.communicate(timeout=180)[0]
    finally:
        _stop_group(proc)
    _stopped_run_left(tmp_path, proc, out, 143)
    own = (tmp_path / "run" / "logs" / "seed1337.txt").read_text()  # the trainer's own log went on after the pipe
    assert "stopping: signal received" in own and "the averaged weights of step" in own


def _limited(limit: int):
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_full_disk_leaves_the_previous_files_and_names_what_to_free(trained_tiny, plain_data, tmp_path):
    """The artifact was written in place: a full disk left a truncated .ptz; a full disk inside torch.save was a
    traceback that lost the run. Here the disk takes no file larger than a limit (RLIMIT_FSIZE). A training run whose
    checkpoint does not fit says so and goes on to the artifact, which does (a submission needs no checkpoint); a
    re-pack whose artifact does not fit stops with one line naming the file and what to free, and leaves no temporary
    or truncated file."""
    artifact = (trained_tiny["out"] / "final_model.int6.ptz").stat().st_size
    assert (trained_tiny["out"] / "final_model.pt").stat().st_size > 2 * artifact
    train = tmp_path / "train"
    train.mkdir()
    full = clean_env() | {"OUTPUT_DIR": str(train), "OMP_NUM_THREADS": "1"} | tiny_env(plain_data, ITERATIONS=5, **QUICK)
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=full, cwd=train, capture_output=True,
                       text=True, timeout=300, preexec_fn=_limited(2 * artifact))
    assert r.returncode == 0 and "ERROR: could not write" in r.stdout and "going on to calibration" in r.stdout, \
        r.stdout[-2000:] + r.stderr[-2000:]
    assert "final_int6_roundtrip_exact" in r.stdout and (train / "final_model.int6.ptz").is_file()
    assert not (train / "final_model.pt").exists() and not list(train.glob(".*tmp"))
    repack = tmp_path / "repack"
    repack.mkdir()
    env = trained_tiny["env"] | {"SKIP_TRAIN": "1", "INIT_MODEL_PATH": str(trained_tiny["out"] / "final_model.pt"),
                                 "TTT_ENABLED": "0", "SLIDING_EVAL": "0"}
    full = clean_env() | {"OUTPUT_DIR": str(repack), "OMP_NUM_THREADS": "1"} | env
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=full, cwd=repack, capture_output=True,
                       text=True, timeout=300, preexec_fn=_limited(artifact - 4096))
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"error: could not write {repack / 'final_model.int6.ptz'} (File too large); nothing was replaced" in r.stderr
    assert "Traceback" not in r.stderr and sorted(p.name for p in repack.iterdir()) == ["logs"]


def test_a_run_never_overwrites_another_runs_files(trained_tiny, plain_data, tmp_path):
    """A new run into a finished OUTPUT_DIR replaced its checkpoint and artifact, whatever its seed, even if it was
    then interrupted at step 12; a re-pack over a good artifact destroyed it. Both are refused before any work (a
    re-pack of an interrupted run writes beside it: test_sigterm_saves_...)."""
    import shutil

    done = tmp_path / "done"
    shutil.copytree(trained_tiny["out"], done)
    before = {p: p.read_bytes() for p in done.rglob("*") if p.is_file()}
    for extra in ({"SEED": "7"}, {"SKIP_TRAIN": "1"}):
        r = run_trainer(trained_tiny["env"] | extra, done)
        assert r.returncode != 0 and "already holds another run's files (" in r.stderr, r.stderr[-2000:]
        assert "model_params:" not in r.stdout
    assert {p: p.read_bytes() for p in done.rglob("*") if p.is_file()} == before


def test_a_second_run_into_a_folder_a_run_is_writing_is_refused(plain_data, tmp_path):
    """Two runs launched into one OUTPUT_DIR before either had written a file both passed the check for existing
    files, then overwrote each other's checkpoint and artifact. A run holds a lock on its folder for its whole life
    (here the test holds it); a second one, and run.sh's preflight, are refused in seconds and write nothing."""
    import fcntl

    busy = tmp_path / "run"
    busy.mkdir()
    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        r = run_trainer(tiny_env(plain_data), busy)
        proc = _run_sh(plain_data, tmp_path)
        try:
            out = proc.communicate(timeout=120)[0]
        finally:
            _stop_group(proc)
    finally:
        os.close(fd)
    assert r.returncode != 0 and f"another run is writing into OUTPUT_DIR={busy} now" in r.stderr, r.stderr[-2000:]
    assert proc.returncode == 2 and "another run is writing into OUTPUT_DIR" in out, out[-2000:]
    assert not list(busy.iterdir())
    # the lock went with its holder: the same run now gets past it (to a data error, which costs no training)
    r = run_trainer(tiny_env(plain_data, DATA_PATH=tmp_path / "no_data"), busy)
    assert r.returncode != 0 and "preflight error" in r.stderr and "another run" not in r.stderr, r.stderr[-2000:]


def test_two_run_sh_of_one_seed_started_together_never_touch_each_others_files(plain_data, tmp_path):
    """Both passed the check for an existing log, and the second truncated the first one's log and env file. The
    files are now created only if absent (noclobber's O_EXCL): here the other run creates its env file in the moment
    between this run's check and its write, and this run stops without writing anything."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/bash\nif [ "$1" = check_data.py ]; then mkdir -p "$RECORD_DIR"; '
                       f'echo other > "$RECORD_DIR/train_seed1337.env.partial"; fi\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    proc = _run_sh(plain_data, tmp_path, PYTHON=wrapper)
    try:
        out = proc.communicate(timeout=120)[0]
    finally:
        _stop_group(proc)
    assert proc.returncode == 2 and "another run.sh of seed1337 started at the same time" in out, out[-2000:]
    assert [p.name for p in (tmp_path / "rec").iterdir()] == ["train_seed1337.env.partial"]
    assert (tmp_path / "rec" / "train_seed1337.env.partial").read_text() == "other\n"


def test_a_checkpoint_is_verified_before_it_is_trusted(trained_tiny, tmp_path):
    """A checkpoint with corrupted bytes loaded and re-packed with exit 0: its weights now carry a digest, checked on
    every load (the re-pack checks it before any work)."""
    cfg, state = tg.load_checkpoint(trained_tiny["out"] / "final_model.pt")
    ck = torch.load(trained_tiny["out"] / "final_model.pt", weights_only=True)
    name = next(iter(ck["state_dict"]))
    ck["state_dict"][name] = ck["state_dict"][name].clone()
    ck["state_dict"][name].view(-1)[0] += 1  # one weight changed, the digest kept
    torch.save(ck, tmp_path / "tampered.pt")
    with pytest.raises(tg.ConfigError, match="is corrupted: its weights do not match the digest"):
        tg.load_checkpoint(tmp_path / "tampered.pt")
    raw = bytearray((trained_tiny["out"] / "final_model.pt").read_bytes())
    raw[len(raw) // 3: len(raw) // 3 + 64] = bytes(64)
    (tmp_path / "damaged.pt").write_bytes(bytes(raw))
    with pytest.raises(tg.ConfigError, match="corrupted|not a readable checkpoint"):
        tg.load_checkpoint(tmp_path / "damaged.pt")
    torch.save({"config": ck["config"], "state_dict": ck["state_dict"]}, tmp_path / "foreign.pt")
    with pytest.raises(tg.ConfigError, match="has no digest"):
        tg.load_checkpoint(tmp_path / "foreign.pt")


class _Streams:
    """torch.cuda's stream API as Rescue.snapshot uses it (Stream, current_stream, stream, Event), recording which
    stream waits on which: CUDA streams cannot run on a CPU, so this stand-in tells the order apart."""

    def __init__(self):
        self.waits, self.main = [], _Stream("main", self)
        self.current, self.events = self.main, []

    def Stream(self, device):  # noqa: N802 - torch.cuda's name
        return _Stream("side", self)

    def current_stream(self):
        return self.current

    @contextlib.contextmanager
    def stream(self, s):
        before, self.current = self.current, s
        yield
        self.current = before

    def Event(self):  # noqa: N802
        self.events.append(_Event())
        return self.events[-1]


class _Stream:
    def __init__(self, name: str, api: _Streams):
        self.name, self.api = name, api

    def wait_stream(self, other: "_Stream") -> None:
        self.api.waits.append((self.name, other.name))


class _Event:
    """A copy's completion, which the test sets (`done`): the stand-in copies at once, the event says when CUDA's
    would have finished."""

    def __init__(self):
        self.done = True

    def record(self, stream) -> None:
        pass

    def query(self) -> bool:
        return self.done


def test_the_snapshot_never_makes_the_training_stream_wait_for_its_host_copy():
    """Every 100 steps the snapshot's 144 MB device-to-host copy ran on a side stream, and then the main stream
    waited for all of it (so the next EMA update could not tear it). Now the main stream copies the weights to a
    device staging buffer (~0.1 ms) and the side stream copies that to the host: the side stream waits for the
    staging copy, the main stream waits for nothing, and a later update of the weights does not reach the snapshot."""
    api = _Streams()
    rescue = tg.Rescue(rt=tg.Runtime.cpu(), streams=api)
    state = {"w": torch.ones(4), "b": torch.zeros(2)}
    rescue.snapshot(state, tg.Rescue.SNAPSHOT_EVERY)
    state["w"].add_(1)  # the next step's EMA update, after the snapshot was queued
    assert api.waits == [("side", "main")]
    host, step = rescue.latest()
    assert torch.equal(host["w"], torch.ones(4)) and step == tg.Rescue.SNAPSHOT_EVERY
    assert rescue.staging is not None and rescue.staging["w"] is not state["w"]


def test_a_save_reads_the_last_complete_snapshot_never_one_in_flight(tmp_path):
    """A save beside the loop (a signal while blocked, a stalled loop) wrote the host buffer only when no copy was
    in flight, else nothing ("no host snapshot"); and one host buffer meant a save could read a copy being written.
    Now copies alternate between two host buffers: a save reads the last complete one, a snapshot never writes the
    buffer a save may be reading, and none starts while a save holds the lock."""
    api, every = _Streams(), tg.Rescue.SNAPSHOT_EVERY
    notes: list[str] = []
    cfg, _ = tg.load_config({})
    rescue = tg.Rescue(tmp_path / "final_model.pt", cfg, tg.Runtime.cpu(), notes.append, streams=api)
    state = {"w": torch.ones(4)}
    rescue.snapshot(state, every)
    first = rescue.latest()[0]
    state["w"].add_(1)
    rescue.snapshot(state, 2 * every)
    api.events[-1].done = False  # the second copy is still running on its stream
    host, step = rescue.latest()
    assert step == every and host is first and torch.equal(host["w"], torch.ones(4))
    rescue.snapshot(state, 3 * every)  # skipped: a copy is in flight
    assert len(api.events) == 2
    rescue.save_snapshot("stalled")
    assert "the averaged weights of step 100 are in" in notes[-1], notes
    assert torch.equal(tg.load_checkpoint(tmp_path / "final_model.pt")[1]["w"], torch.ones(4))
    api.events[-1].done = True
    host, step = rescue.latest()
    assert step == 2 * every and host is not first and torch.equal(host["w"], torch.full((4,), 2.0))
    with rescue.lock:  # a save is reading the snapshot: the loop takes none
        rescue.snapshot(state, 4 * every)
    assert rescue.latest()[1] == 2 * every
    state["w"].add_(1)
    rescue.snapshot(state, 5 * every)  # into the other buffer than the complete one
    assert rescue.pending[0] is first and rescue.latest()[1] == 5 * every


def test_a_loop_stalled_for_half_the_timeout_saves_its_snapshot(tmp_path):
    """Under NCCL a rank blocked in a collective is ended by the watchdog at the timeout, with no Python error and
    no signal: nothing was saved. The heartbeat's watcher, which names the late rank at half the timeout, now hands
    the stall to the rescue, which saves the last complete snapshot and lets the process go on."""
    cfg, _ = tg.load_config({})
    rt = dataclasses.replace(tg.Runtime.cpu(), world_size=2)
    notes: list[str] = []
    rescue = tg.Rescue(tmp_path / "final_model.pt", cfg, rt, notes.append)
    rescue.snapshot({"w": torch.full((3,), 7.0)}, tg.Rescue.SNAPSHOT_EVERY)
    heartbeat, saved = tg.Heartbeat(rt), threading.Event()

    def stalled(why: str) -> None:
        rescue.save_snapshot(why)
        saved.set()

    with heartbeat.watching(0.0, notes.append, stalled):  # the threshold is then its floor, 2 s
        assert saved.wait(60), notes
    assert "no training step finished for" in notes[0] and "of step 100 are in" in notes[1], notes
    assert torch.equal(tg.load_checkpoint(tmp_path / "final_model.pt")[1]["w"], torch.full((3,), 7.0))
