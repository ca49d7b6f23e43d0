"""Run one training (or inference) workload and measure memory phase by phase.

The same code runs on three devices: ``fake`` (``FakeTensorMode`` on the CPU: shapes and
dtypes only, no real memory), ``cpu`` (real tensors, used to test the tracker), and ``cuda``
(real allocations, read from ``torch.cuda`` statistics as well as the tracker).

Training is measured on the second iteration: optimizer states are created lazily by the first
``step()``, so the first iteration is not the steady state.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from memcalc.config import ModelConfig
from memcalc.validate.model import Decoder, apply_lora, causal_lm_loss, chunked_causal_lm_loss, cuda_dropout_rules
from memcalc.validate.offload import OffloadActivations, keep_on_device
from memcalc.validate.tracker import CUDA_BLOCK_BYTES, LiveBytesTracker, optimizer_state_tensors

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TrainWorkload:
    """What to run. ``precision`` is a recipe name of ``memcalc.precision.RECIPES``."""

    precision: str = "mixed-bf16"
    optimizer: str = "adamw"
    optimizer_impl: str = "foreach"  # foreach | fused | for-loop
    batch_size: int = 1
    seq_len: int = 512
    attention: str = "sdpa"  # eager | sdpa (flash runs as sdpa: PyTorch picks the flash kernel on CUDA)
    recompute: str = "none"  # none | selective | full | op (per-op policy, memcalc.validate.model)
    recompute_layers: int = 1  # checkpoint every Nth block (full or op)
    sac_save: tuple[str, ...] | None = None  # op: the outputs saved (None: torchtitan's policy)
    loss: str = "full"  # full | chunked
    impl: str = "reference"  # reference (memcalc.validate.model) | hf (the transformers class)
    iterations: int = 2
    # LoRA (memcalc.validate.model.apply_lora): the base frozen, adapters of this rank on the targets
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] = ("q", "v")
    lora_dtype: str = "fp32"  # the adapters' dtype (PEFT's autocast_adapter_dtype=True: fp32)
    qlora: bool = False  # the layers' linear weights in (simulated) bitsandbytes NF4
    lora_dropout: float = 0.0  # PEFT's lora_dropout on each adapter's input
    # micro-batches per step; with master weights they accumulate into persistent fp32 gradient
    # buffers (DeepSpeed's BF16_Optimizer), otherwise into the parameters' gradients
    grad_accum: int = 1
    # AdamW/Adam moments in this dtype (fp32 | bf16 | fp16) instead of the parameters' (--optimizer-dtype)
    optimizer_dtype: str | None = None
    # torchtune's enable_activation_offloading: the model's forward under OffloadActivations, the
    # output head under NoOpManager (memcalc.validate.offload)
    offload_activations: bool = False


@dataclass
class Phase:
    peak_bytes: int  # the most live bytes during the phase
    end_bytes: int  # live bytes when it ended
    peak_activation_bytes: int  # the most live bytes other than static state and accumulated gradients
    cuda_peak_bytes: int | None = None  # torch.cuda.max_memory_allocated during the phase


@dataclass
class Measurement:
    device: str
    components: dict[str, int]  # weights, master_weights, optimizer_states, gradients, activations, ...
    phases: dict[str, Phase]
    cuda: dict[str, int] = field(default_factory=dict)  # reserved, allocated, process overhead
    # With record=True: every storage's allocation and free, in order (memcalc.allocator replays it)
    events: list[tuple[str, int, int]] | None = None

    @property
    def total(self) -> int:
        return max(phase.peak_bytes for phase in self.phases.values())


class _Meter:
    """One interface over the tracker and, on CUDA, the caching allocator's statistics."""

    def __init__(self, device: str, tracker: LiveBytesTracker):
        self.device, self.tracker = device, tracker

    def start(self) -> None:
        self.tracker.reset_peaks()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def stop(self) -> Phase:
        cuda_peak = None
        if self.device == "cuda":
            torch.cuda.synchronize()
            cuda_peak = torch.cuda.max_memory_allocated()
        tracker = self.tracker
        return Phase(tracker.peak_bytes, tracker.live_bytes, tracker.peak_activation_bytes, cuda_peak)


