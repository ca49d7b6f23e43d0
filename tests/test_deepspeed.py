"""DeepSpeed ZeRO-1/2's gradient reduction buffers: the estimate against real DeepSpeed steps
(memcalc.validate.deepspeed: DeepSpeed 0.19.8 on the CPU, a gloo group of two processes), and
DeepSpeed's own defaults and arithmetic (deepspeed/runtime/zero/config.py, stage_1_and_2.py)."""

from __future__ import annotations

import json

import pytest

from memcalc.config import ModelConfig, TrainSettings
from memcalc.estimate.training import estimate_training
from memcalc.library import resolve_model
from memcalc.parallel import DEFAULT_REDUCE_BUCKET_SIZE, ParallelConfig


def tiny() -> ModelConfig:
    return ModelConfig(name="tiny", hidden_size=256, num_layers=4, num_attention_heads=8, num_kv_heads=2,
                       intermediate_size=704, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=False)


@pytest.mark.parametrize(("stage", "bucket", "overlap", "batch", "seq"), [
    (2, DEFAULT_REDUCE_BUCKET_SIZE, False, 2, 256),  # the default buffer, 1 GB, is the backward peak
    (1, DEFAULT_REDUCE_BUCKET_SIZE, False, 2, 256),
    (2, DEFAULT_REDUCE_BUCKET_SIZE, True, 2, 256),  # overlap_comm: two buffers
    (2, 1_000_000, False, 2, 256),  # a small buffer: the loss's backward, before any gradient, stays the peak
    (1, 1_000_000, False, 1, 32),  # ZeRO-1's reduction after backward, bucket by bucket
])
def test_each_phase_matches_a_real_deepspeed_step(stage, bucket, overlap, batch, seq):
    """Every phase within 0.2% of rank 0 of a real DeepSpeed step (the default bucket within 0.05%);
    without the buffers the backward estimate was 18x (one buffer) and 36x (two) too low on the
    default bucket, and ZeRO-1's step 8% too high (it kept every unsharded gradient)."""
    pytest.importorskip("deepspeed")
    from memcalc.validate.deepspeed import DeepSpeedRun, measure_deepspeed
    from memcalc.validate.run import TrainWorkload

    measured = measure_deepspeed(tiny(), TrainWorkload(precision="mixed-bf16", batch_size=batch, seq_len=seq),
                                 DeepSpeedRun(stage=stage, reduce_bucket_size=bucket, overlap_comm=overlap))
    # DeepSpeed's setup_buckets: reduce_bucket_size bf16 elements, twice with overlap_comm
    assert measured.ipg_buffer_bytes == bucket * 2 * (1 + overlap)
    estimate = estimate_training(tiny(), TrainSettings(precision="mixed-bf16", batch_size=batch, seq_len=seq),
                                 ParallelConfig(dp=2, zero=stage, reduce_bucket_size=bucket, overlap_comm=overlap))
    assert estimate.component("deepspeed_buckets").bytes == measured.ipg_buffer_bytes
    for phase, measured_phase in measured.phases.items():
        assert estimate.phases[phase] == pytest.approx(measured_phase.peak_bytes, rel=0.002), phase


def test_defaults_are_deepspeeds():
    """deepspeed/runtime/zero/config.py (DeepSpeedZeroConfig): reduce_bucket_size pp_int(5e8);
    overlap_comm None, which overlap_comm_valid makes True only for stage 3."""
    assert DEFAULT_REDUCE_BUCKET_SIZE == 500_000_000
    assert ParallelConfig().overlap_comm is False


@pytest.mark.parametrize(("dtype", "overlap", "expected"), [
    ("bf16", False, 500_000_000 * 2), ("bf16", True, 2 * 500_000_000 * 2), ("fp16", False, 500_000_000 * 2),
    ("fp32", False, 500_000_000 * 4),
])
def test_buffer_bytes_are_the_bucket_in_the_parameters_dtype(dtype, overlap, expected):
    """By hand from stage_1_and_2.py (setup_buckets: torch.empty(reduce_bucket_size,
    dtype=_gradient_reduction_buffer_dtype()), the parameters' dtype without fp32 accumulation)."""
    estimate = estimate_training(resolve_model("llama-3-8b"), TrainSettings(dtype=dtype),
                                 ParallelConfig(dp=8, zero=2, overlap_comm=overlap))
    assert estimate.component("deepspeed_buckets").bytes == expected


def test_the_buffer_adds_to_backward_only():
    """The buffer lives from a backward's first gradient hook to its reduction's end: forward and
    the optimizer step do not hold it; a larger bucket raises backward by exactly the difference
    when the buffer is the peak's largest term."""
    model, settings = resolve_model("llama-3-8b"), TrainSettings(seq_len=1024)
    small = estimate_training(model, settings, ParallelConfig(dp=8, zero=2, reduce_bucket_size=400_000_000))
    large = estimate_training(model, settings, ParallelConfig(dp=8, zero=2, reduce_bucket_size=500_000_000))
    assert large.phases["forward"] == small.phases["forward"]
    assert large.phases["optimizer_step"] == small.phases["optimizer_step"]
    assert large.phases["backward"] - small.phases["backward"] == 100_000_000 * 2


@pytest.mark.parametrize("layout", [
    ParallelConfig(dp=8),  # DDP's buckets instead
    ParallelConfig(dp=8, zero=3),  # ZeRO-3's own working set
    ParallelConfig(dp=8, zero=2, fsdp=True),
    ParallelConfig(dp=8, distributed_optimizer=True),
    ParallelConfig(dp=8, zero=2, offload="optimizer"),  # not modelled
])
def test_no_deepspeed_buckets_outside_deepspeed_zero_1_and_2(layout):
    estimate = estimate_training(resolve_model("llama-3.2-1b"), TrainSettings(), layout)
    assert "deepspeed_buckets" not in {component.key for component in estimate.components}


def test_zero_1_steps_on_its_partitions_gradients():
    """ZeRO-1 keeps only its partition's gradients for the step, as ZeRO-2 (measured above): the
    optimizer step of the two stages is the same."""
    model, settings = resolve_model("llama-3.2-1b"), TrainSettings()
    one = estimate_training(model, settings, ParallelConfig(dp=8, zero=1))
    two = estimate_training(model, settings, ParallelConfig(dp=8, zero=2))
    assert one.phases["optimizer_step"] == two.phases["optimizer_step"]


def test_cli_flags_reach_the_estimate(run_cli):
    result = run_cli("train", "llama-3.2-1b", "--gpus", "8", "--zero", "2", "--reduce-bucket-size", "200000000",
                     "--overlap-comm", "--json")
    assert result.exit_code == 0, result.stderr
    components = {c["key"]: c["bytes"] for c in json.loads(result.stdout)["components"]}
    assert components["deepspeed_buckets"] == 2 * 200_000_000 * 2
    scenario = run_cli("compare", "llama-3.2-1b", "--scenario", "gpus=8,zero=1,reduce_bucket_size=1000",
                       "--json")
    assert scenario.exit_code == 0, scenario.stderr
