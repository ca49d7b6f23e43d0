"""What the GPU holds beyond live tensors, and the three totals every command reports:

- ``peak_allocated``: live tensor bytes at the peak, what ``torch.cuda.max_memory_allocated``
  counts (the estimators' ``Estimate.total``);
- ``peak_reserved``: what PyTorch's caching allocator holds at that peak
  (``torch.cuda.max_memory_reserved``): the allocated bytes plus the segments' unused space;
- ``device_total``: reserved plus the runtime overhead (the CUDA context and NCCL's buffers outside
  the allocator, the cuBLAS workspaces it holds beside the estimated peak): what nvidia-smi shows for the process and what must fit in the
  GPU's usable capacity (memcalc.gpus, ``usable_memory_bytes``). CUDA managed memory (bitsandbytes'
  paged optimizer states) is outside both the allocator and what must fit: it stays on the GPU while
  there is room and moves to the host under pressure; ``managed`` reports it.

The allocator's reserve comes from replaying allocation traces through a model of the caching
allocator (memcalc.allocator; docs/allocator.md): every run of the accuracy suite
(benchmarks/accuracy.py, 64 training steps and 10 generate() runs on fake tensors) records each
storage's allocation and free, and the suite replays that trace with PyTorch's default settings
and with expandable segments (rows ``reserved_simulated*`` of benchmarks/results/accuracy_fake.csv).
The medians per kind of workload are the terms below; a test recomputes them from the CSV. A
single run's own figure can differ from the median: docs/accuracy.md shows each.
"""

from __future__ import annotations

from dataclasses import dataclass

from memcalc.config import Recompute
from memcalc.estimate.assumptions import TrainAssumptions
from memcalc.estimate.breakdown import Estimate

MiB = 2**20

# Medians over the accuracy suite's traces of (simulated reserved - cuBLAS workspaces) / allocated
# - 1, in percent: the default allocator and PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.
# Activation offloading's steps are their own kind: their brought-back tensors come and go in
# many sizes, so they fragment more.
FRAGMENTATION_PERCENT = {"train": 5.33, "train-full-recompute": 9.16, "infer": 5.66, "train-offload": 12.96}
EXPANDABLE_FRAGMENTATION_PERCENT = {"train": 2.16, "train-full-recompute": 1.3, "infer": 1.3, "train-offload": 1.57}

# Beyond the allocated peak, per GPU process. CUDA context with lazy module loading (the default since
# CUDA 11.7 / PyTorch 1.13): 287 MB measured in pytorch PR #86509, "around 400MB" (pytorch issue
# #109888), 426 MiB on an RTX 6000 Ada with torch 2.10 (docs/gpus.md); memcalc takes 400 MiB.
# cuBLAS keeps a 32 MiB workspace per handle and stream on Hopper and newer
# (aten/src/ATen/cuda/CublasHandlePool.cpp, getChosenWorkspaceSize; 8.125 MiB on older GPUs).
# The workspace is allocated through the caching allocator, one per (handle, stream): a training
# step has two, the forward on the main thread and backward on the autograd engine's device thread
# (what memcalc validate measures on CUDA); the estimators' peaks leave them out.
CUDA_CONTEXT_BYTES = 400 * MiB
CUBLAS_WORKSPACE_BYTES = 32 * MiB
TRAINING_WORKSPACES = 2

# NCCL's buffers per communicator a rank belongs to, with NCCL's defaults (NCCL_BUFFSIZE 4 MiB per
# channel and peer): measured on 4 x A100 with NVLink at 544 MB for a 2-rank communicator and
# 688 MB for a larger one (NVIDIA/nccl issue #964). They grow with the channel count, so other
# interconnects differ; the figure is an approximation, stated as such in the table.
NCCL_PAIR_BYTES = 544 * 10**6
NCCL_GROUP_BYTES = 688 * 10**6


