"""The command line's options, each declared once, and the one path from them to settings.

A group is a frozen dataclass whose fields are typer options. A command takes a group as one
parameter; :func:`expand` spreads the group's fields into the signature typer reads and hands
the command the group back, built from the parsed values. ``train_settings``, ``infer_settings``
and ``Layout.scenario`` turn groups into the core's settings; every command goes through them.

Only the CLI imports this module (it imports typer); the core knows nothing of flags.
"""

import functools
import inspect
from typing import Annotated, Any, get_type_hints

import typer

from memcalc.config import (
    LORA_TARGETS,
    ActivationModel,
    Attention,
    Decoding,
    Engine,
    InferSettings,
    KVDType,
    Loss,
    Optimizer,
    OptimizerImpl,
    PrefillLogits,
    Recompute,
    TrainDType,
    TrainSettings,
)
from memcalc.dtypes import DType
from memcalc.errors import InputError
from memcalc.parallel import FSDPMode, FSDPWrap, Offload, TPImpl
from memcalc.units import Unit

MODEL = "Model and precision"
BATCH = "Batch and sequence"
SAVERS = "Memory savers"
LORA = "Fine-tuning (LoRA)"
LAYOUT = "Parallel layout"
DECODING = "Decoding"
SERVING = "Serving"
OUTPUT = "Output"

# Settings fields whose flag is not ``--`` + the field with dashes (a SettingsError names fields).
FLAG_OF_FIELD = {"batch_size": "--batch", "seq_len": "--seq", "context_len": "--context", "prompt_len": "--prompt",
                 "paged_optimizer": "--paged", "overhead_bytes": "--overhead"}
# The same fields as ``compare --scenario`` keys.
SCENARIO_KEY_OF_FIELD = {"batch_size": "batch", "seq_len": "seq"}


def flag_of(field: str) -> str:
    return FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))


def scenario_key_of(field: str) -> str:
    return SCENARIO_KEY_OF_FIELD.get(field, field)


def choices(enum) -> str:
    """An enum's values as help text writes them: ``a, b or c``."""
    values = [item.value for item in enum]
    return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]


def _complete_model(incomplete: str) -> list[str]:
    from memcalc.library import bundled_model_names

    return [name for name in bundled_model_names() if name.startswith(incomplete)]


def _complete_gpu(incomplete: str) -> list[str]:
    from memcalc.gpus import gpu_catalogue

    names = [name for spec in gpu_catalogue().values() for name in (spec.name, *spec.aliases)]
    return [name for name in names if name.lower().startswith(incomplete.lower())]


def _complete_precision(incomplete: str) -> list[str]:
    from memcalc.precision import RECIPES

    return [name for name in RECIPES if name.startswith(incomplete)]


# --- Options more than one group or command uses --------------------------------------------------

ModelArgument = Annotated[
    str,
    typer.Argument(
        help="A bundled model name or alias (see `memcalc models`), a memcalc .yaml file, a Hugging Face "
        "config.json (or a directory holding one), a Hub id such as Qwen/Qwen3-8B, or a .gguf file.",
        autocompletion=_complete_model, show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", rich_help_panel=OUTPUT,
                                          help="Print one JSON object (integer bytes) instead of tables.")]
UnitsOption = Annotated[Unit, typer.Option("--units", metavar="UNIT", rich_help_panel=OUTPUT,
                                           help=f"Display unit: {choices(Unit)} (JSON is always in bytes).")]
GPUOption = Annotated[str | None, typer.Option("--gpu", show_default=False, rich_help_panel=OUTPUT,
                                               autocompletion=_complete_gpu,
                                               help="A GPU from `memcalc gpus`: say whether the most loaded rank "
                                               "fits.")]
PlotOption = Annotated[str | None, typer.Option("--plot", show_default=False, rich_help_panel=OUTPUT,
                                               help="Also draw the numbers to FILE.png or FILE.svg "
                                               "(pip install 'memcalc\\[plot]').")]
ExplainOption = Annotated[bool, typer.Option("--explain", rich_help_panel=OUTPUT,
                                             help="List how each row is computed when the terminal is too narrow "
                                             "for the Formula column.")]
