"""Heterogeneous layers: KV cache and recurrent state per layer type, checkpoint formats, refusals,
and pipeline stages over interleaved MoE layers. Expected values are derived by hand from the
checkpoints' config.json (tests/data/hf_configs/) and the formats' definitions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from memcalc.config import Engine, InferSettings, LayerType, TrainSettings
from memcalc.dtypes import DType
from memcalc.errors import InputError
from memcalc.estimate.inference import estimate_inference, kv_cache_bytes_per_token, state_values_per_sequence
from memcalc.estimate.params import count_params
from memcalc.estimate.training import estimate_training
from memcalc.hf import model_from_hf
from memcalc.library import resolve_model
from memcalc.parallel import ParallelConfig, pipeline_ranks, rank_params, stage_layers

CORPUS = Path(__file__).parent / "data" / "hf_configs"


def _corpus(file_name: str):
    return model_from_hf(json.loads((CORPUS / file_name).read_text()), name=file_name, source=file_name)


def _component(estimate, key: str) -> int:
    return next(component.bytes for component in estimate.components if component.key == key)


def test_gpt_oss_alternates_sliding_and_full_layers():
    """gpt-oss-20b: 12 sliding layers (window 128) and 12 full; 8 KV heads x 64 x 2 (k, v) x 2 B =
    2,048 B per layer and token. At 131,072 tokens: 12 x 131,072 x 2,048 + 12 x 128 x 2,048
    (transformers keeps a view of window - 1 tokens into the window it concatenated at the last
    decoding step, so a window of storage: tests/test_cache_hf.py)."""
    model = resolve_model("gpt-oss-20b")
    assert model.resolved_layer_types.count(LayerType.SLIDING_ATTENTION) == 12
    estimate = estimate_inference(model, InferSettings(context_len=131_072))
    assert _component(estimate, "kv_cache") == 12 * 131_072 * 2_048 + 12 * 128 * 2_048
    assert kv_cache_bytes_per_token(model, DType.BF16) == 24 * 2_048


def test_gpt_oss_checkpoint_is_mxfp4_experts_by_default():
    """quantization_config mxfp4 with attention kept in bf16: the 24 x 32 experts' three
    2,880 x 2,880 projections in MXFP4 (4-bit values + one E8M0 scale per 32: 17/32 bytes a value),
    everything else in bf16."""
    model = resolve_model("gpt-oss-20b")
    estimate = estimate_inference(model, InferSettings(context_len=1024))
    experts = 24 * 32 * 3 * 2_880 * 2_880
    assert _component(estimate, "weights_quantised") == experts * 17 // 32
    assert _component(estimate, "weights_unquantised") == 2 * (count_params(model).total - experts)
    assert estimate.settings.weights == "mxfp4"
    given = estimate_inference(model, InferSettings(context_len=1024, weights="bf16"))
    assert _component(given, "weights") == 2 * count_params(model).total


def test_jamba_state_per_sequence():
    """Jamba-1.5-Mini: 28 Mamba layers of 8,192 channels, d_state 16, d_conv 4. transformers keeps
    the whole conv window (4 columns), vLLM 3; the SSM state is 8,192 x 16 per layer, which
    transformers' cache keeps in fp32 (tests/test_cache_hf.py), the conv window in bf16."""
    model = resolve_model("jamba-1.5-mini")
    assert state_values_per_sequence(model, Engine.HF) == (28 * 8_192 * 4, 28 * 8_192 * 16)
    assert state_values_per_sequence(model, Engine.PAGED) == (28 * 8_192 * 3, 28 * 8_192 * 16)
    estimate = estimate_inference(model, InferSettings(context_len=4096, batch_size=3))
    assert _component(estimate, "state_cache") == 3 * 28 * (8_192 * 4 * 2 + 8_192 * 16 * 4)
    # only the 4 attention layers cache keys and values: 8 KV heads x 128 x 2 x 2 B
    assert _component(estimate, "kv_cache") == 3 * 4096 * 4 * 8 * 128 * 2 * 2


