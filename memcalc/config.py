"""Validated inputs: the decoder architecture schema and the settings of each estimate.

The schemas are frozen dataclasses with their constraints in the annotations; pydantic validates
them at the boundary (``parse``: memcalc YAML files, Hugging Face config.json, scenario files)
and is imported only there, so the hot path of the CLI never loads its schema machinery.
Bundled model files are validated by the test suite and built directly (``model_from_trusted``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from memcalc.bounds import Fraction, NonNegativeInt, PositiveInt, Probability
from memcalc.dtypes import DType
from memcalc.errors import Field, SettingsError

if TYPE_CHECKING:  # imported when a file is validated (parse) or built (model_from_trusted): not on start-up
    from memcalc.mixers import LinearAttentionConfig, MambaConfig, MLAConfig
    from memcalc.vision import VisionTower

# Sequence length used when none is given; capped by the model's maximum positions.
DEFAULT_SEQ_LEN = 2048
DEFAULT_BATCH_SIZE = 1

# pydantic reads ``__pydantic_config__`` on standard-library dataclasses: unknown keys in a
# memcalc file are errors (a misspelt ``hiden_size`` must not pass silently).
_FORBID_EXTRA = {"extra": "forbid"}


class MLPKind(StrEnum):
    GATED = "gated"  # SwiGLU / GeGLU: gate, up and down projections
    PLAIN = "plain"  # up projection, activation, down projection (GPT-2, GPT-3)
    NONE = "none"  # no MLP: the layer is a norm and its mixer (Mamba-2 blocks)


class NormKind(StrEnum):
    RMSNORM = "rmsnorm"
    LAYERNORM = "layernorm"


class PositionKind(StrEnum):
    ROTARY = "rotary"  # no parameters
    LEARNED = "learned"  # a max_positions x hidden table (GPT-2, GPT-3)
    NONE = "none"  # no position encoding (NoPE: Nemotron-H's and Jamba's attention, Mamba models)


class LayerType(StrEnum):
    """A decoder layer's token mixer (Hugging Face ``layer_types`` values)."""

    FULL_ATTENTION = "full_attention"
    SLIDING_ATTENTION = "sliding_attention"  # attends to the last ``sliding_window`` tokens
    CHUNKED_ATTENTION = "chunked_attention"  # attends within blocks of ``attention_chunk_size`` (Llama 4)
    LINEAR_ATTENTION = "linear_attention"  # gated delta net with a fixed recurrent state (Qwen3-Next)
    MAMBA = "mamba"  # a Mamba or Mamba-2 mixer with conv and SSM state (Jamba, Granite-4.0-H, Codestral)
    NONE = "none"  # no token mixer: an MLP or MoE block of its own (Nemotron-H's "-" and "E" blocks)
    ATTENTION_MAMBA = "attention_mamba"  # attention and a Mamba-2 mixer side by side on one input (Falcon-H1)


ATTENTION_LAYER_TYPES = (LayerType.FULL_ATTENTION, LayerType.SLIDING_ATTENTION, LayerType.CHUNKED_ATTENTION)
# Layers that cache keys and values, and layers that keep a Mamba state
KV_LAYER_TYPES = (*ATTENTION_LAYER_TYPES, LayerType.ATTENTION_MAMBA)
MAMBA_LAYER_TYPES = (LayerType.MAMBA, LayerType.ATTENTION_MAMBA)


class NormPlacement(StrEnum):
    PRE = "pre"  # a norm before attention and before the MLP (Llama)
    POST = "post"  # a norm of each sublayer's output before the residual add, none before (OLMo 2)
    SANDWICH = "sandwich"  # both: four norms a layer (Gemma 2 and 3)


class QKNormScope(StrEnum):
    HEAD = "head"  # an RMSNorm of head_dim on every query and key head (Qwen3, Gemma 3)
    FULL = "full"  # one RMSNorm over all query heads' and one over all key heads' width (OLMo 2)
    L2 = "l2"  # a weightless L2 norm of each head on the rotary (chunked-attention) layers (Llama 4)


