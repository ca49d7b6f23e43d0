"""The one result shape every estimator returns and every renderer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from memcalc.config import ModelConfig
from memcalc.estimate.params import ParamInventory

if TYPE_CHECKING:
    from memcalc.estimate.assumptions import TrainAssumptions
    from memcalc.estimate.inference import InferAssumptions


class Kind(StrEnum):
    """The seed's classification: static memory lives for the whole run, dynamic memory
    grows and shrinks with each step (and with batch and sequence)."""

    STATIC = "static"
    DYNAMIC = "dynamic"
    RUNTIME = "runtime"  # outside PyTorch's allocator (CUDA context, library workspaces): added to the peak


# Component.location of CUDA managed (unified) memory: on the GPU while resident, outside PyTorch's
# allocator, and moved to the host under pressure (bitsandbytes' paged optimizer states).
MANAGED = "gpu-managed"


@dataclass(frozen=True)
class Component:
    key: str  # JSON key
    label: str  # table row
    bytes: int
    kind: Kind
    formula: str  # how the bytes were obtained, in the terms of the assumptions panel
    source: str  # paper or framework file the formula comes from
    location: str = "gpu"  # "cpu": offloaded to host memory; MANAGED: CUDA managed memory on the GPU


@dataclass(frozen=True, eq=False, repr=False)  # compared by identity: no generated __eq__ or __repr__ (start-up)
class RankView:
    """What one rank of a parallel layout holds: its components and the live bytes of each phase."""

    name: str  # "all ranks", "first stage", "last stage"
    pipeline_rank: int
    parameters: int  # parameters this rank holds before ZeRO sharding
    components: tuple[Component, ...]
    phases: dict[str, int]
    references: tuple[Component, ...] = ()

    @property
    def total(self) -> int:
        return max(self.phases.values())

    @property
    def cpu_total(self) -> int:
        return sum(component.bytes for component in self.components if component.location == "cpu")


@dataclass(frozen=True, eq=False, repr=False)  # compared by identity: no generated __eq__ or __repr__ (start-up)
class Estimate:
    model: ModelConfig
    params: ParamInventory
    settings: TrainAssumptions | InferAssumptions  # every resolved assumption (memcalc.estimate.assumptions)
    components: tuple[Component, ...]
    # Reference figures shown beside the breakdown but not part of it (e.g. the 1.2x rule).
    references: tuple[Component, ...] = ()
    checkpoint: tuple[Component, ...] = field(default=())
    # Live bytes at the peak of each phase of a training step; empty when the components coexist
    # (inference), in which case the total is their sum.
    phases: dict[str, int] = field(default_factory=dict)
    # Training under a parallel layout: every distinct rank (first and last pipeline stage); the
    # components and phases above are the most loaded one's.
    ranks: tuple[RankView, ...] = ()

    @property
    def cpu_total(self) -> int:
        """Host memory this rank's offloaded state takes."""
        return sum(component.bytes for component in self.components if component.location == "cpu")

    @property
    def managed_bytes(self) -> int:
        """CUDA managed memory this rank keeps on the GPU, outside the allocator."""
        return sum(component.bytes for component in self.components if component.location == MANAGED)

    @property
    def runtime_bytes(self) -> int:
        return sum(component.bytes for component in self.components if component.kind is Kind.RUNTIME)

    @property
    def peak_allocated(self) -> int:
        """The peak of what PyTorch allocates (what max_memory_allocated measures)."""
        if self.phases:
            return max(self.phases.values())
        return sum(component.bytes for component in self.components
                   if component.location == "gpu" and component.kind is not Kind.RUNTIME)

    @property
    def total(self) -> int:
        """The allocated peak, in every command: live tensors, what max_memory_allocated counts.
        What the allocator reserves and what the device holds beyond it: memcalc.estimate.device."""
        return self.peak_allocated

    @property
    def peak_phase(self) -> str | None:
        return max(self.phases, key=self.phases.__getitem__) if self.phases else None

    def component(self, key: str) -> Component:
        for component in (*self.components, *self.references, *self.checkpoint):
            if component.key == key:
                return component
        raise KeyError(key)
