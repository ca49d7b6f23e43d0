"""The inference cache memcalc predicts for ``--engine hf``, measured in transformers' own classes.

Each family's config (a Hub file in tests/data/hf_configs/ or transformers' configuration-class
defaults) is shrunk so a CPU forward is cheap but every layer kind and the cache geometry stay:
two layers keeping the pattern (sliding + full, chunked + full, Mamba/linear + full), a small
vocabulary and hidden size, and windows (sliding_window, attention_chunk_size) shorter than the
prompt. The model is built with random weights, one prefill forward with ``use_cache=True`` runs
on BATCH sequences of T tokens, and the bytes of every tensor the returned cache holds are summed
(DynamicLayer keys/values; LinearAttentionLayer conv_states/recurrent_states). memcalc reads the
SAME reduced config (``memcalc.hf.model_from_hf``), so both sides describe one model.

Two checks per family: ``test_measured_geometry`` pins what transformers 5.x keeps (per-layer
shapes written out by hand from the config: this documents the measurement itself), and
``test_memcalc_matches_measured`` compares memcalc's kv_cache and state_cache components of
``estimate_inference`` with the measured bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from memcalc.config import InferSettings  # noqa: E402
from memcalc.estimate.inference import estimate_inference  # noqa: E402
from memcalc.hf import model_from_hf  # noqa: E402

CONFIGS = Path(__file__).parent / "data" / "hf_configs"
T, BATCH, WINDOW = 20, 2, 8  # prompt tokens, sequences, sliding window / attention chunk (< T)
SMALL = {"vocab_size": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
ATTN = {"hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16}
# a key and a value, per sequence and token, of one attention layer: 2 x kv_heads x head_dim
KV_VALUES = 2 * 2 * 16

# The sliding (and Llama 4 chunked) layers: transformers' DynamicSlidingWindowLayer.update keeps
# ``full_key_states[:, :, -sliding_window + 1:, :]``, i.e. a view of sliding_window - 1 tokens once
# the prompt exceeds the window, into the states it concatenated: after the prompt's forward the
# storage is the whole prompt's (memcalc.estimate.inference.hf_prefill_cache_tokens), after a
# decoding step a window's (cached_tokens for Engine.HF; tests/test_inference_hf.py runs generate()).


@dataclass(frozen=True)
class Case:
    family: str
    source: str  # a file under tests/data/hf_configs/ (``*.json``) or a transformers model_type
    overrides: dict[str, Any]
    # expected measurement from the geometry: tokens held per attention layer, state values per sequence
    attention_tokens: tuple[int, ...]
    state_values: int
    dtype: str = "fp32"
    marks: tuple[Any, ...] = field(default=())
    # of state_values, the SSM or recurrent state: kept in fp32 whatever the model's dtype (the
    # scans return fp32 states and the cache keeps their dtype); the conv window is in the model's
    ssm_values: int = 0


def _mamba1_state(intermediate: int, conv: int, d_state: int) -> int:
    return intermediate * conv + intermediate * d_state


def _mamba2_state(heads: int, head_dim: int, groups: int, d_state: int, conv: int) -> int:
    channels = heads * head_dim + 2 * groups * d_state
    return channels * conv + heads * head_dim * d_state



CASES = (
    Case("gpt-oss", "openai--gpt-oss-20b.json",
         {**SMALL, **ATTN, "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"],
          "sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2},
         (WINDOW - 1, T), 0),
    Case("gemma3_text", "gemma3_text",
         {**SMALL, **ATTN, "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"],
          "sliding_window": WINDOW},
         (WINDOW - 1, T), 0, dtype="bf16"),
    Case("llama4_text", "llama4_text",
         {**SMALL, **ATTN, "intermediate_size_mlp": 32, "num_hidden_layers": 2,
          "layer_types": ["chunked_attention", "full_attention"], "attention_chunk_size": WINDOW,
          "num_local_experts": 4, "moe_layers": [0, 1], "no_rope_layers": [1, 0]},
         (WINDOW - 1, T), 0),
    Case("qwen3", "Qwen--Qwen3-8B.json", {**SMALL, **ATTN, "num_hidden_layers": 2}, (T, T), 0),
    # Jamba: layer 0 Mamba (d_conv 4, expand 2 -> 128 channels, d_state 8), layer 1 attention
    Case("jamba", "ai21labs--AI21-Jamba-1.5-Mini.json",
         {**SMALL, **ATTN, "num_hidden_layers": 2, "attn_layer_period": 2, "attn_layer_offset": 1,
          "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 4, "num_experts_per_tok": 2,
          "mamba_d_state": 8, "mamba_dt_rank": 8},
         (T,), _mamba1_state(128, 4, 8)),
    Case("falcon_mamba", "tiiuae--falcon-mamba-7b.json",
         {**SMALL, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "state_size": 8,
          "time_step_rank": 8},
         (), 2 * _mamba1_state(128, 4, 8)),
    Case("mamba2", "mamba2",
         {**SMALL, "num_hidden_layers": 2, "hidden_size": 64, "num_heads": 8, "head_dim": 16, "state_size": 8,
          "n_groups": 2, "chunk_size": 8},
         (), 2 * _mamba2_state(8, 16, 2, 8, 4)),
    Case("granitemoehybrid", "granitemoehybrid",
         {**SMALL, **{k: v for k, v in ATTN.items() if k != "head_dim"}, "num_hidden_layers": 2,
          "layer_types": ["linear_attention", "full_attention"], "num_local_experts": 4,
          "shared_intermediate_size": 32, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 8,
          "mamba_n_groups": 2, "mamba_chunk_size": 8},
         (T,), _mamba2_state(8, 16, 2, 8, 4)),
    # Qwen3-Next: layer 0 gated delta net (2 key heads x 8, 4 value heads x 12, conv 4), layer 1 full
    Case("qwen3_next", "qwen3_next",
         {**SMALL, **ATTN, "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"],
          "linear_key_head_dim": 8, "linear_value_head_dim": 12, "linear_num_key_heads": 2,
          "linear_num_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
          "shared_expert_intermediate_size": 16},
         (T,), (2 * 2 * 8 + 4 * 12) * 4 + 4 * 8 * 12),
    # Qwen3.5: Qwen3-Next's layers with the gated delta net's projections split, a dense MLP
    Case("qwen3_5_text", "qwen3_5_text",
         {**SMALL, **ATTN, "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"],
          "linear_key_head_dim": 8, "linear_value_head_dim": 12, "linear_num_key_heads": 2,
          "linear_num_value_heads": 4},
         (T,), (2 * 2 * 8 + 4 * 12) * 4 + 4 * 8 * 12, dtype="bf16", ssm_values=4 * 8 * 12),
)
# The recurrent families again in bf16: their conv windows in bf16, their states in fp32
CASES += tuple(
    Case(f"{case.family} bf16", case.source, case.overrides, case.attention_tokens, case.state_values, "bf16",
         ssm_values=ssm)
    for case, ssm in ((CASES[4], 128 * 8), (CASES[6], 2 * 8 * 16 * 8), (CASES[8], 4 * 8 * 12))
)
assert [case.family for case in CASES[-4:]] == ["qwen3_5_text", "jamba bf16", "mamba2 bf16", "qwen3_next bf16"]

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ELEMENT_BYTES = {"fp32": 4, "bf16": 2}


def _reduced_config(case: Case) -> tuple[Any, dict[str, Any]]:
    """The shrunk transformers config and the config.json mapping memcalc reads for it."""
    if case.source.endswith(".json"):
        data = json.loads((CONFIGS / case.source).read_text())
        data.pop("quantization_config", None)  # random fp weights, not the checkpoint's MXFP4
        data.update(case.overrides)
        return transformers.AutoConfig.for_model(**data), data
    config = transformers.CONFIG_MAPPING[case.source](**case.overrides)
    return config, config.to_dict()


def _tensors(layer: Any) -> tuple[list[Any], list[Any]]:
    """(key/value tensors, conv/recurrent state tensors) one cache layer holds, empty ones left out."""
    kv = [getattr(layer, name, None) for name in ("keys", "values")]
    state = []
    for name in ("conv_states", "recurrent_states"):
        held = getattr(layer, name, None)
        state.extend(held.values() if isinstance(held, dict) else [held])
    keep = lambda ts: [t for t in ts if isinstance(t, torch.Tensor) and t.numel()]  # noqa: E731
    return keep(kv), keep(state)


@dataclass(frozen=True)
class Measured:
    kv_bytes: int  # the elements the cache's key/value tensors show
    state_bytes: int
    attention_tokens: tuple[int, ...]  # tokens held by each attention layer, in layer order
    kv_storage_bytes: int  # the memory behind them: a sliding layer's view keeps the prompt's storage


def measure(case: Case) -> Measured:
    return _measure(case.family)


@lru_cache(maxsize=None)
def _measure(family: str) -> Measured:
    case = next(c for c in CASES if c.family == family)
    config, _ = _reduced_config(case)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[case.dtype]).eval()
    ids = torch.randint(0, config.vocab_size, (BATCH, T))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    kv_bytes = state_bytes = 0
    tokens, storages = [], {}
    for layer in cache.layers:
        kv, state = _tensors(layer)
        kv_bytes += sum(t.numel() * t.element_size() for t in kv)
        state_bytes += sum(t.numel() * t.element_size() for t in state)
        storages.update({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in kv})
        if kv:
            tokens.append(kv[0].shape[-2])
    return Measured(kv_bytes, state_bytes, tuple(tokens), sum(storages.values()))


def memcalc_bytes(case: Case) -> tuple[int, int]:
    """memcalc's KV cache and recurrent state for the same reduced config and workload."""
    _, data = _reduced_config(case)
    model = model_from_hf(data, name=case.family, source=f"{case.source} (reduced)")
    estimate = estimate_inference(model, InferSettings(dtype=case.dtype, kv_dtype=case.dtype, prompt_len=T,
                                                       batch_size=BATCH))
    rows = {component.key: component.bytes for component in estimate.components}
    return rows.get("kv_cache", 0), rows.get("state_cache", 0)  # zero rows are left out