def _device_context(device: str):
    if device == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        return FakeTensorMode(allow_non_fake_inputs=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class StateDtypeAdam(torch.optim.Optimizer):
    """Adam/AdamW with its moments in ``state_dtype``, whatever the parameters' dtype (bf16 moments
    beside fp32 masters, fp32 moments beside bf16 parameters).

    It mirrors torch's foreach step (``_multi_tensor_adam`` in torch/optim/adam.py, non-capturable)
    op for op, so that it allocates what torch would: fp32 step counters, ``exp_avg`` and
    ``exp_avg_sq`` updated in place (``_foreach_lerp_``, ``_foreach_mul_``, ``_foreach_addcmul_``),
    then one state-sized list, ``exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)``, divided and
    added to in place, and ``_foreach_addcdiv_`` into the parameters. Gradients arrive in the
    parameters' dtype: those of another dtype become a list of state-dtype copies (``lerp`` needs
    equal dtypes), dropped before the square root as torch drops ``device_grads``, so the cast list
    and the square-root list are never alive together.
    """

    def __init__(self, params, state_dtype: torch.dtype, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=1e-2, decoupled_weight_decay=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay))
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for param in params:
                state = self.state[param]
                if not state:  # as torch's _init_group: an fp32 scalar step on the CPU, zeroed moments
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, dtype=self.state_dtype,
                                                        memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=self.state_dtype,
                                                           memory_format=torch.preserve_format)
                    state["steps"] = 0  # a Python copy of the count: fake tensors have no values to read
            states = [self.state[p] for p in params]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            torch._foreach_add_([s["step"] for s in states], 1.0)
            for state in states:
                state["steps"] += 1
            grads = [p.grad if p.grad.dtype == self.state_dtype else p.grad.to(self.state_dtype) for p in params]
            if weight_decay != 0:
                if group["decoupled_weight_decay"]:
                    torch._foreach_mul_(params, 1 - lr * weight_decay)
                else:
                    grads = torch._foreach_add(grads, [p.to(self.state_dtype) for p in params], alpha=weight_decay)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            del grads
            bias_correction1 = [1 - beta1 ** s["steps"] for s in states]
            bias_correction2 = [1 - beta2 ** s["steps"] for s in states]
            step_size = [(lr / bc) * -1 for bc in bias_correction1]
            bias_correction2_sqrt = [bc ** 0.5 for bc in bias_correction2]
            exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(exp_avg_sq_sqrt, bias_correction2_sqrt)
            torch._foreach_add_(exp_avg_sq_sqrt, eps)
            # into parameters of another dtype: one tensor at a time, cast on the fly (no copies on CUDA)
            torch._foreach_addcdiv_(params, exp_avgs, exp_avg_sq_sqrt, step_size)
            del exp_avg_sq_sqrt


def _make_optimizer(name: str, impl: str, params, state_dtype: str | None = None):
    flags = {"foreach": dict(foreach=True), "fused": dict(fused=True), "for-loop": dict(foreach=False)}[impl]
    if state_dtype is not None:
        if name not in ("adamw", "adam") or impl != "foreach":
            raise ValueError("a state dtype is measured for foreach adamw and adam only")
        return StateDtypeAdam(params, TORCH_DTYPES[state_dtype], weight_decay=1e-2 if name == "adamw" else 0.0,
                              decoupled_weight_decay=name == "adamw")
    if name in ("adamw", "adam"):
        optimizer_class = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return optimizer_class(params, lr=1e-4, **flags)
    if name in ("sgd", "sgd-momentum"):
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9 if name == "sgd-momentum" else 0.0, **flags)
    raise ValueError(f"optimizer {name!r} cannot be measured here (bitsandbytes optimizers need CUDA)")


