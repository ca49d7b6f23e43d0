"""Activation memory saved for the backward pass, per Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models" (arXiv:2205.05198).

Section 4.1 derives, for one GPT-style layer with 16-bit activations and 1-byte dropout masks,
``s*b*h*(34 + 5*a*s/h)`` bytes. Per token and hidden unit it keeps 16 elements of 16-bit
tensors (attention: QKV input 1, Q and K 2, V 1, output-projection input 1; MLP: input 1,
GELU input 4, second-linear input 4; the two LayerNorm inputs 2), i.e. 32*sbh bytes, plus two
1-byte dropout masks (2*sbh). Per head it keeps the softmax output and its dropout output in
16 bits (4*a*s^2*b) and the 1-byte softmax-dropout mask (a*s^2*b).

Written per element size ``e`` (2 for fp16/bf16, 4 for fp32) with masks kept at one byte:
``sbh*(16e + 2) + a*s^2*b*(2e + 1)``, which gives the paper's 34 and 5 at ``e = 2``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from math import ceil

from memcalc.config import MLPKind, ModelConfig, NormKind, NormPlacement, QKNormScope, Recompute


def megatron_layer_activation_bytes(
    seq_len: int, batch_size: int, hidden_size: int, num_heads: int, element_bytes: int, recompute: Recompute,
    tp: int = 1, sp: bool = False, cp: int = 1,
) -> int:
    """Bytes one transformer layer keeps for backward on one rank (Korthikanti et al. 2022, sec. 4.1,
    4.2 and Table 2).

    Of the ``sbh (16e + 2)`` bytes, ``sbh (4e + 2)`` stay whole on every TP rank without sequence
    parallelism (the two LayerNorm inputs, the attention and MLP block inputs, two dropout masks:
    the paper's 10 at e = 2); the other ``12e sbh`` (its 24) and the attention scores are split by
    TP. Sequence parallelism splits the rest too. Context parallelism splits the sequence.
    Selective recompute drops the score term (sec. 5); full recompute keeps only the layer input,
    ``e sbh`` (``/t`` with SP).
    """
    sbh = seq_len // cp * batch_size * hidden_size
    if recompute is Recompute.FULL:
        return element_bytes * sbh // (tp if sp else 1)
    replicated = sbh * (4 * element_bytes + 2)
    split = sbh * 12 * element_bytes
    per_layer = (replicated + split) // tp if sp else replicated + split // tp
    if recompute is Recompute.NONE:
        per_layer += num_heads * (seq_len // cp) * seq_len * batch_size * (2 * element_bytes + 1) // tp
    return per_layer


def output_layer_activation_bytes(
    seq_len: int, batch_size: int, hidden_size: int, vocab_size: int, element_bytes: int,
    tp: int = 1, sp: bool = False, cp: int = 1,
) -> int:
    """Final norm input + output-layer input + fp32 logits for the cross-entropy:
    ``4sbh(1 + V/h)`` bytes at 16 bits (Korthikanti et al. 2022, sec. 4.3); the logits are split by
    TP (vocabulary-parallel cross-entropy), the two inputs only with sequence parallelism."""
    tokens = seq_len // cp * batch_size
    return 2 * element_bytes * tokens * hidden_size // (tp if sp else 1) + 4 * tokens * vocab_size // tp


# --- Architecture-aware model ---------------------------------------------------------------------
#
# Bytes each operation of a Llama/GPT-style block keeps for backward, derived from PyTorch's
# autograd formulas (tools/autograd/derivatives.yaml: a matmul keeps its input, an elementwise
# product keeps both operands when both need gradients, SiLU/GELU keep their input, softmax its
# output, fused SDPA kernels their inputs, output and log-sum-exp) for the blocks of the Hugging
# Face implementations that memcalc.validate.model mirrors. Each term is checked against
# fake-tensor measurement (tests/test_validate.py, docs/accuracy.md).

FP32_BYTES = 4
INDEX_BYTES = 8  # int64 token ids and routing indices


@dataclass(frozen=True)
class ActivationShape:
    """The sizes that set activation memory. ``element_bytes`` is the compute dtype of saved
    tensors, ``stream_bytes`` the residual stream's (fp32 under autocast, else the same)."""

    tokens: int  # sequence x micro-batch
    seq_len: int
    batch_size: int
    element_bytes: int
    stream_bytes: int
    autocast: bool
    # Tokens of the hidden-size stream (norm inputs, block inputs) this rank keeps: the tokens
    # divided by TP under sequence parallelism (Korthikanti et al. 2022 sec. 4.2.2), else all.
    stream_tokens: int | None = None
    # PyTorch DTensor SP: the column-parallel matmuls save their all-gathered (whole) input
    gathered_linear_inputs: bool = False
    # FP8 recipes: bytes per element of the quantised GEMM inputs saved for backward (None: e)
    gemm_input_bytes: Fraction | None = None

    @property
    def stream(self) -> ActivationShape:
        """The shape of a hidden-size stream tensor on this rank."""
        if self.stream_tokens is None or self.stream_tokens == self.tokens:
            return self
        return replace(self, tokens=self.stream_tokens, stream_tokens=None)

    @property
    def linear_input(self) -> ActivationShape:
        """The shape of the hidden-size input a column-parallel matmul saves: the rank's stream
        shard (Megatron re-gathers it in backward) or, under DTensor SP, the gathered tensor."""
        return self if self.gathered_linear_inputs else self.stream


def gemma_norm(model: ModelConfig) -> bool:
    """Gemma's RMSNorm (modeling_gemma.py / gemma2 / gemma3 ``GemmaRMSNorm``): ``norm(x.float()) *
    (1.0 + weight.float())``, cast back last (``ModelConfig.norm_weight_offset``)."""
    return model.norm is NormKind.RMSNORM and model.norm_weight_offset


def norm_scales_in_fp32(model: ModelConfig) -> bool:
    """RMSNorms that multiply by their weight before casting back to the input dtype, so the
    product saves the fp32 normalised tensor: Gemma's ``(1 + weight)``, OLMo 2's
    ``(self.weight * hidden_states).to(input_dtype)`` (modeling_olmo2.py ``Olmo2RMSNorm``) and gpt-oss's,
    the same (modeling_gpt_oss.py ``GptOssRMSNorm``; gpt-oss is the family with attention sinks); Llama's
    casts first (``self.weight * hidden_states.to(input_dtype)``) and saves the cast."""
    return model.norm is NormKind.RMSNORM and (gemma_norm(model) or model.norm_placement is NormPlacement.POST
                                               or model.attention_sinks)


def norm_saved_bytes(model: ModelConfig, width: int, shape: ActivationShape) -> int:
    """RMSNorm as Llama's: the fp32 upcast input and the normalised tensor cast back to the stream
    dtype, plus the fp32 reciprocal root per token; as Gemma's and OLMo 2's (``norm_scales_in_fp32``)
    the normalised tensor stays fp32, and Gemma's ``1 + weight.float()`` is one fp32 vector a call.
    LayerNorm: its input and fp32 mean and rstd. Measured against transformers' Gemma 3 and OLMo 2
    classes on fake tensors (tests/test_validate_hf_families.py)."""
    tokens = shape.tokens
    if model.norm is NormKind.LAYERNORM:
        return tokens * width * shape.stream_bytes + 2 * FP32_BYTES * tokens
    normalised = FP32_BYTES if norm_scales_in_fp32(model) else shape.stream_bytes
    weight = FP32_BYTES * width if gemma_norm(model) else 0
    return tokens * width * (FP32_BYTES + normalised) + FP32_BYTES * tokens + weight


def pre_norms(model: ModelConfig) -> bool:
    """A norm before attention and before the MLP (every placement but OLMo 2's post-norm)."""
    return model.norm_placement is not NormPlacement.POST


def post_norms(model: ModelConfig) -> bool:
    """A norm of each sublayer's output before the residual add: Gemma 2/3's sandwich, OLMo 2's post."""
    return model.norms_per_layer >= 4 or model.norm_placement is NormPlacement.POST


def qk_norm_saved_bytes(model: ModelConfig, shape: ActivationShape) -> int:
    """The query and key norms: per head over ``head_dim`` (Qwen3, Gemma 3), or over the whole
    projection width (OLMo 2's ``q_norm`` of heads x head_dim, ``k_norm`` of kv_heads x head_dim).
    They read the projections' outputs, in the compute dtype."""
    tokens, head_dim = shape.tokens, model.attention_head_dim
    heads, kv_heads = model.num_attention_heads, model.kv_heads
    if model.qk_norm_scope is QKNormScope.FULL:
        return (norm_saved_bytes(model, heads * head_dim, shape)
                + norm_saved_bytes(model, kv_heads * head_dim, shape))
    return (norm_saved_bytes(model, head_dim, replace(shape, tokens=tokens * heads))
            + norm_saved_bytes(model, head_dim, replace(shape, tokens=tokens * kv_heads)))


def l2_qk_norm_saved_bytes(model: ModelConfig, shape: ActivationShape) -> int:
    """Llama 4's weightless q/k norm on its rotary layers (modeling_llama4.py ``Llama4TextL2Norm``:
    ``x * rsqrt(mean(x^2) + eps)`` on ``x.float()``): the fp32 rotated queries and keys and one fp32
    root per head and token (``qk_norm_scope`` l2, on the chunked-attention layers: the ones with
    rotary positions)."""
    heads = model.num_attention_heads + model.kv_heads
    return shape.tokens * heads * FP32_BYTES * (model.attention_head_dim + 1)


def _linear_inputs_bytes(shape: ActivationShape, width: int, consumers: int) -> int:
    """A tensor read by ``consumers`` linear layers is kept once; autocast casts it once per layer.
    FP8 recipes keep the quantised input instead, once for the fused projections (Transformer
    Engine's LayerNormLinear / LayerNormMLP)."""
    if shape.gemm_input_bytes is not None:
        return ceil(shape.tokens * width * shape.gemm_input_bytes)
    copies = consumers if shape.autocast else 1
    return copies * shape.tokens * width * shape.element_bytes


def attention_saved_bytes(model: ModelConfig, shape: ActivationShape, attention: str, recompute: Recompute) -> int:
    if model.mla is not None:
        return mla_attention_saved_bytes(model, shape, attention, recompute)
    tokens, e = shape.tokens, shape.element_bytes
    q_width = model.num_attention_heads * model.attention_head_dim
    # Eager attention repeats grouped K/V heads to the query heads first (Hugging Face repeat_kv);
    # SDPA and flash kernels read the grouped heads directly.
    # Under selective recompute the repeat happens inside the recomputed part, so only the
    # grouped heads are kept.
    grouped = model.kv_heads < model.num_attention_heads
    repeated = grouped and attention == "eager" and recompute is Recompute.NONE
    kv_width = q_width if repeated else model.kv_heads * model.attention_head_dim
    stream = shape.stream
    saved = norm_saved_bytes(model, model.hidden_size, stream) if pre_norms(model) else 0
    saved += _linear_inputs_bytes(shape.linear_input, model.hidden_size, 3)
    saved += tokens * (q_width + 2 * kv_width) * e  # q (after rotary), k and v as attention reads them
    if model.qk_norm and model.qk_norm_scope is not QKNormScope.L2:  # Qwen3, Gemma 3: per head; OLMo 2: whole
        saved += qk_norm_saved_bytes(model, shape)
    if post_norms(model):  # Gemma-2/3's and OLMo 2's norm of the attention output (before the residual add)
        saved += norm_saved_bytes(model, model.hidden_size, stream)
    saved += tokens * q_width * e  # attention output = output-projection input
    if shape.gemm_input_bytes is not None:  # FP8: the output projection keeps a quantised copy beside it
        saved += ceil(tokens * q_width * shape.gemm_input_bytes)
    if attention == "eager":
        if recompute is Recompute.NONE:
            scores = model.num_attention_heads * shape.seq_len * shape.seq_len * shape.batch_size
            # the softmax output (fp32 unless GPT-2-style in pure 16-bit), and its cast to the compute dtype
            output, cast = softmax_bytes(model, e, shape.autocast)
            saved += scores * (output + cast + probability_dropout_bytes(model, e, shape.autocast))
            if model.attention_sinks:  # gpt-oss: the softmax also spans the sink column (its cast does not:
                # the sink is sliced off first), and the logits' max saves its int64 index per row
                rows = model.num_attention_heads * shape.seq_len * shape.batch_size
                saved += rows * (output + INDEX_BYTES)
    else:
        # log-sum-exp per head and token; with dropout the flash and memory-efficient kernels keep
        # their RNG state (a seed and an offset), not a mask
        saved += FP32_BYTES * tokens * model.num_attention_heads
    return saved + residual_dropout_bytes(model, stream)


# Dropout as CUDA runs nn.Dropout in training (the fused native_dropout: the input is not kept,
# a 1-byte mask is; at::native::dropout). Measured with the reference decoder and the Hugging Face
# GPT-2 class on fake tensors (docs/accuracy.md).
MASK_BYTES = 1


def softmax_bytes(model: ModelConfig, element_bytes: int, autocast: bool) -> tuple[int, int]:
    """(bytes per score of an eager softmax's output, of its cast to the compute dtype): fp32 and a
    16-bit cast (none in fp32), or, for GPT-2's softmax in the scores' 16-bit dtype without
    autocast, the output alone (transformers' ``.type(value.dtype)`` is then a no-op)."""
    if model.softmax_in_fp32 or autocast or element_bytes == FP32_BYTES:
        return FP32_BYTES, (element_bytes if element_bytes != FP32_BYTES else 0)
    return element_bytes, 0


def probability_dropout_bytes(model: ModelConfig, element_bytes: int, autocast: bool) -> int:
    """Bytes per attention score that dropout of the eager probabilities adds: its mask; the
    dropped copy, kept by ``probs @ v``, takes the place of the cast it was made from, except where
    the probabilities were not cast (fp32, GPT-2's 16-bit softmax) and the copy is new."""
    if not model.attention_dropout:
        return 0
    _output, cast = softmax_bytes(model, element_bytes, autocast)
    return MASK_BYTES + (element_bytes if not cast else 0)


def residual_dropout_bytes(model: ModelConfig, stream: ActivationShape) -> int:
    """GPT-2's and Phi's dropout of a sublayer's output before the residual add: its mask (the
    dropped output goes to the add, which keeps nothing)."""
    return stream.tokens * model.hidden_size * MASK_BYTES if model.residual_dropout else 0


def embedding_dropout_bytes(model: ModelConfig, stream: ActivationShape) -> int:
    """GPT-2's dropout of the embeddings' sum: its mask (the dropped sum replaces the sum as the
    first norm's input)."""
    return stream.tokens * model.hidden_size * MASK_BYTES if model.embedding_dropout else 0


def attention_output_width(model: ModelConfig) -> int:
    """Elements per token of the attention output (the output projection's input)."""
    if model.mla is not None:
        return model.num_attention_heads * model.mla.v_head_dim
    return model.num_attention_heads * model.attention_head_dim


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# PyTorch's memory-efficient SDPA kernel (the one CUDA runs when value heads are narrower than
# query/key heads, as in MLA: its flash kernel needs equal sizes) keeps a log-sum-exp row per head
# padded to a multiple of 32 positions (aten/src/ATen/native/transformers/cuda/attention.cu).
EFFICIENT_LSE_BLOCK = 32


def mla_attention_saved_bytes(model: ModelConfig, shape: ActivationShape, attention: str, recompute: Recompute) -> int:
    """Multi-head latent attention (``memcalc.validate.model.MLAttention``, as transformers'
    DeepSeek-V2/V3): the input norm; the normed input read by the query (``q_proj`` or ``q_a_proj``)
    and latent (``kv_a_proj_with_mqa``) projections; with a query LoRA rank the ``q_a_layernorm``
    and ``q_b_proj``'s input; the latent norm and ``kv_b_proj``'s input; the per-head queries and
    keys after the rotary part is concatenated (new tensors of ``qk_head_dim`` per head); the whole
    ``kv_b_proj`` output, which the value view passed to an SDPA kernel keeps alive (``nope + v``
    per head, not ``v``; eager attention saves a contiguous copy of the values); the attention
    output (``o_proj``'s input); and the kernel's log-sum-exp or, eager, the softmax output. The
    rotary products save only the shared cos/sin tables. Checked term by term against the
    reference block on fake tensors (tests/test_mla.py): exact but for the memory-efficient
    kernel's two int64 philox scalars (16 bytes a layer)."""
    mla, heads = model.mla, model.num_attention_heads
    tokens, e = shape.tokens, shape.element_bytes
    h = model.hidden_size
    # The latent norms read projection outputs in the compute dtype (under autocast too) and
    # give fp32 under autocast, which the next projection casts once: one e-byte copy either way.
    inner = replace(shape, stream_bytes=e, stream_tokens=None)
    saved = norm_saved_bytes(model, h, shape.stream) + _linear_inputs_bytes(shape.linear_input, h, 2)
    if mla.q_lora_rank is not None:
        saved += norm_saved_bytes(model, mla.q_lora_rank, inner) + tokens * mla.q_lora_rank * e
    saved += norm_saved_bytes(model, mla.kv_lora_rank, inner) + tokens * mla.kv_lora_rank * e
    # The latent is a slice of kv_a_proj_with_mqa's output: where the norm saves that slice itself
    # (RMSNorm's fp32 upcast is a no-op in fp32; LayerNorm keeps its input) the rotary key's
    # columns stay alive with it.
    if model.norm is NormKind.LAYERNORM or e == FP32_BYTES:
        saved += tokens * mla.qk_rope_head_dim * e
    # q and k as the kernel reads them. Under autocast the rotary part comes out in the dtype of
    # the cos/sin tables (the weights'), so the concatenated q and k are in that dtype: kernels
    # save their own low-precision casts, a checkpointed eager attention its fp32 inputs.
    checkpointed_inputs = attention == "eager" and recompute is Recompute.SELECTIVE
    qk_bytes = shape.stream_bytes if checkpointed_inputs and shape.autocast else e
    saved += tokens * heads * 2 * mla.qk_head_dim * qk_bytes
    # v is a strided view of kv_b_proj's output: SDPA kernels (and a checkpointed eager
    # attention) save the view, keeping that whole output; eager's probs @ v reshapes the view
    # into a contiguous copy, which is what it saves (the output itself is then freed).
    copied_values = attention == "eager" and recompute is Recompute.NONE
    value_width = mla.v_head_dim if copied_values else mla.qk_nope_head_dim + mla.v_head_dim
    saved += tokens * heads * value_width * e
    saved += tokens * heads * mla.v_head_dim * e  # attention output = o_proj input
    if attention == "eager":
        if recompute is Recompute.NONE:
            scores = heads * shape.seq_len * shape.seq_len * shape.batch_size
            saved += scores * (FP32_BYTES + (e if e != FP32_BYTES else 0))
    else:
        positions = shape.seq_len
        if mla.qk_head_dim != mla.v_head_dim:
            positions = _ceil_to(positions, EFFICIENT_LSE_BLOCK)
        saved += FP32_BYTES * heads * positions * shape.batch_size
    return saved


# --- Per-op selective checkpointing (--recompute op) -----------------------------------------------
#
# torch.utils.checkpoint with a selective policy (create_selective_checkpoint_contexts): a
# checkpointed layer keeps its input and the outputs of the ops the policy saves; everything else is
# recomputed in backward, where the layer holds its whole saved set again while its backward runs.
# torchtitan's op policy (torchtitan/models/llama3/parallelize_llama.py, the policy of its Dec 2024
# Llama 3 benchmarks) saves the SDPA kernels' outputs and every other ``aten.mm`` of the layer's
# forward, counting from the first; a projection with a bias runs ``addmm``, which it neither counts
# nor saves. Measured against the reference decoder under that policy on fake tensors
# (memcalc.validate.model.op_checkpoint_context; docs/accuracy.md).

PROJECTION_ORDER = ("q", "k", "v", "o", "gate", "up", "down")  # the order a layer's forward runs them


def layer_projections(model: ModelConfig) -> tuple[tuple[str, int, bool], ...]:
    """(name, output width, has a bias) of a dense attention layer's projections, in forward order."""
    q_width = model.num_attention_heads * model.attention_head_dim
    kv_width = model.kv_heads * model.attention_head_dim
    widths = {"q": q_width, "k": kv_width, "v": kv_width, "o": model.hidden_size,
              "gate": model.intermediate_size, "up": model.intermediate_size, "down": model.hidden_size}
    biases = {"q": model.qkv_bias, "k": model.qkv_bias, "v": model.qkv_bias, "o": model.attn_output_bias,
              "gate": model.mlp_bias, "up": model.mlp_bias, "down": model.mlp_bias}
    names = [name for name in PROJECTION_ORDER if name != "gate" or model.mlp is MLPKind.GATED]
    return tuple((name, widths[name], biases[name]) for name in names)


def torchtitan_sac_outputs(model: ModelConfig) -> tuple[str, ...]:
    """What torchtitan's op policy keeps of one layer: the 1st, 3rd, ... bias-free projection and
    the attention kernel."""
    unbiased = [name for name, _width, bias in layer_projections(model) if not bias]
    return tuple(unbiased[0::2]) + ("attention",)


def op_checkpoint_bytes(model: ModelConfig, shape: ActivationShape, attention: str,
                        outputs: tuple[str, ...]) -> int:
    """Bytes a checkpointed layer keeps beyond its input: each saved projection's output in the
    compute dtype and, for "attention" with an SDPA kernel, its output and fp32 log-sum-exp (an
    eager attention runs no kernel the policy names: nothing)."""
    tokens, e = shape.tokens, shape.element_bytes
    saved = sum(tokens * width * e for name, width, _bias in layer_projections(model) if name in outputs)
    if "attention" in outputs and attention != "eager":
        heads = model.num_attention_heads
        saved += tokens * heads * model.attention_head_dim * e + FP32_BYTES * tokens * heads
    return saved


def _mlp_saved_bytes(model: ModelConfig, tokens: int, width: int, e: int, gemm_input: Fraction | None = None) -> int:
    """Gated: gate output, activation output, up output, their product. Plain: up output, activation
    output. The last is the down projection's input: FP8 recipes keep it quantised."""
    tensors = 4 if model.mlp is MLPKind.GATED else 2
    if gemm_input is None:
        return tokens * width * e * tensors
    return tokens * width * e * (tensors - 1) + ceil(tokens * width * gemm_input)


def mlp_saved_bytes(model: ModelConfig, shape: ActivationShape, moe_layer: bool) -> int:
    tokens, e, h = shape.tokens, shape.element_bytes, model.hidden_size
    stream = shape.stream
    saved = norm_saved_bytes(model, h, stream) if pre_norms(model) else 0
    if post_norms(model):  # Gemma-2/3's and OLMo 2's norm of the MLP output
        saved += norm_saved_bytes(model, h, stream)
    saved += residual_dropout_bytes(model, stream)
    if not moe_layer:
        consumers = 2 if model.mlp is MLPKind.GATED else 1
        return saved + _linear_inputs_bytes(shape.linear_input, h, consumers) + _mlp_saved_bytes(
            model, tokens, model.intermediate_size, e, shape.gemm_input_bytes)
    moe = model.moe
    if moe.clamped_swiglu:
        return saved + gpt_oss_experts_saved_bytes(model, shape)
    # Balanced routing: k/E of the tokens per expert. Under expert parallelism each rank's experts
    # receive as many token copies as its own tokens send out, so the count per rank is unchanged;
    # under sequence parallelism the routed tokens are gathered across TP first (Megatron-LM's
    # token dispatcher with expert TP = TP), so they count every token of the sequence.
    assignments = tokens * moe.experts_per_token
    saved += _linear_inputs_bytes(shape.linear_input, h, 1)  # router input (shared with the shared experts)
    # router: fp32 softmax output; top-k indices, weights and their sum; per-expert token and slot indices
    saved += stream.tokens * (FP32_BYTES * moe.num_experts + FP32_BYTES) + assignments * (INDEX_BYTES * 3 + FP32_BYTES)
    # per routed token: its gathered input, the expert's output and the weighted output; the expert MLP
    saved += assignments * (3 * h * e) + _mlp_saved_bytes(model, assignments, moe.expert_intermediate_size, e,
                                                          shape.gemm_input_bytes)
    if moe.num_shared_experts:
        width = moe.shared_expert_intermediate_size or moe.expert_intermediate_size
        saved += moe.num_shared_experts * _mlp_saved_bytes(model, tokens, width, e, shape.gemm_input_bytes)
    return saved


def gpt_oss_experts_saved_bytes(model: ModelConfig, shape: ActivationShape) -> int:
    """gpt-oss's experts block as transformers 5 trains it (GptOssMLP: GptOssTopKRouter, then
    GptOssExperts through ``grouped_mm_experts_forward``), for S = tokens x k assignments: the router's
    input and top-k index and its softmax over the top-k logits (the model's dtype); the three int64
    permutations and the sorted expert ids the biases are gathered by; the gathered input, the gate_up
    output (its strided gate and up views are what the clamps keep), the clamped gate, sigmoid(alpha x),
    their product, up + 1, and the product of those (the down input), each S x I; the down output the
    routing weights multiply, the weights, the int32 offsets. Measured with transformers'
    GptOssForCausalLM on fake tensors (4 layers of gpt-oss-20b, eager attention, pure bf16)."""
    moe, h, e = model.moe, model.hidden_size, shape.element_bytes
    assignments = shape.tokens * moe.experts_per_token
    mlp = 7 * assignments * moe.expert_intermediate_size * e
    return (_linear_inputs_bytes(shape.linear_input, h, 1) + assignments * (INDEX_BYTES + e)
            + _grouped_experts_saved_bytes(model, assignments, e, mlp, biased=True) + assignments * e)


def _grouped_experts_saved_bytes(model: ModelConfig, assignments: int, e: int, mlp: int, biased: bool = False) -> int:
    """transformers 5's ``grouped_mm_experts_forward`` over ``assignments`` rows, beside the expert
    MLP's own ``mlp`` bytes: the sort's permutation, ``perm // k`` and the inverse permutation (int64;
    with biased experts also the sorted expert ids their biases are gathered by), the gathered input
    and the down output the routing weights multiply, and the int32 expert offsets."""
    indices = 4 if biased else 3
    return (indices * INDEX_BYTES * assignments + 2 * assignments * model.hidden_size * e + mlp
            + FP32_BYTES * model.moe.num_experts)


def linear_weight_elements_per_layer(model: ModelConfig, moe_layer: bool) -> int:
    """Elements of the weights a layer's matmuls read (autocast keeps a 16-bit copy of each),
    from the tensor inventory; 0 when the model has no layer of that kind."""
    from memcalc.estimate.inventory import MLPRole, build_inventory

    role = MLPRole.MOE if moe_layer else MLPRole.DENSE
    layer = next((layer for layer in build_inventory(model).layers if layer.mlp is role), None)
    return 0 if layer is None else layer.matmul_elements()


def autocast_weight_cache_bytes(model: ModelConfig, element_bytes: int, moe_layers) -> int:
    """The 16-bit copies of the matmul weights of the layers ``moe_layers`` describes (one bool a
    layer: MoE or not) that autocast keeps in its cast cache until the autocast region ends (the
    whole forward: ``at::autocast`` caches casts of leaf tensors that need gradients). A checkpointed
    layer saves none of them, but the forward still holds them at its end (measured with
    transformers' classes on fake tensors: Qwen3-8B, OLMo 2, Llama 4 text, 4 layers, amp-bf16)."""
    return element_bytes * sum(linear_weight_elements_per_layer(model, moe) for moe in moe_layers)


# --- Mamba-2 layers (mamba_ssm's fused kernel) ----------------------------------------------------
#
# On CUDA transformers' Mamba-2 mixers (Mamba2Mixer, GraniteMoeHybridMambaLayer, NemotronHMamba2Mixer)
# in training run mamba_ssm's ``mamba_split_conv1d_scan_combined`` (mamba_ssm 2.3, ops/triton/
# ssd_combined.py ``MambaSplitConv1dScanCombinedFn``, with causal_conv1d 1.7's cpp_functions.py):
# every tensor it keeps or uses is allocated with torch in Python, its Triton and CUDA kernels write
# into them. Measured on fake tensors with that code and transformers' classes around it
# (memcalc.validate.mamba, tests/test_mamba_training.py, benchmarks/mamba_accuracy.py).

# SMs the split reductions of the backward are sized for (``torch.cuda.get_device_properties``
# ``multi_processor_count`` in ssd_chunk_state.py / ssd_chunk_scan.py / layernorm_gated.py): H100/H200
MAMBA_SM_COUNT = 132
MAMBA_DEFAULT_CHUNK = 256  # Mamba2Config, GraniteMoeHybridConfig, FalconH1Config
NEMOTRON_H_CHUNK = 128  # NemotronHConfig


def mamba2_chunk_size(model: ModelConfig) -> int:
    """The SSD chunk length: the config's, else its family's default (``MambaConfig.chunk_size``)."""
    if model.mamba.chunk_size is not None:
        return model.mamba.chunk_size
    return NEMOTRON_H_CHUNK if model.separate_blocks else MAMBA_DEFAULT_CHUNK


def mamba2_residual_in_fp32(model: ModelConfig) -> bool:
    """transformers' Mamba2Block (``residual_in_fp32``, default True) keeps the residual stream in
    fp32 between blocks; the hybrids' blocks add in the stream's dtype."""
    from memcalc.config import LayerType

    if model.mamba.residual_in_fp32 is not None:
        return model.mamba.residual_in_fp32
    return (not model.separate_blocks and model.mlp is MLPKind.NONE
            and all(kind is LayerType.MAMBA for kind in model.resolved_layer_types))


@dataclass(eq=False, repr=False)  # read-only by convention, as the training stage records (start-up)
class Mamba2Sizes:
    tokens: int  # T = b x s
    padded: int  # b x chunks x chunk: the tokens of the per-chunk fp32 tensors
    batch: int
    chunks: int
    chunk: int
    heads: int  # H
    head_dim: int  # P
    state: int  # N
    groups: int  # G
    inner: int  # D = H x P
    conv: int  # D + 2GN: x, B, C
    projection: int  # in_proj's width, 2D + 2GN + H: z, xBC, dt


def mamba2_sizes(model: ModelConfig, shape: ActivationShape) -> Mamba2Sizes:
    m = model.mamba
    chunk = mamba2_chunk_size(model)
    chunks = -(-shape.seq_len // chunk)
    inner = m.intermediate_size
    conv = inner + 2 * m.n_groups * m.state_size
    return Mamba2Sizes(shape.tokens, shape.batch_size * chunks * chunk, shape.batch_size, chunks, chunk, m.num_heads,
                       inner // m.num_heads, m.state_size, m.n_groups, inner, conv, inner + conv + m.num_heads)


def mamba2_saved_bytes(model: ModelConfig, shape: ActivationShape) -> int:
    """Bytes a Mamba-2 block (its input norm and mixer; not an MLP beside it) keeps for backward,
    without autocast's weight copies (``mamba2_weight_copy_elements``):

    * the input RMSNorm as Llama's (``norm_saved_bytes``): the block casts its input to the norm's
      dtype first (``hidden_states.to(dtype=self.norm.weight.dtype)``), so in 16-bit training the
      norm reads a 16-bit copy even of an fp32 residual (Mamba2Block);
    * ``in_proj``'s input (``F.linear`` saves it; autocast its 16-bit cast);
    * ``zxbcdt``, in_proj's whole output (z, xBC, dt), and the SSD output before the gated norm
      (``out_x``, T x D), both in the compute dtype: ``ctx.save_for_backward`` in
      ``MambaSplitConv1dScanCombinedFn.forward`` (the conv output, the chunk states, CB and the
      normed, gated output are freed when forward returns; backward recomputes them);
    * the gated norm's fp32 ``rstd``, one per token and group (layernorm_gated.py ``_layer_norm_fwd``);
    * ``A = -torch.exp(self.A_log.float())``: exp's fp32 output (its backward's) and A (the Function's).
    """
    s = mamba2_sizes(model, shape)
    e = shape.element_bytes
    norm_shape = replace(shape, stream_bytes=shape.stream_bytes if shape.autocast else e, stream_tokens=None)
    saved = norm_saved_bytes(model, model.hidden_size, norm_shape)
    saved += _linear_inputs_bytes(replace(shape, stream_tokens=None), model.hidden_size, 1)
    saved += s.tokens * (s.projection + s.inner) * e
    saved += FP32_BYTES * s.tokens * s.groups
    return saved + 2 * FP32_BYTES * s.heads


def mamba2_weight_copy_elements(model: ModelConfig, checkpointed: bool = False) -> int:
    """Elements of the 16-bit weight copies an autocast Mamba-2 mixer keeps: ``in_proj``'s (autocast's
    cast cache, to the end of the forward) and ``out_proj``'s (``outproj_weight.to(dtype)`` in
    ``MambaSplitConv1dScanCombinedFn.forward``, saved for backward; a checkpointed layer saves none)."""
    m, h = model.mamba, model.hidden_size
    in_proj = h * (2 * m.intermediate_size + 2 * m.n_groups * m.state_size + m.num_heads)
    return in_proj if checkpointed else in_proj + m.intermediate_size * h


def mamba2_backward_transient(model: ModelConfig, shape: ActivationShape, sm_count: int = MAMBA_SM_COUNT) -> int:
    """The most a Mamba-2 block's backward holds beyond its saved tensors and the gradient of its
    output (16-bit compute, as ``MambaSplitConv1dScanCombinedFn.backward`` allocates):

    * the gradient of the mixer's output in the compute dtype when the stream is wider (the residual
      add's backward casts it); and the stream gradient's own extra bytes (fp32 where the residual is)
    * recomputed: ``out_recompute`` (T x D) and the conv output ``xBC_conv`` (T x (D + 2GN),
      ``causal_conv1d_fwd_function``'s ``torch.empty_like``); gradients: ``dzxbcdt`` (T x in_proj
      width), ``dxBC`` (T x (D + 2GN)), ``dout`` after out_proj's transpose (T x D, kept by the
      ``dy_rms`` view) and the gated norm's ``dx`` (T x D, layernorm_gated.py ``_layer_norm_bwd``);
    * in ``_mamba_chunk_scan_combined_bwd``: ``dt.clone()`` (T x H), the recomputed fp32 ``dA_cumsum``
      and ``dt`` (b x H x chunks x chunk each), ``CB`` (fp32, b x chunks x G x chunk^2) and the
      discarded final states (``states, _ = _state_passing_fwd(...)``: fp32, b x H x P x N), then the
      larger of two moments:
      - ``_state_passing_bwd``: the fp32 passed states and ``dstates`` (b x chunks x H x P x N each),
        their 16-bit conversions, and its fp32 per-block ``ddA_chunk_cumsum``;
      - ``_chunk_scan_bwd_dcb``: the 16-bit states and dstates, ``dD`` (H), ``ddt``, ``ddA_next``, ``ddA_prev`` (fp32,
        b x H x chunks x chunk each), the summed fp32 ``dB`` and ``dC`` (T x G x N each) and ``dcb``
        (fp32, b x chunks x splits x G x chunk^2) with its sum over the splits, where
        ``splits = ceil((H/G) / max(min(ceil(b x chunks x H / SMs), H/G), 1))``.
    """
    s = mamba2_sizes(model, shape)
    e, h, T = shape.element_bytes, model.hidden_size, s.tokens
    stream_bytes = FP32_BYTES if (shape.autocast or mamba2_residual_in_fp32(model)) else e
    transient = (stream_bytes - e) * T * h  # the stream's gradient beyond the e bytes the caller counts
    if stream_bytes != e:
        transient += T * h * e  # the mixer output's gradient, cast
    transient += T * e * (3 * s.inner + 2 * s.conv + s.projection)
    transient += s.inner * e  # the gated norm's weight gradient (dw.to(weight.dtype))
    per_chunk = FP32_BYTES * s.batch * s.heads * s.chunks * s.chunk  # b x H x chunks x chunk, fp32
    states = s.batch * s.chunks * s.heads * s.head_dim * s.state  # elements of the chunk states
    cb = FP32_BYTES * s.batch * s.chunks * s.groups * s.chunk * s.chunk
    transient += T * s.heads * e + 2 * per_chunk + cb + FP32_BYTES * s.batch * s.heads * s.head_dim * s.state
    blocks = -(-(s.head_dim * s.state) // 64)  # _state_passing_bwd's BLOCK_SIZE_min
    passing = (2 * FP32_BYTES + 2 * e) * states + FP32_BYTES * s.batch * s.heads * s.chunks * blocks
    ratio = s.heads // s.groups
    per_program = max(min(-(-(s.batch * s.chunks * s.heads) // sm_count), ratio), 1)
    splits = -(-ratio // per_program)
    dcb = 2 * e * states + FP32_BYTES * s.batch * s.heads * s.chunks + s.heads * e + 3 * per_chunk \
        + 2 * FP32_BYTES * T * s.groups * s.state + cb * (splits + 1)
    return transient + max(passing, dcb)


def mamba2_forward_transient(model: ModelConfig, shape: ActivationShape) -> int:
    """What a Mamba-2 block run without saving (a checkpointed layer's first forward) holds at
    once beyond its input: the normed input and ``zxbcdt`` (in_proj's output), and inside
    ``MambaSplitConv1dScanCombinedFn.forward`` the conv output, the fp32 ``dA_cumsum`` and ``dt``, the
    passed chunk states (16-bit) and fp32 final states it keeps as locals, then the larger of
    ``_chunk_scan_fwd`` (with ``CB``, fp32, and its T x D output) and the out projection (the SSD
    output, the gated norm's output and fp32 rstd, and out_proj's T x h output)."""
    s = mamba2_sizes(model, shape)
    e, T, h = shape.element_bytes, s.tokens, model.hidden_size
    per_chunk = FP32_BYTES * s.batch * s.heads * s.chunks * s.chunk
    states = s.batch * s.chunks * s.heads * s.head_dim * s.state
    cb = FP32_BYTES * s.batch * s.chunks * s.groups * s.chunk * s.chunk
    held = T * h * e + T * s.projection * e + T * s.conv * e + 2 * per_chunk + e * states \
        + FP32_BYTES * s.batch * s.heads * s.head_dim * s.state
    return held + max(cb + T * s.inner * e, 2 * T * s.inner * e + FP32_BYTES * T * s.groups + T * h * e)


# --- Hybrid stacks of Mamba-2 and attention/MLP layers (Nemotron-H, Granite-4.0-H) ---------------
#
# transformers' NemotronHMamba2Mixer (modeling_nemotron_h.py) and GraniteMoeHybridMambaLayer
# (modeling_granitemoehybrid.py) run in training without a cache exactly what Mamba2Mixer runs:
# ``in_proj`` in the module, then ``mamba2_split_conv1d_scan_combined`` (mamba_ssm's
# MambaSplitConv1dScanCombinedFn, norm_before_gate=False, the gated norm's groups of D / n_groups),
# so the block formulas above carry over; what differs is the norm around them and the blocks
# beside them. Measured with memcalc.validate.mamba (benchmarks/mamba_accuracy.py).


def hf_grouped_moe_saved_bytes(model: ModelConfig, shape: ActivationShape) -> int:
    """What the experts block of a hybrid Mamba-2 stack keeps for backward, as transformers 5 runs it:
    its router and its experts through ``grouped_mm`` (integrations/moe.py
    ``grouped_mm_experts_forward``, the default experts implementation on CUDA), for S = tokens x k
    assignments, whatever the routing (every buffer is S rows, sorted by expert):

    * the experts: the sort's permutation (the weights' gather index), ``perm // k`` (the input
      gather's) and the inverse permutation (the output gather's), int64 each; the gathered input
      (the up ``grouped_mm``'s), the expert MLP's tensors over S rows (as ``_mlp_saved_bytes``), the
      down output (the routing weights' product keeps it) and the routing weights in their dtype; the
      int32 expert offsets;
    * Nemotron-H's router (NemotronHTopkRouter, ``separate_blocks``): the fp32 copy of its input (its
      weight is fp32), the sigmoid's output, the top-k index (the gather's) and, with
      ``norm_topk_prob``, the denominator and the normalised weights, fp32; the group-limited
      selection saves nothing that outlives it. The routing weights stay fp32. Its shared expert
      (NemotronHMLP) beside them: its input and its relu2 MLP's tensors.
    * Granite-4.0-H's (GraniteMoeHybridTopKRouter): the top-k index and the fp32 softmax of the top-k
      logits; its input is the shared MLP's; the weights cast to the model's dtype. Its shared MLP
      (GraniteMoeHybridMLP) beside them: its input and its gated MLP's tensors.

    Measured on fake tensors with transformers' NemotronHForCausalLM and GraniteMoeHybridForCausalLM
    (memcalc.validate.mamba, tests/test_mamba_training.py), to the byte."""
    moe, h, e = model.moe, model.hidden_size, shape.element_bytes
    tokens = shape.tokens
    assignments = tokens * moe.experts_per_token
    saved = _grouped_experts_saved_bytes(model, assignments, e,
                                         _mlp_saved_bytes(model, assignments, moe.expert_intermediate_size, e))
    if model.separate_blocks:
        saved += tokens * h * FP32_BYTES + tokens * moe.num_experts * FP32_BYTES + INDEX_BYTES * assignments
        if moe.norm_topk_prob is not False:
            saved += FP32_BYTES * (tokens + assignments)
        saved += FP32_BYTES * assignments  # the routing weights, fp32
    else:
        saved += (INDEX_BYTES + FP32_BYTES) * assignments + e * assignments
    width = moe.shared_expert_intermediate_size or moe.expert_intermediate_size
    return saved + moe.num_shared_experts * (tokens * h * e + _mlp_saved_bytes(model, tokens, width, e))


def mamba2_hybrid_norm_extra(model: ModelConfig, shape: ActivationShape) -> int:
    """What one of Nemotron-H's RMSNorms saves beyond ``norm_saved_bytes`` (Llama's): NemotronHRMSNorm
    (modeling_nemotron_h.py) computes ``(self.weight.to(torch.float32) * hidden_states).to(input_dtype)``,
    so the product keeps the normalised tensor in fp32 (not the stream's 16-bit cast) and, where the
    weight is 16-bit (no autocast), its fp32 copy. Granite-4.0-H's GraniteMoeHybridRMSNorm casts first
    (``self.weight * hidden_states.to(input_dtype)``): nothing beyond. ``shape`` is the norm's input."""
    if not model.separate_blocks:
        return 0
    h = model.hidden_size
    return shape.tokens * h * (FP32_BYTES - shape.stream_bytes) + (0 if shape.autocast else FP32_BYTES * h)


def mamba2_hybrid_attention_transient(model: ModelConfig, shape: ActivationShape, grad_bytes: int) -> int:
    """The most an attention block without an MLP (Nemotron-H's ``*``) holds in its backward beyond
    its saved tensors and its output's gradient: ``o_proj``'s weight gradient before autograd
    accumulates it, beside the gradient of the attention output (``o_proj``'s input)."""
    q_width = attention_output_width(model)
    return grad_bytes * model.hidden_size * q_width + shape.tokens * q_width * shape.element_bytes


# Qwen3-Next (modeling_qwen3_next.py) as transformers 5 trains it on CUDA: gated delta net layers
# through flash-linear-attention's chunked Function (fla/ops/gated_delta_rule/chunk.py), gated full
# attention, and experts with a gated shared expert through grouped_mm. fla allocates every tensor it
# keeps or uses with torch in Python; its Triton kernels write into them. Measured on fake tensors
# with that code and transformers' classes around it (memcalc.validate.gated_delta,
# tests/test_gated_delta_training.py, benchmarks/mamba_accuracy.py).

# fla's chunk of the gated delta rule (``chunk_size`` of chunk_gated_delta_rule, default 64): the
# width of the per-chunk matrix A it keeps and the stride of the recurrent states h it materialises
GATED_DELTA_CHUNK = 64


@dataclass(eq=False, repr=False)  # read-only by convention, as the training stage records (start-up)
class GatedDeltaSizes:
    tokens: int  # T = b x s
    key: int  # Kd = key heads x key head dim: q's and k's width
    value: int  # Vd = value heads x value head dim: v's, z's and the output's width
    key_heads: int  # H
    value_heads: int  # HV
    expanded_key: int  # HV x key head dim: w, dw and fla's per-value-head dq/dk (GVA)
    conv: int  # C = 2 Kd + Vd: the causal conv's channels (q, k, v)
    projection: int  # in_proj_qkvz's width, 2 Kd + 2 Vd
    states: int  # elements of the chunk-boundary states h (and dh): b x ceil(s / 64) x HV x K x V


def gated_delta_sizes(model: ModelConfig, shape: ActivationShape) -> GatedDeltaSizes:
    la = model.linear_attention
    chunks = shape.batch_size * -(-shape.seq_len // GATED_DELTA_CHUNK)
    return GatedDeltaSizes(shape.tokens, la.key_width, la.value_width, la.num_key_heads, la.num_value_heads,
                           la.num_value_heads * la.key_head_dim, la.conv_channels,
                           2 * la.key_width + 2 * la.value_width, chunks * la.recurrent_state_values)


def _gated_rms_norm_saved_bytes(tokens: int, width: int, rows: int, e: int) -> int:
    """Qwen3NextRMSNormGated over ``rows`` = tokens x value heads rows: the fp32 copy of its input and
    the fp32 reciprocal root per row, the normalised tensor cast back and its product with the weight
    (16-bit), the fp32 copy of the gate, silu's fp32 output."""
    return tokens * width * (3 * FP32_BYTES + 2 * e) + FP32_BYTES * rows


def gated_delta_net_saved_bytes(model: ModelConfig, shape: ActivationShape) -> int:
    """Bytes a Qwen3-Next gated delta net layer's token mixer keeps for backward, with its input norm
    (16-bit activations; Qwen3NextGatedDeltaNet.forward, fla's ChunkGatedDeltaRuleFunction; Qwen3.5's
    Qwen3_5GatedDeltaNet keeps the same, in_proj_qkv's output being the conv's input):

    * the input norm (``norm_saved_bytes``, Qwen3-Next's ``1 + weight`` in fp32) and its 16-bit
      output, which ``in_proj_qkvz`` and ``in_proj_ba`` keep (once);
    * the causal conv's input (``torch.cat`` of q, k and v, C wide; causal_conv1d's Function and
      ``F.conv1d`` both keep it; silu is fused or keeps what the conv keeps: measured the same);
    * beta (``b.sigmoid()``'s output), and for ``g = -exp(A_log) * softplus(a + dt_bias)`` the fp32
      softplus input and output, and two fp32 vectors of HV (``exp``'s output and its negation);
    * fla's saved set: q and k after its L2 norm (``use_qk_l2norm_in_kernel``) with one fp32 rstd
      per head and token, the contiguous copy ``input_guard`` makes of v (a view of the conv output),
      the fp32 chunk-local cumsum of g, and A, the 16-bit T x HV x 64 WY matrix;
    * the gated RMSNorm (``_gated_rms_norm_saved_bytes``) and ``out_proj``'s 16-bit input.
    """
    sizes = gated_delta_sizes(model, shape)
    tokens, e, heads = sizes.tokens, shape.element_bytes, sizes.value_heads
    norm = norm_saved_bytes(model, model.hidden_size, shape.stream) + tokens * model.hidden_size * e
    conv = tokens * sizes.conv * e
    gates = tokens * heads * (e + 2 * FP32_BYTES) + 2 * FP32_BYTES * heads
    fla = (tokens * (2 * sizes.key * e + 2 * sizes.key_heads * FP32_BYTES + sizes.value * e
                     + heads * FP32_BYTES + heads * GATED_DELTA_CHUNK * e))
    gated_norm = _gated_rms_norm_saved_bytes(tokens, sizes.value, tokens * heads, e)
    return norm + conv + gates + fla + gated_norm + tokens * sizes.value * e


def _fla_forward_live(sizes: GatedDeltaSizes, e: int) -> int:
    """What fla's chunked forward holds besides the tensors it saves: the contiguous copies of q and k
    (``input_guard``; v's is saved), w, u, the states h, v_new and the output o, at its peak (in
    ``chunk_fwd_o``, once o is allocated)."""
    tokens = sizes.tokens
    return tokens * e * (2 * sizes.key + sizes.expanded_key + 3 * sizes.value) + sizes.states * e


def gated_delta_net_forward_transient(model: ModelConfig, shape: ActivationShape, saving: bool = True) -> int:
    """The most a gated delta net layer's mixer holds in its forward beyond its input norm's part
    (``gated_delta_net_saved_bytes`` counts that), the tensors it has saved by then included; the
    larger of two moments (Qwen3NextGatedDeltaNet.forward; fla's chunk_gated_delta_rule_fwd):

    * in fla's ``chunk_fwd_o``: in_proj_qkvz's and in_proj_ba's outputs (``projected_states_*`` stay
      referenced to the end), the contiguous copies of z, b and a (Qwen3.5: in_proj_z's, _b's and _a's
      outputs; in_proj_qkv's is the conv's saved input), the conv's output (q, k and v stay views of it),
      g (fp32), and what the Function holds (``_fla_forward_live``) beside what it saved;
    * in the gated RMSNorm's last cast: fla's workspaces freed, o and its ``torch.cat`` copy, the norm's
      saved tensors, its fp32 variance, the fp32 product and its 16-bit cast (``out_proj``'s input).

    Without ``saving`` (a checkpointed layer's first forward, which keeps nothing for backward) the peak
    is in fla's ``chunk_fwd_o``, less what only autograd would have kept: the conv's input, softplus's
    input and output and the two HV vectors; fla's own saved set is still its forward's locals then
    (measured).
    """
    sizes = gated_delta_sizes(model, shape)
    tokens, e, heads = sizes.tokens, shape.element_bytes, sizes.value_heads
    saved = gated_delta_net_saved_bytes(model, shape) - norm_saved_bytes(model, model.hidden_size, shape.stream) \
        - tokens * model.hidden_size * e
    gated_norm = _gated_rms_norm_saved_bytes(tokens, sizes.value, tokens * heads, e)
    before_norm = saved - gated_norm - tokens * sizes.value * e  # the mixer's saved set before its gated norm
    if model.linear_attention.split_projections:  # Qwen3.5: z, b and a as in_proj_z/_b/_a made them
        held = tokens * e * (sizes.value + 2 * heads + sizes.conv) + FP32_BYTES * tokens * heads
    else:
        held = tokens * e * (sizes.projection + 2 * heads + sizes.value + 2 * heads + sizes.conv) \
            + FP32_BYTES * tokens * heads
    in_fla = held + before_norm + _fla_forward_live(sizes, e)
    if not saving:
        return in_fla - tokens * sizes.conv * e - 2 * FP32_BYTES * heads * (tokens + 1)
    # after fla: o (kept by ``all_outputs``) and its cat copy; the norm's saved set, its fp32 variance,
    # the fp32 product of the gate and its cast
    in_norm = (held + before_norm + 2 * tokens * sizes.value * e + gated_norm + FP32_BYTES * tokens * heads
               + tokens * sizes.value * (FP32_BYTES + e))
    return max(in_fla, in_norm)


def gated_delta_net_backward_transient(model: ModelConfig, shape: ActivationShape) -> int:
    """The most a gated delta net layer's mixer holds in its backward beyond its saved tensors and
    the gradient of the layer's output, its weight gradients aside (the phases count those); the larger of:

    * the gated RMSNorm's backward: ``out_proj``'s input gradient and the norm's gradients, three
      more 16-bit ones and an fp32 one (measured);
    * fla's ``chunk_gated_delta_rule_bwd``, where ``prepare_wy_repr_bwd`` sums its dk over the value
      heads: the norm's saved tensors freed, the gradients of o and z (16-bit), and fla's workspaces:
      w and u recomputed, the states h and their gradients dh, v_new, dv, dw, dq and dk (summed to the
      key heads under GVA), fp32 dg twice, db, and prepare_wy_repr_bwd's dk (per value head and, under
      GVA, its sum), dv.
    """
    sizes = gated_delta_sizes(model, shape)
    tokens, e, heads = sizes.tokens, shape.element_bytes, sizes.value_heads
    in_norm = tokens * sizes.value * (4 * e + FP32_BYTES)
    freed = _gated_rms_norm_saved_bytes(tokens, sizes.value, tokens * heads, e) + tokens * sizes.value * e
    gva = sizes.value_heads != sizes.key_heads
    workspaces = (tokens * e * (4 * sizes.value + 2 * sizes.expanded_key + 3 * sizes.key
                                + (sizes.expanded_key if gva else 0) + heads)
                  + 2 * sizes.states * e + 2 * FP32_BYTES * tokens * heads)
    in_fla = 2 * tokens * sizes.value * e + workspaces - freed
    return max(in_norm, in_fla)


def gated_attention_extra_bytes(model: ModelConfig, shape: ActivationShape) -> int:
    """What Qwen3-Next's gated full attention keeps beyond ``attention_saved_bytes``
    (Qwen3NextAttention.forward: ``attn_output * torch.sigmoid(gate)``): sigmoid's output and the
    product (``o_proj``'s input), and the attention output's contiguous copy the product keeps:
    its partial rotary embedding concatenates q back (``torch.cat([q_embed, q_pass])``), so the
    kernel's output follows that head-major layout and ``transpose(1, 2).contiguous()`` copies it."""
    return 3 * shape.tokens * attention_output_width(model) * shape.element_bytes


def qwen3_next_moe_saved_bytes(model: ModelConfig, shape: ActivationShape) -> int:
    """Qwen3-Next's experts block (Qwen3NextSparseMoeBlock) as transformers 5 trains it, for
    S = tokens x k assignments: its input (the router's, the shared expert's and its gate's); the
    router (Qwen3NextTopKRouter): the fp32 softmax over every expert, the top-k index and, with
    ``norm_topk_prob``, the sum and the normalised top-k weights (fp32); the experts through grouped_mm
    (``_grouped_experts_saved_bytes``) and the routing weights' 16-bit cast as the sort gathers it; the
    shared expert's gated MLP, sigmoid of its gate (one value a token) and the shared output the gate
    multiplies."""
    moe, h, e = model.moe, model.hidden_size, shape.element_bytes
    tokens = shape.tokens
    assignments = tokens * moe.experts_per_token
    saved = _grouped_experts_saved_bytes(model, assignments, e,
                                         _mlp_saved_bytes(model, assignments, moe.expert_intermediate_size, e))
    saved += tokens * moe.num_experts * FP32_BYTES + assignments * (INDEX_BYTES + e)
    if moe.norm_topk_prob is not False:
        saved += FP32_BYTES * (tokens + assignments)
    width = moe.shared_expert_intermediate_size or moe.expert_intermediate_size
    shared = _mlp_saved_bytes(model, tokens, width, e) + (tokens * e + tokens * h * e if moe.shared_expert_gate else 0)
    return saved + tokens * h * e + moe.num_shared_experts * shared


def qwen3_next_moe_backward_transient(model: ModelConfig, shape: ActivationShape) -> int:
    """The most Qwen3-Next's experts block holds in its backward beyond its saved tensors and the
    gradient of its output, the weight gradients aside; S = tokens x k. The shared expert's branch
    runs first (its gate was applied last): the gradient of the shared output (the sigmoid's product
    frees the shared output and the sigmoid) and the gate's input gradient stay beside what follows.
    Then the larger of (measured with transformers' class on fake tensors, to the byte):

    * the experts' output gather (``weighted_out[inv_perm]``, ``.view(...).sum(1)``): the gradient
      of the view (a copy of the expanded sum gradient), the zeros the index backward fills and its
      ``index_put`` result, three S x h tensors;
    * the gated activation's backward (``act_fn(gate) * up`` inside ``grouped_mm_experts_forward``): the
      down input's gradient and those of the gate and up halves, three S x I tensors, once the routing
      weights' product has freed the down output and the inverse permutation."""
    moe, h, e = model.moe, model.hidden_size, shape.element_bytes
    tokens = shape.tokens
    assignments = tokens * moe.experts_per_token
    shared = (tokens * h * e - tokens * e) if moe.shared_expert_gate else 0
    gather = 3 * assignments * h * e
    activation = 3 * assignments * moe.expert_intermediate_size * e - assignments * (h * e + INDEX_BYTES)
    return shared + max(gather, activation)


def qwen3_next_moe_forward_transient(model: ModelConfig, shape: ActivationShape, saving: bool = True) -> int:
    """The most Qwen3-Next's experts block holds in its forward beyond its input norm's output, at the
    experts' output reorder (``weighted_out[inv_perm]`` in ``grouped_mm_experts_forward``; the shared
    expert ran first, its gate runs after). Saving: the block's saved tensors but the gate's sigmoid,
    the weighted output and its reorder (two S x h tensors), and the locals nothing saves. Without saving (a checkpointed layer's
    first forward): the shared expert's output, the gathered input, the down output, the weighted
    output and its reorder (four S x h), the router's logits, fp32 probabilities and top-k index and
    weights, the sort's ids and permutation, the histogram input, the inverse permutation (measured)."""
    moe, h, e = model.moe, model.hidden_size, shape.element_bytes
    tokens = shape.tokens
    assignments = tokens * moe.experts_per_token
    if saving:  # and the locals nothing saves: the router's logits, the 16-bit routing weights, the
        # sorted expert ids, the histogram's input and output
        locals_ = tokens * moe.num_experts * e + assignments * (e + INDEX_BYTES + FP32_BYTES) + FP32_BYTES * moe.num_experts
        return (qwen3_next_moe_saved_bytes(model, shape) - tokens * h * e - tokens * e + 2 * assignments * h * e
                + locals_)
    router = tokens * moe.num_experts * (e + 2 * FP32_BYTES) + assignments * (INDEX_BYTES + 2 * e)
    return (tokens * h * e + 4 * assignments * h * e + router
            + assignments * (3 * INDEX_BYTES + FP32_BYTES))


def qwen3_next_experts_backward_late(model: ModelConfig, shape: ActivationShape) -> int:
    """Qwen3-Next's experts block in its backward once the up ``grouped_mm`` has made the gradient of
    the gathered input (and every expert's weight gradients, which the caller adds): beyond the
    block's saved tensors and its output's gradient, the shared branch's gradients (as in
    ``qwen3_next_moe_backward_transient``) and the gathered input's gradient (S x h), less what is freed
    by then: the down output (S x h), the inverse permutation and the expert MLP's tensors (4 S x I)
    but the gradient of the up projection's output (2 S x I) (measured, the weights trained)."""
    moe, h, e = model.moe, model.hidden_size, shape.element_bytes
    tokens = shape.tokens
    assignments = tokens * moe.experts_per_token
    shared = (tokens * h * e - tokens * e) if moe.shared_expert_gate else 0
    return shared - assignments * (INDEX_BYTES + 2 * moe.expert_intermediate_size * e)
