"""Host and device told apart on a CPU (issue 24, section 1; tests/host_device.py). On a CPU the host and the device
are one place, so a host tensor meeting a device tensor computes; on CUDA every rank dies. Under HostDevice the
runtime's device is `cpu:1` and CUDA's rules hold. The whole pipeline runs in this mode in CI: here (training with
document masking, the crawler switch and BigramHash, loop-aware GPTQ with AWQ and LQER, packing, roundtrip / sliding
/ phased TTT with the n-gram tilt), a SKIP_TRAIN re-pack (test_pack) and the two-rank run (test_train). This file
also tests the mode itself and what it found."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import train_gpt as tg
from conftest import TINY, run_trainer, tiny_env
from host_device import DEVICE, HostDevice, PlaceError


@pytest.mark.slow
def test_the_whole_pipeline_runs_with_host_and_device_told_apart(plain_data, tmp_path):
    """Every stage of a default run, as it would place its tensors on CUDA: training with document masking, the
    crawler's loop switch and BigramHash; calibration (loop-aware phases 1 and 2, AWQ-lite, GPTQ, LQER); packing and
    unpacking; roundtrip, phased TTT and the sliding window, all with the n-gram tilt. Before issue 24 it died in
    calibration (AWQ-lite: a host weight times a device Hessian), as every default 8xH100 run did."""
    env = tiny_env(plain_data, ITERATIONS=16, CRAWLER_START_FRAC=0.3, VAL_TOKEN_LIMIT=3072, TRAIN_LOG_EVERY=100)
    r = run_trainer(env, tmp_path, emulate=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for line in ("crawler:loops_enabled loops:2 step:5", "gptq:phase1", "awq_lite:", "gptq:phase2", "lqer:",
                 "Total submission size", "ngram_tilt_fired:", "final_int6_roundtrip_exact", "ttt:phase docs:",
                 "quantized_ttt_phased", "final_int6_sliding_window_exact", "summary:"):
        assert line in r.stdout, line


def test_the_mode_refuses_what_cuda_refuses_and_copies_where_cuda_copies():
    with HostDevice() as hd:
        dev, host = torch.ones(4, device=DEVICE), torch.ones(4)
        assert dev.device == DEVICE and host.device == torch.device("cpu")
        with pytest.raises(PlaceError, match="same device"):
            dev * host  # a host tensor of one or more dimensions meeting a device tensor
        assert torch.equal(dev * torch.tensor(2.0), dev * 2)  # a 0-dim host tensor is a scalar: CUDA takes it
        filled = dev.clone()
        filled[:2] = -1  # fill_ with a 0-dim host value: CUDA takes it too (Fill.cpp), though fill_ is not pointwise
        with pytest.raises(PlaceError, match="same device"):
            torch.mm(torch.ones(4, 1, device=DEVICE), torch.tensor(2.0).reshape(1, 1))  # elsewhere it is refused
        assert torch.zeros(2, device=dev.device).device == DEVICE  # device= of a device tensor stays there
        with pytest.raises(PlaceError, match="numpy"):
            dev.numpy()
        back = dev.cpu()
        back.add_(1)
        assert back is not dev and float(dev[0]) == 1.0  # .cpu() copies, as on CUDA
        moved = host.to(DEVICE)
        assert moved.device == DEVICE and moved.to(DEVICE) is moved and host.cpu() is host
        assert torch.equal(dev[torch.tensor([0, 2])], torch.ones(2, device=DEVICE))  # host indices may index it
        with pytest.raises(PlaceError, match="indices"):
            host[torch.tensor([0], device=DEVICE)]
        with pytest.raises(PlaceError):
            torch.nn.functional.embedding(torch.tensor([[1, 2]]), torch.ones(4, 3, device=DEVICE))
    assert {"cpu()", "host->device blocking aten._to_copy.default", "aten.equal.default"} <= {w for w, _ in hd.syncs}


def test_the_mode_counts_every_host_stall():
    with HostDevice() as hd:
        dev = torch.arange(6, device=DEVICE)
        dev.tolist(), dev.sum().item(), bool(dev.any()), dev[dev > 2], dev.nonzero()
        pinned = torch.ones(3).pin_memory()
        assert pinned.is_pinned() and not torch.ones(3).is_pinned()
        pinned.to(DEVICE, non_blocking=True)  # asynchronous from pinned memory: no stall
        torch.ones(3).to(DEVICE, non_blocking=True)  # "asynchronous" from pageable memory: CUDA stages it
    whats = [w for w, _ in hd.syncs]
    assert whats[:5] == ["tolist()", "aten._local_scalar_dense.default", "aten._local_scalar_dense.default",
                         "aten.index.Tensor", "aten.nonzero.default"], whats
    assert whats[-1] == "host->device pageable non_blocking aten._to_copy.default" and len(whats) == 6


def _buggy_awq_groups(sd, hs, counts, names, n_groups):
    """awq_groups as it was before issue 24: the weight's host copy times the Hessian's device diagonal."""
    scored = []
    for n in names:
        w = sd[n].float()
        if w.size(1) % tg.AWQ_GROUP:
            continue
        sal = (torch.diag(hs[n]).float() / max(counts[n], 1)).sqrt() * w.abs().mean(dim=0)
        for g, v in enumerate(sal.view(-1, tg.AWQ_GROUP).sum(dim=1).tolist()):
            scored.append((v, n, g * tg.AWQ_GROUP))
    return {n: start for _, n, start in sorted(scored, reverse=True)[:n_groups]}


def test_calibration_keeps_host_and_device_apart_and_the_old_awq_did_not(monkeypatch):
    """Every default 8xH100 run died in calibration: AWQ-lite multiplied the weights' host copy by the device
    Hessian's diagonal. On a CPU that computed; in this mode the old code fails as CUDA does and the fix passes."""
    cfg, _ = tg.load_config(TINY)
    rt = dataclasses.replace(tg.Runtime.cpu(), device=DEVICE)
    with HostDevice():
        torch.manual_seed(0)
        model = tg.GPT(cfg).to(DEVICE)
        x = torch.randint(2, cfg.vocab_size, (8, 65), generator=torch.Generator().manual_seed(0))
        batches = [tg.to_micro(x[:, :-1], x[:, 1:], cfg, 64, DEVICE)]
        cal = tg.calibrate(model, cfg, rt, batches, lambda s: None)
        assert cal.awq and all(h.device == DEVICE for h in cal.hs.values())
        monkeypatch.setattr(tg, "awq_groups", _buggy_awq_groups)
        with pytest.raises(PlaceError, match="same device"):
            tg.calibrate(model, cfg, rt, batches, lambda s: None)


