"""Inference memory: weights, the KV cache, and the activations and logits of prefill and decoding.

Two engines. ``hf`` is a Hugging Face ``generate()``: the prompt is repeated for every beam (or
returned sample) and run in one forward (prefill), then each new token runs one step that appends
to the cache by concatenation. ``paged`` is a paged server (vLLM): the cache lives in blocks of
``block_size`` tokens preallocated in place, so nothing is copied, and tokens round up to blocks.
The total is the larger of the prefill and decode peaks plus the runtime overhead (CUDA context
and library workspaces); the 1.2x rule of thumb is shown beside it for reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from memcalc.config import (
    KV_LAYER_TYPES,
    MAMBA_LAYER_TYPES,
    Attention,
    Decoding,
    Engine,
    InferSettings,
    KVDType,
    LayerType,
    MambaVersion,
    MLPKind,
    ModelConfig,
    PrefillLogits,
    resolve_seq_len,
)
from memcalc.dtypes import BITS_PER_ELEMENT, DType, storage_bytes
from memcalc.estimate.assumptions import WeightOrigin
from memcalc.estimate.breakdown import Component, Estimate, Kind
from memcalc.estimate.device import CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES
from memcalc.estimate.hf_engine import (
    ForwardShape,
    attention_moment_bytes,
    decode_step_token_bytes,
    gated_delta_decode_step_bytes,
    generate_bookkeeping_bytes,
    layer_window,
    llama4_experts,
    llama4_experts_forward_bytes,
    mamba1_decode_step_bytes,
    mamba1_mixer_forward_bytes,
    mamba2_decode_step_bytes,
    mamba2_mixer_forward_bytes,
    mask_bytes,
    mla_expand_bytes,
    repeats_kv,
    rope_table_bytes,
    sink_attention,
    stream_tensors,
)
from memcalc.estimate.params import count_params
from memcalc.errors import Field, SettingsError

_FLOAT_DTYPES = {DType.FP32, DType.FP16, DType.BF16}
FP32_BYTES = 4
INDEX_BYTES = 8

# EleutherAI, "Transformer Math 101" (2023): inference needs about 20% over the weights;
# repeated in the Hugging Face accelerate docs (usage_guides/model_size_estimator).
RULE_OF_THUMB_FACTOR_NUMERATOR, RULE_OF_THUMB_FACTOR_DENOMINATOR = 6, 5

# The runtime overhead line: the CUDA context and one cuBLAS workspace (memcalc.estimate.device,
# with their sources); --overhead replaces the sum.
DEFAULT_OVERHEAD_BYTES = CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES
# A paged server's share of GPU memory (vLLM's --gpu-memory-utilization default).
DEFAULT_GPU_UTILIZATION = 0.9

# transformers' sampling warpers (generation/logits_process.py), bytes per logit beyond the fp32
# scores generate() keeps: each warper returns a new fp32 tensor and frees its input unless the
# caller still holds it. Temperature: the scaled copy. Top-k: a bool mask and the filled copy.
# Top-p: sort values (fp32) and int64 indices, the cumulative softmax, two bool masks and the
# filled copy (22 B beside its input). Then softmax probabilities for multinomial.
_TEMPERATURE_BYTES = FP32_BYTES
_TOP_K_BYTES = 1 + FP32_BYTES
_TOP_P_BYTES = FP32_BYTES + INDEX_BYTES + FP32_BYTES + 1 + 1 + FP32_BYTES
# Beam search: the fp32 log-softmax and its sum with the beam scores beside the fp32 scores.
_BEAM_BYTES = 2 * FP32_BYTES


@dataclass(eq=False)
class InferAssumptions:
    """The resolved assumptions of an inference estimate (memcalc.estimate.assumptions holds the
    training ones; this one lives with its estimator so that a training run's start-up does not
    build it)."""

    dtype: DType  # compute dtype
    weights: str  # the weight format or storage, as shown
    weights_from: WeightOrigin
    weights_detail: str | None  # CONFIG: the quantization_config's source; STORED: the file or directory
    kv_dtype: KVDType | DType
    batch_size: int
    decoding: Decoding
    num_beams: int
    num_return_sequences: int
    sequences: int  # per prompt: beams or returned samples
    top_k: int | None
    top_p: float | None
    temperature: float
    prompt_len: int
    max_new_tokens: int
    context_len: int  # tokens cached per sequence
    prefill_logits: PrefillLogits
    prefill_chunk: int
    attention: Attention
    engine: Engine
    block_size: int | None  # paged engine only
    tp: int
    kv_cache_bytes_per_token: int
    kv_cache_bytes_per_sequence: int
    sliding_window: int | None
    sliding_layers: int
    attention_layers: int
    state_bytes_per_sequence: int
    overhead_bytes: int
    expandable_segments: bool = False


def kv_dtype_for(settings: InferSettings) -> DType:
    if settings.kv_dtype is not None:
        return DType(settings.kv_dtype)
    weights = DType(settings.dtype)
    return weights if weights in _FLOAT_DTYPES else DType.BF16


def tensor_parallel_view(model: ModelConfig, tp: int) -> ModelConfig:
    """One TP rank's share of the model (memcalc.parallel.tensor_parallel_model), after checking
    that ``tp`` splits the heads."""
    from memcalc.parallel import tensor_parallel_model

    if tp == 1:
        return model
    if model.num_attention_heads % tp:
        raise SettingsError(Field("tp"), f" {tp} does not divide the {model.num_attention_heads} attention heads of "
                            f"{model.name}")
    if model.kv_heads % tp and tp % model.kv_heads:
        raise SettingsError(Field("tp"), f" {tp} and the {model.kv_heads} key/value heads of {model.name}: one must "
                            "divide the other (KV heads are split, or replicated when TP exceeds them)")
    if model.intermediate_size is not None and model.intermediate_size % tp:
        raise SettingsError(Field("tp"), f" {tp} does not divide the MLP width {model.intermediate_size} of "
                            f"{model.name}")
    return tensor_parallel_model(model, tp)


def kv_values_per_token_per_layer(model: ModelConfig, engine: Engine = Engine.HF) -> int:
    """Values one layer caches per token on one rank.

    Multi-head/grouped/multi-query attention: a key and a value per KV head,
    ``2 x kv_heads x head_dim``. Multi-head latent attention (DeepSeek-V2 sec. 2.1.2): a paged
    server caches the compressed latent and the shared rotary key, ``kv_lora_rank +
    qk_rope_head_dim`` (vLLM's MLAAttentionSpec, one "head", replicated on every TP rank); so do
    transformers 5's DeepSeek classes (``DeepseekV3Attention``: the cache is updated "while latent
    KV is still compressed", then ``expand_kv`` builds every head's keys and values; measured in
    tests/test_inference_hf.py). Every engine read today caches the same values; ``engine`` names
    the one asked about."""
    mla = model.mla
    if mla is not None:
        return mla.latent_width
    return 2 * model.kv_heads * model.attention_head_dim


def _largest_cached_tensor_values(model: ModelConfig) -> int:
    """Values per token of the larger of the two tensors one layer's transformers cache holds: the
    keys or the values (equal), or MLA's latent (``kv_lora_rank``) beside its rotary key."""
    if model.mla is not None:
        return max(model.mla.kv_lora_rank, model.mla.qk_rope_head_dim)
    return model.kv_heads * model.attention_head_dim