def _coerce_enums(instance: Any, **enum_fields: type[Enum]) -> None:
    """Accept the enum's string value from Python callers too (pydantic already converts)."""
    for name, enum in enum_fields.items():
        value = getattr(instance, name)
        if value is not None and not isinstance(value, enum):
            object.__setattr__(instance, name, enum(value))


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Mixture-of-experts MLP. Expert MLPs share ``ModelConfig.mlp`` (gated or plain)."""

    __pydantic_config__ = _FORBID_EXTRA

    num_experts: PositiveInt  # routed experts per MoE layer
    experts_per_token: PositiveInt  # routed experts each token visits (top-k)
    expert_intermediate_size: PositiveInt  # hidden width of one routed expert
    num_shared_experts: NonNegativeInt = 0  # experts every token visits
    shared_expert_intermediate_size: PositiveInt | None = None  # default: the routed expert width
    first_dense_layers: NonNegativeInt = 0  # leading layers with a dense MLP instead of experts
    shared_expert_gate: bool = False  # a hidden_size -> 1 sigmoid gate on the shared experts (Qwen2-MoE)
    # indices of the MoE layers when they are not all layers from first_dense_layers on (Llama 4's
    # interleave_moe_layer_step, Qwen-MoE's decoder_sparse_step/mlp_only_layers, Jamba's period)
    layers: tuple[NonNegativeInt, ...] = ()
    router_bias: bool = False  # the router linear has a bias (gpt-oss)
    expert_bias: bool = False  # each expert's projections have biases (gpt-oss)
    # gpt-oss's experts (GptOssExperts._apply_gate): a clamped SwiGLU, x * sigmoid(alpha x) times (up + 1)
    clamped_swiglu: bool = False
    # the router renormalises its top-k weights (NemotronHTopkRouter's and Qwen3NextTopKRouter's
    # norm_topk_prob; None: not read, their configs' default True): sizes only the training activations
    # of a hybrid Mamba-2 stack's or Qwen3-Next's experts (hf_grouped_moe_saved_bytes,
    # qwen3_next_moe_saved_bytes)
    norm_topk_prob: bool | None = None
    # the router returns fp32 routing weights, which the experts' weighted output takes (DeepSeek-V2/V3,
    # Kimi K2, GLM-4.5, Nemotron-H: their routers compute in fp32 and never cast back); sizes only
    # transformers' grouped_mm experts in a no-grad forward (memcalc.estimate.inference)
    routing_fp32: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("moe.layers lists a layer twice")
        if self.layers and self.first_dense_layers:
            raise ValueError("give moe.layers or moe.first_dense_layers, not both")
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})"
            )


class MambaVersion(StrEnum):
    MAMBA1 = "mamba1"  # Gu & Dao 2023 (arXiv:2312.00752): selective scan over expand x hidden channels (Jamba)
    MAMBA2 = "mamba2"  # Dao & Gu 2024 (arXiv:2405.21060): SSD heads with grouped B/C (Codestral, Granite-4.0-H)


@dataclass(frozen=True, kw_only=True)
class CheckpointFormat:
    """How the published checkpoint stores its weights (config.json's ``torch_dtype``/``dtype`` and
    ``quantization_config``): the default of ``memcalc infer --weights``."""

    __pydantic_config__ = _FORBID_EXTRA

    dtype: DType | None = None  # the unquantised tensors' dtype
    weights: str | None = None  # a memcalc weight format for the quantised linear weights (memcalc.estimate.weights)
    group_size: int | None = None  # GPTQ/AWQ
    unquantized: tuple[str, ...] = ()  # parameter categories whose linear weights stay in dtype (e.g. attention)
    source: str = ""  # what was read, e.g. "quantization_config.quant_method mxfp4"

    def __post_init__(self) -> None:
        _coerce_enums(self, dtype=DType)
        object.__setattr__(self, "unquantized", tuple(self.unquantized))


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer, described by the sizes that determine its memory.

    Field names follow Hugging Face where one exists; all sizes are element counts.
    """

    __pydantic_config__ = _FORBID_EXTRA

    name: str
    aliases: tuple[str, ...] = ()
    source: str = ""  # where the numbers come from (config.json URL, paper)
    notes: tuple[str, ...] = ()  # assumptions made while reading the config

    hidden_size: PositiveInt
    num_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_kv_heads: PositiveInt | None = None  # key/value heads (GQA/MQA); default: attention heads
    head_dim: PositiveInt | None = None  # default: hidden_size / num_attention_heads
    intermediate_size: PositiveInt | None = None  # MLP hidden width of a dense layer (required unless mlp: none)
    vocab_size: PositiveInt
    max_position_embeddings: PositiveInt
    tie_word_embeddings: bool

    mlp: MLPKind = MLPKind.GATED
    hidden_act: str = "silu"
    norm: NormKind = NormKind.RMSNORM
    norm_bias: bool = False  # LayerNorm with a bias vector
    norm_weight_offset: bool = False  # Gemma's RMSNorm: x * (1 + weight), normalised and scaled in fp32
    norms_per_layer: PositiveInt = 2  # 2 for pre-norm blocks, 4 for Gemma-2 sandwich norms
    qk_norm: bool = False  # RMSNorm of head_dim on each query and key head (Qwen3)
    qkv_bias: bool = False
    attn_output_bias: bool = False
    mlp_bias: bool = False
    position_embedding: PositionKind = PositionKind.ROTARY
    sliding_window: PositiveInt | None = None
    # Hugging Face's sliding_window_pattern: in each group of n layers the last attends globally
    # (Gemma-2: 2, Gemma-3: 6); None with a sliding_window: every layer slides (Mistral v0.1)
    sliding_window_pattern: PositiveInt | None = None
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None  # multi-head latent attention replaces q/k/v projections (DeepSeek-V2/V3)
    # Heterogeneous layers (Hugging Face ``layer_types``): one mixer per layer; empty: every layer
    # attends, sliding as sliding_window and sliding_window_pattern say
    layer_types: tuple[LayerType, ...] = ()
    attention_chunk_size: PositiveInt | None = None  # chunked_attention layers' block (Llama 4: 8192)
    norm_placement: NormPlacement | None = None  # None: pre-norm (sandwich with norms_per_layer 4)
    qk_norm_scope: QKNormScope | None = None  # with qk_norm; None: per head
    attention_sinks: bool = False  # a learned sink logit per head and layer (gpt-oss)
    attn_output_gate: bool = False  # q_proj also gives a sigmoid gate of the attention output (Qwen3-Next)
    fused_gate_up: bool = False  # one gate_up projection whose output is split in two (Phi-3's gate_up_proj)
    partial_rotary_factor: Fraction = 1.0  # the share of each head's dims that rotary rotates (GLM-4.5: 0.5)
    mamba: MambaConfig | None = None  # the mixer of the mamba layers
    linear_attention: LinearAttentionConfig | None = None  # the mixer of the linear_attention layers
    vision: VisionTower | None = None  # a multimodal checkpoint's vision tower and projector
    # each layer is a norm and either its mixer or its MLP/MoE, never both (Nemotron-H's blocks)
    separate_blocks: bool = False
    checkpoint: CheckpointFormat | None = None  # the published checkpoint's dtype and quantisation
    # Dropout in training, as the Hugging Face class applies it (None: the architecture has no such
    # dropout): on the attention probabilities (every attention implementation takes one), on the
    # embeddings' sum (GPT-2 embd_pdrop), on each sublayer's output before its residual add (GPT-2,
    # Phi resid_pdrop)
    attention_dropout: Probability = 0.0
    # eager attention's softmax in fp32 (Llama-style classes: softmax(..., dtype=float32)); False: in
    # the scores' dtype (GPT-2's eager_attention_forward; autocast still runs it in fp32)
    softmax_in_fp32: bool = True
    embedding_dropout: Probability | None = None
    residual_dropout: Probability | None = None
    # config.json dropout keys above 0 that memcalc does not model (a training estimate refuses them)
    unmodelled_dropout: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _coerce_enums(self, mlp=MLPKind, norm=NormKind, position_embedding=PositionKind,
                      norm_placement=NormPlacement, qk_norm_scope=QKNormScope)
        object.__setattr__(self, "layer_types", tuple(LayerType(kind) for kind in self.layer_types))
        if self.intermediate_size is None and self.mlp is not MLPKind.NONE and len(self.moe_layer_indices) < self.num_layers:
            raise ValueError("intermediate_size is required for dense MLP layers")
        self._check_layers()
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_kv_heads ({self.kv_heads}) must divide num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                f"({self.hidden_size}) unless head_dim is given"
            )
        if self.moe is not None and self.moe.first_dense_layers > self.num_layers:
            raise ValueError(
                f"moe.first_dense_layers ({self.moe.first_dense_layers}) exceeds num_layers ({self.num_layers})"
            )

    def _check_layers(self) -> None:
        types = self.layer_types
        if types and len(types) != self.num_layers:
            raise ValueError(f"layer_types lists {len(types)} layers; num_layers is {self.num_layers}")
        needs = {LayerType.SLIDING_ATTENTION: ("sliding_window", self.sliding_window),
                 LayerType.CHUNKED_ATTENTION: ("attention_chunk_size", self.attention_chunk_size),
                 LayerType.LINEAR_ATTENTION: ("linear_attention", self.linear_attention),
                 LayerType.MAMBA: ("mamba", self.mamba), LayerType.ATTENTION_MAMBA: ("mamba", self.mamba)}
        needs[LayerType.NONE] = ("separate_blocks: true", self.separate_blocks or None)
        for kind in set(types):
            field, value = needs.get(kind, (None, True))
            if value is None:
                raise ValueError(f"layer_types has {kind.value} layers: give {field}")
        if self.moe is not None and any(index >= self.num_layers for index in self.moe.layers):
            raise ValueError(f"moe.layers names a layer beyond num_layers ({self.num_layers})")

    @property
    def resolved_layer_types(self) -> tuple[LayerType, ...]:
        """Each layer's mixer. Without ``layer_types``: sliding on every layer with a window but no
        pattern (Mistral v0.1), else on all but the last of each ``sliding_window_pattern`` layers."""
        if self.layer_types:
            return self.layer_types
        if self.sliding_window is None:
            return (LayerType.FULL_ATTENTION,) * self.num_layers
        pattern = self.sliding_window_pattern
        return tuple(LayerType.FULL_ATTENTION if pattern and (index + 1) % pattern == 0
                     else LayerType.SLIDING_ATTENTION for index in range(self.num_layers))

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        """Layers whose MLP is a mixture of experts."""
        if self.moe is None:
            return ()
        if self.moe.layers:
            return tuple(sorted(self.moe.layers))
        return tuple(range(min(self.moe.first_dense_layers, self.num_layers), self.num_layers))

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def num_sliding_layers(self) -> int:
        """Layers whose cache holds at most ``sliding_window`` tokens."""
        return self.resolved_layer_types.count(LayerType.SLIDING_ATTENTION)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    @property
    def is_uniform(self) -> bool:
        """Every layer attends and has the same MLP kind after the leading dense layers: the
        structure the activation model and the reference decoder were measured on."""
        attention = all(kind in ATTENTION_LAYER_TYPES for kind in self.resolved_layer_types)
        return attention and (self.moe is None or not self.moe.layers) and self.mamba is None \
            and self.linear_attention is None