SeqOption = Annotated[int | None, typer.Option("--seq", "-s", metavar="N", min=1, show_default=False, rich_help_panel=BATCH,
                                               help="Tokens per sequence (default: min(2048, the model's maximum)).")]
BatchOption = Annotated[int, typer.Option("--batch", "-b", metavar="N", min=1, rich_help_panel=BATCH,
                                          help="Sequences per step (micro-batch).")]
AttentionOption = Annotated[Attention, typer.Option("--attention", metavar="KERNEL", rich_help_panel=SAVERS,
                                                    help=f"Attention kernel: {choices(Attention)}; eager keeps the "
                                                    "a*s^2 scores.")]
LossOption = Annotated[Loss, typer.Option("--loss", metavar="MODE", rich_help_panel=SAVERS,
                                          help="full: all logits upcast to fp32 (transformers); chunked: fused/"
                                          "chunked cross-entropy, 1024 tokens at a time.")]
ExpandableOption = Annotated[bool, typer.Option("--expandable-segments", rich_help_panel=SAVERS,
                                                help="The caching allocator with expandable segments "
                                                "(PYTORCH_CUDA_ALLOC_CONF expandable_segments:True): it grows "
                                                "segments instead of reserving new ones, so less is reserved.")]
PromptOption = Annotated[int | None, typer.Option("--prompt", metavar="N", min=1, show_default=False, rich_help_panel=BATCH,
                                                  help="Prompt tokens per sequence (instead of --context).")]


# --- Groups ------------------------------------------------------------------------------------------


class Flags:
    """Base of the option groups :func:`expand` spreads into a command's signature: each annotated
    class attribute is an option, its value the default. (Plain classes: a dataclass per group
    would generate code at every start-up.)"""

    def __init__(self, **values: Any) -> None:
        for name, default in self.defaults().items():
            setattr(self, name, values.pop(name, default))
        if values:
            raise TypeError(f"{type(self).__name__}: unknown options {', '.join(values)}")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each option's name and default, in declaration order."""
        return {name: getattr(cls, name) for name in cls.__annotations__}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{name}={getattr(self, name)!r}' for name in self.defaults())})"


class Source(Flags):
    """Where a model comes from beyond its name."""

    revision: Annotated[str | None, typer.Option("--revision", show_default=False, rich_help_panel=MODEL,
                                                 help="Hub ids: the branch, tag or commit to read (default: main).")
                        ] = None
    assume_llama: Annotated[bool, typer.Option("--assume-llama", rich_help_panel=MODEL,
                                               help="Read a config.json of an unknown model_type as a Llama block.")
                            ] = False

    def resolve(self, model: str):
        from memcalc.library import resolve_model

        return resolve_model(model, revision=self.revision, assume_llama=self.assume_llama)


class Output(Flags):
    units: UnitsOption = Unit.GIB
    as_json: JsonOption = False


class Precision(Flags):
    """The training precision and optimizer: what every training command shares with the planner."""

    dtype: Annotated[TrainDType, typer.Option("--dtype", metavar="DTYPE", rich_help_panel=MODEL,
                                              help=f"Training precision: {choices(TrainDType)}; 16-bit means mixed "
                                              "precision.")] = TrainDType.BF16
    no_master_weights: Annotated[bool, typer.Option("--no-master-weights", rich_help_panel=MODEL,
                                                    help="16-bit training without the fp32 master copy: pure "
                                                    "16-bit.")] = False
    precision: Annotated[str | None, typer.Option("--precision", show_default=False, rich_help_panel=MODEL,
                                                  autocompletion=_complete_precision,
                                                  help="A named recipe (`memcalc precisions`: mixed-bf16, pure-bf16, "
                                                  "amp-bf16, megatron-bf16, te-fp8, deepseek-fp8, msamp-o2, mxfp8, "
                                                  "...); overrides --dtype and --no-master-weights.")] = None
    optimizer: Annotated[Optimizer, typer.Option("--optimizer", metavar="NAME", rich_help_panel=MODEL,
                                                 help=f"Optimizer whose states are counted: {choices(Optimizer)}.")
                         ] = Optimizer.ADAMW
    optimizer_dtype: Annotated[TrainDType | None, typer.Option("--optimizer-dtype", show_default=False,
                                                               metavar="DTYPE", rich_help_panel=MODEL,
                                                               help="Dtype of the optimizer moments (default: the "
                                                               "recipe's, fp32 with mixed precision).")] = None
    optimizer_impl: Annotated[OptimizerImpl, typer.Option("--optimizer-impl", metavar="IMPL", rich_help_panel=MODEL,
                                                          help=f"torch.optim implementation: "
                                                          f"{choices(OptimizerImpl)}.")] = OptimizerImpl.FOREACH


