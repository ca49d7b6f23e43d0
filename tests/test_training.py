"""Training memory against hand derivations and published per-parameter byte counts."""

from __future__ import annotations

import pytest

from memcalc.config import ModelConfig, Optimizer, Recompute, TrainSettings
from memcalc.estimate.activations import megatron_layer_activation_bytes
from memcalc.estimate.optimizer import eight_bit_state_bytes
from memcalc.estimate.training import estimate_training
from memcalc.library import resolve_model

GIB = 2**30


def _memory(name: str, **settings) -> dict[str, int]:
    estimate = estimate_training(resolve_model(name), TrainSettings(**settings))
    return {component.key: component.bytes for component in estimate.components} | {"total": estimate.total}


def _model_states(memory: dict[str, int]) -> int:
    return memory["weights"] + memory["gradients"] + memory["master_weights"] + memory["optimizer_states"]


def _one_billion_param_model() -> ModelConfig:
    """hidden 1000, vocab 1e9/1000 - a single embedding matrix of exactly 1e9 parameters plus
    tiny layers, so the weights are 1e9 * 4 B in fp32 up to the layer parameters."""
    return ModelConfig(
        name="one-billion", hidden_size=1000, num_layers=1, num_attention_heads=1, intermediate_size=1,
        vocab_size=1_000_000, max_position_embeddings=2048, tie_word_embeddings=True,
    )


def test_seed_fp32_bytes_one_billion_params_is_3_725_gib():
    """The seed's worked number: 1B parameters in fp32 occupy 3.725 GiB (4e9 / 2^30)."""
    estimate = estimate_training(_one_billion_param_model(), TrainSettings(dtype="fp32"))
    params = estimate.params.total
    assert params == 1_000_000_000 + 4 * 1000**2 + 3 * 1000 + 2 * 1000 + 1000
    assert estimate.component("weights").bytes == 4 * params
    assert 4 * 1_000_000_000 / GIB == pytest.approx(3.725, abs=5e-4)


def test_seed_13b_in_fp32_is_about_52_gb():
    """The seed: a 13B model in fp32 needs about 52 GB for its weights."""
    weights = _memory("llama-13b", dtype="fp32")["weights"]
    assert weights == 13_015_864_320 * 4
    assert weights / 1e9 == pytest.approx(52, abs=0.1)


@pytest.mark.parametrize(
    ("settings", "bytes_per_param", "master"),
    [
        # ZeRO paper (Rajbhandari et al. 2020) sec. 3.1: mixed-precision Adam is 2 + 2 + 12 = 16 B/param.
        ({"dtype": "bf16"}, 16, 4),
        ({"dtype": "fp16"}, 16, 4),
        # Plain fp32 Adam: 4 weights + 4 grads + 8 moments.
        ({"dtype": "fp32"}, 16, 0),
        # Pure bf16 (torchtune-style): 2 + 2 + 2 * 2 moments (torch.optim states follow the param dtype).
        ({"dtype": "bf16", "master_weights": False}, 8, 0),
        # SGD: no state; with momentum one fp32 buffer (4 B) besides the fp32 master.
        ({"dtype": "bf16", "optimizer": "sgd"}, 8, 4),
        ({"dtype": "bf16", "optimizer": "sgd-momentum"}, 12, 4),
        ({"dtype": "fp32", "optimizer": "sgd-momentum"}, 12, 0),
    ],
)
def test_model_state_bytes_per_parameter(settings, bytes_per_param, master):
    memory = _memory("llama-2-7b", **settings)
    params = 6_738_415_616
    assert _model_states(memory) == bytes_per_param * params
    assert memory["master_weights"] == master * params


def test_adam8bit_block_wise_states_by_hand():
    """bitsandbytes: per state 1 B/element + one fp32 absmax per 256 elements. Every Llama-2-7B
    tensor has at least 4096 elements and a multiple of 256, so the states are 2 * P * (1 + 4/256)."""
    memory = _memory("llama-2-7b", optimizer="adam8bit")
    assert memory["optimizer_states"] == 13_687_406_720
    assert memory["optimizer_states"] / 6_738_415_616 == 2.03125


@pytest.mark.parametrize(
    ("num_elements", "expected"),
    [
        (4095, 4095 * 4),  # below bitsandbytes' min_8bit_size of 4096: a 32-bit state
        (4096, 4096 + 16 * 4),  # 8-bit codes + 16 blocks of 256 with one fp32 absmax each
        (4097, 4097 + 17 * 4),  # a partial last block still has an absmax
        (768 * 2304, 768 * 2304 + 6912 * 4),
    ],
)
def test_eight_bit_state_rule(num_elements, expected):
    assert eight_bit_state_bytes(num_elements) == expected


