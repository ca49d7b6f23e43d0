"""DeepSpeed ZeRO-3: what one rank holds, following DeepSpeed 0.19.8 function by function.

``DeepSpeedZeroOptimizer_Stage3`` (``deepspeed/runtime/zero/stage3.py``) keeps, from its
``__init__`` to the end of training, on every rank of the ``N`` that partition the model:

* ``lp_param_buffer`` (``_create_fp16_partitions_with_defragmentation``): the trained parameters'
  partitions, ``ceil(numel / N)`` elements each in the weights' dtype, one flat buffer; a frozen
  parameter's partition is its own tensor of the same size (``Init._partition_param``);
* ``fp32_partitioned_groups_flat`` (``_create_fp32_partitions``): the fp32 master partitions, and
  the optimizer's moments over them once it has stepped;
* ``grad_partitions_flat_buffer`` (``_setup_for_real_optimizer``): the gradient partitions, one flat
  buffer in ``gradient_accumulation_dtype`` (the model's dtype unless ``grad_accum_dtype``),
  allocated at ``__init__``: gradients are resident through forward too;
* the ipg bucket (``_setup_for_real_optimizer``, ``contiguous_gradients``): ``reduce_bucket_size``
  elements in the communication dtype (the model's dtype), allocated once and kept, one per
  communication dtype (``overlap_comm`` adds none in stage 3);
* the persistent parameters (``DeepSpeedZeRoOffload.mark_persistent_parameters``): every parameter
  of at most ``stage3_param_persistence_threshold`` elements stays gathered, whole, besides its
  partition (gathered again by ``_post_step`` after each step; ``release_and_reset_all`` at the
  step's start partitions them for the step).

The other parameters are gathered by the ``PartitionedParameterCoordinator``
(``partitioned_param_coordinator.py``) over the module trace it records in the first iteration:
``simulate`` below is that class's fetch, prefetch and release logic on the same trace (the
reference decoder's modules; forward in call order, backward in reverse, a module's backward fetch
only where its output needs a gradient and its backward release only where an input does, as
``parameter_offload.py``'s hooks fire), with the memory of ``partition_parameters.py``'s
all-gathers: a single parameter is gathered into its own buffer of ``ceil(numel / N) * N``
elements (``_all_gather_sequential``, the parameter a view of it); several at once into one flat
buffer of their padded partitions (``_all_gather_dtype``), which each parameter copies out when
first waited on (``AllGatherCoalescedHandle.wait``: ``torch.cat`` of its pieces) and which lives
until the last of them has been waited on (the coordinator's in-flight registry holds the handle).
Measured against DeepSpeed itself in ``memcalc.validate.deepspeed`` (the gathered bytes after
every fetch and release, byte for byte, and every phase's peak).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

from memcalc.config import ModelConfig
from memcalc.parallel import Zero3Knobs

__all__ = ["Zero3Knobs"]  # the stage3_* keys, declared once in memcalc.parallel

DEFAULT_SUB_GROUP_SIZE = 1_000_000_000  # sub_group_size: the optimizer steps the partition in sub-groups


@dataclass(eq=False)
class Param:
    """A parameter as DeepSpeed sees it: ``ds_numel`` elements, persistent or not."""

    index: int  # ds_id: the order of module.parameters()
    numel: int
    persist: bool
    trainable: bool
    name: str = ""
    status: str = "absent"  # NOT_AVAILABLE (absent), INFLIGHT, AVAILABLE
    active: set = field(default_factory=set)
    copy: int = 0  # bytes of its gathered data that are its own (a copy out of a flat buffer, or its buffer)

    def partition(self, world: int) -> int:
        return -(-self.numel // world)


@dataclass(eq=False)
class Module:
    """A module with hooks: its own parameters, its children in call order, and whether its
    backward hooks fire (``PreBackwardFunctionForModule`` on outputs that need a gradient,
    ``PostBackwardFunctionModule`` on inputs that do)."""

    name: str
    own: tuple[Param, ...] = ()  # parameters(recurse=False)
    children: tuple[Module, ...] = ()
    backward_fetch: bool = True  # its output needs a gradient: fetched in backward
    backward_release: bool = True  # an input needs a gradient: released by its post-backward hook
    external: tuple[Param, ...] = ()  # parameters it reads outside a child's call (ds_external_parameters)

    @cached_property
    def params(self) -> tuple[Param, ...]:
        """``iter_params``: its own parameters and its external ones."""
        return self.own + self.external

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True)
class Event:
    """The gathered (non-persistent) parameter bytes after a module's fetch or release, and the
    most during it (a coalesced buffer beside the copies made from it)."""

    kind: str  # fetch | release
    phase: str  # forward | backward
    module: str
    after: int
    most: int
    available: int = 0  # the coordinator's __n_available_params after it (elements)


class _Handle:
    def __init__(self, params: list[Param], flat: int):
        self.params, self.flat, self.waiting, self.complete = params, flat, len(params), False


class Coordinator:
    """``PartitionedParameterCoordinator`` with a complete trace (the second iteration on), in
    bytes: ``fetch_sub_module``, ``release_sub_module``, ``__params_to_release`` and the
    all-gathers of ``partition_parameters.py`` (one dtype, no offload, no quantisation)."""

    def __init__(self, trace: list[Module], knobs: Zero3Knobs, world: int, element_bytes: int):
        self.trace, self.knobs, self.world, self.bytes = trace, knobs, world, element_bytes
        self.queue = deque((param, step) for step, module in enumerate(trace)
                           for param in sorted(module.params, key=lambda p: p.index))
        self.fetched_for: dict[int, int] = {}  # __most_recent_step_id_param_fetched_for
        self.registry: dict[int, _Handle] = {}  # id(param) -> handle (__inflight_param_registry)
        self.step = 0
        self.available = 0  # __n_available_params (elements)
        self.release_cache: dict[tuple[int, int], set[int]] = {}  # __params_to_release is lru_cached
        self.events: list[Event] = []
        self._gathered = 0  # bytes: every parameter's own data and the live flat buffers
        self._most = 0
        # __params_to_release looks ahead through the trace until it has passed max_reuse_distance
        # elements: the elements before each step, and the steps that use each parameter
        self._before = [0]
        self._uses: dict[int, list[int]] = {}
        for step, module in enumerate(trace):
            self._before.append(self._before[-1] + sum(param.numel for param in module.params))
            for param in module.params:
                self._uses.setdefault(id(param), []).append(step)

    # memory ------------------------------------------------------------------------------------
    def gathered(self) -> int:
        return self._gathered

    def _add(self, nbytes: int) -> None:
        self._gathered += nbytes
        self._most = max(self._most, self._gathered)

    def _set_copy(self, param: Param, nbytes: int) -> None:
        self._add(nbytes - param.copy)
        param.copy = nbytes

    # partition_parameters.py -------------------------------------------------------------------
    def _all_gather(self, params: list[Param]) -> None:
        """``__all_gather_params_``: the parameters not available, one all-gather: a single one
        into its own padded buffer (``_all_gather_sequential``), several into one flat buffer."""
        params = [param for param in params if param.status == "absent"]
        if not params:
            return
        self.available += sum(param.numel for param in params)
        for param in params:
            param.status = "inflight"
        if len(params) == 1:
            param = params[0]
            self._set_copy(param, param.partition(self.world) * self.world * self.bytes)
            handle = _Handle(params, 0)
        else:
            handle = _Handle(params, sum(param.partition(self.world) for param in params) * self.world * self.bytes)
            self._add(handle.flat)
        for param in params:
            self.registry[id(param)] = handle

    def _wait(self, param: Param) -> None:
        """The registry's handle of ``param``, waited on: on its first wait every parameter it
        gathered becomes available (``AllGatherCoalescedHandle.wait``: each copies its pieces out
        of the flat buffer, which lives until the last of them has been waited on)."""
        handle = self.registry.pop(id(param))
        if not handle.complete:
            for member in handle.params:
                if handle.flat:
                    self._set_copy(member, member.numel * self.bytes)
                member.status = "available"
            handle.complete = True
        handle.waiting -= 1
        if handle.waiting == 0 and handle.flat:
            self._add(-handle.flat)

    def _release(self, param: Param) -> None:
        """``__release_param``: partition it unless another module is using it."""
        if param.status == "available" and not param.active:
            param.status = "absent"
            self._set_copy(param, 0)
            self.available -= param.numel

    # the coordinator -----------------------------------------------------------------------------
    def fetch(self, module: Module, forward: bool) -> None:
        self._most = self._gathered
        to_fetch = module.params
        if to_fetch:
            self._all_gather(to_fetch)
            for param in to_fetch:
                param.active.add(id(module))
                if id(param) in self.registry:
                    self._wait(param)
            not_fetched = {id(p) for p in to_fetch if self.fetched_for.get(id(p), -10**10) < self.step}
            discarded: set[int] = set()
            while self.queue and len(discarded) < len(not_fetched):
                param, step = self.queue.popleft()
                self.fetched_for[id(param)] = step
                discarded.add(id(param))
            if discarded != not_fetched:
                raise RuntimeError(f"ZeRO-3 trace out of order at {module.name}")
        knobs = self.knobs
        if knobs.prefetch_bucket_size > 0:
            most = min(knobs.max_live_parameters - self.available, knobs.prefetch_bucket_size)
            chosen: dict[int, Param] = {}
            numel = 0
            while self.queue and numel < most:
                param, step = self.queue.popleft()
                take = param.status == "absent" and id(param) not in chosen
                self.fetched_for[id(param)] = max(self.fetched_for.get(id(param), -10**10), step)
                if take:
                    chosen[id(param)] = param
                    numel += param.numel
            if numel:
                self._all_gather(list(chosen.values()))
        self.step += 1
        self._record("fetch", forward, module)

    def _to_release(self, module: Module) -> set[int]:
        """``__params_to_release``: its parameters but the persistent ones, those a prefetch already
        looked past this step for, and those a module within ``max_reuse_distance`` elements of
        the trace ahead uses again (it counts a module's elements before looking into the next)."""
        key = (id(module), self.step)
        if key not in self.release_cache:
            step, before = self.step, self._before
            # the modules it looks at: from this step while fewer elements than the limit came before
            last = bisect_left(before, before[step] + self.knobs.max_reuse_distance, lo=step) - 1
            release = set()
            for param in module.params:
                if param.persist or self.fetched_for.get(id(param), -10**10) > step:
                    continue
                uses = self._uses.get(id(param), [])
                later = uses[bisect_left(uses, step)] if bisect_left(uses, step) < len(uses) else None
                if later is None or later > last:
                    release.add(id(param))
            self.release_cache[key] = release
        return self.release_cache[key]

    def release(self, module: Module, forward: bool) -> None:
        self._most = self._gathered
        if module.params:
            release = self._to_release(module)
            for param in module.params:
                param.active.discard(id(module))
                if id(param) in release:
                    self._release(param)
        self._record("release", forward, module)

    def leftovers(self, modules: list[Module]) -> None:
        """``release_backward_leftovers`` (``backward_epilogue``): modules fetched in backward whose
        post-backward hook never fired (their inputs need no gradient)."""
        for module in modules:
            for param in module.params:
                param.active.discard(id(module))
                if not param.persist:
                    self._release(param)

    def _record(self, kind: str, forward: bool, module: Module) -> None:
        self.events.append(Event(kind, "forward" if forward else "backward", module.name, self._gathered,
                                 max(self._most, self._gathered), self.available))


def module_trace(root: Module) -> list[Module]:
    """The coordinator's ``__submodule_order``: every module's forward in call order, then the
    modules whose backward fires, parents before children, children in reverse."""
    forward = list(root.walk())

    def backward(module: Module):
        if module.backward_fetch:
            yield module
        for child in reversed(module.children):
            yield from backward(child)

    return forward + list(backward(root))


def simulate(root: Module, knobs: Zero3Knobs, world: int, element_bytes: int) -> list[Event]:
    """One training iteration with a complete trace: the gathered bytes after (and the most
    during) every fetch and release, as the hooks of ``parameter_offload.py`` call them."""
    trace = module_trace(root)
    coordinator = Coordinator(trace, knobs, world, element_bytes)
    for module in root.walk():  # every iteration starts with only the persistent parameters gathered
        for param in module.params:
            param.status = "available" if param.persist else "absent"
            param.active.clear()
            param.copy = 0

    def forward(module: Module) -> None:
        coordinator.fetch(module, True)
        for child in module.children:
            forward(child)
        coordinator.release(module, True)

    unreleased: list[Module] = []

    def backward(module: Module) -> None:
        if module.backward_fetch:
            coordinator.fetch(module, False)
        for child in reversed(module.children):
            backward(child)
        if module.backward_fetch:
            if module.backward_release:
                coordinator.release(module, False)
            else:
                unreleased.append(module)

    forward(root)
    backward(root)
    coordinator.leftovers(unreleased)
    coordinator._record("release", False, Module("(backward leftovers)"))
    return coordinator.events


# --- The reference decoder's modules ----------------------------------------------------------------

# projections that read what the ones before them in their block made (attention's output from the
# scores of q, k and v; the MLP's down projection from gate and up): their input needs a gradient
# when any earlier one's output does
_READERS = ("o_proj", "down_proj", "out_proj")


class _Builder:
    """Parameters in the order the reference decoder creates them, with the gradient flags of
    each module's input and output (a frozen module on an input that needs no gradient has
    neither hook firing in backward)."""

    def __init__(self, numel, trainable, threshold: int, adapters: dict[str, tuple[int, int]] | None):
        self.numel, self.trainable, self.threshold, self.adapters = numel, trainable, threshold, adapters
        self.count = 0

    def param(self, elements: int, trains: bool, name: str = "") -> Param:
        self.count += 1
        return Param(self.count, elements, elements <= self.threshold, trains, name)

    def leaf(self, name: str, tensors, grad_in: bool) -> tuple[Module, bool]:
        params = tuple(self.param(self.numel(t), self.trainable(t), f"{name}.{t.name.rsplit('.', 1)[-1]}")
                       for t in tensors)
        grad_out = grad_in or any(p.trainable for p in params)
        short = name.rsplit(".", 1)[-1]
        if self.adapters is not None and short in self.adapters:
            # PEFT's lora.Linear: the frozen base_layer, then lora_A and lora_B (its input is lora_A's output)
            base = Module(f"{name}.base_layer", params, backward_fetch=grad_out, backward_release=grad_in)
            a_numel, b_numel = self.adapters[short]
            lora_a = Module(f"{name}.lora_A", (self.param(a_numel, True, f"{name}.lora_A.weight"),),
                            backward_release=grad_in)
            lora_b = Module(f"{name}.lora_B", (self.param(b_numel, True, f"{name}.lora_B.weight"),))
            # its forward reads lora_A.weight.dtype (PEFT's _cast_input_dtype): the first iteration
            # gathers it there and DeepSpeed registers it as the wrapper's external parameter
            return Module(name, (), (base, lora_a, lora_b), backward_release=grad_in, external=lora_a.own), True
        return Module(name, params, backward_fetch=grad_out, backward_release=grad_in), grad_out

    def container(self, name: str, members: list[tuple[str, list]], grad_in: bool) -> tuple[Module, bool]:
        """A block of leaves (attention, MLP, an expert): each reads the block's input, a reader
        what the leaves before it made."""
        children, made = [], False
        for short, tensors in members:
            module, out = self.leaf(f"{name}.{short}", tensors, (grad_in or made) if short in _READERS else grad_in)
            children.append(module)
            made = made or out
        out = made or grad_in
        return Module(name, (), tuple(children), backward_fetch=out, backward_release=grad_in), out


def _layer_parts(tensors, count=lambda tensor: tensor.count) -> list[tuple[str, list]]:
    """A layer's tensors as (module path below ``layers.``, tensors) in call order: a norm of
    ``count`` copies is that many modules; an expert's projections (``count`` experts) go expert by
    expert."""
    parts: list[tuple[str, list]] = []
    experts: dict[str, list] = {}
    for tensor in tensors:
        path = tensor.name.removeprefix("layers.").rsplit(".", 1)[0]
        copies = count(tensor)
        if copies > 1 and ("experts" in path or "norm" in path.rsplit(".", 1)[-1]):
            if "experts" in path:  # experts.gate_proj x E -> experts.0.gate_proj, ...
                block, _, leaf = path.rpartition(".")
                experts.setdefault(block, [])
                for copy in range(copies):
                    experts[block].append((f"{block}.{copy}.{leaf}", [tensor], copy))
                continue
            parts += [(path, [tensor]) for _copy in range(copies)]
            continue
        if parts and parts[-1][0] == path and not path.endswith("norm"):
            parts[-1][1].append(tensor)
        else:
            parts.append((path, [tensor]))
    for block, entries in experts.items():  # after the router, expert by expert
        at = max((i for i, (path, _t) in enumerate(parts) if path.startswith(block.rsplit(".", 1)[0])), default=-1)
        ordered = [(path, tensors) for path, tensors, _copy in sorted(entries, key=lambda e: e[2])]
        parts[at + 1:at + 1] = ordered
    return parts


def decoder_modules(model: ModelConfig, numel, trainable, knobs: Zero3Knobs,
                    adapters: dict[str, tuple[int, int]] | None = None,
                    count=lambda tensor: tensor.count) -> Module:
    """The module tree of memcalc's reference decoder (``memcalc.validate.model.Decoder``) with
    DeepSpeed's view of each parameter: ``numel(tensor)`` its local elements, ``trainable(tensor)``
    whether it trains, persistent when at most ``param_persistence_threshold`` elements.
    ``adapters`` (LoRA): module name (``q_proj`` ...) -> the (lora_A, lora_B) elements of its
    adapter; the targeted projection becomes PEFT's ``lora.Linear`` (``base_layer``, ``lora_A``,
    ``lora_B``) and everything else is frozen. ``count(tensor)``: its copies on this rank (routed
    experts divided by expert parallelism)."""
    from memcalc.estimate.inventory import build_inventory

    inventory = build_inventory(model)
    build = _Builder(numel, trainable, knobs.param_persistence_threshold, adapters)
    children = []
    grad = False  # token ids need no gradient
    for tensor in inventory.embeddings:
        module, out = build.leaf(tensor.name.rsplit(".", 1)[0], [tensor], False)
        children.append(module)
        grad = grad or out
    norm_names = ("input_norm", "post_attention_norm")
    for index, layer in enumerate(inventory.layers):
        name, layer_children, stream, norms = f"layers.{index}", [], grad, 0
        parts = _layer_parts(layer.tensors, count)
        position = 0
        while position < len(parts):
            path, tensors = parts[position]
            head = path.split(".", 1)[0]
            if "." not in path:  # a norm of the layer
                short = norm_names[norms] if norms < len(norm_names) else f"extra_norms.{norms - len(norm_names)}"
                norms += 1
                module, stream = build.leaf(f"{name}.{short}", tensors, stream)
                layer_children.append(module)
                position += 1
                continue
            block = "mlp" if head == "moe" else head
            members = []
            while position < len(parts) and parts[position][0].split(".", 1)[0] == head:
                members.append((parts[position][0].split(".", 1)[1], parts[position][1]))
                position += 1
            module, out = _block(build, f"{name}.{block}", members, stream)
            layer_children.append(module)
            stream = stream or out
        out = stream
        children.append(Module(name, (), tuple(layer_children), backward_fetch=out, backward_release=grad))
        grad = out
    for tensor in inventory.final:
        module, grad = build.leaf(tensor.name.rsplit(".", 1)[0], [tensor], grad)
        children.append(module)
    external: tuple[Param, ...] = ()
    if model.tie_word_embeddings:
        # the tied head reads embed_tokens.weight outside a module call: DeepSpeed registers it as
        # an external parameter of the root (ZeROOrderedDict.__getitem__, register_external_parameter)
        external = children[0].own
    return Module("", (), tuple(children), backward_fetch=True, backward_release=False, external=external)


def _block(build: _Builder, name: str, members: list[tuple[str, list]], grad_in: bool) -> tuple[Module, bool]:
    """A layer's mixer or MLP: its leaves, or (a mixture of experts) the router, each expert's MLP
    and the shared experts, each expert a block of its own."""
    if not any("experts." in short for short, _t in members):
        return build.container(name, members, grad_in)
    children, made = [], False
    grouped: dict[str, list] = {}
    order: list[str] = []
    for short, tensors in members:
        if short.split(".", 1)[0] in ("experts", "shared_experts"):
            expert = short.rsplit(".", 1)[0]  # experts.3 (shared_experts when there is one)
            if expert not in grouped:
                grouped[expert] = []
                order.append(expert)
            grouped[expert].append((short.rsplit(".", 1)[1], tensors))
        else:
            grouped[short] = tensors
            order.append(short)
    for key in order:
        if key.split(".", 1)[0] in ("experts", "shared_experts"):
            module, out = build.container(f"{name}.{key}", grouped[key], grad_in)
        else:
            module, out = build.leaf(f"{name}.{key}", grouped[key], grad_in)
        children.append(module)
        made = made or out
    return Module(name, (), tuple(children), backward_fetch=made or grad_in, backward_release=grad_in), made or grad_in


def partition_bytes(numel: int, world: int, element_bytes: int) -> int:
    return -(-numel // world) * element_bytes


def sub_groups(partitions: list[int], size: int = DEFAULT_SUB_GROUP_SIZE) -> list[int]:
    """``_create_fp16_sub_groups``: the trained partitions (in order) cut into sub-groups of at
    least ``sub_group_size`` elements; the optimizer steps one at a time."""
    if sum(partitions) <= size:
        return [sum(partitions)]
    groups, current = [], 0
    for index, elements in enumerate(partitions):
        current += elements
        if current >= size or index == len(partitions) - 1:
            groups.append(current)
            current = 0
    return groups




# --- One rank's step --------------------------------------------------------------------------------


def simulates(model: ModelConfig, parallel, recipe) -> bool:
    """Whether this module's simulation is a rank's step: DeepSpeed's stage-3 optimizer
    (``parallel.deepspeed_zero3``) in its bf16/fp16 mode (``models_recipe``) on a dense model (MoE
    keeps the estimator's rule: simulating every expert made the planner 15x slower). The one test
    ``memcalc.estimate.training`` asks, for a rank's phases and for LoRA's layout check."""
    return parallel.deepspeed_zero3 and models_recipe(recipe) and model.moe is None


def models_recipe(recipe) -> bool:
    """DeepSpeed's bf16/fp16 mode: 16-bit parameters with fp32 master partitions, no autocast or
    FP8 (what ``memcalc.validate.deepspeed`` runs); other recipes keep the estimator's rule."""
    from memcalc.dtypes import DType

    return (recipe.master_dtype is DType.FP32 and recipe.weight_dtype in (DType.BF16, DType.FP16)
            and not recipe.autocast and recipe.gemm is None)


@dataclass(frozen=True)
class Flush:
    """A reduce-scatter of the ipg bucket (``__reduce_and_partition_ipg_grads``) during backward:
    where, and the bytes it allocates beyond the bucket (the interleaved ``torch.cat`` of
    ``reduce_scatter_coalesced``, the gradients too large for the bucket, the new gradient)."""

    module: str  # the module whose gradient hook flushed (None: the backward's epilogue)
    bytes: int


def gradient_flushes(root: Module, bucket: int, world: int, grad_bytes: int) -> list[Flush]:
    """The ipg bucket over backward (``reduce_independent_p_g_buckets_and_remove_grads``): each
    trained parameter's gradient, as its module's backward makes it, is copied into the
    ``reduce_bucket_size`` buffer (``__add_grad_to_ipg_bucket``; one larger than the room left stays
    its own tensor) after the bucket is reduced if it would overflow; the rest is reduced by the
    epilogue. A reduction of several gradients (or of one not divisible by the ranks) allocates
    their padded concatenation (``reduce_scatter_coalesced``)."""
    trace = module_trace(root)
    backward = trace[len(list(root.walk())):]
    flushes: list[Flush] = []
    contents: list[int] = []
    loose = 0

    def reduction(extra: int) -> int:
        single = len(contents) == 1 and contents[0] % world == 0
        cat = 0 if single else sum(-(-numel // world) * world for numel in contents) * grad_bytes
        return cat + loose + extra

    for module in backward:
        for param in module.own:
            if not param.trainable:
                continue
            elements = sum(contents)
            if contents and elements + param.numel > bucket:
                flushes.append(Flush(module.name, reduction(param.numel * grad_bytes)))
                contents, loose, elements = [], 0, 0
            if elements + param.numel > bucket:
                loose += param.numel * grad_bytes
            contents.append(param.numel)
    if contents:
        flushes.append(Flush("", reduction(0)))
    return flushes


def _location(name: str) -> tuple[str, int]:
    """Where a module sits: ("root" | "embedding" | "layer" | "final" | "head", layer index)."""
    if name.startswith("layers."):
        return "layer", int(name.split(".")[1])
    if name.startswith("embed"):
        return "embedding", 0
    if name == "lm_head":
        return "head", 0
    if name == "":
        return "root", 0
    return "final", 0


@dataclass(frozen=True)
class Simulation:
    """What one rank's step gathers and reduces, whatever the batch: the coordinator's events,
    the persistent parameters' bytes, the trained partitions in order, the ipg bucket's
    reductions and the token embedding's elements."""

    events: tuple[Event, ...]
    persistent: int
    trained: tuple[int, ...]
    flushes: tuple[Flush, ...]
    embedding: int
    modules: tuple[tuple[str, int], ...] = ()  # the module trace: (name, own elements)

    @cached_property
    def forward_most(self) -> tuple[dict[str, int], list[int]]:
        """The most gathered at any fetch or release of each module in forward, but the last event
        (the root's release, which the loss follows) and lm_head's releases (their bytes after)."""
        forward = [e for e in self.events if e.phase == "forward"][:-1]
        head = [(e.kind, e.module) == ("release", "lm_head") for e in forward]
        return (_most_by_module(e for e, at_head in zip(forward, head) if not at_head),
                [e.after for e, at_head in zip(forward, head) if at_head])

    @cached_property
    def backward_most(self) -> dict[str, int]:
        """The most gathered at any backward event of each module, but the last (the leftovers)."""
        return _most_by_module([e for e in self.events if e.phase == "backward"][:-1])


def _most_by_module(events) -> dict[str, int]:
    most: dict[str, int] = {}
    for e in events:
        most[e.module] = max(most.get(e.module, e.most), e.most)
    return most


@lru_cache(maxsize=128)
def _simulation(model: ModelConfig, tp: int, ep: int, vocab: int, world: int, knobs: Zero3Knobs, element_bytes: int,
                adapters: tuple | None, bucket: int) -> Simulation:
    from memcalc.parallel import _local_count, _local_numel

    root = decoder_modules(model, lambda t: _local_numel(t, tp, vocab), lambda t: adapters is None, knobs,
                           dict(adapters) if adapters else None, lambda t: _local_count(t, ep))
    events = simulate(root, knobs, world, element_bytes)
    params = list({id(p): p for module in root.walk() for p in module.params}.values())
    # each gathered into a buffer of its padded partitions (_allgather_params_coalesced)
    persistent = sum(p.partition(world) * world for p in params if p.persist) * element_bytes
    embedding = sum(p.numel for m in root.children if m.name == "embed_tokens" for p in m.own)
    return Simulation(tuple(events), persistent, tuple(p.partition(world) for p in params if p.trainable),
                      tuple(gradient_flushes(root, bucket, world, element_bytes)), embedding,
                      tuple((module.name, sum(p.numel for p in module.own)) for module in module_trace(root)))


def knobs_of(parallel) -> Zero3Knobs:
    """The stage3_* keys of a layout; ``--prefetch 0``: nothing prefetched (a prefetch bucket of 0)."""
    from dataclasses import replace

    return parallel.zero3 if parallel.prefetch else replace(parallel.zero3, prefetch_bucket_size=0)


def _adapter_sizes(model: ModelConfig, settings) -> tuple | None:
    from memcalc.estimate import lora as lora_module

    if settings.lora_rank is None:
        return None
    return tuple(sorted({lora_module.MODULE_NAMES[a.target]: (a.rank * a.d_in, a.d_out * a.rank)
                         for a in lora_module.adapters(model, settings)}.items()))


def simulate_rank(model: ModelConfig, settings, parallel, element_bytes: int = 2) -> Simulation:
    """The coordinator's events and the ipg bucket's reductions on one rank of ``parallel``, with
    ``element_bytes`` per gathered element (the model's dtype)."""
    from memcalc.parallel import padded_vocab

    return _simulation(model, parallel.tp, parallel.ep, padded_vocab(model, parallel), parallel.dense_shards,
                       knobs_of(parallel), element_bytes, _adapter_sizes(model, settings), parallel.reduce_bucket_size)


def rank_parts(model: ModelConfig, settings, parallel, states, step, peaks):
    """DeepSpeed ZeRO-3's phases and breakdown rows for one rank (``parallel.deepspeed_zero3``):
    the persistent state of ``DeepSpeedZeroOptimizer_Stage3.__init__``, the gathered parameters of
    ``simulate`` at every fetch and release beside what the activation model says lives then, the
    ipg bucket's reductions in backward, and the step over the fp32 sub-groups."""
    from dataclasses import replace

    from memcalc.dtypes import BITS_PER_ELEMENT, DType
    from memcalc.estimate import training
    from memcalc.estimate.breakdown import Component, Kind
    from memcalc.parallel import sharding_units, stage_layers

    weight_dtype = states.base_recipe.weight_dtype
    w = BITS_PER_ELEMENT[weight_dtype] // 8
    g = BITS_PER_ELEMENT[states.grad_dtype] // 8
    lora = settings.lora_rank is not None
    knobs = knobs_of(parallel)
    run = simulate_rank(model, settings, parallel, w)
    events, persistent, trained, flushes, embedding_rows = (run.events, run.persistent, run.trained, run.flushes,
                                                              run.embedding)
    # the ipg bucket: reduce_bucket_size elements of the communication dtype (the model's), kept
    buckets = parallel.reduce_bucket_size * w
    moments = 0 if settings.paged_optimizer else states.moments
    static = (states.weights + states.master + moments + states.grad_copy + states.gradients
              + step.accumulation_buffer + buckets + persistent)

    # forward: each fetch and release beside what the layers hold by then (a layer's attention
    # modules beside what the layers before it keep and its attention's tensors, its MLP's beside
    # all it keeps; in backward its MLP's at its peak, its attention's once its MLP's are freed)
    count = model.num_layers
    layer_forward, layer_backward, parts = peaks.layer_forward, peaks.layer_backward, peaks.layer_parts

    def in_mlp(name: str) -> bool | None:
        """Whether a layer's module is its MLP's (None: the layer itself)."""
        part = name.split(".")[2] if name.count(".") >= 2 else None
        return None if part is None else part in ("mlp", "post_attention_norm") or part.startswith("extra_norms")

    def forward_level(name: str) -> int:
        where, index = _location(name)
        if not layer_forward:  # Korthikanti's formula: no per-layer figures
            return peaks.forward
        if where == "layer":
            index = min(index, count - 1)
            before = layer_forward[index - 1] if index else (peaks.before_first or 0)
            saved, mlp = parts[index] if parts else (0, 0)
            if not parts or layer_forward[index] - before != saved:  # checkpointed: keeps its input only
                return layer_forward[index]
            part = in_mlp(name)
            return before if part is None else before + saved - (0 if part else mlp)
        if where in ("root", "embedding"):
            return peaks.before_first if peaks.before_first is not None else 0
        return peaks.before_head if peaks.before_head is not None else layer_forward[-1]

    forward_events = [e for e in events if e.phase == "forward"]
    root_release = forward_events[-1]  # the loss runs after the model's forward
    head_forward = peaks.head_forward if peaks.head_forward is not None else peaks.forward
    # each module's most gathered beside its level (one level a module: the maximum over its events)
    by_module, head_after = run.forward_most
    points = [after + head_forward for after in head_after]
    points += [most + forward_level(module) for module, most in by_module.items()]
    points.append(root_release.after + peaks.forward)
    forward = static + max(points)

    # backward: the loss's backward with the forward's gathered set, then each module's
    def backward_level(name: str) -> int:
        where, index = _location(name)
        if where == "layer" and layer_backward:
            index = min(index, len(layer_backward) - 1)
            inside, end = layer_backward[index]
            part = in_mlp(name)
            if not parts or part:
                return inside
            saved, mlp = parts[index]
            return end + saved - (0 if part is None else mlp)
        if where in ("root", "head"):
            return peaks.head_backward if peaks.head_backward is not None else peaks.backward
        if where == "final" and layer_backward:
            return layer_backward[-1][0]
        if where == "embedding" and layer_backward:
            return layer_backward[0][1]
        return peaks.backward

    def flush_level(name: str) -> int:
        """At a gradient hook: its layer's saved tensors (the MLP's freed once past it) and the
        incoming gradient, not the layer's backward transients (the new gradient is the flush's)."""
        where, index = _location(name)
        if where != "layer" or not layer_backward or not parts:
            return backward_level(name)
        index = min(index, len(layer_backward) - 1)
        saved, mlp = parts[index]
        return layer_backward[index][1] + saved - (0 if in_mlp(name) is not False else mlp)

    opening = peaks.opening if peaks.opening is not None else peaks.backward
    backward_events = [e for e in events if e.phase == "backward"]
    points = [root_release.after + opening]
    points += [most + backward_level(module) for module, most in run.backward_most.items()]  # not the leftovers
    embedding = next((e for e in backward_events if e.kind == "fetch" and e.module == "embed_tokens"), None)
    if embedding is not None and not lora:
        # embedding_dense_backward's whole V x h gradient, before its hook copies it into the bucket
        points.append(embedding.after + backward_level("embed_tokens") + embedding_rows * g)
    fetched = {e.module: e for e in backward_events if e.kind == "fetch"}
    last = backward_events[-2] if len(backward_events) > 1 else root_release
    for flush in flushes:
        if flush.module and flush.module in fetched:
            points.append(fetched[flush.module].most + flush_level(flush.module) + flush.bytes)
        else:  # the epilogue, the activations freed
            points.append(last.after + peaks.end_of_backward_extra + flush.bytes)
    backward = static + max(points)

    # the step: release_and_reset_all partitions every parameter (the persistent ones too); each
    # sub-group's 16-bit gradient partitions flattened and cast to fp32 (_prepare_fp32_grad_for_sub_group),
    # the optimizer on it, freed (_release_sub_group); _post_step gathers the persistent ones again
    groups = sub_groups(list(trained))
    fp32_step = replace(states.recipe, grad_dtype=DType.FP32)
    adam = max(4 * size + training.optimizer_step_temporaries(settings, fp32_step, [size]) for size in groups)
    prepare = max(size * g + (4 * size if g != 4 else 0) for size in groups)
    temporaries = max(adam, prepare)
    # it starts with the persistent parameters gathered and ends with them gathered again (each
    # into its own buffer: _allgather_params_coalesced)
    optimizer_step = static + max(0, temporaries - persistent)
    phases = {"forward": forward, "backward": backward, "optimizer_step": optimizer_step}

    working = max(e.most for e in events)
    step = replace(step, sizes=tuple(groups), temporaries=temporaries)
    empty = training.WorkingSet(sharding_units(model, parallel, stage_layers(model, parallel, 0)), False, 0, 0, 0)
    components = training._components(settings, parallel, states, step, peaks, empty, True)
    source = "DeepSpeed 0.19.8 stage3.py, partition_parameters.py, partitioned_param_coordinator.py; measured in " \
             "memcalc/validate/deepspeed.py"
    for index, component in enumerate(components):
        if component.key == "gradients":
            components[index] = replace(component, formula=component.formula + " (grad_partitions_flat_buffer, "
                                        "kept from __init__)", source=source)
        elif component.key == "optimizer_step_temporaries":
            components[index] = replace(component, formula=(
                f"the largest fp32 sub-group ({max(groups):,} elements): its fp32 gradient + "
                f"{settings.optimizer.value} ({settings.optimizer_impl.value})"), source=source)
    at = next(index for index, component in enumerate(components) if component.key == "activations")
    components[at:at] = [
        Component("deepspeed_buckets", "DeepSpeed reduce bucket", buckets, Kind.STATIC,
                  f"reduce_bucket_size {parallel.reduce_bucket_size:,} x {weight_dtype.value} (the ipg buffer, "
                  "kept from __init__)", source),
        Component("persistent_parameters", "ZeRO-3 persistent parameters", persistent, Kind.STATIC,
                  f"parameters of at most {knobs.param_persistence_threshold:,} elements, whole x "
                  f"{weight_dtype.value}", source),
    ]
    components.append(Component(
        "sharding_working_set", "Sharding working set", working, Kind.DYNAMIC,
        f"gathered parameters x {weight_dtype.value}, the most at any fetch (prefetch bucket "
        f"{knobs.prefetch_bucket_size:,}, max live {knobs.max_live_parameters:,}, reuse distance "
        f"{knobs.max_reuse_distance:,} elements)", source))
    return phases, components
