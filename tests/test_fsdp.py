"""ZeRO-3 per-rank memory measured with PyTorch's FSDP2 under a fake process group (issue 3,
item 9): the measurement side of the parallel estimator, which compares against it."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("torch")

from memcalc.estimate.params import count_params  # noqa: E402
from memcalc.library import resolve_model  # noqa: E402
from memcalc.validate.fsdp import measure_fsdp  # noqa: E402


@pytest.fixture(scope="module")
def measurements():
    model = replace(resolve_model("llama-3.2-1b"), num_layers=2)
    return count_params(model).total, {n: measure_fsdp(model, n, seq_len=128) for n in (1, 2, 4, 8)}


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_fsdp2_shards_weights_gradients_and_adam_states(measurements, world_size):
    """ZeRO paper (Rajbhandari et al. 2020) P_os+g+p: every rank holds 1/N of parameters, gradients
    and optimizer states (pure bf16 here: 2 + 2 + 4 bytes per parameter; every dimension of this
    model divides by 8, so FSDP2 pads nothing). AdamW keeps one fp32 step counter per tensor."""
    params, by_world = measurements
    measured = by_world[world_size]
    assert measured.weights == 2 * params // world_size
    assert measured.gradients == 2 * params // world_size
    num_tensors = 2 + 2 * 9  # embedding, final norm, and 9 tensors per layer
    assert measured.optimizer_states == 4 * params // world_size + 4 * num_tensors  # fp32 step counters


def test_fsdp2_peak_falls_as_ranks_grow(measurements):
    _params, by_world = measurements
    peaks = [by_world[n].peak for n in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True)
    # the sharded state shrinks by 1/N; the activations and the gathered layers do not
    assert by_world[1].peak - by_world[8].peak < 8 * (by_world[1].weights - by_world[8].weights)


def test_tracker_counts_a_dtensor_by_its_local_shard():
    """A DTensor's own storage reports the global size; the memory is the local shard's. Counting
    the wrapper once made FSDP2's parameters, AdamW moments and foreach temporaries look unsharded."""
    import torch
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.tensor import DTensor, Shard

    from memcalc.validate.fsdp import _fake_process_group
    from memcalc.validate.tracker import LiveBytesTracker

    mesh = _fake_process_group(4)
    try:
        with FakeTensorMode():
            sharded = DTensor.from_local(torch.empty(250, 8), mesh, [Shard(0)], run_check=False)
            assert sharded.untyped_storage().nbytes() == 1000 * 8 * 4  # the wrapper: global size
            tracker = LiveBytesTracker()
            with tracker:
                moments = torch.zeros_like(sharded)
                assert tracker.live_bytes == 250 * 8 * 4
                assert tracker.storage_bytes([moments, sharded]) == 2 * 250 * 8 * 4
                del moments
                assert tracker.live_bytes == 0
    finally:
        dist.destroy_process_group()


def _root_and_layer_params(inventory) -> tuple[int, int]:
    root = sum(g.numel * g.count for g in inventory.groups if g.name in ("embed_tokens.weight", "final_norm.weight"))
    return root, (inventory.total - root) // 2


def test_fsdp2_working_set_above_the_sharded_state(measurements):
    """What each phase adds to the parameter and optimizer-state shards (pure bf16, 2 bytes each)."""
    params, by_world = measurements
    root, layer = _root_and_layer_params(count_params(replace(resolve_model("llama-3.2-1b"), num_layers=2)))
    small = 16 * 2**20  # activations of 128 tokens, token ids, the rotary buffer
    for n in (1, 2, 4, 8):
        measured = by_world[n]
        forward, backward, step = measured.above_static
        assert measured.static == measured.weights + measured.optimizer_states
        # optimizer step: the gradient shards and foreach AdamW's one temporary per tensor (sqrt of v)
        assert 2 * measured.gradients <= step < 2 * measured.gradients + 2**16
        assert backward > forward
        if n == 1:  # no all-gather buffers: the unsharded root is a copy of its shards
            assert 2 * root < forward < by_world[2].above_static[0]
        else:
            # the root (embedding, final norm) stays unsharded through forward; at layer 0's
            # copy-out the root's flat all-gather buffer is still alive beside layer 0's buffer
            # and layer 0's unsharded parameters
            assert 2 * (2 * root + 2 * layer) <= forward < 2 * (2 * root + 2 * layer) + small
    # the unsharded working set does not shrink as ranks grow
    assert by_world[2].above_static[0] == by_world[4].above_static[0] == by_world[8].above_static[0]


