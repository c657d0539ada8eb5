"""train_gpt.main under torchrun with one rank that hangs at a given optimizer step (used by test_faults):
FAULT_HANG_RANK, FAULT_HANG_STEP; the rescue thread's grace and snapshot interval shortened for a test."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

tg.Rescue.GRACE_S, tg.Rescue.SNAPSHOT_EVERY = 2.0, 5
hang_rank, hang_step = int(os.environ.pop("FAULT_HANG_RANK")), int(os.environ.pop("FAULT_HANG_STEP"))
real, calls = tg.train_step, [0]


def train_step(*a, **k):
    calls[0] += 1
    if int(os.environ.get("RANK", "0")) == hang_rank and calls[0] == hang_step:
        print(f"FAULT: rank {hang_rank} hangs at step {hang_step}", flush=True)
        time.sleep(3600)
    return real(*a, **k)


tg.train_step = train_step
tg.main()
