"""Muon's sharded update through Comm's NCCL branch on two gloo ranks (used by test_gpu_paths).

NCCL's `reduce_scatter_tensor` (op AVG, async) and `all_gather_into_tensor` (async) do not exist for gloo tensors on a
CPU, so stand-ins with their signatures and argument checks replace them, built from gloo's all_reduce and
all_gather. Their results are written only when their handles are waited on, as an asynchronous NCCL kernel finishes
later: a caller that reads an output before `wait()` reads garbage (NaN). Writes each rank's parameters after three
steps through the NCCL branch and through the gloo branch, how often each stand-in ran, and the order in which
Newton-Schulz ran per bank and each bank's gather was waited on, to $COMM_OUT/rank<r>.pt."""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

CALLS = {"reduce_scatter_tensor": 0, "all_gather_into_tensor": 0}
EVENTS: list[tuple[str, int]] = []  # ("ns", bank) and ("gathered", bank), in the order they happened
GATHERED_DTYPES: set[str] = set()


def _check_pair(output: torch.Tensor, input: torch.Tensor, big: torch.Tensor, small: torch.Tensor) -> None:
    if output.dtype != input.dtype or output.device != input.device:
        raise TypeError("output and input must have the same dtype and device")
    if not (output.is_contiguous() and input.is_contiguous()):
        raise ValueError("Tensors must be contiguous")
    if big.numel() != small.numel() * dist.get_world_size():
        raise ValueError("output tensor size must be equal to world_size times input tensor size")


class _Deferred:
    """A Work handle whose collective runs at wait() (every rank waits in the same order, so the gloo calls match)."""

    def __init__(self, run, event: tuple[str, int] | None = None):
        self._run, self._done, self._event = run, False, event

    def wait(self, timeout=None) -> bool:
        if not self._done:
            self._run()
            self._done = True
            if self._event is not None:
                EVENTS.append(self._event)
        return True

    def is_completed(self) -> bool:
        return self._done


def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
    _check_pair(output, input, input, output)
    CALLS["reduce_scatter_tensor"] += 1
    output.fill_(float("nan"))  # what an unfinished kernel's output holds, as far as the caller may know

    def run():
        full = input.clone()
        dist.all_reduce(full)
        if op == dist.ReduceOp.AVG:
            full /= dist.get_world_size()
        elif op != dist.ReduceOp.SUM:
            raise ValueError(f"stand-in supports SUM and AVG, not {op}")
        output.copy_(full.view(dist.get_world_size(), *output.shape)[dist.get_rank()])

    work = _Deferred(run)
    return work if async_op else work.wait() and None


def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
    _check_pair(output_tensor, input_tensor, output_tensor, input_tensor)
    CALLS["all_gather_into_tensor"] += 1
    GATHERED_DTYPES.add(str(input_tensor.dtype))
    output_tensor.fill_(float("nan"))

    def run():  # reads the input only now, as the kernel would: a caller that changed it before wait() would show
        dist.all_gather(list(output_tensor.view(dist.get_world_size(), *input_tensor.shape).unbind(0)), input_tensor)

    work = _Deferred(run, ("gathered", BANK[0]))
    return work if async_op else work.wait() and None


BANK = [0]  # the bank whose update is being gathered (set by the Newton-Schulz wrapper below)


def run(nccl: bool) -> dict:
    cfg, _ = tg.load_config({"MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "VOCAB_SIZE": "256",
                             "BIGRAM_VOCAB_SIZE": "0", "INST_DIM": "8", "CRAWLER_LOOPS": "2"})
    rt = tg.Runtime.cpu(dist.get_rank(), dist.get_world_size())
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    muon = tg.build_optimizers(model, cfg, rt).muon
    muon.comm.nccl = nccl
    ns, calls = muon.ns, [0]

    def traced_ns(g, coeffs):  # banks run in order: the i-th call of a step is bank i
        BANK[0] = calls[0] % len(muon.banks)
        calls[0] += 1
        EVENTS.append(("ns", BANK[0]))
        return ns(g, coeffs)

    muon.ns = traced_ns
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + dist.get_rank())  # each rank its own gradient
        for bank in muon.banks:
            for p in bank:
                p.grad = torch.randn(p.shape, generator=g)
        muon.step(launched=muon.launch())
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 2}


dist.init_process_group("gloo")
dist.reduce_scatter_tensor, dist.all_gather_into_tensor = reduce_scatter_tensor, all_gather_into_tensor
nccl = run(True)
result = {"nccl": nccl, "events": list(EVENTS), "gathered_dtypes": sorted(GATHERED_DTYPES), "gloo": run(False),
          "calls": dict(CALLS)}
torch.save(result, Path(os.environ["COMM_OUT"]) / f"rank{dist.get_rank()}.pt")
dist.barrier()
dist.destroy_process_group()