@pytest.mark.parametrize(("seq_len", "world_size"), [(128, 2), (128, 8), (1024, 2), (1024, 8)])
def test_fsdp2_phase_peaks_match_the_per_rank_estimate(seq_len, world_size):
    """`memcalc train --fsdp full` against FSDP2 measured on rank 0: the sharded state exactly, the
    optimizer step exactly, forward and backward within 10% (the estimate adds the gathered set and
    the activation peak at their largest; the measured peaks of a 2-layer model fall in between)."""
    from memcalc.config import TrainSettings
    from memcalc.estimate.training import estimate_training
    from memcalc.parallel import ParallelConfig

    model = replace(resolve_model("llama-3.2-1b"), num_layers=2)
    measured = measure_fsdp(model, world_size, seq_len=seq_len)
    estimate = estimate_training(model, TrainSettings(precision="pure-bf16", seq_len=seq_len),
                                 ParallelConfig(dp=world_size, zero=3, fsdp=True))
    assert estimate.component("weights").bytes == measured.weights
    assert estimate.component("gradients").bytes == measured.gradients
    forward, backward, step = measured.phase_peaks
    assert estimate.phases["optimizer_step"] == pytest.approx(step, rel=1e-3)
    assert estimate.phases["forward"] == pytest.approx(forward, rel=0.10)
    assert estimate.phases["backward"] == pytest.approx(backward, rel=0.10)


@pytest.mark.parametrize(("seq_len", "world_size"), [(128, 2), (128, 8), (1024, 2), (1024, 8)])
def test_lora_under_fsdp2_matches_the_per_rank_estimate(seq_len, world_size):
    """LoRA under FSDP2 (torchtune's lora_finetune_distributed: every parameter sharded, adapters in
    the model's dtype) measured on rank 0: the frozen base's and the adapters' shards and the
    adapters' gradients exactly, the optimizer states but for AdamW's fp32 step counter per adapter
    tensor; the step within 0.3%, backward within 2% (a frozen root has no gradient, a layer's
    reduce-scatter holds only its adapters', and the frozen head's backward ends before the last
    layer is prefetched), forward within 0.5%."""
    from memcalc.config import TrainSettings
    from memcalc.estimate.training import estimate_training
    from memcalc.parallel import ParallelConfig

    model = replace(resolve_model("llama-3.2-1b"), num_layers=2)
    measured = measure_fsdp(model, world_size, seq_len=seq_len, lora_rank=8)
    estimate = estimate_training(model, TrainSettings(precision="pure-bf16", seq_len=seq_len, lora_rank=8,
                                                      lora_dtype="bf16"),
                                 ParallelConfig(dp=world_size, zero=3, fsdp=True))
    assert estimate.component("weights").bytes == measured.weights
    assert estimate.component("gradients").bytes == measured.gradients
    adapter_tensors = 2 * 2 * 2  # lora_A and lora_B on q and v, two layers
    assert measured.optimizer_states - estimate.component("optimizer_states").bytes == 4 * adapter_tensors
    forward, backward, step = measured.phase_peaks
    assert estimate.phases["optimizer_step"] == pytest.approx(step, rel=3e-3)
    assert estimate.phases["backward"] == pytest.approx(backward, rel=0.005)
    assert estimate.phases["forward"] == pytest.approx(forward, rel=0.005)


@pytest.mark.parametrize(("layout", "extra", "message"), [
    ({"dp": 8, "zero": 1}, {}, "on one device, under DDP or under FSDP2"),
    ({"dp": 4, "tp": 2, "zero": 3, "fsdp": True}, {}, "on one device, under DDP or under FSDP2"),
    ({"dp": 8, "zero": 3, "fsdp": True}, {}, "--lora-dtype bf16"),
])
def test_lora_layouts_that_are_not_modelled_are_refused(layout, extra, message):
    from memcalc.config import TrainSettings
    from memcalc.errors import InputError
    from memcalc.estimate.training import estimate_training
    from memcalc.parallel import ParallelConfig

    with pytest.raises(InputError, match=message):
        estimate_training(resolve_model("llama-3-8b"), TrainSettings(lora_rank=8, **extra), ParallelConfig(**layout))


