"""Memory accounting for the demo: optimizer-state bytes and the peak memory of training.

**Optimizer state**: the bytes of every tensor reachable from ``optimizer.state`` (nested dicts,
lists and tuples), each storage counted once, plus the state of any optimizer held as an attribute
(SAM's ``base_optimizer``), because that memory exists only for this optimizer.

**Peak memory** (:class:`PeakMemory`): the peak of bytes allocated by PyTorch for everything the
fine-tune keeps or creates inside the window: the model's parameters and buffers (re-materialised
inside the window by :meth:`PeakMemory.materialize`, the old copies kept alive until the window
ends so that their release is never seen), the optimizer and its state, gradients, activations
and temporaries.

- GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
  allocated when the window opened.
- CPU: PyTorch has no such counter, so :class:`_StorageTracker` (a ``TorchDispatchMode``) sees
  every aten operator inside the window, counts the bytes of each new storage an operator returns
  (not views or in-place results: storages of its inputs) and subtracts them when that storage is
  freed (a weak reference to the storage; PyTorch keeps one Python object per live storage). The
  peak of that sum is the tensor-level peak, exact for every tensor, forward and backward; it
  does not see scratch memory private to one kernel (a matmul's workspace) nor the allocator's
  rounding, which the CUDA number includes. The profiler's allocation events (``bench/common.py``)
  would see those, but profiling costs minutes for an optimizer that launches thousands of small
  operators per step; this costs microseconds per operator. The demo opens the window for the
  first few steps (the optimizer's state is created at step 1 and every kind of step has
  happened by step 3) and leaves those steps out of the timing.

Neither counts memory that no tensor owns (the Python heap) nor the token data, made before the window.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensors in ``obj`` (a tensor or nested dict/list/tuple), each storage once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (obj.device, storage.data_ptr())
        if key in seen or storage.nbytes() == 0:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def optimizer_state_bytes(opt: torch.optim.Optimizer, seen: set | None = None) -> int:
    """Bytes of all tensors in ``opt.state`` and in the state of optimizers it holds (SAM's base)."""
    seen = set() if seen is None else seen
    total = tensor_bytes(dict(opt.state), seen)
    for value in vars(opt).values():
        if isinstance(value, torch.optim.Optimizer) and value is not opt:
            total += optimizer_state_bytes(value, seen)
    return total


def module_bytes(module: nn.Module) -> int:
    return tensor_bytes(list(module.parameters()) + list(module.buffers()))


class PeakMemory:
    """``with PeakMemory(device) as pm: pm.materialize(model); ...``; then ``pm.peak_bytes``."""

    _MARK = "__lorenza_peak_memory__"

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._keep: list[torch.Tensor] = []

    def materialize(self, module: nn.Module) -> None:
        """Give every parameter and buffer fresh storage, allocated inside the window."""
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                self._keep.append(t.data)
                t.data = t.data.clone()

    def __enter__(self) -> PeakMemory:  # noqa: PYI034 - Self needs Python 3.11
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._tracker = _StorageTracker()
            self._tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            self._tracker.__exit__(*exc)
            self.peak_bytes = self._tracker.peak
            self._tracker.forget()
            del self._tracker
        self._keep.clear()


class _StorageTracker(TorchDispatchMode):
    """Live bytes of the storages created by operators while active, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._refs:
                continue
            self._refs[key] = weakref.ref(storage, lambda _, key=key, n=nbytes: self._release(key, n))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out

    def forget(self) -> None:
        """Drop the weak references (and their callbacks) once the measurement is over."""
        self._refs.clear()
