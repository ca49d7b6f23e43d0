"""Parallel layouts (memcalc.parallel, estimate_training with a ParallelConfig) against published
figures and hand derivations: ZeRO paper Table 1, Korthikanti et al. 2022 Figure 1, DeepSpeed's
ZeRO-3 estimator vectors, a Megatron-LM measured run, Megatron's distributed-optimizer table,
pipeline and tensor-parallel rules, and the one-line layout errors.

Sources are summarised, with the files read, in /work/shared/reference/training.md (sections
given per test)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from memcalc.config import ModelConfig, TrainSettings
from memcalc.errors import SettingsError
from memcalc.estimate.activations import output_layer_activation_bytes
from memcalc.estimate.params import count_params
from memcalc.estimate.training import estimate_training
from memcalc.library import resolve_model
from memcalc.parallel import ParallelConfig, largest_unit_params, padded_vocab, stage_layers

GIB = 2**30
MODEL_STATES = ("weights", "gradients", "master_weights", "optimizer_states")
LLAMA_2_7B_PARAMS = 6_738_415_616


def _components(view) -> dict[str, int]:
    return {component.key: component.bytes for component in view.components}


def _model_states(view) -> int:
    memory = _components(view)
    return sum(memory[key] for key in MODEL_STATES)


# --- 1. ZeRO paper (Rajbhandari et al. 2020, arXiv:1910.02054) Table 1 -------------------------------

# Per-device model-state memory in decimal GB for mixed-precision Adam (K = 12), as printed:
# N_d -> {Psi: (P_os, P_os+g, P_os+g+p)} (reference sec. 3.3). The paper rounds (0.12 for 0.117)
# and sometimes truncates (513 for 513.5, 2218 for 2218.75).
ZERO_TABLE_1 = {
    1: {"7.5e9": ("120", "120", "120"), "128e9": ("2048", "2048", "2048"), "1e12": ("16000", "16000", "16000")},
    4: {"7.5e9": ("52.5", "41.3", "30"), "128e9": ("896", "704", "512"), "1e12": ("7000", "5500", "4000")},
    16: {"7.5e9": ("35.6", "21.6", "7.5"), "128e9": ("608", "368", "128"), "1e12": ("4750", "2875", "1000")},
    64: {"7.5e9": ("31.4", "16.6", "1.88"), "128e9": ("536", "284", "32"), "1e12": ("4187", "2218", "250")},
    256: {"7.5e9": ("30.4", "15.4", "0.47"), "128e9": ("518", "263", "8"), "1e12": ("4046", "2054", "62.5")},
    1024: {"7.5e9": ("30.1", "15.1", "0.12"), "128e9": ("513", "257", "2"), "1e12": ("4011", "2013", "15.6")},
}
ZERO_CELLS = [
    pytest.param(n, psi, stage, printed, id=f"psi{psi}-N{n}-zero{stage}")
    for n, by_psi in ZERO_TABLE_1.items()
    for psi, row in by_psi.items()
    for stage, printed in zip((1, 2, 3), row, strict=True)
]
assert len(ZERO_CELLS) == 54


@pytest.fixture(scope="module")
def zero_bytes_per_param():
    """Per-rank model-state bytes per parameter of Llama-2-7B under mixed-fp16, by (N_d, stage)."""
    model = resolve_model("llama-2-7b")
    assert count_params(model).total == LLAMA_2_7B_PARAMS
    settings = TrainSettings(precision="mixed-fp16", seq_len=128, batch_size=1)
    return {
        (n, stage): _model_states(estimate_training(model, settings, ParallelConfig(dp=n, zero=stage)))
        / LLAMA_2_7B_PARAMS
        for n in ZERO_TABLE_1 for stage in (1, 2, 3)
    }


@pytest.mark.parametrize(("n", "psi", "stage", "printed"), ZERO_CELLS)
def test_zero_paper_table_1(zero_bytes_per_param, n, psi, stage, printed):
    """Each cell within 0.5 % or within one unit of its last printed digit (rounded or truncated)."""
    value_gb = zero_bytes_per_param[n, stage] * float(psi) / 1e9
    last_digit = float(Decimal(1).scaleb(Decimal(printed).as_tuple().exponent))
    assert value_gb == pytest.approx(float(printed), rel=0.005, abs=last_digit)


@pytest.mark.parametrize("n", [4, 64, 1024])
def test_zero_paper_formulas_exactly(zero_bytes_per_param, n):
    """ZeRO sec. 5 formulas, K = 12: P_os 4 + K/N_d, P_os+g 2 + (2 + K)/N_d, P_os+g+p (4 + K)/N_d bytes
    per parameter (Llama-2-7B's P is a multiple of 1024, so no shard is rounded)."""
    assert zero_bytes_per_param[n, 1] == 4 + 12 / n
    assert zero_bytes_per_param[n, 2] == 2 + 14 / n
    assert zero_bytes_per_param[n, 3] == 16 / n


# --- 2. Korthikanti et al. 2022 (arXiv:2205.05198) Figure 1 ------------------------------------------

# name, h, a, L, t, p, v, b; seq 2048, V 51200 (reference sec. 4.4, Calculon's validation inputs).
# Figure 1 GiB per GPU: params + optimizer, activations TP baseline, activations SP + selective.
KORTHIKANTI_FIGURE_1 = [
    pytest.param(6144, 64, 48, 8, 1, 1, 4, 45.56, 59.25, 9.56, id="22B"),
    pytest.param(12288, 96, 96, 8, 8, 3, 1, 45.56, 66.84, 12.35, id="175B"),
    pytest.param(20480, 128, 105, 8, 35, 3, 1, 31.64, 114.02, 23.08, id="530B"),
    pytest.param(25600, 160, 128, 8, 64, 1, 1, 32.96, 131.25, 26.56, id="1T"),
]


def _gpt(h: int, a: int, layers: int) -> ModelConfig:
    return ModelConfig(
        name=f"gpt-h{h}", hidden_size=h, num_layers=layers, num_attention_heads=a, intermediate_size=4 * h,
        vocab_size=51200, max_position_embeddings=2048, tie_word_embeddings=True, mlp="plain", hidden_act="gelu",
        norm="layernorm", norm_bias=True, qkv_bias=True, attn_output_bias=True, mlp_bias=True,
        position_embedding="learned",
    )


def _korthikanti(h, a, layers, t, p, v, b, selective: bool):
    model = _gpt(h, a, layers)
    settings = TrainSettings(activation_model="megatron", attention="eager", precision="megatron-bf16", seq_len=2048,
                             batch_size=b, recompute="selective" if selective else "none")
    parallel = ParallelConfig(tp=t, pp=p, vpp=v, sp=selective)
    return model, parallel, estimate_training(model, settings, parallel)


@pytest.mark.parametrize(("h", "a", "layers", "t", "p", "v", "b", "states", "baseline", "sp_selective"),
                         KORTHIKANTI_FIGURE_1)
@pytest.mark.parametrize("selective", [False, True], ids=["tp-baseline", "sp-selective"])
def test_korthikanti_figure_1_activations(h, a, layers, t, p, v, b, states, baseline, sp_selective, selective):
    """Activations of the most loaded rank (the first pipeline stage, or the only one). The figure
    counts transformer layers only; with p = 1 that rank also holds the output layer and its logits
    (sec. 4.3), so that term is taken off for the 22B model. With p > 1 the first stage has no
    output layer, and holds L layers' worth (1F1B) or L (1 + (p - 1)/(p v)) (interleaved)."""
    model, parallel, estimate = _korthikanti(h, a, layers, t, p, v, b, selective)
    activations = estimate.component("activations").bytes
    if p == 1:
        activations -= output_layer_activation_bytes(2048, b, h, padded_vocab(model, parallel), 2, tp=t, sp=selective)
    else:
        assert estimate.settings.parallel.most_loaded_rank == "first stage"
    expected = sp_selective if selective else baseline
    assert activations / GIB == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize(("h", "a", "layers", "t", "p", "v", "b", "states", "baseline", "sp_selective"),
                         KORTHIKANTI_FIGURE_1)
def test_korthikanti_figure_1_params_and_optimizer(h, a, layers, t, p, v, b, states, baseline, sp_selective):
    """18 B/param (bf16 weights, fp32 main grads, fp32 master and moments) of the first stage's
    transformer layers: the figure counts 12 h^2 per layer / (t p) and no embedding, so the first
    stage's embedding rows (V h / t, vocabulary split by TP) and its whole 2048 x h position table
    are taken off. 0.2 % tolerance: biases and norms are not in the paper's 12 h^2."""
    model, parallel, estimate = _korthikanti(h, a, layers, t, p, v, b, selective=False)
    first = estimate.ranks[0]
    assert first.name in ("first stage", "all ranks") and first.pipeline_rank == 0
    assert padded_vocab(model, parallel) == 51200  # already a multiple of 128 x 8
    embedding = 18 * (51200 * h // t + 2048 * h)
    assert (_model_states(first) - embedding) / GIB == pytest.approx(states, rel=0.002)


# --- 3. DeepSpeed estimate_zero3_model_states_mem_needs (docs/code-docs/source/memory.rst) ----------


def _t5_3b_sized() -> ModelConfig:
    """A decoder with t5-3b's Psi = 2851M and largest unit Lambda = 32M (the tied embedding).

    h = 1000, V = 32,000 tied: embedding 32,000,000 (the largest unit: every layer is smaller).
    Final LayerNorm with bias: 2,000. Per layer (8 heads, no Q/K/V bias, output bias, plain MLP
    without biases, f = 9184): attention 4 h^2 + h = 4,001,000; two LayerNorms 4 h = 4,000;
    MLP 2 h f = 18,368,000; together 22,373,000. Solving 2,851,000,000 - 32,002,000 =
    2,818,998,000 = L x 22,373,000 gives L = 126, exactly."""
    return ModelConfig(
        name="t5-3b-sized", hidden_size=1000, num_layers=126, num_attention_heads=8, intermediate_size=9184,
        vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=True, mlp="plain", norm="layernorm",
        norm_bias=True, attn_output_bias=True,
    )


# DeepSpeed memory.rst, t5-3b on 1 node x 8 GPUs, ZeRO-3 (reference sec. 3.2): GPU 4 Lambda + 18 Psi / N
# (no offload), 4 Lambda + 2 Psi / N (offload optimizer), 4 Lambda (offload both); CPU with
# zero_init=1: 16 Psi x 1.5 and 18 Psi x 1.5 (printed GiB; none for no offload).
DEEPSPEED_T5_3B = [
    pytest.param("none", 6.09, None, id="no-offload"),
    pytest.param("optimizer", 0.78, 63.72, id="offload-optimizer"),
    pytest.param("both", 0.12, 71.69, id="offload-both"),
]


def test_t5_3b_sized_model_has_psi_and_lambda():
    model = _t5_3b_sized()
    assert count_params(model).total == 2_851_000_000
    parallel = ParallelConfig(dp=8, zero=3)
    assert largest_unit_params(model, parallel, stage_layers(model, parallel, 0)) == 32_000_000


@pytest.mark.parametrize(("offload", "gpu_gib", "cpu_gib"), DEEPSPEED_T5_3B)
def test_deepspeed_zero3_estimator_vectors(offload, gpu_gib, cpu_gib):
    """memcalc's megatron-bf16 is DeepSpeed's 18 B/param (2 fp16 param + 4 fp32 grad + 12), and
    prefetch=0 is its 4 Lambda working set (2 B gathered params + 2 B grads of the largest unit).
    Compared: the GPU-resident model states plus the sharding working set (DeepSpeed counts no
    activations or optimizer-step temporaries), and the CPU-resident model states of one rank x 8
    ranks x DeepSpeed's 1.5 buffer factor."""
    parallel = ParallelConfig(dp=8, zero=3, offload=offload, prefetch=0)
    estimate = estimate_training(_t5_3b_sized(), TrainSettings(precision="megatron-bf16", seq_len=128, batch_size=1),
                                 parallel)
    states_and_working_set = (*MODEL_STATES, "sharding_working_set")
    gpu = sum(c.bytes for c in estimate.components if c.location == "gpu" and c.key in states_and_working_set)
    cpu = sum(c.bytes for c in estimate.components if c.location == "cpu" and c.key in MODEL_STATES)
    if offload == "none":
        # without offload memcalc follows DeepSpeed's own coordinator and buffers, measured in
        # tests/test_deepspeed.py, not the estimator's 4 Lambda: the model states are its 18 Psi / N
        states = sum(c.bytes for c in estimate.components if c.location == "gpu" and c.key in MODEL_STATES)
        gpu = states + 4 * 32_000_000
    assert gpu / GIB == pytest.approx(gpu_gib, abs=0.005)
    if cpu_gib is None:
        assert estimate.cpu_total == 0
    else:
        assert cpu * 8 * 1.5 / GIB == pytest.approx(cpu_gib, abs=0.005)
        # cpu_total also carries the CPU optimizer step's temporaries, which DeepSpeed leaves out
        assert estimate.cpu_total >= cpu


# --- 4. Megatron-LM gpt3_7b_tp4_pp1_memory_speed (reference sec. 2.6 and sec. 6 row 1) -------------


def _megatron_gpt_7b() -> ModelConfig:
    return ModelConfig(
        name="megatron-gpt-7b", hidden_size=4096, num_layers=32, num_attention_heads=32, num_kv_heads=8,
        intermediate_size=16384, vocab_size=131073, max_position_embeddings=8192, tie_word_embeddings=False,
        mlp="plain", hidden_act="gelu", norm="layernorm", norm_bias=True, qkv_bias=True, attn_output_bias=True,
        mlp_bias=True, position_embedding="learned",
    )


def test_megatron_gpt_7b_tp4_dp2_measured_run():
    """H100 golden values: 20.66e9 B allocated after the step (static state), 57.14e9 B peak.
    bf16 with the distributed optimizer: fp32 main grads (megatron-bf16), master and moments / 2."""
    parallel = ParallelConfig(dp=2, tp=4, distributed_optimizer=True, microbatches=2)
    estimate = estimate_training(_megatron_gpt_7b(), TrainSettings(batch_size=2, seq_len=8192, attention="flash"),
                                 parallel)
    assert estimate.settings.precision == "megatron-bf16"
    assert estimate.settings.parallel.vocab_size_padded == 131584  # 131073 up to a multiple of 128 x 4
    assert estimate.component("gradients").formula.startswith("P x fp32")

    # Hand count of one TP rank's parameters (h 4096, head_dim 128, K/V width 1024, f 16384, t 4):
    # per layer Q 4096^2/4 + 1024 bias; K, V 4096*1024/4 + 256 bias each; O 4096^2/4 + 4096 bias
    # (row-parallel: whole); up 4096*16384/4 + 4096 bias; down 16384*4096/4 + 4096 bias (whole);
    # two LayerNorms 4 * 4096. Ends: embedding and output layer 131584 * 4096 / 4 each, position
    # table 8192 * 4096 (whole), final LayerNorm 2 * 4096.
    per_layer = (4096**2 // 4 + 1024) + 2 * (4096 * 1024 // 4 + 256) + (4096**2 // 4 + 4096) \
        + (4096 * 16384 // 4 + 4096) + (16384 * 4096 // 4 + 4096) + 4 * 4096
    rank_params = 32 * per_layer + 2 * 131584 * 4096 // 4 + 8192 * 4096 + 2 * 4096
    assert rank_params == 1_713_299_456
    memory = _components(estimate)
    assert memory["weights"] == 2 * rank_params
    assert memory["gradients"] == 4 * rank_params
    assert memory["master_weights"] + memory["optimizer_states"] == 12 * rank_params // 2
    static = _model_states(estimate)
    assert static == pytest.approx(20.66e9, rel=0.05)
    assert estimate.total == pytest.approx(57.14e9, rel=0.05)


# --- 5. Megatron-LM docs/user-guide/features/dist_optimizer.md bytes/param (reference sec. 2.2) -----


@pytest.mark.parametrize(
    ("precision", "distributed", "d", "bytes_per_param"),
    [
        # bf16 params, fp32 main grads: 18 non-distributed; 6 + 12/d distributed.
        ("megatron-bf16", False, 8, 18),
        ("megatron-bf16", True, 1, 6 + 12 / 1),
        ("megatron-bf16", True, 2, 6 + 12 / 2),
        ("megatron-bf16", True, 8, 6 + 12 / 8),
        ("megatron-bf16", True, 64, 6 + 12 / 64),
        # --distributed-optimizer with bf16 and no named recipe implies fp32 main grads
        (None, True, 8, 6 + 12 / 8),
        # fp32 params and grads: 16 non-distributed; 8 + 8/d distributed (no master copy).
        ("fp32", False, 8, 16),
        ("fp32", True, 2, 8 + 8 / 2),
        ("fp32", True, 64, 8 + 8 / 64),
    ],
)
def test_distributed_optimizer_bytes_per_param(precision, distributed, d, bytes_per_param):
    parallel = ParallelConfig(dp=d, distributed_optimizer=distributed)
    estimate = estimate_training(resolve_model("llama-2-7b"),
                                 TrainSettings(precision=precision, seq_len=128, batch_size=1), parallel)
    assert _model_states(estimate) / LLAMA_2_7B_PARAMS == bytes_per_param


# --- 6. Pipeline parallelism (Narayanan et al. 2021; Korthikanti et al. 2022 sec. 4.2.3) ------------

# Llama-2-7B at s = 1024, b = 1, bf16, Korthikanti's model without recompute:
# sbh = 1024 * 4096 = 4,194,304; 5as/h = 5 * 32 * 1024 / 4096 = 40 -> 74 sbh per layer.
PER_LAYER = 4_194_304 * 74
# Output layer on the last stage: final-norm input + output-layer input 2 * 2 sbh, fp32 logits 4 s b V.
OUTPUT_LAYER = 4 * 4_194_304 + 4 * 1024 * 32000


def _pipeline(parallel: ParallelConfig, name: str = "llama-2-7b"):
    settings = TrainSettings(activation_model="megatron", recompute="none", seq_len=1024, batch_size=1)
    return estimate_training(resolve_model(name), settings, parallel)


@pytest.mark.parametrize(
    ("pp", "vpp", "microbatches", "first_layers", "last_layers"),
    [
        # 1F1B: rank r holds min(p - r, m) micro-batches of its L/p = 32/p layers.
        (4, 1, None, 4 * 8, 1 * 8),  # enough micro-batches: p in flight on the first stage
        (4, 1, 8, 4 * 8, 1 * 8),
        (4, 1, 2, 2 * 8, 1 * 8),  # m < p: only m in flight
        (4, 1, 1, 1 * 8, 1 * 8),
        (2, 1, None, 2 * 16, 1 * 16),
        # Interleaved (v chunks of L/(p v) layers): the first rank holds L (1 + (p - 1)/(p v)) layers
        # (Korthikanti sec. 4.2.3): 32 * (1 + 3/8) = 44. The last rank: Megatron's warm-up
        # (v - 1) p chunks plus the one in steady state, (4 + 1) chunks of 4 layers.
        (4, 2, None, 44, 5 * 4),
        (4, 2, 8, 44, 5 * 4),
        # m = p: Megatron runs every forward first (all_warmup_microbatches), m v = 8 chunks of 4
        (4, 2, 4, 8 * 4, 5 * 4),
        (2, 4, None, 32 * (1 + 1 / 8), (3 * 2 + 1) * 4),  # 36 layers; 7 chunks of 4
    ],
)
def test_pipeline_activations_per_stage(pp, vpp, microbatches, first_layers, last_layers):
    estimate = _pipeline(ParallelConfig(pp=pp, vpp=vpp, microbatches=microbatches))
    first, last = estimate.ranks
    assert (first.name, first.pipeline_rank) == ("first stage", 0)
    assert (last.name, last.pipeline_rank) == ("last stage", pp - 1)
    assert _components(first)["activations"] == first_layers * PER_LAYER
    assert _components(last)["activations"] == last_layers * PER_LAYER + OUTPUT_LAYER
    assert estimate.total == max(first.total, last.total)
    busiest = first if first.total >= last.total else last
    assert estimate.settings.parallel.most_loaded_rank == busiest.name
    assert estimate.components == busiest.components


def test_pipeline_ends_untied():
    """Llama-2-7B (untied), pp 2: the first stage holds the embedding V h and layers 0-15, the last
    layers 16-31, the final RMSNorm h and the output layer V h. Per layer: 4 h^2 attention +
    3 h 11008 MLP + 2 h norms = 202,383,360."""
    h, vocab = 4096, 32000
    per_layer = 4 * h * h + 3 * h * 11008 + 2 * h
    first, last = _pipeline(ParallelConfig(pp=2)).ranks
    assert first.parameters == vocab * h + 16 * per_layer
    assert last.parameters == 16 * per_layer + h + vocab * h
    assert first.parameters + last.parameters == LLAMA_2_7B_PARAMS
    assert _components(first)["weights"] == 2 * first.parameters


def test_pipeline_tied_embedding_has_a_copy_on_the_last_stage():
    """Llama-3.2-1B (tied), pp 2: Megatron keeps a copy of the tied embedding on the last stage for
    the output layer. Per layer: Q, O 2048^2 each, K, V 2048 * 512 each, gated MLP 3 * 2048 * 8192,
    two RMSNorms 2 * 2048 = 60,821,504; embedding 128256 * 2048 = 262,668,288."""
    per_layer = 2 * 2048**2 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
    embedding = 128256 * 2048
    estimate = _pipeline(ParallelConfig(pp=2), "llama-3.2-1b")
    first, last = estimate.ranks
    assert first.parameters == embedding + 8 * per_layer
    assert last.parameters == 8 * per_layer + 2048 + embedding
    assert first.parameters + last.parameters == count_params(resolve_model("llama-3.2-1b")).total + embedding
    # the copy has its own weights, gradients, master weights and moments: 16 B/param in mixed bf16
    assert _model_states(last) == 16 * last.parameters


# --- 7. Tensor parallelism on parameters (Shoeybi et al. 2019) --------------------------------------


def test_tp_splits_linears_and_vocabulary_but_not_norms():
    """Llama-2-7B at tp 2: the norms (2 per layer + final, 65 x 4096) stay whole; the embedding and
    output layer are split by vocabulary (32000 is already a multiple of 256); every other tensor
    is halved."""
    norms = 65 * 4096
    embedding = head = 32000 * 4096
    expected = (LLAMA_2_7B_PARAMS - norms - embedding - head) // 2 + norms + embedding // 2 + head // 2
    assert expected == 3_369_340_928
    estimate = estimate_training(resolve_model("llama-2-7b"), TrainSettings(seq_len=128, batch_size=1),
                                 ParallelConfig(tp=2))
    (view,) = estimate.ranks
    assert view.parameters == expected
    assert _components(view)["weights"] == 2 * expected


def test_tp_keeps_row_parallel_biases_and_position_table_whole():
    """GPT-2 at tp 2 (vocabulary padded to 50432): Q/K/V and up weights and biases halved; O and
    down weights halved, their biases whole; LayerNorms and the 1024 x 768 position table whole."""
    h = 768
    per_layer = (3 * h * h + 3 * h) // 2 + (h * h // 2 + h) + (h * 3072 + 3072) // 2 + (3072 * h // 2 + h) + 4 * h
    expected = 12 * per_layer + 50432 * h // 2 + 1024 * h + 2 * h
    estimate = estimate_training(resolve_model("gpt2"), TrainSettings(seq_len=128, batch_size=1),
                                 ParallelConfig(tp=2))
    assert estimate.ranks[0].parameters == expected


@pytest.mark.parametrize(
    ("tp", "pad_vocab", "expected"),
    [
        # Megatron pads to a multiple of 128 x TP (make_vocab_size_divisible_by), by default when TP > 1.
        (1, None, 50257),  # no padding by default on one rank
        (1, True, 50304),  # 393 x 128
        (2, None, 50432),  # 197 x 256
        (4, None, 50688),  # 99 x 512
        (8, True, 51200),  # 50 x 1024 (padding only: GPT-2's 12 heads do not split 8 ways)
        (4, False, 50257),
    ],
)
def test_vocabulary_padding(tp, pad_vocab, expected):
    model = resolve_model("gpt2")
    parallel = ParallelConfig(tp=tp, pad_vocab=pad_vocab)
    assert padded_vocab(model, parallel) == expected
    if 12 % tp:
        return
    estimate = estimate_training(model, TrainSettings(seq_len=128, batch_size=1), parallel)
    if tp == 1:
        # the padded rows are real parameters of the (tied) embedding: (expected - 50257) x 768 more
        extra = (expected - 50257) * 768
        assert estimate.component("weights").bytes == 2 * (count_params(model).total + extra)
    else:
        assert estimate.settings.parallel.vocab_size_padded == expected


# --- 8. One-line layout errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layout", "settings", "fields", "flag"),
    [
        ("llama-2-7b", {"tp": 3}, {}, ("tp",), "--tp 3"),  # 32 heads
        ("llama-3.2-1b", {"tp": 16}, {}, ("tp",), "--tp 16"),  # 32 heads divide, 8 key/value heads do not
        # 32 layers; the message suggests the uneven-stage settings
        ("llama-2-7b", {"pp": 3}, {}, ("pp", "vpp", "pp_layers", "pp_first_layers", "pp_last_layers"), "--pp 3"),
        ("llama-2-7b", {"pp": 4, "vpp": 3}, {}, ("pp", "vpp", "pp_first_layers", "pp_last_layers"),
         "--pp 4 x --vpp 3"),  # 12 does not divide 32
        ("llama-2-7b", {"vpp": 2}, {}, ("vpp", "pp"), "--vpp"),  # no pipeline
        ("llama-2-7b", {"dp": 2, "ep": 2}, {}, ("ep",), "--ep 2"),  # dense model
        ("mixtral-8x7b", {"dp": 3, "ep": 3}, {}, ("ep",), "--ep 3"),  # 8 experts
        ("llama-2-7b", {"cp": 2}, {"attention": "eager"}, ("cp", "attention"), "--cp"),
        ("llama-2-7b", {"dp": 2, "zero": 1, "distributed_optimizer": True}, {}, ("distributed_optimizer", "zero"),
         "--distributed-optimizer"),
        ("llama-2-7b", {"dp": 2, "zero": 2, "offload": "params"}, {}, ("offload", "zero"), "--offload params"),
        ("llama-2-7b", {"dp": 2, "pp": 2, "zero": 2}, {}, ("zero", "pp"), "--zero 2"),
        ("llama-2-7b", {"tp": 2, "sp": True}, {"seq_len": 1023}, ("sp", "tp"), "--sp"),
    ],
)
def test_layout_errors_are_one_line_and_name_the_flag(name, layout, settings, fields, flag):
    """The error names the settings at fault structurally (the first is the one to change); the CLI
    writes them as its flags."""
    from memcalc.cli import flag_of

    with pytest.raises(SettingsError) as error:
        estimate_training(resolve_model(name), TrainSettings(**({"seq_len": 128} | settings)), ParallelConfig(**layout))
    assert error.value.fields == fields
    message = error.value.describe(flag_of)
    assert message.startswith(flag)
    assert "\n" not in message


def test_non_positive_degree_is_an_input_error():
    with pytest.raises(SettingsError, match="dp must be positive") as error:
        ParallelConfig(dp=0)
    assert error.value.fields == ("dp",)
