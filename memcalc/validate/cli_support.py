"""The validate command's work: choose the device, refuse what cannot fit, run, clean up.

Kept apart from ``memcalc.cli`` so the CLI module itself never imports torch.
"""

from __future__ import annotations

import gc
from dataclasses import replace

from memcalc.config import InferSettings, ModelConfig, Optimizer, TrainSettings, resolve_seq_len
from memcalc.errors import InputError, MemcalcError
from memcalc.estimate.breakdown import Estimate
from memcalc.validate import require_torch
from memcalc.validate.compare import Comparison, compare_inference, compare_training

# Refuse a CUDA run whose estimate leaves less than this share of free memory unused: the
# estimate of what the allocator reserves is a median (memcalc.estimate.device), not this run's.
CUDA_SAFETY_MARGIN = 0.10


class OutOfMemory(MemcalcError):
    exit_code = 1


def with_layers(model: ModelConfig, num_layers: int | None) -> ModelConfig:
    """The same architecture with ``num_layers`` layers (a cheaper run of the same blocks)."""
    if num_layers is None:
        return model
    moe = model.moe
    if moe is not None and moe.first_dense_layers > num_layers:
        moe = replace(moe, first_dense_layers=num_layers)
    if moe is not None and moe.layers:
        # the first num_layers layers, as memcalc.validate.hf.reduce_layers cuts the config.json
        kept = tuple(index for index in moe.layers if index < num_layers)
        moe = replace(moe, layers=kept) if kept else None
    return replace(model, num_layers=num_layers, moe=moe, layer_types=model.layer_types[:num_layers],
                   name=f"{model.name} ({num_layers} layers)")


def resolve_device(device: str) -> str:
    torch = require_torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "fake"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device fake to measure on the CPU)")
    return device


def check_fits(estimate: Estimate, force: bool) -> None:
    torch = require_torch()
    from memcalc.estimate.device import device_memory

    free, _total = torch.cuda.mem_get_info()
    # what this process will reserve: the allocator's peak and the workspaces (the context exists already)
    memory = device_memory(estimate)
    needed = (memory.peak_reserved + memory.workspaces) * (1 + CUDA_SAFETY_MARGIN)
    if needed > free and not force:
        raise InputError(
            f"the estimate ({memory.peak_reserved / 2**30:.2f} GiB reserved + {CUDA_SAFETY_MARGIN:.0%} margin) "
            f"exceeds the {free / 2**30:.2f} GiB free on the GPU; use a smaller workload (--num-layers, --batch, "
            "--seq) or --force"
        )


def _measure(device: str, run):
    """Run, and on out-of-memory free everything before reporting: the exception's traceback would
    otherwise keep the run's tensors (and their GPU memory) alive."""
    torch = require_torch()
    message = None
    try:
        return run()
    except torch.OutOfMemoryError as exc:
        message = str(exc).splitlines()[0]
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    raise OutOfMemory(f"out of memory on {device}: {message}")


def run_inference_validation(
    model: ModelConfig, settings: InferSettings, estimate: Estimate, device: str, force: bool, progress=None,
    impl: str = "reference",
) -> Comparison:
    from memcalc.validate.run import TORCH_DTYPES, InferWorkload, measure_inference

    if settings.dtype.value not in TORCH_DTYPES or (settings.kv_dtype and settings.kv_dtype.value != settings.dtype.value):
        raise InputError("validation runs the reference model in fp32, fp16 or bf16 with a cache of the same dtype")
    if settings.prompt_len is None:
        raise InputError("--workload infer needs --prompt (and --max-new-tokens) to describe the generate() run")
    if device == "cuda":
        check_fits(estimate, force)
    if impl == "reference" and model.mla is not None:
        raise InputError("--workload infer: the reference decoder caches MLA's expanded keys and values; transformers 5 "
                         "caches the latent, as memcalc estimates: use --impl hf")
    if settings.weights not in (None, settings.dtype.value) or settings.tp > 1 or settings.engine.value != "hf":
        raise InputError("validation runs a Hugging Face style generate() of the reference model on one device: "
                         "--weights, --tp and --engine paged are estimated only")
    workload = InferWorkload(dtype=settings.dtype.value, batch_size=settings.batch_size, prompt_len=settings.prompt_len,
                             new_tokens=max(settings.max_new_tokens, 1), num_beams=settings.num_beams,
                             decoding=settings.resolved_decoding.value,
                             num_return_sequences=settings.num_return_sequences, top_k=settings.top_k,
                             top_p=settings.top_p, temperature=settings.temperature,
                             attention=settings.attention.value)
    mixer_kernels = _mamba_inference_kernels(model) if impl == "hf" and device == "fake" else None
    measurement = _measure(device, lambda: measure_inference(model, workload, device, progress, record=True,
                                                             impl=impl, mixer_kernels=mixer_kernels))
    return compare_inference(estimate, measurement)


