"""The GPU catalogue (``configs/gpus.yaml``): one source for memory sizes and throughput."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache

from memcalc.errors import InputError
from memcalc.library import read_yaml, configs_dir


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

    @property
    def memory_bytes(self) -> int:
        return round(self.memory_gib * 2**30)

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