# one meaning in train and infer: each takes the kind of file it can use
CALIBRATION_HELP = ("Terms measured on this machine (`memcalc calibrate ... --out FILE`): a vLLM start-up's "
                    "activation peak and non-torch memory (infer --engine vllm), or the allocator's reserve from a "
                    "torch.cuda.memory_stats() dump (train).")


class Workload(Flags):
    """One training step's batch, memory savers, fine-tuning and estimator."""

    batch: BatchOption = 1
    seq: SeqOption = None
    grad_accum: Annotated[int, typer.Option("--grad-accum", metavar="N", min=1, rich_help_panel=BATCH,
                                            help="Micro-batches accumulated per step.")] = 1
    recompute: Annotated[Recompute, typer.Option("--recompute", metavar="MODE", rich_help_panel=SAVERS,
                                                 help=f"Activation recomputation: {choices(Recompute)} "
                                                 "(op: torchtitan's per-op policy, see --sac-save).")
                         ] = Recompute.NONE
    recompute_layers: Annotated[int, typer.Option("--recompute-layers", metavar="N", min=1, rich_help_panel=SAVERS,
                                                  help="Checkpoint only every Nth layer (full or op; torchtitan's "
                                                  "selective_ac_option N).")] = 1
    sac_save: Annotated[str | None, typer.Option("--sac-save", metavar="OUTPUTS", show_default=False,
                                                 rich_help_panel=SAVERS,
                                                 help="op: outputs each layer keeps, of q,k,v,o,gate,up,down,"
                                                 "attention (default: every other matmul and attention).")] = None
    offload_activations: Annotated[bool, typer.Option("--offload-activations", rich_help_panel=SAVERS,
                                                      help="Saved activations to pinned CPU memory in forward, back "
                                                      "in backward (torchtune's enable_activation_offloading).")
                                   ] = False
    attention: AttentionOption = Attention.SDPA
    loss: LossOption = Loss.FULL
    dropout: Annotated[float | None, typer.Option("--dropout", metavar="P", min=0.0, max=0.999, show_default=False,
                                                  rich_help_panel=BATCH,
                                                  help="Every dropout the model has at this rate (0: off; default: "
                                                  "its config's rates).")] = None
    optimizer_in_backward: Annotated[bool, typer.Option("--optimizer-in-backward", rich_help_panel=SAVERS,
                                                        help="Step each parameter as its gradient appears "
                                                        "(torchtune): no gradient buffer.")] = False
    paged: Annotated[bool, typer.Option("--paged", rich_help_panel=SAVERS,
                                        help="bitsandbytes paged optimizer states: CUDA managed memory outside "
                                        "the allocator that moves to the CPU under pressure (shown beside the "
                                        "device total, not in it).")] = False
    expandable_segments: ExpandableOption = False
    lora_rank: Annotated[int | None, typer.Option("--lora-rank", metavar="N", min=1, show_default=False, rich_help_panel=LORA,
                                                  help="Train LoRA adapters of this rank; the base is frozen.")
                         ] = None
    lora_targets: Annotated[str, typer.Option("--lora-targets", rich_help_panel=LORA,
                                              help="Projections with adapters: q,k,v,o,gate,up,down or all.")] = "q,v"
    lora_dtype: Annotated[TrainDType, typer.Option("--lora-dtype", metavar="DTYPE", rich_help_panel=LORA,
                                                   help="Adapter dtype (PEFT upcasts adapters to fp32).")
                          ] = TrainDType.FP32
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", metavar="P", min=0.0, max=0.999,
                                                rich_help_panel=LORA,
                                                help="PEFT's lora_dropout: each adapter keeps a dropped copy of "
                                                "its input and a mask.")] = 0.0
    qlora: Annotated[bool, typer.Option("--qlora", rich_help_panel=LORA,
                                        help="Base linear weights in bitsandbytes NF4 with double quantisation.")
                     ] = False
    calibration: Annotated[str | None, typer.Option("--calibration", metavar="FILE", show_default=False,
                                                    rich_help_panel=OUTPUT, help=CALIBRATION_HELP)] = None
    activation_model: Annotated[ActivationModel, typer.Option(
        "--activation-model", metavar="MODEL", rich_help_panel=OUTPUT,
        help="arch: saved tensors of the actual block; megatron: Korthikanti et al. 2022; both: arch, with the "
        "Megatron formula as a reference row.")] = ActivationModel.ARCH