def model_from_trusted(data: dict[str, Any]) -> ModelConfig:
    """Build a bundled model without pydantic. Its file is checked by ``parse`` in the tests
    (tests/test_library.py), which also checks that both paths give the same config."""
    nested: dict[str, Any] = {"moe": MoEConfig, "checkpoint": CheckpointFormat}
    if data.get("mla") or data.get("mamba") or data.get("linear_attention"):
        from memcalc.mixers import LinearAttentionConfig, MambaConfig, MLAConfig

        nested |= {"mla": MLAConfig, "mamba": MambaConfig, "linear_attention": LinearAttentionConfig}
    if data.get("vision"):
        from memcalc.vision import VisionTower

        nested["vision"] = VisionTower
    return ModelConfig(
        **{key: value for key, value in data.items() if key not in ("aliases", "notes", "layer_types", *nested)},
        aliases=tuple(data.get("aliases", ())),
        notes=tuple(data.get("notes", ())),
        layer_types=tuple(data.get("layer_types", ())),
        **{key: schema(**data[key]) for key, schema in nested.items() if data.get(key)},
    )


def config_as_dict(config: Any) -> dict[str, Any]:
    """A schema instance as JSON-ready data (enums as their values, tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return plain(asdict(config))


# --- Settings of an estimate ---------------------------------------------------------------------


class TrainDType(StrEnum):
    """Training precisions ``--dtype`` accepts; 16-bit means mixed precision unless told otherwise."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class KVDType(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"


