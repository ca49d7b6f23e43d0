"""``infer --engine hf``: what transformers' own classes hold in ``generate()``'s no-grad forwards.

Transcribed from transformers 5.25's modelling code and measured with those classes on fake tensors
(``memcalc.validate.hf_forward`` for one prompt forward and one decoding step,
``memcalc.validate.run.measure_inference(impl="hf")`` for a whole generate() loop; the attention
kernels stand in for CUDA's: tests/test_inference_hf.py, docs/accuracy.md). What differs from
memcalc's reference decoder, and so from a paged engine:

- A sliding-window (or chunked) layer's cache is a view of the last ``window - 1`` tokens of the
  states it concatenated (``DynamicSlidingWindowLayer.update``), so through the prompt's forward
  and until that layer's first decoding step its storage still holds the whole prompt.
- ``DynamicLayer.update`` concatenates the keys, then the values: one of them is copied at a time.
- Multi-head latent attention (DeepSeek-V2/V3, Kimi K2, GLM-4.7-Flash) caches the compressed
  latent and the shared rotary key, and expands them to every head's keys and values in each
  forward (``expand_kv``).
- The model's forward keeps the rotary tables and one attention mask per masked layer kind for
  all its layers; SDPA gets no mask (``is_causal``) where none is needed, a boolean one for a
  sliding or chunked layer once the prompt outgrows the window, and eager attention an additive
  mask in the compute dtype for every layer kind.
- gpt-oss has no SDPA path (a sink logit per head joins the softmax): its class runs eager
  attention with the sink column concatenated to the scores.
"""

from __future__ import annotations

from dataclasses import dataclass

from memcalc.config import KV_LAYER_TYPES, LayerType, MambaVersion, MLPKind, ModelConfig, PositionKind
from memcalc.estimate.activations import INDEX_BYTES, MASK_BYTES, pre_norms

COMPLEX64_BYTES = 8
_MASKED_KINDS = (LayerType.SLIDING_ATTENTION, LayerType.CHUNKED_ATTENTION)


@dataclass(frozen=True)
class ForwardShape:
    """One no-grad forward of ``sequences`` sequences: ``queries`` new tokens each, attending to
    ``keys`` tokens (the prompt's forward: both the prompt)."""

    sequences: int
    queries: int
    keys: int
    element_bytes: int  # the compute dtype

    @property
    def tokens(self) -> int:
        return self.sequences * self.queries


def llama4_experts(model: ModelConfig) -> bool:
    """Llama 4's text MoE (Llama4TextMoe, a batched matmul over every expert, not grouped_mm): its
    chunked-attention layers mark the family."""
    return LayerType.CHUNKED_ATTENTION in model.resolved_layer_types


def sink_attention(model: ModelConfig) -> bool:
    """gpt-oss: transformers' class has no SDPA path (``_supports_sdpa = False``), so generate()
    runs its eager attention unless a flash kernel with sinks is installed and asked for."""
    return model.attention_sinks


def stream_tensors(model: ModelConfig) -> int:
    """Tensors of ``tokens x hidden`` alive at a layer's MLP: the embedding output (the model keeps
    ``inputs_embeds``), the layer's input (its caller still holds it), the residual after attention
    (none in Nemotron-H's one-mixer blocks) and the MLP's normed input (none in OLMo 2's post-norm
    block); Llama 4's and GPT-2's decoder
    layers also keep their attention output (``attention_states``, ``attn_output``) until they return."""
    keeps_attention_output = llama4_experts(model) or model.position_embedding is PositionKind.LEARNED
    # Nemotron-H's blocks hold one mixer each: no residual after an attention inside the block
    residual_after_attention = 0 if model.separate_blocks else 1
    return 2 + residual_after_attention + (1 if pre_norms(model) else 0) + (1 if keeps_attention_output else 0)