class Layout(Flags):
    """The parallel layout; every flag has the ``compare --scenario`` key of the same name."""

    gpus: Annotated[int | None, typer.Option("--gpus", metavar="N", min=1, show_default=False, rich_help_panel=LAYOUT,
                                             help="GPUs in the job; must equal dp x tp x pp x cp (dp follows from it "
                                             "when not given).")] = None
    dp: Annotated[int | None, typer.Option("--dp", metavar="N", min=1, show_default=False, rich_help_panel=LAYOUT,
                                           help="Data-parallel degree (default: --gpus / (tp x pp x cp), or 1).")
                  ] = None
    tp: Annotated[int | None, typer.Option("--tp", metavar="N", min=1, show_default=False, rich_help_panel=LAYOUT,
                                           help="Tensor-parallel degree (divides heads and KV heads; default 1).")
                  ] = None
    pp: Annotated[int | None, typer.Option("--pp", metavar="N", min=1, show_default=False, rich_help_panel=LAYOUT,
                                           help="Pipeline stages (pp x vpp divides the layers; default 1).")] = None
    cp: Annotated[int | None, typer.Option("--cp", metavar="N", min=1, show_default=False, rich_help_panel=LAYOUT,
                                           help="Context-parallel degree (ring attention; splits the sequence).")
                  ] = None
    ep: Annotated[int | None, typer.Option("--ep", metavar="N", min=1, show_default=False, rich_help_panel=LAYOUT,
                                           help="Expert-parallel degree (MoE; carved out of dp x cp, divides the "
                                           "experts).")] = None
    sp: Annotated[bool, typer.Option("--sp", rich_help_panel=LAYOUT,
                                     help="Sequence parallelism with TP: norms, dropout and block inputs split by TP.")
                  ] = False
    zero: Annotated[int | None, typer.Option("--zero", metavar="N", min=0, max=3, show_default=False, rich_help_panel=LAYOUT,
                                             help="ZeRO stage: 1 optimizer states, 2 + gradients, 3 + parameters "
                                             "sharded over the data-parallel ranks.")] = None
    fsdp: Annotated[FSDPMode | None, typer.Option("--fsdp", metavar="MODE", show_default=False, rich_help_panel=LAYOUT,
                                                  help="FSDP sharding: full (ZeRO-3), grad-op (ZeRO-2), hybrid "
                                                  "(ZeRO-3 inside a node).")] = None
    fsdp_wrap: Annotated[FSDPWrap | None, typer.Option(
        "--fsdp-wrap", metavar="UNITS", show_default=False, rich_help_panel=LAYOUT,
        help="FSDP2 units beside the layers: layer (the root holds embedding and head; default), "
        "layer+embedding+head (torchtune), torchtitan (embedding; norm and head kept after forward).")] = None
    distributed_optimizer: Annotated[bool, typer.Option(
        "--distributed-optimizer", rich_help_panel=LAYOUT,
        help="Megatron's distributed optimizer: fp32 master weights and moments sharded over DP; with bf16, fp32 "
        "main grads (6 + 12/d B/param).")] = False
    microbatches: Annotated[int | None, typer.Option("--microbatches", metavar="N", min=1, show_default=False,
                                                     rich_help_panel=LAYOUT,
                                                     help="Micro-batches per step per data-parallel rank (default: "
                                                     "enough to fill the pipeline).")] = None
    vpp: Annotated[int | None, typer.Option("--vpp", metavar="N", min=1, show_default=False, rich_help_panel=LAYOUT,
                                            help="Virtual pipeline stages per rank (interleaved 1F1B).")] = None
    pp_layers: Annotated[str | None, typer.Option("--pp-layers", metavar="N,N,...", show_default=False,
                                                  rich_help_panel=LAYOUT,
                                                  help="Uneven pipeline stages: the layers on each pipeline rank, "
                                                  "in rank order, e.g. 15,16,16,16,16,16,16,15 (in a --scenario "
                                                  "string: 15/16/.../15).")] = None
    pp_first_layers: Annotated[int | None, typer.Option("--pp-first-layers", metavar="N", show_default=False,
                                                        rich_help_panel=LAYOUT,
                                                        help="Layers on the first pipeline rank; the rest split "
                                                        "evenly over the other ranks, as Megatron-LM's uneven "
                                                        "stages.")] = None
    pp_last_layers: Annotated[int | None, typer.Option("--pp-last-layers", metavar="N", show_default=False,
                                                       rich_help_panel=LAYOUT,
                                                       help="Layers on the last pipeline rank (with or without "
                                                       "--pp-first-layers).")] = None
    offload: Annotated[Offload | None, typer.Option("--offload", metavar="WHAT", show_default=False,
                                                    rich_help_panel=LAYOUT,
                                                    help="none, optimizer (ZeRO-Offload: fp32 grads, master, moments and "
                                                    "the step on the CPU), params (ZeRO-Infinity, --zero 3), both "
                                                    "(default none).")] = None
    pad_vocab: Annotated[bool, typer.Option("--pad-vocab", rich_help_panel=LAYOUT,
                                            help="Pad the vocabulary to a multiple of 128 x TP as Megatron does "
                                            "(the default when TP > 1).")] = False
    no_pad_vocab: Annotated[bool, typer.Option("--no-pad-vocab", rich_help_panel=LAYOUT,
                                               help="Keep the vocabulary unpadded under TP.")] = False
    prefetch: Annotated[int | None, typer.Option("--prefetch", metavar="N", min=0, show_default=False, rich_help_panel=LAYOUT,
                                                 help="ZeRO-3 units gathered ahead of use (default 1, FSDP2).")
                        ] = None
    gpus_per_node: Annotated[int | None, typer.Option("--gpus-per-node", metavar="N", min=1, show_default=False,
                                                      rich_help_panel=LAYOUT,
                                                      help="GPUs per node, for --fsdp hybrid (default 8).")] = None
    tp_impl: Annotated[TPImpl | None, typer.Option("--tp-impl", metavar="IMPL", show_default=False,
                                                   rich_help_panel=LAYOUT,
                                                   help="megatron (Megatron-LM/TE: Korthikanti Table 2, the "
                                                   "default) or dtensor (PyTorch DTensor TP as torchtitan: whole "
                                                   "embedding gradient, loss_parallel, SP inputs saved gathered).")
                       ] = None
    ddp_bucket_view: Annotated[bool, typer.Option("--ddp-bucket-view", rich_help_panel=LAYOUT,
                                                  help="PyTorch DDP with gradient_as_bucket_view=True: the "
                                                  "gradients live in its buckets (default: a second copy).")] = False
    reduce_bucket_size: Annotated[int | None, typer.Option("--reduce-bucket-size", metavar="N", min=1, show_default=False,
                                                           rich_help_panel=LAYOUT,
                                                           help="DeepSpeed ZeRO-1/2/3: elements of its gradient "
                                                           "reduction buffer (reduce bucket size, default 5e8).")
                                  ] = None
    zero3_prefetch: Annotated[int | None, typer.Option(
        "--zero3-prefetch", metavar="N", min=1, show_default=False, rich_help_panel=LAYOUT,
        help="DeepSpeed ZeRO-3 stage3 prefetch bucket size: elements prefetched per fetch (default 5e7).")] = None
    zero3_max_live: Annotated[int | None, typer.Option(
        "--zero3-max-live", metavar="N", min=1, show_default=False, rich_help_panel=LAYOUT,
        help="DeepSpeed ZeRO-3 stage3 max live parameters: elements gathered at most before prefetching "
        "stops (default 1e9).")] = None
    zero3_reuse_distance: Annotated[int | None, typer.Option(
        "--zero3-reuse-distance", metavar="N", min=1, show_default=False, rich_help_panel=LAYOUT,
        help="DeepSpeed ZeRO-3 stage3 max reuse distance: a parameter used again within this many "
        "elements stays gathered (default 1e9).")] = None
    zero3_persistence: Annotated[int | None, typer.Option(
        "--zero3-persistence", metavar="N", min=1, show_default=False, rich_help_panel=LAYOUT,
        help="DeepSpeed ZeRO-3 stage3 param persistence threshold: parameters of at most this many "
        "elements stay whole (default 1e5).")] = None
    overlap_comm: Annotated[bool, typer.Option("--overlap-comm", rich_help_panel=LAYOUT,
                                               help="DeepSpeed ZeRO-1/2 with overlap_comm: two reduction buffers "
                                               "(default one).")] = False

    def scenario(self):
        """The layout as a :class:`~memcalc.scenario.Scenario`, the type ``--scenario`` strings and
        files parse into: unset flags stay unset, so a scenario can override them."""
        from memcalc.scenario import Scenario

        if self.pad_vocab and self.no_pad_vocab:
            raise InputError("--pad-vocab and --no-pad-vocab: give one")
        values = {name: getattr(self, name) for name in self.defaults() if name != "no_pad_vocab"}
        values["pad_vocab"] = True if self.pad_vocab else False if self.no_pad_vocab else None
        return Scenario(**values)