def test_separate_embedding_and_head_units_measure_lower():
    """torchtune's wrapping (the embedding and the head as FSDP units of their own) frees the 2 x
    (embedding + head) the root holds through forward."""
    model = replace(resolve_model("llama-3-8b"), num_layers=2)
    root = measure_fsdp(model, 2, seq_len=256)
    ends = measure_fsdp(model, 2, seq_len=256, wrap="layer+embedding+head")
    head_bytes = 2 * model.vocab_size * model.hidden_size
    assert root.static == ends.static
    assert root.above_static[0] - ends.above_static[0] > head_bytes

# (model, layers, seq, ranks): a large vocabulary (the head's buffers dominate) and a small one
# (the layers' dominate), each under the three wrappings, measured with FSDP2 on rank 0
WRAP_CASES = [("llama-3-8b", 2, 256, 8), ("llama-2-7b", 3, 1024, 4)]


@pytest.mark.parametrize("wrap", ["layer", "layer+embedding+head", "torchtitan"])
@pytest.mark.parametrize(("model_name", "layers", "seq_len", "world_size"), WRAP_CASES)
def test_fsdp_wrap_phase_peaks_match_the_estimate(model_name, layers, seq_len, world_size, wrap):
    """`--fsdp full --fsdp-wrap WRAP` against FSDP2 with the same units (memcalc.validate.fsdp):
    forward and backward within 3%, the optimizer step within 0.1%
    (benchmarks/parallel_accuracy.py runs the larger matrix)."""
    from memcalc.config import TrainSettings
    from memcalc.estimate.training import estimate_training
    from memcalc.parallel import ParallelConfig

    model = replace(resolve_model(model_name), num_layers=layers)
    measured = measure_fsdp(model, world_size, seq_len=seq_len, wrap=wrap)
    estimate = estimate_training(model, TrainSettings(precision="pure-bf16", seq_len=seq_len),
                                 ParallelConfig(dp=world_size, zero=3, fsdp=True, fsdp_wrap=wrap))
    forward, backward, step = measured.phase_peaks
    assert estimate.phases["forward"] == pytest.approx(forward, rel=0.03)
    assert estimate.phases["backward"] == pytest.approx(backward, rel=0.03)
    assert estimate.phases["optimizer_step"] == pytest.approx(step, rel=1e-3)


def test_embedding_unit_reduces_last_beside_every_gradient_shard():
    """With the embedding a unit of its own, its input (token ids) needs no gradient, so FSDP2
    reduces it in the final backward callback: the backward peak is the sharded state, every
    gradient shard, and the embedding's unsharded gradient beside its reduce-scatter input
    (2 x vocab x hidden x 2 bytes), by hand from FSDP2's foreach_reduce."""
    model = replace(resolve_model("llama-3-8b"), num_layers=2)
    measured = measure_fsdp(model, 2, seq_len=256, wrap="layer+embedding+head")
    embedding = 2 * model.vocab_size * model.hidden_size
    assert measured.above_static[1] - measured.gradients == pytest.approx(2 * embedding, abs=2**20)


def test_torchtitan_keeps_the_head_gathered_through_the_loss():
    """torchtitan's [final norm, head] unit is not resharded after forward: at the loss it holds
    the head's parameters (vocab x hidden x 2 bytes) that the separately wrapped head frees."""
    model = replace(resolve_model("llama-3-8b"), num_layers=2)
    ends = measure_fsdp(model, 8, seq_len=2048, wrap="layer+embedding+head")
    torchtitan = measure_fsdp(model, 8, seq_len=2048, wrap="torchtitan")
    head = 2 * model.vocab_size * model.hidden_size
    assert torchtitan.phase_peaks[0] - ends.phase_peaks[0] == pytest.approx(head, abs=2**20)


