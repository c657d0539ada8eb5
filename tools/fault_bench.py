"""What the fault guards of issues 17 and 25 cost, measured on this machine (prints figures; asserts nothing).

    python3 tools/fault_bench.py                 # full size: a 100M-token shard, the default model's weights
    python3 tools/fault_bench.py --tokens 10000000 --steps 2000   # quicker

Figures:
- check_train_shards: ids + BOS + the val-overlap hash of one train shard (the pre-training pass does every shard,
  8 at a time), and the projection for 80 shards on this machine's cores;
- per-step guards on the training clock: the heartbeat (a TCP store write every BEAT_EVERY steps, through a real
  store), the host snapshot (every SNAPSHOT_EVERY steps, on every rank since issue 25; on CUDA a device-side staging
  copy and an asynchronous side-stream copy whose host cost is the launch, here a CPU copy, an upper bound), and the
  stop / loss flags that ride the step's one all-reduce (the training loop's exception handler and the logger's
  broken-pipe guard cost nothing until they fire);
- the total over a run of --steps steps (the 8xH100 default makes ~6,500).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def fake_stream(n: int, mean_doc: int, vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.integers(8, vocab, n, dtype=np.uint16)
    starts = np.cumsum(50 + rng.geometric(1 / mean_doc, n // mean_doc * 2))  # documents of >= 50 tokens
    t[starts[starts < n]] = 1
    t[0] = 1
    return t


def bench_shards(tokens: int, workdir: Path) -> dict:
    cfg, _ = tg.load_config({})
    val = fake_stream(47_853_344 // 8, 950, cfg.vocab_size, 0)
    path = workdir / "fineweb_train_000000.bin"
    tg.write_shard(path, fake_stream(tokens, 950, cfg.vocab_size, 1))
    tg.check_train_shards(cfg, [str(path)], val)  # warm the page cache
    t0 = time.perf_counter()
    n_docs, overlap = tg.check_train_shards(cfg, [str(path)], val)
    one = time.perf_counter() - t0
    per_100m = one * 100e6 / tokens
    cores = os.cpu_count() or 1
    return {"shard_tokens": tokens, "docs": n_docs, "overlap": len(overlap), "shard_s": one, "per_100M_s": per_100m,
            "projected_80_shards_s": per_100m * 80 / min(8, cores), "cores": cores}


def bench_steps(steps: int) -> dict:
    cfg, _ = tg.load_config({})
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), None, False)
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(store.port)
    hb = tg.Heartbeat(tg.dataclasses.replace(rt, world_size=2))
    assert hb.store is not None
    t0 = time.perf_counter()
    for s in range(steps):
        hb.beat(s)
    beat_s = time.perf_counter() - t0

    model = tg.GPT(cfg)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    rescue = tg.Rescue(rt=rt)
    rescue.snapshot(state, 0)  # allocates the host buffers once
    t0 = time.perf_counter()
    n = 0
    for s in range(1, steps + 1):
        if s % rescue.SNAPSHOT_EVERY == 0:
            rescue.snapshot(state, s)
            n += 1
    snap_s = time.perf_counter() - t0

    clock, loss, stop = tg.StepClock(time.perf_counter), torch.tensor(3.0), tg.Rescue()
    t0 = time.perf_counter()
    for _ in range(steps):
        tg.shared_state(clock, rt, loss, stop)
    shared_s = time.perf_counter() - t0
    return {"steps": steps, "heartbeat_s": beat_s, "snapshots": n, "snapshot_s": snap_s,
            "snapshot_mb": sum(v.numel() * v.element_size() for v in state.values()) / 1e6,
            "shared_state_s": shared_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100_000_000, help="tokens in the benchmark train shard")
    ap.add_argument("--steps", type=int, default=6500, help="training steps to project the per-step guards over")
    ap.add_argument("--workdir", default="/tmp/fault_bench")
    a = ap.parse_args(argv)
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    sh = bench_shards(a.tokens, Path(a.workdir))
    print(f"check_train_shards: {sh['shard_tokens']:,} tokens {sh['docs']:,} docs overlap:{sh['overlap']} "
          f"{sh['shard_s']:.2f}s -> {sh['per_100M_s']:.2f}s per 100M tokens; 80 shards on {sh['cores']} cores: "
          f"~{sh['projected_80_shards_s']:.1f}s")
    st = bench_steps(a.steps)
    print(f"heartbeat: {st['steps']} steps {st['heartbeat_s'] * 1e3:.1f}ms "
          f"({st['heartbeat_s'] / st['steps'] * 1e6:.1f}us/step)")
    print(f"snapshot: {st['snapshots']} x {st['snapshot_mb']:.0f} MB {st['snapshot_s'] * 1e3:.0f}ms on the host "
          "(CPU copy: an upper bound; CUDA copies asynchronously on a side stream)")
    print(f"shared_state (flags + loss in the step's all-reduce, world 1): {st['shared_state_s'] / st['steps'] * 1e6:.1f}"
          "us/step, of which the flags are 2 of its 3 doubles")
    guards = st["heartbeat_s"] + st["shared_state_s"] * 2 / 3
    print(f"happy-path guards over {st['steps']} steps, without the snapshot: {guards:.2f}s of training clock "
          f"({'within' if guards < 1.0 else 'OVER'} the 1 s target); the snapshot's host cost on CUDA is "
          "gpu_bench.py's snapshot_host_ms x steps / SNAPSHOT_EVERY")
    return 0


if __name__ == "__main__":
    sys.exit(main())