class Generation(Flags):
    """A generate() run's decoding: what infer and validate --workload infer share."""

    decoding: Annotated[Decoding | None, typer.Option("--decoding", metavar="MODE", show_default=False,
                                                      rich_help_panel=DECODING,
                                                      help="greedy, beam or sample (default: beam with --num-beams "
                                                      "> 1, else greedy).")] = None
    num_beams: Annotated[int, typer.Option("--num-beams", metavar="N", min=1, rich_help_panel=DECODING,
                                           help="Beam search width (1: greedy).")] = 1
    num_return_sequences: Annotated[int, typer.Option("--num-return-sequences", metavar="N", min=1, rich_help_panel=DECODING,
                                                      help="Sampling: sequences per prompt (each cached).")] = 1
    top_k: Annotated[int | None, typer.Option("--top-k", metavar="N", min=1, show_default=False, rich_help_panel=DECODING,
                                              help="Sampling: top-k.")] = None
    top_p: Annotated[float | None, typer.Option("--top-p", show_default=False, rich_help_panel=DECODING,
                                                help="Sampling: top-p (nucleus).")] = None
    temperature: Annotated[float, typer.Option("--temperature", rich_help_panel=DECODING,
                                               help="Sampling temperature.")] = 1.0


class Serving(Flags):
    """How inference runs: weights, cache, prefill, engine."""

    dtype: Annotated[DType, typer.Option("--dtype", metavar="DTYPE", rich_help_panel=MODEL,
                                         help=f"Compute dtype ({choices(DType)}), and the weights' unless --weights "
                                         "names a format (fp8/int8/int4 here: every tensor, no scales).")
                     ] = DType.BF16
    weights: Annotated[str | None, typer.Option("--weights", show_default=False, rich_help_panel=MODEL,
                                                help="Weight format: fp32, fp16, bf16, fp8, fp8-block, mxfp8, mxfp4, "
                                                "nvfp4, int8 (LLM.int8), gptq, awq, bnb-nf4, bnb-fp4, or a GGUF type "
                                                "(q4_0, q4_k, q6_k, q8_0, ...); see docs/weight-formats.md.")] = None
    group_size: Annotated[int, typer.Option("--group-size", rich_help_panel=MODEL,
                                            help="GPTQ/AWQ group size (-1: per column).")] = 128
    no_double_quant: Annotated[bool, typer.Option("--no-double-quant", rich_help_panel=MODEL,
                                                  help="bitsandbytes 4-bit: leave the block constants unquantised "
                                                  "(4.5 instead of 4.127 bits).")] = False
    kv_dtype: Annotated[KVDType | None, typer.Option("--kv-dtype", metavar="DTYPE", show_default=False,
                                                     rich_help_panel=MODEL,
                                                     help=f"KV-cache dtype: {choices(KVDType)} (default: the compute "
                                                     "dtype if a float type, else bf16).")] = None
    batch: BatchOption = 1
    context: Annotated[int | None, typer.Option("--context", "-c", metavar="N", min=1, show_default=False, rich_help_panel=BATCH,
                                                help="Tokens per sequence held in the KV cache (default: min(2048, "
                                                "the model's maximum)).")] = None
    prompt: PromptOption = None
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", metavar="N", min=0, rich_help_panel=BATCH,
                                                help="Tokens generated after the prompt.")] = 0
    prefill_logits: Annotated[PrefillLogits, typer.Option("--prefill-logits", metavar="WHICH", rich_help_panel=SERVING,
                                                          help="last: logits of the last prompt position "
                                                          "(generate()); all: every position, upcast to fp32.")
                              ] = PrefillLogits.LAST
    prefill_chunk: Annotated[int | None, typer.Option("--prefill-chunk", metavar="N", min=1, show_default=False,
                                                      rich_help_panel=SERVING,
                                                      help="Tokens per prefill forward (chunked prefill).")] = None
    attention: Annotated[Attention, typer.Option("--attention", metavar="KERNEL", rich_help_panel=SERVING,
                                                 help=f"Attention kernel of the prefill: {choices(Attention)}; eager "
                                                 "keeps the a*s^2 scores.")] = Attention.SDPA
    engine: Annotated[Engine, typer.Option("--engine", metavar="ENGINE", rich_help_panel=SERVING,
                                           help="hf: a Hugging Face generate() loop; paged: a paged server "
                                           "(blocks, no cache copies); vllm, sglang, trtllm, llamacpp: paged, "
                                           "with that engine's start-up budget (--gpu).")] = Engine.HF
    block_size: Annotated[int, typer.Option("--block-size", metavar="N", min=1, rich_help_panel=SERVING,
                                            help="Paged engine: tokens per KV block.")] = 16
    tp: Annotated[int, typer.Option("--tp", metavar="N", min=1, rich_help_panel=SERVING,
                                    help="Tensor-parallel GPUs (per-GPU numbers).")] = 1
    expandable_segments: ExpandableOption = False
    overhead: Annotated[str | None, typer.Option("--overhead", show_default=False, rich_help_panel=SERVING,
                                                 help="Runtime overhead per GPU, e.g. 1GiB (default: CUDA context "
                                                 "400 MiB + cuBLAS workspace 32 MiB).")] = None


