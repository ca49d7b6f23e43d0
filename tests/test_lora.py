"""LoRA and QLoRA: trainable parameters by hand, state only for adapters, QLoRA's published base
footprints, what autograd keeps for frozen layers (measured), and the estimate against fake-tensor
measurement of the reference decoder with PEFT-style adapters."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memcalc.config import ModelConfig, MoEConfig, Recompute, TrainSettings
from memcalc.errors import InputError
from memcalc.estimate import lora
from memcalc.estimate.activations import ActivationShape
from memcalc.estimate.params import count_params
from memcalc.estimate.training import estimate_training
from memcalc.estimate.weights import weight_bytes
from memcalc.library import resolve_model

ALL = ("q", "k", "v", "o", "gate", "up", "down")


# --- Settings ------------------------------------------------------------------------------------


def test_targets_are_validated_and_ordered():
    assert TrainSettings(lora_rank=8).lora_targets == ("q", "v")  # PEFT's default for Llama
    assert TrainSettings(lora_rank=8, lora_targets="down_proj, q,v").lora_targets == ("q", "v", "down")
    with pytest.raises(ValueError, match="'qkv' is not one of q, k, v, o, gate, up, down"):
        TrainSettings(lora_rank=8, lora_targets=("qkv",))
    with pytest.raises(ValueError, match="lora_rank must be positive"):
        TrainSettings(lora_rank=0)
    with pytest.raises(ValueError, match="qlora"):
        TrainSettings(qlora=True)


def test_gate_on_a_plain_mlp_and_mla_are_refused():
    with pytest.raises(InputError, match="plain MLP without gate_proj"):
        estimate_training(resolve_model("gpt2"), TrainSettings(lora_rank=8, lora_targets=("gate",), dropout=0))
    with pytest.raises(InputError, match="dropout .* not modelled with LoRA; --dropout 0"):
        estimate_training(resolve_model("gpt2"), TrainSettings(lora_rank=8))
    with pytest.raises(InputError, match="multi-head latent attention"):
        estimate_training(resolve_model("deepseek-v2-lite"), TrainSettings(lora_rank=8))
    with pytest.raises(InputError, match="autocast"):
        estimate_training(resolve_model("gpt2"), TrainSettings(lora_rank=8, precision="amp-bf16", dropout=0))


# --- Trainable parameters by hand -----------------------------------------------------------------


def test_llama_2_7b_rank_8_on_q_and_v_is_peft_default_count():
    """32 layers x 2 matrices x 8 x (4096 + 4096): the 4,194,304 PEFT prints for Llama-2-7B."""
    model = resolve_model("llama-2-7b")
    assert lora.trainable_parameters(model, TrainSettings(lora_rank=8)) == 32 * 2 * 8 * (4096 + 4096) == 4_194_304


def test_all_linear_layers_and_experts():
    llama = resolve_model("llama-2-7b")  # h 4096, f 11008
    per_layer = 4 * (4096 + 4096) + 3 * (4096 + 11008)  # q, k, v, o; gate, up, down
    assert lora.trainable_parameters(llama, TrainSettings(lora_rank=64, lora_targets=ALL)) == 32 * 64 * per_layer
    assert 32 * 64 * per_layer == 159_907_840
    mixtral = resolve_model("mixtral-8x7b")  # h 4096, kv 8 x 128, 8 experts of 14336
    attention = 8 * (4096 + 4096) + 8 * (4096 + 1024)  # q and v
    experts = 8 * 3 * 8 * (4096 + 14336)  # every expert's gate, up and down
    settings = TrainSettings(lora_rank=8, lora_targets=("q", "v", "gate", "up", "down"))
    assert lora.trainable_parameters(mixtral, settings) == 32 * (attention + experts) == 116_654_080


# --- State only for adapters ----------------------------------------------------------------------


def test_gradients_and_optimizer_states_only_for_adapters():
    model = resolve_model("llama-2-7b")
    base = count_params(model).total
    a = 4_194_304
    estimate = estimate_training(model, TrainSettings(lora_rank=8, seq_len=512))  # mixed-bf16, fp32 adapters
    component = {c.key: c.bytes for c in estimate.components}
    assert component["weights"] == 2 * base + 4 * a  # frozen bf16 base + fp32 adapters
    assert component["master_weights"] == 0  # fp32 adapters need no master copy
    assert component["gradients"] == 4 * a
    assert component["optimizer_states"] == 8 * a  # AdamW: two fp32 moments
    assert component["optimizer_step_temporaries"] == 4 * a  # foreach: one state-sized list
    assert estimate.settings.lora.trainable_params == a
    assert estimate.component("weights_only").bytes == 4 * a  # the adapter file

    # bf16 adapters (autocast_adapter_dtype=False) under mixed precision: bf16 grads, fp32 master and moments
    bf16 = {c.key: c.bytes for c in estimate_training(
        model, TrainSettings(lora_rank=8, seq_len=512, lora_dtype="bf16")).components}
    assert (bf16["weights"], bf16["gradients"], bf16["master_weights"], bf16["optimizer_states"]) == (
        2 * base + 2 * a, 2 * a, 4 * a, 8 * a)
    # pure bf16 with bf16 adapters: moments zeros_like the bf16 parameter
    pure = {c.key: c.bytes for c in estimate_training(
        model, TrainSettings(lora_rank=8, seq_len=512, lora_dtype="bf16", master_weights=False)).components}
    assert (pure["master_weights"], pure["optimizer_states"]) == (0, 4 * a)


def test_full_fine_tuning_is_unchanged_by_lora_defaults():
    model = resolve_model("llama-3.2-1b")
    assert estimate_training(model, TrainSettings(seq_len=256)).total == estimate_training(
        model, TrainSettings(seq_len=256, lora_targets=ALL)).total


# --- QLoRA base weights ---------------------------------------------------------------------------


def test_qlora_base_is_nf4_double_quant_plus_16_bit_rest():
    model = resolve_model("llama-2-7b")
    estimate = estimate_training(model, TrainSettings(lora_rank=8, qlora=True, seq_len=512))
    nf4 = weight_bytes(model, "bnb-nf4", double_quant=True, compute_dtype="bf16")
    assert estimate.component("weights").bytes == nf4.total_bytes + 4 * 4_194_304
    # embeddings and head (untied, 2 x 32000 x 4096) and norms stay bf16
    assert nf4.rest_bytes == 2 * (2 * 32000 * 4096 + 65 * 4096)


# QLoRA (arXiv:2305.14314) Fig. 6, "Base model" bars, in the paper's MB.
QLORA_FIGURE_6 = {"llama-7b": 5046, "llama-13b": 8476, "llama-30b": 19302, "llama-65b": 37074}
MIB = 2**20


@pytest.mark.parametrize("name", QLORA_FIGURE_6)
def test_qlora_figure_6_base_model(name):
    """The figure's model memory is reproduced by what the paper's qlora.py holds without --bf16:
    NF4 with double quantisation for the linear weights, every other parameter upcast to fp32 by
    peft's prepare_model_for_kbit_training, and the paper's adapters (r = 64 on all linear layers)
    in fp32 -- that is ``memcalc train --qlora --dtype fp32 --lora-rank 64 --lora-targets all``'s
    weights -- with the figure's MB read as MiB (2^20 B): within 5% for all four, within 0.5% for
    13B-65B. Read as 10^6 B the three larger models sit +4.4..4.7% off, the MiB/MB ratio (1.0486).
    A 16-bit rest (the default, as PEFT leaves a model it did not prepare) does not reproduce the
    figure: 11-27% lower."""
    model = resolve_model(name)
    settings = TrainSettings(dtype="fp32", lora_rank=64, lora_targets=ALL, qlora=True, seq_len=512)
    weights = estimate_training(model, settings).component("weights").bytes
    published = QLORA_FIGURE_6[name] * MIB
    assert weights == pytest.approx(published, rel=0.05)
    if name != "llama-7b":
        assert weights == pytest.approx(published, rel=0.005)
    sixteen_bit_rest = weight_bytes(model, "bnb-nf4", double_quant=True, compute_dtype="bf16").total_bytes
    assert sixteen_bit_rest < 0.9 * published


# --- What autograd keeps for frozen layers (measured) ---------------------------------------------

torch = pytest.importorskip("torch")

from memcalc.validate.model import Decoder, LoRALinear, NF4Linear, apply_lora, causal_lm_loss  # noqa: E402
from memcalc.validate.run import TrainWorkload, measure_training  # noqa: E402


def _saved_storages(fn):
    """Bytes of each distinct storage autograd packs while ``fn`` runs (fake tensors)."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return saved


