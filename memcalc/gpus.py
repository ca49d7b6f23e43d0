"""The GPU catalogue (``configs/gpus.yaml``): one source for memory sizes and throughput.

Two memory figures per card (docs/gpus.md): ``memory_gib``, memory as sold, and ``usable_bytes``,
the total the CUDA (or HIP) runtime reports, which is what a process can ever allocate from.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache

from memcalc.bounds import PositiveInt
from memcalc.errors import InputError
from memcalc.library import read_yaml, configs_dir

# Without a measured ``usable_bytes``, a card is taken to lose 2% of its memory as sold to the
# driver and ECC (docs/gpus.md). Every card measured loses less (NVIDIA HBM from 0.85%, H200, to
# 1.52%, A100 40GB; RTX 4090 1.46%; MI300X 16 MiB) but GDDR with ECC on, which keeps 1/16 of the
# memory for check bits (L40S: 7.7% below 48 GiB): such a card needs a measured figure.
USABLE_FALLBACK_RESERVE = 0.02


@dataclass(frozen=True, kw_only=True)
class GPUSpec:
    name: str
    aliases: tuple[str, ...] = ()
    vendor: str
    architecture: str
    memory_gib: float  # as sold: a datasheet's "80 GB" of HBM is 80 x 2^30 bytes
    bf16_dense_tflops: float
    fp8: bool  # FP8 tensor cores (Hopper, Ada, Blackwell, CDNA3)
    mxfp8: bool  # block-scaled MXFP8 (Blackwell)
    intra_node_gbps: float  # GPU-to-GPU bandwidth inside a node, GB/s per GPU
    source: str
    # Total device memory as the runtime reports it: cudaMemGetInfo's total, equal to
    # cudaDeviceProp.totalGlobalMem and torch.cuda.get_device_properties(i).total_memory (HIP's on
    # AMD). Below memory_gib by what the driver keeps and, on GDDR with ECC, the check bits; it moves
    # by a few MiB between driver versions. None: not measured, USABLE_FALLBACK_RESERVE applies.
    usable_bytes: PositiveInt | None = None
    usable_source: str | None = None  # where the figure was printed, by which API and driver

    def __post_init__(self) -> None:
        if self.usable_bytes is not None:
            if not self.usable_source:
                raise ValueError("usable_bytes needs a usable_source (where the figure was printed)")
            if self.usable_bytes > self.memory_bytes:
                raise ValueError(f"usable_bytes ({self.usable_bytes}) exceeds memory_gib x 2^30 "
                                 f"({self.memory_bytes})")
        elif self.usable_source is not None:
            raise ValueError("usable_source without usable_bytes")

    @property
    def memory_bytes(self) -> int:
        """Memory as sold, in bytes."""
        return round(self.memory_gib * 2**30)

    @property
    def usable_memory_bytes(self) -> int:
        """What the runtime reports as the device's total: the measured ``usable_bytes``, else
        memory as sold less USABLE_FALLBACK_RESERVE (rounded down to whole MiB)."""
        if self.usable_bytes is not None:
            return self.usable_bytes
        kept = self.memory_bytes - round(self.memory_bytes * USABLE_FALLBACK_RESERVE)
        return kept // 2**20 * 2**20

    @property
    def keeps_fp8_transpose(self) -> bool:
        """Whether FP8 training keeps a transposed FP8 copy of each weight: Hopper and Ada GEMMs
        need a K-major FP8 operand in both directions (Transformer Engine, TE#1261); Blackwell's
        tensor cores read either layout, so one FP8 copy serves both."""
        return "blackwell" not in self.architecture.lower()


@cache
def gpu_catalogue() -> dict[str, GPUSpec]:
    from memcalc.config import parse

    path = configs_dir() / "gpus.yaml"
    entries = read_yaml(path)
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected a list of GPUs")
    specs = [parse(GPUSpec, entry, f"{path}: GPU {index + 1}") for index, entry in enumerate(entries)]
    return {spec.name: spec for spec in specs}


def resolve_gpu(reference: str) -> GPUSpec:
    """A catalogue name or alias, case-insensitive; unknown names get close suggestions."""
    index = {}
    for spec in gpu_catalogue().values():
        for key in (spec.name, *spec.aliases):
            index[key.lower()] = spec
    if reference.lower() in index:
        return index[reference.lower()]
    close = difflib.get_close_matches(reference.lower(), list(index), n=3, cutoff=0.5)
    names = list(dict.fromkeys(index[match].name for match in close))
    hint = f"; did you mean {', '.join(names)}?" if names else ""
    raise InputError(f"unknown GPU {reference!r}{hint} (`memcalc gpus` lists the catalogue)")