def measure_training(
    model_config: ModelConfig, workload: TrainWorkload, device: str = "fake", progress=None, record: bool = False,
    wrap=None,
) -> Measurement:
    """``wrap(model)`` returns the module to train (a DistributedDataParallel around it, say),
    built once the weights are counted. ``progress(description)`` is called as each step starts (for a progress bar); ``record``
    keeps the allocation trace in ``Measurement.events``."""
    from memcalc.precision import RECIPES

    progress = progress or (lambda description: None)

    recipe = RECIPES[workload.precision]
    weight_dtype = TORCH_DTYPES[recipe.weight_dtype.value]
    autocast_dtype = TORCH_DTYPES[recipe.activation_dtype.value] if recipe.autocast else None
    torch_device = "cuda" if device == "cuda" else "cpu"
    tracker = LiveBytesTracker(round_to=CUDA_BLOCK_BYTES if device == "cuda" else 1, record=record)
    meter = _Meter(device, tracker)
    phases: dict[str, Phase] = {}

    # on fake tensors transformers' classes run dropout as CUDA would (memcalc.validate.model)
    kernel_rules = cuda_dropout_rules() if device == "fake" else contextlib.nullcontext()
    with _device_context(device), tracker, torch.device(torch_device), kernel_rules:
        with _default_dtype(weight_dtype):
            attention = "eager" if workload.attention == "eager" else "sdpa"
            if workload.impl == "hf":
                from memcalc.validate.hf import build_hf_model

                model = build_hf_model(model_config, attention)
                if workload.recompute == "full":
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.train()
            else:
                model = Decoder(model_config, attention=attention, recompute=workload.recompute,
                                recompute_layers=workload.recompute_layers, sac_save=workload.sac_save)
            if workload.lora_rank is not None:
                if workload.impl == "hf" or recipe.autocast:
                    raise ValueError("LoRA is measured on the reference decoder without autocast")
                apply_lora(model, tuple(workload.lora_targets), workload.lora_rank,
                           dtype=TORCH_DTYPES[workload.lora_dtype], qlora=workload.qlora,
                           dropout_p=workload.lora_dropout)
        weights = tracker.storage_bytes(list(model.parameters()) + list(model.buffers()))
        if wrap is not None:
            model = wrap(model)
        # only trainable parameters get gradients, master copies and optimizer states (LoRA: the adapters)
        params = [p for p in model.parameters() if p.requires_grad]
        tracker.static_bytes = weights
        # a master copy for parameters narrower than the recipe's master dtype (LoRA's fp32 adapters have none)
        needs_master = recipe.master_dtype is not None and any(p.element_size() < 4 for p in params)
        masters = [p.detach().float() for p in params] if needs_master else []
        for master in masters:
            master.requires_grad_(True)
        master_bytes = tracker.storage_bytes(masters)
        tracker.static_bytes += master_bytes
        optimizer = _make_optimizer(workload.optimizer, workload.optimizer_impl, masters or params,
                                    workload.optimizer_dtype)

        counted: dict[int, int] = {}

        def count_gradient(param: torch.Tensor) -> None:
            # a gradient accumulated into again (grad_accum) is counted once
            size = tracker.storage_bytes([param.grad])
            tracker.gradient_bytes += size - counted.get(id(param), 0)
            counted[id(param)] = size

        for param in params:
            param.register_post_accumulate_grad_hook(count_gradient)

        offloading = None
        if workload.offload_activations:
            if workload.impl == "hf" or workload.lora_rank is not None:
                raise ValueError("activation offloading is measured on the reference decoder without LoRA")
            offloading = OffloadActivations(tracker)
        input_ids = torch.randint(0, model_config.vocab_size, (workload.batch_size, workload.seq_len))
        labels = torch.randint(0, model_config.vocab_size, (workload.batch_size, workload.seq_len))
        optimizer_bytes = 0
        accumulate_fp32 = bool(masters) and workload.grad_accum > 1
        for iteration in range(workload.iterations):
            measured = iteration == workload.iterations - 1
            forward_phases, backward_phases = [], []
            for micro in range(workload.grad_accum):
                progress(f"iteration {iteration + 1}/{workload.iterations}: forward")
                if micro == 0:  # the previous step's gradients are gone
                    tracker.gradient_bytes = 0
                    counted.clear()
                meter.start()
                autocast = (torch.autocast(torch_device, dtype=autocast_dtype) if autocast_dtype is not None
                            else contextlib.nullcontext())
                with autocast:
                    if workload.impl == "hf":
                        loss = model(input_ids=input_ids, labels=labels).loss
                    elif offloading is not None:
                        # torchtune's _loss_step: the model under the offloading context, its output
                        # head under NoOpManager, the loss outside both
                        with offloading:
                            hidden = model.hidden_states(input_ids)
                            if workload.loss != "chunked":
                                with keep_on_device():
                                    logits = model.head(hidden)
                                del hidden  # the model's forward returns the logits alone
                        if workload.loss == "chunked":
                            loss = chunked_causal_lm_loss(hidden, model.output_weight(), labels)
                            del hidden
                        else:
                            loss = causal_lm_loss(logits, labels)
                            del logits
                    elif workload.loss == "chunked":
                        loss = chunked_causal_lm_loss(model.hidden_states(input_ids), model.output_weight(), labels)
                    else:
                        # the loss inside the autocast region, as transformers' models compute it: the
                        # cast cache (16-bit weight copies) is still alive while the logits are
                        logits = model(input_ids)
                        loss = causal_lm_loss(logits, labels)
                        del logits
                forward_phases.append(meter.stop())
                progress(f"iteration {iteration + 1}/{workload.iterations}: backward")
                meter.start()
                loss.backward()
                del loss
                if accumulate_fp32:
                    # the micro-batch's 16-bit gradients join the persistent fp32 buffers
                    with torch.no_grad():
                        for param, master in zip(params, masters):
                            if master.grad is None:
                                master.grad = param.grad.float()
                            else:
                                master.grad.add_(param.grad)
                            param.grad = None
                    tracker.gradient_bytes = 0
                    counted.clear()
                backward_phases.append(meter.stop())
            forward = max(forward_phases, key=lambda phase: phase.peak_bytes)
            backward = max(backward_phases, key=lambda phase: phase.peak_bytes)
            gradients = tracker.storage_bytes([p.grad for p in params]) if not accumulate_fp32 else 0
            progress(f"iteration {iteration + 1}/{workload.iterations}: optimizer step")
            meter.start()
            if masters and not accumulate_fp32:
                # Classic mixed precision: 16-bit gradients become the fp32 master's gradients
                # one tensor at a time, the optimizer updates the masters, the 16-bit weights copy them.
                for param, master in zip(params, masters):
                    master.grad = param.grad.float()
                    param.grad = None
            optimizer.step()
            if masters:
                with torch.no_grad():
                    for param, master in zip(params, masters):
                        param.copy_(master)
            step = meter.stop()
            # accumulating: the fp32 buffers persist (zeroed), like DeepSpeed's
            optimizer.zero_grad(set_to_none=not accumulate_fp32)
            model.zero_grad(set_to_none=True)
            if iteration == 0:
                states = optimizer_state_tensors(optimizer)
                optimizer_bytes = tracker.storage_bytes(states)
                tracker.static_bytes += optimizer_bytes
                if accumulate_fp32:
                    buffer_bytes = tracker.storage_bytes([master.grad for master in masters])
                    tracker.static_bytes += buffer_bytes
            if measured:
                phases = {"forward": forward, "backward": backward, "optimizer_step": step}
        steady = tracker.live_bytes
        cuda = _cuda_statistics() if device == "cuda" else {}
        if device == "cuda":
            cuda["peak_allocated"] = max(phase.cuda_peak_bytes or 0 for phase in phases.values())

    activations = max(phases["forward"].peak_activation_bytes, phases["backward"].peak_activation_bytes)
    static = weights + master_bytes + optimizer_bytes
    buffer_bytes = buffer_bytes if accumulate_fp32 else 0
    static += buffer_bytes
    components = {
        "weights": weights,
        "master_weights": master_bytes,
        "optimizer_states": optimizer_bytes,
        "gradients": gradients,
        "activations": activations,
        "optimizer_step_temporaries": max(0, phases["optimizer_step"].peak_bytes - static - gradients),
        "steady_state": steady,
    }
    if buffer_bytes:
        components["gradient_accumulation"] = buffer_bytes
    if offloading is not None:  # the most host (pinned) bytes the offloaded copies held at once
        components["activations_offloaded"] = offloading.peak_host_bytes
    return Measurement(device, components, phases, cuda, tracker.events)