def kv_layer_kinds(model: ModelConfig) -> list[LayerType]:
    """The kind of each layer that caches keys and values, in layer order."""
    return [kind for kind in model.resolved_layer_types if kind in KV_LAYER_TYPES]


def hf_prefill_cache_tokens(model: ModelConfig, prompt: int, chunk: int) -> list[int]:
    """Tokens of storage each attention layer's transformers cache holds through the prompt's
    forward: a sliding or chunked layer's cache is a view of the last ``window - 1`` tokens of the
    states it concatenated (``DynamicSlidingWindowLayer.update``), so its storage holds the whole
    prompt (at most the view plus one chunk under chunked prefill) until that layer's first
    decoding step replaces it."""
    windows = (layer_window(model, kind) for kind in kv_layer_kinds(model))
    return [min(prompt, limit - 1 + chunk) if limit else prompt for limit in windows]


def _hf_layer_decode_transient(model: ModelConfig, local: ModelConfig, kind: LayerType, held: int, sequences: int,
                               kv_dtype: DType, element_bytes: int, eager: bool) -> int:
    """One layer's largest moment in a transformers decoding step beyond the cache, ``held``
    tokens in its cache: ``DynamicLayer.update`` concatenates a full layer's keys, then its values,
    so the old and the new copy of one exist together (a beam reorder's ``index_select`` goes the
    same way); ``DynamicSlidingWindowLayer.update`` concatenates both before it keeps their views.
    After the copy an MLA layer expands its latent to every head (``hf_engine.mla_expand_bytes``);
    eager attention repeats the keys and values to every query head (``repeat_kv``) beside the
    step's scores. Beside each, the step's own tensors of its token (``decode_step_token_bytes``)."""
    both = 2 if layer_window(model, kind) else 1
    moments = [storage_bytes(sequences * held * both * _largest_cached_tensor_values(local), kv_dtype)]
    if model.mla is not None:
        moments.append(mla_expand_bytes(local, sequences, held, element_bytes))
    if eager:
        heads, head_dim = local.num_attention_heads, local.attention_head_dim
        repeated = 2 * heads * head_dim if repeats_kv(local) else 0
        moments.append(element_bytes * sequences * (held * repeated + 3 * heads * (held + 1)))
    return max(moments) + decode_step_token_bytes(local, sequences, element_bytes)


def hf_decode_step_bytes(model: ModelConfig, local: ModelConfig, before: list[int], tokens: int, sequences: int,
                         kv_dtype: DType, element_bytes: int, eager: bool = False) -> tuple[int, int]:
    """(the peak of the cache and the transient, the largest transient) over a transformers
    decoding step that grows the cache to ``tokens``, layer by layer: the layers before the one
    running hold their new cache, the others what they held before the step (``before``, tokens
    of storage per attention layer)."""
    values = kv_values_per_token_per_layer(local) * sequences
    kinds = kv_layer_kinds(model)
    after = [cached_tokens(model, kind, tokens, Engine.HF, 1) for kind in kinds]
    peak = largest = 0
    for index, kind in enumerate(kinds):
        transient = _hf_layer_decode_transient(model, local, kind, after[index], sequences, kv_dtype, element_bytes,
                                               eager)
        held = sum(after[:index]) + sum(before[index:])
        peak, largest = max(peak, storage_bytes(values * held, kv_dtype) + transient), max(largest, transient)
    return peak, largest


def attention_layers(model: ModelConfig) -> int:
    """Layers that cache keys and values (full, sliding and chunked attention)."""
    return len(kv_layer_kinds(model))


def recurrent_layers(model: ModelConfig) -> int:
    """Layers that keep a fixed state per sequence (Mamba mixers, gated delta nets)."""
    return sum(1 for kind in model.resolved_layer_types if kind in (*MAMBA_LAYER_TYPES, LayerType.LINEAR_ATTENTION))


