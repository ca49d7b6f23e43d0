"""``--impl hf``: the Hugging Face model class built from the config (transformers installed; no
weights are downloaded, the parameters are random or fake)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memcalc.config import MLPKind, ModelConfig, PositionKind
from memcalc.errors import InputError

# Per-layer lists of a config.json, cut with num_hidden_layers (transformers checks that
# layer_types has one entry a layer; the others index or list layers).
PER_LAYER_LISTS = ("layer_types", "no_rope_layers", "layers_block_type")
# a character a layer (Nemotron-H: M Mamba-2, * attention, - MLP, E MoE)
PER_LAYER_STRINGS = ("hybrid_override_pattern",)
LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers")
# Keys that make transformers build something other than the plain model class: quantised
# checkpoints (gpt-oss's mxfp4 wants its kernels), and bookkeeping of the file.
DROPPED_KEYS = ("quantization_config", "architectures", "transformers_version", "_name_or_path", "auto_map",
                "torch_dtype", "dtype")  # the run chooses the weights' dtype


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
            resid_pdrop=model.residual_dropout or 0.0, embd_pdrop=model.embedding_dropout or 0.0,
            attn_pdrop=model.attention_dropout, **common,
        )
    llama_like = dict(
        hidden_size=model.hidden_size, num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.kv_heads, intermediate_size=model.intermediate_size,
        max_position_embeddings=model.max_position_embeddings, head_dim=model.attention_head_dim,
        attention_dropout=model.attention_dropout, **common,
    )
    if model.mlp is not MLPKind.GATED:
        raise InputError(f"--impl hf: no transformers class known for {model.name}'s plain MLP with rotary positions")
    if model.moe is not None:
        moe = model.moe
        if moe.num_shared_experts or moe.first_dense_layers:
            raise InputError("--impl hf: MoE with shared experts or dense layers is measured with --impl reference")
        return transformers.MixtralConfig(num_local_experts=moe.num_experts, num_experts_per_tok=moe.experts_per_token,
                                          **{**llama_like, "intermediate_size": moe.expert_intermediate_size})
    if model.sliding_window is not None and not model.sliding_window_pattern and not model.layer_types:
        # every layer slides (Mistral v0.1): MistralConfig's class applies the window, Llama's would not
        return transformers.MistralConfig(sliding_window=model.sliding_window, **llama_like)
    if model.qkv_bias:
        return transformers.Qwen2Config(**llama_like)
    if model.hidden_act == "gelu_tanh":
        return transformers.GemmaConfig(hidden_activation="gelu_pytorch_tanh", **llama_like)
    return transformers.LlamaConfig(attention_bias=model.attn_output_bias, mlp_bias=model.mlp_bias, **llama_like)


def experts_routed_by_value(weight_dtype) -> str:
    """Why transformers' experts would route tokens by their values with weights of ``weight_dtype``
    ("" where they do not):
    from transformers 5 an MoE class's experts run ``grouped_mm`` by default (``integrations/moe.py``
    ``grouped_mm_experts_forward``: tokens sorted by expert, one grouped GEMM over offsets, no
    data-dependent shapes, so fake tensors run it as CUDA does); before, or where ``grouped_mm`` cannot
    take the weights (bf16 only: fp32 weights under autocast fall back), the eager loop over
    ``torch.where`` of each expert's tokens."""
    import transformers

    from memcalc.dtypes import DType

    if int(transformers.__version__.split(".")[0]) < 5:
        return f"transformers {transformers.__version__} routes MoE tokens by their values (its eager experts loop)"
    if weight_dtype is not DType.BF16:
        return (f"transformers' grouped_mm experts take bf16 weights only, so with {weight_dtype.value} weights they "
                "loop over each expert's tokens, routed by their values")
    return ""


def _source_path(source: str) -> Path | None:
    """The local config.json a model was read from: a path, or a Hub id's cached file."""
    if source.startswith("hf://"):
        from memcalc.hub import resolve_config

        repo_id, _, revision = source.removeprefix("hf://").partition("@")
        return resolve_config(repo_id, revision or None)
    path = Path(source) if source else None
    if path is not None and path.is_dir():
        path = path / "config.json"
    return path if path is not None and path.suffix == ".json" and path.is_file() else None


def reduce_layers(data: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """``data`` (a config.json mapping) with its first ``num_layers`` layers: per-layer lists cut,
    layer-index lists filtered, so layer i is the file's layer i (as memcalc's ``with_layers``)."""
    total = data.get("num_hidden_layers")
    if total is None or num_layers == total:
        return dict(data)
    if num_layers > total:
        raise InputError(f"--num-layers {num_layers}: the config has {total} layers")
    reduced = {**data, "num_hidden_layers": num_layers}
    for key in PER_LAYER_LISTS:
        if isinstance(data.get(key), list):
            reduced[key] = data[key][:num_layers]
    for key in PER_LAYER_STRINGS:
        if isinstance(data.get(key), str):
            reduced[key] = data[key][:num_layers]
    for key in LAYER_INDEX_LISTS:
        if isinstance(data.get(key), list):
            reduced[key] = [index for index in data[key] if index < num_layers]
    return reduced


def transformers_config_from_file(path: str | Path, num_layers: int | None = None) -> Any:
    """The transformers configuration of a config.json, reduced to ``num_layers`` layers: the
    file's own ``model_type`` class (``AutoConfig.for_model``), so every family transformers knows
    is built as published, not as memcalc re-describes it. Multimodal files give their
    ``text_config`` (the language model is what training steps measure)."""
    try:
        import transformers
    except ImportError:
        raise InputError("--impl hf needs transformers: pip install transformers") from None
    data = json.loads(Path(path).read_text())
    if isinstance(data.get("text_config"), dict):
        data = data["text_config"]
    data = {key: value for key, value in data.items() if key not in DROPPED_KEYS and not key.startswith("_synthetic")}
    if num_layers is not None:
        data = reduce_layers(data, num_layers)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise InputError(f"{path}: no model_type: --impl hf cannot choose a transformers class")
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise InputError(f"--impl hf: transformers {transformers.__version__} has no class for "
                         f"model_type {model_type!r} ({exc})") from None


def hf_config_for(model: ModelConfig) -> Any:
    """From the config.json the model was read from when there is one, else rebuilt from memcalc's fields."""
    path = _source_path(model.source)
    if path is not None:
        return transformers_config_from_file(path, model.num_layers)
    return transformers_config(model)


def build_hf_model(model: ModelConfig, attention: str):
    import transformers

    config = hf_config_for(model)
    # gpt-oss's class has no SDPA path (its sink logits): transformers runs it eager; a class without
    # attention layers (Mamba, Falcon-Mamba, Mamba-2) refuses an SDPA setting it has no use for
    attends = any(kind.value.endswith("attention") for kind in model.resolved_layer_types)
    eager = attention == "eager" or model.attention_sinks or not attends
    config._attn_implementation = "eager" if eager else "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config)
