"""PyTorch DistributedDataParallel's gradient buckets: the estimate against a real step under DDP
(memcalc.validate.ddp: real CPU tensors, a gloo group of one rank), and PyTorch's own statement of
what ``gradient_as_bucket_view`` saves."""

from __future__ import annotations

import pytest

from memcalc.config import ModelConfig, TrainSettings
from memcalc.estimate.training import estimate_training
from memcalc.library import resolve_model
from memcalc.parallel import ParallelConfig


def tiny() -> ModelConfig:
    return ModelConfig(name="tiny", hidden_size=256, num_layers=4, num_attention_heads=8, num_kv_heads=2,
                       intermediate_size=704, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=False)


@pytest.mark.parametrize("precision", ["pure-bf16", "mixed-bf16"])
@pytest.mark.parametrize("bucket_view", [False, True])
@pytest.mark.parametrize(("batch", "seq"), [(2, 512), (1, 64)])
def test_each_phase_matches_a_real_ddp_step(precision, bucket_view, batch, seq):
    """Every phase within 0.2%; without the buckets the estimate would be up to 17% low."""
    pytest.importorskip("torch")
    from memcalc.validate.ddp import measure_ddp
    from memcalc.validate.run import TrainWorkload

    measured = measure_ddp(tiny(), TrainWorkload(precision=precision, batch_size=batch, seq_len=seq), bucket_view)
    estimate = estimate_training(tiny(), TrainSettings(precision=precision, batch_size=batch, seq_len=seq),
                                 ParallelConfig(dp=2, ddp_bucket_view=bucket_view))
    for phase, measured_phase in measured.phases.items():
        assert estimate.phases[phase] == pytest.approx(measured_phase.peak_bytes, rel=0.002), phase


def test_bucket_view_saves_the_gradients_size():
    """torch.nn.parallel.DistributedDataParallel docs, gradient_as_bucket_view: "This can reduce
    peak memory usage, where the saved memory size will be equal to the total gradients size."
    Pure bf16 (no master copy): the optimizer step, which holds every gradient, is 8,030,261,248 x 2
    bytes lower for Llama-3-8B (the peak moves to backward)."""
    model, settings = resolve_model("llama-3-8b"), TrainSettings(precision="pure-bf16")
    copies = estimate_training(model, settings, ParallelConfig(dp=8))
    views = estimate_training(model, settings, ParallelConfig(dp=8, ddp_bucket_view=True))
    assert copies.phases["optimizer_step"] - views.phases["optimizer_step"] == 8_030_261_248 * 2
    assert views.total < copies.total
    assert copies.component("ddp_buckets").bytes == views.component("ddp_buckets").bytes == 8_030_261_248 * 2


@pytest.mark.parametrize("layout", [
    ParallelConfig(),  # one device: no DDP
    ParallelConfig(dp=8, zero=1),  # ZeRO's own reduce buckets, not DDP's
    ParallelConfig(dp=8, zero=3, fsdp=True),
    ParallelConfig(dp=8, distributed_optimizer=True),
])
def test_no_ddp_buckets_without_plain_data_parallelism(layout):
    estimate = estimate_training(resolve_model("llama-3.2-1b"), TrainSettings(), layout)
    assert "ddp_buckets" not in {component.key for component in estimate.components}


def test_megatron_recipes_keep_their_own_grad_buffer():
    estimate = estimate_training(resolve_model("llama-3.2-1b"), TrainSettings(precision="megatron-bf16"),
                                 ParallelConfig(dp=8))
    assert "ddp_buckets" not in {component.key for component in estimate.components}


@pytest.mark.parametrize("extra", [{}, {"qlora": True}, {"lora_targets": ("q", "k", "v", "o", "gate", "up", "down")}])
def test_lora_under_ddp_matches_a_real_step(extra):
    """LoRA and QLoRA under DDP: the buckets hold only the adapters' gradients; every phase within
    0.5% of a real DDP step."""
    pytest.importorskip("torch")
    from memcalc.validate.ddp import measure_ddp
    from memcalc.validate.run import TrainWorkload

    settings = dict(precision="mixed-bf16", batch_size=2, seq_len=256, lora_rank=8, **extra)
    measured = measure_ddp(tiny(), TrainWorkload(**settings))
    estimate = estimate_training(tiny(), TrainSettings(**settings), ParallelConfig(dp=2))
    assert estimate.component("ddp_buckets").bytes == estimate.component("gradients").bytes
    for phase, measured_phase in measured.phases.items():
        assert estimate.phases[phase] == pytest.approx(measured_phase.peak_bytes, rel=0.005), phase