def kv_cache_bytes_per_token(model: ModelConfig, kv_dtype: DType, tp: int = 1, engine: Engine = Engine.HF) -> int:
    """Every attention layer's cache for one token on one rank: ``2 x L_attn x kv_heads x head_dim
    x bytes`` (GQA and MQA store ``kv_heads`` heads, not the query heads; TP splits them, or
    replicates one per rank when TP exceeds them, as vLLM's get_num_kv_heads); MLA: the latent per
    layer. Mamba and linear-attention layers keep a fixed state instead (``state_cache_bytes``)."""
    local = tensor_parallel_view(model, tp)
    return storage_bytes(attention_layers(model) * kv_values_per_token_per_layer(local, engine), kv_dtype)


def _round_up(tokens: int, block: int) -> int:
    return -(-tokens // block) * block


def cached_tokens(model: ModelConfig, kind: LayerType, tokens: int, engine: Engine, block_size: int) -> int:
    """Tokens one layer of ``kind`` holds for a sequence of ``tokens``: all of them (full attention),
    at most the window (sliding; vLLM's SlidingWindowSpec; transformers' storage after a decoding
    step) or at most one chunk (Llama 4's chunked attention: vLLM's ChunkedLocalAttentionSpec),
    rounded up to whole blocks by a paged engine."""
    limit = layer_window(model, kind)
    if not limit:
        held = tokens
    elif engine.paged:
        held = min(tokens, limit)
    else:
        # transformers' DynamicSlidingWindowLayer keeps a view of the last window - 1 tokens of the
        # window it concatenated, so a decoding step leaves a window of storage (the prompt's
        # forward leaves the whole prompt: hf_prefill_cache_tokens); chunked layers use the same
        # class with the chunk as window (measured with the transformers classes: tests/test_cache_hf.py)
        held = min(tokens, limit)
    return _round_up(held, block_size) if engine.paged else held


def kv_cache_bytes(model: ModelConfig, local: ModelConfig, tokens: int, sequences: int, kv_dtype: DType,
                   engine: Engine, block_size: int) -> int:
    """The key/value cache of ``sequences`` sequences of ``tokens`` tokens each, on one rank, layer
    by layer: sliding-window layers keep at most the window, chunked layers at most a chunk."""
    values = kv_values_per_token_per_layer(local, engine) * sequences
    held = sum(cached_tokens(model, kind, tokens, engine, block_size) for kind in kv_layer_kinds(model))
    return storage_bytes(values * held, kv_dtype)


def state_values_per_sequence(model: ModelConfig, engine: Engine = Engine.HF) -> tuple[int, int]:
    """Values of the fixed state every Mamba and linear-attention layer keeps per sequence,
    whatever its length: (the causal-conv window over the conv channels: transformers keeps
    conv_kernel columns, cache_utils.LinearAttentionLayer, vLLM's MambaSpec conv_kernel - 1; the SSM
    state, channels x d_state, or the gated delta net's recurrent state, value heads x key_head_dim x
    value_head_dim)."""
    trim = 1 if engine.paged else 0
    types = model.resolved_layer_types
    conv = ssm = 0
    if model.mamba is not None:
        m = model.mamba
        layers = sum(1 for kind in types if kind in MAMBA_LAYER_TYPES)
        conv += layers * m.conv_channels * (m.conv_kernel - trim)
        ssm += layers * m.ssm_state_values
    if model.linear_attention is not None:
        la = model.linear_attention
        layers = types.count(LayerType.LINEAR_ATTENTION)
        conv += layers * la.conv_channels * (la.conv_kernel - trim)
        ssm += layers * la.recurrent_state_values
    return conv, ssm


def state_cache_bytes(model: ModelConfig, sequences: int, dtype: DType, engine: Engine, tp: int = 1) -> int:
    """The recurrent state of ``sequences`` sequences on one rank (TP splits its channels and heads).
    The conv window is in the cache dtype. transformers' cache keeps the SSM and recurrent states in
    the dtype the mixer returns them in (``LinearAttentionLayer.lazy_initialization``: ``zeros_like``
    the first state), fp32 for every family: the scans accumulate in fp32 (the torch paths'
    ``.float()``, fla's and mamba_ssm's fp32 final states; measured in bf16, tests/test_cache_hf.py).
    vLLM's engines keep both in the model dtype by default (``mamba_ssm_cache_dtype`` auto), the
    recurrent state in the config's ``mamba_ssm_dtype`` where it names one (vLLM's Qwen3.5 model
    config, ``Qwen3_5ForConditionalGenerationConfig``, sets ``mamba_ssm_cache_dtype`` from it)."""
    conv, ssm = state_values_per_sequence(model, engine)
    ssm_dtype = DType.FP32 if engine is Engine.HF and BITS_PER_ELEMENT[dtype] < 32 else dtype
    la = model.linear_attention
    if engine is not Engine.HF and la is not None and la.state_dtype is not None:
        ssm_dtype = la.state_dtype
    return storage_bytes(sequences * conv // tp, dtype) + storage_bytes(sequences * ssm // tp, ssm_dtype)


def _compute_bytes(dtype: DType) -> int:
    """Activations run in the compute dtype when it is a float type; integer weights compute in bf16."""
    return BITS_PER_ELEMENT[dtype] // 8 if dtype in _FLOAT_DTYPES else 2


def prefill_activation_bytes(model: ModelConfig, tokens: int, element_bytes: int) -> int:
    """The most a no-grad forward holds inside one layer, beyond the cache, as memcalc's reference
    decoder runs it (the paged engines' profile; ``--engine hf`` follows transformers' classes,
    ``hf_layer_moments``): at the MLP's product the residual stream, the MLP input, the down
    projection's output and the new residual (4 x h) beside the activation, up projection and
    product (3 x f; a plain MLP 2 x f); the largest over dense and MoE layers, the experts one at a
    time. Checked against fake-tensor runs of the reference decoder (tests/test_validate.py).
    Mamba and linear-attention mixers: their projection, conv, scan and gated outputs beside the
    stream (``recurrent_mixer_elements``; sized from the tensors, not measured)."""
    from memcalc.estimate.inventory import MLPRole, layer_roles

    h = model.hidden_size
    width_factor = 3 if model.mlp is MLPKind.GATED else 2
    roles = set(layer_roles(model))
    peaks = [element_bytes * tokens * recurrent_mixer_elements(model)]
    if MLPRole.DENSE in roles:
        peaks.append(element_bytes * tokens * (4 * h + width_factor * model.intermediate_size))
    if MLPRole.MOE in roles:
        moe = model.moe
        per_expert = tokens * moe.experts_per_token // moe.num_experts
        routed = element_bytes * (4 * tokens * h + per_expert * (3 * h + width_factor * moe.expert_intermediate_size))
        peaks.append(routed + FP32_BYTES * tokens * moe.num_experts)
    return max(peaks)


def hf_layer_moments(model: ModelConfig, shape: ForwardShape, attention: Attention) -> list[int]:
    """Each layer's largest moment beyond the cache in transformers' prompt forward: its MLP's
    (dense, grouped experts, Llama 4's batched experts; none for a mixer-only block), its
    attention's where that can be larger (``hf_engine.attention_moment_bytes``; eager scores on
    top, as the reference decoder's), its Mamba or gated-delta mixer's."""
    from memcalc.estimate.inventory import MLPRole, layer_roles

    e, tokens, h = shape.element_bytes, shape.tokens, model.hidden_size
    stream = stream_tensors(model)
    eager_sinks = attention is Attention.EAGER and sink_attention(model)
    # gate, up, activation and product; a fused gate_up projection's output is one 2f tensor beside them
    width_factor = (4 if model.fused_gate_up else 3) if model.mlp is MLPKind.GATED else 2
    mlp = {MLPRole.NONE: 0}
    if model.intermediate_size is not None:
        mlp[MLPRole.DENSE] = e * tokens * (stream * h + width_factor * model.intermediate_size)
    if model.moe is not None:
        mlp[MLPRole.MOE] = (llama4_experts_forward_bytes(model, tokens, e) if llama4_experts(model)
                            else grouped_experts_forward_bytes(model, tokens, e, stream))
    mixer = e * tokens * recurrent_mixer_elements(model)
    mamba_mixer = None
    if model.mamba is not None:  # the first block's, whose input is the embedding, and the others'
        mixer_bytes = (mamba2_mixer_forward_bytes if model.mamba.version is MambaVersion.MAMBA2
                       else mamba1_mixer_forward_bytes)
        mamba_mixer = (mixer_bytes(model, shape, first_layer=True), mixer_bytes(model, shape))
    gated_delta = gated_delta_prefill_bytes(model, shape) if model.linear_attention is not None else None
    scores = (eager_scores_bytes(model, shape.sequences, shape.queries, shape.keys, e)
              if attention is Attention.EAGER and not eager_sinks else 0)
    moments = []
    for index, (role, kind) in enumerate(zip(layer_roles(model), model.resolved_layer_types, strict=True)):
        own = [mlp[role]]
        if kind in KV_LAYER_TYPES:
            own = [max(own[0], attention_moment_bytes(model, shape, eager_sinks, kind)) + scores]
        if kind is LayerType.MAMBA and mamba_mixer is not None:
            own.append(mamba_mixer[0 if index == 0 else 1])
        elif kind is LayerType.LINEAR_ATTENTION and gated_delta is not None:
            own.append(gated_delta)
        elif kind in (*MAMBA_LAYER_TYPES, LayerType.LINEAR_ATTENTION):
            own.append(mixer)
        moments.append(max(own))
    return moments


def gated_delta_prefill_bytes(model: ModelConfig, shape: ForwardShape) -> int:
    """A gated delta net's prompt forward with a cache (Qwen3-Next, Qwen3.5 with fla and causal_conv1d):
    the stream (3 x h) beside the mixer as a no-grad forward runs it, at its peak in fla's
    ``chunk_fwd_o`` (``activations.gated_delta_net_forward_transient`` without saving: the training
    harness's checkpointed forward, the same code); fla's fp32 final state is the size of the layer's
    state, counted with the cache."""
    from memcalc.estimate.activations import ActivationShape, gated_delta_net_forward_transient

    e = shape.element_bytes
    activation_shape = ActivationShape(tokens=shape.tokens, seq_len=shape.queries, batch_size=shape.sequences,
                                       element_bytes=e, stream_bytes=e, autocast=False)
    return e * 3 * shape.tokens * model.hidden_size + gated_delta_net_forward_transient(model, activation_shape,
                                                                                       saving=False)


def grouped_experts_forward_bytes(model: ModelConfig, tokens: int, element_bytes: int, stream: int = 4) -> int:
    """A no-grad experts block of transformers 5 (``grouped_mm_experts_forward``) at its peak, the
    output reorder (``weighted_out[inv_perm]``), for S = tokens x k assignments: the embedding output
    (the model keeps ``inputs_embeds``), the layer's input, the residual after attention and the
    block's input (4 x h); the gathered input, the down output, the weighted output and its reorder
    (4 S x h; the last two fp32 where the router's weights are, ``MoEConfig.routing_fp32``); the router's
    logits (E a token, in the router's dtype), its fp32 top-k values and int64 index, the sort's ids and
    permutation, the inverse permutation, the histogram's input and the routing weights' cast; a gated
    shared expert's output (Qwen's runs first; the others' after the experts). Wide experts (h < 3 I)
    peak at the gated activation instead. Measured on fake tensors with transformers'
    Qwen3MoeForCausalLM, MixtralForCausalLM and Glm4MoeForCausalLM (tests/test_inference.py)."""
    moe, h, e = model.moe, model.hidden_size, element_bytes
    assignments = tokens * moe.experts_per_token
    # the router's logits, in its dtype, stay for the model's output; its probabilities are gone
    logits = FP32_BYTES if moe.routing_fp32 else e
    router = tokens * moe.num_experts * logits + assignments * (2 * FP32_BYTES + 4 * INDEX_BYTES + e)
    # Qwen's gated shared expert runs before the experts (its output waits beside them); the others' after
    shared = moe.num_shared_experts * tokens * h * e if moe.shared_expert_gate else 0
    # fp32 routing weights make the weighted output and its reorder fp32
    weighted = FP32_BYTES if moe.routing_fp32 else e
    # wide experts peak at the gated activation instead: the gathered input beside gate_up's output
    # (its gate and up halves are views), the activation and the product (S x (h + 4 I))
    width = (4 if model.mlp is MLPKind.GATED else 2) * moe.expert_intermediate_size
    experts = max(assignments * h * (2 * e + 2 * weighted), assignments * (h + width) * e)
    return e * stream * tokens * h + experts + router + shared


def recurrent_mixer_note(model: ModelConfig, engine: Engine) -> str:
    """How the activations line sizes a model's recurrent mixers: the hf engine's Mamba-1 and Mamba-2
    mixers and gated delta nets as measured through their packages; Falcon-H1's parallel blocks and
    every paged engine's mixers from their tensors, unmeasured."""
    if not recurrent_mixer_elements(model):
        return ""
    if engine is not Engine.HF or LayerType.ATTENTION_MAMBA in model.resolved_layer_types:
        return " (Mamba/linear-attention mixer sized from its tensors, unmeasured)"
    if model.mamba is not None:
        version = "Mamba-2" if model.mamba.version is MambaVersion.MAMBA2 else "Mamba-1"
        return f" ({version} mixers as mamba_ssm and causal_conv1d run them)"
    return " (gated delta nets as fla and causal_conv1d run them)"


def recurrent_mixer_elements(model: ModelConfig) -> int:
    """Elements per token a Mamba or gated-delta-net mixer holds at once in a no-grad forward: the
    stream and the residual (2 x h), the input projection's output, the conv output, the scan
    output and the gated (normed) output. 0 for a model without such layers. An upper bound from
    the tensor sizes of transformers' mixers; not yet measured."""
    h, types = model.hidden_size, model.resolved_layer_types
    peaks = [0]
    if model.mamba is not None and any(kind in MAMBA_LAYER_TYPES for kind in types):
        m = model.mamba
        projected = 2 * m.intermediate_size + (0 if m.num_heads is None else 2 * m.n_groups * m.state_size + m.num_heads)
        peaks.append(2 * h + projected + m.conv_channels + 2 * m.intermediate_size)
    if model.linear_attention is not None and LayerType.LINEAR_ATTENTION in types:
        la = model.linear_attention
        projected = 2 * la.key_width + 2 * la.value_width + 2 * la.num_value_heads
        peaks.append(2 * h + projected + la.conv_channels + 2 * la.value_width)
    return max(peaks)


def eager_scores_bytes(model: ModelConfig, sequences: int, queries: int, keys: int, element_bytes: int) -> int:
    """Eager attention (transformers' eager_attention_forward) for one layer: the scores, the
    masked scores, the fp32 softmax and its cast back, ``heads x queries x keys`` each."""
    return model.num_attention_heads * sequences * queries * keys * (3 * element_bytes + FP32_BYTES)


def sampling_bytes_per_logit(settings: InferSettings) -> int:
    """fp32 bytes per logit the token choice holds at its peak, the fp32 scores included."""
    decoding = settings.resolved_decoding
    if decoding is Decoding.BEAM:
        return FP32_BYTES + _BEAM_BYTES
    if decoding is Decoding.GREEDY:
        return FP32_BYTES
    peak, holding_copy = 0, False  # holding_copy: the current scores are a warper's output
    for applies, transient in ((settings.temperature != 1.0, _TEMPERATURE_BYTES),
                               (settings.top_k is not None, _TOP_K_BYTES),
                               (settings.top_p is not None and settings.top_p < 1.0, _TOP_P_BYTES)):
        if applies:
            peak = max(peak, FP32_BYTES * holding_copy + transient)
            holding_copy = True
    peak = max(peak, FP32_BYTES * holding_copy + FP32_BYTES)  # softmax probabilities for multinomial
    return FP32_BYTES + peak


@dataclass(frozen=True)
class InferenceShape:
    """The resolved workload: sequences, tokens, and what each phase holds."""

    sequences: int  # batch x sequences per prompt
    prompt: int
    cached: int  # tokens per sequence in the cache after the last step
    generating: bool


def _shape(model: ModelConfig, settings: InferSettings) -> InferenceShape:
    sequences = settings.batch_size * settings.sequences_per_prompt
    if settings.prompt_len is not None:
        prompt = settings.prompt_len
        # every fed token is cached; the last new token is chosen, not fed
        cached = prompt + max(settings.max_new_tokens - 1, 0)
    else:
        prompt = cached = resolve_seq_len(model, settings.context_len)
    return InferenceShape(sequences, prompt, cached, settings.max_new_tokens > 1)


def checkpoint_weights(model: ModelConfig, settings: InferSettings) -> tuple[str | None, int, tuple[str, ...]]:
    """The weight format, group size and unquantised parts: ``--weights`` when given, else the
    checkpoint's own quantisation (config.json's quantization_config), else None (``--dtype``)."""
    checkpoint = model.checkpoint
    if settings.weights is not None or checkpoint is None or checkpoint.weights is None:
        return settings.weights, settings.group_size, ()
    return checkpoint.weights, checkpoint.group_size or settings.group_size, checkpoint.unquantized


def weight_components(local: ModelConfig, settings: InferSettings) -> tuple[int, list[Component]]:
    """Weights on one rank. Without ``--weights``, every tensor in ``--dtype`` (for fp8/int8/int4:
    no scales). A format (memcalc.estimate.weights, docs/weight-formats.md) stores the layers'
    linear weights with its scales, zeros and indices and keeps the embedding, output head, norms
    and biases in the compute dtype (GGUF types also quantise the embedding and head): two lines."""
    dtype = DType(settings.dtype)
    fmt, group_size, keep = checkpoint_weights(local, settings)
    if fmt is None or fmt == dtype.value:
        total = storage_bytes(count_params(local).total, dtype)
        note = f"P x {dtype.value}" if dtype in _FLOAT_DTYPES else f"P x {dtype.value}, every tensor, no scales"
        return total, [Component("weights", "Weights", total, Kind.STATIC, note, "parameter count x bytes per element")]
    from memcalc.estimate.weights import FORMATS, weight_bytes

    compute = dtype.value if dtype in _FLOAT_DTYPES else "bf16"
    breakdown = weight_bytes(local, fmt, group_size=group_size, compute_dtype=compute,
                             double_quant=settings.double_quant, keep_16bit=keep)
    source = FORMATS[breakdown.format].source
    if breakdown.format.value in ("fp32", "fp16", "bf16"):
        return breakdown.total_bytes, [Component("weights", "Weights", breakdown.total_bytes, Kind.STATIC,
                                                 f"P x {breakdown.format.value}", source)]
    rows = [
        Component("weights_quantised", f"Quantised weights ({breakdown.format.value})", breakdown.quantised_bytes,
                  Kind.STATIC, f"{breakdown.quantised_params / 1e9:,.2f}B params x "
                  f"{breakdown.bits_per_quantised_weight:.4g} bits incl. scales", source),
        Component("weights_unquantised", f"Unquantised weights ({breakdown.compute_dtype.value})", breakdown.rest_bytes,
                  Kind.STATIC, f"{breakdown.rest_params / 1e9:,.2f}B params: embedding, head, norms, biases",
                  "kept in the compute dtype (docs/weight-formats.md)"),
    ]
    return breakdown.total_bytes, [row for row in rows if row.bytes]


def resolved_attention(model: ModelConfig, settings: InferSettings) -> Attention:
    """The attention generate() runs: as asked, but eager for a class without an SDPA path
    (gpt-oss's sinks, ``hf_engine.sink_attention``) under the hf engine."""
    if settings.engine is Engine.HF and settings.attention is Attention.SDPA and sink_attention(model):
        return Attention.EAGER
    return settings.attention


def estimate_inference(model: ModelConfig, settings: InferSettings) -> Estimate:
    params = count_params(model)
    local = tensor_parallel_view(model, settings.tp)
    compute_dtype = DType(settings.dtype)
    kv_dtype = kv_dtype_for(settings)
    e = _compute_bytes(compute_dtype)
    shape = _shape(model, settings)
    sequences, prompt = shape.sequences, shape.prompt
    engine, block = settings.engine, settings.block_size

    weights, weight_rows = weight_components(local, settings)
    weight_format = checkpoint_weights(model, settings)[0]
    per_token = kv_cache_bytes_per_token(model, kv_dtype, settings.tp, engine)
    kv_cache = kv_cache_bytes(model, local, shape.cached, sequences, kv_dtype, engine, block)
    kv_prompt = kv_cache_bytes(model, local, prompt, sequences, kv_dtype, engine, block)
    # Mamba and linear-attention layers: a fixed state per sequence, beside the growing KV cache
    state = state_cache_bytes(model, sequences, kv_dtype, engine, settings.tp)
    vocab = local.vocab_size

    # Prefill: one forward over the prompt, or chunks of it; its layer transient, then the final
    # hidden states and the logits (of the last position, or all), and the first token's choice.
    chunk = min(settings.prefill_chunk or prompt, prompt)
    attention = resolved_attention(model, settings)
    forward_wide = 0  # rotary tables and masks the model's forward keeps for all its layers
    if engine is Engine.HF:
        forward = ForwardShape(sequences, chunk, prompt, e)
        moments = hf_layer_moments(local, forward, attention)
        shown = max(moments)
        forward_wide = (rope_table_bytes(local, chunk, e) + mask_bytes(local, forward, attention is Attention.EAGER)
                        + generate_bookkeeping_bytes(sequences, prompt))
        prefill_held = hf_prefill_cache_tokens(model, prompt, chunk)
        layer_values = kv_values_per_token_per_layer(local) * sequences  # one layer's, a token
        kv_prompt = storage_bytes(layer_values * sum(prefill_held), kv_dtype)
        if settings.prompt_len is not None and not shape.generating:  # no decoding step replaces the prompt's storage
            kv_cache = kv_prompt
        elif shape.generating and settings.resolved_decoding is Decoding.BEAM:
            # a beam reorder's index_select copies a sliding layer's view alone: window - 1 tokens
            windows = (layer_window(model, kind) for kind in kv_layer_kinds(model))
            held_after_reorder = [min(shape.cached, limit - 1) if limit else shape.cached for limit in windows]
            kv_cache = storage_bytes(layer_values * sum(held_after_reorder), kv_dtype)
        # layer by layer: the caches and states of the layers run so far (the running one's
        # included) beside the running layer's moment
        held = iter(prefill_held)
        cache_so_far, recurrent_so_far, layer_peak = 0, 0, 0
        recurrent = recurrent_layers(model)
        for kind, moment in zip(model.resolved_layer_types, moments, strict=True):
            if kind in KV_LAYER_TYPES:
                cache_so_far += storage_bytes(layer_values * next(held), kv_dtype)
            if kind in (*MAMBA_LAYER_TYPES, LayerType.LINEAR_ATTENTION):
                recurrent_so_far += 1
            layer_peak = max(layer_peak, cache_so_far + state * recurrent_so_far // max(recurrent, 1) + moment)
        # counted below beside the whole prompt's cache and every layer's state
        layer = layer_peak - kv_prompt - state
    else:
        layer = prefill_activation_bytes(local, sequences * chunk, e)
        if attention is Attention.EAGER:
            layer += eager_scores_bytes(local, sequences, chunk, prompt, e)
        shown = layer
    logit_positions = chunk if settings.prefill_logits is PrefillLogits.ALL else 1
    choice = sequences * vocab * sampling_bytes_per_logit(settings)
    # the logits in the compute dtype and their fp32 upcast, then the fp32 scores for the choice
    prefill_logits = max(sequences * logit_positions * vocab * (e + FP32_BYTES), sequences * vocab * e + choice)
    prefill_activations = max(shown, e * sequences * chunk * local.hidden_size) + forward_wide
    prefill = max(layer, e * sequences * chunk * local.hidden_size + prefill_logits) + forward_wide

    # Decoding: a hf engine concatenates a layer's keys, then its values (the old and new copy of
    # one exist together) or reorders them for beams, from a cache whose sliding layers still hold
    # the prompt at the first step; a paged engine writes in place. Then the step's fp32 logits and
    # the token choice.
    decode_logits = choice if shape.generating else 0
    phases = {"prefill": weights + kv_prompt + state + prefill}
    decode_copy = state_copy = 0
    if shape.generating and engine is Engine.HF:
        eager = attention is Attention.EAGER
        first, _ = hf_decode_step_bytes(model, local, prefill_held, prompt + 1, sequences, kv_dtype, e, eager)
        before_last = [cached_tokens(model, kind, shape.cached - 1, Engine.HF, 1) for kind in kv_layer_kinds(model)]
        last, decode_copy = hf_decode_step_bytes(model, local, before_last, shape.cached, sequences, kv_dtype, e,
                                                 eager)
        # a recurrent layer's step makes its new state beside the cached one: fla's fused recurrent
        # step returns one; a Mamba mixer clones the cached state for selective_state_update to
        # update in place (``recurrent_state.clone()`` in the scan forward), then caches the clone
        la, mamba = local.linear_attention, local.mamba
        state_copy = 0 if la is None else gated_delta_decode_step_bytes(local, sequences, e)
        if mamba is not None:
            step = (mamba2_decode_step_bytes if mamba.version is MambaVersion.MAMBA2 else mamba1_decode_step_bytes)
            state_copy = max(state_copy, step(local, sequences, e))
        decode_copy = max(decode_copy, state_copy)
        phases["decode"] = (weights + state + max(first, last, max(kv_prompt, kv_cache) + state_copy) + decode_logits
                            + generate_bookkeeping_bytes(sequences, shape.cached + 1))
    elif shape.generating:
        phases["decode"] = weights + kv_cache + state + decode_logits
    overhead = DEFAULT_OVERHEAD_BYTES if settings.overhead_bytes is None else settings.overhead_bytes
    rule_of_thumb = -(-weights * RULE_OF_THUMB_FACTOR_NUMERATOR // RULE_OF_THUMB_FACTOR_DENOMINATOR)

    tokens_note = "(prompt+new-1)" if settings.prompt_len is not None else "context"
    rounding = f", rounded to {block}-token blocks" if engine.paged else ""
    window = f", sliding layers capped at {model.sliding_window}" if model.num_sliding_layers else ""
    kv_formula = "L x (kv_lora_rank + rope) latent" if model.mla is not None else "2L x kv_heads x head_dim"
    if attention_layers(model) != model.num_layers:  # only the attention layers cache keys and values
        kv_formula = f"{attention_layers(model)} of {model.num_layers} layers: " + kv_formula.replace("2L", "2").replace(
            "L x ", "")
    if LayerType.CHUNKED_ATTENTION in model.resolved_layer_types:
        window += f", chunked layers capped at {model.attention_chunk_size}"
    decoding = settings.resolved_decoding
    mixer_note = recurrent_mixer_note(model, engine)
    components = (
        *weight_rows,
        Component("kv_cache", "KV cache", kv_cache, Kind.DYNAMIC,
                  f"{kv_formula} x {kv_dtype.value} x {tokens_note} x seqs{rounding}{window}",
                  "one key and one value vector per layer, KV head and token (MLA: DeepSeek-V2 sec. 2.1.2)"),
        Component("state_cache", "Recurrent state (conv + SSM)", state, Kind.DYNAMIC,
                  f"{recurrent_layers(model)} Mamba/linear-attention layers x (conv window + "
                  f"state) x {kv_dtype.value} x seqs",
                  "transformers cache_utils.LinearAttentionLayer; vLLM MambaSpec (conv_kernel - 1 columns)"),
        Component("activations", "Activations (peak)", max(prefill_activations, decode_copy), Kind.DYNAMIC,
                  "one layer's prefill forward" + (", eager scores" if attention is Attention.EAGER else "")
                  + mixer_note
                  + (f", {chunk}-token chunks" if chunk < prompt else "")
                  + ("; decode: the latent's expansion" if decode_copy and model.mla is not None
                     else "; decode: a recurrent state's new copy" if decode_copy and decode_copy == state_copy
                     else "; decode: a layer's key or value copy" if decode_copy else ""),
                  "transformers 5.25's classes, fake tensors (tests/test_inference_hf.py)" if engine is Engine.HF
                  else "reference decoder, fake-tensor measurement (tests/test_validate.py)"),
        Component("logits", "Logits and token choice", max(prefill_logits, decode_logits), Kind.DYNAMIC,
                  f"{'all' if logit_positions > 1 else 'last'}-position logits, fp32 scores, {decoding.value}"
                  + (f" ({sampling_bytes_per_logit(settings)} B/logit)" if decoding is Decoding.SAMPLE else ""),
                  "transformers generate() and its logits warpers (generation/utils.py, logits_process.py)"),
        Component("overhead", "Runtime overhead", overhead, Kind.RUNTIME,
                  "CUDA context 400 MiB + cuBLAS workspace 32 MiB" if settings.overhead_bytes is None else "as given",
                  "pytorch PR #86509 and issue #109888 (lazy-loaded context); CublasHandlePool.cpp"),
    )
    references = (
        Component("rule_of_thumb_total", "Rule of thumb (1.2 x weights)", rule_of_thumb, Kind.STATIC,
                  "1.2 x weights", "EleutherAI, Transformer Math 101 (2023)"),
    )
    whole_model = weights if settings.tp == 1 else weight_components(model, settings)[0]
    checkpoint = (
        Component("weights_only", "Weights only", whole_model, Kind.STATIC,
                  f"P x {weight_format or compute_dtype.value}",
                  "parameter count x bytes per element"),
    )
    if settings.weights:
        origin, detail = WeightOrigin.REQUESTED, None
    elif weight_format:
        origin, detail = WeightOrigin.CONFIG, model.checkpoint.source
    else:
        origin, detail = WeightOrigin.DTYPE, None
    resolved = InferAssumptions(
        dtype=compute_dtype, weights=weight_format or compute_dtype.value, weights_from=origin,
        weights_detail=detail, kv_dtype=kv_dtype, batch_size=settings.batch_size, decoding=decoding,
        num_beams=settings.num_beams, num_return_sequences=settings.num_return_sequences, sequences=sequences,
        top_k=settings.top_k, top_p=settings.top_p, temperature=settings.temperature, prompt_len=prompt,
        max_new_tokens=settings.max_new_tokens, context_len=shape.cached, prefill_logits=settings.prefill_logits,
        prefill_chunk=chunk, attention=attention, engine=engine,
        block_size=block if engine.paged else None, tp=settings.tp, kv_cache_bytes_per_token=per_token,
        kv_cache_bytes_per_sequence=kv_cache // sequences, sliding_window=model.sliding_window,
        sliding_layers=model.num_sliding_layers, attention_layers=attention_layers(model),
        state_bytes_per_sequence=state // sequences, overhead_bytes=overhead,
        expandable_segments=settings.expandable_segments,
    )
    components = tuple(component for component in components if component.bytes or component.key != "state_cache")
    return Estimate(model, params, resolved, components, references=references, checkpoint=checkpoint, phases=phases)


# --- What fits ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVCapacity:
    budget: int  # bytes for the cache
    block_size: int
    blocks: int
    tokens: int


def kv_capacity(budget: int, bytes_per_token: int, block_size: int) -> KVCapacity:
    """Whole blocks of ``block_size`` tokens that ``budget`` bytes hold (vLLM:
    ``num_blocks = available // page_size`` over all layers)."""
    blocks = max(budget, 0) // (bytes_per_token * block_size)
    return KVCapacity(budget, block_size, blocks, blocks * block_size)


@dataclass(frozen=True)
class FitReport:
    gpu: str
    gpu_memory: int
    utilization: float
    required: int  # the device total (memcalc.estimate.device)
    fits: bool
    kv_budget: int  # what a paged server leaves for the cache: util x usable - weights - activations - overhead
    kv_blocks: int
    kv_tokens: int
    max_batch: int  # at the given context
    max_context: int  # at the given batch (capped by the model's positions)
    context_limited_by_model: bool


def _largest(fits, low: int, high: int) -> int:
    """The largest n in [low, high] with fits(n), for a monotone fits; low - 1 if none."""
    if not fits(low):
        return low - 1
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def fit_report(model: ModelConfig, settings: InferSettings, gpu_name: str, gpu_memory: int,
               utilization: float = DEFAULT_GPU_UTILIZATION, estimate_with=None) -> FitReport:
    """Whether the workload's device total (memcalc.estimate.device) fits in ``utilization`` of
    ``gpu_memory`` (the GPU's usable capacity), the largest batch at its context and the largest
    context at its batch (both by the same estimator), and the KV tokens a paged server would
    allocate: the budget left after the static weights, the activation peak, the logits and the
    runtime overhead, in whole blocks. ``estimate_with(changes)`` makes each estimate (default:
    ``estimate_inference`` with ``changes`` applied to ``settings``)."""
    from dataclasses import replace

    from memcalc.estimate.device import device_memory

    if estimate_with is None:
        def estimate_with(changes: dict) -> Estimate:
            return estimate_inference(model, replace(settings, **changes))

    def required(changes: dict) -> int:
        return device_memory(estimate_with(changes)).device_total

    limit = int(gpu_memory * utilization)
    estimate = estimate_with({})
    components = {component.key: component.bytes for component in estimate.components}
    static = sum(component.bytes for component in estimate.components if component.kind is Kind.STATIC)
    budget = limit - static - components["activations"] - components["logits"] - components["overhead"]
    capacity = kv_capacity(budget, estimate.settings.kv_cache_bytes_per_token, settings.block_size)
    max_batch = _largest(lambda batch: required({"batch_size": batch}) <= limit, 1, 1 << 20)
    positions = model.max_position_embeddings
    if settings.prompt_len is not None:
        new = settings.max_new_tokens
        max_prompt = _largest(lambda tokens: required({"prompt_len": tokens}) <= limit, 1, max(positions - new, 1))
        max_context = max_prompt + new if max_prompt > 0 else 0
    else:
        max_context = _largest(lambda tokens: required({"context_len": tokens}) <= limit, 1, positions)
    needed = required({})
    return FitReport(gpu_name, gpu_memory, utilization, needed, needed <= limit, budget, capacity.blocks,
                     capacity.tokens, max(max_batch, 0), max(max_context, 0), max_context >= positions)