@pytest.mark.parametrize("lora_rank", [None, 8])
def test_hybrid_sharding_matches_the_per_rank_estimate(lora_rank):
    """`--fsdp hybrid --gpus 16 --gpus-per-node 4` against FSDP2's HSDP (a 4 x 4 mesh: sharded over
    4 ranks, all-reduced across 4 replicas), full training and LoRA (torchtune's distributed
    recipe): the shards exactly, every phase within 2%."""
    from memcalc.config import TrainSettings
    from memcalc.estimate.training import estimate_training
    from memcalc.scenario import Scenario, parallel_config

    model = replace(resolve_model("llama-3-8b"), num_layers=2)
    measured = measure_fsdp(model, 16, seq_len=256, lora_rank=lora_rank, replicas=4)
    lora = {"lora_rank": lora_rank, "lora_dtype": "bf16"} if lora_rank else {}
    estimate = estimate_training(model, TrainSettings(precision="pure-bf16", seq_len=256, **lora),
                                 parallel_config(Scenario(gpus=16, fsdp="hybrid", gpus_per_node=4)))
    assert estimate.component("weights").bytes == measured.weights
    assert estimate.component("gradients").bytes == measured.gradients
    for phase, peak in zip(("forward", "backward", "optimizer_step"), measured.phase_peaks, strict=True):
        assert estimate.phases[phase] == pytest.approx(peak, rel=0.02), phase


@pytest.mark.parametrize(("model_name", "layers", "seq_len", "world_size"),
                         [("llama-3-8b", 2, 256, 8), ("llama-2-7b", 3, 2048, 8), ("llama-2-7b", 3, 256, 2)])
def test_qlora_under_fsdp2_matches_the_per_rank_estimate(model_name, layers, seq_len, world_size):
    """QLoRA under FSDP2 (bitsandbytes' packed weights as parameters, as Answer.AI's fsdp_qlora
    shards them): the parameter shards exactly, the quantisation state (module buffers, whole on
    every rank) beside them, every phase within 1% (a layer's all-gather of packed weights, the
    weight its backward dequantises)."""
    from memcalc.config import TrainSettings
    from memcalc.estimate.lora import qlora_state_bytes
    from memcalc.estimate.training import estimate_training
    from memcalc.parallel import ParallelConfig

    model = replace(resolve_model(model_name), num_layers=layers)
    measured = measure_fsdp(model, world_size, seq_len=seq_len, lora_rank=8, qlora=True)
    estimate = estimate_training(model, TrainSettings(precision="pure-bf16", seq_len=seq_len, lora_rank=8,
                                                      lora_dtype="bf16", qlora=True, lora_targets=("q", "v")),
                                 ParallelConfig(dp=world_size, zero=3, fsdp=True))
    state = qlora_state_bytes(model, "bf16")
    # the packed shards: every dimension here divides by the ranks, so FSDP2 pads nothing
    assert estimate.component("weights").bytes - state == measured.weights
    for phase, peak in zip(("forward", "backward", "optimizer_step"), measured.phase_peaks, strict=True):
        assert estimate.phases[phase] == pytest.approx(peak, rel=0.01), phase


@pytest.mark.parametrize("wrap", ["layer", "layer+embedding+head", "torchtitan"])
@pytest.mark.parametrize(("model_name", "layers", "seq_len", "world_size"), [("llama-3-8b", 2, 256, 8),
                                                                             ("llama-2-7b", 3, 1024, 2)])
def test_fsdp2_mixed_precision_matches_the_per_rank_estimate(model_name, layers, seq_len, world_size, wrap):
    """`--precision mixed-bf16 --fsdp full` against FSDP2's MixedPrecisionPolicy as torchtitan sets
    it (fp32 parameters, bf16 compute, fp32 reduce): the sharded parameters are the fp32 copy (no
    bf16 shard beside them) and the gradient shards fp32, exactly; the gathered layers bf16, the
    reduce-scatter buffers fp32; every phase within 3% (a small vocabulary's layers' backward
    is low by up to 2%, as in pure bf16)."""
    from memcalc.config import TrainSettings
    from memcalc.estimate.training import estimate_training
    from memcalc.parallel import ParallelConfig

    model = replace(resolve_model(model_name), num_layers=layers)
    measured = measure_fsdp(model, world_size, dtype="fp32", seq_len=seq_len, wrap=wrap, mixed_precision=True)
    estimate = estimate_training(model, TrainSettings(precision="mixed-bf16", seq_len=seq_len),
                                 ParallelConfig(dp=world_size, zero=3, fsdp=True, fsdp_wrap=wrap))
    components = {component.key: component.bytes for component in estimate.components}
    assert components["weights"] == measured.weights and components["master_weights"] == 0
    assert components["gradients"] == measured.gradients
    for phase, peak in zip(("forward", "backward", "optimizer_step"), measured.phase_peaks, strict=True):
        assert estimate.phases[phase] == pytest.approx(peak, rel=0.03), phase