@pytest.mark.parametrize("weight_grad", [True, False])
def test_a_frozen_linear_keeps_no_input(weight_grad):
    """PyTorch's generated autograd code saves mm's input only for the weight gradient."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        weight = torch.randn(96, 64, requires_grad=weight_grad)
        x = torch.randn(2, 32, 64, requires_grad=True) * 1  # a non-leaf that needs a gradient
        saved = _saved_storages(lambda: torch.nn.functional.linear(x, weight))
        keys = set(saved)
        assert (x.untyped_storage()._cdata in keys) is weight_grad
        assert weight.untyped_storage()._cdata in keys  # the input gradient needs the weight


def test_an_adapter_keeps_its_cast_input_and_rank_r_output():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        base = torch.nn.Linear(64, 96, bias=False, dtype=torch.bfloat16)
        base.weight.requires_grad_(False)
        layer = LoRALinear(base, 4, 8, torch.float32)
        x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True) * 1
        params = {p.untyped_storage()._cdata for p in layer.parameters()}
        saved = _saved_storages(lambda: layer(x))
    activations = sorted(nbytes for key, nbytes in saved.items() if key not in params)
    assert activations == [32 * 4 * 4, 32 * 64 * 4]  # lora_A's output (fp32) and the fp32 copy of x


def tiny(**changes) -> ModelConfig:
    base = dict(name="tiny", hidden_size=64, num_layers=3, num_attention_heads=4, num_kv_heads=2,
                intermediate_size=160, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
    return ModelConfig(**(base | changes))


TINY_GPT = dict(mlp="plain", hidden_act="gelu_tanh", norm="layernorm", norm_bias=True, qkv_bias=True,
                attn_output_bias=True, mlp_bias=True, position_embedding="learned", tie_word_embeddings=True,
                num_kv_heads=4)
TINY_MOE = dict(moe=MoEConfig(num_experts=4, experts_per_token=2, expert_intermediate_size=96, num_shared_experts=1))


def _measured_layers(model: ModelConfig, targets, dtype, lora_dtype, attention, qlora=False, tokens=32):
    """Bytes autograd keeps for each layer (fake tensors), by storage; storages saved by more than
    one layer (the rotary cos/sin tables) are left out, as the estimate leaves them out."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with FakeTensorMode():
            decoder = Decoder(model, attention=attention)
            apply_lora(decoder, targets, 4, dtype=lora_dtype, qlora=qlora)
            static = {t.untyped_storage()._cdata for t in [*decoder.parameters(), *decoder.buffers()]}
            per_layer = [dict() for _ in decoder.layers]
            current = [None]
            for index, layer in enumerate(decoder.layers):
                layer.register_forward_pre_hook(lambda module, args, index=index: current.__setitem__(0, index))
                layer.register_forward_hook(lambda module, args, out: current.__setitem__(0, None))

            def pack(tensor):
                key = tensor.untyped_storage()._cdata
                if current[0] is not None and key not in static:
                    per_layer[current[0]][key] = tensor.untyped_storage().nbytes()
                return tensor

            ids = torch.randint(0, model.vocab_size, (1, tokens))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                causal_lm_loss(decoder(ids), ids)
    finally:
        torch.set_default_dtype(previous)
    shared = {key for index, layer in enumerate(per_layer) for key in layer
              if any(key in other for other in per_layer[index + 1:])}
    return [sum(nbytes for key, nbytes in layer.items() if key not in shared) for layer in per_layer]


