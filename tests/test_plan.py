"""The layout planner (memcalc/plan.py, docs/plan.md): known-good layouts found, known-bad ones
rejected, every enumerated layout valid, the top layout fitting by the train estimator, the search
agreeing with brute force, and the step-time model against published throughput."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from memcalc.config import ModelConfig, Recompute, TrainSettings
from memcalc.errors import InputError
from memcalc.estimate.training import estimate_training
from memcalc.gpus import resolve_gpu
from memcalc.library import resolve_model
from memcalc.parallel import check_layout
from memcalc.plan import (
    DEFAULT_HOST_MEMORY_PER_GPU,
    Layout,
    Sharding,
    StepTimeModel,
    enumerate_layouts,
    evaluate,
    plan,
)

GIB = 2**30


def _fits(model, gpu, layout: Layout, seq_len: int, headroom: float = 0.10, fsdp: bool = False,
          base: TrainSettings | None = None, host: int = DEFAULT_HOST_MEMORY_PER_GPU) -> bool:
    estimate = estimate_training(model, layout.train_settings(base or TrainSettings(), seq_len),
                                 layout.parallel_config(fsdp=fsdp))
    return estimate.total <= int((1 - headroom) * gpu.usable_memory_bytes) and estimate.cpu_total <= host


# --- Known-good and known-bad layouts (issue 7, "How it is checked") ----------------------------


def test_llama_3_70b_on_256_h100_fits_with_fsdp_and_tp8():
    """Llama-3.1-70B (llama-3-70b has the same geometry) on 256 H100-80GB, full recompute, s = 8192:
    FSDP (ZeRO-3) with TP 8 fits, and the planner finds such layouts."""
    model, gpu = resolve_model("llama-3-70b"), resolve_gpu("h100-80gb")
    layout = Layout(dp=32, tp=8, pp=1, cp=1, ep=1, vpp=1, sp=True, zero=3, distributed_optimizer=False,
                    offload="none", recompute=Recompute.FULL, micro_batch=1, microbatches=8)
    ranked = evaluate(model, gpu, layout, seq_len=8192, global_batch=256, fsdp=True)
    assert ranked.fits and ranked.memory_bytes < 0.9 * gpu.usable_memory_bytes
    result = plan(model, gpu, 256, seq_len=8192, global_batch=256, recompute=["full"], fsdp=True, tp=[8], pp=[1],
                  sharding=[Sharding(3, False, "none")])
    assert result.top, [r.reason for r in result.rejected]
    assert all(entry.layout.tp == 8 and entry.layout.zero == 3 for entry in result.top)
    assert all(entry.memory_bytes <= result.limit_bytes for entry in result.top)


def test_gpt3_175b_does_not_fit_on_8_a100_under_any_layout():
    model, gpu = resolve_model("gpt3-175b"), resolve_gpu("a100-80gb")
    result = plan(model, gpu, 8, seq_len=2048, global_batch=32)
    assert not result.top and result.counts.fitting == 0
    assert result.counts.not_fitting == result.counts.valid  # every layout accounted for as not fitting
    pairs = {(layout.tp, layout.pp) for layout in enumerate_layouts(model, 8, seq_len=2048, global_batch=32)}
    assert {(r.tp, r.pp) for r in result.rejected} == pairs
    for rejection in result.rejected:
        assert rejection.reason.startswith(f"tp={rejection.tp} pp={rejection.pp}: ")
        assert "GiB" in rejection.reason
    # without offload the best any layout does is ~450 GiB per GPU: 175B x 16 B over 8 GPUs alone is 326 GiB
    no_offload = plan(model, gpu, 8, seq_len=2048, global_batch=32, offload=False)
    assert not no_offload.top
    best = min(r.best_bytes for r in no_offload.rejected)
    assert best > 326 * GIB
    assert "needs" in no_offload.rejected[0].reason and "GiB/GPU at best" in no_offload.rejected[0].reason


def test_7b_pure_bf16_fits_one_80gb_gpu_at_seq_2048():
    model, gpu = resolve_model("llama-2-7b"), resolve_gpu("a100-80gb")
    result = plan(model, gpu, 1, seq_len=2048, global_batch=8, settings=TrainSettings(precision="pure-bf16"),
                  offload=False)
    assert result.top
    best = result.best
    assert best.layout.gpus == 1 and best.layout.offload == "none"
    assert best.memory_bytes <= 0.9 * 85_028_896_768  # 90% of what CUDA reports for an H100 80GB
    assert best.estimate.settings.precision == "pure-bf16"
    # mixed precision (16 B/param: 108 GB of state) does not fit without offload
    assert not plan(model, gpu, 1, seq_len=2048, global_batch=8, offload=False).top


# --- The top layout fits by the train estimator; every enumerated layout is valid ----------------


@pytest.mark.parametrize("name, gpu_name, gpus, seq_len, global_batch", [
    ("llama-3-70b", "h100-80gb", 256, 8192, 256),
    ("llama-2-13b", "rtx-4090-24gb", 8, 2048, 16),
    ("mixtral-8x7b", "h100-80gb", 16, 4096, 32),
])
def test_top_layouts_fit_by_estimate_training(name, gpu_name, gpus, seq_len, global_batch):
    model, gpu = resolve_model(name), resolve_gpu(gpu_name)
    result = plan(model, gpu, gpus, seq_len=seq_len, global_batch=global_batch, top_k=5)
    assert result.top
    for entry in result.top:
        estimate = estimate_training(model, entry.layout.train_settings(TrainSettings(), seq_len),
                                     entry.layout.parallel_config())
        assert estimate.total == entry.memory_bytes <= result.limit_bytes
        assert estimate.cpu_total <= result.host_limit_bytes
        assert entry.layout.gpus == gpus
        assert entry.layout.dp * entry.layout.micro_batch * entry.layout.microbatches == global_batch
    times = [entry.step_time_s for entry in result.top]
    assert times == sorted(times)


def _assert_valid(model, layouts, gpus, seq_len, global_batch):
    for layout in layouts:
        check_layout(model, layout.parallel_config(), seq_len, TrainSettings().attention, gpus)
        assert layout.dp * layout.micro_batch * layout.microbatches == global_batch
        assert layout.tp <= 8
        assert layout.vpp == 1 or layout.microbatches % layout.pp == 0


@pytest.mark.parametrize("name, gpus, seq_len, global_batch", [
    ("llama-3.2-1b", 8, 4096, 16),
    ("mixtral-8x7b", 16, 4096, 32),
    ("gpt3-175b", 24, 2048, 48),
])
def test_every_enumerated_layout_passes_check_layout(name, gpus, seq_len, global_batch):
    model = resolve_model(name)
    layouts = list(enumerate_layouts(model, gpus, seq_len=seq_len, global_batch=global_batch))
    assert layouts and len(set(layouts)) == len(layouts)
    _assert_valid(model, layouts, gpus, seq_len, global_batch)


@settings(max_examples=25, deadline=None)
@given(gpus=st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]), batch=st.sampled_from([1, 2, 4, 6, 8, 12]),
       seq=st.sampled_from([512, 1000, 2048]), name=st.sampled_from(["gpt2", "llama-3.2-1b", "qwen2.5-0.5b"]))
def test_enumeration_is_valid_for_any_shape(gpus, batch, seq, name):
    model = resolve_model(name)
    layouts = list(enumerate_layouts(model, gpus, seq_len=seq, global_batch=batch, try_no_sp=True))
    _assert_valid(model, layouts, gpus, seq, batch)


# --- The search agrees with evaluating every layout ----------------------------------------------


@pytest.mark.parametrize("name, gpu_name, gpus, seq_len, global_batch, offload, host", [
    ("llama-3.2-1b", "rtx-4090-24gb", 8, 4096, 16, True, None),
    ("llama-2-7b", "l40s-48gb", 4, 2048, 8, True, None),
    ("llama-3-8b", "a100-40gb", 4, 8192, 8, True, 32 * GIB),
    ("llama-2-13b", "rtx-4090-24gb", 4, 2048, 8, False, None),
])
def test_pruned_search_matches_brute_force(name, gpu_name, gpus, seq_len, global_batch, offload, host):
    model, gpu = resolve_model(name), resolve_gpu(gpu_name)
    host = host or DEFAULT_HOST_MEMORY_PER_GPU
    result = plan(model, gpu, gpus, seq_len=seq_len, global_batch=global_batch, top_k=5, distinct=False,
                  offload=offload, host_memory_bytes=host)
    layouts = list(enumerate_layouts(model, gpus, seq_len=seq_len, global_batch=global_batch, offload=offload))
    timer = StepTimeModel(model, gpu, seq_len=seq_len, global_batch=global_batch)
    order = sorted(range(len(layouts)), key=lambda i: (*timer.total(layouts[i]), layouts[i].microbatches, i))
    expected, feasible = [], {}
    for i in order:
        layout = layouts[i]
        pair = (layout.tp, layout.pp)
        if len(expected) >= 5 and feasible.get(pair):
            continue
        fits = _fits(model, gpu, layout, seq_len, host=host)
        feasible[pair] = feasible.get(pair, False) or fits
        if fits and len(expected) < 5:
            expected.append(layout)
    assert [entry.layout for entry in result.top] == expected
    assert {(r.tp, r.pp) for r in result.rejected} == {pair for pair, ok in feasible.items() if not ok}


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(["llama-3.2-1b", "gemma-7b", "llama-3-8b", "qwen2.5-7b", "phi-3-mini"]),
       gpu_name=st.sampled_from(["rtx-4090-24gb", "l40s-48gb", "a100-40gb"]), gpus=st.sampled_from([1, 2, 4]),
       seq_len=st.sampled_from([1024, 4096, 8192]), global_batch=st.sampled_from([1, 2, 4, 8]),
       fsdp=st.booleans(), offload=st.booleans(), precision=st.sampled_from([None, "pure-bf16"]),
       host=st.sampled_from([None, 16 * GIB]))
# DeepSpeed's ZeRO-3 holds more than ZeRO-1/2 here (its fixed buffers on 2 ranks of a 1B model): its
# failure at micro-batch 2 once ruled out ZeRO-1 and ZeRO-2, which fit
@example(name="llama-3.2-1b", gpu_name="a100-40gb", gpus=2, seq_len=4096, global_batch=4, fsdp=False, offload=False,
         precision=None, host=None)
def test_pruned_search_matches_brute_force_anywhere(name, gpu_name, gpus, seq_len, global_batch, fsdp, offload,
                                                    precision, host):
    model, gpu = resolve_model(name), resolve_gpu(gpu_name)
    base = TrainSettings(precision=precision)
    host = host or DEFAULT_HOST_MEMORY_PER_GPU
    result = plan(model, gpu, gpus, seq_len=seq_len, global_batch=global_batch, top_k=3, distinct=False,
                  fsdp=fsdp, offload=offload, settings=base, host_memory_bytes=host)
    layouts = list(enumerate_layouts(model, gpus, seq_len=seq_len, global_batch=global_batch, offload=offload))
    timer = StepTimeModel(model, gpu, seq_len=seq_len, global_batch=global_batch, settings=base)
    order = sorted(range(len(layouts)), key=lambda i: (*timer.total(layouts[i]), layouts[i].microbatches, i))
    expected, feasible = [], {}
    for i in order:
        layout = layouts[i]
        pair = (layout.tp, layout.pp)
        if len(expected) >= 3 and feasible.get(pair):
            continue
        fits = _fits(model, gpu, layout, seq_len, fsdp=fsdp, base=base, host=host)
        feasible[pair] = feasible.get(pair, False) or fits
        if fits and len(expected) < 3:
            expected.append(layout)
    assert [entry.layout for entry in result.top] == expected
    assert {(r.tp, r.pp) for r in result.rejected} == {pair for pair, ok in feasible.items() if not ok}


# --- The step-time model ---------------------------------------------------------------------------


def test_model_flops_are_6n_plus_12lhs():
    """PaLM appendix B: 6 N + 12 L H Q s per token; N without the input embedding lookup."""
    model, gpu = resolve_model("llama-3-70b"), resolve_gpu("h100")
    timer = StepTimeModel(model, gpu, seq_len=8192, global_batch=8)
    n = 70_553_706_496 - 128256 * 8192  # parameters minus the embedding table (untied head kept)
    assert timer.model_flops_per_token == 6 * n + 12 * 80 * 8192 * 8192
    # full recompute: one more forward of the layers (4/3 of their 6 N + 12 L h s)
    layers = n - 128256 * 8192
    assert timer.recompute_flops[Recompute.FULL] == 2 * layers + 4 * 80 * 8192 * 8192


def test_bubble_is_narayanan():
    """With free communication the step is (m + (p - 1) / v) micro-batch slots: the bubble is
    (p - 1) / (v m + p - 1) of the step (Narayanan et al. 2021 sec. 2.2)."""
    model, gpu = resolve_model("llama-2-13b"), resolve_gpu("a100-80gb")
    timer = StepTimeModel(model, gpu, seq_len=2048, global_batch=64, intra_node_gbps=1e12, inter_node_gbps=1e12)
    for pp, vpp, m in ((4, 1, 16), (8, 5, 8), (2, 2, 32)):
        layout = Layout(64 // m, 1, pp, 1, 1, vpp, False, 1, False, "none", Recompute.NONE, 1, m)
        step = timer.step_time(layout)
        assert step.bubble / step.total == pytest.approx((pp - 1) / (vpp * m + pp - 1), rel=1e-6)
        assert step.total == pytest.approx(timer.total(layout)[0], rel=1e-12)


def test_step_time_breakdown_adds_up():
    model, gpu = resolve_model("mixtral-8x7b"), resolve_gpu("h100")
    timer = StepTimeModel(model, gpu, seq_len=4096, global_batch=32, overlap=0.0)
    for layout in list(enumerate_layouts(model, 16, seq_len=4096, global_batch=32))[::97]:
        step = timer.step_time(layout)
        parts = (step.compute + step.bubble + step.tensor_parallel + step.context_parallel + step.expert_parallel
                 + step.pipeline_send + step.data_parallel_exposed + step.offload)
        assert step.total == pytest.approx(parts, rel=1e-9)
        assert step.data_parallel_exposed == pytest.approx(step.data_parallel)  # overlap 0
        assert timer.total(layout)[0] == pytest.approx(step.total, rel=1e-12)


def _mpt_70b() -> ModelConfig:
    """MPT-70B as llm-foundry's scripts/train/yamls/pretrain/mpt-70b.yaml: d_model 8192, 80 layers,
    64 heads, expansion ratio 4 (plain GELU MLP), vocabulary 50368, tied embedding, LayerNorm
    without bias, ALiBi (no position parameters: "rotary" stands in, it has none either)."""
    return ModelConfig(name="mpt-70b", hidden_size=8192, num_layers=80, num_attention_heads=64,
                       intermediate_size=32768, vocab_size=50368, max_position_embeddings=2048,
                       tie_word_embeddings=True, mlp="plain", hidden_act="gelu", norm="layernorm",
                       position_embedding="rotary")


# (name, model, gpu, seq, global batch, layout, published tokens/s per GPU); docs/plan.md sec. 3
PUBLISHED_RUNS = [
    # torchtitan docs/performance.md: Llama 3 70B, FSDP2 on 64 A100 80GB, local batch 1, full AC: 331 WPS
    ("torchtitan Llama 3 70B, 64 A100", lambda: resolve_model("llama-3-70b"), "a100-80gb", 8192, 64,
     Layout(64, 1, 1, 1, 1, 1, False, 3, False, "none", Recompute.FULL, 1, 1), 331.0),
    # llm-foundry scripts/train/benchmarking/README.md: MPT-70B, 64 H100 80GB, FULL_SHARD, mbs 8,
    # grad accum 4, global batch 2048, seq 2048, activation checkpointing: 1039 tokens/s/GPU
    ("MosaicML MPT-70B, 64 H100", _mpt_70b, "h100-80gb", 2048, 2048,
     Layout(64, 1, 1, 1, 1, 1, False, 3, False, "none", Recompute.FULL, 8, 4), 1039.0),
]


@pytest.mark.parametrize("name, model_fn, gpu_name, seq_len, global_batch, layout, published", PUBLISHED_RUNS,
                         ids=[run[0] for run in PUBLISHED_RUNS])
def test_step_time_reproduces_published_throughput(name, model_fn, gpu_name, seq_len, global_batch, layout,
                                                   published):
    model, gpu = model_fn(), resolve_gpu(gpu_name)
    ranked = evaluate(model, gpu, layout, seq_len=seq_len, global_batch=global_batch, fsdp=True)
    per_gpu = ranked.tokens_per_s / layout.gpus
    assert per_gpu == pytest.approx(published, rel=0.20), f"{name}: {per_gpu:.0f} vs {published}"
    assert ranked.fits  # the runs ran: the estimator agrees they fit


@pytest.mark.parametrize("micro_batch, vpp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 3), (4, 4)])
def test_megatron_gpt3_175b_throughput(micro_batch, vpp):
    """Narayanan et al. 2021 Table 1: GPT-3 175B on 1024 A100 (t = 8, p = 8, batch 1536, s = 2048,
    full recompute) at 140 TFLOP/s per GPU counted as 96 B s l h^2 (1 + s/6h + V/16lh). The table
    does not give the micro-batch size or schedule: every plausible one is within 20 %."""
    model, gpu = resolve_model("gpt3-175b"), resolve_gpu("a100-80gb")
    layout = Layout(16, 8, 8, 1, 1, vpp, False, 0, True, "none", Recompute.FULL, micro_batch, 96 // micro_batch)
    step = StepTimeModel(model, gpu, seq_len=2048, global_batch=1536).step_time(layout)
    h, layers, vocab, s, batch = 12288, 96, 51200, 2048, 1536
    flops = 96 * batch * s * layers * h * h * (1 + s / (6 * h) + vocab / (16 * layers * h))
    assert flops / step.total / 1024 / 1e12 == pytest.approx(140, rel=0.20)


# --- Speed, counts and messages ---------------------------------------------------------------------


def test_search_of_1024_gpus_estimates_few_layouts():
    """The search estimates under a thousand of the 40,000 valid layouts (benchmarks/plan_speed.py
    prints the time it takes; tests assert no time)."""
    model, gpu = resolve_model("llama-3-70b"), resolve_gpu("h100")
    result = plan(model, gpu, 1024, seq_len=8192, global_batch=1024)
    counts = result.counts
    assert counts.valid > 40_000 and counts.estimated < 1_000
    assert counts.fitting + counts.not_fitting + counts.unresolved == counts.valid
    assert len(result.top) == 10
    assert len({entry.layout._replace(micro_batch=0, microbatches=0, vpp=0, recompute=Recompute.NONE)
                for entry in result.top}) == 10  # distinct layouts


def test_invalid_degrees_are_explained():
    model, gpu = resolve_model("llama-3-70b"), resolve_gpu("h100")
    result = plan(model, gpu, 64, seq_len=8192, global_batch=64, pp=[1, 32])
    assert any(r.pp == 32 and "does not divide the 80 layers" in r.reason for r in result.invalid)


def test_bad_arguments_are_input_errors():
    model, gpu = resolve_model("gpt2"), resolve_gpu("h100")
    with pytest.raises(InputError):
        plan(model, gpu, 8, seq_len=1024, global_batch=8, headroom=1.5)
    with pytest.raises(InputError):
        plan(model, gpu, 8, seq_len=1024, global_batch=8, mfu=0)
    with pytest.raises(InputError):
        plan(model, gpu, 0, seq_len=1024, global_batch=8)


def test_plan_cli_json(run_cli):
    """The CLI's top layout fits under the headroom by the train estimator's own total; a model
    that fits nowhere says so with the families' reasons."""
    result = run_cli("plan", "llama-2-7b", "--gpu", "h100", "--gpus", "8", "--seq", "2048", "--global-batch", "64",
                     "--top-k", "3", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["fits"] and 1 <= len(document["top"]) <= 3
    for item in document["top"]:
        assert item["memory"]["total"] <= document["limit_bytes"] == int(0.9 * 85_028_896_768)
    none = json.loads(run_cli("plan", "gpt3-175b", "--gpu", "a100-80gb", "--gpus", "8", "--seq", "2048",
                              "--global-batch", "64", "--json").stdout)
    assert not none["fits"] and none["top"] == [] and none["rejected"]


def test_one_layout_type_under_one_set_of_names():
    """ParallelConfig is the layout; the planner's Layout, the scenario and the CLI's layout flags
    are views of it under its own field names (plus what each adds: the planner's recompute and
    micro-batch, the request's GPU count, FSDP mode and node size)."""
    from dataclasses import fields

    from memcalc.flags import Layout as LayoutFlags
    from memcalc.parallel import ParallelConfig
    from memcalc.plan import PLANNED_FIELDS
    from memcalc.scenario import Scenario

    config_fields = {item.name for item in fields(ParallelConfig)}
    assert set(PLANNED_FIELDS) <= config_fields
    assert set(Layout._fields) == set(PLANNED_FIELDS) | {"recompute", "micro_batch"}
    request = {"gpus", "fsdp", "gpus_per_node"}  # resolved into dp, zero and shard_group by parallel_config
    flags = set(LayoutFlags.defaults()) - {"no_pad_vocab"}
    from memcalc.parallel import Zero3Knobs
    from memcalc.scenario import ZERO3_KEYS  # --zero3-* set the fields of ParallelConfig.zero3

    assert set(ZERO3_KEYS.values()) == {item.name for item in fields(Zero3Knobs)} and "zero3" in config_fields
    assert flags - request - set(ZERO3_KEYS) <= config_fields
    assert flags <= {item.name for item in fields(Scenario)}
    layout = Layout(4, 2, 2, 1, 1, 2, True, 1, False, "optimizer", Recompute.FULL, 1, 8)
    parallel = layout.parallel_config()
    assert all(getattr(parallel, name) == getattr(layout, name) for name in PLANNED_FIELDS)


def test_recurrent_models_are_searched_over_their_measured_layouts():
    """Qwen3-Next's and the Mamba-2 stacks' activations are modelled for no or full recompute on
    data-parallel ranks: the planner searches those layouts only, each one estimate_training takes."""
    model = resolve_model("qwen3-next-80b-a3b")
    layouts = list(enumerate_layouts(model, 16, seq_len=4096, global_batch=64))
    assert layouts
    assert {layout.recompute for layout in layouts} <= {Recompute.NONE, Recompute.FULL}
    assert all(layout.tp == layout.pp == layout.cp == layout.ep == 1 for layout in layouts)
    assert plan(model, resolve_gpu("h100"), 16, seq_len=4096, global_batch=64).top
