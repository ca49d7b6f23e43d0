"""A training step under DeepSpeed ZeRO-1, 2 or 3, measured with real tensors on the CPU.

DeepSpeed's optimizers (``deepspeed/runtime/zero/stage_1_and_2.py``, ``DeepSpeedZeroOptimizer``;
``stage3.py``, ``DeepSpeedZeroOptimizer_Stage3``, with ``partition_parameters.py`` and
``partitioned_param_coordinator.py``) allocate their buffers with plain ``torch.empty`` and
``torch.zeros`` calls, which the tracker sees on any device, so this harness runs DeepSpeed itself:
``DS_ACCELERATOR=cpu``, a gloo group of ``world_size`` processes on this machine, each rank
counting its own live tensors from the model's construction on (``LiveBytesTracker``). Rank 0's
phases are returned: forward, ``engine.backward`` (with the reduction it ends with) and
``engine.step`` (the optimizer step and the all-gather of the updated parameters).

ZeRO-1/2, what the run shows (DeepSpeed 0.19.8; the estimate's rule is
``memcalc.estimate.training.deepspeed_buffer_bytes``):

* ``setup_buckets``, on the first gradient hook of a backward, allocates the ``ipg_buffer``:
  ``reduce_bucket_size`` elements in the gradients' dtype, a second one with ``overlap_comm``
  (contiguous_gradients, the default). ``_release_ipg_buffers`` at the end of the backward's
  reduction (``independent_gradient_partition_epilogue``) drops them, and the gradients that
  were views into them.
* The gradients of the parameters in the rank's partition are copied into ``grads_in_partition``
  (one flat buffer of those parameters' elements, gradient dtype) and kept for the step; the
  others are freed (ZeRO-2: as each bucket is reduced; ZeRO-1: after the whole backward, when the
  reduction runs).
* ``step`` flattens the partition, casts it to an fp32 ``single_partition_of_fp32_groups[i].grad``,
  frees the 16-bit gradients and steps; the updated partitions are all-gathered in place into the
  flat 16-bit parameter group (``all_gather_into_tensor_dp_groups``), with no buffer of its own.

ZeRO-3 (``stage=3``; the model is built whole and ``deepspeed.initialize`` partitions it, as
``DeepSpeedZeRoOffload._convert_to_zero_parameters`` does for a model made outside
``zero.Init``). What the run shows is DeepSpeed's own bookkeeping, which
``memcalc.estimate.zero3`` follows function by function: the persistent buffers of
``DeepSpeedZeroOptimizer_Stage3.__init__`` (the flat 16-bit partitions ``lp_param_buffer``, the
fp32 partitions, the gradient partitions ``grad_partitions_flat_buffer`` and the
``reduce_bucket_size`` ipg buffer, allocated once and kept), the parameters of at most
``stage3_param_persistence_threshold`` elements kept whole (``mark_persistent_parameters``), and
the parameter coordinator's all-gathers, prefetches and releases over the recorded module trace
(``PartitionedParameterCoordinator``). ``DeepSpeedMeasurement.trace`` records, for the measured
iteration, the bytes of gathered (non-persistent) parameters after every module's fetch and
release, which ``memcalc.estimate.zero3.simulate`` reproduces. gloo's reduce-scatter (which
DeepSpeed's ``reduce_scatter_coalesced`` calls) returns a reduced copy of its whole input before
copying its chunk out; NCCL reduces in place, so that copy of the harness's backend is not counted.

LoRA (``lora_rank``): the decoder's parameters frozen and adapters on ``lora_targets``
(``memcalc.validate.model.apply_lora``) in the weights' dtype (DeepSpeed's bf16/fp16 mode keeps
every parameter in it), as PEFT + DeepSpeed ZeRO-3 runs: every parameter partitioned, only the
adapters in the optimizer's groups (``_get_trainable_parameter_groups``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from memcalc.config import ModelConfig
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py, DeepSpeedZeroConfig), declared once
from memcalc.parallel import DEFAULT_REDUCE_BUCKET_SIZE, Zero3Knobs
from memcalc.validate.run import Phase, TrainWorkload


@dataclass(frozen=True)
class DeepSpeedRun:
    """A DeepSpeed ZeRO configuration (``zero_optimization`` keys, elements)."""

    stage: int = 2
    world_size: int = 2
    reduce_bucket_size: int = DEFAULT_REDUCE_BUCKET_SIZE
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    zero3: Zero3Knobs = Zero3Knobs()  # ZeRO-3's stage3_* keys, the layout's type


@dataclass(frozen=True)
class DeepSpeedMeasurement:
    phases: dict[str, Phase]
    static_bytes: int  # live bytes after deepspeed.initialize (flat 16-bit groups, fp32 partitions)
    ipg_buffer_bytes: int  # what setup_buckets allocated (ZeRO-3: the ipg buffer of __init__)
    version: str
    # ZeRO-3 only
    persistent_bytes: int = 0  # the parameters kept whole (stage3_param_persistence_threshold)
    optimizer_state_bytes: int = 0
    gathered: dict[str, int] = field(default_factory=dict)  # gathered parameter bytes at each phase's peak
    # (event, module name, gathered bytes, the coordinator's count of available elements) after
    # each fetch and release of the measured iteration
    trace: tuple[tuple[str, str, int, int], ...] = ()
    # the coordinator's module trace: (module name, parameters of its own, in elements), forward
    # then backward, as DeepSpeed recorded it
    module_trace: tuple[tuple[str, int], ...] = ()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _zero_config(run: DeepSpeedRun) -> dict:
    config = {"stage": run.stage, "reduce_bucket_size": run.reduce_bucket_size, "overlap_comm": run.overlap_comm,
              "contiguous_gradients": run.contiguous_gradients}
    if run.stage == 3:
        knobs = run.zero3
        config.update(stage3_prefetch_bucket_size=knobs.prefetch_bucket_size,
                      stage3_param_persistence_threshold=knobs.param_persistence_threshold,
                      stage3_max_live_parameters=knobs.max_live_parameters,
                      stage3_max_reuse_distance=knobs.max_reuse_distance)
    else:
        config["allgather_bucket_size"] = run.allgather_bucket_size
    return config


def _rank(rank: int, port: int, model_config: ModelConfig, workload: TrainWorkload, run: DeepSpeedRun,
          queue) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(run.world_size), LOCAL_SIZE=str(run.world_size))
    import logging

    import torch

    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from memcalc.validate.model import Decoder, apply_lora, causal_lm_loss
    from memcalc.validate.run import TORCH_DTYPES, _Meter
    from memcalc.validate.tracker import LiveBytesTracker

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    # gloo's reduce-scatter returns a reduced copy of its whole input, which it then copies out
    # (ProcessGroupGloo); NCCL reduces in place: that copy is this harness's backend, not DeepSpeed's.
    # DeepSpeed's TorchBackend takes the function when it is created, so before init_distributed.
    reduce_scatter = torch.distributed.reduce_scatter_tensor
    untracked: list = []

    def in_place_reduce_scatter(*args, **kwargs):
        with untracked[0].untracked():
            return reduce_scatter(*args, **kwargs)

    torch.distributed.reduce_scatter_tensor = in_place_reduce_scatter
    deepspeed.init_distributed(dist_backend="gloo")
    from memcalc.precision import RECIPES

    recipe = RECIPES[workload.precision]
    if recipe.master_dtype is None or recipe.autocast:
        raise ValueError("DeepSpeed ZeRO is measured with 16-bit weights and fp32 master partitions")
    if workload.lora_rank is not None and (run.stage != 3 or workload.qlora):
        raise ValueError("LoRA is measured under DeepSpeed ZeRO-3, without QLoRA")
    dtype = TORCH_DTYPES[recipe.weight_dtype.value]
    stage3 = run.stage == 3
    probe: dict = {"model": None, "on": False, "snapshot": 0}

    class RealBytesTracker(LiveBytesTracker):
        # DeepSpeed keeps each parameter's shape as a meta tensor (``round_robin_bit16_meta``):
        # a storage that reports its size and holds no memory
        def track(self, tensor: torch.Tensor) -> None:
            if tensor.device.type != "meta":
                super().track(tensor)

        def _update_peaks(self) -> None:
            rising = self.live_bytes > self.peak_bytes
            super()._update_peaks()
            if rising and probe["on"]:
                probe["snapshot"] = gathered_bytes()

    def gathered_bytes() -> int:
        """Bytes of the gathered parameters that are not persistent: each parameter's full data
        (its own copy, or a view of a sequential all-gather's buffer) and the flat buffers of the
        coalesced all-gathers still referenced by the coordinator's in-flight registry."""
        model = probe["model"]
        storages: dict[int, int] = {}
        for param in model.parameters():
            if getattr(param, "ds_persist", False) or param.data.numel() == 0:
                continue
            storage = param.data.untyped_storage()
            storages[id(storage)] = storage.nbytes()
        for handle in set(getattr(model, "ds_inflight_param_registry", {}).values()):
            for inner in getattr(handle, "handles", [handle]):
                partitions = getattr(inner, "partitions", None)
                if partitions:
                    storage = partitions[0].untyped_storage()
                    storages[id(storage)] = storage.nbytes()
        return sum(storages.values())

    tracker = RealBytesTracker()
    untracked.append(tracker)
    meter = _Meter("cpu", tracker)

    ipg = [0]
    setup_buckets = DeepSpeedZeroOptimizer.setup_buckets

    def counted_setup_buckets(self):
        before = tracker.live_bytes
        setup_buckets(self)
        ipg[0] = max(ipg[0], tracker.live_bytes - before)

    DeepSpeedZeroOptimizer.setup_buckets = counted_setup_buckets
    trace: list[tuple[str, str, int, int]] = []
    if stage3:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        fetch, release = PartitionedParameterCoordinator.fetch_sub_module, PartitionedParameterCoordinator.release_sub_module

        def recorded(method, event):
            def wrapped(self, module, forward, *args, **kwargs):
                result = method(self, module, forward, *args, **kwargs)
                if probe["on"]:
                    trace.append((f"{event} {'forward' if forward else 'backward'}", names.get(id(module), "?"),
                                  gathered_bytes(), self._PartitionedParameterCoordinator__n_available_params))
                return result
            return wrapped

        PartitionedParameterCoordinator.fetch_sub_module = recorded(fetch, "fetch")
        PartitionedParameterCoordinator.release_sub_module = recorded(release, "release")
    config = {
        "train_micro_batch_size_per_gpu": workload.batch_size,
        "gradient_accumulation_steps": 1,
        "bf16" if dtype is torch.bfloat16 else "fp16": {"enabled": True},
        "zero_optimization": _zero_config(run),
    }
    torch.manual_seed(0)
    with tracker:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = Decoder(model_config, attention="sdpa")
            if workload.lora_rank is not None:
                apply_lora(model, workload.lora_targets, workload.lora_rank, dtype=dtype)
        finally:
            torch.set_default_dtype(previous)
        names = {id(module): name for name, module in model.named_modules()}
        probe["model"] = model
        trained = [param for param in model.parameters() if param.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-4, foreach=True)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        static = tracker.live_bytes
        input_ids = torch.randint(0, model_config.vocab_size, (workload.batch_size, workload.seq_len))
        labels = torch.randint(0, model_config.vocab_size, (workload.batch_size, workload.seq_len))
        phases: dict[str, Phase] = {}
        gathered: dict[str, int] = {}
        for iteration in range(workload.iterations):
            probe["on"] = stage3 and iteration == workload.iterations - 1
            trace.clear()

            def start() -> None:
                meter.start()
                probe["snapshot"] = gathered_bytes() if probe["on"] else 0

            def stop(name: str) -> None:
                phases[name] = meter.stop()
                gathered[name] = probe["snapshot"]

            start()
            loss = causal_lm_loss(engine(input_ids), labels)
            stop("forward")
            start()
            engine.backward(loss)
            del loss
            stop("backward")
            start()
            engine.step()
            stop("optimizer_step")
        probe["on"] = False
        persistent = states = 0
        module_trace: tuple[tuple[str, int], ...] = ()
        if stage3:
            zero = engine.optimizer
            ipg[0] = sum(bucket.buffer.untyped_storage().nbytes() for bucket in zero.ipg_buckets.values()
                         if getattr(bucket, "buffer", None) is not None)
            persistent = sum({id(param.data.untyped_storage()): param.data.untyped_storage().nbytes()
                              for param in zero.persistent_parameters}.values())
            states = sum(value.untyped_storage().nbytes() for state in zero.optimizer.state.values()
                         for value in state.values() if torch.is_tensor(value))
            coordinator = zero.parameter_offload.get_param_coordinator()
            order = coordinator._PartitionedParameterCoordinator__submodule_order
            module_trace = tuple((names.get(id(module), "?"), sum(p.ds_numel for p in module.parameters(recurse=False)))
                                 for module in order)
    if rank == 0:
        queue.put(DeepSpeedMeasurement(phases, static, ipg[0], deepspeed.__version__, persistent, states,
                                       gathered if stage3 else {}, tuple(trace), module_trace))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure_deepspeed(model_config: ModelConfig, workload: TrainWorkload, run: DeepSpeedRun) -> DeepSpeedMeasurement:
    """Rank 0's phases of the last of ``workload.iterations`` steps under DeepSpeed ZeRO ``run.stage``."""
    import torch.multiprocessing as mp

    import glob

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = _free_port()
    try:
        mp.start_processes(_rank, args=(port, model_config, workload, run, queue), nprocs=run.world_size,
                           join=True, start_method="spawn")
        return queue.get()
    finally:
        # DeepSpeed's CPU allreduce (ops/csrc/cpu/comm/shm.cpp, shm_initialize) leaves a 66 MB
        # segment per rank in /dev/shm, named by uid, address and port, and never unlinks it: a
        # few hundred runs fill the tmpfs, which is the machine's memory
        for segment in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"):
            os.unlink(segment)