def _ids(case: Case) -> str:
    return case.family


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_measured_geometry(case: Case) -> None:
    """What transformers keeps: per attention layer 2 x kv_heads x head_dim x tokens held (sliding
    and chunked layers window - 1), per Mamba/linear layer conv_kernel columns x conv channels plus
    the SSM/recurrent state, per sequence."""
    measured = measure(case)
    e = ELEMENT_BYTES[case.dtype]
    assert measured.attention_tokens == case.attention_tokens
    assert measured.kv_bytes == BATCH * KV_VALUES * sum(case.attention_tokens) * e
    assert measured.state_bytes == BATCH * ((case.state_values - case.ssm_values) * e + case.ssm_values * 4)


@pytest.mark.parametrize("case", [pytest.param(c, marks=c.marks) for c in CASES], ids=_ids)
def test_memcalc_matches_measured(case: Case) -> None:
    """After the prompt's forward (no decoding step), a sliding or chunked layer's window - 1 tokens
    are a view of the whole prompt's keys and values, and memory holds the whole prompt: memcalc
    counts the storage."""
    measured = measure(case)
    assert measured.kv_storage_bytes == BATCH * KV_VALUES * T * len(case.attention_tokens) * ELEMENT_BYTES[case.dtype]
    assert memcalc_bytes(case) == (measured.kv_storage_bytes, measured.state_bytes)
