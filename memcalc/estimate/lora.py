"""LoRA and QLoRA: what a step holds when the base model is frozen and only adapters train.

LoRA (Hu et al. 2021, arXiv:2106.09685) adds to a frozen ``d_in -> d_out`` linear layer ``W`` two
trainable matrices, ``lora_A: d_in -> r`` and ``lora_B: r -> d_out``, and computes
``W x + lora_B(lora_A(x)) * alpha / r``: ``r * (d_in + d_out)`` trainable parameters per targeted
matrix. memcalc follows PEFT (``peft/tuners/lora/layer.py``, ``Linear.forward``): the adapters are
kept in fp32 beside a 16-bit base (``get_peft_model(..., autocast_adapter_dtype=True)``, the default,
upcasts fp16/bf16 adapters: ``tuners_utils.cast_adapter_dtype``), the input is cast to the adapter
dtype before ``lora_A`` (``_cast_input_dtype``) and the sum is cast back to the base output's dtype.
QLoRA (Dettmers et al. 2023, arXiv:2305.14314) stores the base linear weights in bitsandbytes NF4
with double quantisation (``weights.weight_bytes(model, "bnb-nf4")``); embeddings, norms, routers
and the head stay in the compute dtype.

State: the base weights (no gradients, no master copy, no optimizer states); the adapters, their
gradients, optional master copy and optimizer states, and the optimizer's temporaries over the
adapters only.

Activations (measured on fake tensors, ``memcalc/validate/model.py``'s ``apply_lora``): PyTorch's
autograd saves a tensor for backward only if a gradient that needs it will be computed (the
generated ``VariableType`` code guards each ``SavedVariable`` with ``should_compute_output``). So a
frozen linear layer keeps no input: ``mm``'s input is needed only for the weight gradient. A frozen
norm keeps what its input gradient needs (RMSNorm: the fp32 input and the reciprocal root; not the
normalised tensor, which only the weight gradient reads). An adapter keeps its own input: the input
cast to the adapter dtype (a new fp32 tensor per targeted projection beside a 16-bit base; the
input itself, shared, when the dtypes agree) and the rank-r intermediate ``lora_A(x)`` for
``lora_B``. The token embedding is frozen, so the first layer's input needs no gradient: until the
first adapter, nothing is saved there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memcalc.config import LORA_TARGETS, MLPKind, ModelConfig, NormKind, Recompute, TrainSettings
from memcalc.dtypes import BITS_PER_ELEMENT, DType, storage_bytes
from memcalc.errors import InputError
from memcalc.estimate.activations import FP32_BYTES, INDEX_BYTES, MASK_BYTES, ActivationShape
from memcalc.estimate.params import ParamCategory, ParamInventory, TensorGroup
from memcalc.precision import PrecisionRecipe

PEFT = "PEFT peft/tuners/lora/layer.py (Linear.forward, autocast_adapter_dtype=True)"
QLORA = "QLoRA (Dettmers et al. 2023, arXiv:2305.14314); bitsandbytes Linear4bit / MatMul4Bit"
# Module names of the targets (Hugging Face Llama naming, which the reference decoder uses).
MODULE_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# Recipes a LoRA step is modelled with: the base in the weight dtype, no autocast.
LORA_RECIPES = ("fp32", "mixed-fp16", "mixed-bf16", "pure-fp16", "pure-bf16")


@dataclass(eq=False)
class LoraSummary:
    """LoRA as resolved: the adapters' rank, targets and dtype, and what they count (the
    ``lora`` of memcalc.estimate.assumptions.TrainAssumptions; here, so that an estimate without
    LoRA does not build it)."""

    rank: int
    targets: tuple[str, ...]
    adapter_dtype: DType
    qlora: bool
    base_format: str  # the frozen base's storage, e.g. "bnb-nf4 (double quant)" or "bf16"
    trainable_params: int
    adapter_bytes: int
    base_weight_bytes: int
    adapter_recipe: str  # a memcalc.precision.RECIPES name
    dropout: float = 0.0  # PEFT's lora_dropout


def _bytes(dtype: DType) -> int:
    return BITS_PER_ELEMENT[dtype] // 8


@dataclass(frozen=True)
class Adapter:
    """``count`` adapters of rank ``rank`` on ``d_in -> d_out`` matrices named ``name``."""

    name: str  # the base weight's name in count_params, e.g. layers.attn.q_proj.weight
    target: str  # q, k, v, o, gate, up, down
    d_in: int
    d_out: int
    count: int
    rank: int

    @property
    def numel(self) -> int:
        return self.rank * (self.d_in + self.d_out) * self.count


def check_lora(model: ModelConfig, settings: TrainSettings) -> None:
    """InputError when the targets do not exist in ``model``."""
    if model.mla is not None:
        raise InputError(f"{model.name}: LoRA on multi-head latent attention is not modelled")
    if "gate" in settings.lora_targets and model.mlp is not MLPKind.GATED:
        raise InputError(f"{model.name} has a plain MLP without gate_proj: lora target 'gate' does not exist; "
                         f"choose from {', '.join(t for t in LORA_TARGETS if t != 'gate')}")


def adapters(model: ModelConfig, settings: TrainSettings) -> list[Adapter]:
    """One entry per targeted weight of ``weights.linear_weights`` (routed and shared experts
    included: PEFT matches every module of a targeted name)."""
    from memcalc.estimate.weights import linear_weights

    check_lora(model, settings)
    by_module = {module: target for target, module in MODULE_NAMES.items() if target in settings.lora_targets}
    found = []
    for shape in linear_weights(model):
        module = shape.name.rsplit(".", 2)[-2]
        if module in by_module:
            found.append(Adapter(shape.name, by_module[module], shape.d_in, shape.d_out, shape.count,
                                 settings.lora_rank))
    return found


def trainable_parameters(model: ModelConfig, settings: TrainSettings) -> int:
    """``sum over targets of r * (d_in + d_out)`` per matrix: what PEFT's print_trainable_parameters shows."""
    return sum(adapter.numel for adapter in adapters(model, settings))