def _cuda_statistics() -> dict[str, int]:
    """What the allocator holds and what the process holds besides (CUDA context, cuBLAS/cuDNN
    handles, NCCL): device used bytes minus the allocator's reserved bytes."""
    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    stats = torch.cuda.memory_stats()
    return {
        "allocated": torch.cuda.memory_allocated(),
        "reserved": reserved,
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "device_used": total - free,
        "device_total": total,
        "process_overhead": max(0, total - free - reserved),
    } | {f"stats.{key}": int(stats.get(key, 0)) for key in _ALLOCATOR_STATS}


# What the caching allocator reports beyond the peaks, for comparing with memcalc.allocator:
# segments and splits by pool, retries under pressure (torch.cuda.memory_stats).
_ALLOCATOR_STATS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "segment.all.peak",
                    "segment.large_pool.peak", "segment.small_pool.peak", "inactive_split_bytes.all.peak",
                    "reserved_bytes.large_pool.peak", "reserved_bytes.small_pool.peak")


@dataclass(frozen=True)
class InferWorkload:
    """A Hugging Face style ``generate()``: the prompt is repeated for every beam (or returned
    sample), the cache grows by concatenation, prefill computes logits for the last position only,
    each step copies its logits to fp32; beam search takes a log-softmax, keeps the best 2 x beams
    and reorders the cache; sampling runs transformers' warpers (temperature, top-k, top-p) and
    draws from the softmax."""

    dtype: str = "bf16"
    batch_size: int = 1
    prompt_len: int = 512
    new_tokens: int = 16
    num_beams: int = 1
    decoding: str | None = None  # greedy | beam | sample; default: beam with num_beams > 1, else greedy
    num_return_sequences: int = 1
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
    attention: str = "sdpa"  # sdpa | eager (the transformers class: its own fallback where it has no SDPA path)