def test_falcon_mamba_has_no_kv_cache():
    model = _corpus("tiiuae--falcon-mamba-7b.json")
    estimate = estimate_inference(model, InferSettings(context_len=32_768))
    assert _component(estimate, "kv_cache") == 0
    # 64 layers x (8,192 channels x 4 conv columns x 2 bytes + 8,192 x 16 fp32 state)
    assert _component(estimate, "state_cache") == 64 * (8_192 * 4 * 2 + 8_192 * 16 * 4)


def test_llama4_chunked_layers_hold_one_chunk():
    """Llama 4 (transformers' Llama4TextConfig defaults: Scout's 48 layers, a NoPE full-attention
    layer every 4, the others attending in chunks of 8,192)."""
    transformers = pytest.importorskip("transformers")
    data = json.loads(transformers.Llama4TextConfig().to_json_string())
    model = model_from_hf(data, name="scout", source="defaults")
    assert model.resolved_layer_types.count(LayerType.FULL_ATTENTION) == 12
    per_layer_token = 8 * 128 * 2 * 2
    estimate = estimate_inference(model, InferSettings(context_len=100_000))
    # the chunked layers: a view of chunk - 1 tokens into the chunk concatenated at the last step
    assert _component(estimate, "kv_cache") == per_layer_token * (12 * 100_000 + 36 * 8_192)


def test_training_refuses_recurrent_layers():
    with pytest.raises(InputError, match="training activations of mamba layers are not modelled"):
        estimate_training(resolve_model("jamba-1.5-mini"), TrainSettings(seq_len=1024))


@pytest.mark.parametrize(("data", "message"), [
    ({"num_local_experts": 8}, "num_local_experts change the structure of a llama model"),
    ({"layer_types": ["full_attention", "banded"]}, "layer type 'banded' is not modelled"),
    ({"model_type": "bamba"}, "model_type 'bamba' is not modelled"),
    ({"model_type": ["llama"]}, r"model_type: expected a string, got \['llama'\]"),
    ({"model_type": "mixtral", "num_local_experts": 2**31, "num_experts_per_tok": 2, "hidden_size": 4096,
      "num_attention_heads": 32, "intermediate_size": 14336},
     r"these sizes give 7.57e\+17 parameters, more than any model"),
])
def test_structure_memcalc_does_not_read_is_refused(data, message):
    base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "vocab_size": 100, "tie_word_embeddings": False}
    with pytest.raises(InputError, match=message) as info:
        model_from_hf(base | data, name="x", source="x.json")
    assert "\n" not in str(info.value)


def test_pipeline_stages_of_interleaved_moe_hold_every_parameter_once():
    """Experts on odd layers only (Llama-4-Maverick's interleave step 2): the stages' tensors add
    up to the model's, and each stage's MoE layers are the ones its indices name."""
    model = _corpus("Qwen--Qwen3-30B-A3B.json")
    moe = replace(model.moe, layers=tuple(range(1, model.num_layers, 2)))
    model = replace(model, moe=moe, intermediate_size=6144)
    parallel = ParallelConfig(pp=4, microbatches=8)
    held = 0
    for rank in range(parallel.pp):
        stage = stage_layers(model, parallel, rank)
        assert stage.moe_layers == sum(1 for index in stage.indices if index in moe.layers)
        held += rank_params(model, parallel, stage).total
    assert held == count_params(model).total
    estimate = estimate_training(model, TrainSettings(seq_len=1024), parallel)
    assert [view.pipeline_rank for view in estimate.ranks] == pipeline_ranks(parallel)