# --- The one path from groups to settings ------------------------------------------------------------


def train_settings(precision: Precision, workload: Workload | None = None, **fixed: Any) -> TrainSettings:
    """``TrainSettings`` from the precision and workload groups (the planner has no workload: it
    searches batch and recompute itself); ``fixed`` sets what a command decides, e.g. attention."""
    values = {"dtype": precision.dtype, "master_weights": not precision.no_master_weights,
              "optimizer": precision.optimizer,
              "precision": precision.precision, "optimizer_dtype": precision.optimizer_dtype,
              "optimizer_impl": precision.optimizer_impl}
    if workload is not None:
        if workload.paged and precision.optimizer is not Optimizer.ADAM8BIT:
            raise InputError("--paged applies to bitsandbytes' 8-bit optimizers: use --optimizer adam8bit")
        if workload.qlora and workload.lora_rank is None:
            raise InputError("--qlora needs --lora-rank")
        values |= {"batch_size": workload.batch, "seq_len": workload.seq, "grad_accum": workload.grad_accum,
                   "recompute": workload.recompute, "attention": workload.attention, "loss": workload.loss,
                   "optimizer_in_backward": workload.optimizer_in_backward, "paged_optimizer": workload.paged,
                   "activation_model": workload.activation_model,
                   "expandable_segments": workload.expandable_segments,
                   "recompute_layers": workload.recompute_layers, "sac_save": workload.sac_save,
                   "offload_activations": workload.offload_activations, "dropout": workload.dropout}
        if workload.calibration is not None:
            from memcalc.calibration import read_reserve_calibration

            values["reserve_percent"], values["reserve_source"] = read_reserve_calibration(workload.calibration)
        if workload.lora_rank is not None:
            targets = workload.lora_targets.strip()
            values |= {"lora_rank": workload.lora_rank, "lora_targets": ",".join(LORA_TARGETS) if targets == "all"
                       else targets, "lora_dtype": workload.lora_dtype, "qlora": workload.qlora,
                       "lora_dropout": workload.lora_dropout}
    return TrainSettings(**(values | fixed))