def adapter_inventory(model: ModelConfig, settings: TrainSettings) -> ParamInventory:
    """The adapters as tensors (lora_A: r x d_in, lora_B: d_out x r), for the optimizer's per-tensor rules."""
    groups = []
    for adapter in adapters(model, settings):
        prefix = adapter.name.removesuffix(".weight")
        category = ParamCategory.EXPERTS if ".moe." in prefix else (
            ParamCategory.ATTENTION if ".attn." in prefix else ParamCategory.MLP)
        for part, numel in (("lora_A", adapter.rank * adapter.d_in), ("lora_B", adapter.d_out * adapter.rank)):
            groups.append(TensorGroup(f"{prefix}.{part}.weight", category, numel, adapter.count, adapter.count))
    return ParamInventory(tuple(groups))


def adapter_matrices(model: ModelConfig, settings: TrainSettings) -> list[tuple[int, int, int]]:
    """``(d_in, d_out, count)`` of every adapter matrix (Adafactor factors each)."""
    out = []
    for adapter in adapters(model, settings):
        out += [(adapter.d_in, adapter.rank, adapter.count), (adapter.rank, adapter.d_out, adapter.count)]
    return out


def adapter_sizes_in_order(model: ModelConfig, settings: TrainSettings) -> list[int]:
    """Element counts of the adapter tensors in ``model.parameters()`` order of the reference decoder
    (per layer: q, k, v, o; the dense MLP's or each expert's gate, up, down; shared experts)."""
    moe = model.moe
    per_kind: dict[str, list[Adapter]] = {}
    for adapter in adapters(model, settings):
        per_kind.setdefault(adapter.name.rsplit(".", 2)[0], []).append(adapter)

    def sizes(prefix: str) -> list[int]:
        return [n for a in per_kind.get(prefix, []) for n in (a.rank * a.d_in, a.d_out * a.rank)]

    order = []
    for index in range(model.num_layers):
        order += sizes("layers.attn")
        if moe is not None and index >= moe.first_dense_layers:
            order += sizes("layers.moe.experts") * moe.num_experts
            order += sizes("layers.moe.shared_experts") * moe.num_shared_experts
        else:
            order += sizes("layers.mlp")
    return order


def base_weight_bytes(model: ModelConfig, settings: TrainSettings, weight_dtype: DType) -> int:
    """The frozen base: every parameter in ``weight_dtype``, or under QLoRA the layers' linear
    weights in NF4 with double quantisation and the rest in ``weight_dtype``."""
    from memcalc.estimate.params import count_params
    from memcalc.estimate.weights import weight_bytes

    if settings.qlora:
        return weight_bytes(model, "bnb-nf4", double_quant=True, compute_dtype=weight_dtype).total_bytes
    return storage_bytes(count_params(model).total, weight_dtype)