def _mamba_inference_kernels(model: ModelConfig):
    """On fake tensors a Mamba mixer is measured through mamba_ssm's and causal_conv1d's own Python,
    as the estimate assumes a GPU with both installed runs it (transformers' torch scan holds several
    times more); None for a model without Mamba layers."""
    from memcalc.config import LayerType

    if model.mamba is None or LayerType.MAMBA not in model.resolved_layer_types:
        return None
    from memcalc.validate import mamba

    if not mamba.available():
        raise InputError("--workload infer --impl hf: Mamba mixers are measured through mamba_ssm's and "
                         "causal_conv1d's sources (with triton) on PYTHONPATH: see memcalc/validate/mamba.py")
    return mamba.mamba_inference_kernels()


def run_training_validation(
    model: ModelConfig, settings: TrainSettings, estimate: Estimate, device: str, force: bool, progress=None,
    impl: str = "reference",
) -> Comparison:
    if settings.optimizer is Optimizer.ADAM8BIT:
        raise InputError("--optimizer adam8bit cannot be measured here: bitsandbytes' kernels need a CUDA build")
    if impl == "hf" and settings.lora_rank is not None:
        raise InputError("LoRA is measured on the reference decoder: use --impl reference")
    if impl == "hf" and settings.offload_activations:
        raise InputError("--offload-activations is measured on the reference decoder: use --impl reference")
    from memcalc.estimate.training import with_dropout
    from memcalc.precision import recipe_for
    from memcalc.validate.run import TrainWorkload, measure_training

    recipe = recipe_for(settings.dtype, settings.master_weights, settings.precision)
    if impl == "hf":
        if (settings.loss.value == "chunked" or settings.recompute.value in ("selective", "op")
                or settings.recompute_layers > 1):
            raise InputError("--impl hf measures transformers' own loss and recompute: use --loss full and "
                             "--recompute none or full on every layer")
        if model.moe is not None and device == "fake":
            from memcalc.validate.hf import experts_routed_by_value

            why = experts_routed_by_value(recipe.weight_dtype)
            if why:
                raise InputError(f"--impl hf: {why}, which fake tensors do not have; use --device cuda or cpu, "
                                 "or --impl reference")
    model = with_dropout(model, settings)  # --dropout sets the rates the measured model runs with

    if device == "cuda":
        check_fits(estimate, force)
    workload = TrainWorkload(
        precision=recipe.name,
        optimizer=settings.optimizer.value,
        optimizer_impl=settings.optimizer_impl.value,
        batch_size=settings.batch_size,
        seq_len=resolve_seq_len(model, settings.seq_len),
        attention=settings.attention.value,
        recompute=settings.recompute.value,
        recompute_layers=settings.recompute_layers,
        sac_save=settings.sac_save,  # None: torchtitan's counting policy, run as torchtitan runs it
        loss=settings.loss.value,
        impl=impl,
        lora_rank=settings.lora_rank,
        lora_targets=settings.lora_targets,
        lora_dtype=settings.lora_dtype.value,
        qlora=settings.qlora,
        lora_dropout=settings.lora_dropout,
        grad_accum=settings.grad_accum,
        optimizer_dtype=settings.optimizer_dtype.value if settings.optimizer_dtype is not None else None,
        offload_activations=settings.offload_activations,
    )
    if settings.optimizer_in_backward or settings.paged_optimizer:
        raise InputError("validation measures torch.optim steps after backward: --optimizer-in-backward and "
                         "--paged are estimated only")
    if settings.optimizer_dtype is not None and (settings.optimizer.value not in ("adamw", "adam")
                                                 or settings.optimizer_impl.value != "foreach"):
        raise InputError("--optimizer-dtype is measured for --optimizer adamw or adam with --optimizer-impl "
                         "foreach only: otherwise it is estimated only")
    if settings.optimizer.value in ("lion", "ademamix"):
        raise InputError(f"--optimizer {settings.optimizer.value} is not in torch.optim: it is estimated only")
    from memcalc.precision import RECIPES

    if RECIPES[recipe.name].gemm is not None or RECIPES[recipe.name].gemm_input_bytes is not None:
        raise InputError(f"--precision {recipe.name} needs FP8 kernels: it is estimated only")
    measurement = _measure(device, lambda: measure_training(model, workload, device, progress, record=True))
    return compare_training(estimate, measurement)
