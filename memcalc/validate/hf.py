"""``--impl hf``: the Hugging Face model class built from the config (transformers installed; no
weights are downloaded, the parameters are random or fake)."""

from __future__ import annotations

from typing import Any

from memcalc.config import MLPKind, ModelConfig, PositionKind
from memcalc.errors import InputError


def transformers_config(model: ModelConfig) -> Any:
    """The transformers configuration whose model class has ``model``'s architecture."""
    try:
        import transformers
    except ImportError:
        raise InputError("--impl hf needs transformers: pip install transformers") from None
    common = dict(vocab_size=model.vocab_size, tie_word_embeddings=model.tie_word_embeddings)
    if model.position_embedding is PositionKind.LEARNED:
        # gelu_pytorch_tanh: the fused kernel for GPT-2's gelu_new (the Python formula keeps extra fp32 tensors)
        return transformers.GPT2Config(
            n_embd=model.hidden_size, n_layer=model.num_layers, n_head=model.num_attention_heads,
            n_inner=model.intermediate_size, n_positions=model.max_position_embeddings, activation_function="gelu_pytorch_tanh",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    llama_like = dict(
        hidden_size=model.hidden_size, num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.kv_heads, intermediate_size=model.intermediate_size,
        max_position_embeddings=model.max_position_embeddings, head_dim=model.attention_head_dim, **common,
    )
    if model.mlp is not MLPKind.GATED:
        raise InputError(f"--impl hf: no transformers class known for {model.name}'s plain MLP with rotary positions")
    if model.moe is not None:
        moe = model.moe
        if moe.num_shared_experts or moe.first_dense_layers:
            raise InputError("--impl hf: MoE with shared experts or dense layers is measured with --impl reference")
        return transformers.MixtralConfig(num_local_experts=moe.num_experts, num_experts_per_tok=moe.experts_per_token,
                                          **{**llama_like, "intermediate_size": moe.expert_intermediate_size})
    if model.qkv_bias:
        return transformers.Qwen2Config(**llama_like)
    if model.hidden_act == "gelu_tanh":
        return transformers.GemmaConfig(hidden_activation="gelu_pytorch_tanh", **llama_like)
    return transformers.LlamaConfig(attention_bias=model.attn_output_bias, mlp_bias=model.mlp_bias, **llama_like)


def build_hf_model(model: ModelConfig, attention: str):
    import transformers

    config = transformers_config(model)
    config._attn_implementation = "eager" if attention == "eager" else "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config)