def infer_settings(serving: Serving | None, generation: Generation, **fixed: Any) -> InferSettings:
    """``InferSettings`` from the serving and generation groups; ``validate`` has no serving group
    and gives its dtype, batch and prompt in ``fixed``."""
    values: dict[str, Any] = {"decoding": generation.decoding, "num_beams": generation.num_beams,
                              "num_return_sequences": generation.num_return_sequences, "top_k": generation.top_k,
                              "top_p": generation.top_p, "temperature": generation.temperature}
    if serving is not None:
        if serving.max_new_tokens and serving.prompt is None and serving.context is None:
            raise InputError("--max-new-tokens needs --prompt")
        weights = serving.weights
        if weights is not None:
            from memcalc.estimate.weights import parse_weight_format

            try:
                weights = parse_weight_format(weights).value
            except ValueError as exc:
                raise InputError(f"--weights: {exc}") from None
        values |= {"dtype": serving.dtype, "weights": weights, "group_size": serving.group_size,
                   "double_quant": not serving.no_double_quant, "kv_dtype": serving.kv_dtype,
                   "batch_size": serving.batch,
                   "context_len": serving.context, "prompt_len": serving.prompt,
                   "max_new_tokens": serving.max_new_tokens, "prefill_logits": serving.prefill_logits,
                   "prefill_chunk": serving.prefill_chunk, "attention": serving.attention, "engine": serving.engine,
                   "block_size": serving.block_size, "tp": serving.tp,
                   "overhead_bytes": parse_size("--overhead", serving.overhead),
                   "expandable_segments": serving.expandable_segments}
    return InferSettings(**(values | fixed))