LAYER_CASES = [
    (tiny(), ("q", "v"), "bf16", "fp32", "sdpa"),
    (tiny(), ("k",), "bf16", "fp32", "sdpa"),
    (tiny(), ("o",), "bf16", "fp32", "sdpa"),
    (tiny(), ("gate",), "bf16", "fp32", "sdpa"),
    (tiny(), ("up",), "bf16", "fp32", "sdpa"),
    (tiny(), ("down",), "bf16", "fp32", "sdpa"),
    (tiny(), ALL, "bf16", "fp32", "sdpa"),
    (tiny(), ALL, "bf16", "bf16", "sdpa"),
    (tiny(), ("o", "up"), "bf16", "bf16", "sdpa"),
    (tiny(), ("q", "v", "down"), "fp32", "fp32", "sdpa"),
    (tiny(), ("q", "v"), "bf16", "fp32", "eager"),
    (tiny(), ("k", "o"), "bf16", "fp32", "eager"),
    (tiny(), ("v",), "fp32", "fp32", "eager"),
    (tiny(qk_norm=True, norms_per_layer=4), ("k", "o", "down"), "bf16", "fp32", "sdpa"),
    (tiny(**TINY_GPT), ("q", "v", "up", "down"), "fp32", "fp32", "sdpa"),
    # (fp32: on the CPU a 16-bit LayerNorm keeps its mean and rstd in 16 bits, on CUDA in fp32)
    (tiny(**TINY_GPT), ("o",), "fp32", "bf16", "sdpa"),
    (tiny(**TINY_MOE), ("q", "v"), "bf16", "fp32", "sdpa"),
    (tiny(**TINY_MOE), ("gate",), "bf16", "fp32", "sdpa"),
    (tiny(**TINY_MOE), ("up", "down"), "bf16", "fp32", "sdpa"),
    (tiny(**TINY_MOE), ("down",), "bf16", "bf16", "sdpa"),
]