class Optimizer(StrEnum):
    ADAMW = "adamw"
    ADAM = "adam"
    ADAM8BIT = "adam8bit"
    ADAFACTOR = "adafactor"
    LION = "lion"
    ADEMAMIX = "ademamix"
    SGD = "sgd"
    SGD_MOMENTUM = "sgd-momentum"


class Recompute(StrEnum):
    NONE = "none"
    SELECTIVE = "selective"  # Megatron's: the attention scores recomputed (Korthikanti et al. 2022 sec. 5)
    FULL = "full"  # each layer keeps its input and is run again in backward
    OP = "op"  # per-op selective checkpointing: chosen ops' outputs kept (torchtitan's op policy)

    @property
    def checkpoints_layers(self) -> bool:
        """Whether layers run under torch.utils.checkpoint (their inputs kept, the rest redone)."""
        return self in (Recompute.FULL, Recompute.OP)


class Attention(StrEnum):
    """eager materialises the a*s^2 scores; sdpa and flash kernels keep output and log-sum-exp."""

    SDPA = "sdpa"
    FLASH = "flash"
    EAGER = "eager"


class OptimizerImpl(StrEnum):
    """torch.optim's implementations: foreach (the CUDA default), fused, or a per-tensor loop."""

    FOREACH = "foreach"
    FUSED = "fused"
    FOR_LOOP = "for-loop"