def test_falcon_h1_layers_cache_keys_and_keep_a_state():
    """Falcon-H1 (transformers' FalconH1Config defaults): every layer caches keys and values (8 KV
    heads x 128 x 2 x 2 B = 4,096 B a token) and keeps a Mamba-2 state: conv over 1,024 + 2 x 256
    channels x 4 columns (bf16), SSM 1,024 x 256 (fp32)."""
    transformers = pytest.importorskip("transformers")
    data = json.loads(transformers.FalconH1Config().to_json_string())
    model = model_from_hf(data, name="falcon-h1", source="defaults")
    estimate = estimate_inference(model, InferSettings(context_len=1000))
    assert _component(estimate, "kv_cache") == 32 * 1000 * 4_096
    assert _component(estimate, "state_cache") == 32 * ((1_024 + 2 * 256) * 4 * 2 + 1_024 * 256 * 4)
    with pytest.raises(InputError, match="attention_mamba layers are not modelled"):
        estimate_training(model, TrainSettings(seq_len=256))


@pytest.mark.parametrize(("model_type", "rates", "fields", "noted"), [
    ("gpt2", {"attn_pdrop": 0.1, "resid_pdrop": 0.2, "embd_pdrop": 0.0},
     {"attention_dropout": 0.1, "residual_dropout": 0.2, "embedding_dropout": 0.0}, None),
    ("gpt2", {}, {"attention_dropout": 0.1, "residual_dropout": 0.1, "embedding_dropout": 0.1}, None),
    ("llama", {"attention_dropout": 0.05}, {"attention_dropout": 0.05, "residual_dropout": None}, None),
    ("llama", {"attention_dropout": 0.0, "hidden_dropout": 0}, {"attention_dropout": 0.0}, None),
    ("llama", {"hidden_dropout": 0.1}, {"attention_dropout": 0.0, "unmodelled_dropout": ("hidden_dropout",)},
     "hidden_dropout 0.1"),
])
def test_dropout_rates_from_config_json(model_type, rates, fields, noted):
    """GPT-2's three rates (GPT2Config's default 0.1 when absent) and the attention dropout of the
    Llama-style classes become the model's rates; another dropout key above 0 is not modelled and a
    note says so, never a silent shortfall."""
    from memcalc.hf import model_from_hf

    data = {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "vocab_size": 96, "max_position_embeddings": 256} | rates
    model = model_from_hf(data, name="x", source="config.json")
    assert {key: getattr(model, key) for key in fields} == fields
    notes = [note for note in model.notes if "dropout" in note]
    if noted is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith(noted) and "not modelled" in notes[0]


def test_bundled_gpt2_models_train_with_their_dropout():
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        model = resolve_model(name)
        assert (model.attention_dropout, model.embedding_dropout, model.residual_dropout) == (0.1, 0.1, 0.1), name
        assert not any("dropout" in note for note in model.notes), name


def test_the_assumptions_show_the_dropout_rates(run_cli):
    text = " ".join(run_cli("train", "gpt2", columns=120).stdout.split())
    assert "dropout attention 0.1, embedding 0.1, residual 0.1" in text
    assert "no dropout" in " ".join(run_cli("train", "gpt2", "--dropout", "0", columns=120).stdout.split())


def test_a_training_estimate_refuses_dropout_it_does_not_model():
    """A config.json dropout key memcalc does not model (hidden_dropout 0.1 on a Llama) is refused
    by train, naming the key, unless --dropout gives the rates; inference is unaffected."""
    from memcalc.hf import model_from_hf

    data = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "vocab_size": 96, "max_position_embeddings": 256, "hidden_dropout": 0.1}
    model = model_from_hf(data, name="x", source="config.json")
    with pytest.raises(InputError, match=r"\(hidden_dropout\): give --dropout"):
        estimate_training(model, TrainSettings(seq_len=64))
    assert estimate_training(model, TrainSettings(seq_len=64, dropout=0.0)).total > 0
    assert estimate_inference(model, InferSettings(context_len=64)).total > 0


# Qwen3.5 and Qwen3.5-MoE: Qwen3-Next's layers with the gated delta net's projections split, a dense
# MLP or experts on every layer, Qwen3-VL's vision tower without deepstack mergers. The 9B-sized
# text_config (Qwen3_5TextConfig's defaults, written out) and the wrappers' own defaults.
QWEN3_5_TEXT = {"model_type": "qwen3_5_text", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
                "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 248320,
                "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
                "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
                "attn_output_gate": True, "mamba_ssm_dtype": "float32", "mtp_num_hidden_layers": 1,
                "mtp_use_dedicated_embeddings": False, "max_position_embeddings": 262144,
                "tie_word_embeddings": False}