def _train(plain_data, steps: int) -> list[tuple[str, str]]:
    cfg, _ = tg.load_config(TINY | {"DATA_PATH": str(plain_data["data_path"]), "ITERATIONS": str(steps),
                                    "CRAWLER_START_FRAC": "0.5", "TRAIN_LOG_EVERY": "1000"})
    rt = dataclasses.replace(tg.Runtime.cpu(), device=DEVICE)
    val = tg.ValidationData(torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.int32), 1)
    with HostDevice() as hd:
        torch.manual_seed(0)
        model = tg.GPT(cfg).to(DEVICE)
        tg.train(model, model, cfg, rt, tg.TrainData(tg.shard_paths(cfg.data_path, "train"), cfg, rt, 1), val,
                 lambda s: None, now=iter(range(10**6)).__next__)
    return hd.syncs


def test_a_training_step_stalls_the_host_at_one_point(plain_data):
    """Issue 24's count of host syncs per training step, every `.item()`, `.cpu()`, `.tolist()`, `.numpy()` of a
    device tensor, device-to-host copy, data-dependent op, host-to-device copy that CUDA runs synchronously (a
    blocking one, or a "non_blocking" one from pageable memory) and device synchronize. The bound is exact: one point
    per step (shared_state), where rank 0 synchronizes its device to read its clock after the step has finished, and
    every rank reads the one all-reduce that shares that clock, the loss and the stop requests. Before: batches,
    segment ids and the next step's inputs came from pageable memory, and clip_grad_norm_ and the crawler's loop
    switch added more."""
    short, long = _train(plain_data, 4), _train(plain_data, 12)
    extra = long[len(short):] if long[:len(short)] == short else None
    assert extra is not None, (short, long)
    assert [w for w, _ in extra] == ["synchronize()", "tolist()"] * 8, extra
    assert {where.split()[-1] for _, where in extra} == {"shared_state"}
