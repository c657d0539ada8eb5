"""train_gpt.py with host and device told apart (tests/host_device.py): the runtime's device is DEVICE (`cpu:1`), a
place of its own, and every mix of host and device tensors that CUDA refuses fails here too. Used as the script of a
trainer subprocess (conftest.run_trainer with emulate=True), under torchrun as well; the same environment variables."""
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt as tg  # noqa: E402
from host_device import DEVICE, HostDevice  # noqa: E402

real = tg.setup_runtime
tg.setup_runtime = lambda cfg: dataclasses.replace(real(cfg), device=DEVICE)
with HostDevice():
    tg.main()
