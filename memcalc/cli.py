"""The ``memcalc`` command line: parse, resolve the model, call the core, render.

Exit codes: 0 ok, 1 internal error, 2 bad input, 3 validation out of tolerance.
Known errors print one line on stderr; ``MEMCALC_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from memcalc.config import ActivationModel, Attention, KVDType, Loss, Optimizer, OptimizerImpl, Recompute, TrainDType
from memcalc.dtypes import DType
from memcalc.errors import InputError, MemcalcError, SettingsError, ToleranceExceeded
from memcalc.units import Unit

app = typer.Typer(
    name="memcalc",
    help="GPU memory calculator for training and serving large language models.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _complete_model(incomplete: str) -> list[str]:
    from memcalc.library import bundled_model_names

    return [name for name in bundled_model_names() if name.startswith(incomplete)]


ModelArgument = Annotated[
    str,
    typer.Argument(
        help="A bundled model name or alias (see `memcalc models`), a memcalc .yaml file, a Hugging Face "
        "config.json (or a directory holding one), a Hub id such as Qwen/Qwen3-8B, or a .gguf file.",
        autocompletion=_complete_model,
        show_default=False,
    ),
]
RevisionOption = Annotated[str | None, typer.Option("--revision", show_default=False,
                                                   help="Hub ids: the branch, tag or commit to read (default: main).")]
AssumeLlamaOption = Annotated[bool, typer.Option("--assume-llama",
                                                 help="Read a config.json of an unknown model_type as a Llama block.")]
UnitsOption = Annotated[Unit, typer.Option("--units", help="Display unit (JSON is always in bytes).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object (integer bytes) instead of tables.")]
ExplainOption = Annotated[bool, typer.Option("--explain", help="List how each row is computed when the terminal is "
                                             "too narrow for the Formula column.")]
BatchOption = Annotated[int, typer.Option("--batch", "-b", min=1, help="Sequences per step (micro-batch).")]


SeqOption = Annotated[int | None, typer.Option("--seq", "-s", min=1, show_default=False,
                                               help="Tokens per sequence (default: min(2048, the model's maximum)).")]
RecomputeOption = Annotated[Recompute, typer.Option(help="Activation recomputation.")]
TrainDTypeOption = Annotated[TrainDType, typer.Option(help="Training precision; 16-bit means mixed precision.")]
OptimizerOption = Annotated[Optimizer, typer.Option(help="Optimizer whose states are counted.")]
MasterWeightsOption = Annotated[bool, typer.Option("--master-weights/--no-master-weights",
                                                   help="16-bit training: keep an fp32 master copy (mixed precision) "
                                                   "or train in pure 16-bit.")]
AttentionOption = Annotated[Attention, typer.Option(help="Attention kernel: eager keeps the a*s^2 scores.")]
OptimizerImplOption = Annotated[OptimizerImpl, typer.Option("--optimizer-impl", help="torch.optim implementation.")]
ActivationModelOption = Annotated[
    ActivationModel,
    typer.Option("--activation-model", help="arch: saved tensors of the actual block; megatron: Korthikanti et al. "
                 "2022; both: arch, with the Megatron formula as a reference row."),
]
LossOption = Annotated[Loss, typer.Option(help="full: all logits upcast to fp32 (transformers); chunked: fused/"
                                            "chunked cross-entropy, 1024 tokens at a time.")]
PrecisionOption = Annotated[
    str | None,
    typer.Option("--precision", show_default=False,
                 help="A named recipe (`memcalc precisions`: mixed-bf16, pure-bf16, amp-bf16, megatron-bf16, "
                 "te-fp8, deepseek-fp8, msamp-o2, mxfp8, ...); overrides --dtype and --master-weights."),
]


OptimizerDTypeOption = Annotated[TrainDType | None, typer.Option("--optimizer-dtype", show_default=False,
                                                                 help="Dtype of the optimizer moments (default: "
                                                                 "the recipe's, fp32 with mixed precision).")]
OptimizerInBackwardOption = Annotated[bool, typer.Option("--optimizer-in-backward",
                                                         help="Step each parameter as its gradient appears "
                                                         "(torchtune): no gradient buffer.")]
GradAccumOption = Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches accumulated per step.")]
PagedOption = Annotated[bool, typer.Option("--paged", help="bitsandbytes paged optimizer states (unified memory "
                                           "that may spill to the CPU under pressure; counted on the GPU).")]

LoraRankOption = Annotated[int | None, typer.Option("--lora-rank", min=1, show_default=False, rich_help_panel="LoRA",
                                                    help="Train LoRA adapters of this rank; the base is frozen.")]
LoraTargetsOption = Annotated[str, typer.Option("--lora-targets", rich_help_panel="LoRA",
                                                help="Projections with adapters: q,k,v,o,gate,up,down or all.")]
LoraDTypeOption = Annotated[TrainDType, typer.Option("--lora-dtype", rich_help_panel="LoRA",
                                                     help="Adapter dtype (PEFT upcasts adapters to fp32).")]
QLoraOption = Annotated[bool, typer.Option("--qlora", rich_help_panel="LoRA",
                                           help="Base linear weights in bitsandbytes NF4 with double quantisation.")]


def _lora_fields(rank, targets, dtype, qlora) -> dict:
    if rank is None:
        if qlora:
            raise InputError("--qlora needs --lora-rank")
        return {}
    if targets.strip() == "all":
        targets = "q,k,v,o,gate,up,down"
    return {"lora_rank": rank, "lora_targets": targets, "lora_dtype": dtype, "qlora": qlora}


# Parallel layout (memcalc.parallel); every flag has the Scenario key of the same name.
GpusOption = Annotated[int | None, typer.Option("--gpus", min=1, show_default=False, rich_help_panel="Parallelism",
                                                help="GPUs in the job; must equal dp x tp x pp x cp (dp follows "
                                                "from it when not given).")]
DPOption = Annotated[int | None, typer.Option("--dp", min=1, show_default=False, rich_help_panel="Parallelism",
                                              help="Data-parallel degree (default: --gpus / (tp x pp x cp), or 1).")]
TPOption = Annotated[int, typer.Option("--tp", min=1, rich_help_panel="Parallelism",
                                       help="Tensor-parallel degree (divides heads and KV heads).")]
PPOption = Annotated[int, typer.Option("--pp", min=1, rich_help_panel="Parallelism",
                                       help="Pipeline stages (pp x vpp divides the layers).")]
CPOption = Annotated[int, typer.Option("--cp", min=1, rich_help_panel="Parallelism",
                                       help="Context-parallel degree (ring attention; splits the sequence).")]
EPOption = Annotated[int, typer.Option("--ep", min=1, rich_help_panel="Parallelism",
                                       help="Expert-parallel degree (MoE; carved out of dp x cp, divides the experts).")]
SPOption = Annotated[bool, typer.Option("--sp/--no-sp", rich_help_panel="Parallelism",
                                        help="Sequence parallelism with TP: norms, dropout and block inputs split by TP.")]
ZeroOption = Annotated[int | None, typer.Option("--zero", min=0, max=3, show_default=False, rich_help_panel="Parallelism",
                                                help="ZeRO stage: 1 optimizer states, 2 + gradients, 3 + parameters "
                                                "sharded over the data-parallel ranks.")]
FSDPOption = Annotated[str | None, typer.Option("--fsdp", show_default=False, rich_help_panel="Parallelism",
                                                help="FSDP sharding: full (ZeRO-3), grad-op (ZeRO-2), hybrid (ZeRO-3 "
                                                "inside a node).")]
DistOptOption = Annotated[bool, typer.Option("--distributed-optimizer", rich_help_panel="Parallelism",
                                             help="Megatron's distributed optimizer: fp32 master weights and moments "
                                             "sharded over DP; with bf16, fp32 main grads (6 + 12/d B/param).")]
MicrobatchesOption = Annotated[int | None, typer.Option("--microbatches", min=1, show_default=False,
                                                        rich_help_panel="Parallelism",
                                                        help="Micro-batches per step per data-parallel rank (default: "
                                                        "enough to fill the pipeline).")]
VPPOption = Annotated[int, typer.Option("--vpp", min=1, rich_help_panel="Parallelism",
                                        help="Virtual pipeline stages per rank (interleaved 1F1B).")]
OffloadOption = Annotated[str, typer.Option("--offload", rich_help_panel="Parallelism",
                                            help="none, optimizer (ZeRO-Offload: fp32 grads, master, moments and the "
                                            "step on the CPU), params (ZeRO-Infinity, --zero 3), both.")]
PadVocabOption = Annotated[bool | None, typer.Option("--pad-vocab/--no-pad-vocab", show_default=False,
                                                     rich_help_panel="Parallelism",
                                                     help="Pad the vocabulary to a multiple of 128 x TP as Megatron "
                                                     "does (default: when TP > 1).")]
PrefetchOption = Annotated[int | None, typer.Option("--prefetch", min=0, show_default=False, rich_help_panel="Parallelism",
                                                    help="ZeRO-3 units gathered ahead of use (default 1, FSDP2).")]
GpusPerNodeOption = Annotated[int | None, typer.Option("--gpus-per-node", min=1, show_default=False,
                                                       rich_help_panel="Parallelism",
                                                       help="GPUs per node, for --fsdp hybrid (default 8).")]
TPImplOption = Annotated[str, typer.Option("--tp-impl", rich_help_panel="Parallelism",
                                           help="megatron (Megatron-LM/TE: Korthikanti Table 2) or dtensor (PyTorch "
                                           "DTensor TP as torchtitan: whole embedding gradient, loss_parallel, SP "
                                           "inputs saved gathered).")]
PlotOption = Annotated[str | None, typer.Option("--plot", show_default=False,
                                               help="Also draw the numbers to FILE.png or FILE.svg "
                                               "(pip install 'memcalc[plot]').")]
GPUOption = Annotated[str | None, typer.Option("--gpu", show_default=False,
                                               help="A GPU from `memcalc gpus`: say whether the most loaded rank fits.")]


def _layout_scenario(gpus, dp, tp, pp, cp, ep, sp, zero, fsdp, distributed_optimizer, microbatches, vpp, offload,
                     pad_vocab, prefetch, gpus_per_node, tp_impl):
    from memcalc.parallel import FSDPMode, Offload, TPImpl
    from memcalc.scenario import Scenario

    if tp_impl not in {impl.value for impl in TPImpl}:
        raise InputError(f"--tp-impl: {tp_impl!r} is not one of {', '.join(impl.value for impl in TPImpl)}")
    if fsdp is not None and fsdp not in {mode.value for mode in FSDPMode}:
        raise InputError(f"--fsdp: {fsdp!r} is not one of {', '.join(mode.value for mode in FSDPMode)}")
    if offload not in {mode.value for mode in Offload}:
        raise InputError(f"--offload: {offload!r} is not one of {', '.join(mode.value for mode in Offload)}")
    return Scenario(gpus=gpus, dp=dp, tp=tp, pp=pp, cp=cp, ep=ep, sp=sp, zero=zero, fsdp=fsdp,
                    distributed_optimizer=distributed_optimizer, microbatches=microbatches, vpp=vpp, offload=offload,
                    pad_vocab=pad_vocab, prefetch=prefetch, gpus_per_node=gpus_per_node, tp_impl=tp_impl)


ContextOption = Annotated[int | None, typer.Option("--context", "-c", min=1, show_default=False,
                                                   help="Tokens per sequence held in the KV cache "
                                                   "(default: min(2048, the model's maximum)).")]
PromptOption = Annotated[int | None, typer.Option("--prompt", min=1, show_default=False,
                                                  help="Prompt tokens per sequence (instead of --context).")]
NewTokensOption = Annotated[int, typer.Option("--max-new-tokens", min=0, help="Tokens generated after the prompt.")]
BeamsOption = Annotated[int, typer.Option("--num-beams", min=1, help="Beam search width (1: greedy).")]


def _size(flag: str, text: str | None) -> int | None:
    if text is None:
        return None
    from memcalc.units import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise InputError(f"{flag}: {exc}") from None


def _infer_settings(dtype, kv_dtype, batch, context, prompt, max_new_tokens, num_beams, **options):
    from memcalc.config import InferSettings

    if max_new_tokens and prompt is None and context is None:
        raise InputError("--max-new-tokens needs --prompt")
    return InferSettings(dtype=dtype, kv_dtype=kv_dtype, batch_size=batch, context_len=context, prompt_len=prompt,
                         max_new_tokens=max_new_tokens, num_beams=num_beams, **options)


# Settings fields whose flag is not ``--`` + the field with dashes (a SettingsError names fields).
FLAG_OF_FIELD = {"batch_size": "--batch", "seq_len": "--seq", "context_len": "--context", "prompt_len": "--prompt",
                 "paged_optimizer": "--paged", "overhead_bytes": "--overhead"}
# The same fields as ``compare --scenario`` keys.
SCENARIO_KEY_OF_FIELD = {"batch_size": "batch", "seq_len": "seq"}


def flag_of(field: str) -> str:
    return FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))


def scenario_key_of(field: str) -> str:
    return SCENARIO_KEY_OF_FIELD.get(field, field)


def _message(exc: MemcalcError, name=flag_of) -> str:
    """The one line for ``exc``; a SettingsError names its fields as ``name`` writes them."""
    return exc.describe(name) if isinstance(exc, SettingsError) else str(exc)


def _recipe_name(precision: str | None) -> str | None:
    from memcalc.precision import RECIPES

    if precision is not None and precision not in RECIPES:
        raise InputError(f"--precision: {precision!r} is not one of {', '.join(RECIPES)}")
    return precision


def _emit(command: str, estimate, unit: Unit, as_json: bool, gpu=None, advice=None, explain: bool = False) -> None:
    if as_json:
        from memcalc.report import estimate_document

        document = estimate_document(command, estimate, gpu)
        if advice is not None:
            from dataclasses import asdict

            document["advice"] = [asdict(item) for item in advice]
        print(json.dumps(document, indent=2))
        return
    from memcalc.render import print_advice, print_estimate

    print_estimate(command, estimate, unit, gpu, explain)
    if advice is not None:
        print_advice(advice, unit)


@app.command()
def train(
    model: ModelArgument,
    dtype: TrainDTypeOption = TrainDType.BF16,
    master_weights: MasterWeightsOption = True,
    optimizer: OptimizerOption = Optimizer.ADAMW,
    batch: BatchOption = 1,
    seq: SeqOption = None,
    recompute: RecomputeOption = Recompute.NONE,
    attention: AttentionOption = Attention.SDPA,
    optimizer_impl: OptimizerImplOption = OptimizerImpl.FOREACH,
    activation_model: ActivationModelOption = ActivationModel.ARCH,
    loss: LossOption = Loss.FULL,
    precision: PrecisionOption = None,
    optimizer_dtype: OptimizerDTypeOption = None,
    optimizer_in_backward: OptimizerInBackwardOption = False,
    grad_accum: GradAccumOption = 1,
    paged: PagedOption = False,
    lora_rank: LoraRankOption = None,
    lora_targets: LoraTargetsOption = "q,v",
    lora_dtype: LoraDTypeOption = TrainDType.FP32,
    qlora: QLoraOption = False,
    gpus: GpusOption = None,
    dp: DPOption = None,
    tp: TPOption = 1,
    pp: PPOption = 1,
    cp: CPOption = 1,
    ep: EPOption = 1,
    sp: SPOption = False,
    zero: ZeroOption = None,
    fsdp: FSDPOption = None,
    distributed_optimizer: DistOptOption = False,
    microbatches: MicrobatchesOption = None,
    vpp: VPPOption = 1,
    offload: OffloadOption = "none",
    pad_vocab: PadVocabOption = None,
    prefetch: PrefetchOption = None,
    gpus_per_node: GpusPerNodeOption = None,
    tp_impl: TPImplOption = "megatron",
    gpu: GPUOption = None,
    plot: PlotOption = None,
    revision: RevisionOption = None,
    assume_llama: AssumeLlamaOption = False,
    units: UnitsOption = Unit.GIB,
    as_json: JsonOption = False,
    explain: ExplainOption = False,
) -> None:
    """Memory of one training step per GPU: weights, gradients, optimizer states, activations.

    Under a parallel layout the numbers are the most loaded GPU's; with pipeline stages the
    first and the last stage are both shown.

    Examples:

      memcalc train llama-13b --dtype bf16

      memcalc train mistral-7b --optimizer adam8bit --batch 4 --seq 4096 --recompute selective

      memcalc train llama-2-70b --gpus 64 --tp 8 --pp 2 --sp --distributed-optimizer --seq 4096

      memcalc train llama-3-8b --gpus 8 --fsdp full --offload optimizer --json
    """
    from memcalc.config import TrainSettings
    from memcalc.estimate.training import estimate_training
    from memcalc.library import resolve_model
    from memcalc.scenario import parallel_config

    settings = _train_settings(
        dtype=dtype, master_weights=master_weights, optimizer=optimizer, batch_size=batch, seq_len=seq,
        recompute=recompute, attention=attention, optimizer_impl=optimizer_impl, activation_model=activation_model,
        loss=loss, precision=_recipe_name(precision), optimizer_dtype=optimizer_dtype,
        optimizer_in_backward=optimizer_in_backward, grad_accum=grad_accum, paged_optimizer=paged,
        **_lora_fields(lora_rank, lora_targets, lora_dtype, qlora))
    layout = parallel_config(_layout_scenario(gpus, dp, tp, pp, cp, ep, sp, zero, fsdp, distributed_optimizer,
                                              microbatches, vpp, offload, pad_vocab, prefetch, gpus_per_node,
                                              tp_impl))
    gpu_spec = _resolve_gpu(gpu)
    if gpu_spec is not None and "blackwell" in gpu_spec.architecture.lower():
        from dataclasses import replace

        settings = replace(settings, fp8_transpose=False)  # one FP8 layout serves both GEMM directions
    config = resolve_model(model, revision=revision, assume_llama=assume_llama)
    estimate = estimate_training(config, settings, layout)
    _warn_precision_support(estimate.settings["precision"], gpu_spec)
    advice = None
    if gpu_spec is not None and estimate.total > gpu_spec.memory_bytes:
        from memcalc.advice import advise

        advice = advise(config, settings, layout, gpu_spec.memory_bytes)
    if plot is not None:
        from memcalc.plot import component_bars

        component_bars(plot, [config.name], [estimate], gpu_spec.memory_bytes if gpu_spec else None,
                       f"memcalc train: {config.name}")
    _emit("train", estimate, units, as_json, gpu_spec, advice, explain)


def _warn_precision_support(recipe_name: str, gpu_spec) -> None:
    """A recipe needing FP8 (Hopper, Ada, Blackwell) or MXFP8 (Blackwell) on a GPU without it: a
    warning on stderr, since the memory estimate itself still stands."""
    from memcalc.precision import RECIPES

    needs = RECIPES[recipe_name].requires
    if gpu_spec is None or needs is None or getattr(gpu_spec, needs):
        return
    print(f"warning: {recipe_name} needs {needs.upper()} tensor cores, which {gpu_spec.name} "
          f"({gpu_spec.architecture}) does not have", file=sys.stderr)


def _train_settings(**fields):
    from memcalc.config import TrainSettings

    if fields.get("paged_optimizer") and fields.get("optimizer") is not Optimizer.ADAM8BIT:
        raise InputError("--paged applies to bitsandbytes' 8-bit optimizers: use --optimizer adam8bit")
    return TrainSettings(**fields)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _resolve_gpu(name: str | None):
    if name is None:
        return None
    from memcalc.gpus import resolve_gpu

    return resolve_gpu(name)


@app.command()
def compare(
    model: ModelArgument,
    scenario: Annotated[list[str] | None, typer.Option("--scenario", show_default=False,
                                                       help='One scenario, e.g. "gpus=8,tp=2,zero=1"; repeat for more. '
                                                       "Keys: the train flags without dashes (gpus, dp, tp, pp, cp, ep, "
                                                       "sp, zero, fsdp, distributed_optimizer, microbatches, vpp, "
                                                       "offload, batch, seq, precision, recompute, ...), and name.")] = None,
    file: Annotated[str | None, typer.Option("--file", show_default=False,
                                             help="A YAML list of scenarios (mappings with the same keys).")] = None,
    gpu: GPUOption = None,
    plot: PlotOption = None,
    dtype: TrainDTypeOption = TrainDType.BF16,
    master_weights: MasterWeightsOption = True,
    optimizer: OptimizerOption = Optimizer.ADAMW,
    batch: BatchOption = 1,
    seq: SeqOption = None,
    recompute: RecomputeOption = Recompute.NONE,
    attention: AttentionOption = Attention.SDPA,
    optimizer_impl: OptimizerImplOption = OptimizerImpl.FOREACH,
    activation_model: ActivationModelOption = ActivationModel.ARCH,
    loss: LossOption = Loss.FULL,
    precision: PrecisionOption = None,
    revision: RevisionOption = None,
    assume_llama: AssumeLlamaOption = False,
    units: UnitsOption = Unit.GIB,
    as_json: JsonOption = False,
) -> None:
    """Training scenarios side by side, one column each, per GPU of the most loaded rank.

    The flags set what every scenario shares; each scenario overrides them.

    Examples:

      memcalc compare llama-2-70b --seq 4096 --gpu h100 --scenario "gpus=64,tp=8,pp=2,sp=true"
      --scenario "gpus=64,fsdp=full" --scenario "gpus=64,tp=8,zero=1,recompute=full"

      memcalc compare mixtral-8x7b --file scenarios.yaml --json
    """
    from memcalc.config import TrainSettings
    from memcalc.estimate.training import estimate_training
    from memcalc.library import resolve_model
    from memcalc.scenario import parallel_config, parse_scenario, read_scenarios, train_settings

    scenarios = [parse_scenario(text) for text in scenario or []]
    if file is not None:
        scenarios += read_scenarios(file)
    if not scenarios:
        raise InputError("compare needs at least one --scenario or a --file of scenarios")
    base = TrainSettings(dtype=dtype, master_weights=master_weights, optimizer=optimizer, batch_size=batch,
                         seq_len=seq, recompute=recompute, attention=attention, optimizer_impl=optimizer_impl,
                         activation_model=activation_model, loss=loss, precision=_recipe_name(precision))
    config = resolve_model(model, revision=revision, assume_llama=assume_llama)
    gpu_spec = _resolve_gpu(gpu)
    results = []
    for item in scenarios:
        try:
            results.append((item.label(), estimate_training(config, train_settings(item, base), parallel_config(item))))
        except InputError as exc:
            raise InputError(f"scenario {item.label()!r}: {_message(exc, scenario_key_of)}") from None
    if plot is not None:
        from memcalc.plot import component_bars

        component_bars(plot, [label for label, _ in results], [estimate for _, estimate in results],
                       gpu_spec.memory_bytes if gpu_spec else None, f"memcalc compare: {config.name}")
    if as_json:
        from memcalc.report import compare_document

        print(json.dumps(compare_document(results, gpu_spec), indent=2))
        return
    from memcalc.render import print_scenarios

    print_scenarios(config, results, units, gpu_spec)


@app.command()
def plan(
    model: ModelArgument,
    gpu: Annotated[str, typer.Option("--gpu", show_default=False, help="A GPU from `memcalc gpus`.")],
    gpus: Annotated[int, typer.Option("--gpus", min=1, show_default=False, help="GPUs in the job.")],
    global_batch: Annotated[int, typer.Option("--global-batch", min=1, show_default=False,
                                              help="Sequences per optimizer step.")],
    seq: SeqOption = None,
    headroom: Annotated[float, typer.Option("--headroom", min=0.0, max=0.99,
                                            help="Share of GPU memory left free.")] = 0.10,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Layouts listed.")] = 10,
    mfu: Annotated[float | None, typer.Option("--mfu", min=0.01, max=1.0, show_default=False,
                                              help="Assumed efficiency of the executed FLOPs (docs/plan.md; "
                                              "default 0.6).")] = None,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", min=1, help="GPUs per node.")] = 8,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Model ZeRO-2/3 as PyTorch FSDP2 rather than DeepSpeed.")] = False,
    no_offload: Annotated[bool, typer.Option("--no-offload", help="Leave CPU offload out of the search.")] = False,
    plot: PlotOption = None,
    dtype: TrainDTypeOption = TrainDType.BF16,
    master_weights: MasterWeightsOption = True,
    optimizer: OptimizerOption = Optimizer.ADAMW,
    attention: AttentionOption = Attention.SDPA,
    loss: LossOption = Loss.FULL,
    precision: PrecisionOption = None,
    revision: RevisionOption = None,
    assume_llama: AssumeLlamaOption = False,
    units: UnitsOption = Unit.GIB,
    as_json: JsonOption = False,
) -> None:
    """Search every parallel layout of --gpus GPUs and rank those that fit by estimated step time.

    Examples:

      memcalc plan llama-3-70b --gpu h100 --gpus 256 --seq 8192 --global-batch 1024

      memcalc plan gpt3-175b --gpu a100-80gb --gpus 8 --seq 2048 --global-batch 64 --json
    """
    from memcalc.config import TrainSettings, resolve_seq_len
    from memcalc.gpus import resolve_gpu
    from memcalc.library import resolve_model
    from memcalc.plan import DEFAULT_MFU
    from memcalc.plan import plan as search

    config = resolve_model(model, revision=revision, assume_llama=assume_llama)
    spec = resolve_gpu(gpu)
    base = TrainSettings(dtype=dtype, master_weights=master_weights, optimizer=optimizer, attention=attention,
                         loss=loss, precision=_recipe_name(precision))
    result = search(config, spec, gpus, seq_len=resolve_seq_len(config, seq), global_batch=global_batch,
                    headroom=headroom, top_k=top_k, settings=base, gpus_per_node=gpus_per_node,
                    mfu=DEFAULT_MFU if mfu is None else mfu, fsdp=fsdp, offload=not no_offload)
    if plot is not None:
        from memcalc.plot import component_bars

        component_bars(plot, [f"#{index}" for index in range(1, len(result.top) + 1)],
                       [item.estimate for item in result.top], spec.memory_bytes, f"memcalc plan: {config.name}")
    if as_json:
        from memcalc.report import plan_document

        print(json.dumps(plan_document(result), indent=2))
        return
    from memcalc.render import print_plan

    print_plan(result, units)


@app.command()
def sweep(
    model: ModelArgument,
    over: Annotated[str, typer.Option("--over", show_default=False,
                                      help="What to sweep: seq=1k..128k (powers of two), batch=1..64, gpus=8..1024, "
                                      "grad_accum=1..16, lora_rank=8..256, or a list such as seq=2048,8192.")],
    scenario: Annotated[str | None, typer.Option("--scenario", show_default=False,
                                                 help='The layout and settings every point shares, e.g. '
                                                 '"tp=8,pp=2,zero=1" (keys as in compare).')] = None,
    gpu: GPUOption = None,
    plot: PlotOption = None,
    dtype: TrainDTypeOption = TrainDType.BF16,
    master_weights: MasterWeightsOption = True,
    optimizer: OptimizerOption = Optimizer.ADAMW,
    batch: BatchOption = 1,
    seq: SeqOption = None,
    recompute: RecomputeOption = Recompute.NONE,
    attention: AttentionOption = Attention.SDPA,
    loss: LossOption = Loss.FULL,
    precision: PrecisionOption = None,
    revision: RevisionOption = None,
    assume_llama: AssumeLlamaOption = False,
    units: UnitsOption = Unit.GIB,
    as_json: JsonOption = False,
) -> None:
    """Training memory per component across a range, and where it stops fitting on --gpu.

    Examples:

      memcalc sweep llama-3-8b --over seq=1k..128k --gpu h100 --recompute full

      memcalc sweep llama-2-70b --over gpus=8..512 --scenario "tp=8,fsdp=full" --seq 4096 --gpu h100
    """
    from memcalc.config import TrainSettings
    from memcalc.library import resolve_model
    from memcalc.scenario import Scenario, parse_scenario
    from memcalc.sweep import first_over, parse_over, run_sweep

    key, values = parse_over(over)
    layout = parse_scenario(scenario) if scenario else Scenario()
    base = TrainSettings(dtype=dtype, master_weights=master_weights, optimizer=optimizer, batch_size=batch,
                         seq_len=seq, recompute=recompute, attention=attention, loss=loss,
                         precision=_recipe_name(precision))
    config = resolve_model(model, revision=revision, assume_llama=assume_llama)
    gpu_spec = _resolve_gpu(gpu)
    points = run_sweep(config, base, layout, key, values)
    over_point = first_over(points, gpu_spec.memory_bytes) if gpu_spec else None
    if plot is not None:
        from memcalc.plot import sweep_lines

        sweep_lines(plot, key, [point.value for point in points], [point.estimate for point in points],
                    gpu_spec.memory_bytes if gpu_spec else None, f"memcalc sweep: {config.name}")
    if as_json:
        from memcalc.report import sweep_document

        print(json.dumps(sweep_document(config, key, points, gpu_spec, over_point), indent=2))
        return
    from memcalc.render import print_sweep

    print_sweep(config, key, points, units, gpu_spec, over_point)


@app.command()
def infer(
    model: ModelArgument,
    dtype: Annotated[DType, typer.Option(help="Compute dtype, and the weights' unless --weights names a format "
                                         "(fp8/int8/int4 here: every tensor, no scales).")] = DType.BF16,
    weights: Annotated[str | None, typer.Option("--weights", show_default=False,
                                                help="Weight format: fp32, fp16, bf16, fp8, fp8-block, mxfp8, mxfp4, "
                                                "nvfp4, int8 (LLM.int8), gptq, awq, bnb-nf4, bnb-fp4, or a GGUF type "
                                                "(q4_0, q4_k, q6_k, q8_0, ...); see docs/weight-formats.md.")] = None,
    group_size: Annotated[int, typer.Option("--group-size", help="GPTQ/AWQ group size (-1: per column).")] = 128,
    double_quant: Annotated[bool, typer.Option("--double-quant/--no-double-quant",
                                               help="bitsandbytes 4-bit: quantise the block constants too "
                                               "(4.127 vs 4.5 bits).")] = True,
    kv_dtype: Annotated[KVDType | None, typer.Option("--kv-dtype", show_default=False,
                                                     help="KV-cache dtype (default: the compute dtype if a float "
                                                     "type, else bf16).")] = None,
    batch: BatchOption = 1,
    context: ContextOption = None,
    prompt: PromptOption = None,
    max_new_tokens: NewTokensOption = 0,
    decoding: Annotated[str | None, typer.Option("--decoding", show_default=False,
                                                 help="greedy, beam or sample (default: beam with --num-beams > 1, "
                                                 "else greedy).")] = None,
    num_beams: BeamsOption = 1,
    num_return_sequences: Annotated[int, typer.Option("--num-return-sequences", min=1,
                                                      help="Sampling: sequences per prompt (each cached).")] = 1,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, show_default=False, help="Sampling: top-k.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", show_default=False, help="Sampling: top-p (nucleus).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.")] = 1.0,
    prefill_logits: Annotated[str, typer.Option("--prefill-logits",
                                                help="last: logits of the last prompt position (generate()); all: "
                                                "every position, upcast to fp32.")] = "last",
    prefill_chunk: Annotated[int | None, typer.Option("--prefill-chunk", min=1, show_default=False,
                                                      help="Tokens per prefill forward (chunked prefill).")] = None,
    attention: AttentionOption = Attention.SDPA,
    engine: Annotated[str, typer.Option("--engine", help="hf: a Hugging Face generate() loop; paged: a paged server "
                                        "(blocks, no cache copies).")] = "hf",
    block_size: Annotated[int, typer.Option("--block-size", min=1, help="Paged engine: tokens per KV block.")] = 16,
    tp: Annotated[int, typer.Option("--tp", min=1, help="Tensor-parallel GPUs (per-GPU numbers).")] = 1,
    overhead: Annotated[str | None, typer.Option("--overhead", show_default=False,
                                                 help="Runtime overhead per GPU, e.g. 1GiB (default: CUDA context "
                                                 "400 MiB + cuBLAS workspace 32 MiB).")] = None,
    gpu: GPUOption = None,
    gpu_util: Annotated[float, typer.Option("--gpu-util", min=0.01, max=1.0,
                                            help="With --gpu: the share of its memory the server may use.")] = 0.9,
    kv_budget: Annotated[str | None, typer.Option("--kv-budget", show_default=False,
                                                  help="Print the tokens and blocks this many bytes of KV cache hold, "
                                                  "e.g. 4.6GiB.")] = None,
    revision: RevisionOption = None,
    assume_llama: AssumeLlamaOption = False,
    units: UnitsOption = Unit.GIB,
    as_json: JsonOption = False,
    explain: ExplainOption = False,
) -> None:
    """Memory to serve a model: weights, KV cache, prefill and decoding, overhead, and what fits.

    Without --weights, a .gguf file or a checkpoint with safetensors counts its weights as stored.

    Examples:

      memcalc infer llama-2-70b --dtype fp16 --batch 8 --context 4096

      memcalc infer llama-3-8b --prompt 1024 --max-new-tokens 256 --num-beams 4

      memcalc infer llama-3-8b --weights q4_k --context 32768 --gpu rtx-4090

      memcalc infer mixtral-8x7b --weights gptq --kv-dtype fp8 --engine paged --tp 2 --gpu h100 --json

      memcalc infer llama-3-8b --engine paged --kv-budget 4.6GiB

      memcalc infer ./model.gguf --context 8192
    """
    from memcalc.config import Decoding, Engine, PrefillLogits
    from memcalc.estimate.inference import estimate_inference
    from memcalc.library import resolve_model

    for flag, value, enum in (("--decoding", decoding, Decoding), ("--prefill-logits", prefill_logits, PrefillLogits),
                              ("--engine", engine, Engine)):
        if value is not None and value not in {item.value for item in enum}:
            raise InputError(f"{flag}: {value!r} is not one of {', '.join(item.value for item in enum)}")
    if weights is not None:
        from memcalc.estimate.weights import parse_weight_format

        try:
            weights = parse_weight_format(weights).value
        except ValueError as exc:
            raise InputError(f"--weights: {exc}") from None
    settings = _infer_settings(
        dtype, kv_dtype, batch, context, prompt, max_new_tokens, num_beams, weights=weights, group_size=group_size,
        double_quant=double_quant,
        decoding=decoding, num_return_sequences=num_return_sequences, top_k=top_k, top_p=top_p,
        temperature=temperature, prefill_logits=prefill_logits, prefill_chunk=prefill_chunk, attention=attention,
        engine=engine, block_size=block_size, tp=tp, overhead_bytes=_size("--overhead", overhead),
    )
    config = resolve_model(model, revision=revision, assume_llama=assume_llama)
    estimate = estimate_inference(config, settings)
    stored = None
    if weights is None:  # the checkpoint's own bytes, unless --weights asks for another format
        from memcalc.library import stored_weights

        stored = stored_weights(model, revision=revision, warn=_warn)
    if stored is not None:
        from memcalc.estimate.measured import with_stored_weights

        estimate = with_stored_weights(estimate, stored)
    gpu_spec = _resolve_gpu(gpu)
    fit = None
    if gpu_spec is not None and stored is not None:
        from memcalc.estimate.measured import measured_fit_report

        fit = measured_fit_report(config, settings, stored, gpu_spec.name, gpu_spec.memory_bytes, gpu_util)
    elif gpu_spec is not None:
        from memcalc.estimate.inference import fit_report

        fit = fit_report(config, settings, gpu_spec.name, gpu_spec.memory_bytes, gpu_util)
    capacity = None
    budget = _size("--kv-budget", kv_budget)
    if budget is not None:
        from memcalc.estimate.inference import kv_capacity

        capacity = kv_capacity(budget, estimate.settings["kv_cache_bytes_per_token"], block_size)
    if as_json:
        from memcalc.report import inference_document

        print(json.dumps(inference_document(estimate, fit, capacity), indent=2))
        return
    from memcalc.render import print_inference

    print_inference(estimate, units, fit, capacity, explain)


@app.command()
def validate(
    model: ModelArgument,
    workload: Annotated[str, typer.Option(help="train: one training step; infer: a generate() run "
                                          "(--prompt, --max-new-tokens, --num-beams).")] = "train",
    device: Annotated[str, typer.Option(help="cuda (real allocations), fake (CPU fake tensors, no memory), cpu, "
                                        "or auto: cuda when available, else fake.")] = "auto",
    num_layers: Annotated[int | None, typer.Option("--num-layers", min=1, show_default=False,
                                                   help="Run the same blocks with fewer layers (cheaper).")] = None,
    impl: Annotated[str, typer.Option(help="reference: memcalc's PyTorch decoder; hf: the transformers model "
                                      "class built from the config (training; transformers installed).")] = "reference",
    dtype: Annotated[TrainDType, typer.Option(help="Precision (train: 16-bit means mixed; infer: weights and cache).")]
    = TrainDType.BF16,
    master_weights: MasterWeightsOption = True,
    precision: PrecisionOption = None,
    optimizer: Annotated[Optimizer, typer.Option(help="Optimizer (adam8bit cannot be measured).")] = Optimizer.ADAMW,
    optimizer_impl: OptimizerImplOption = OptimizerImpl.FOREACH,
    batch: BatchOption = 1,
    seq: SeqOption = None,
    recompute: RecomputeOption = Recompute.NONE,
    attention: AttentionOption = Attention.SDPA,
    activation_model: ActivationModelOption = ActivationModel.ARCH,
    loss: LossOption = Loss.FULL,
    prompt: PromptOption = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens generated (infer).")] = 16,
    num_beams: BeamsOption = 1,
    decoding: Annotated[str | None, typer.Option("--decoding", show_default=False,
                                                 help="infer: greedy, beam or sample.")] = None,
    num_return_sequences: Annotated[int, typer.Option("--num-return-sequences", min=1,
                                                      help="infer, sampling: sequences per prompt.")] = 1,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, show_default=False, help="infer: top-k.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", show_default=False, help="infer: top-p.")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="infer: sampling temperature.")] = 1.0,
    lora_rank: LoraRankOption = None,
    lora_targets: LoraTargetsOption = "q,v",
    lora_dtype: LoraDTypeOption = TrainDType.FP32,
    qlora: QLoraOption = False,
    grad_accum: GradAccumOption = 1,
    optimizer_dtype: OptimizerDTypeOption = None,
    tolerance: Annotated[float | None, typer.Option(min=0, show_default=False,
                                                    help="Exit with code 3 when the total misses by more than this "
                                                    "percentage.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Run on CUDA even if the estimate says it will not fit.")] = False,
    revision: RevisionOption = None,
    assume_llama: AssumeLlamaOption = False,
    units: UnitsOption = Unit.GIB,
    as_json: JsonOption = False,
) -> None:
    """Run the workload with PyTorch and compare its memory with the estimate, part by part.

    Examples:

      memcalc validate llama-3.2-1b --device fake --seq 1024 --batch 2

      memcalc validate llama-3-8b --num-layers 4 --precision pure-bf16 --tolerance 3

      memcalc validate gpt2 --workload infer --prompt 512 --max-new-tokens 64 --num-beams 4
    """
    from memcalc.library import resolve_model
    from memcalc.validate.cli_support import (
        resolve_device,
        run_inference_validation,
        run_training_validation,
        with_layers,
    )

    if workload not in ("train", "infer"):
        raise InputError(f"--workload: {workload!r} is not one of train, infer")
    if impl not in ("reference", "hf"):
        raise InputError(f"--impl: {impl!r} is not one of reference, hf")
    if impl == "hf" and workload == "infer":
        raise InputError("--impl hf measures training steps; --workload infer runs the reference decoder")
    if device not in ("auto", "cuda", "fake", "cpu"):
        raise InputError(f"--device: {device!r} is not one of auto, cuda, fake, cpu")
    config = with_layers(resolve_model(model, revision=revision, assume_llama=assume_llama), num_layers)
    if workload == "train":
        from memcalc.config import TrainSettings
        from memcalc.estimate.training import estimate_training

        settings = _train_settings(dtype=dtype, master_weights=master_weights, optimizer=optimizer, batch_size=batch,
                                   seq_len=seq, recompute=recompute, attention=attention,
                                   optimizer_impl=optimizer_impl, activation_model=activation_model, loss=loss,
                                   precision=_recipe_name(precision), grad_accum=grad_accum,
                                   optimizer_dtype=optimizer_dtype,
                                   **_lora_fields(lora_rank, lora_targets, lora_dtype, qlora))
        estimate = estimate_training(config, settings)

        def run(*args, **kwargs):
            return run_training_validation(*args, **kwargs, impl=impl)
    else:
        from memcalc.estimate.inference import estimate_inference

        if prompt is None:
            raise InputError("--workload infer needs --prompt (and --max-new-tokens) to describe the generate() run")
        if decoding is not None and decoding not in ("greedy", "beam", "sample"):
            raise InputError(f"--decoding: {decoding!r} is not one of greedy, beam, sample")
        settings = _infer_settings(dtype.value, None, batch, None, prompt, max_new_tokens, num_beams,
                                   decoding=decoding, num_return_sequences=num_return_sequences, top_k=top_k,
                                   top_p=top_p, temperature=temperature)
        estimate = estimate_inference(config, settings)
        run = run_inference_validation
    resolved_device = resolve_device(device)
    if as_json:
        comparison = run(config, settings, estimate, resolved_device, force)
        from memcalc.report import estimate_document

        document = {"estimate": estimate_document(workload, estimate), "validation": comparison.document()}
        if tolerance is not None:
            document["validation"]["tolerance_percent"] = tolerance
            document["validation"]["within_tolerance"] = comparison.within(tolerance)
        print(json.dumps(document, indent=2))
    else:
        from memcalc.render import print_comparison, progress_reporter

        with progress_reporter(f"measuring {config.name} on {resolved_device}") as progress:
            comparison = run(config, settings, estimate, resolved_device, force, progress)
        print_comparison(estimate, comparison, units, tolerance)
    if tolerance is not None and not comparison.within(tolerance):
        raise ToleranceExceeded(
            f"total off by {comparison.total.error_percent:+.2f}% (tolerance {tolerance}%)"
        )


@app.command()
def models(as_json: JsonOption = False) -> None:
    """List the bundled model library.

    Examples:

      memcalc models

      memcalc models --json
    """
    from memcalc.library import bundled_models

    library = list(bundled_models().values())
    if as_json:
        from memcalc.report import model_summary

        print(json.dumps([model_summary(model) for model in library], indent=2))
        return
    from memcalc.render import print_models

    print_models(library)


@app.command()
def gpus(as_json: JsonOption = False) -> None:
    """List the GPU catalogue: memory as sold, dense bf16 throughput, FP8 support, interconnect.

    Examples:

      memcalc gpus

      memcalc gpus --json
    """
    from dataclasses import asdict

    from memcalc.gpus import gpu_catalogue

    catalogue = list(gpu_catalogue().values())
    if as_json:
        print(json.dumps([asdict(spec) | {"memory_bytes": spec.memory_bytes} for spec in catalogue], indent=2))
        return
    from memcalc.render import print_gpus

    print_gpus(catalogue)


@app.command()
def precisions(
    as_json: JsonOption = False,
    explain: Annotated[bool, typer.Option("--explain", help="List each recipe's source when the terminal is too "
                                          "narrow for the Source column.")] = False,
) -> None:
    """List the precision recipes: bytes per linear-layer weight with Adam, and their sources.

    Examples:

      memcalc precisions

      memcalc precisions --json
    """
    from memcalc.precision import RECIPES

    if as_json:
        from memcalc.report import precisions_document

        print(json.dumps(precisions_document(RECIPES.values()), indent=2))
        return
    from memcalc.render import print_precisions

    print_precisions(RECIPES.values(), explain)


@app.command()
def formats(
    names: Annotated[list[str] | None, typer.Argument(help="Formats to show (default: all), e.g. fp8-e4m3 bf16.",
                                                      show_default=False)] = None,
    as_json: JsonOption = False,
) -> None:
    """Number formats from their bit layouts: range, precision and special values.

    Examples:

      memcalc formats

      memcalc formats fp8-e4m3 fp8-e5m2 --json
    """
    from memcalc.formats import describe, format_table, json_document

    rows = [describe(name) for name in names] if names else format_table()
    if as_json:
        print(json.dumps(json_document(rows), indent=2))
        return
    from memcalc.render import print_formats

    print_formats(rows)


@app.command()
def show(model: ModelArgument, revision: RevisionOption = None, assume_llama: AssumeLlamaOption = False,
         as_json: JsonOption = False) -> None:
    """Print a model's configuration and its parameter count, part by part.

    A model directory, a cached Hub id or a .gguf file adds its stored tensors, read from the headers.

    Examples:

      memcalc show llama-3-8b

      memcalc show ./config.json --json

      memcalc show ./local-checkpoint-dir
    """
    from memcalc.library import resolve_model, stored_weights
    from memcalc.report import checkpoint_document, show_document

    config = resolve_model(model, revision=revision, assume_llama=assume_llama)
    document = show_document(config)
    stored = stored_weights(model, revision=revision, warn=_warn)
    if stored is not None:
        document["checkpoint"] = checkpoint_document(config, stored)
        if stored.checkpoint is not None and not document["checkpoint"]["matches"]:
            check = document["checkpoint"]
            _warn(f"checkpoint headers hold {check['language_model_params']:,} parameters, the config gives "
                  f"{check['config_params']:,}: estimates count the config's ({check['location']})")
    if as_json:
        print(json.dumps(document, indent=2))
        return
    from memcalc.render import print_show

    print_show(document)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app and maps failures to one line and an exit code."""
    # typer 0.26+ raises the exceptions of its vendored click.
    from typer._click import exceptions as click_errors

    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else argv
    try:
        result = command.main(args=args, prog_name="memcalc", standalone_mode=False)
    except MemcalcError as exc:
        if os.environ.get("MEMCALC_DEBUG"):
            raise
        print(f"error: {_message(exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click_errors.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else exc.format_message())
        sys.exit(0)
    except click_errors.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, EOFError):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # an internal error: one line unless debugging
        if os.environ.get("MEMCALC_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set MEMCALC_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)