def parse_size(flag: str, text: str | None) -> int | None:
    if text is None:
        return None
    from memcalc.units import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise InputError(f"{flag}: {exc}") from None


# --- Spreading groups into a signature ---------------------------------------------------------------


def _group_types(func) -> dict[str, type]:
    hints = get_type_hints(func, include_extras=True)
    return {name: hint for name, hint in hints.items() if isinstance(hint, type) and issubclass(hint, Flags)}


PANELS = (MODEL, BATCH, SAVERS, LORA, LAYOUT, DECODING, SERVING)  # then a command's own panels, then OUTPUT


def _panel_rank(parameter: inspect.Parameter) -> int:
    info = next((item for item in getattr(parameter.annotation, "__metadata__", ())
                 if hasattr(item, "rich_help_panel")), None)
    panel = getattr(info, "rich_help_panel", None)
    if panel is None:  # the model argument and a command's unpanelled options come first
        return -1
    return PANELS.index(panel) if panel in PANELS else len(PANELS) + (panel == OUTPUT)


def expand(func):
    """``func`` with each parameter annotated by a :class:`Flags` group replaced, in the signature
    typer reads, by the group's fields; the wrapper builds the group back from them."""
    groups = _group_types(func)
    hints = get_type_hints(func, include_extras=True)
    parameters: list[inspect.Parameter] = []
    owner: dict[str, str] = {}
    for parameter in inspect.signature(func).parameters.values():
        group = groups.get(parameter.name)
        if group is None:
            parameters.append(parameter.replace(annotation=hints.get(parameter.name, parameter.annotation)))
            continue
        group_hints = get_type_hints(group, include_extras=True)
        for name, default in group.defaults().items():
            if name in owner or any(p.name == name for p in parameters):
                raise TypeError(f"{func.__name__}: option {name!r} is declared twice")
            owner[name] = parameter.name
            parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                                annotation=group_hints[name], default=default))

    @functools.wraps(func)
    def command(**values: Any):
        members: dict[str, dict[str, Any]] = {name: {} for name in groups}
        for name, group_name in owner.items():
            members[group_name][name] = values.pop(name)
        return func(**values, **{name: groups[name](**members[name]) for name in groups})

    parameters.sort(key=_panel_rank)  # help lists the panels in PANELS order
    command.__signature__ = inspect.Signature(
        [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in parameters])
    command.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    return command