@pytest.mark.parametrize(("model", "targets", "dtype", "lora_dtype", "attention"), LAYER_CASES,
                         ids=[f"{i}-{'-'.join(c[1])}" for i, c in enumerate(LAYER_CASES)])
def test_layer_saved_tensors_match_measurement(model, targets, dtype, lora_dtype, attention):
    """Term by term: the first layer (its input needs no gradient) and a later layer keep exactly
    what ``lora.lora_layer`` counts."""
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}
    measured = _measured_layers(model, targets, torch_dtype[dtype], torch_dtype[lora_dtype], attention)
    e, a = (2 if dtype == "bf16" else 4), (2 if lora_dtype == "bf16" else 4)
    shape = ActivationShape(tokens=32, seq_len=32, batch_size=1, element_bytes=e, stream_bytes=e, autocast=False)
    settings = TrainSettings(lora_rank=4, lora_targets=targets)
    moe = model.moe is not None
    first = lora.lora_layer(model, shape, attention, Recompute.NONE, settings, a, moe, input_grad=False)
    later = lora.lora_layer(model, shape, attention, Recompute.NONE, settings, a, moe, input_grad=True)
    assert (first.saved, later.saved) == (measured[0], measured[1])
    assert measured[2] == measured[1]


def test_nf4_simulation_stores_what_bitsandbytes_stores():
    from memcalc.estimate.weights import tensor_bytes
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        layer = NF4Linear(torch.nn.Linear(2048, 512, bias=False, dtype=torch.bfloat16), torch.bfloat16)
        stored = sum(t.untyped_storage().nbytes() for t in [*layer.parameters(), *layer.buffers()])
    assert stored == sum(tensor_bytes("bnb-nf4", 2048, 512, double_quant=True).values())


def test_nf4_dequantises_close_to_the_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=False)
    quantised = NF4Linear(linear, torch.float32)
    x = torch.randn(8, 256)
    error = (quantised(x) - linear(x)).norm() / linear(x).norm()
    assert error < 0.15  # 4-bit NF4 with 64-value blocks on a uniform init


# --- Estimate against measurement -----------------------------------------------------------------


def _layers(name: str, layers: int, **changes) -> ModelConfig:
    base = resolve_model(name)
    moe = base.moe and replace(base.moe, first_dense_layers=0)
    return replace(base, num_layers=layers, moe=moe, **changes)


CASES = [
    # the loss peaks (a real vocabulary)
    (_layers("llama-3.2-1b", 2), dict(precision="mixed-bf16", seq_len=256, lora_rank=8)),
    # a small vocabulary: peaks inside the last layer's MLP, the final norm's backward
    (_layers("llama-3.2-1b", 2, vocab_size=1024), dict(precision="pure-bf16", seq_len=256, lora_rank=8,
                                                         lora_targets=ALL)),
    (_layers("llama-3.2-1b", 2, vocab_size=1024), dict(precision="mixed-bf16", seq_len=128, batch_size=2,
                                                         lora_rank=8, lora_targets=("down",))),
    # QLoRA: the dequantised weights' transients
    (_layers("llama-2-7b", 2), dict(precision="mixed-bf16", seq_len=128, lora_rank=16, qlora=True)),
    (_layers("llama-3.2-1b", 2, vocab_size=1024), dict(precision="mixed-bf16", seq_len=256, lora_rank=8,
                                                         lora_targets=ALL, qlora=True)),
    # same-dtype adapters with master weights, eager attention under selective recompute
    (_layers("llama-3.2-1b", 2, vocab_size=1024), dict(precision="mixed-bf16", seq_len=256, lora_rank=8,
                                                         lora_dtype="bf16", attention="eager",
                                                         recompute="selective")),
    (_layers("llama-3.2-1b", 2, vocab_size=1024), dict(precision="mixed-bf16", seq_len=256, lora_rank=8,
                                                         recompute="full", lora_targets=("q", "v", "up"))),
    (_layers("gpt2", 2, vocab_size=1024, attention_dropout=0.0, embedding_dropout=0.0, residual_dropout=0.0), dict(precision="fp32", seq_len=128, lora_rank=8,
                                                 lora_targets=("q", "v", "up", "down"))),
    (_layers("mixtral-8x7b", 2), dict(precision="pure-bf16", seq_len=128, lora_rank=8,
                                      lora_targets=("q", "v", "gate", "up", "down"))),
]