class Loss(StrEnum):
    FULL = "full"  # all logits upcast to fp32 at once (transformers' ForCausalLMLoss)
    CHUNKED = "chunked"  # fused/chunked cross-entropy: one slice of tokens' logits at a time


class ActivationModel(StrEnum):
    ARCH = "arch"  # saved tensors of the actual block (GQA, gated MLP, attention kernel, loss)
    MEGATRON = "megatron"  # Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) per layer
    BOTH = "both"  # arch for the total, the Megatron formula shown beside it


# The projections LoRA can target (PEFT target_modules, by the Hugging Face Llama module names)
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
DEFAULT_LORA_TARGETS = ("q", "v")  # peft/utils/constants.py: "llama": ["q_proj", "v_proj"]


# What per-op checkpointing (--recompute op) can keep of a layer: a projection's output (its mm or
# addmm) or the attention kernel's outputs (SDPA: the output and the log-sum-exp)
SAC_OUTPUTS = LORA_TARGETS + ("attention",)


def _parse_names(names: str | tuple[str, ...] | list[str], allowed: tuple[str, ...], field: str) -> tuple[str, ...]:
    """``"q,v"`` or ``("q", "v")`` (``q_proj`` also accepted) as a tuple in ``allowed``'s order; a
    SettingsError names ``field`` and the allowed values."""
    items = names.split(",") if isinstance(names, str) else list(names)
    chosen = []
    for item in items:
        name = str(item).strip().lower()
        name = name[: -len("_proj")] if name.endswith("_proj") else name
        if name not in allowed:
            raise SettingsError(Field(field), f" {str(item).strip()!r} is not one of {', '.join(allowed)}")
        chosen.append(name)
    if not chosen:
        raise SettingsError(Field(field), f" is empty; choose from {', '.join(allowed)}")
    return tuple(name for name in allowed if name in chosen)