def llama4_experts_forward_bytes(model: ModelConfig, tokens: int, element_bytes: int) -> int:
    """Llama4TextMoe at its peak, the gated product: every token goes to every expert
    (``hidden_states.repeat(num_experts, 1)`` scaled by its router score, zero where not chosen),
    then ``bmm`` with gate_up, the activation of the gate half and the product, ``E x T x (h + 4 I)``,
    beside the stream."""
    moe = model.moe
    routed = moe.num_experts * tokens * (model.hidden_size + 4 * moe.expert_intermediate_size)
    return element_bytes * (stream_tensors(model) * tokens * model.hidden_size + routed)


def generate_bookkeeping_bytes(sequences: int, tokens: int) -> int:
    """What generate() itself keeps beside the model: the token ids it has so far and its all-ones
    attention mask, int64 ``(sequences, tokens)`` each, grown by concatenation every step."""
    return 2 * INDEX_BYTES * sequences * tokens


def rope_table_bytes(model: ModelConfig, positions: int, element_bytes: int) -> int:
    """The position tables (GPT-2: its learned position embeddings' output) and the rotary tables
    the model's forward computes once for every layer, ``(1, positions, dim)``
    in the compute dtype: cos and sin of the rotated head dims (Llama, Qwen, Mistral, OLMo; a
    ``partial_rotary_factor`` of them for GLM-4.5, Qwen3-Next, Phi-4-mini), of half of them
    (gpt-oss), of the shared rotary key (MLA), of each Gemma 3 rope (local and global), or
    Llama 4's complex64 frequencies of half the head dim."""
    if model.position_embedding is PositionKind.LEARNED:  # GPT-2's position embeddings, (1, positions, h)
        return positions * model.hidden_size * element_bytes
    if model.position_embedding is not PositionKind.ROTARY:
        return 0
    e, head_dim = element_bytes, int(model.attention_head_dim * model.partial_rotary_factor)
    if model.mla is not None:
        return 2 * positions * model.mla.qk_rope_head_dim * e
    if llama4_experts(model):
        return positions * head_dim // 2 * COMPLEX64_BYTES
    if model.attention_sinks:
        return 2 * positions * head_dim // 2 * e
    if model.qk_norm and model.norm_weight_offset and model.num_sliding_layers:
        # Gemma 3: a rope per layer kind (local and global bases)
        kinds = {kind for kind in model.resolved_layer_types if kind in KV_LAYER_TYPES}
        return 2 * len(kinds) * positions * head_dim * e
    return 2 * positions * head_dim * e


def layer_window(model: ModelConfig, kind: LayerType) -> int | None:
    """The tokens a layer of ``kind`` attends to at most: the sliding window, Llama 4's chunk, or
    None (every token)."""
    return {LayerType.SLIDING_ATTENTION: model.sliding_window,
            LayerType.CHUNKED_ATTENTION: model.attention_chunk_size}.get(kind)


def masked_kinds(model: ModelConfig, shape: ForwardShape, eager: bool) -> tuple[LayerType, ...]:
    """The attention layer kinds whose forward gets a mask: every kind under eager attention; under
    SDPA a sliding or chunked kind whose window the keys outgrow (transformers' sdpa_mask skips a
    mask the kernel's ``is_causal`` makes redundant; a decoding step's single query needs none)."""
    kinds = dict.fromkeys(kind for kind in model.resolved_layer_types if kind in KV_LAYER_TYPES)
    if eager:
        return tuple(kinds)
    if shape.queries == 1:
        return ()
    return tuple(kind for kind in kinds
                 if kind in _MASKED_KINDS and shape.keys > (layer_window(model, kind) or shape.keys))


def mask_bytes(model: ModelConfig, shape: ForwardShape, eager: bool) -> int:
    """The masks the model's forward builds once for all its layers, ``(sequences, 1, queries,
    keys)``: boolean for SDPA, additive in the compute dtype for eager attention."""
    per_mask = shape.sequences * shape.queries * shape.keys
    return len(masked_kinds(model, shape, eager)) * per_mask * (shape.element_bytes if eager else MASK_BYTES)


