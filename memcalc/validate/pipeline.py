"""One pipeline rank's memory under the 1F1B schedule, measured on fake tensors: the stage of the
reference decoder that rank holds and the order in which it runs forwards and backwards.

The stage is built as Megatron-LM builds it: the rank's decoder layers (``stage_layers``:
``get_num_layers_to_build`` and ``get_transformer_layer_offset``), the embedding on the first
rank, the final norm, the output layer and the loss on the last (a tied embedding gets its own
copy there, ``LanguageModule.setup_embeddings_and_output_layer``). No process group is needed:
what crosses a stage boundary is a tensor of the stream's shape, so a received activation is a
new fake tensor that requires grad, and a received gradient a new fake tensor.

The schedule is ``forward_backward_pipelining_without_interleaving``
(``megatron/core/pipeline_parallel/schedules.py``): rank ``r`` of ``pp`` runs
``min(pp - r - 1, m)`` warm-up forwards, then one forward and one backward per remaining
micro-batch, then the cool-down backwards. Between its forward and its backward a micro-batch
keeps what autograd saved and the received input (``input_tensors``, for its gradient); its
output is pseudo-freed once sent (``deallocate_output_tensor``: ``.data`` becomes one element,
Megatron's training loop sets ``deallocate_pipeline_outputs``) and its backward calls the autograd
engine directly (``custom_backward``). Gradients accumulate over the micro-batches into persistent
buffers (Megatron's DDP grad buffer): here the parameters' ``.grad``, kept (zeroed) across steps.

Pure-precision AdamW (foreach) as ``memcalc.validate.tensor_parallel``: weights, gradients and
moments in one dtype; two steps, the second measured (the first, of one micro-batch, makes the
gradient buffers and the optimizer states).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memcalc.config import ModelConfig, PositionKind
from memcalc.parallel import ParallelConfig, stage_layers
from memcalc.validate.model import ROPE_THETA, Block, Decoder, causal_lm_loss, make_norm
from memcalc.validate.run import TORCH_DTYPES, _default_dtype
from memcalc.validate.tracker import LiveBytesTracker, optimizer_state_tensors


@dataclass(frozen=True)
class PipelineMeasurement:
    rank: int
    pp: int
    microbatches: int
    indices: tuple[int, ...]  # the model's layers on this rank
    weights: int  # parameters (buffers excluded)
    gradients: int  # the accumulated gradients after backward
    optimizer_states: int
    activations: int  # the most live bytes beyond static state and gradients, forward or backward
    phase_peaks: tuple[int, int, int]  # forward, backward, optimizer step (the second step)
    buffers: int = 0  # the rotary inverse frequencies
    inflight: int = 0  # the most micro-batches between their forward and their backward at once
    forward_activations: int = 0
    backward_activations: int = 0

    @property
    def total(self) -> int:
        return max(self.phase_peaks)


class PipelineStage(nn.Module):
    """The layers ``indices`` of the reference decoder, with the embedding when ``first`` and the
    final norm and output layer when ``last``; the module names are ``Decoder``'s."""

    rope = Decoder.rope  # the same rotary tables, computed per forward

    def __init__(self, model: ModelConfig, indices: tuple[int, ...], first: bool, last: bool,
                 attention: str = "sdpa"):
        super().__init__()
        self.config, self.first, self.last = model, first, last
        if first:
            self.embed_tokens = nn.Embedding(model.vocab_size, model.hidden_size)
            if model.position_embedding is PositionKind.LEARNED:
                self.embed_positions = nn.Embedding(model.max_position_embeddings, model.hidden_size)
        # Block(index) makes an MoE layer where the whole model has one (first_dense_layers)
        self.layers = nn.ModuleList(Block(model, index, attention) for index in indices)
        if last:
            self.final_norm = make_norm(model, model.hidden_size)
            # a tied head shares the embedding only when this rank holds both
            if not (model.tie_word_embeddings and first):
                self.lm_head = nn.Linear(model.hidden_size, model.vocab_size, bias=False)
        head_dim = model.mla.qk_rope_head_dim if model.mla is not None else model.attention_head_dim
        self.register_buffer(
            "inv_freq", 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim),
            persistent=False,
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Token ids on the first rank, the received stream elsewhere; logits on the last rank,
        the stream to send elsewhere."""
        if self.first:
            seq = inputs.shape[1]
            x = self.embed_tokens(inputs)
            if self.config.position_embedding is PositionKind.LEARNED:
                x = x + self.embed_positions(torch.arange(seq, device=inputs.device))
        else:
            x, seq = inputs, inputs.shape[1]
        rope = self.rope(seq, x.dtype, x.device)
        for layer in self.layers:
            x = layer(x, rope)
        if not self.last:
            return x
        head = self.embed_tokens.weight if getattr(self, "lm_head", None) is None else self.lm_head.weight
        return F.linear(self.final_norm(x), head)


def one_f_one_b(pp: int, rank: int, microbatches: int) -> list[tuple[str, int]]:
    """Rank ``rank``'s order of work, as ("forward" | "backward", micro-batch): Megatron's
    ``num_warmup_microbatches = min(pp - rank - 1, m)`` forwards, then 1F1B, then cool-down."""
    warmup = min(pp - rank - 1, microbatches)
    order = [("forward", micro) for micro in range(warmup)]
    for step in range(microbatches - warmup):
        order += [("forward", warmup + step), ("backward", step)]
    order += [("backward", micro) for micro in range(microbatches - warmup, microbatches)]
    return order


def _backward_from(output: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Megatron's ``custom_backward``: the autograd engine directly, since the output's data was
    pseudo-freed (``torch.autograd.backward`` would check the gradient's shape against it)."""
    from torch.autograd import Variable

    if grad is None:
        output.backward()
        return
    Variable._execution_engine.run_backward(
        tensors=(output,), grad_tensors=(grad,), keep_graph=False, create_graph=False, inputs=(),
        allow_unreachable=True, accumulate_grad=True)


