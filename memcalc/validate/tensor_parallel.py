"""Per-rank memory under tensor parallelism (and sequence parallelism) on fake tensors and a fake
process group: one process plays rank 0 of a TP group of ``tp`` ranks, with no GPUs and no
communication (the pattern of ``memcalc.validate.fsdp``).

The reference decoder is parallelised with ``torch.distributed.tensor.parallel.parallelize_module``
and the plan of torchtitan's ``apply_tp`` (torchtitan/models/llama3/infra/parallelize.py):
``ColwiseParallel`` for the query, key, value, gate and up projections, ``RowwiseParallel`` for the
output and down projections, a vocabulary-parallel embedding, an output layer sharded on the
vocabulary and the cross-entropy under ``loss_parallel`` (Megatron's vocab-parallel loss). With
sequence parallelism the norms run as ``SequenceParallel`` on ``Shard(1)`` (tokens divided by TP),
``PrepareModuleInput`` all-gathers the attention and MLP inputs, and the row-parallel layers
reduce-scatter back to ``Shard(1)``; without it the hidden-size stream is replicated and the
row-parallel layers all-reduce (Megatron's f/g operators, Shoeybi et al. 2019).

Attention runs on the local heads: ``ColwiseParallel`` returns local tensors
(``use_local_output=True``), and the attention modules are told their local head counts (the
reference ``Attention`` reshapes by ``num_heads``; torchtitan infers the count from the local
shape instead, which is the same thing).

Counting. ``LiveBytesTracker`` sees what each operator returns, but an operator on a ``DTensor``
runs its local operators (and any redistribution it needs, and loss_parallel's log-softmax and
NLL handlers) while the tracker is popped, so their temporaries would be missed. Here the fake
tensor mode itself also reports what every top-level fake operator returns to the tracker, so
every local tensor a rank allocates is counted once (the tracker deduplicates storages); the
sharding propagation, which runs each operator on global-size fake tensors that no rank holds,
is excluded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_leaves

from memcalc.config import ModelConfig
from memcalc.validate.model import Decoder, causal_lm_loss
from memcalc.validate.run import TORCH_DTYPES, _default_dtype
from memcalc.validate.tracker import LiveBytesTracker, _memory_holders, optimizer_state_tensors


@dataclass(frozen=True)
class TensorParallelMeasurement:
    tp: int
    sequence_parallel: bool
    weights: int  # this rank's parameter shards (buffers excluded)
    gradients: int  # this rank's gradient shards after backward
    optimizer_states: int
    activations: int  # the most live bytes beyond static state and accumulated gradients, forward or backward
    phase_peaks: tuple[int, int, int]  # forward, backward, optimizer step (steady state)
    buffers: int = 0  # non-persistent buffers (the rotary inverse frequencies)
    forward_activations: int = 0
    backward_activations: int = 0
    peak_tensors: tuple = ()  # (op, shape, dtype, bytes) live at the activation peak, when asked for

    @property
    def total(self) -> int:
        return max(self.phase_peaks)


class _TPDecoder(Decoder):
    """The reference decoder with its output layer called as a module, so that the TP plan's
    hooks on ``lm_head`` run (``Decoder.forward`` calls ``F.linear`` on its weight)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids))


def _fake_process_group(world_size: int):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    return init_device_mesh("cpu", (world_size,))