def _sample(scores: torch.Tensor, workload: InferWorkload) -> torch.Tensor:
    """transformers' LogitsProcessorList for sampling (generation/logits_process.py), in its order:
    each warper returns a new tensor; the caller keeps ``scores`` until the token is drawn."""
    processed = scores
    if workload.temperature != 1.0:  # TemperatureLogitsWarper
        processed = processed / workload.temperature
    if workload.top_k is not None:  # TopKLogitsWarper
        top_k = min(workload.top_k, processed.size(-1))
        indices_to_remove = processed < torch.topk(processed, top_k)[0][..., -1, None]
        processed = processed.masked_fill(indices_to_remove, -float("inf"))
        del indices_to_remove
    if workload.top_p is not None and workload.top_p < 1.0:  # TopPLogitsWarper
        sorted_logits, sorted_indices = torch.sort(processed, descending=False)
        cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_indices_to_remove = cumulative_probs <= (1 - workload.top_p)
        sorted_indices_to_remove[..., -1:] = 0
        indices_to_remove = sorted_indices_to_remove.scatter(1, sorted_indices, sorted_indices_to_remove)
        processed = processed.masked_fill(indices_to_remove, -float("inf"))
        del sorted_logits, sorted_indices, cumulative_probs, sorted_indices_to_remove, indices_to_remove
    probs = F.softmax(processed, dim=-1)
    del processed
    return torch.multinomial(probs, num_samples=1)