def measure_pipeline_rank(model: ModelConfig, parallel: ParallelConfig, rank: int, precision: str = "pure-bf16",
                          batch_size: int = 1, seq_len: int = 128, microbatches: int | None = None,
                          attention: str = "sdpa") -> PipelineMeasurement:
    """Rank ``rank`` of ``parallel``'s pipeline (its layers from ``stage_layers``) over two steps
    of ``microbatches`` micro-batches (default: ``parallel.microbatches``, else ``pp``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memcalc.precision import RECIPES

    if parallel.vpp > 1:
        raise ValueError("the interleaved schedule (vpp > 1) is not measured here")
    if parallel.tp * parallel.cp * parallel.dp > 1:
        raise ValueError("one pipeline rank of a pp-only layout is measured here")
    recipe = RECIPES[precision]
    if recipe.master_dtype is not None or recipe.autocast:
        raise ValueError(f"pipeline measurement runs pure precision recipes, not {precision!r}")
    dtype = TORCH_DTYPES[recipe.weight_dtype.value]
    pp = parallel.pp
    m = microbatches or parallel.microbatches or pp
    stage_info = stage_layers(model, parallel, rank)
    h = model.hidden_size
    tracker = LiveBytesTracker()
    with FakeTensorMode(), tracker:
        with _default_dtype(dtype):
            stage = PipelineStage(model, stage_info.indices, stage_info.first, stage_info.last, attention)
        params = list(stage.parameters())
        weights = tracker.storage_bytes(params)
        buffers = tracker.storage_bytes(list(stage.buffers()))
        tracker.static_bytes = weights + buffers
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)

        def forward(pending: dict, micro: int) -> None:
            if stage_info.first:
                inputs = torch.randint(0, model.vocab_size, (batch_size, seq_len))  # the data loader's batch
                received = None
            else:  # recv_forward
                inputs = received = torch.empty(batch_size, seq_len, h, dtype=dtype, requires_grad=True)
            output = stage(inputs)
            del inputs
            if stage_info.last:
                labels = torch.randint(0, model.vocab_size, (batch_size, seq_len))
                output = causal_lm_loss(output, labels)
                del labels
            else:  # send_forward, then deallocate_output_tensor
                output.data = torch.empty((1,), dtype=output.dtype)
            pending[micro] = (received, output)

        def backward(pending: dict, micro: int) -> None:
            received, output = pending.pop(micro)
            grad = None if stage_info.last else torch.empty(batch_size, seq_len, h, dtype=dtype)  # recv_backward
            _backward_from(output, grad)
            del output, grad
            if received is not None:
                received.grad = None  # send_backward: the input's gradient goes to the previous rank

        # the first step only makes the gradient buffers and the optimizer states: one micro-batch
        for iteration, order in enumerate(([("forward", 0), ("backward", 0)], one_f_one_b(pp, rank, m))):
            pending: dict = {}
            peaks = {"forward": [0, 0], "backward": [0, 0]}
            inflight = 0
            if iteration == 1:
                tracker.gradient_bytes = tracker.storage_bytes([p.grad for p in params])
            for kind, micro in order:
                tracker.reset_peaks()
                (forward if kind == "forward" else backward)(pending, micro)
                inflight = max(inflight, len(pending))
                peak = peaks[kind]
                peak[0], peak[1] = max(peak[0], tracker.peak_bytes), max(peak[1], tracker.peak_activation_bytes)
            gradients = tracker.storage_bytes([p.grad for p in params])
            tracker.reset_peaks()
            optimizer.step()
            step = tracker.peak_bytes
            # Megatron's grad buffer persists, zeroed between steps (zero_grad_buffer)
            optimizer.zero_grad(set_to_none=False)
            if iteration == 0:
                states = optimizer_state_tensors(optimizer)
                states_bytes = tracker.storage_bytes(states)
                tracker.static_bytes += states_bytes
    return PipelineMeasurement(
        rank, pp, m, stage_info.indices, weights, gradients, states_bytes,
        max(peaks["forward"][1], peaks["backward"][1]),
        (peaks["forward"][0], peaks["backward"][0], step), buffers, inflight,
        peaks["forward"][1], peaks["backward"][1],
    )