@pytest.mark.parametrize(("model", "settings"), [CASES[i] for i in (0, 2, 3, 6, 8)],
                         ids=[f"{CASES[i][0].name}-{i}" for i in (0, 2, 3, 6, 8)])
def test_lora_dropout_matches_fake_measurement(model, settings):
    """PEFT's lora_dropout 0.1 (CUDA's rule: native_dropout's 1-byte mask; each adapter keeps its own
    dropped copy of its input, and its input's cast copy lives until the adapter's forward returns):
    the total within 1%, activations within 4% (the in-MLP peaks of a 1,024-token vocabulary run
    over by up to 3.4%; a real vocabulary's loss peak is within 0.3%)."""
    settings = dict(settings, lora_dropout=0.1)
    estimate = estimate_training(model, TrainSettings(**settings))
    workload = {key: (value.value if hasattr(value, "value") else value) for key, value in settings.items()}
    measured = measure_training(model, TrainWorkload(**workload), "fake")
    assert estimate.component("activations").bytes == pytest.approx(measured.components["activations"], rel=0.04)
    assert estimate.total == pytest.approx(measured.total, rel=0.01)


@pytest.mark.parametrize(("model", "settings"), CASES, ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)])
def test_estimate_matches_fake_measurement(model, settings):
    """Activations within 0.5% (what remains is the rotary cos/sin tables, 2 x s x d_head x e);
    state exact: weights but for the decoder's inv_freq buffer, gradients, master weights, and the
    optimizer's moments but for torch.optim's per-tensor fp32 step counter."""
    estimate = estimate_training(model, TrainSettings(**settings))
    workload = {key: (value.value if hasattr(value, "value") else value) for key, value in settings.items()}
    measured = measure_training(model, TrainWorkload(**workload), "fake")
    inv_freq = 4 * model.attention_head_dim // 2  # the reference decoder's rotary buffer (fp32)
    assert measured.components["weights"] - estimate.component("weights").bytes == inv_freq
    for key in ("gradients", "master_weights"):
        assert estimate.component(key).bytes == measured.components[key], key
    tensors = len(lora.adapter_sizes_in_order(model, TrainSettings(**settings)))  # every lora_A and lora_B
    steps = 4 * tensors if settings.get("optimizer", "adamw").startswith("adam") else 0
    assert measured.components["optimizer_states"] - estimate.component("optimizer_states").bytes == steps
    assert estimate.component("activations").bytes == pytest.approx(measured.components["activations"], rel=0.005)
    assert estimate.total == pytest.approx(measured.total, rel=0.005)


@pytest.mark.parametrize("qlora", [False, True])
def test_fake_and_real_cpu_runs_measure_the_same(qlora):
    """The NF4 simulation and the adapters run on real tensors as on fake ones."""
    workload = TrainWorkload(precision="mixed-bf16", seq_len=32, batch_size=2, lora_rank=4, lora_targets=ALL,
                             qlora=qlora)
    model = tiny(num_layers=2)
    fake = measure_training(model, workload, "fake")
    real = measure_training(model, workload, "cpu")
    assert fake.components == real.components
    assert {k: v.peak_bytes for k, v in fake.phases.items()} == {k: v.peak_bytes for k, v in real.phases.items()}


def test_only_adapters_get_gradients_in_the_measured_step():
    model = tiny(num_layers=2)
    settings = TrainSettings(precision="pure-bf16", seq_len=32, lora_rank=4, lora_targets=ALL)
    measured = measure_training(model, TrainWorkload(precision="pure-bf16", seq_len=32, lora_rank=4,
                                                     lora_targets=ALL), "fake")
    trainable = lora.trainable_parameters(model, settings)
    assert measured.components["gradients"] == 4 * trainable  # fp32 adapters
    assert measured.components["master_weights"] == 0


def test_lora_on_gpt2s_16_bit_eager_softmax_is_refused():
    """GPT-2's eager softmax runs in 16 bits; the LoRA model is written for fp32 softmaxes."""
    with pytest.raises(InputError, match="softmax runs in 16 bits"):
        estimate_training(resolve_model("gpt2"), TrainSettings(lora_rank=8, dropout=0, precision="pure-bf16",
                                                               attention="eager"))