def repeats_kv(model: ModelConfig) -> bool:
    """Whether transformers' ``repeat_kv`` copies the keys and values to every query head: with
    grouped heads it must (the expanded view cannot be reshaped in place); one shared head (MQA)
    reshapes to a view."""
    return 1 < model.kv_heads < model.num_attention_heads


def sink_attention_bytes(model: ModelConfig, shape: ForwardShape) -> int:
    """gpt-oss's eager attention at its softmax: the masked scores, the scores with the sink column
    concatenated and their shift by the row maximum (``heads x queries x (3 keys + 2)``; the
    softmax runs in the scores' dtype and replaces the concatenation), beside the keys and values
    repeated to every head, the rotated queries, and the embedding, layer input and normed input."""
    e, heads, head_dim = shape.element_bytes, model.num_attention_heads, model.attention_head_dim
    scores = shape.sequences * heads * shape.queries * (3 * shape.keys + 2)
    repeated = 2 * shape.sequences * heads * shape.keys * head_dim if repeats_kv(model) else 0
    queries = shape.tokens * heads * head_dim
    return e * (3 * shape.tokens * model.hidden_size + queries + repeated + scores)


def mla_attention_bytes(model: ModelConfig, shape: ForwardShape) -> int:
    """DeepSeek's attention at SDPA's output copy (``transpose(1, 2).contiguous()``): the query
    projection, its rotated rotary part and the concatenated query (``q_b_proj`` out, ``q_rot``,
    ``query_states``), the latent projection (``compressed_kv``, held by its rotary key's view), the
    latent expanded to every head's keys and values (``kv_b_proj`` out, the assembled
    ``key_states``), the kernel's output and its copy, beside the embedding, layer input and normed
    input."""
    mla, heads = model.mla, model.num_attention_heads
    per_query = heads * (2 * mla.qk_head_dim + mla.qk_rope_head_dim + 2 * mla.v_head_dim) + mla.latent_width
    per_key = heads * (mla.qk_nope_head_dim + mla.v_head_dim + mla.qk_head_dim)
    return shape.element_bytes * (shape.tokens * (3 * model.hidden_size + per_query)
                                  + shape.sequences * shape.keys * per_key)


def decode_step_token_bytes(model: ModelConfig, sequences: int, element_bytes: int) -> int:
    """A decoding step's own tensors of its one token at a layer's cache update: the embedding,
    the layer's input and its normed input, the rotated query and the new key and value (MLA: the
    query projection, its rotary part and the concatenated query, and the latent projection)."""
    h, heads = model.hidden_size, model.num_attention_heads
    if model.mla is not None:
        mla = model.mla
        per_token = heads * (2 * mla.qk_head_dim + mla.qk_rope_head_dim) + mla.latent_width
    else:
        per_token = (heads + 2 * model.kv_heads) * model.attention_head_dim
    return element_bytes * sequences * (3 * h + per_token)


def mla_expand_bytes(model: ModelConfig, sequences: int, keys: int, element_bytes: int) -> int:
    """A decoding step's transient in an MLA layer: the cached latent expanded to every head's keys
    and values (``kv_b_proj`` out, ``key_states``) over all ``keys`` tokens."""
    mla = model.mla
    return element_bytes * sequences * keys * model.num_attention_heads * (
        mla.qk_nope_head_dim + mla.v_head_dim + mla.qk_head_dim)


def masked_sdpa_attention_bytes(model: ModelConfig, shape: ForwardShape) -> int:
    """A sliding or chunked layer's SDPA call with its boolean mask, at the kernel's output:
    transformers repeats the keys and values to every query head (``use_gqa_in_sdpa`` is False
    with a mask) and CUDA's ``convert_boolean_attn_mask`` makes an additive copy of the mask in the
    query dtype; beside them the rotated queries, the output, and the embedding, layer input and
    normed input (the output's contiguous copy comes once the converted mask is freed)."""
    e, heads, head_dim = shape.element_bytes, model.num_attention_heads, model.attention_head_dim
    repeated = 2 * shape.sequences * heads * shape.keys * head_dim if repeats_kv(model) else 0
    per_token = 3 * model.hidden_size + 2 * heads * head_dim
    return e * (shape.tokens * per_token + repeated + shape.sequences * shape.queries * shape.keys)