def test_adam8bit_keeps_small_gpt2_tensors_in_fp32():
    """GPT-2's bias and LayerNorm vectors (768 or 2304 elements) stay fp32: 8 B/element for two states."""
    from memcalc.estimate.params import count_params

    inventory = count_params(resolve_model("gpt2"))
    small = sum(group.total for group in inventory.groups if group.numel < 4096)
    large_groups = [group for group in inventory.groups if group.numel >= 4096]
    expected = 8 * small + sum(2 * (g.numel + -(-g.numel // 256) * 4) * g.count for g in large_groups)
    assert small == 12 * (2304 + 768 + 3072 + 768 + 4 * 768) + 2 * 768
    assert _memory("gpt2", optimizer="adam8bit")["optimizer_states"] == expected


# Korthikanti et al. 2022 sec. 4.1, evaluated by hand: s*b*h*(34 + 5*a*s/h) bytes per layer.
@pytest.mark.parametrize(
    ("name", "seq", "batch", "recompute", "expected"),
    [
        # GPT-3 175B, s=2048, b=1: sbh = 25,165,824; 5as/h = 5*96*2048/12288 = 80; 96 layers.
        ("gpt3-175b", 2048, 1, "none", 25_165_824 * 114 * 96),
        ("gpt3-175b", 2048, 1, "selective", 25_165_824 * 34 * 96),
        ("gpt3-175b", 2048, 1, "full", 25_165_824 * 2 * 96),
        # Llama-2-7B, s=4096, b=2: sbh = 33,554,432; 5as/h = 5*32*4096/4096 = 160; 32 layers.
        ("llama-2-7b", 4096, 2, "none", 208_305_913_856),
        ("llama-2-7b", 4096, 2, "selective", 36_507_222_016),
        ("llama-2-7b", 4096, 2, "full", 2_147_483_648),
    ],
)
def test_megatron_activations_by_hand(name, seq, batch, recompute, expected):
    model = resolve_model(name)
    e = 2
    output_layer = 2 * e * seq * batch * model.hidden_size + 4 * seq * batch * model.vocab_size
    memory = _memory(name, seq_len=seq, batch_size=batch, recompute=recompute, activation_model="megatron")
    assert memory["activations"] == expected + output_layer


def test_fp32_activations_double_tensors_but_not_masks():
    """At 4 B/element the 32 B of 16-bit tensors become 64 and the 2 B of masks stay 2: 66*sbh;
    the a*s^2*b term becomes 2*4 + 1 = 9 (two 4-byte score tensors and a 1-byte mask)."""
    s, b, h, a = 1024, 1, 768, 12
    assert megatron_layer_activation_bytes(s, b, h, a, 4, Recompute.NONE) == s * b * h * 66 + a * s * s * b * 9
    assert megatron_layer_activation_bytes(s, b, h, a, 2, Recompute.NONE) == s * b * h * 34 + a * s * s * b * 5


def test_output_layer_term_by_hand():
    """Korthikanti sec. 4.3: 4sbh(1 + V/h) at 16 bits. GPT-2, s=1024, b=4: 4*4096*768 + 4*4096*50257."""
    from memcalc.estimate.activations import output_layer_activation_bytes

    assert output_layer_activation_bytes(1024, 4, 768, 50257, 2) == 4 * 4096 * 768 + 4 * 4096 * 50257


def test_default_sequence_is_capped_by_model_positions():
    assert estimate_training(resolve_model("gpt2"), TrainSettings()).settings.seq_len == 1024
    assert estimate_training(resolve_model("llama-2-7b"), TrainSettings()).settings.seq_len == 2048


def test_llama_13b_bf16_megatron_numbers_by_hand():
    """P = 13,015,864,320; s=2048, b=1, h=5120, a=40, L=40, V=32000; mixed bf16, foreach AdamW."""
    memory = _memory("llama-13b", dtype="bf16", activation_model="megatron")
    params = 13_015_864_320
    assert memory["weights"] == 2 * params
    assert memory["gradients"] == 2 * params
    assert memory["master_weights"] == 4 * params
    assert memory["optimizer_states"] == 8 * params
    # 5as/h = 5*40*2048/5120 = 80 -> 114 sbh per layer; output layer 4sbh + 4sbV
    assert memory["activations"] == 2048 * 5120 * 114 * 40 + 4 * 2048 * 5120 + 4 * 2048 * 32000
    # fp32 copies of the gradients (4P - 2P freed) + one fp32 state-sized foreach temporary (4P)
    assert memory["optimizer_step_temporaries"] == 6 * params
    phases = estimate_training(resolve_model("llama-13b"), TrainSettings(activation_model="megatron")).phases
    static = 14 * params
    assert phases == {
        "forward": static + 48_119_152_640,
        "backward": static + 48_119_152_640,
        "optimizer_step": static + 2 * params + 6 * params,
    }
    assert memory["total"] == 22 * params


def test_checkpoint_sizes():
    estimate = estimate_training(resolve_model("llama-2-7b"), TrainSettings(dtype="bf16"))
    params = 6_738_415_616
    assert estimate.component("weights_only").bytes == 2 * params
    assert estimate.component("training").bytes == (2 + 4 + 8) * params


def test_optimizer_enum_covers_every_optimizer():
    for optimizer in Optimizer:
        assert _memory("gpt2", optimizer=optimizer.value)["optimizer_states"] >= 0


# --- Optimizers, moment dtypes, gradient accumulation, optimizer in backward (issue 6) ------------

LLAMA_2_7B = 6_738_415_616


@pytest.mark.parametrize(
    ("settings", "moment_bytes_per_param"),
    [
        ({"optimizer": "lion"}, 4),  # Chen et al. 2023: one momentum, fp32 beside the fp32 master
        ({"optimizer": "ademamix"}, 12),  # Pagliardini et al. 2024: two EMAs and the second moment
        ({"optimizer": "adamw", "optimizer_dtype": "bf16"}, 4),  # bf16 moments (DeepSeek-V3 style)
        ({"optimizer": "lion", "precision": "pure-bf16"}, 2),  # states follow the bf16 parameters
    ],
)
def test_optimizer_state_bytes_per_parameter(settings, moment_bytes_per_param):
    assert _memory("llama-2-7b", **settings)["optimizer_states"] == moment_bytes_per_param * LLAMA_2_7B


def test_adafactor_factors_the_second_moment_of_every_matrix():
    """Shazeer & Stern 2018: a row and a column accumulator per matrix (fp32), vectors whole. By
    hand for Llama-2-7B (h 4096, f 11008, V 32000, 32 layers, untied): per layer q, k, v, o 4 x
    (4096 + 4096), gate and up 2 x (4096 + 11008), down (11008 + 4096); embedding and head
    2 x (4096 + 32000); vectors: 65 norm weights of 4096."""
    per_layer = 4 * 8192 + 3 * (4096 + 11008)
    elements = 32 * per_layer + 2 * (4096 + 32000) + 65 * 4096
    assert _memory("llama-2-7b", optimizer="adafactor")["optimizer_states"] == 4 * elements


def test_gradient_accumulation_keeps_an_fp32_buffer_under_mixed_precision():
    """DeepSpeed's bf16 optimizer accumulates micro-batch gradients in fp32: +4 B/param, alive
    through forward; the step reads it, so no 16-bit gradient remains at the step."""
    single = _memory("llama-2-7b")
    accumulating = _memory("llama-2-7b", grad_accum=4)
    assert accumulating["gradient_accumulation"] == 4 * LLAMA_2_7B
    assert "gradient_accumulation" not in single
    estimate = estimate_training(resolve_model("llama-2-7b"), TrainSettings(grad_accum=4))
    baseline = estimate_training(resolve_model("llama-2-7b"), TrainSettings())
    static = (2 + 4 + 8 + 4) * LLAMA_2_7B
    assert estimate.phases["forward"] == baseline.phases["forward"] + 4 * LLAMA_2_7B
    # the step: static (with the fp32 buffer) + foreach temporaries of the fp32 moments (4P), no conversion
    assert estimate.phases["optimizer_step"] == static + 4 * LLAMA_2_7B


def test_gradient_accumulation_in_pure_bf16_keeps_the_gradients_through_forward():
    """Without a separate buffer, gradients accumulate in place: they exist during the next forward."""
    once = estimate_training(resolve_model("llama-2-7b"), TrainSettings(precision="pure-bf16"))
    twice = estimate_training(resolve_model("llama-2-7b"), TrainSettings(precision="pure-bf16", grad_accum=2))
    assert twice.phases["forward"] - once.phases["forward"] == 2 * LLAMA_2_7B


def test_optimizer_in_backward_holds_one_gradient_at_a_time():
    """torchtune's optimizer-in-backward: each parameter steps as its gradient appears, so the
    largest gradient is the embedding's (32000 x 4096, bf16), and the step adds a for-loop AdamW's
    two temporaries of that tensor."""
    memory = _memory("llama-2-7b", precision="pure-bf16", optimizer_in_backward=True)
    assert memory["gradients"] == 2 * 32000 * 4096
    assert memory["optimizer_step_temporaries"] == 2 * 2 * 32000 * 4096
    with pytest.raises(ValueError, match="cannot accumulate gradients"):
        TrainSettings(optimizer_in_backward=True, grad_accum=2)
