"""What would make a training step fit: each change the seed's optimisation path names, applied
alone to the same settings and priced by the same estimator as ``memcalc train``.

The order is the seed's: more GPUs and parallelism, lower-precision types, recomputation, offload,
fused kernels. Each suggestion carries the memory it saves on the most loaded GPU and its cost in
compute or communication (docs/plan.md gives the step-time model behind the costs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from memcalc.config import Attention, Loss, ModelConfig, Optimizer, OptimizerImpl, Recompute, TrainSettings
from memcalc.errors import InputError
from memcalc.parallel import Offload, ParallelConfig


@dataclass(frozen=True)
class Suggestion:
    group: str  # parallelism, precision, recompute, offload, kernels
    change: str  # the flags to add, e.g. "--zero 3"
    total: int  # the most loaded GPU's peak with the change
    saved: int  # bytes saved against the current settings
    fits: bool
    cost: str  # what it costs: compute, communication or accuracy


def _variants(model: ModelConfig, settings: TrainSettings, parallel: ParallelConfig
              ) -> Iterator[tuple[str, str, Callable[[], tuple[TrainSettings, ParallelConfig]], str]]:
    dp, data_ranks = parallel.dp, parallel.data_ranks
    # 1. More GPUs and parallelism
    if data_ranks > 1 and parallel.zero < 3 and not parallel.distributed_optimizer and parallel.pp == 1:
        for stage in range(parallel.zero + 1, 4):
            yield ("parallelism", f"--zero {stage}", lambda stage=stage: (settings, replace(parallel, zero=stage)),
                   "ZeRO-3 all-gathers parameters in forward and backward: 1.5x the data-parallel traffic"
                   if stage == 3 else "reduce-scatter instead of all-reduce: no extra traffic")
    for factor in (2, 4, 8):
        tp = parallel.tp * factor
        if tp <= 8 and model.num_attention_heads % tp == 0 and model.kv_heads % tp == 0:
            yield ("parallelism", f"--tp {tp} --sp (x{factor} GPUs)",
                   lambda tp=tp: (settings, replace(parallel, tp=tp, sp=True)),
                   "per-layer all-gathers and reduce-scatters of the activations inside a node")
            break
    if parallel.zero == 0 and not parallel.distributed_optimizer:
        yield ("parallelism", f"--dp {max(dp, 1) * 8} --fsdp full (x8 GPUs)",
               lambda: (settings, replace(parallel, dp=max(dp, 1) * 8, zero=3, fsdp=True)),
               "FSDP all-gathers parameters per layer (1.5x DDP traffic)")
    # 2. Lower-precision types
    if settings.precision is None and settings.master_weights and settings.dtype.value != "fp32":
        yield ("precision", "--no-master-weights (pure 16-bit)",
               lambda: (replace(settings, master_weights=False), parallel),
               "no fp32 master copy: small updates can round away (Micikevicius et al. 2018)")
    if settings.optimizer in (Optimizer.ADAMW, Optimizer.ADAM):
        yield ("precision", "--optimizer adam8bit", lambda: (replace(settings, optimizer=Optimizer.ADAM8BIT), parallel),
               "block-wise 8-bit moments (Dettmers et al. 2022): quantisation error in the states")
    # 3. Recomputation
    if settings.recompute is Recompute.NONE:
        yield ("recompute", "--recompute selective",
               lambda: (replace(settings, recompute=Recompute.SELECTIVE), parallel),
               "recomputes attention: about 2-4% more FLOPs (Korthikanti et al. 2022)")
    if settings.recompute in (Recompute.NONE, Recompute.SELECTIVE) and settings.lora_rank is None:
        yield ("recompute", "--recompute op",
               lambda: (replace(settings, recompute=Recompute.OP), parallel),
               "torchtitan's per-op policy: about half the layers' matmuls run again in backward")
    if settings.recompute is not Recompute.FULL or settings.recompute_layers > 1:
        yield ("recompute", "--recompute full", lambda: (replace(settings, recompute=Recompute.FULL, recompute_layers=1,
                                                                 sac_save=None), parallel),
               "one extra forward per step: about 33% more FLOPs")
    # 4. Offload
    if parallel.offload is Offload.NONE and parallel.zero >= 1 and not parallel.distributed_optimizer:
        yield ("offload", "--offload optimizer", lambda: (settings, replace(parallel, offload=Offload.OPTIMIZER)),
               "gradients to and parameters from the host every step over PCIe; the step runs on the CPU")
    if parallel.zero == 3 and not parallel.offloads_params:
        yield ("offload", "--offload params", lambda: (settings, replace(parallel, offload=Offload.PARAMS)),
               "every layer's parameters cross PCIe twice per step")
    # 5. Fused kernels
    if settings.attention is Attention.EAGER:
        yield ("kernels", "--attention flash", lambda: (replace(settings, attention=Attention.FLASH), parallel),
               "none: a fused kernel keeps no a*s^2 scores")
    if settings.loss is Loss.FULL:
        yield ("kernels", "--loss chunked", lambda: (replace(settings, loss=Loss.CHUNKED), parallel),
               "none: the logits are computed and freed a chunk at a time")
    if settings.optimizer_impl is OptimizerImpl.FOREACH and settings.optimizer in (Optimizer.ADAMW, Optimizer.ADAM):
        yield ("kernels", "--optimizer-impl fused",
               lambda: (replace(settings, optimizer_impl=OptimizerImpl.FUSED), parallel),
               "none: the fused step allocates no state-sized temporaries")


def advise(model: ModelConfig, settings: TrainSettings, parallel: ParallelConfig, capacity: int) -> list[Suggestion]:
    """Every single change that lowers the most loaded GPU's peak, in the seed's order."""
    from memcalc.estimate.training import estimate_training

    current = estimate_training(model, settings, parallel).total
    suggestions = []
    for group, change, build, cost in _variants(model, settings, parallel):
        try:
            variant_settings, variant_parallel = build()
            total = estimate_training(model, variant_settings, variant_parallel).total
        except (InputError, ValueError):
            continue  # the change is not a valid layout for this model
        if total < current:
            suggestions.append(Suggestion(group, change, total, current - total, total <= capacity, cost))
    return suggestions
