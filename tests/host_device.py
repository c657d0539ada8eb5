"""Host and device told apart on a CPU (issue 24).

On a CPU the host and the device are one place: `.cpu()` and `.to(device)` return the same tensor, and any mix of
host and device tensors computes. On CUDA a host tensor of one or more dimensions meeting a device tensor is an
error ("Expected all tensors to be on the same device"), `.numpy()` of a device tensor is an error, NCCL collectives
take device tensors only, and `.cpu()` / `.to(device)` copy. Under `HostDevice` the runtime's device is
`DEVICE = torch.device("cpu", 1)`, a place of its own, and those rules hold:

- every tensor's storage carries the place CUDA would have put it: a factory call with `device=DEVICE`, `.to(DEVICE)`,
  or an op on a device tensor gives a device tensor; everything else (numpy, torch.load, a factory without
  `device=`) is on the host; `t.device` reads DEVICE for a device tensor, so `device=x.device` keeps it there;
- an op mixing a device tensor with a host tensor of one or more dimensions raises, as CUDA does (a 0-dim host
  tensor is a scalar, which CUDA accepts); a device tensor may be indexed with host indices, a host tensor not with
  device ones; a collective refuses a host tensor;
- `.cpu()` / `.to(host)` of a device tensor and `.to(DEVICE)` of a host tensor copy; `.to(DEVICE)` of a device
  tensor and `.cpu()` of a host tensor return the tensor itself; `.numpy()` of a device tensor raises;
- pinned memory exists: `pin_memory()` gives a pinned host copy (in any thread);
- torch's foreach grouping (clip_grad_norm_, the optimizers) keys device tensors' groups by DEVICE, as it would by
  the CUDA device;
- every host stall is counted, with the line of train_gpt.py that caused it: `.item()`, `.tolist()`, `bool()` /
  `int()` / `float()`, a device-to-host copy, `torch.equal`, data-dependent ops on device tensors (nonzero,
  masked_select, unique, boolean indexing), a blocking host-to-device copy and an asynchronous one from pageable
  memory (CUDA stages it synchronously), and train_gpt's `sync(device)` of the device (torch.cuda.synchronize on
  CUDA; a no-op on a CPU device, so it is patched while the mode is on).

Use: `with HostDevice() as hd: ...` with `Runtime.device = DEVICE`; `hd.syncs` lists the stalls. The modes are the
main thread's; tensors other threads make are host tensors (the loader's prefetch thread pins through the patched
`pin_memory`)."""
from __future__ import annotations

import sys
import traceback
import weakref

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("cpu", 1)
HOST, DEV = "host", "device"
aten = torch.ops.aten

# id(storage) -> (place, pinned), for device and pinned storages only (a storage without an entry is plain host
# memory). A storage's Python object lives exactly as long as the storage (torch preserves it), and a finalizer drops
# the entry when it dies, so an id is never read for another object.
PLACES: dict[int, tuple[str, bool]] = {}

# Copies are how data moves between the places: they may mix them (and are counted when they stall).
TRANSFERS = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default,
             aten._foreach_copy_.default, aten.lift_fresh.default, aten.lift_fresh_copy.default, aten.set_.source_Tensor,
             aten.set_.source_Storage, aten.set_.source_Storage_storage_offset}
INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
# Not pointwise, yet CUDA reads a 0-dim host `value` as a scalar (Fill.cpp, masked_fill's CUDA kernel): `x[:n] = -1`
SCALAR_VALUE = {aten.fill_.Tensor, aten.fill.Tensor, aten.masked_fill_.Tensor, aten.masked_fill.Tensor}
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
                  aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten._local_scalar_dense.default,
                  aten.equal.default, aten.bincount.default}


class PlaceError(RuntimeError):
    """What CUDA raises where a CPU run would compute."""