def qlora_state_bytes(model: ModelConfig, weight_dtype: DType) -> int:
    """The NF4 quantisation state of every quantised weight (the absmax codes, the nested fp32
    absmax and offset, the code tables): module state beside the packed weight, not a parameter."""
    from memcalc.estimate.weights import weight_bytes

    return weight_bytes(model, "bnb-nf4", double_quant=True, compute_dtype=weight_dtype).scale_bytes


def qlora_layer_bytes(model: ModelConfig, layer_elements: int, weight_dtype: DType) -> int:
    """One decoder layer's parameters under QLoRA as FSDP2 gathers them: its linear weights packed
    (two 4-bit codes a byte), the rest (norms) in ``weight_dtype``; layers of one shape assumed."""
    from memcalc.estimate.weights import weight_bytes

    quantised = weight_bytes(model, "bnb-nf4", double_quant=True, compute_dtype=weight_dtype)
    layers = model.num_layers
    return (quantised.data_bytes // layers
            + storage_bytes(layer_elements - quantised.quantised_params // layers, weight_dtype))


def adapter_recipe(settings: TrainSettings, recipe: PrecisionRecipe) -> PrecisionRecipe:
    """The adapters' recipe: weights and gradients in ``lora_dtype``; a master copy only when the
    recipe keeps one and the adapters are narrower (fp32 adapters have none); the optimizer's
    moments in ``--optimizer-dtype``, else the master's dtype, else the adapters' (``torch.optim``
    creates states ``zeros_like`` the parameter it steps)."""
    if recipe.name not in LORA_RECIPES:
        raise InputError(f"LoRA is modelled with the recipes {', '.join(LORA_RECIPES)}; got {recipe.name} "
                         "(autocast and FP8 recipes are not)")
    dtype = DType(settings.lora_dtype.value)
    master = recipe.master_dtype if recipe.master_dtype and _bytes(dtype) < _bytes(recipe.master_dtype) else None
    states = DType(settings.optimizer_dtype.value) if settings.optimizer_dtype else (master or dtype)
    return replace(recipe, name=f"{recipe.name} + {dtype.value} adapters", weight_dtype=dtype, grad_dtype=dtype,
                   master_dtype=master, optimizer_state_dtype=states)


def dequantize_bytes(numel: int, element_bytes: int) -> int:
    """What one NF4 matmul allocates for its weight: the absmax codes dequantised to fp32 and that
    plus the offset (bitsandbytes' ``_dequant_linear_fallback``: two fp32 values per block of 64),
    and the weight in the compute dtype."""
    return 2 * FP32_BYTES * -(-numel // 64) + element_bytes * numel


# --- Activations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRALayer:
    """What one layer keeps for backward under LoRA (bytes)."""

    saved: int
    before_scores: int  # saved (and the repeated K/V heads alive) when its scores are computed (eager)
    mlp: int  # the MLP block's part (from its norm on)
    transient: int  # extra live bytes in its MLP backward
    forward_live: int = 0  # alive but not saved when the forward computes the scores


def _frozen_norm(model: ModelConfig, width: int, tokens: int, stream_bytes: int, requires_grad: bool) -> int:
    """A frozen norm keeps what its input gradient needs, and only when its input needs one.
    RMSNorm (``LlamaRMSNorm``): the fp32 input (``pow`` and the product with ``rsqrt``) and the fp32
    reciprocal root per row; the normalised tensor, which only the weight gradient reads, is not kept.
    LayerNorm: ``native_layer_norm`` keeps its input and the fp32 mean and rstd."""
    if not requires_grad:
        return 0
    if model.norm is NormKind.LAYERNORM:
        return tokens * width * stream_bytes + 2 * FP32_BYTES * tokens
    return tokens * width * FP32_BYTES + FP32_BYTES * tokens


def frozen_norm_bytes(model: ModelConfig, width: int, tokens: int, stream_bytes: int) -> int:
    """A frozen norm whose input needs a gradient (the final norm under LoRA)."""
    return _frozen_norm(model, width, tokens, stream_bytes, True)


def _adapter_inputs(tokens: int, width: int, count: int, e: int, a: int, input_saved: bool = False,
                    dropout: bool = False) -> int:
    """The inputs ``count`` adapters keep: each its own cast copy (``a`` bytes) when the adapter
    dtype differs from the compute dtype; else the input itself, once, unless already kept. With
    PEFT's lora_dropout each keeps its own dropped copy (``a`` bytes) and its 1-byte mask instead
    (dropout keeps no input)."""
    if count == 0:
        return 0
    if dropout:
        return count * tokens * width * (a + MASK_BYTES)
    if a != e:
        return count * tokens * width * a
    return 0 if input_saved else tokens * width * e


def _gated_or_plain_mlp(model: ModelConfig, tokens: int, width: int, e: int, a: int, r: int, targets,
                        input_grad: bool, dropout: bool = False) -> int:
    """A frozen MLP of ``width`` on ``tokens`` whose input needs a gradient or not."""
    saved = 0
    if model.mlp is MLPKind.GATED:
        gate_grad = input_grad or "gate" in targets
        up_grad = input_grad or "up" in targets
        n_in = ("gate" in targets) + ("up" in targets)
        saved += _adapter_inputs(tokens, model.hidden_size, n_in, e, a, dropout=dropout) + n_in * tokens * r * a
        # SiLU/GELU keep the gate output; the product keeps the up output for the activation's
        # gradient and the activation output for the up output's gradient
        saved += tokens * width * e * (2 * gate_grad + up_grad)
    else:
        up_grad = input_grad or "up" in targets
        saved += (_adapter_inputs(tokens, model.hidden_size, "up" in targets, e, a, dropout=dropout)
                  + ("up" in targets) * tokens * r * a)
        saved += tokens * width * e * up_grad  # the activation keeps its input
    if "down" in targets:  # the product (or activation output) is kept by nothing else
        saved += _adapter_inputs(tokens, width, 1, e, a, dropout=dropout) + tokens * r * a
    return saved


def lora_layer(model: ModelConfig, shape: ActivationShape, attention: str, recompute: Recompute,
               settings: TrainSettings, adapter_bytes: int, moe_layer: bool, input_grad: bool,
               linear_inputs: bool = False) -> LoRALayer:
    """Bytes a layer keeps for backward with its base frozen and adapters on ``settings.lora_targets``;
    ``input_grad``: whether the layer's input needs a gradient (every layer but the first).
    ``linear_inputs``: DeepSpeed ZeRO-3 (``deepspeed_linear_inputs``), every frozen projection
    keeps its input when that input needs a gradient."""
    targets, r, a = settings.lora_targets, settings.lora_rank, adapter_bytes
    tokens, e, x = shape.tokens, shape.element_bytes, shape.stream_bytes
    h, heads, kv_heads = model.hidden_size, model.num_attention_heads, model.kv_heads
    head_dim = model.attention_head_dim
    q_width, kv_width = heads * head_dim, kv_heads * head_dim

    # --- attention ---
    saved = _frozen_norm(model, h, tokens, x, input_grad)
    n_qkv = sum(t in targets for t in ("q", "k", "v"))
    dropout = settings.lora_dropout > 0
    saved += _adapter_inputs(tokens, h, n_qkv, e, a, dropout=dropout) + n_qkv * tokens * r * a
    q_grad, k_grad, v_grad = (input_grad or t in targets for t in ("q", "k", "v"))
    if model.qk_norm:
        saved += _frozen_norm(model, head_dim, tokens * heads, e, q_grad)
        saved += _frozen_norm(model, head_dim, tokens * kv_heads, e, k_grad)
    attention_grad = q_grad or k_grad or v_grad
    before_scores = saved
    eager = attention == "eager"
    output_saved = False
    if not eager:
        if attention_grad:  # the kernel keeps q, k, v, its output and the log-sum-exp
            saved += tokens * (q_width + 2 * kv_width) * e + tokens * q_width * e + FP32_BYTES * tokens * heads
            before_scores = saved - tokens * q_width * e - FP32_BYTES * tokens * heads
            output_saved = True
    elif recompute is Recompute.SELECTIVE:
        if attention_grad:  # the checkpointed attention keeps its inputs (grouped heads)
            saved += tokens * (q_width + 2 * kv_width) * e
        before_scores = saved
    else:
        if not model.softmax_in_fp32 and e != FP32_BYTES and not shape.autocast:
            from memcalc.errors import InputError

            raise InputError(f"{model.name}: LoRA with eager attention whose softmax runs in 16 bits (GPT-2's) is "
                             "not modelled: use --attention sdpa")
        grouped = kv_heads < heads
        repeated = q_width if grouped else kv_width
        scores = heads * shape.seq_len * shape.seq_len * shape.batch_size
        scores_grad = q_grad or k_grad
        # q @ k^T keeps k (repeated) for q's gradient and q for k's; probs @ v keeps v for the
        # probabilities' gradient and the probabilities for v's; softmax keeps its fp32 output
        saved += tokens * e * (repeated * q_grad + q_width * k_grad + repeated * scores_grad)
        before_scores = saved
        saved += scores * (FP32_BYTES * scores_grad + e * v_grad * (e != FP32_BYTES))
        if v_grad and e == FP32_BYTES and not scores_grad:
            saved += scores * FP32_BYTES  # the fp32 probabilities themselves (no cast)
    if "o" in targets:
        saved += _adapter_inputs(tokens, q_width, 1, e, a, input_saved=output_saved, dropout=dropout) + tokens * r * a
    attention_out_grad = attention_grad or "o" in targets
    if model.norms_per_layer >= 4:
        saved += _frozen_norm(model, h, tokens, x, attention_out_grad)

    # --- MLP ---
    stream_grad = input_grad or attention_out_grad
    mlp = _frozen_norm(model, h, tokens, x, stream_grad)
    if model.norms_per_layer >= 4:  # its output norm: the MLP output needs a gradient by then
        mlp += _frozen_norm(model, h, tokens, x, True)
    if not moe_layer:
        mlp += _gated_or_plain_mlp(model, tokens, model.intermediate_size, e, a, r, targets, stream_grad, dropout)
    else:
        mlp += _moe_saved(model, shape, e, a, r, targets, stream_grad, dropout)
    if linear_inputs:
        if moe_layer:
            from memcalc.errors import InputError

            raise InputError(f"{model.name}: LoRA on a mixture of experts under DeepSpeed ZeRO-3 (--zero 3) is not "
                             "modelled; use --fsdp full")
        mlp_inputs = deepspeed_linear_inputs(model, shape, targets, a, dropout, input_grad, attention_grad,
                                             stream_grad, eager)
        saved += mlp_inputs[0]
        mlp += mlp_inputs[1]
    transient = _mlp_backward_transient(model, shape, settings, a, moe_layer)
    # alive but not saved when the forward computes the scores: the layer's input (held by the
    # caller) unless the norm keeps it itself, and the normalised input (an argument of the
    # attention's forward) unless a same-dtype adapter keeps it
    inputs_saved = model.norm is NormKind.LAYERNORM or x == FP32_BYTES
    forward_live = tokens * h * (x * (not inputs_saved) + e * (not (a == e and n_qkv)))
    # the checkpointed attention repeats the grouped K/V heads, which it does not keep
    repeats = 2 * tokens * q_width * e if eager and recompute is Recompute.SELECTIVE and kv_heads < heads else 0
    return LoRALayer(saved + mlp, before_scores + repeats, mlp, transient, forward_live)


def deepspeed_linear_inputs(model: ModelConfig, shape: ActivationShape, targets, a: int, dropout: bool,
                            input_grad: bool, attention_grad: bool, stream_grad: bool, eager: bool) -> tuple[int, int]:
    """The inputs of a dense layer's frozen projections that DeepSpeed ZeRO-3 keeps and PyTorch
    would not, as (attention part, MLP part). ZeRO-3 replaces ``torch.nn.functional.linear`` by
    ``zero3_linear_wrap`` (``memory_efficient_linear``, on by default: ``Init._enable_mem_efficient_linear``),
    whose ``LinearFunctionForZeroStage3.setup_context`` saves input, weight and bias whatever needs
    a gradient (``deepspeed/runtime/zero/linear.py``): a frozen projection whose input needs a
    gradient keeps that input, where aten's ``mm`` keeps only the weight (measured in
    memcalc.validate.deepspeed: per layer the MLP's input and the down projection's input, with
    q and v targeted). Inputs an adapter of the same dtype already keeps are the same tensor: q, k
    and v read the attention norm's output; gate and up the MLP norm's; SDPA keeps its output,
    which the output projection reads (eager attention's is a new tensor)."""
    tokens, e, h = shape.tokens, shape.element_bytes, model.hidden_size
    shared = a == e and not dropout  # an adapter keeps the very tensor

    def kept(*names: str) -> bool:
        return shared and any(name in targets for name in names)

    attention = 0
    if input_grad and not kept("q", "k", "v"):
        attention += tokens * h * e
    if attention_grad and eager and not kept("o"):
        attention += tokens * model.num_attention_heads * model.attention_head_dim * e
    mlp = 0
    if stream_grad:
        if not kept("gate", "up"):
            mlp += tokens * h * e
        if not kept("down"):  # the product (or the activation's output): nothing else keeps it
            mlp += tokens * model.intermediate_size * e
    return attention, mlp


def _moe_saved(model: ModelConfig, shape: ActivationShape, e: int, a: int, r: int, targets, stream_grad: bool,
               dropout: bool = False) -> int:
    """Routed experts (``memcalc.validate.model.MoE``) with frozen routers and experts. With the
    input needing a gradient the router keeps its fp32 softmax output, top-k indices, top-k weights
    and their sum (its frozen matmul keeps no input); each expert keeps the token indices of its
    gather and of ``index_add_``, the slot indices of the routing weights, its MLP's tensors, its
    output (for the routing weight's gradient) and the weighted output (``index_add_``'s source)."""
    moe, tokens, h = model.moe, shape.tokens, model.hidden_size
    assignments = tokens * moe.experts_per_token
    mlp_targets = [t for t in ("gate", "up", "down") if t in targets]
    expert_grad = stream_grad or bool(mlp_targets)  # the expert outputs need a gradient
    saved = 0
    if stream_grad:
        saved += tokens * (FP32_BYTES * moe.num_experts + FP32_BYTES) + assignments * (INDEX_BYTES + FP32_BYTES)
        saved += assignments * INDEX_BYTES  # the slot indices of the routing weights (weights[token, slot])
    # token indices (shared by the gather and index_add_): kept when either needs them
    saved += assignments * INDEX_BYTES * (stream_grad or expert_grad)
    saved += _gated_or_plain_mlp(model, assignments, moe.expert_intermediate_size, e, a, r, targets, stream_grad,
                                 dropout)
    if stream_grad:
        saved += assignments * h * e  # the expert output, for the routing weight's gradient
    if expert_grad:
        saved += assignments * e  # the routing weight slice, for the expert output's gradient
        saved += assignments * h * e  # the weighted output (index_add_'s source)
    if moe.num_shared_experts:
        width = moe.shared_expert_intermediate_size or moe.expert_intermediate_size
        saved += moe.num_shared_experts * _gated_or_plain_mlp(model, tokens, width, e, a, r, targets, stream_grad,
                                                              dropout)
    return saved


def _down_output_chain(tokens: int, width: int, e: int, a: int, quantized: bool) -> int:
    """Peak bytes of a targeted projection's output side in forward, ``width`` outputs per token:
    PEFT's ``result + lora_B(lora_A(x)) * scaling`` holds the base result, lora_B's output and its
    scaled copy, then the result, the scaled copy and their sum (in the wider dtype); the bitsandbytes
    path clones the result first and casts the adapter output back before the sum."""
    if quantized:
        return tokens * width * max(2 * e, e + 2 * a, 2 * e + a, 3 * e)
    return tokens * width * (e + a + max(a, e))


def _mlp_transients(model: ModelConfig, shape: ActivationShape, settings: TrainSettings, a: int) -> tuple[int, int]:
    """(forward, backward) extra live bytes of the last dense layer's MLP (its input needing a
    gradient) beyond its saved tensors.

    Forward, measured op by op: the layer's input (held by the caller), the attention output and the
    stream after it (held by the block's forward) and the MLP's input (an argument of its forward)
    stay alive through the MLP; at each projection its output (QLoRA: beside the weight dequantised
    to the compute dtype and the two fp32 absmax tensors of bitsandbytes' ``_dequant_linear_fallback``)
    or, once its adapter has saved its input, the adapter's output chain (``_down_output_chain``);
    the product (down's input) is kept by nothing when down is frozen. The candidates are the moments
    of gate, up, the product and down, each with what the MLP has saved by then.

    Backward (measured order: the autograd engine runs the most recent node first, so an adapter's
    branch before its base projection): with an adapter on down, its input gradient in the adapter
    dtype (and lora_A's weight gradient) beside the base output's gradient (cast to the base dtype
    in PEFT's Linear); then lora_A's saved input is freed, the gradient is cast back, and the base
    projection's input gradient joins it (QLoRA: beside the weight dequantised again,
    ``functional.dequantize_4bit``, whose fp32 absmax is freed when it returns) and the two are
    summed into a new tensor; then the product's
    backward holds the gradients of the product, the activation and the up output (``3*T*f*e``;
    plain MLP: the activation's and the up output's, ``2*T*f*e``)."""
    e, x, tokens, h = shape.element_bytes, shape.stream_bytes, shape.tokens, model.hidden_size
    r, targets, quantized = settings.lora_rank, settings.lora_targets, settings.qlora
    width = model.intermediate_size
    numel = h * width
    prod = tokens * width * e
    gated = model.mlp is MLPKind.GATED

    def adapter(target: str, d_in: int) -> int:
        """What an adapter adds to the live bytes: its input's cast copy (a same-dtype adapter keeps
        the input itself, which is alive anyway) and the rank-r output."""
        if target not in targets:
            return 0
        if settings.lora_dropout:  # the dropped copy and its mask
            return tokens * d_in * (a + MASK_BYTES) + tokens * r * a
        return (tokens * d_in * a if a != e else 0) + tokens * r * a

    def chain(target: str, d_out: int, d_in: int) -> int:
        """The adapter's output chain; with lora_dropout beside its input's cast copy, alive until
        the adapter's forward returns (dropout keeps no input)."""
        if target not in targets:
            return 0
        cast = tokens * d_in * a if settings.lora_dropout and a != e else 0
        return _down_output_chain(tokens, d_out, e, a, quantized) + cast

    dequant = dequantize_bytes(numel, e) if quantized else 0
    norm = _frozen_norm(model, h, tokens, x, True)
    out_norm = _frozen_norm(model, h, tokens, x, True) if model.norms_per_layer >= 4 else 0
    # a norm that keeps its input itself (LayerNorm; RMSNorm's fp32 upcast of an fp32 stream is a
    # no-op) already counts the layer's input and the stream
    inputs_saved = model.norm is NormKind.LAYERNORM or x == FP32_BYTES
    common = norm + tokens * h * (2 * e + (0 if inputs_saved else 2 * x))
    up_in = adapter("up", h)
    if gated:
        gate_in = adapter("gate", h)
        down_in = adapter("down", width)
        moments = [
            common + prod + dequant,  # gate's output
            common + gate_in + chain("gate", width, h),
            common + gate_in + 2 * prod + prod + dequant,  # gate output and activation, up's output
            common + gate_in + 2 * prod + up_in + chain("up", width, h),
            common + gate_in + up_in + 3 * prod + prod,  # the product
            common + gate_in + up_in + 3 * prod + prod + tokens * h * e + dequant,  # down's output
            common + gate_in + up_in + 3 * prod + prod + down_in + chain("down", h, width),
        ]
    else:
        down_in = adapter("down", width)
        moments = [
            common + prod + dequant,  # up's output
            common + up_in + chain("up", width, h),
            common + up_in + prod + prod,  # the activation's output
            common + up_in + prod + prod + tokens * h * e + dequant,
            common + up_in + prod + prod + down_in + chain("down", h, width),
        ]
    if "down" not in targets:
        moments = moments[:-1]
    saved = norm + _gated_or_plain_mlp(model, tokens, width, e, a, r, targets, True, settings.lora_dropout > 0)
    # (the MLP-output norm of Gemma-2 style blocks is saved after all of these)
    forward = max(moments) - saved - out_norm

    # backward; the dequantised weight beside the input gradient being computed
    products = 3 if gated else 2
    base_backward = prod
    if quantized:
        base_backward = e * numel + max(prod, FP32_BYTES * -(-numel // 64))
    if "down" in targets:
        # the adapter's input gradient and lora_A's weight gradient before it is accumulated, beside
        # the base output's gradient cast to the base dtype (PEFT's Linear sums in the adapter
        # dtype; the bitsandbytes path casts the adapter output back before the sum)
        beside = tokens * h * e if a != e and not quantized else 0
        adapter_grad = tokens * width * a + r * width * a
        freed = tokens * width * a if a != e else prod  # lora_A's saved input, released after its backward
        cast_back = prod if a != e else 0  # then its gradient is cast to the base dtype
        # the two contributions to the product's gradient are summed into a new tensor
        backward = max(beside + adapter_grad, beside + tokens * width * a + cast_back - freed,
                       beside + prod + base_backward - freed, 3 * prod - freed, products * prod - freed)
    else:
        backward = max(base_backward, products * prod)
    return forward, backward


def _mlp_backward_transient(model: ModelConfig, shape: ActivationShape, settings: TrainSettings, a: int,
                            moe_layer: bool) -> int:
    """Extra live bytes while the layer's MLP runs backward (``_mlp_transients``). A MoE layer:
    one expert at a time, its product's backward (three gradients of its width over its tokens),
    beside the full-size gradient of the gathered tokens being summed."""
    if not moe_layer:
        return _mlp_transients(model, shape, settings, a)[1]
    e, tokens, h = shape.element_bytes, shape.tokens, model.hidden_size
    moe = model.moe
    per_expert = tokens * moe.experts_per_token // moe.num_experts
    products = 3 if model.mlp is MLPKind.GATED else 2
    transient = products * e * per_expert * moe.expert_intermediate_size + e * tokens * h
    if settings.qlora:  # an expert's down projection dequantised beside its input gradient
        numel = h * moe.expert_intermediate_size
        transient = max(transient, e * numel + max(e * per_expert * moe.expert_intermediate_size,
                                                   FP32_BYTES * -(-numel // 64)) + e * tokens * h)
    return transient


def recompute_forward_bytes(model: ModelConfig, shape: ActivationShape, settings: TrainSettings, a: int) -> int:
    """Live bytes of a dense MLP run without saving (``--recompute full``: the checkpointed layer's
    forward, or its recomputation), beyond the layer inputs the checkpoints keep: the attention
    output, the stream and the MLP's input, then at each step the tensors the expression holds
    (gate output and activation; activation and up output; the product), each projection's output
    (QLoRA: its dequantised weight and absmax) or an adapter's cast input and output chain."""
    e, x, tokens, h = shape.element_bytes, shape.stream_bytes, shape.tokens, model.hidden_size
    targets, quantized = settings.lora_targets, settings.qlora
    width = model.intermediate_size
    prod = tokens * width * e
    dequant = dequantize_bytes(h * width, e) if quantized else 0

    def adapter(target: str, d_in: int, d_out: int) -> int:
        if target not in targets:
            return 0
        return (tokens * d_in * a if a != e else 0) + _down_output_chain(tokens, d_out, e, a, quantized)

    if model.mlp is MLPKind.GATED:
        steps = [prod + dequant, adapter("gate", h, width), 2 * prod, prod + prod + dequant,
                 prod + adapter("up", h, width), 3 * prod, prod + tokens * h * e + dequant,
                 prod + adapter("down", width, h)]
    else:
        steps = [prod + dequant, adapter("up", h, width), 2 * prod, prod + tokens * h * e + dequant,
                 prod + adapter("down", width, h)]
    return tokens * h * (x + 2 * e) + max(steps)


def mlp_forward_transient(model: ModelConfig, shape: ActivationShape, settings: TrainSettings, a: int) -> int:
    """Extra live bytes at the last dense layer's down projection in forward (``_mlp_transients``)."""
    return _mlp_transients(model, shape, settings, a)[0]


def final_norm_backward_bytes(model: ModelConfig, tokens: int, e: int, x: int) -> int:
    """Extra live bytes in the frozen final norm's backward. ``LlamaRMSNorm`` in plain PyTorch ops:
    the gradient of its fp32 input through the product with ``rsqrt``, the mean's expanded gradient,
    and ``pow``'s backward (``xf.pow(1)``, its doubling, the product with the gradient): five fp32
    tensors of the input's size at once (measured). LayerNorm: the incoming gradient and the input's."""
    h = model.hidden_size
    if model.norm is NormKind.LAYERNORM:
        return tokens * h * (e + x)
    return 5 * FP32_BYTES * tokens * h


def summary(model: ModelConfig, settings: TrainSettings, recipe: PrecisionRecipe) -> LoraSummary:
    """The resolved LoRA settings and counts (``Estimate.settings.lora``)."""
    trainable = trainable_parameters(model, settings)
    dtype = DType(settings.lora_dtype.value)
    return LoraSummary(
        rank=settings.lora_rank, targets=tuple(settings.lora_targets), adapter_dtype=dtype, qlora=settings.qlora,
        base_format="bnb-nf4 (double quant)" if settings.qlora else recipe.weight_dtype.value,
        trainable_params=trainable, adapter_bytes=storage_bytes(trainable, dtype),
        base_weight_bytes=base_weight_bytes(model, settings, recipe.weight_dtype),
        adapter_recipe=adapter_recipe(settings, recipe).name, dropout=settings.lora_dropout,
    )
