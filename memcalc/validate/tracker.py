"""Counting live tensor memory: on fake tensors (CPU, no real memory), on the CPU, or on CUDA.

``LiveBytesTracker`` is a ``TorchDispatchMode`` that registers the storage of every tensor an
operator returns and subtracts it when the storage is freed (a weak-reference callback), so it
sees exactly what the program allocates, whatever the device. Gradients are told apart by
post-accumulate hooks on the parameters; the static state (parameters, buffers, optimizer states)
is registered by the runner.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# The CUDA caching allocator rounds every block up to a multiple of 512 bytes
# (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize).
CUDA_BLOCK_BYTES = 512


@dataclass
class PhaseRecord:
    """Live bytes when the phase ends, the peak during it, and the peak of activations
    (live bytes less static state and accumulated gradients)."""

    end_bytes: int = 0
    peak_bytes: int = 0
    peak_activation_bytes: int = 0
    cuda_peak_bytes: int | None = None
    cuda_reserved_bytes: int | None = None


class LiveBytesTracker(TorchDispatchMode):
    def __init__(self, round_to: int = 1) -> None:
        super().__init__()
        self.round_to = round_to  # 512 mimics the CUDA allocator's block rounding
        self.live_bytes = 0
        self.peak_bytes = 0
        self.static_bytes = 0  # parameters, buffers, master copies, optimizer states
        self.gradient_bytes = 0  # gradients accumulated so far
        self.peak_activation_bytes = 0
        self._storages: dict[int, tuple[weakref.ref, int]] = {}

    def _size(self, storage) -> int:
        nbytes = storage.nbytes()
        return -(-nbytes // self.round_to) * self.round_to if self.round_to > 1 else nbytes

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._storages and self._storages[key][0]() is storage:
            return
        size = self._size(storage)

        def release(_ref, key=key, size=size) -> None:
            entry = self._storages.get(key)
            if entry is not None and entry[0] is _ref:
                del self._storages[key]
                self.live_bytes -= size

        self._storages[key] = (weakref.ref(storage, release), size)
        self.live_bytes += size
        self._update_peaks()

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
                storage = tensor.untyped_storage()
                seen[id(storage)] = self._size(storage)
        return sum(seen.values())

    def reset_peaks(self) -> None:
        self.peak_bytes = self.live_bytes
        self.peak_activation_bytes = max(0, self.live_bytes - self.static_bytes - self.gradient_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out
