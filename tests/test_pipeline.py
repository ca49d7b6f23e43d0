"""Uneven pipeline stages (issue 14, item 5): Megatron-LM's layer assignment, the settings and
their one-line errors, the busiest rank, and each rank's memory measured under the 1F1B schedule
(memcalc.validate.pipeline, fake tensors) against the estimator's figure for that rank.

Sources: Megatron-LM ``megatron/core/transformer/transformer_block.py`` (``get_num_layers_to_build``),
``transformer_layer.py`` (``get_transformer_layer_offset``) and its unit test
``tests/unit_tests/transformer/test_transformer_layer.py::test_get_layer_offset_parametrized``;
``megatron/core/pipeline_parallel/schedules.py`` (``forward_backward_pipelining_without_interleaving``).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from memcalc.config import TrainSettings
from memcalc.errors import SettingsError
from memcalc.estimate.params import count_params
from memcalc.estimate.training import estimate_pipeline_rank, estimate_training
from memcalc.library import resolve_model
from memcalc.parallel import (
    ParallelConfig,
    inflight_chunks,
    pipeline_ranks,
    rank_params,
    stage_layer_counts,
    stage_layers,
)

# --- 1. Megatron's rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "first", "last", "offsets"),
    [
        # Megatron's test_get_layer_offset_parametrized, pp 4, vpp 2: (rank, chunk) -> first layer
        (30, 8, 10, {(0, 0): 0, (0, 1): 15, (1, 0): 4, (1, 1): 19, (2, 0): 7, (2, 1): 22, (3, 0): 10, (3, 1): 25}),
        (26, 8, None, {(0, 0): 0, (0, 1): 13, (1, 0): 4, (1, 1): 17, (2, 0): 7, (2, 1): 20, (3, 0): 10, (3, 1): 23}),
        (26, None, 8, {(0, 0): 0, (0, 1): 13, (1, 0): 3, (1, 1): 16, (2, 0): 6, (2, 1): 19, (3, 0): 9, (3, 1): 22}),
        (24, None, None, {(0, 0): 0, (0, 1): 12, (1, 0): 3, (1, 1): 15, (2, 0): 6, (2, 1): 18, (3, 0): 9, (3, 1): 21}),
    ],
)
def test_layer_offsets_are_megatrons(layers, first, last, offsets):
    """Each rank's two chunks start where Megatron's get_transformer_layer_offset says, hold
    n_r / 2 consecutive layers, and every layer is on exactly one rank."""
    model = replace(resolve_model("llama-2-7b"), num_layers=layers)
    parallel = ParallelConfig(pp=4, vpp=2, pp_first_layers=first, pp_last_layers=last)
    counts = stage_layer_counts(layers, parallel)
    held = []
    for rank in range(4):
        indices = stage_layers(model, parallel, rank).indices
        per_chunk = counts[rank] // 2
        assert len(indices) == counts[rank]
        for chunk in range(2):
            start = offsets[rank, chunk]
            assert indices[chunk * per_chunk:(chunk + 1) * per_chunk] == tuple(range(start, start + per_chunk))
        held += indices
    assert sorted(held) == list(range(layers))


@pytest.mark.parametrize(
    ("layers", "pp", "first", "last", "counts"),
    [
        (12, 4, 2, 2, (2, 4, 4, 2)),  # Megatron's functional test gpt3_mcore_te_tp1_pp4_vp1_uneven_pipeline
        (126, 8, 15, 15, (15, 16, 16, 16, 16, 16, 16, 15)),  # Llama-3.1-405B
        (61, 8, 5, 7, (5, 8, 8, 8, 8, 8, 8, 7)),  # DeepSeek-V3
        (61, 8, 12, None, (12, 7, 7, 7, 7, 7, 7, 7)),  # the rest split over the other seven ranks
        (61, 2, None, 30, (31, 30)),
    ],
)
def test_first_and_last_stage_counts(layers, pp, first, last, counts):
    """get_num_layers_to_build: the given ends, and (L - first - last) / (ranks left) elsewhere."""
    assert stage_layer_counts(layers, ParallelConfig(pp=pp, pp_first_layers=first, pp_last_layers=last)) == counts


def test_llama_405b_over_8_stages():
    """126 layers over pp 8: Megatron's first/last form and the explicit list give the same stages
    and the same estimate; the first rank (embedding, 8 micro-batches in flight) is the busiest."""
    model = resolve_model("llama-3.1-405b")
    settings = TrainSettings(seq_len=4096)
    megatron = estimate_training(model, settings, ParallelConfig(pp=8, pp_first_layers=15, pp_last_layers=15))
    explicit = estimate_training(model, settings, ParallelConfig(pp=8, pp_layers=(15, 16, 16, 16, 16, 16, 16, 15)))
    assert megatron.total == explicit.total
    assert [view.name for view in megatron.ranks] == ["first stage", "last stage"]
    assert megatron.settings.parallel.most_loaded_rank == "first stage"


def test_deepseek_v3_stages_hold_every_parameter_once():
    """61 layers (3 dense, then MoE) over pp 8: the stages' tensors add up to the model's."""
    model = resolve_model("deepseek-v3")
    parallel = ParallelConfig(pp=8, pp_layers=(7, 8, 8, 8, 8, 8, 7, 7))
    held = sum(rank_params(model, parallel, stage_layers(model, parallel, rank)).total for rank in range(8))
    assert held == count_params(model).total
    assert stage_layers(model, parallel, 0).dense_layers == 3


@hypothesis_settings(max_examples=25)
@given(st.data())
def test_any_split_holds_every_layer_and_parameter_once(data):
    """Any list of positive counts adding up to L (and any valid first/last pair, v dividing each
    rank's layers): the ranks' layer indices partition the layers, their tensors the model's."""
    model = resolve_model("qwen3-30b-a3b")  # 48 MoE layers
    layers = model.num_layers
    pp = data.draw(st.integers(2, 12))
    cuts = sorted(data.draw(st.sets(st.integers(1, layers - 1), min_size=pp - 1, max_size=pp - 1)))
    counts = tuple(b - a for a, b in zip([0, *cuts], [*cuts, layers]))
    vpp = data.draw(st.sampled_from([1, 2]))
    middle = data.draw(st.integers(1, layers // max(1, pp - 2)))
    first = layers - vpp * middle * (pp - 2) - vpp * data.draw(st.integers(1, 3))
    layouts = [ParallelConfig(pp=pp, pp_layers=counts)]
    if pp > 2 and first > 0 and first % vpp == 0:
        layouts.append(ParallelConfig(pp=pp, vpp=vpp, pp_first_layers=first,
                                      pp_last_layers=layers - first - vpp * middle * (pp - 2)))
    for parallel in layouts:
        estimate_training(model, TrainSettings(seq_len=128), parallel)  # a valid layout
        stages = [stage_layers(model, parallel, rank) for rank in range(pp)]
        assert sorted(index for stage in stages for index in stage.indices) == list(range(layers))
        assert sum(rank_params(model, parallel, stage).total for stage in stages) == count_params(model).total


# --- 2. Settings and errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "fields", "start"),
    [
        ({"pp": 8, "pp_layers": (15, 16, 16, 16, 16, 16, 16, 16)}, ("pp_layers",), "--pp-layers 15,16,16"),  # 127
        ({"pp": 8, "pp_layers": (15, 16, 0, 16, 16, 16, 16, 31)}, ("pp_layers",), "--pp-layers: pipeline rank 2"),
        ({"pp": 8, "pp_layers": (63, 63)}, ("pp_layers", "pp"), "--pp-layers lists 2 pipeline ranks"),
        ({"pp": 8, "vpp": 2, "pp_layers": (15, 16, 16, 16, 16, 16, 16, 15)}, ("pp_layers", "vpp", "pp_first_layers",
                                                                             "pp_last_layers"), "--pp-layers with"),
        ({"pp": 8, "pp_layers": (15, 16, 16, 16, 16, 16, 16, 15), "pp_first_layers": 15},
         ("pp_layers", "pp_first_layers", "pp_last_layers"), "--pp-layers gives"),
        ({"pp": 8, "pp_first_layers": 0}, ("pp_first_layers",), "--pp-first-layers must be positive"),
        ({"pp_last_layers": 4}, ("pp_last_layers", "pp"), "--pp-last-layers needs --pp > 1"),
        ({"pp": 8, "vpp": 2, "pp_first_layers": 15}, ("pp_first_layers", "vpp"), "--pp-first-layers 15 is not"),
        ({"pp": 8, "pp_first_layers": 14, "pp_last_layers": 14}, ("pp_first_layers", "pp_last_layers", "pp_layers"),
         "--pp-first-layers 14 + --pp-last-layers 14 = 28 layers leaves 98 for 6 ranks"),
        ({"pp": 8, "pp_first_layers": 126}, ("pp_first_layers",), "--pp-first-layers 126 layers leaves none"),
        ({"pp": 2, "pp_first_layers": 60, "pp_last_layers": 60}, ("pp_first_layers", "pp_last_layers"),
         "--pp-first-layers 60 + --pp-last-layers 60 = 120 layers; llama-3.1-405b has 126"),
        ({"pp": 8, "vpp": 3, "pp_first_layers": 12, "pp_last_layers": 12},
         ("pp_first_layers", "pp_last_layers", "vpp"), "--pp-first-layers 12 + --pp-last-layers 12 = 24 layers "
         "leaves 17 per other rank"),
        ({"pp": 8}, ("pp", "vpp", "pp_layers", "pp_first_layers", "pp_last_layers"),
         "--pp 8 x --vpp 1 = 8 does not divide the 126 layers of llama-3.1-405b; for uneven stages give --pp-layers "
         "(e.g. 15,16,16,16,16,16,16,15) or --pp-first-layers / --pp-last-layers"),
    ],
)
def test_bad_stages_are_one_line_errors_naming_the_setting(layout, fields, start):
    from memcalc.cli import flag_of

    with pytest.raises(SettingsError) as error:
        estimate_training(resolve_model("llama-3.1-405b"), TrainSettings(seq_len=128), ParallelConfig(**layout))
    assert error.value.fields == fields
    message = error.value.describe(flag_of)
    assert message.startswith(start)
    assert "\n" not in message


def test_cli_flags_and_exit_code(run_cli):
    good = run_cli("train", "llama-3.1-405b", "--pp", "8", "--pp-layers", "15,16,16,16,16,16,16,15", "--seq", "1024",
                   "--json")
    assert good.exit_code == 0
    same = run_cli("train", "llama-3.1-405b", "--pp", "8", "--pp-first-layers", "15", "--pp-last-layers", "15",
                   "--seq", "1024", "--json")
    assert same.stdout == good.stdout
    bad = run_cli("train", "llama-3.1-405b", "--pp", "8", "--pp-layers", "15,16", "--seq", "1024")
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "error: --pp-layers lists 2 pipeline ranks; --pp is 8"
    text = run_cli("train", "llama-3.1-405b", "--pp", "8", "--pp-layers", "16,x", "--seq", "1024")
    assert text.exit_code == 2 and text.stderr.count("\n") == 1 and "--pp-layers '16,x'" in text.stderr


def test_scenario_strings_and_files_take_stage_lists(tmp_path):
    """In a --scenario string commas separate the pairs: the stages are written 15/16/.../15; a
    scenario file gives a list."""
    from memcalc.scenario import parallel_config, parse_scenario, read_scenarios

    layers = (15, 16, 16, 16, 16, 16, 16, 15)
    assert parallel_config(parse_scenario("pp=8,pp_layers=15/16/16/16/16/16/16/15")).pp_layers == layers
    path = tmp_path / "scenarios.yaml"
    path.write_text("- {pp: 8, pp_layers: [15, 16, 16, 16, 16, 16, 16, 15]}\n- {pp: 8, pp_first_layers: 14}\n")
    first, second = (parallel_config(item) for item in read_scenarios(str(path)))
    assert first.pp_layers == layers
    assert stage_layer_counts(126, second) == (14,) + (16,) * 7


# --- 3. The busiest rank ---------------------------------------------------------------------------

# a Llama-3-shaped model, small: GQA (8 query heads, 4 key/value heads), SwiGLU, untied head
MODEL = replace(resolve_model("llama-3-8b"), name="tiny-llama", hidden_size=256, num_layers=8,
                num_attention_heads=8, num_kv_heads=4, head_dim=32, intermediate_size=512, vocab_size=2048)
TIED = replace(MODEL, name="tiny-llama-tied", tie_word_embeddings=True)
BATCH, SEQ = 2, 128
SETTINGS = TrainSettings(precision="pure-bf16", batch_size=BATCH, seq_len=SEQ, attention="sdpa")


def test_even_layouts_report_the_ends():
    """Every stage alike: a middle rank holds less than the first (fewer micro-batches, no
    embedding), so only the ends are worked out, as before uneven stages."""
    assert pipeline_ranks(ParallelConfig(pp=4), MODEL) == [0, 3]
    estimate = estimate_training(MODEL, SETTINGS, ParallelConfig(pp=4))
    assert [view.name for view in estimate.ranks] == ["first stage", "last stage"]


def test_a_middle_rank_with_more_layers_is_reported_when_busiest():
    """(1, 3, 3, 1): rank 1 holds 3 micro-batches of 3 layers, rank 0 4 of 1. Rank 2 holds the same
    layers as rank 1 with fewer micro-batches, so it is not worked out."""
    parallel = ParallelConfig(pp=4, pp_layers=(1, 3, 3, 1))
    assert pipeline_ranks(parallel, MODEL) == [0, 1, 3]
    estimate = estimate_training(MODEL, SETTINGS, parallel)
    assert [view.name for view in estimate.ranks] == ["first stage", "middle stage 1", "last stage"]
    every = [estimate_pipeline_rank(MODEL, SETTINGS, parallel, rank).total for rank in range(4)]
    assert estimate.total == max(every) == every[1]
    assert estimate.settings.parallel.most_loaded_rank == "middle stage 1"


def test_moe_stages_after_dense_ones_are_worked_out():
    """DeepSeek-V2-Lite (1 dense layer, then MoE) at pp 3 x 9: rank 1 is all MoE, rank 0 is not."""
    model = resolve_model("deepseek-v2-lite")
    assert pipeline_ranks(ParallelConfig(pp=3), model) == [0, 1, 2]


def test_in_flight_micro_batches_per_rank():
    """1F1B: rank r holds min(pp - r, m) micro-batches, whatever its layers."""
    assert [inflight_chunks(ParallelConfig(pp=4, microbatches=8), r) for r in range(4)] == [4, 3, 2, 1]
    assert [inflight_chunks(ParallelConfig(pp=4, microbatches=2), r) for r in range(4)] == [2, 2, 2, 1]


# --- 4. Measured ------------------------------------------------------------------------------------

# torch (the validate extra) only for these: the tests above run without it
LAYOUTS = [
    # (model, layers per rank, micro-batches)
    (MODEL, None, 4),  # even: 2 layers each
    (MODEL, (1, 3, 3, 1), 4),  # uneven, a middle rank the busiest
    (MODEL, (3, 2, 2, 1), 2),  # uneven, fewer micro-batches than stages
    (TIED, (5, 3), 4),  # a tied embedding: the last rank keeps its own copy
]
SCALAR_BYTES = 16
CASES = [(model, layers, m, rank) for model, layers, m in LAYOUTS for rank in range(len(layers or (2,) * 4))]


def _id(case) -> str:
    model, layers, m, rank = case
    return f"{model.name}-{'-'.join(map(str, layers or (2,) * 4))}-m{m}-rank{rank}"


@pytest.fixture(scope="module")
def measured():
    pytest.importorskip("torch")
    from memcalc.validate.pipeline import measure_pipeline_rank

    results = {}
    for model, layers, m, rank in CASES:
        parallel = ParallelConfig(pp=len(layers or (2,) * 4), pp_layers=layers, microbatches=m)
        results[model.name, layers, m, rank] = (parallel, measure_pipeline_rank(model, parallel, rank,
                                                                                batch_size=BATCH, seq_len=SEQ))
    return results


def test_one_f_one_b_order():
    """Megatron's schedule on rank 1 of 4 with 4 micro-batches: 2 warm-up forwards, 2 1F1B pairs,
    2 cool-down backwards."""
    pytest.importorskip("torch")
    from memcalc.validate.pipeline import one_f_one_b

    assert one_f_one_b(4, 1, 4) == [("forward", 0), ("forward", 1), ("forward", 2), ("backward", 0),
                                    ("forward", 3), ("backward", 1), ("backward", 2), ("backward", 3)]
    assert one_f_one_b(4, 3, 2) == [("forward", 0), ("backward", 0), ("forward", 1), ("backward", 1)]


@pytest.mark.parametrize("case", CASES, ids=[_id(case) for case in CASES])
def test_rank_matches_the_estimate(measured, case):
    """Weights and gradients exact; optimizer states exact but AdamW's fp32 step counter per
    tensor; activations, every phase peak and the total within what neither side counts on
    purpose: the rotary cos/sin tables each micro-batch in flight computes (Megatron caches one;
    the reference decoder makes them per forward), the rotary buffer and the step counters."""
    model, layers, m, rank = case
    parallel, measurement = measured[model.name, layers, m, rank]
    view = estimate_pipeline_rank(model, SETTINGS, parallel, rank)
    memory = {component.key: component.bytes for component in view.components}
    tensors = len(list(measurement_tensors(model, parallel, rank)))
    assert measurement.inflight == inflight_chunks(parallel, rank)
    assert measurement.weights == memory["weights"]
    assert measurement.gradients == memory["gradients"]
    assert measurement.optimizer_states == memory["optimizer_states"] + 4 * tensors
    # bf16 cos and sin, and a few scalars (a loss, a mean), per micro-batch in flight
    rotary = (2 * SEQ * model.attention_head_dim * 2 + SCALAR_BYTES) * measurement.inflight
    static = measurement.buffers + 4 * tensors
    assert 0 <= measurement.activations - memory["activations"] <= rotary
    for phase, peak in zip(("forward", "backward", "optimizer_step"), measurement.phase_peaks, strict=True):
        allowance = static + (rotary if phase != "optimizer_step" else 0)
        assert 0 <= peak - view.phases[phase] <= allowance, phase
    assert 0 <= measurement.total - view.total <= static + rotary


def measurement_tensors(model, parallel, rank):
    """The parameter tensors of the rank's stage (one AdamW step counter each)."""
    stage = stage_layers(model, parallel, rank)
    for group in rank_params(model, parallel, stage).groups:
        yield from range(group.count)


@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=["even", "1-3-3-1", "3-2-2-1"])
def test_the_busiest_measured_rank_is_the_one_reported(measured, layout):
    model, layers, m = layout
    pp = len(layers or (2,) * 4)
    totals = [measured[model.name, layers, m, rank][1].total for rank in range(pp)]
    estimate = estimate_training(model, SETTINGS, ParallelConfig(pp=pp, pp_layers=layers, microbatches=m))
    busiest = max(estimate.ranks, key=lambda view: view.total)
    assert busiest.pipeline_rank == totals.index(max(totals))


def test_a_single_pipeline_rank_takes_the_steps_dropout_and_refusals():
    """estimate_pipeline_rank starts from what estimate_training does: --dropout on the model's
    rates (GPT-2's 0.1 adds masks; 0 removes them) and the refusal of dropout under LoRA."""
    from memcalc.config import TrainSettings
    from memcalc.errors import InputError
    from memcalc.estimate.training import estimate_pipeline_rank, estimate_training
    from memcalc.library import resolve_model
    from memcalc.parallel import ParallelConfig

    model, parallel = resolve_model("gpt2"), ParallelConfig(pp=2)
    for dropout in (None, 0.0):
        settings = TrainSettings(seq_len=1024, dropout=dropout)
        whole = {view.pipeline_rank: view.total for view in estimate_training(model, settings, parallel).ranks}
        assert estimate_pipeline_rank(model, settings, parallel, 0).total == whole[0]
    with_masks = estimate_pipeline_rank(model, TrainSettings(seq_len=1024), parallel, 0).phases["forward"]
    without = estimate_pipeline_rank(model, TrainSettings(seq_len=1024, dropout=0.0), parallel, 0).phases["forward"]
    assert with_masks > without
    with pytest.raises(InputError, match="not modelled with LoRA"):
        estimate_pipeline_rank(model, TrainSettings(lora_rank=8), parallel, 0)
