"""Exact parameter counts from the architecture, tensor by tensor.

The counts are read from the tensor inventory (``memcalc.estimate.inventory``), which mirrors the
tensors of the reference implementations (Hugging Face ``modeling_*.py``; fused projections such
as Phi-3's ``qkv_proj`` hold the same elements as separate ones), so ``total`` equals
``sum(p.numel() for p in model.parameters())``. Per-tensor sizes matter beyond the total: 8-bit
optimizers keep small tensors in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from memcalc.config import ModelConfig
from memcalc.estimate.inventory import ParamCategory, build_inventory

__all__ = ["ParamCategory", "ParamInventory", "TensorGroup", "count_params", "group_tensors",
           "parameter_sizes_in_order"]


@dataclass(frozen=True)
class TensorGroup:
    """``count`` tensors of ``numel`` elements each, of which ``active_count`` serve one token."""

    name: str
    category: ParamCategory
    numel: int
    count: int
    active_count: int

    @property
    def total(self) -> int:
        return self.numel * self.count

    @property
    def active(self) -> int:
        return self.numel * self.active_count


@dataclass(frozen=True)
class ParamInventory:
    groups: tuple[TensorGroup, ...]

    @property
    def total(self) -> int:
        return sum(group.total for group in self.groups)

    @property
    def active(self) -> int:
        """Parameters one token passes through (MoE: only its top-k experts)."""
        return sum(group.active for group in self.groups)

    def by_category(self) -> dict[ParamCategory, int]:
        totals: dict[ParamCategory, int] = {}
        for group in self.groups:
            totals[group.category] = totals.get(group.category, 0) + group.total
        return totals


def group_tensors(tensors, numel=lambda tensor: tensor.numel, count=lambda tensor: tensor.count) -> ParamInventory:
    """Tensors of one name summed over the layers, in the order each name first appears.
    ``numel`` and ``count`` give a tensor's local share (a TP rank's slice, an EP rank's experts)."""
    groups: dict[str, list] = {}
    for tensor in tensors:
        copies = count(tensor)
        if not copies:
            continue
        entry = groups.get(tensor.name)
        active = min(tensor.active_count, copies)
        if entry is None:
            groups[tensor.name] = [tensor.category, numel(tensor), copies, active]
        else:
            entry[2] += copies
            entry[3] += active
    return ParamInventory(tuple(TensorGroup(name, category, size, copies, active)
                                for name, (category, size, copies, active) in groups.items()))


def count_params(model: ModelConfig) -> ParamInventory:
    """Every parameter tensor of ``model``, grouped by name and role over the layers
    (``memcalc.estimate.inventory.build_inventory``)."""
    return group_tensors(build_inventory(model).tensors_in_order())


def parameter_sizes_in_order(model: ModelConfig) -> list[int]:
    """Element counts of the parameters in the reference decoder's ``parameters()`` order
    (embedding first, then each layer's norm, attention, norm, MLP, then the final norm and the
    output head; multi-head latent attention in transformers' order: q_proj or q_a_proj,
    q_a_layernorm, q_b_proj, then kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj).
    Per-tensor loops (a master-weight gradient conversion, a for-loop optimizer) visit tensors in
    this order; Hugging Face's Llama registers a layer's norms after its MLP,
    which moves the peak by a few hidden-size vectors at most."""
    sizes: list[int] = []
    for tensor in build_inventory(model).tensors_in_order():
        sizes += [tensor.numel] * tensor.count
    return sizes
