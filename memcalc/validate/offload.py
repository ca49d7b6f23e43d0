"""Activation offloading to host memory, as torchtune runs it, for the measurement harness.

``OffloadActivations`` mirrors torchtune's class of the same name
(``torchtune/training/_activation_offloading.py``, read at meta-pytorch/torchtune 3c1872a;
``use_streams=True``, its defaults ``min_offload_size=1024`` and ``max_fwd_stash_size=5``), a
``saved_tensors_hooks`` context around the model's forward. Its memory rules, which this class
keeps line for line:

- pack: every saved tensor of at least ``min_offload_size`` bytes (``element_size() * nelement()``)
  that is not an ``nn.Parameter`` or ``nn.Buffer`` is copied into a host tensor (``empty_like``
  on the CPU, pinned there) and its device reference is kept in a forward stash until a tensor
  ``max_fwd_stash_size`` ids later is packed (the copy stream's lag; ids count every saved
  tensor, offloaded or not); smaller tensors and parameters stay saved as they are. A linear
  layer saves ``weight.t()``, a view and not a Parameter, so its weight is copied too (its device
  storage stays: the parameter holds it); a tensor saved by several ops is copied once per save.
- unpack: a tensor still in the forward stash is used from it; any other is copied back to the
  device and held in a backward stash until the next autograd node that brings back a tensor
  has run (a post-hook per node), or, if its storage gained a reference meanwhile (a view of it
  among the node's outputs, or a checkpoint's recomputed tensors: torchtune compares the storage's
  use count; older releases tested the node's outputs only), released to its other holders.
  Nothing is prefetched: a tensor comes back when its node unpacks it.
  The first node that brings back a tensor empties the forward stash; the end of backward
  empties the backward stash.

``keep_on_device`` is torchtune's ``NoOpManager``: ``get_act_offloading_ctx_manager`` runs the
output projection under it, so the head's saved tensors (its input) stay on the device.

Simplified: no streams or events exist here (fake tensors have no time), so a tensor lives
exactly as long as torchtune's Python references keep it, which is what bounds the device
memory; ``record_stream``'s delay (a block freed only once the compute stream passes it) is
not modelled, nor the host-memory warning. Host copies are made outside the tracker (they are
host memory) and counted in ``host_bytes``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

# torchtune's defaults (OffloadActivations.__init__)
MIN_OFFLOAD_BYTES = 1024
MAX_FWD_STASH_SIZE = 5


def _storage_uses(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def _is_state(tensor: torch.Tensor) -> bool:
    """torchtune's test for what is not an activation: a Parameter or a Buffer, by type."""
    return isinstance(tensor, nn.Parameter) or (hasattr(nn, "Buffer") and isinstance(tensor, nn.Buffer))


class OffloadActivations(saved_tensors_hooks):
    """torchtune's ``OffloadActivations(use_streams=True)`` on the tracker's device."""

    def __init__(self, tracker, min_offload_size: int = MIN_OFFLOAD_BYTES,
                 max_fwd_stash_size: int = MAX_FWD_STASH_SIZE) -> None:
        self.min_tensor_size_bytes = min_offload_size
        self.max_fwd_stash_size = max_fwd_stash_size
        # tensor id -> (tensor, its device when it was offloaded, else None); torchtune's ``tracker``
        self.tracker: dict[int, tuple[torch.Tensor, torch.device | None]] = {}
        self.tensor_id = 0
        self.fwd_stash: dict[int, torch.Tensor] = {}
        self.bwd_tensor_stash: dict[int, torch.Tensor] = {}
        self.is_first_backward_call = True
        self.curr_graph_id = None
        self.curr_autograd_node = None
        self.host_bytes = 0  # live host copies
        self.peak_host_bytes = 0
        self.offloaded_bytes = 0  # every copy made to the host, summed
        live = tracker

        def pack_tensor(activation: torch.Tensor) -> int:
            self.is_first_backward_call = True
            num_bytes = activation.element_size() * activation.nelement()
            self.tensor_id += 1
            tensor_id = self.tensor_id
            if num_bytes >= self.min_tensor_size_bytes and not _is_state(activation):
                for stashed in list(self.fwd_stash):  # the copies of ``max_fwd_stash_size`` ids ago are done
                    if stashed <= tensor_id - self.max_fwd_stash_size:
                        del self.fwd_stash[stashed]
                    else:
                        break
                with live.untracked():  # pinned host memory, not the device's
                    host = torch.empty_like(activation, device="cpu")
                    host.copy_(activation)
                self.host_bytes += num_bytes
                self.offloaded_bytes += num_bytes
                self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
                self.tracker[tensor_id] = (host, activation.device)
                self.fwd_stash[tensor_id] = activation  # alive until the copy stream is done with it
            else:
                self.tracker[tensor_id] = (activation, None)
            return tensor_id

        def unpack_tensor(unpack_tensor_id: int) -> torch.Tensor:
            if self.is_first_backward_call:
                self.curr_graph_id = torch._C._current_graph_task_id()

                def wait_and_del_remaining_references() -> None:
                    self.bwd_tensor_stash.clear()

                torch.autograd.Variable._execution_engine.queue_callback(wait_and_del_remaining_references)
                self.is_first_backward_call = False
            tensor, device = self.tracker[unpack_tensor_id]
            if device is not None:
                graph_id = torch._C._current_graph_task_id()
                node = torch._C._current_autograd_node()
                prev_node_ids: list[int] = []
                if graph_id == self.curr_graph_id and self.curr_autograd_node != node:
                    self.curr_autograd_node = node
                    prev_node_ids = list(self.bwd_tensor_stash)
                self.host_bytes -= tensor.element_size() * tensor.nelement()  # the host copy is dropped
                brought_back = unpack_tensor_id not in self.fwd_stash
                if not brought_back:
                    tensor = self.fwd_stash[unpack_tensor_id]
                else:
                    tensor = tensor.to(device, copy=True)  # tracked: device memory again
                    self.bwd_tensor_stash[unpack_tensor_id] = tensor
                    uses = _storage_uses(tensor)

                def hook(outputs, inputs):
                    if brought_back:
                        unpacked = self.bwd_tensor_stash[unpack_tensor_id]
                        if _storage_uses(unpacked) > uses:  # record_stream: its other holders keep it
                            del self.bwd_tensor_stash[unpack_tensor_id]
                    self.fwd_stash.clear()
                    for stale in prev_node_ids:
                        self.bwd_tensor_stash.pop(stale, None)
                    return outputs

                node.register_hook(hook)
            del self.tracker[unpack_tensor_id]
            return tensor

        super().__init__(pack_tensor, unpack_tensor)


def keep_on_device() -> saved_tensors_hooks:
    """torchtune's ``NoOpManager``: the innermost hooks win, so the region saves as without them."""
    return saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor)