def _choose(scores: torch.Tensor, workload: InferWorkload, decoding: str, beams: int, beam_scores: torch.Tensor):
    """generate()'s token choice from a step's fp32 scores: (next tokens, beam scores, the beams'
    source rows or None)."""
    if decoding == "sample":
        return _sample(scores, workload), beam_scores, None
    if beams == 1:
        return scores.argmax(dim=-1, keepdim=True), beam_scores, None
    vocab = scores.shape[-1]
    log_probs = F.log_softmax(scores, dim=-1) + beam_scores.reshape(-1, 1)
    top_scores, top_indices = torch.topk(log_probs.view(-1, beams * vocab), 2 * beams, dim=1)
    del log_probs
    source_beam = (top_indices[:, :beams] // vocab)
    next_tokens = (top_indices[:, :beams] % vocab).reshape(-1, 1)
    offsets = (torch.arange(source_beam.shape[0]) * beams).view(-1, 1)
    return next_tokens, top_scores[:, :beams], (source_beam + offsets).view(-1)


@torch.no_grad()
def _generate_hf(model, input_ids: torch.Tensor, workload: InferWorkload, on_prefill):
    """``_generate``'s loop over a transformers class and its own cache (a DynamicCache built by
    the model's first forward, last-position logits every step, ``reorder_cache`` for beams)."""
    decoding = workload.decoding or ("beam" if workload.num_beams > 1 else "greedy")
    beams = workload.num_beams if decoding == "beam" else 1
    expand = beams if decoding == "beam" else workload.num_return_sequences
    sequences = tokens = input_ids.repeat_interleave(expand, dim=0)
    mask = torch.ones(tokens.shape, dtype=torch.long)  # generate()'s attention mask, grown each step
    beam_scores = torch.zeros(input_ids.shape[0], beams, dtype=torch.float32)
    from memcalc.validate.hf_forward import cache_keyword, decoding_attention_mask, returned_cache

    keyword, cache, beam_index = cache_keyword(model), None, None
    for step in range(workload.new_tokens):
        if step:  # generate()'s token ids so far and its mask, each grown by concatenation
            sequences = torch.cat([sequences.index_select(0, beam_index) if beam_index is not None else sequences,
                                   tokens], dim=-1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        output = model(input_ids=tokens, attention_mask=decoding_attention_mask(model, mask) if step else mask,
                       use_cache=True, logits_to_keep=1, **{keyword: cache})
        cache = returned_cache(output)
        scores = output.logits[:, -1, :].to(dtype=torch.float32, copy=True)
        del output
        if step == 0:
            on_prefill(cache)
        tokens, beam_scores, beam_index = _choose(scores, workload, decoding, beams, beam_scores)
        if beam_index is not None:  # the step's scores still held, as generate() holds its own
            cache.reorder_cache(beam_index)
        del scores
    return cache


def hf_cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a transformers cache holds (keys and values; conv and recurrent states)."""
    held = []
    for layer in cache.layers:
        for name in ("keys", "values", "conv_states", "recurrent_states"):
            value = getattr(layer, name, None)
            held.extend(value.values() if isinstance(value, dict) else [value])
    return [tensor for tensor in held if isinstance(tensor, torch.Tensor)]


@torch.no_grad()
def _generate(model: Decoder, input_ids: torch.Tensor, workload: InferWorkload, on_prefill) -> list:
    decoding = workload.decoding or ("beam" if workload.num_beams > 1 else "greedy")
    beams = workload.num_beams if decoding == "beam" else 1
    expand = beams if decoding == "beam" else workload.num_return_sequences
    sequences = input_ids.repeat_interleave(expand, dim=0)
    caches: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(model.layers)
    position = 0
    beam_scores = torch.zeros(input_ids.shape[0], beams, dtype=torch.float32)
    tokens = sequences
    for step in range(workload.new_tokens):
        logits = model.forward_with_cache(tokens, caches, position)
        position += tokens.shape[1]
        if step == 0:
            on_prefill(caches)
        scores = logits[:, -1, :].to(dtype=torch.float32, copy=True)
        del logits
        tokens, beam_scores, beam_index = _choose(scores, workload, decoding, beams, beam_scores)
        if beam_index is not None:
            # DynamicCache.reorder_cache: layer by layer, the keys then the values, so one of them
            # is copied at a time
            for index in range(len(caches)):
                keys, values = caches[index]
                caches[index] = None
                keys = keys.index_select(0, beam_index)
                caches[index] = (keys, values)
                del values
                caches[index] = (keys, caches[index][1].index_select(0, beam_index))
                del keys
        del scores
    return caches


def measure_inference(model_config: ModelConfig, workload: InferWorkload, device: str = "fake", progress=None,
                      record: bool = False, impl: str = "reference", mixer_kernels=None):
    """A generate() run of the reference decoder, or with ``impl="hf"`` of the transformers class
    (``memcalc.validate.hf.build_hf_model``; on fake tensors its SDPA calls allocate as CUDA's
    kernels do, ``memcalc.validate.hf_forward.cuda_sdpa_allocations``); ``mixer_kernels``: a context
    that routes the class's mixers to their packages on fake tensors
    (``memcalc.validate.mamba.mamba_inference_kernels``)."""
    progress = progress or (lambda description: None)
    torch_device = "cuda" if device == "cuda" else "cpu"
    tracker = LiveBytesTracker(round_to=CUDA_BLOCK_BYTES if device == "cuda" else 1, record=record)
    meter = _Meter(device, tracker)
    kv_after_prefill = 0
    if impl == "hf":
        from memcalc.validate.hf import build_hf_model
        from memcalc.validate.hf_forward import generate_kernels

        kernels = generate_kernels() if device == "fake" else contextlib.nullcontext()
        held = hf_cache_tensors
    else:
        kernels = contextlib.nullcontext()
        held = lambda caches: [t for pair in caches for t in pair]  # noqa: E731
    with (_device_context(device), tracker, torch.device(torch_device), kernels,
          mixer_kernels or contextlib.nullcontext()):
        with _default_dtype(TORCH_DTYPES[workload.dtype]):
            model = build_hf_model(model_config, workload.attention) if impl == "hf" else Decoder(model_config)
        model.eval()
        weights = tracker.storage_bytes(list(model.parameters()) + list(model.buffers()))
        tracker.static_bytes = weights
        input_ids = torch.randint(0, model_config.vocab_size, (workload.batch_size, workload.prompt_len))

        def on_prefill(caches) -> None:
            nonlocal kv_after_prefill
            kv_after_prefill = tracker.storage_bytes(held(caches))
            progress("decoding")

        progress("prefill")
        meter.start()
        caches = (_generate_hf if impl == "hf" else _generate)(model, input_ids, workload, on_prefill)
        generate = meter.stop()
        cuda = {}
        if device == "cuda":
            cuda = _cuda_statistics()
            cuda["peak_allocated"] = generate.cuda_peak_bytes
        # prompt + new_tokens - 1 positions were fed through the model: the last token is chosen, not cached
        kv_final = tracker.storage_bytes(held(caches))
        del caches
    phases = {"generate": generate}
    components = {"weights": weights, "kv_cache_after_prefill": kv_after_prefill, "kv_cache": kv_final}
    return Measurement(device, components, phases, cuda, tracker.events)