def tensors_in(*objs) -> list[Tensor]:
    """The tensors in op arguments or results, in order (nested lists, tuples and dicts): torch's pytree, without
    its cost; a sequence of numbers (a shape, a stride) is skipped whole."""
    out: list[Tensor] = []
    for x in objs:
        if isinstance(x, Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            if x and not isinstance(x[0], (int, float, bool)):
                out += tensors_in(*x)
        elif isinstance(x, dict):
            out += tensors_in(*x.values())
    return out


def storage(t: Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def place(t: Tensor) -> str:
    return PLACES.get(id(storage(t)), (HOST, False))[0]


def pinned(t: Tensor) -> bool:
    return PLACES.get(id(storage(t)), (HOST, False))[1]


def set_place(t: Tensor, where: str, is_pinned: bool = False) -> None:
    s = storage(t)
    if s is None:
        return
    key, entry = id(s), (where, is_pinned and where == HOST)
    if entry == (HOST, False):
        PLACES.pop(key, None)
    else:
        if key not in PLACES:
            weakref.finalize(s, PLACES.pop, key, None)
        PLACES[key] = entry


def place_of(device) -> str | None:
    """The place a `device=` argument names (None when it names none)."""
    if device is None:
        return None
    d = torch.device(device)
    return DEV if d == DEVICE or d.type == "cuda" else HOST


def _pin_memory(self: Tensor, device=None) -> Tensor:
    if place(self) == DEV:
        raise PlaceError("cannot pin a device tensor (only dense CPU tensors can be pinned)")
    with torch._C.DisableTorchFunction():
        out = self.clone()
    set_place(out, HOST, True)
    return out


def _is_pinned(self: Tensor, device=None) -> bool:
    return pinned(self)


_GROUP = torch._C._group_tensors_by_device_and_dtype


def _group_by_place(tensorlistlist, with_indices: bool = False):
    """torch._C's grouping (foreach paths of clip_grad_norm_ and the optimizers) keys groups by the physical device,
    cpu: split each group by place and key the device's with DEVICE, as CUDA's would be."""
    out = {}
    for (dev, dtype), (lists, idx) in _GROUP(tensorlistlist, with_indices).items():
        places = [place(t) for t in lists[0]]
        for where in (HOST, DEV):
            keep = [i for i, p in enumerate(places) if p == where]
            if keep:
                out[(DEVICE if where == DEV else dev, dtype)] = (
                    [[lst[i] for i in keep] for lst in lists], [idx[i] for i in keep] if idx else idx)
    return out


KINDS: dict[int, str] = {}  # id(op) -> its rule: collective, transfer, indexing, data_dependent or plain


def kind(func) -> str:
    k = KINDS.get(id(func))
    if k is None:
        k = ("collective" if func.namespace == "c10d" and "barrier" not in func.__name__  # a barrier's tensor is the
             else "transfer" if func in TRANSFERS else "indexing" if func in INDEXING  # backend's own
             else "data_dependent" if func in DATA_DEPENDENT else "plain")
        KINDS[id(func)] = k
    return k


class _Dispatch(TorchDispatchMode):
    """Op-level rules: mixing, collectives, transfers and data-dependent ops counted, outputs tagged."""

    def __init__(self, owner: "HostDevice"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        want_pinned = bool(kwargs.get("pin_memory"))
        if want_pinned:
            kwargs["pin_memory"] = False  # a CPU build has no pinned allocator: emulated by the tag below
        flat = tensors_in(args, kwargs)
        places = [place(t) for t in flat]
        on_dev, k = DEV in places, kind(func)
        if k == "collective":
            if HOST in places:
                raise PlaceError(f"{func}: NCCL collectives take device tensors only; this one got a host tensor")
        elif k == "transfer":
            self.owner.transfer(func, args, kwargs, flat, places)
        elif k == "indexing":
            self.check_indexing(func, args, places)
            if on_dev and self.bool_index(args):
                self.owner.stall(str(func))
        elif on_dev:  # CUDA takes a 0-dim host tensor as a scalar in a pointwise op (TensorIterator), nowhere else
            scalar_ok = torch.Tag.pointwise in func.tags or func in SCALAR_VALUE
            host = [t for t, p in zip(flat, places) if p == HOST and (t.dim() > 0 or not scalar_ok)]
            if host:
                raise PlaceError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                 f"{DEVICE} and cpu! ({func} got a host tensor of shape {tuple(host[0].shape)} and a "
                                 "device tensor)")
            if k == "data_dependent":
                self.owner.stall(str(func))
        out = func(*args, **kwargs)
        where = place_of(kwargs.get("device"))
        if k == "transfer":  # device=cpu here is `options()` of a physically-CPU tensor: Python's .cpu() / .to(host)
            where = DEV if where == DEV else (places[0] if places else HOST)  # were taken at the API level
        elif on_dev:
            where = DEV
        elif not flat:  # a factory: from Python, the call's own place; inside an op (C++), the place of that op's
            where = DEV if where == DEV else self.owner.context[-1]  # inputs (`options()` carries cpu for both)
        else:
            where = HOST
        if where == DEV or want_pinned:  # a new host storage needs no entry
            inputs = {id(storage(t)) for t in flat}
            for o in tensors_in(out):
                if id(storage(o)) not in inputs:  # a new storage; views and in-place ops keep theirs
                    set_place(o, where, want_pinned)
        return out

    @staticmethod
    def bool_index(args) -> bool:
        idx = args[1] if len(args) > 1 else ()
        return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in (idx or ()))

    @staticmethod
    def check_indexing(func, args, places) -> None:
        self_place = place(args[0])
        idx = [i for i in (args[1] or ()) if isinstance(i, Tensor)]
        if self_place == HOST and any(place(i) == DEV for i in idx):
            raise PlaceError(f"{func}: indices should be either on cpu or on the same device as the indexed tensor (cpu)")
        values = [v for v in args[2:3] if isinstance(v, Tensor)]
        if values and place(values[0]) != self_place and values[0].dim() > 0:
            raise PlaceError(f"{func}: the values are on the {place(values[0])}, the indexed tensor on the {self_place}")


class _Function(TorchFunctionMode):
    """API-level rules: `.device`, `.cpu()`, `.to()`, `.numpy()`, `.tolist()`, `device=` of non-dispatched factories."""

    def __init__(self, owner: "HostDevice"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == "__get__":  # attribute reads: `.device` tells the place, others pass
            return DEVICE if func.__self__ is Tensor.device and place(args[0]) == DEV else func(*args)
        if func is Tensor.cpu or func is Tensor.to:
            t = args[0]
            if func is Tensor.cpu:
                target, dtype, copy = HOST, None, False
            else:
                dev, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
                other = next((a for a in args[1:] if isinstance(a, Tensor)), None)  # .to(tensor): its place
                target, copy = place(other) if other is not None else place_of(dev), kwargs.get("copy", False)
            if target == HOST and place(t) == DEV:  # device -> host: a copy, and a stall
                self.owner.stall("to host" if func is Tensor.to else "cpu()")
                out = t.clone()
                set_place(out, HOST)
                return out.to(dtype) if dtype is not None else out
            if target is not None and target == place(t) and not copy:  # already there: CUDA returns the tensor
                return t if dtype is None or dtype == t.dtype else func(t, dtype=dtype)
        if func in (Tensor.numpy, Tensor.__array__) and place(args[0]) == DEV:
            raise PlaceError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                             "to host memory first.")
        if func is Tensor.tolist and place(args[0]) == DEV:
            self.owner.stall("tolist()")
        asked = place_of(kwargs.get("device"))
        if asked is None and getattr(func, "__name__", "").startswith("new_"):  # new_tensor, new_zeros: self's place
            asked = place(args[0])
        tensors = tensors_in(args, kwargs)
        self.owner.context.append(asked or (DEV if any(place(t) == DEV for t in tensors) else HOST))
        try:
            out = func(*args, **kwargs)
        finally:
            self.owner.context.pop()
        if asked == DEV:  # torch.tensor(..., device=): no op reaches the dispatcher
            for o in tensors_in(out):
                set_place(o, DEV)
        return out


class HostDevice:
    """Both modes, the pinned-memory patch and the stall record."""

    def __init__(self):
        self.syncs: list[tuple[str, str]] = []  # (what, train_gpt.py:line function)
        self.context: list[str] = [HOST]  # the place of the innermost Python-level torch call (factories inside it)
        self._modes = (_Function(self), _Dispatch(self))
        self._saved = {}

    def stall(self, what: str) -> None:
        frame = next((f for f in reversed(traceback.extract_stack()[:-2]) if f.filename.endswith("train_gpt.py")), None)
        self.syncs.append((what, f"train_gpt.py:{frame.lineno} {frame.name}" if frame else "?"))

    def transfer(self, func, args, kwargs, flat, places) -> None:
        """Account a copy: device -> host stalls unless it is asynchronous into pinned memory; host -> device stalls
        when blocking, or when asynchronous from pageable memory (CUDA stages it synchronously)."""
        if func is aten._to_copy.default:
            src = places[0]
            dst = DEV if place_of(kwargs.get("device")) == DEV else src
            nb, src_pinned = bool(kwargs.get("non_blocking")), pinned(args[0])
        elif func in (aten.copy_.default, aten._foreach_copy_.default):
            dsts, srcs = (args[0], args[1]) if func is aten._foreach_copy_.default else ([args[0]], [args[1]])
            nb = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            for d, s in zip(dsts, srcs):
                self._account(place(s), place(d), nb, pinned(s), pinned(d), str(func))
            return
        else:
            return
        self._account(src, dst, nb, src_pinned, False, str(func))

    def _account(self, src: str, dst: str, nb: bool, src_pinned: bool, dst_pinned: bool, what: str) -> None:
        if src == DEV and dst == HOST and not (nb and dst_pinned):
            self.stall(f"device->host {what}")
        elif src == HOST and dst == DEV and not (nb and src_pinned):
            self.stall(f"host->device {'pageable non_blocking' if nb else 'blocking'} {what}")

    def _sync(self, device) -> None:
        if place_of(device) == DEV:
            self.stall("synchronize()")

    def __enter__(self) -> "HostDevice":
        self._saved = {"pin_memory": Tensor.pin_memory, "is_pinned": Tensor.is_pinned}
        Tensor.pin_memory, Tensor.is_pinned = _pin_memory, _is_pinned
        self._tg = sys.modules.get("train_gpt")
        if self._tg is not None:
            self._saved["sync"], self._tg.sync = self._tg.sync, self._sync
        torch._C._group_tensors_by_device_and_dtype = _group_by_place
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        Tensor.pin_memory, Tensor.is_pinned = self._saved["pin_memory"], self._saved["is_pinned"]
        if self._tg is not None:
            self._tg.sync = self._saved["sync"]
        torch._C._group_tensors_by_device_and_dtype = _GROUP