QWEN3_5_CASES = {
    "qwen3_5 text": {**QWEN3_5_TEXT, "architectures": ["Qwen3_5ForCausalLM"]},
    "qwen3_5": {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
                "text_config": QWEN3_5_TEXT, "tie_word_embeddings": False,
                "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                                  "out_hidden_size": 4096, "patch_size": 16, "num_position_embeddings": 2304}},
    "qwen3_5_moe defaults": {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
                             "text_config": {}, "vision_config": {}},
}


@pytest.mark.parametrize("case", sorted(QWEN3_5_CASES))
def test_qwen3_5_counts_equal_transformers_on_the_meta_device(case):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    data = QWEN3_5_CASES[case]
    config = transformers.AutoConfig.for_model(**json.loads(json.dumps(data)))
    with torch.device("meta"):
        built = getattr(transformers, data["architectures"][0])(config)
    model = model_from_hf(json.loads(json.dumps(data)), name=case, source=case)
    assert count_params(model).total == sum(p.numel() for p in built.parameters())


def test_qwen3_5_reads_split_projections_and_trains():
    model = model_from_hf(dict(QWEN3_5_TEXT), name="qwen3.5", source="qwen3.5")
    assert model.linear_attention.split_projections
    assert any("multi-token-prediction" in note for note in model.notes)
    # the recurrent state per sequence: 24 gated delta nets of 32 value heads x 128 x 128, kept in fp32
    state = estimate_inference(model, InferSettings(context_len=1024)).component("state_cache").bytes
    assert state == 24 * ((2 * 16 * 128 + 32 * 128) * 4 * 2 + 32 * 128 * 128 * 4)
    # vLLM keeps conv_kernel - 1 columns and the recurrent state in the file's mamba_ssm_dtype (float32)
    paged = estimate_inference(model, InferSettings(context_len=1024, engine="vllm")).component("state_cache").bytes
    assert paged == 24 * ((2 * 16 * 128 + 32 * 128) * 3 * 2 + 32 * 128 * 128 * 4)
    without = model_from_hf({key: value for key, value in QWEN3_5_TEXT.items() if key != "mamba_ssm_dtype"},
                            name="qwen3.5", source="qwen3.5")
    assert estimate_inference(without, InferSettings(context_len=1024, engine="vllm")).component(
        "state_cache").bytes == 24 * ((2 * 16 * 128 + 32 * 128) * 3 * 2 + 32 * 128 * 128 * 2)
    # trained as measured (tests/test_gated_delta_training.py); autocast is refused, naming Qwen3.5
    assert estimate_training(model, TrainSettings(seq_len=256)).component("activations").bytes > 0
    with pytest.raises(InputError, match="Qwen3.5 training activations are modelled for bf16"):
        estimate_training(model, TrainSettings(seq_len=256, precision="amp-bf16"))


def test_qwen3_5_unknown_state_dtype_is_refused():
    with pytest.raises(InputError, match="mamba_ssm_dtype: 'float8' is not one of"):
        model_from_hf({**QWEN3_5_TEXT, "mamba_ssm_dtype": "float8"}, name="qwen3.5", source="qwen3.5")


@pytest.mark.parametrize("factor", [0, 1.5, -0.25])
def test_partial_rotary_factor_out_of_range_is_one_line_exit_2(run_cli, tmp_path, factor):
    """partial_rotary_factor is a share of each head's dims: above 0, at most 1."""
    data = json.loads((Path(__file__).parent / "data" / "hf_configs" / "zai-org--GLM-4.5-Air.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "partial_rotary_factor": factor}))
    result = run_cli("infer", str(tmp_path / "config.json"), "--json")
    assert result.exit_code == 2
    assert "partial_rotary_factor" in result.stderr and result.stderr.count("\n") == 1
