"""Counting live tensor memory: on fake tensors (CPU, no real memory), on the CPU, or on CUDA.

``LiveBytesTracker`` is a ``TorchDispatchMode`` that registers the storage of every tensor an
operator returns and subtracts it when the storage is freed (a weak-reference callback), so it
sees exactly what the program allocates, whatever the device. Gradients are told apart by
post-accumulate hooks on the parameters; the static state (parameters, buffers, optimizer states)
is registered by the runner.

Tensor subclasses that wrap other tensors (``DTensor``, as FSDP2 and tensor parallelism use) own
no memory of their own: the wrapper's storage reports the *global* size while the memory is the
local shard's. Such outputs are counted through their inner tensors (``__tensor_flatten__``). The
ops that a wrapper runs on its inner tensors are not seen one by one (this mode is popped while a
subclass handles an op), only what they return: temporaries inside one wrapper op would be missed
(for FSDP2 with foreach AdamW there are none: letting DTensor desugar into local ops gives the same
peaks), and so is DTensor's sharding propagation, which reruns ops on global-size fake tensors
that no device ever holds.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

# The CUDA caching allocator rounds every block up to a multiple of 512 bytes
# (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize).
CUDA_BLOCK_BYTES = 512


def _memory_holders(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors whose storages hold ``tensor``'s memory: itself, or for a wrapper subclass
    (``DTensor``: its local shard) the inner tensors, recursively."""
    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    names, _context = tensor.__tensor_flatten__()
    inner = (getattr(tensor, name) for name in names)  # DTensor also lists its (non-tensor) device mesh
    return [holder for value in inner if isinstance(value, torch.Tensor) for holder in _memory_holders(value)]


class LiveBytesTracker(TorchDispatchMode):
    def __init__(self, round_to: int = 1, record: bool = False) -> None:
        super().__init__()
        self.round_to = round_to  # 512 mimics the CUDA allocator's block rounding
        # With ``record``, every storage's birth and death in program order, as
        # ("alloc" | "free", block id, bytes requested): the trace memcalc.allocator replays.
        self.events: list[tuple[str, int, int]] | None = [] if record else None
        self._next_block = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self.static_bytes = 0  # parameters, buffers, master copies, optimizer states
        self.gradient_bytes = 0  # gradients accumulated so far
        self.peak_activation_bytes = 0
        self._storages: dict[int, tuple[weakref.ref, list[int]]] = {}
        self._paused = 0  # inside ``untracked``: host memory the device does not hold

    def _size(self, storage) -> int:
        nbytes = storage.nbytes()
        return -(-nbytes // self.round_to) * self.round_to if self.round_to > 1 else nbytes

    def track(self, tensor: torch.Tensor) -> None:
        for inner in _memory_holders(tensor):
            self._track_storage(inner.untyped_storage())

    def _track_storage(self, storage) -> None:
        key = id(storage)
        if key in self._storages and self._storages[key][0]() is storage:
            return
        # mutable: a resize changes what the release subtracts; [bytes, block id, bytes requested]
        record = [self._size(storage), self._new_block(storage.nbytes()), storage.nbytes()]

        def release(_ref, key=key, record=record) -> None:
            entry = self._storages.get(key)
            if entry is not None and entry[0] is _ref:
                del self._storages[key]
                self.live_bytes -= record[0]
                self._free_block(record)

        self._storages[key] = (weakref.ref(storage, release), record)
        self.live_bytes += record[0]
        self._update_peaks()

    def _new_block(self, nbytes: int) -> int:
        self._next_block += 1
        if self.events is not None and nbytes:
            self.events.append(("alloc", self._next_block, nbytes))
        return self._next_block

    def _free_block(self, record: list[int]) -> None:
        if self.events is not None and record[2]:
            self.events.append(("free", record[1], record[2]))

    def _resized(self, storage) -> None:
        """FSDP2 frees and re-allocates unsharded parameters by resizing their storages in place."""
        entry = self._storages.get(id(storage))
        if entry is None or entry[0]() is not storage:
            self._track_storage(storage)
            return
        record = entry[1]
        new_size = self._size(storage)
        self.live_bytes += new_size - record[0]
        record[0] = new_size
        # the allocator sees a resize as a free of the old block and a new one
        self._free_block(record)
        record[1], record[2] = self._new_block(storage.nbytes()), storage.nbytes()
        self._update_peaks()

    def __enter__(self):
        # UntypedStorage.resize_ does not go through the dispatcher: wrap it while tracking
        # (as torch.distributed._tools.mem_tracker does).
        self._original_resize = torch.UntypedStorage.resize_
        original, tracker = self._original_resize, self

        def resize_(storage, size):
            result = original(storage, size)
            tracker._resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc_info):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc_info)

    def _update_peaks(self) -> None:
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
        activations = self.live_bytes - self.static_bytes - self.gradient_bytes
        if activations > self.peak_activation_bytes:
            self.peak_activation_bytes = activations

    def storage_bytes(self, tensors) -> int:
        """Bytes of the distinct storages behind ``tensors`` (as this tracker counts them)."""
        seen: dict[int, int] = {}
        for tensor in tensors:
            if tensor is not None:
                for inner in _memory_holders(tensor):
                    storage = inner.untyped_storage()
                    seen[id(storage)] = self._size(storage)
        return sum(seen.values())

    @contextlib.contextmanager
    def untracked(self):
        """Ops run here are not counted (activation offloading's pinned host copies)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def reset_peaks(self) -> None:
        self.peak_bytes = self.live_bytes
        self.peak_activation_bytes = max(0, self.live_bytes - self.static_bytes - self.gradient_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor a torch.optim optimizer keeps in its per-parameter state (moments, step counters)."""
    return [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]