def attention_moment_bytes(model: ModelConfig, shape: ForwardShape, eager_sinks: bool, kind: LayerType) -> int:
    """The largest attention moment of one layer of ``kind`` beyond the cache (0 where the MLP's
    is larger by construction: plain SDPA without a mask)."""
    if eager_sinks:
        return sink_attention_bytes(model, shape)
    if model.mla is not None:
        return mla_attention_bytes(model, shape)
    if kind in masked_kinds(model, shape, eager=False):
        return masked_sdpa_attention_bytes(model, shape)
    return 0



def mamba2_mixer_forward_bytes(model: ModelConfig, shape: ForwardShape, first_layer: bool = False) -> int:
    """A Mamba-2 mixer's prompt forward with a cache (``NemotronHMamba2Mixer``,
    ``GraniteMoeHybridMambaLayer``, ``Mamba2Mixer``; transformers 5.25) at its peak, as a GPU with
    mamba_ssm and causal_conv1d installed runs it, beside the stream (``mamba_stream_bytes``):

    * held through the mixer: in_proj's output (z, xBC, dt: 2D + 2GN + H a token; the gate and dt
      are views of it) and causal_conv1d_fn's output (D + 2GN; x, B and C are views of it);
    * then the most of four moments: mamba_ssm's ``_mamba_chunk_scan_combined_fwd`` passing the
      chunk states (the fp32 ``dA_cumsum`` and ``dt``, b x H x chunks x chunk each; the fp32 chunk
      states, b x chunks x H x P x N, beside ``_state_passing_fwd``'s output in the compute dtype),
      its output scan (the passed states, the fp32 ``CB``, b x chunks x G x chunk^2, and ``out``,
      T x D), the scan's output copied by ``torch.cat``, and the gated RMSNorm's fp32 input, gate
      and ``silu(gate)`` (3 x T x D fp32) beside the copied output;
    * not here: the layer's own state, counted with the cache (``_state_passing_fwd``'s fp32 final
      state, until the cache copies it into a state of its own size).

    No padding mask: for generate()'s all-ones mask ``create_recurrent_attention_mask`` gives None.
    Measured on fake tensors with the classes and the packages' own Python (tests/test_inference_hf.py,
    ``memcalc.validate.mamba.mamba_inference_kernels``)."""
    from memcalc.estimate.activations import FP32_BYTES, mamba2_chunk_size

    m, e, tokens, b = model.mamba, shape.element_bytes, shape.tokens, shape.sequences
    inner, heads, groups, state = m.intermediate_size, m.num_heads, m.n_groups, m.state_size
    chunk = mamba2_chunk_size(model)
    chunks = -(-shape.queries // chunk)
    held = e * tokens * (2 * inner + 2 * groups * state + heads) + e * tokens * (inner + 2 * groups * state)
    cumsum = 2 * FP32_BYTES * b * heads * chunks * chunk
    chunk_states = b * chunks * inner * state  # H x P = D
    # the fp32 final state is the size of the state the cache then copies it into: counted there
    passing = cumsum + chunk_states * (FP32_BYTES + e)
    scan = cumsum + chunk_states * e + FP32_BYTES * b * chunks * groups * chunk * chunk + e * tokens * inner
    gather = 2 * e * tokens * inner
    norm = tokens * inner * (e + 3 * FP32_BYTES)
    return mamba_stream_bytes(model, tokens, e, first_layer) + held + max(passing, scan, gather, norm)


def mamba2_decode_step_bytes(model: ModelConfig, sequences: int, element_bytes: int) -> int:
    """A Mamba-2 mixer's decoding step at its peak, mamba_ssm's ``selective_state_update``: the clone
    of the cached fp32 state it updates in place (``mamba2_scan_forward``'s ``recurrent_state.clone()``,
    cached in its place afterwards), beside the step's in_proj output, ``causal_conv1d_update``'s
    output, the update's output (D) and the stream (``mamba_stream_bytes``), one token a sequence. Measured on fake
    tensors as ``mamba2_mixer_forward_bytes``."""
    from memcalc.estimate.activations import FP32_BYTES

    m = model.mamba
    projection = 2 * m.intermediate_size + 2 * m.n_groups * m.state_size + m.num_heads
    tensors = projection + m.conv_channels + m.intermediate_size
    return sequences * (FP32_BYTES * m.ssm_state_values + element_bytes * tensors
                        + mamba_stream_bytes(model, 1, element_bytes))


def gated_delta_decode_step_bytes(model: ModelConfig, sequences: int, element_bytes: int) -> int:
    """A gated delta net's decoding step at its peak (``Qwen3NextGatedDeltaNet`` with fla and
    causal_conv1d), the gated RMSNorm's ``silu(gate.float())``: fla's fused recurrent step has returned
    its new fp32 state (value heads x key dim x value dim) beside the cached one; held with it, one
    token a sequence: the stream (3 x h), the projections' outputs still referenced (Qwen3-Next:
    in_proj_qkvz's and in_proj_ba's, and the copies its head reshapes make of z, b and a; Qwen3.5:
    in_proj_z's, _b's and _a's), causal_conv1d_update's output, beta and the fp32 g, the step's
    output, and in the norm the weighted output in the compute dtype beside the fp32 gate and its
    silu (and the variance, one fp32 a head). Measured on fake tensors with fla's and causal_conv1d's
    sources (tests/test_inference_hf.py, ``memcalc.validate.gated_delta``)."""
    from memcalc.estimate.activations import FP32_BYTES

    la, e = model.linear_attention, element_bytes
    heads, values = la.num_value_heads, la.value_width
    if la.split_projections:  # Qwen3.5: z, b and a are in_proj_z's, _b's and _a's own outputs (qkv's is freed)
        projections, copies = values + 2 * heads, 0
    else:  # Qwen3-Next's in_proj_qkvz and in_proj_ba, and the copies their head reshapes make of z, b and a
        projections, copies = 2 * la.key_width + 2 * values + 2 * heads, values + 2 * heads
    tensors = e * (3 * model.hidden_size + projections + copies + la.conv_channels + heads + values + values)
    fp32 = FP32_BYTES * (heads + 2 * values + heads)  # g; the gate and its silu; the variance
    return sequences * (FP32_BYTES * la.recurrent_state_values + tensors + fp32)


def mamba1_masks_prompt(model: ModelConfig) -> bool:
    """MambaModel and FalconMambaModel hand generate()'s 2-D mask to every mixer in the prompt's forward
    (no ``create_recurrent_attention_mask``), which multiplies its input and its conv output by it;
    Jamba's model builds the recurrent mask, None for an unpadded batch."""
    return (model.mamba.version is not MambaVersion.MAMBA2 and model.mlp is MLPKind.NONE
            and all(kind is LayerType.MAMBA for kind in model.resolved_layer_types))


def mamba_stream_bytes(model: ModelConfig, tokens: int, element_bytes: int, first_layer: bool = False) -> int:
    """The stream beside a Mamba mixer: the embedding output, the block's input (fp32 where the blocks
    keep their residual in fp32: the first block's fp32 copy of the embedding; else the first block's
    input is the embedding itself) and its normed input."""
    from memcalc.estimate.activations import FP32_BYTES, mamba2_residual_in_fp32

    if mamba2_residual_in_fp32(model):
        layer_input = FP32_BYTES
    else:
        layer_input = 0 if first_layer else element_bytes
    return tokens * model.hidden_size * (2 * element_bytes + layer_input)


def mamba1_mixer_forward_bytes(model: ModelConfig, shape: ForwardShape, first_layer: bool = False) -> int:
    """A Mamba-1 mixer's prompt forward with a cache (``MambaMixer``, ``FalconMambaMixer``,
    ``JambaMambaMixer``; transformers 5.25) at its peak, in mamba_ssm's ``selective_scan_fn`` once the
    CUDA extension has allocated (csrc/selective_scan/selective_scan.cpp): beside the stream
    (``mamba_stream_bytes``; Mamba's and Falcon-Mamba's masked copy of the input, ``mamba1_masks_prompt``),
    in_proj's output (x and the gate, 2D a token), the conv output (or its masked copy), dt's, B's and
    C's tensors (Jamba's and Falcon-Mamba's normed B and C, x_proj's output freed; Mamba's x_proj
    output, dt_rank + 2N), ``SelectiveScanFn``'s contiguous copies of u, delta and the gate (D each)
    and of B and C (2N), the extension's ``out_z`` and ``out`` (D each) and its fp32 running states
    (b x D x ceil(s / 2048) x 2N), and the layer's fp32 A (D x N; ``_a_tensors``) and fp32 casts of D
    and dt's bias;
    less the layer's own state, which the cache counted so far includes but which the cache copies
    from the running states' last column only after the scan. Measured on fake tensors with the classes and the packages' own Python
    (``memcalc.validate.mamba.mamba_inference_kernels``)."""
    from memcalc.estimate.activations import FP32_BYTES

    m, e, tokens, b = model.mamba, shape.element_bytes, shape.tokens, shape.sequences
    inner, state = m.intermediate_size, m.state_size
    stream = mamba_stream_bytes(model, tokens, e, first_layer) + (
        e * tokens * model.hidden_size if mamba1_masks_prompt(model) else 0)
    held = e * tokens * (2 * inner + inner)
    dt_b_c = e * tokens * _mamba1_dt_b_c_width(model)
    copies = e * tokens * (3 * inner + 2 * state)
    extension = 2 * e * tokens * inner + FP32_BYTES * b * inner * -(-shape.queries // 2048) * 2 * state
    constants = FP32_BYTES * (_a_tensors(model) * inner * state + 2 * inner)
    own_state = FP32_BYTES * b * m.ssm_state_values
    return stream + held + dt_b_c + copies + extension + constants - own_state


def mamba1_decode_step_bytes(model: ModelConfig, sequences: int, element_bytes: int) -> int:
    """A Mamba-1 mixer's decoding step at its peak, mamba_ssm's ``selective_state_update``: the clone
    of the cached fp32 state it updates in place (``mamba_scan_forward``'s ``recurrent_state.clone()``),
    beside one token a sequence of the stream, in_proj's output, ``causal_conv1d_update``'s output,
    delta and the update's output (D each), the normed B and C (Mamba: x_proj's output), and the layer's
    fp32 A (D x N; ``_a_tensors``) and its fp32 cast of dt's bias."""
    from memcalc.estimate.activations import FP32_BYTES

    m, e = model.mamba, element_bytes
    inner, state = m.intermediate_size, m.state_size
    tensors = e * (2 * inner + 3 * inner + _mamba1_dt_b_c_width(model))
    per_sequence = FP32_BYTES * m.ssm_state_values + tensors + mamba_stream_bytes(model, 1, e)
    return sequences * per_sequence + FP32_BYTES * (_a_tensors(model) * inner * state + inner)


def _mamba1_normed(model: ModelConfig) -> bool:
    """Jamba's and Falcon-Mamba's mixers norm dt, B and C (Jamba with weights); Mamba's does not."""
    return model.mamba.inner_norms or model.mamba.unweighted_inner_norms


def _mamba1_dt_b_c_width(model: ModelConfig) -> int:
    """Elements a token of dt's, B's and C's tensors a Mamba-1 mixer holds in its scan: the normed B and C
    (x_proj's output freed once all three are normed), or Mamba's x_proj output (dt_rank + 2N)."""
    m = model.mamba
    return 2 * m.state_size if _mamba1_normed(model) else m.dt_rank + 2 * m.state_size


def _a_tensors(model: ModelConfig) -> int:
    """Copies of the fp32 A = -exp(A_log) a Mamba-1 layer holds in its scan: MambaMixer's forward makes
    one for its fused training path and mamba_scan_forward another (Jamba and Falcon-Mamba: the latter)."""
    return 1 if _mamba1_normed(model) else 2