def tp_plan(sequence_parallel: bool, loss_parallel: bool = True) -> tuple[dict, dict]:
    """(root plan, per-block plan) in the reference decoder's module names (torchtitan's
    ``tok_embeddings/norm/output`` are ``embed_tokens/final_norm/lm_head``; ``attention_norm``,
    ``attention``, ``ffn_norm``, ``feed_forward`` are ``input_norm``, ``attn``,
    ``post_attention_norm``, ``mlp``)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    head_output = Shard(-1) if loss_parallel else Replicate()
    if sequence_parallel:
        root = {
            "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "final_norm": SequenceParallel(),
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=head_output,
                                       use_local_output=not loss_parallel),
        }
        block = {
            "input_norm": SequenceParallel(),
            # Block calls attn(x, rope, cache, layer_index)
            "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                       desired_input_layouts=(Replicate(), None, None, None)),
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_norm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
    else:
        # Megatron's TP without SP: the stream and the norms are replicated (plain local tensors),
        # the column-parallel layers read it whole, the row-parallel layers all-reduce.
        root = {
            "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "lm_head": ColwiseParallel(input_layouts=Replicate(), output_layouts=head_output,
                                       use_local_output=not loss_parallel),
        }
        block = {
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }
    return root, block


def _check_divisible(config: ModelConfig, tp: int, seq_len: int, sequence_parallel: bool) -> None:
    if config.moe is not None:
        raise ValueError("tensor-parallel measurement covers dense models")
    if config.tie_word_embeddings:
        raise ValueError("tensor-parallel measurement needs an untied output layer")
    checks = {"attention heads": config.num_attention_heads, "key/value heads": config.kv_heads,
              "intermediate size": config.intermediate_size, "vocabulary": config.vocab_size}
    if sequence_parallel:
        checks["sequence length"] = seq_len
    for name, value in checks.items():
        if value % tp:
            raise ValueError(f"{name} ({value}) is not divisible by tp={tp}")


def build_tp_model(config: ModelConfig, mesh, sequence_parallel: bool, loss_parallel: bool = True) -> _TPDecoder:
    """A ``_TPDecoder`` parallelised over ``mesh`` (built under the caller's fake mode and dtype)."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp = mesh.size()
    model = _TPDecoder(config, attention="sdpa")
    root, block = tp_plan(sequence_parallel, loss_parallel)
    parallelize_module(model, mesh, root)
    for layer in model.layers:
        parallelize_module(layer, mesh, block)
        # local heads (torchtitan: view(bs, seqlen, -1, head_dim) on the local projections)
        layer.attn.num_heads //= tp
        layer.attn.num_kv_heads //= tp
    return model


class _CountingFakeMode:
    """Makes a ``FakeTensorMode`` report what its top-level operators return to ``tracker``: the
    local operators a ``DTensor`` runs happen while the tracker is popped. Nested dispatches
    (decompositions inside one fake operator) and sharding propagation are not reported."""

    def __init__(self, fake_mode, tracker: LiveBytesTracker):
        self.fake_mode, self.tracker = fake_mode, tracker
        self.depth = 0
        self.paused = 0
        self.current_op = None

    @contextlib.contextmanager
    def installed(self):
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        fake_mode, counter = self.fake_mode, self
        original_dispatch = fake_mode.dispatch  # bound method
        original_propagate = ShardingPropagator._propagate_tensor_meta_non_cached

        def dispatch(func, types, args=(), kwargs=None):
            counter.depth += 1
            try:
                out = original_dispatch(func, types, args, kwargs or {})
            finally:
                counter.depth -= 1
            if counter.depth == 0 and not counter.paused:
                counter.current_op = func
                for leaf in tree_leaves(out):
                    if isinstance(leaf, torch.Tensor):
                        counter.tracker.track(leaf)
            return out

        def propagate(self_, op_schema):
            counter.paused += 1
            try:
                return original_propagate(self_, op_schema)
            finally:
                counter.paused -= 1

        fake_mode.dispatch = dispatch
        ShardingPropagator._propagate_tensor_meta_non_cached = propagate
        try:
            yield self
        finally:
            del fake_mode.dispatch
            ShardingPropagator._propagate_tensor_meta_non_cached = original_propagate


class _AttributingTracker(LiveBytesTracker):
    """A ``LiveBytesTracker`` that remembers which operator made each storage, and the live
    storages at the activation peak of the phase being watched (for explaining residuals)."""

    def __init__(self, counter_ref: list) -> None:
        super().__init__()
        self.counter_ref = counter_ref
        self.origin: dict[int, tuple] = {}
        self.watch = False
        self.snapshot: list = []
        self.snapshot_bytes = -1
        self.static_keys: set[int] = set()
        self.params: list = []

    def track(self, tensor: torch.Tensor) -> None:
        counter = self.counter_ref[0] if self.counter_ref else None
        op = getattr(counter, "current_op", None)
        for inner in _memory_holders(tensor):
            storage = inner.untyped_storage()
            if id(storage) not in self._storages or self._storages[id(storage)][0]() is not storage:
                self.origin[id(storage)] = (str(op), tuple(inner.shape), str(inner.dtype).replace("torch.", ""))
            self._track_storage(storage)

    def _update_peaks(self) -> None:
        before = self.peak_activation_bytes
        super()._update_peaks()
        if self.watch and self.peak_activation_bytes > max(before, self.snapshot_bytes):
            self.snapshot_bytes = self.peak_activation_bytes
            excluded = self.static_keys | self._gradient_keys()
            self.snapshot = [(self.origin.get(key, ("?", (), "?")), record[0])
                             for key, (ref, record) in self._storages.items()
                             if ref() is not None and key not in excluded]

    def _gradient_keys(self) -> set[int]:
        keys = set()
        for param in self.params:
            if param.grad is not None:
                keys.update(id(inner.untyped_storage()) for inner in _memory_holders(param.grad))
        return keys

    def mark_static(self, tensors) -> None:
        for tensor in tensors:
            self.static_keys.update(id(inner.untyped_storage()) for inner in _memory_holders(tensor))


def measure_tensor_parallel(config: ModelConfig, tp: int, sequence_parallel: bool = False,
                            precision: str = "pure-bf16", batch_size: int = 2, seq_len: int = 128,
                            loss_parallel: bool = True, explain: bool = False,
                            count_local_ops: bool = True) -> TensorParallelMeasurement:
    """Rank 0 of a TP group of ``tp`` ranks: two training iterations with AdamW (foreach) in pure
    ``precision`` (weights, gradients and states in one dtype), the second one measured. ``tp=1``
    runs the plain model (no DTensor, the native cross-entropy), the baseline a single GPU runs.

    ``explain=True`` also records the tensors live at the activation peak (``peak_tensors``).
    ``count_local_ops=False`` counts only what ``LiveBytesTracker`` sees by itself (the outputs of
    operators, not the temporaries of the local operators a ``DTensor`` operator runs)."""
    if config.mla is not None and tp > 1:
        from memcalc.errors import InputError

        raise InputError("tensor-parallel measurement runs grouped-query attention; multi-head latent attention "
                         "(DeepSeek) is estimated only")
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.tensor.parallel import loss_parallel as loss_parallel_context

    from memcalc.precision import RECIPES

    recipe = RECIPES[precision]
    if recipe.master_dtype is not None or recipe.autocast:
        raise ValueError(f"tensor-parallel measurement runs pure precision recipes, not {precision!r}")
    _check_divisible(config, tp, seq_len, sequence_parallel)
    dtype = TORCH_DTYPES[recipe.weight_dtype.value]

    # tp=1 is the plain model every single-device run uses (native cross-entropy, no DTensor)
    distributed = tp > 1
    loss_parallel = loss_parallel and distributed
    mesh = _fake_process_group(tp) if distributed else None
    counter_ref: list = []
    tracker = _AttributingTracker(counter_ref) if explain else LiveBytesTracker()
    fake_mode = FakeTensorMode()
    counter = _CountingFakeMode(fake_mode, tracker)
    counter_ref.append(counter)
    loss_context = loss_parallel_context if loss_parallel else contextlib.nullcontext
    try:
        installed = counter.installed() if count_local_ops else contextlib.nullcontext()
        with fake_mode, installed, tracker:
            with _default_dtype(dtype):
                model = build_tp_model(config, mesh, sequence_parallel, loss_parallel) if distributed \
                    else _TPDecoder(config, attention="sdpa")
            params = list(model.parameters())
            weights = tracker.storage_bytes([_local(p) for p in params])
            buffers = tracker.storage_bytes(list(model.buffers()))
            tracker.static_bytes = weights + buffers
            if explain:
                tracker.params = params
                tracker.mark_static(params + list(model.buffers()))
            # foreach kernels take DTensors or plain tensors, not both: without SP the norms keep
            # plain (replicated) weights, so they form their own parameter group
            from torch.distributed.tensor import DTensor

            groups = [[p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]]
            optimizer = torch.optim.AdamW([{"params": group} for group in groups if group], lr=1e-4, foreach=True)

            def count_gradient(param: torch.Tensor) -> None:
                tracker.gradient_bytes += tracker.storage_bytes([param.grad])

            for param in params:
                param.register_post_accumulate_grad_hook(count_gradient)

            input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
            labels = torch.randint(0, config.vocab_size, (batch_size, seq_len))
            for iteration in range(2):
                measured = iteration == 1
                tracker.gradient_bytes = 0
                if explain:
                    tracker.watch = measured
                tracker.reset_peaks()
                with loss_context():
                    logits = model(input_ids)
                    loss = causal_lm_loss(logits, labels)
                    del logits
                    forward, forward_act = tracker.peak_bytes, tracker.peak_activation_bytes
                    tracker.reset_peaks()
                    loss.backward()
                del loss
                backward, backward_act = tracker.peak_bytes, tracker.peak_activation_bytes
                if explain:
                    tracker.watch = False
                gradients = tracker.storage_bytes([_local(p.grad) for p in params])
                tracker.reset_peaks()
                optimizer.step()
                step = tracker.peak_bytes
                optimizer.zero_grad(set_to_none=True)
                if iteration == 0:
                    states = [_local(value) for value in optimizer_state_tensors(optimizer)]
                    states_bytes = tracker.storage_bytes(states)
                    tracker.static_bytes += states_bytes
                    if explain:
                        tracker.mark_static(states)
            snapshot = tuple(tracker.snapshot) if explain else ()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return TensorParallelMeasurement(
        tp, sequence_parallel, weights, gradients, states_bytes, max(forward_act, backward_act),
        (forward, backward, step), buffers, forward_act, backward_act, snapshot,
    )


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def unmodelled_bytes(config: ModelConfig, batch_size: int, seq_len: int, element_bytes: int = 2) -> int:
    """Small tensors neither side models: the rotary cos/sin tables (seq x head_dim each) and the
    per-token index and mask tensors of loss_parallel's NLL (int64 and fp32, under 40 B a token)."""
    return 2 * seq_len * config.attention_head_dim * element_bytes + 40 * batch_size * seq_len
