"""train_gpt.main under torchrun (or alone) with one rank that fails at a given optimizer step (used by test_faults):
FAULT_RANK, FAULT_STEP and FAULT_MODE: `hang` (sleeps: a rank that stops answering), `kill` (SIGKILL: a lost rank),
`raise` / `raise-keyerror` (an exception inside the training loop); or `slow-save` / `slow-calibrate`, which hold
the final checkpoint's save or the calibration for a few seconds after saying so (a window for a signal). The rescue
thread's grace and snapshot interval are shortened for a test."""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

tg.Rescue.GRACE_S, tg.Rescue.SNAPSHOT_EVERY = 2.0, 5
rank, step, mode = (os.environ.pop(k) for k in ("FAULT_RANK", "FAULT_STEP", "FAULT_MODE"))
real, calls = tg.train_step, [0]


def train_step(*a, **k):
    calls[0] += 1
    if int(os.environ.get("RANK", "0")) == int(rank) and calls[0] == int(step):
        print(f"FAULT: rank {rank} {mode}s at step {step}", flush=True)
        if mode == "hang":
            time.sleep(3600)
        elif mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "raise-keyerror":  # not a RuntimeError: no failure is special
            raise KeyError("a fault injected into the training step")
        elif mode == "raise":
            raise RuntimeError("a fault injected into the training step")
    return real(*a, **k)


def slowed(name: str):
    inner = getattr(tg, name)

    def slow(*a, **k):
        print(f"FAULT: {name} waits", flush=True)
        time.sleep(3)
        return inner(*a, **k)

    return slow


SLOWED = {"slow-save": "save_checkpoint", "slow-calibrate": "calibrate"}
if mode not in {"hang", "kill", "raise", "raise-keyerror"} | set(SLOWED):
    sys.exit(f"dist_fault_worker: unknown FAULT_MODE={mode}")  # a typo must not run as another fault
if mode in SLOWED:
    setattr(tg, SLOWED[mode], slowed(SLOWED[mode]))
tg.train_step = train_step
tg.main()