def parse_sac_save(names: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"q,v,attention"`` in the order of SAC_OUTPUTS."""
    return _parse_names(names, SAC_OUTPUTS, "sac_save")


def parse_lora_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"q,v"`` in the canonical order q, k, v, o, gate, up, down."""
    return _parse_names(targets, LORA_TARGETS, "lora_targets")


def _check_positive(instance: Any, *names: str) -> None:
    for name in names:
        value = getattr(instance, name)
        if value is not None and value <= 0:
            raise SettingsError(Field(name), f" must be positive, got {value}")


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """What one training step holds. ``seq_len=None`` means the default, capped by the model."""

    __pydantic_config__ = _FORBID_EXTRA

    dtype: TrainDType = TrainDType.BF16
    master_weights: bool = True  # 16-bit only: keep an fp32 master copy (mixed precision)
    optimizer: Optimizer = Optimizer.ADAMW
    batch_size: PositiveInt = DEFAULT_BATCH_SIZE
    seq_len: PositiveInt | None = None
    recompute: Recompute = Recompute.NONE
    attention: Attention = Attention.SDPA
    optimizer_impl: OptimizerImpl = OptimizerImpl.FOREACH
    activation_model: ActivationModel = ActivationModel.ARCH
    loss: Loss = Loss.FULL
    precision: str | None = None  # a named recipe (memcalc.precision.RECIPES); overrides dtype/master_weights
    optimizer_dtype: TrainDType | None = None  # optimizer moments' dtype; default: the recipe's
    optimizer_in_backward: bool = False  # step each parameter as its gradient appears (no gradient buffer)
    grad_accum: PositiveInt = 1  # micro-batches accumulated into the gradients before a step
    paged_optimizer: bool = False  # bitsandbytes paged states (unified memory that may spill to the CPU)
    fp8_transpose: bool = True  # FP8 recipes: keep a transposed FP8 weight copy (Hopper, Ada; not Blackwell)
    # LoRA (Hu et al. 2021) as PEFT applies it: the base model frozen, rank-r adapters on the targets
    lora_rank: PositiveInt | None = None  # None: full fine-tuning
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS  # projections that get adapters (PEFT's Llama default)
    lora_dtype: TrainDType = TrainDType.FP32  # adapters' dtype: PEFT's autocast_adapter_dtype=True upcasts to fp32
    qlora: bool = False  # base linear weights in bitsandbytes NF4 with double quantisation (QLoRA)
    lora_dropout: Probability = 0.0  # PEFT's lora_dropout: each adapter's input dropped (its mask kept)
    # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: the allocator's reserve (memcalc.estimate.device)
    expandable_segments: bool = False
    # full or op recompute on every Nth layer only (torchtitan's selective_ac_option N: layers N, 2N, ...)
    recompute_layers: PositiveInt = 1
    # op recompute: the outputs each layer keeps (SAC_OUTPUTS); None: torchtitan's policy
    sac_save: tuple[str, ...] | None = None
    # torchtune's enable_activation_offloading: saved activations of the model's forward copied to pinned
    # host memory and brought back in backward (memcalc.estimate.offload)
    offload_activations: bool = False
    # every dropout the model's architecture has at this rate (0: off); None: the config's rates
    dropout: Probability | None = None
    # the caching allocator's reserve over the allocated peak, measured on this machine (memcalc
    # calibrate of a torch.cuda.memory_stats() dump), in percent; None: the suite's median
    reserve_percent: float | None = None
    reserve_source: str | None = None  # where reserve_percent was measured

    def __post_init__(self) -> None:
        _coerce_enums(
            self, dtype=TrainDType, optimizer=Optimizer, recompute=Recompute, attention=Attention,
            optimizer_impl=OptimizerImpl, activation_model=ActivationModel, loss=Loss, optimizer_dtype=TrainDType,
            lora_dtype=TrainDType,
        )
        _check_positive(self, "batch_size", "seq_len", "grad_accum", "lora_rank", "recompute_layers")
        object.__setattr__(self, "lora_targets", parse_lora_targets(self.lora_targets))
        if self.sac_save is not None:
            object.__setattr__(self, "sac_save", parse_sac_save(self.sac_save))
            if self.recompute is not Recompute.OP:
                raise SettingsError(Field("sac_save"), " chooses what per-op checkpointing keeps: give ",
                                    Field("recompute"), " op too")
        if self.recompute_layers > 1 and not self.recompute.checkpoints_layers:
            raise SettingsError(Field("recompute_layers"), " checkpoints every Nth layer: give ", Field("recompute"),
                                " full or op too")
        if self.lora_rank is not None and (self.recompute is Recompute.OP or self.recompute_layers > 1):
            raise SettingsError(Field("recompute"), " op and ", Field("recompute_layers"),
                                " are modelled for full training: LoRA takes none, selective or full")
        if self.qlora and self.lora_rank is None:
            raise SettingsError(Field("qlora"), " trains LoRA adapters on a 4-bit base: give ", Field("lora_rank"), " too")
        if self.offload_activations:
            _check_offload_activations(self)
        if self.optimizer_in_backward and self.grad_accum > 1:
            raise SettingsError(Field("optimizer_in_backward"), " steps during backward: it cannot accumulate gradients (",
                                Field("grad_accum"), ")")
        if self.precision is not None:
            from memcalc.precision import RECIPES

            if self.precision not in RECIPES:
                raise SettingsError(Field("precision"), f": {self.precision!r} is not one of {', '.join(RECIPES)}")


def _check_offload_activations(settings: TrainSettings) -> None:
    """Activation offloading is measured (memcalc.validate.offload) with full training, SDPA/flash
    attention, the arch activation model and no recompute or full recompute on every layer."""
    if settings.lora_rank is not None:
        raise SettingsError(Field("offload_activations"), " is modelled for full training, not with ", Field("lora_rank"))
    if settings.attention is Attention.EAGER:
        raise SettingsError(Field("offload_activations"), " is modelled with sdpa or flash ", Field("attention"),
                            ", not eager")
    if settings.recompute not in (Recompute.NONE, Recompute.FULL) or settings.recompute_layers > 1:
        raise SettingsError(Field("offload_activations"), " is modelled with ", Field("recompute"),
                            " none or full on every layer")
    if settings.activation_model is not ActivationModel.ARCH:
        raise SettingsError(Field("offload_activations"), " has no Megatron formula: use ", Field("activation_model"),
                            " arch")


class Engine(StrEnum):
    """hf: a plain Hugging Face generate() loop (the cache grows by concatenation); paged: a paged
    server (vLLM-style blocks in a preallocated budget); vllm: the paged layout with vLLM's own
    start-up budget (memcalc.serving: weights, profiled activation peak, non-torch memory, CUDA
    graphs, KV);
    sglang, trtllm, llamacpp: the same layout with SGLang's (mem_fraction_static), TensorRT-LLM's
    (free_gpu_memory_fraction) or llama.cpp's (n_ctx cells, per-device layer split) budget."""

    HF = "hf"
    PAGED = "paged"
    VLLM = "vllm"
    SGLANG = "sglang"
    TRTLLM = "trtllm"
    LLAMACPP = "llamacpp"

    @property
    def paged(self) -> bool:
        """Whether the cache lives in preallocated blocks, written in place."""
        return self is not Engine.HF


class Decoding(StrEnum):
    GREEDY = "greedy"
    BEAM = "beam"
    SAMPLE = "sample"


class PrefillLogits(StrEnum):
    LAST = "last"  # transformers' generate() since 4.45: logits_to_keep=1
    ALL = "all"  # every prompt position (a forward without logits_to_keep), upcast to fp32


@dataclass(frozen=True, kw_only=True)
class InferSettings:
    """What inference holds for ``batch_size`` prompts of ``context_len`` tokens each, or a
    generate() run of ``prompt_len`` + ``max_new_tokens``."""

    __pydantic_config__ = _FORBID_EXTRA

    dtype: DType = DType.BF16  # compute dtype, and the weights' unless ``weights`` names a format
    weights: str | None = None  # a weight format (memcalc.estimate.weights); default: dtype
    group_size: int = 128  # GPTQ/AWQ group size (-1: one group per column)
    double_quant: bool = True  # bitsandbytes 4-bit: quantise the absmax constants too (QLoRA)
    kv_dtype: KVDType | None = None  # default: the weight dtype when it is a float type, else bf16
    batch_size: PositiveInt = DEFAULT_BATCH_SIZE
    context_len: PositiveInt | None = None  # tokens cached per sequence when no prompt is given
    prompt_len: PositiveInt | None = None  # tokens of the prompt (prefill); with max_new_tokens, a generate() run
    max_new_tokens: NonNegativeInt = 0
    decoding: Decoding | None = None  # default: beam with num_beams > 1, else greedy
    num_beams: PositiveInt = 1  # beam search keeps this many sequences per prompt
    num_return_sequences: PositiveInt = 1  # sampling: sequences per prompt; beam: at most num_beams
    top_k: PositiveInt | None = None
    top_p: float | None = None
    temperature: float = 1.0
    prefill_logits: PrefillLogits = PrefillLogits.LAST
    prefill_chunk: PositiveInt | None = None  # tokens per prefill forward (chunked prefill)
    attention: Attention = Attention.SDPA
    engine: Engine = Engine.HF
    block_size: PositiveInt = 16  # paged engine: tokens per KV block
    tp: PositiveInt = 1  # tensor-parallel ranks: weights, heads and KV heads split
    overhead_bytes: NonNegativeInt | None = None  # CUDA context + library workspaces; default: documented
    expandable_segments: bool = False  # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

    def __post_init__(self) -> None:
        _coerce_enums(self, dtype=DType, kv_dtype=KVDType, decoding=Decoding, prefill_logits=PrefillLogits,
                      attention=Attention, engine=Engine)
        _check_positive(self, "batch_size", "context_len", "prompt_len", "num_beams", "num_return_sequences",
                        "top_k", "prefill_chunk", "block_size", "tp")
        if self.max_new_tokens < 0:
            raise SettingsError(Field("max_new_tokens"), f" must not be negative, got {self.max_new_tokens}")
        if self.context_len is not None and self.prompt_len is not None:
            raise SettingsError(Field("context_len"), " and ", Field("prompt_len"), ": give one (", Field("context_len"),
                                " counts every cached token; ", Field("prompt_len"), " with ", Field("max_new_tokens"),
                                " describes a generate() run)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SettingsError(Field("top_p"), f" must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise SettingsError(Field("temperature"), f" must be positive, got {self.temperature}")
        if self.group_size != -1 and self.group_size <= 0:
            raise SettingsError(Field("group_size"), f" must be positive or -1, got {self.group_size}")
        decoding = self.resolved_decoding
        if self.decoding is Decoding.GREEDY and self.num_beams > 1:
            raise SettingsError(Field("num_beams"), f" {self.num_beams}: greedy decoding keeps one sequence; give ",
                                Field("decoding"), " beam")
        warpers = self.top_k is not None or self.top_p is not None or self.temperature != 1.0
        if warpers and decoding is not Decoding.SAMPLE:
            raise SettingsError(Field("top_k"), ", ", Field("top_p"), " and ", Field("temperature"),
                                " apply to sampling (", Field("decoding"), " sample)")
        if decoding is Decoding.GREEDY and self.num_return_sequences > 1:
            raise SettingsError(Field("num_return_sequences"), " > 1: greedy decoding returns one sequence per prompt; "
                                "use sampling or beam search")
        if decoding is Decoding.BEAM and self.num_return_sequences > self.num_beams:
            raise SettingsError(Field("num_return_sequences"), f" ({self.num_return_sequences}) exceeds ",
                                Field("num_beams"), f" ({self.num_beams})")

    @property
    def resolved_decoding(self) -> Decoding:
        """Beam search with one beam is greedy decoding (transformers picks the mode the same way)."""
        if self.decoding is Decoding.SAMPLE:
            return self.decoding
        return Decoding.BEAM if self.num_beams > 1 else Decoding.GREEDY

    @property
    def sequences_per_prompt(self) -> int:
        """Sequences decoded (and cached) per prompt: beams, or returned samples (transformers'
        ``_expand_inputs_for_generation``: expand_size = num_beams or num_return_sequences)."""
        decoding = self.resolved_decoding
        if decoding is Decoding.BEAM:
            return self.num_beams
        return self.num_return_sequences


def resolve_seq_len(model: ModelConfig, seq_len: int | None) -> int:
    return seq_len if seq_len is not None else min(DEFAULT_SEQ_LEN, model.max_position_embeddings)


# --- The pydantic boundary -----------------------------------------------------------------------

Schema = TypeVar("Schema")


def parse(schema: type[Schema], data: Any, source: str = "", names: dict[str, str] | None = None) -> Schema:
    """Validate ``data`` against ``schema`` with pydantic; errors become one ``InputError`` line
    (``source: field.path: message; ...``), with top-level fields renamed by ``names``."""
    from pydantic import TypeAdapter, ValidationError

    from memcalc import mixers
    from memcalc.vision import VisionTower

    # ModelConfig's annotations name the mixers and VisionTower, which start-up does not import:
    # pydantic resolves them from this module's namespace when it builds the schema
    for name in ("MLAConfig", "MambaConfig", "LinearAttentionConfig"):
        globals().setdefault(name, getattr(mixers, name))
    globals().setdefault("VisionTower", VisionTower)

    from memcalc.errors import InputError, describe_validation_error

    from dataclasses import fields, is_dataclass

    try:
        result = TypeAdapter(schema).validate_python(data)
    except ValidationError as exc:
        known = tuple(field.name for field in fields(schema)) if is_dataclass(schema) else ()
        raise InputError(describe_validation_error(exc, source, names, known)) from None
    if isinstance(result, ModelConfig):
        _check_model_size(result, source)
    return result


# Ten thousand times the largest published model (Kimi K2, 1.03e12): a count past it is a typo in
# the file (say num_experts 2**31), not a model, and would print absurd sizes with exit 0.
MAX_PARAMETERS = 10**16


def _check_model_size(model: ModelConfig, source: str) -> None:
    from memcalc.errors import InputError
    from memcalc.estimate.params import count_params

    total = count_params(model).total
    if total > MAX_PARAMETERS:
        raise InputError(f"{source}: these sizes give {total:.3g} parameters, more than any model "
                         f"(memcalc stops at {MAX_PARAMETERS:.0e}); check hidden_size, num_layers, the vocabulary "
                         "and the expert counts")