@dataclass(frozen=True, eq=False, repr=False)
class DeviceMemory:
    peak_allocated: int
    fragmentation_percent: float  # the allocator's reserve over the allocated peak
    workload: str  # the FRAGMENTATION_PERCENT key used
    expandable_segments: bool
    cuda_context: int
    workspaces: int
    nccl: int
    communicators: tuple[int, ...]  # the sizes of the NCCL communicators counted
    # CUDA managed memory (bitsandbytes' paged states): on the GPU while there is room, moved to the
    # host under pressure, so outside what must fit; shown beside the device total
    managed: int = 0
    reserve_source: str | None = None  # a measured reserve's file (memcalc calibrate), else the median

    @property
    def peak_reserved(self) -> int:
        return self.peak_allocated + round(self.peak_allocated * self.fragmentation_percent / 100)

    @property
    def allocator_reserve(self) -> int:
        return self.peak_reserved - self.peak_allocated

    @property
    def runtime_overhead(self) -> int:
        """Beyond the estimated peak: the CUDA context, cuBLAS workspaces and NCCL buffers."""
        return self.cuda_context + self.workspaces + self.nccl

    @property
    def device_total(self) -> int:
        return self.peak_reserved + self.runtime_overhead


def nccl_bytes(communicators: tuple[int, ...]) -> int:
    return sum(NCCL_PAIR_BYTES if size == 2 else NCCL_GROUP_BYTES for size in communicators)


def _training_communicators(settings: TrainAssumptions) -> tuple[int, ...]:
    """The communicators one rank of the layout joins: data parallel (gradients, over dp x cp),
    tensor, context and expert parallel groups, and one pipeline neighbour pair."""
    layout = settings.parallel
    if layout is None:
        return ()
    sizes = [layout.dp * layout.cp, layout.tp, layout.cp, layout.ep, 2 if layout.pp > 1 else 1]
    return tuple(size for size in sizes if size > 1)


def device_memory(estimate: Estimate) -> DeviceMemory:
    """The three totals of ``estimate`` on one GPU of its layout (the most loaded), with the
    allocator its settings name (``expandable_segments``)."""
    settings = estimate.settings
    expandable_segments = settings.expandable_segments
    if not isinstance(settings, TrainAssumptions):  # memcalc.estimate.inference's InferAssumptions
        workload = "infer"
        communicators = (settings.tp,) if settings.tp > 1 else ()
        # the estimate's own runtime line: the default context + workspace, or --overhead
        context, workspaces = estimate.runtime_bytes, 0
    else:
        workload = ("train-offload" if settings.offload_activations
                    else "train-full-recompute" if settings.recompute is Recompute.FULL else "train")
        communicators = _training_communicators(settings)
        context, workspaces = CUDA_CONTEXT_BYTES, TRAINING_WORKSPACES * CUBLAS_WORKSPACE_BYTES
    table = EXPANDABLE_FRAGMENTATION_PERCENT if expandable_segments else FRAGMENTATION_PERCENT
    reserve, reserve_source = table[workload], None
    if isinstance(settings, TrainAssumptions) and settings.reserve_percent is not None:
        reserve, reserve_source = settings.reserve_percent, settings.reserve_source or "a calibration"
    return DeviceMemory(estimate.total, reserve, workload, expandable_segments, context, workspaces,
                        nccl_bytes(communicators), communicators, estimate.managed_bytes, reserve_source)


def fits(memory: DeviceMemory, gpu) -> bool:
    """Whether the device total fits in the GPU's usable capacity (memcalc.gpus)."""
    return memory.device_total <= gpu.usable_memory_bytes


def allocated_limit(memory: DeviceMemory, capacity: int) -> int:
    """The largest allocated peak whose device total fits in ``capacity`` bytes, with the same
    reserve and outside-the-allocator terms: what a search over settings compares peaks with."""
    return int((capacity - memory.runtime_overhead) / (1 + memory.fragmentation_percent / 100))
