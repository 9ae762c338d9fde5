"""Exact peak tensor memory of a call on any device, including the meta device (no compute at all).

:class:`LiveTensorBytes` counts the bytes of every tensor storage created on one device while it is
active, and frees them when the storage dies: its ``peak`` is the analogue of
``torch.cuda.max_memory_allocated`` (without the caching allocator's 512-byte rounding) for the CPU and
for ``meta``. Storages that existed before (weights, inputs) are never counted, nor their views. On
``meta`` a call at real model size (SD3-Medium at 1024 px, 28 steps) runs in well under a minute on one
CPU core, so peak memory can be measured where the compute cannot be run:

- values do not exist on ``meta``: a Python read of a tensor value (``float(score)``, ``bool(mask)``)
  gives 0, so data-dependent choices take their first option (EMAG: the lowest candidate block, the
  longest perturbed suffix; it is the worst case), and copies to the CPU give zeros; CPU tensors that
  meet meta tensors in one op (a schedule kept on the CPU so that its values exist) are moved to meta;
- fused attention (``F.scaled_dot_product_attention``) is modelled as the flash / memory-efficient
  kernels a GPU runs: it allocates its output and its float32 log-sum-exp, never the map (on meta,
  torch would otherwise take the math path, which materialises it). Explicit attention maps built by
  EMAG's edits are ordinary tensor ops and are counted as they are.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten


def _to_meta(t):
    return t.to("meta") if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t


class LiveTensorBytes(TorchDispatchMode):
    """Current and peak bytes of live tensor storages created on ``device_type`` while active."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.live = WeakIdKeyDictionary()
        self.foreign = WeakIdKeyDictionary()  # storages that existed before (weights, inputs): not counted
        self.current = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        if storage in self.live or storage in self.foreign:
            return
        nbytes = storage.nbytes()
        self.live[storage] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = list(_tensors((args, kwargs)))
        if self.device_type == "meta" and any(t.device.type == "meta" for t in inputs):
            if any(t.device.type == "cpu" for t in inputs):
                # values the harness keeps on the CPU (the scheduler's timesteps) meet the model: move them
                args, kwargs = tree_map(_to_meta, (args, kwargs))
                inputs = list(_tensors((args, kwargs)))
            first = args[0] if args else None
            if func is aten._local_scalar_dense.default:  # a value read: there is none on meta
                return False if first.dtype == torch.bool else (0.0 if first.dtype.is_floating_point else 0)
            if func is aten._to_copy.default and kwargs.get("device") is not None \
                    and torch.device(kwargs["device"]).type != "meta":
                return torch.zeros(first.shape, dtype=kwargs.get("dtype") or first.dtype, device=kwargs["device"])
        for t in inputs:
            if t.device.type == self.device_type:
                storage = t.untyped_storage()
                if storage not in self.live:
                    self.foreign[storage] = True
        out = func(*args, **kwargs)
        for t in _tensors(out):
            self._track(t)
        return out


def _tensors(obj):
    """The tensors in nested tuples, lists and dicts (op arguments and results)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class FlashAttentionModel(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on ``meta`` as a flash kernel allocates it: output + log-sum-exp."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q = kwargs.get("query", args[0] if args else None)
            v = kwargs.get("value", args[2] if len(args) > 2 else None)
            if q is not None and q.device.type == "meta":
                lse = torch.empty(*q.shape[:-1], dtype=torch.float32, device=q.device)  # noqa: F841
                return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        return func(*args, **kwargs)
