"""Terminal rendering with rich. Only the CLI imports this module; rich is imported lazily."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from memcalc.config import ModelConfig
from memcalc.estimate.assumptions import TrainAssumptions, WeightOrigin
from memcalc.estimate.breakdown import Estimate, Kind
from memcalc.estimate.device import device_memory
from memcalc.estimate.params import count_params
from memcalc.units import UNIT_LABEL, Unit, format_bytes

if TYPE_CHECKING:
    from memcalc.estimate.inference import InferAssumptions


def _console():
    from rich.console import Console

    # memcalc prints no markup: a label or formula with brackets (``x[0]``, ``[experimental]``) is
    # text, and each cell skips rich's markup parser
    return Console(highlight=False, emoji=False, markup=False)


def _natural_width(table) -> int:
    """The width a boxed table of plain-text cells takes with no cell wrapped (a column with a
    ``max_width`` wraps at it): what ``rich.measure.Measurement`` gives, summed here from the cells
    because measuring every layout a terminal might need through rich costs a tenth of start-up."""
    from rich.cells import cell_len

    total = 1
    for column in table.columns:
        widest = max((cell_len(line) for cell in (column.header, *column.cells) for line in str(cell).split("\n")),
                     default=0)
        if column.max_width is not None:
            widest = min(widest, column.max_width)
        total += widest + 3  # the padding on each side and the border after it
    return total


def _first_fitting(console, builds, widths: list[int] | None = None):
    """The first table from ``builds`` (the fullest first) that fits the console without wrapping
    a cell past its column's ``max_width``: a narrower terminal loses optional columns instead of
    folding numbers or truncating words. The last one is used when none fits. ``widths`` collects
    the natural width of each table built."""
    table = None
    for build in builds:
        table = build()
        width = _natural_width(table)
        if widths is not None:
            widths.append(width)
        if width <= console.width:
            return table
    return table


def format_count(count: int) -> str:
    """A parameter count in billions or millions, e.g. ``13.02B``."""
    if count >= 10**9:
        return f"{count / 1e9:,.2f}B"
    return f"{count / 1e6:,.1f}M"


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


SHARE_BAR_WIDTHS = (10, 5, 0)  # characters for 100%, the widest that fits the terminal


def _share_bar(part: int, whole: int, width: int = SHARE_BAR_WIDTHS[0]) -> str:
    """The share as a bar beside its percentage: ``width`` characters for 100%, ``#`` for a full
    character and ``+`` for a half. ASCII on purpose: wide or block characters make rich load its
    Unicode width tables on every run."""
    if not whole:
        return "-"
    if not width:
        return f"{100 * part / whole:.1f}%"
    halves = round(2 * width * part / whole)
    bar = "#" * (halves // 2) + ("+" if halves % 2 else "")
    return f"{bar:<{width}} {100 * part / whole:5.1f}%"


PHASE_LABELS = {"forward": "forward", "backward": "backward", "optimizer_step": "optimizer step",
                "prefill": "prefill", "decode": "decoding"}
PHASE_CONTENTS = {
    "forward": "static + activations",
    "backward": "static + activations left + gradients",
    "optimizer_step": "static + gradients + temporaries",
    "prefill": "weights + prompt KV + prefill act.",
    "decode": "weights + KV + decode buffers",
}


def _assumptions(command: str, estimate: Estimate) -> list[tuple[str, str]]:
    model, settings = estimate.model, estimate.settings
    params = estimate.params
    count = f"{format_count(params.total)} ({params.total:,})"
    if params.active != params.total:
        count += f", {format_count(params.active)} active per token"
    lines = [("model", model.name), ("parameters", count)]
    if command == "train":
        lines += [
            ("precision", f"{settings.precision} ({_recipe_description(settings.precision)})"),
            ("optimizer", f"{settings.optimizer} (moments in {settings.optimizer_state_dtype})"
             if settings.optimizer != "adam8bit" else "adam8bit (bitsandbytes block-wise 8-bit states)"),
            ("optimizer impl.", f"{settings.optimizer_impl} (torch.optim)"),
            ("batch x seq", f"{settings.batch_size} x {settings.seq_len} tokens"),
            ("recompute", _recompute_assumption(settings)),
            ("activations", _activation_assumption(settings)),
            ("parallelism", _parallel_assumption(estimate)),
        ]
        if settings.offload_activations:
            lines.append(("act. offload", "torchtune's OffloadActivations: every saved tensor >= 1 KiB but parameters "
                          "to pinned CPU memory in forward, back in backward; the output head's stay on the GPU"))
        lora = settings.lora
        if lora:
            lines.append(("fine-tuning", f"{'QLoRA' if lora.qlora else 'LoRA'} rank {lora.rank} on "
                          f"{', '.join(lora.targets)}: {lora.trainable_params:,} trainable parameters in "
                          f"{lora.adapter_dtype}"
                          + (f", lora_dropout {lora.dropout:g}" if lora.dropout else "")
                          + f"; the base is frozen ({lora.base_format})"))
    else:
        sequences = settings.sequences
        decoding = settings.decoding
        if decoding == "beam":
            how = f"beam search, {settings.num_beams} beams (the prompt's cache is repeated for every beam)"
        elif decoding == "sample":
            warpers = [f"{name} {value}" for name, value in (("temperature", settings.temperature),
                                                             ("top-k", settings.top_k), ("top-p", settings.top_p))
                       if value is not None and not (name == "temperature" and value == 1.0)]
            how = (f"sampling, {settings.num_return_sequences} sequence(s) per prompt"
                   + (f" ({', '.join(warpers)})" if warpers else ""))
        else:
            how = "greedy"
        engine = ("Hugging Face generate(): cache grown by concatenation, last-position logits copied to fp32"
                  if settings.engine == "hf" else
                  f"vLLM: {settings.block_size}-token blocks in the budget it computes at start-up"
                  if settings.engine == "vllm" else
                  f"{ENGINE_LABEL[settings.engine]}: the cache written in place, sized at start-up by the engine's "
                  f"own rule (its budget below); this table rounds tokens to {settings.block_size}-token blocks"
                  if settings.engine in ENGINE_LABEL else
                  f"paged server: {settings.block_size}-token blocks written in place, tokens rounded up to blocks")
        lines += [
            ("weights", settings.weights + (f" (compute in {settings.dtype})"
                                               if settings.weights != settings.dtype else "")
             + (f", from the checkpoint's {settings.weights_detail}"
                if settings.weights_from is WeightOrigin.CONFIG else "")),
            ("KV cache", f"{settings.kv_dtype}, {settings.kv_cache_bytes_per_token:,} bytes/token"
             + _kv_geometry(model, settings)),
            ("batch x context", f"{settings.batch_size} x {settings.context_len} tokens cached"
             + (f" ({settings.prompt_len} prompt + {settings.max_new_tokens} new, the last not cached)"
                if settings.max_new_tokens else "") + f"; {sequences} sequence(s)"),
            ("decoding", how),
            ("prefill", f"{settings.attention} attention"
             + (" (the class has no SDPA path for its sinks)" if model.attention_sinks and settings.engine == "hf"
                and settings.attention == "eager" else "")
             + f", {settings.prefill_logits}-position logits"
             + (f", chunks of {settings.prefill_chunk} tokens" if settings.prefill_chunk < settings.prompt_len
                else "")),
            ("engine", engine),
        ]
        if settings.tp > 1:
            lines.append(("parallelism", f"tensor parallel over {settings.tp} GPUs: numbers per GPU"))
        if model.sliding_window:
            lines.append(("sliding window", f"{model.sliding_window} tokens on {settings.sliding_layers} of "
                          f"{model.num_layers} layers (their cache holds at most the window)"))
    memory = device_memory(estimate)
    origin = (f"measured: {memory.reserve_source}" if memory.reserve_source else
              f"the median of traced {memory.workload} runs replayed through memcalc.allocator")
    lines.append(("allocator", f"{'expandable segments' if memory.expandable_segments else 'default caching allocator'}"
                  f": reserve +{memory.fragmentation_percent:g}% over the allocated peak ({origin})"))
    lines += [("note", note) for note in model.notes]
    return lines


def _recompute_assumption(settings: TrainAssumptions) -> str:
    text = settings.recompute.value
    if settings.sac_outputs:
        text += f" (per layer keeps its input and {', '.join(settings.sac_outputs)})"
    if settings.recompute_layers > 1:
        text += f", every {settings.recompute_layers} layers"
    return text


def _dropout_assumption(settings: TrainAssumptions) -> str:
    rates = {site: rate for site, rate in (settings.dropout or {}).items() if rate}
    if not rates:
        return "no dropout"
    return "dropout " + ", ".join(f"{site} {rate:g}" for site, rate in rates.items())


def _activation_assumption(settings: TrainAssumptions) -> str:
    if settings.activation_model == "megatron":
        return (f"Megatron formula, {settings.activation_dtype}: GPT block with unfused attention and dropout "
                "(Korthikanti et al. 2022)")
    loss = "chunked loss (1024 tokens at a time)" if settings.loss == "chunked" else "fp32 logits for the loss"
    return (f"saved tensors of the block, {settings.activation_dtype}, {settings.attention} attention, "
            f"{_dropout_assumption(settings)}, {loss}")


def _kv_geometry(model: ModelConfig, settings: InferAssumptions) -> str:
    from memcalc.estimate.inference import attention_layers

    cached = attention_layers(model)
    layers = f"{cached} layers" if cached == model.num_layers else f"{cached} of {model.num_layers} layers"
    if model.mla is not None:
        latent = f", MLA latent {model.mla.kv_lora_rank} + rope {model.mla.qk_rope_head_dim} x {layers}"
        if settings.engine.paged:
            return latent + " (not split by TP)"
        return latent + ", expanded to every head in each forward"
    return f", {model.kv_heads} KV heads x {model.attention_head_dim} head dim x {layers}"


def _parallel_assumption(estimate: Estimate) -> str:
    layout = estimate.settings.parallel
    if layout is None:
        return "none: one device holds everything"
    parts = [f"{layout.gpus} GPUs = dp {layout.dp} x tp {layout.tp} x pp {layout.pp} x cp {layout.cp}"]
    if layout.ep > 1:
        parts.append(f"ep {layout.ep} (experts split over {layout.ep} of the dp x cp ranks)")
    if layout.vpp > 1:
        parts.append(f"{layout.vpp} virtual stages per rank")
    if layout.sp:
        parts.append("sequence parallel")
    if layout.tp > 1:
        parts.append("Megatron-style TP" if layout.tp_impl == "megatron" else "PyTorch DTensor TP")
    if layout.fsdp:
        parts.append("FSDP2" if layout.fsdp_wrap == "layer" else f"FSDP2 units: {layout.fsdp_wrap}")
    if layout.zero:
        parts.append(f"ZeRO-{layout.zero} over {layout.dense_shards} ranks")
    if layout.reduce_bucket_size is not None:
        parts.append(f"DeepSpeed reduce bucket {layout.reduce_bucket_size:,} elements")
    if layout.zero3 is not None:
        knobs = layout.zero3
        parts.append(f"stage 3: prefetch bucket {knobs.prefetch_bucket_size:,}, max live "
                     f"{knobs.max_live_parameters:,}, reuse distance {knobs.max_reuse_distance:,}, persistence "
                     f"threshold {knobs.param_persistence_threshold:,} elements")
    if layout.distributed_optimizer:
        parts.append(f"distributed optimizer over {layout.dense_shards} ranks")
    if layout.offload != "none":
        parts.append(f"offload {layout.offload} to CPU")
    if layout.tp > 1 or layout.vocab_size_padded != estimate.model.vocab_size:
        parts.append(f"vocabulary padded to {layout.vocab_size_padded:,}")
    if layout.pp > 1:
        inflight = layout.inflight_chunks
        unit = "chunks" if layout.vpp > 1 else "micro-batches"
        parts.append(f"{unit} in flight: first stage {inflight[0]}, last {inflight[layout.pp - 1]}")
    busiest = next(view for view in estimate.ranks if view.name == layout.most_loaded_rank)
    parts.append(f"shown: the most loaded GPU ({busiest.name}, {format_count(busiest.parameters)} parameters "
                 "before sharding = P in the formulas)")
    return "; ".join(parts)


def _recipe_description(name: str) -> str:
    from memcalc.precision import RECIPES

    return RECIPES[name].description


FORMULA_WIDTH = 46  # the Formula column wraps at this width when the terminal has room for it


def _device_rows(estimate: Estimate) -> list[tuple[str, int, str, str]]:
    """The device section under the allocated peak: (label, bytes, share, formula)."""
    memory = device_memory(estimate)
    allocator = "expandable segments" if memory.expandable_segments else "caching allocator"
    outside = [f"CUDA context {memory.cuda_context // 2**20} MiB" if not estimate.runtime_bytes
               else _runtime_text(estimate)]
    if memory.workspaces:
        outside.append(f"cuBLAS workspaces {memory.workspaces // 2**20} MiB")
    if memory.nccl:
        outside.append(f"NCCL ~{memory.nccl / 1e9:.2f} GB ({len(memory.communicators)} communicators)")

    return [
        ("Peak reserved (est.)", memory.peak_reserved, f"+{memory.fragmentation_percent:.1f}%",
         f"{allocator}: +{memory.fragmentation_percent:g}% " + (f"(measured: {memory.reserve_source})"
                                                                 if memory.reserve_source else
                                                                 f"(median of the {memory.workload} runs in "
                                                                 "docs/accuracy.md)")),
        ("Runtime overhead", memory.runtime_overhead, "", " + ".join(outside)),
        ("On the device (must fit)", memory.device_total, "", "reserved + runtime overhead"),
    ] + ([("Paged states (managed)", memory.managed, "",
           "CUDA managed memory: on the GPU while there is room, moved to the host under pressure")]
         if memory.managed else [])


def _runtime_text(estimate: Estimate) -> str:
    return " + ".join(component.formula for component in estimate.components if component.kind is Kind.RUNTIME)


def _estimate_rows(estimate: Estimate) -> list[tuple[str, str]]:
    """Every row of the main table with its formula, in table order (the ``--explain`` view)."""
    rows = [(component.label, component.formula) for component in estimate.components
            if component.kind is not Kind.RUNTIME]
    if estimate.phases:
        rows += [(f"During {PHASE_LABELS[phase]}", PHASE_CONTENTS[phase]) for phase in estimate.phases]
        rows.append(("Peak allocated", _peak_text(estimate)))
        if estimate.cpu_total > 0:
            rows.append(("Host memory", "sum of the CPU rows"))
    else:
        rows.append(("Peak allocated", "sum of the rows above"))
    rows += [(title, formula) for title, _bytes, _share, formula in _device_rows(estimate)]
    rows += [(reference.label, reference.formula) for reference in estimate.references]
    return rows


def _peak_text(estimate: Estimate) -> str:
    return f"largest phase: {PHASE_LABELS[estimate.peak_phase]}"


def _estimate_table(command: str, estimate: Estimate, unit: Unit, formula: bool, bar_width: int, kind: bool):
    from rich.table import Table

    label = UNIT_LABEL[unit]
    total = estimate.total
    offloaded = estimate.cpu_total > 0
    table = Table(title=f"memcalc {command}: {estimate.model.name}", title_justify="left")
    table.add_column("Component", no_wrap=True)
    if offloaded:
        table.add_column(f"GPU {label}", justify="right", no_wrap=True)
        table.add_column(f"CPU {label}", justify="right", no_wrap=True)
    else:
        table.add_column(label, justify="right", no_wrap=True)
    table.add_column("Share", justify="right", no_wrap=True)
    if kind:
        table.add_column("Kind", no_wrap=True)
    if formula:
        table.add_column("Formula", max_width=FORMULA_WIDTH)

    def add(title: str, values: list[str], share: str, kind_text: str, formula_text: str, style=None) -> None:
        table.add_row(title, *values, share, *([kind_text] if kind else []), *([formula_text] if formula else []),
                      style=style)

    def amounts(value: int, location: str = "gpu") -> list[str]:
        if not offloaded:
            return [format_bytes(value, unit)]
        shown = format_bytes(value, unit)
        return ["-", shown] if location == "cpu" else [shown, "-"]

    for component in estimate.components:
        if component.kind is Kind.RUNTIME:  # beyond the allocated peak: in the device section below
            continue
        share = _share_bar(component.bytes, total, bar_width) if component.location == "gpu" else "-"
        add(component.label, amounts(component.bytes, component.location), share, component.kind.value,
            component.formula)
    table.add_section()
    if estimate.phases:
        for phase, live in estimate.phases.items():
            marker = " (peak)" if phase == estimate.peak_phase else ""
            add(f"During {PHASE_LABELS[phase]}{marker}", amounts(live), _share(live, total), "phase",
                PHASE_CONTENTS[phase])
        table.add_section()
        add("Peak allocated", amounts(total), "100.0%", "", _peak_text(estimate), style="bold")
        if offloaded:
            table.add_row("Host memory", "-", format_bytes(estimate.cpu_total, unit), "",
                          *([""] if kind else []), *(["sum of the CPU rows"] if formula else []), style="bold")
    else:
        add("Peak allocated", amounts(total), "100.0%", "", "sum of the rows above", style="bold")
    for title, value, share, text in _device_rows(estimate):
        add(title, amounts(value), share, "device", text, style="bold" if title.startswith("On the device") else None)
    for reference in estimate.references:
        add(reference.label, amounts(reference.bytes), "", "reference", reference.formula)
    return table


def _formulas_grid(estimate: Estimate):
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for title, formula in _estimate_rows(estimate):
        grid.add_row(title, formula)
    return grid


def print_estimate(command: str, estimate: Estimate, unit: Unit, gpu=None, explain: bool = False) -> None:
    from rich.table import Table

    label = UNIT_LABEL[unit]
    total = estimate.total
    console = _console()
    variants = [(True, SHARE_BAR_WIDTHS[0], True)] + [(False, bar, kind) for kind in (True, False)
                                                     for bar in SHARE_BAR_WIDTHS]
    widths: list[int] = []  # the fullest table's first: the width the formulas need
    table = _first_fitting(console, [lambda v=v: _estimate_table(command, estimate, unit, *v) for v in variants], widths)
    formula_shown = any(column.header == "Formula" for column in table.columns)

    assumptions = Table.grid(padding=(0, 2))
    assumptions.add_column(style="bold", no_wrap=True)
    assumptions.add_column()
    for key, value in _assumptions(command, estimate):
        assumptions.add_row(key, value)

    checkpoint = Table(title="Checkpoint size on disk", title_justify="left")
    checkpoint.add_column("Checkpoint")
    checkpoint.add_column(label, justify="right", no_wrap=True)
    checkpoint.add_column("Contents", max_width=FORMULA_WIDTH)
    for component in estimate.checkpoint:
        checkpoint.add_row(component.label, format_bytes(component.bytes, unit), component.formula)

    console.print(table)
    if estimate.phases and command == "train":
        console.print(
            "Shares are of the allocated peak: the largest phase, not the sum of the rows (activations are "
            "freed during backward, before the optimizer step allocates its temporaries). The device also "
            "holds the allocator's unused reserve and what lives outside it."
        )
    elif estimate.phases:
        console.print("Shares are of the allocated peak: the larger of prefill and decoding, not the sum of the "
                      "rows. The device also holds the allocator's unused reserve and the runtime overhead.")
    if not formula_shown:
        if explain:
            console.print()
            console.print("How each row is computed", style="bold underline")
            console.print(_formulas_grid(estimate))
        else:
            wide = widths[0]
            console.print(f"Formulas: add --explain, or widen the terminal to {wide} columns.")
    if len(estimate.ranks) > 1:
        console.print(_ranks_table(estimate, unit))
    memory = device_memory(estimate)
    other = Unit.GB if unit is Unit.GIB else Unit.GIB
    per_gpu = " per GPU (most loaded)" if estimate.ranks or getattr(estimate.settings, "tp", 1) > 1 else ""
    on_device = memory.device_total
    console.print(f"On the device: {format_bytes(on_device, unit)} {label} ({format_bytes(on_device, other)} "
                  f"{UNIT_LABEL[other]}){per_gpu}; peak allocated {format_bytes(total, unit)}, reserved "
                  f"{format_bytes(memory.peak_reserved, unit)} {label}.")
    if gpu is not None:
        console.print(_fit_line(on_device, gpu, unit))
    console.print()
    console.print("Assumptions", style="bold underline")
    console.print(assumptions)
    console.print()
    console.print(checkpoint)


def _fit_line(required: int, gpu, unit: Unit) -> str:
    """``required``: the device total, against the capacity CUDA reports for ``gpu``."""
    label = UNIT_LABEL[unit]
    usable = gpu.usable_memory_bytes
    capacity = f"{format_bytes(usable, unit)} {label} usable of {format_bytes(gpu.memory_bytes, unit)}"
    if required <= usable:
        return f"Fits on {gpu.name} ({capacity}): {format_bytes(usable - required, unit)} {label} to spare."
    return f"Does not fit on {gpu.name} ({capacity}): {format_bytes(required - usable, unit)} {label} over."


def _ranks_table(estimate: Estimate, unit: Unit):
    from rich.table import Table

    table = Table(title=f"Per pipeline stage ({UNIT_LABEL[unit]})", title_justify="left")
    for column in ("Rank", "Params", "Forward", "Backward", "Opt. step", "Peak"):
        table.add_column(column, justify="left" if column == "Rank" else "right", no_wrap=True)
    busiest = max(estimate.ranks, key=lambda view: view.total)
    for view in estimate.ranks:
        table.add_row(f"{view.name} (pp rank {view.pipeline_rank})", format_count(view.parameters),
                      *(format_bytes(view.phases[phase], unit) for phase in ("forward", "backward", "optimizer_step")),
                      format_bytes(view.total, unit), style="bold" if view is busiest else None)
    return table


SCENARIO_HEADER_WIDTH = 16  # longer scenario names move under the compare table

COMPARED = ("weights", "master_weights", "optimizer_states", "gradients", "ddp_buckets", "deepspeed_buckets",
            "activations", "optimizer_step_temporaries", "sharding_working_set")


def _scenario_table(model: ModelConfig, results: list[tuple[int, str, Estimate]], unit: Unit, gpu, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("", no_wrap=True)
    for index, name, _estimate in results:
        # A long scenario is numbered in the header and spelled out under the table.
        header = f"{index}. {name}" if len(name) <= SCENARIO_HEADER_WIDTH else f"#{index}"
        table.add_column(header, justify="right", no_wrap=True)
    estimates = [estimate for _index, _name, estimate in results]

    def row(title: str, values: list[str], style: str | None = None) -> None:
        table.add_row(title, *values, style=style)

    def component(estimate: Estimate, key: str) -> str:
        try:
            item = estimate.component(key)
        except KeyError:
            return "-"
        where = " (CPU)" if item.location == "cpu" else ""
        return f"{format_bytes(item.bytes, unit)}{where}"

    for key in COMPARED:
        if all(key not in {c.key for c in estimate.components} for estimate in estimates):
            continue
        row(next(c.label for e in estimates for c in e.components if c.key == key),
            [component(estimate, key) for estimate in estimates])
    table.add_section()
    row("Peak allocated", [format_bytes(estimate.total, unit) for estimate in estimates], "bold")
    row("Peak phase", [PHASE_LABELS[estimate.peak_phase] for estimate in estimates])
    if any(estimate.cpu_total for estimate in estimates):
        row("Host memory", [format_bytes(estimate.cpu_total, unit) for estimate in estimates])
    row("Most loaded rank", [estimate.ranks and max(estimate.ranks, key=lambda v: v.total).name or "the only GPU"
                             for estimate in estimates])
    row("GPUs", [str(e.settings.parallel.gpus if e.settings.parallel else 1) for e in estimates])
    row("Batch x seq", [f"{e.settings.batch_size} x {e.settings.seq_len}" for e in estimates])
    row("Precision", [e.settings.precision for e in estimates])
    row("Recompute", [e.settings.recompute for e in estimates])
    if gpu is not None:
        table.add_section()
        required = [device_memory(e).device_total for e in estimates]
        row("On the device", [format_bytes(value, unit) for value in required])
        usable = gpu.usable_memory_bytes
        row(f"Fits {gpu.name}", ["yes" if value <= usable else f"no (+{format_bytes(value - usable, unit)})"
                                 for value in required], "bold")
    return table


def print_scenarios(model: ModelConfig, results: list[tuple[str, Estimate]], unit: Unit, gpu=None) -> None:
    """``memcalc compare``: components as rows, one column per scenario (the most loaded GPU's); more
    scenarios than the terminal holds side by side continue in a second table."""
    label = UNIT_LABEL[unit]
    console = _console()
    numbered = [(index, name, estimate) for index, (name, estimate) in enumerate(results, start=1)]
    title = f"memcalc compare: {model.name} ({label} per GPU, most loaded rank)"
    per_table = len(numbered)
    while per_table > 1 and _natural_width(_scenario_table(model, numbered[:per_table], unit, gpu,
                                                           title)) > console.width:
        per_table -= 1
    for start in range(0, len(numbered), per_table):
        console.print(_scenario_table(model, numbered[start:start + per_table], unit, gpu,
                                      title if start == 0 else f"memcalc compare (continued): {model.name}"))
    for index, name, _estimate in numbered:
        if len(name) > SCENARIO_HEADER_WIDTH:
            console.print(f"#{index}: {name}")
    if gpu is not None:
        console.print(f"{gpu.name}: {format_bytes(gpu.usable_memory_bytes, unit)} {label} usable; "
                      "fits compares the device total (reserved + context, workspace, NCCL).")
    first = results[0][1]
    console.print(f"{first.model.name}: {format_count(first.params.total)} parameters. Each column is the most loaded "
                  "GPU of its layout; `memcalc train` with the same flags shows every component's formula.")


def _vllm_grid(budget, unit: Unit, measured=None):
    """vLLM's start-up budget as rows; ``measured`` (a memcalc.calibration.VLLMStartup) adds a column."""
    from rich.table import Table

    label = UNIT_LABEL[unit]
    table = Table(title=f"vLLM start-up budget ({label})", title_justify="left")
    table.add_column("Term", no_wrap=True)
    table.add_column("memcalc", justify="right", no_wrap=True)
    if measured is not None:
        table.add_column("Log", justify="right", no_wrap=True)
    table.add_column("From", max_width=36)

    def row(title: str, value: int, logged: int | None, source: str, style=None) -> None:
        cells = [title, format_bytes(value, unit)]
        if measured is not None:
            cells.append("-" if logged is None else format_bytes(logged, unit))
        table.add_row(*cells, source, style=style)

    log = measured or type("Nothing", (), {key: None for key in ("weights", "activation_peak", "non_torch",
                                                                   "kv_cache")})()
    row("Requested", budget.requested, None,
        f"{budget.utilization:.0%} of {format_bytes(budget.total_memory, unit)} {label} (CUDA's total)")
    row("Weights", budget.weights, log.weights, f"the estimate + {format_bytes(budget.rotary_cache, Unit.MIB)} MiB "
        "rotary cache")
    row("Activation peak", budget.activation_peak, log.activation_peak, budget.activation_from)
    row("Non-torch memory", budget.non_torch, log.non_torch, budget.non_torch_from)
    graphs = budget.cudagraphs
    if graphs.profiled:
        row("CUDA graphs", graphs.bytes, None, "profiled first (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1)")
    row("KV cache", budget.kv_cache, log.kv_cache,
        f"requested - the {'four' if graphs.profiled else 'three'} above", style="bold")
    if not graphs.profiled:
        row("CUDA graphs", graphs.bytes, None, "captured after the KV cache, out of the headroom")
    return table


def _vllm_graph_lines(budget, unit: Unit) -> list[str]:
    """vLLM's CUDA graphs (memcalc.serving.VLLMGraphs): what is captured, memcalc's figure, and whether it fits."""
    label = UNIT_LABEL[unit]
    graphs = budget.cudagraphs
    if not graphs.count:
        return [f"CUDA graphs: none ({graphs.profiled_from}; vLLM {graphs.version})."]
    kinds = ", ".join(f"{len(sizes)} {name} (largest {max(sizes)})" for name, sizes in
                      (("piecewise", graphs.piecewise_sizes), ("full", graphs.full_sizes)) if sizes)
    lines = [f"CUDA graphs (vLLM {graphs.version}, {graphs.mode.value}, max_num_seqs {graphs.max_num_seqs}): {kinds}; "
             f"{format_bytes(graphs.bytes, unit)} {label} = {format_bytes(graphs.pool, unit)} {label} pool (one "
             f"forward of {graphs.largest} tokens) + {format_bytes(graphs.per_size, unit)} {label} for the captures "
             "(memcalc's formula, calibrated on published logs: docs/serving.md)."]
    if graphs.profiled:
        verdict = ("vLLM starts" if budget.graphs_fit else
                   "no KV cache is left: vLLM refuses to start (\"No available memory for the cache blocks\")")
        lines.append(f"They are {graphs.profiled_from}: {verdict}.")
    else:
        verdict = ("fits" if budget.graphs_fit else "does not fit: vLLM runs out of memory capturing them after "
                   "the KV cache; lower --gpu-util, --max-num-seqs, or --enforce-eager")
        lines.append(f"They are {graphs.profiled_from}: {format_bytes(budget.graph_headroom, unit)} {label} (the other "
                     f"{1 - budget.utilization:.0%} less the CUDA context): {verdict}.")
    lines.extend(graphs.notes)
    return lines


def print_vllm(budget, unit: Unit) -> None:
    console = _console()
    console.print()
    console.print(_vllm_grid(budget, unit))
    console.print(f"{budget.blocks:,} blocks of {budget.block_size} tokens = {budget.tokens:,} tokens; "
                  f"{budget.max_concurrency:.2f} requests of {budget.max_model_len:,} tokens at once.")
    for line in _vllm_profile_lines(budget, unit):
        console.print(line)
    for line in _vllm_graph_lines(budget, unit):
        console.print(line, style=None if budget.graphs_fit else "bold")
    console.print(f"Source (CUDA graphs): {budget.cudagraphs.source}.")


def _vllm_profile_lines(budget, unit: Unit) -> list[str]:
    """vLLM's profile run (memcalc.serving.VLLMProfile): its two phases, and what a calibration replaced."""
    profile, label = budget.profile, UNIT_LABEL[unit]
    if profile is None:
        return []
    buffer = (f" + {format_bytes(profile.buffer, unit)} {label} Triton buffer ({profile.buffer_rows} rows)"
              if profile.buffer else "")
    moe = (f" + {format_bytes(profile.moe_workspace, unit)} {label} fused-MoE workspace (kept from the forward)"
           if profile.moe_workspace else "")
    used = ("the sampler's" if profile.sampler_wins else "the forward's")
    if budget.activation_peak != profile.peak:
        used = f"the calibration's {format_bytes(budget.activation_peak, unit)} {label} in its place"
    lines = [f"Profile run (vLLM {profile.version}, {profile.runner} runner): forward of {profile.tokens:,} tokens in "
             f"{profile.requests:,} requests {format_bytes(profile.forward, unit)} {label}; sampler "
             f"{format_bytes(profile.sampler_peak, unit)} {label} = {format_bytes(profile.held, unit)} {label} held + "
             f"{profile.logits:,} x {profile.vocab:,} logits x {profile.bytes_per_logit} B ({profile.per_logit})"
             f"{buffer}{moe}; activation peak: {used}.",
             f"Source (profile): {profile.source}."]
    lines.extend(f"Note: {note}." for note in profile.notes)
    return lines


ENGINE_LABEL = {"sglang": "SGLang", "trtllm": "TensorRT-LLM", "llamacpp": "llama.cpp"}


def _budget_table(title: str, unit: Unit):
    from rich.table import Table

    table = Table(title=f"{title} ({UNIT_LABEL[unit]})", title_justify="left")
    table.add_column("Term", no_wrap=True)
    table.add_column("memcalc", justify="right", no_wrap=True)
    table.add_column("From", max_width=40)
    return table


def _print_source(console, budget) -> None:
    console.print(f"Source ({budget.version}): {budget.source}.")
    for note in budget.notes:
        console.print(f"Note: {note}.")


def print_sglang(budget, unit: Unit) -> None:
    label = UNIT_LABEL[unit]
    table = _budget_table("SGLang start-up budget", unit)
    rows = [
        ("Total", budget.total_memory, "what CUDA reports"),
        ("Before loading", budget.before_load, budget.before_load_from),
        ("Free before loading", budget.free_before_load, "total - the above"),
        ("Weights + KV pool", budget.static, f"mem_fraction_static {budget.mem_fraction_static:.3f} x free"),
        ("Weights", budget.weights, f"the estimate + {format_bytes(budget.rotary_cache, Unit.MIB)} MiB fp32 "
                                    "rotary cache"),
        ("KV pool", budget.kv_cache, "the line above - weights"),
        ("Headroom", budget.headroom, "activations and CUDA graphs: (1 - fraction) x free"),
    ]
    for title, value, source in rows:
        table.add_row(title, format_bytes(value, unit), source, style="bold" if title == "KV pool" else None)
    console = _console()
    console.print()
    console.print(table)
    if budget.reserved_mib is not None:
        graphs = (f"piecewise CUDA graphs up to {budget.piecewise_tokens} tokens" if budget.piecewise_tokens
                  else "piecewise CUDA graphs off")
        console.print(f"mem_fraction_static {budget.mem_fraction_static:.3f} = ({budget.gpu_mem_mib:,.0f} - "
                      f"{budget.reserved_mib:,.0f}) / {budget.gpu_mem_mib:,.0f} MiB ({budget.fraction_from}): "
                      f"chunked_prefill_size {budget.chunked_prefill_size}, cuda_graph_max_bs "
                      f"{budget.cuda_graph_max_bs}, TP {budget.tp}, {graphs}; GPU memory: {budget.gpu_mem_from}.")
    else:
        console.print(f"mem_fraction_static {budget.mem_fraction_static:.3f}: {budget.fraction_from}.")
    console.print(f"{budget.tokens:,} tokens (max_total_num_tokens) of {budget.cell_bytes:,} bytes; K size "
                  f"{format_bytes(budget.k_size, unit)} {label}, V the same (SGLang's log writes GiB as GB); "
                  f"{budget.max_concurrency:.2f} requests of {budget.max_model_len:,} tokens at once.")
    _print_source(console, budget)


def print_trtllm(budget, unit: Unit) -> None:
    table = _budget_table("TensorRT-LLM start-up budget", unit)
    rows = [
        ("Total", budget.total_memory, "what CUDA reports"),
        ("Weights", budget.weights, "the estimate"),
        ("Activation peak", budget.activation_peak, budget.activation_from),
        ("Outside torch", budget.non_torch, budget.non_torch_from),
        ("Free after the peak", budget.free, "total - the three above"),
        ("KV cache", budget.kv_cache, f"free_gpu_memory_fraction {budget.fraction:g} x free"),
    ]
    for title, value, source in rows:
        table.add_row(title, format_bytes(value, unit), source, style="bold" if title == "KV cache" else None)
    console = _console()
    console.print()
    console.print(table)
    console.print(f"{budget.blocks:,} blocks of {budget.tokens_per_block} tokens = {budget.tokens:,} tokens of "
                  f"{budget.token_bytes:,} bytes; {budget.max_concurrency:.2f} requests of {budget.max_model_len:,} "
                  f"tokens at once (profiled with max_num_tokens {budget.max_num_tokens}).")
    _print_source(console, budget)


def _layer_span(layers: tuple[int, ...], output: bool, cpu: bool = False) -> str:
    """A device's share: the input embedding (the CPU's), its repeating layers, the output layer."""
    parts = ["input"] if cpu else []
    if layers:
        parts.append(f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0]))
    if output:
        parts.append("output")
    return " + ".join(parts) or "-"


def print_llamacpp(budget, unit: Unit, gpu_name: str | None = None) -> None:
    from rich.table import Table

    label = UNIT_LABEL[unit]
    table = Table(title=f"llama.cpp allocation per device ({label})", title_justify="left")
    for header in ("Device", "Layers", "Weights", "KV cache", "Compute", "Context", "Total"):
        table.add_column(header, justify="left" if header in ("Device", "Layers") else "right", no_wrap=True)
    for device in budget.devices:
        table.add_row(device.name, _layer_span(device.layers, device.output, device.name == "CPU"),
                      format_bytes(device.weights, unit), format_bytes(device.kv_cache, unit),
                      format_bytes(device.compute, unit), format_bytes(device.context, unit),
                      format_bytes(device.total, unit), style="bold" if device.name != "CPU" else None)
    console = _console()
    console.print()
    console.print(table)
    padding = f", padded from {budget.n_ctx_requested:,} to 256" if budget.n_ctx != budget.n_ctx_requested else ""
    console.print(f"n_ctx {budget.n_ctx:,} cells{padding}: KV self size {format_bytes(budget.kv_cache, Unit.MIB)} "
                  f"MiB, K ({budget.type_k}) {format_bytes(budget.kv_k, Unit.MIB)} MiB, V ({budget.type_v}) "
                  f"{format_bytes(budget.kv_v, Unit.MIB)} MiB; flash attention {'on' if budget.flash_attn else 'off'}, "
                  f"n_ubatch {budget.n_ubatch}.")
    console.print(f"Weights: {budget.weights_from}; the input embedding stays on the CPU. Compute: "
                  f"{budget.compute_from}; the CPU's is the graph inputs (embeddings and mask). Context: memcalc's "
                  "CUDA context per GPU.")
    where = f"On {gpu_name}" if gpu_name else "On each GPU"
    verdict = ("no layer is on a GPU" if not budget.gpus else "every GPU fits" if budget.fits else
               "does not fit: " + ", ".join(device.name for device in budget.gpus
                                             if device.total > budget.device_memory))
    console.print(f"{where} ({format_bytes(budget.device_memory, unit)} {label} usable): {verdict}.")
    _print_source(console, budget)


def print_engine_budget(budget, unit: Unit, gpu_name: str | None = None) -> None:
    """An engine's start-up budget (memcalc.serving), beside the estimate."""
    from memcalc.serving import LlamaCppBudget, SGLangBudget, TRTLLMBudget

    if isinstance(budget, SGLangBudget):
        print_sglang(budget, unit)
    elif isinstance(budget, TRTLLMBudget):
        print_trtllm(budget, unit)
    elif isinstance(budget, LlamaCppBudget):
        print_llamacpp(budget, unit, gpu_name)
    else:
        print_vllm(budget, unit)


def print_calibration(startup, estimate, unit: Unit, written: str | None) -> None:
    console = _console()
    label = UNIT_LABEL[unit]
    if estimate is None:
        console.print(f"{startup.source}: no bundled model matches the log's model={startup.model!r}; give "
                      "--model for memcalc's figures beside these. Measured:")
        for key in ("weights", "activation_peak", "non_torch", "kv_cache"):
            value = getattr(startup, key)
            if value is not None:
                console.print(f"  {key.replace('_', ' ')}: {format_bytes(value, unit)} {label}")
    else:
        calibrated, default = estimate
        console.print(_vllm_grid(default, unit, startup))
        console.print(f"With the log's activation peak and non-torch memory, memcalc's KV cache is "
                      f"{format_bytes(calibrated.kv_cache, unit)} {label}"
                      + (f" (log: {format_bytes(startup.kv_cache, unit)} {label})" if startup.kv_cache else "")
                      + f": {calibrated.blocks:,} blocks"
                      + (f" (log: {startup.gpu_blocks:,})" if startup.gpu_blocks else "") + ".")
    if written is not None:
        console.print(f"Wrote {written}: use it with `memcalc infer ... --engine vllm --gpu NAME --calibration "
                      f"{written}`.")


def print_allocator_calibration(stats, unit: Unit, written: str | None) -> None:
    """An allocator dump's peaks, its reserve, and the medians memcalc assumes without it."""
    from memcalc.estimate.device import FRAGMENTATION_PERCENT

    console = _console()
    label = UNIT_LABEL[unit]
    rounded = "" if stats.exact else " (memory_summary()'s rounded units)"
    console.print(f"{stats.source}: peak allocated {format_bytes(stats.peak_allocated, unit)} {label}, peak reserved "
                  f"{format_bytes(stats.peak_reserved, unit)} {label}{rounded}: the allocator reserved "
                  f"+{stats.reserve_percent:g}% over the allocated peak"
                  + (f"; {stats.alloc_retries} cudaMalloc retries" if stats.alloc_retries else "") + ".")
    medians = ", ".join(f"{kind} +{value:g}%" for kind, value in FRAGMENTATION_PERCENT.items())
    console.print(f"memcalc's medians without a calibration (docs/allocator.md): {medians}.")
    if written is not None:
        console.print(f"Wrote {written}: use it with `memcalc train ... --calibration {written}`.")


def print_inference(estimate: Estimate, unit: Unit, fit=None, capacity=None, explain: bool = False,
                    startup=None) -> None:
    print_estimate("infer", estimate, unit, explain=explain)
    label = UNIT_LABEL[unit]
    console = _console()
    if startup is not None:
        print_engine_budget(startup, unit, fit.gpu if fit is not None else None)
    if fit is not None:
        console.print()
        verdict = "fits" if fit.fits else "does not fit"
        console.print(f"On {fit.gpu} ({format_bytes(fit.gpu_memory, unit)} {label} usable, using "
                      f"{fit.utilization:.0%}): this workload {verdict} ({format_bytes(fit.required, unit)} {label} on "
                      "the device).", style="bold")
        context_note = " (the model's maximum positions)" if fit.context_limited_by_model else ""
        console.print(f"  largest batch at this context: {fit.max_batch}")
        console.print(f"  largest context at this batch: {fit.max_context:,} tokens{context_note}")
        if startup is None:  # vLLM's own budget is above
            console.print(f"  paged KV capacity: {fit.kv_tokens:,} tokens in {fit.kv_blocks:,} blocks "
                          f"({format_bytes(max(fit.kv_budget, 0), unit)} {label} left after weights, activations, "
                          "logits and overhead)")
    if capacity is not None:
        console.print()
        console.print(f"A KV budget of {format_bytes(capacity.budget, unit)} {label} holds {capacity.tokens:,} tokens "
                      f"in {capacity.blocks:,} blocks of {capacity.block_size} "
                      f"tokens ({estimate.settings.kv_cache_bytes_per_token:,} bytes/token).")


ADVICE_PROSE_WIDTH = 28


def print_advice(advice, unit: Unit) -> None:
    """What would make it fit, in the seed's order, each change alone."""
    from rich.table import Table

    label = UNIT_LABEL[unit]
    console = _console()
    console.print()
    if not advice:
        console.print("No single change lowers the peak; see `memcalc plan` for layouts over more GPUs.")
        return
    table = Table(title="What would make it fit (each change alone, same estimator)", title_justify="left")
    for column in ("Change", f"Saves {label}", f"Peak {label}", "Fits", "Cost"):
        prose = column in ("Change", "Cost")
        table.add_column(column, justify="left" if prose or column == "Fits" else "right", no_wrap=not prose,
                         max_width=ADVICE_PROSE_WIDTH if prose else None)
    for item in advice:
        table.add_row(item.change, format_bytes(item.saved, unit), format_bytes(item.total, unit),
                      "yes" if item.fits else "no", item.cost)
    console.print(table)


PLAN_LAYOUT_WIDTH = 36  # the layout wraps at this width, between its settings


def print_plan(result, unit: Unit, elapsed_s: float) -> None:
    from rich.table import Table

    label = UNIT_LABEL[unit]
    table = Table(title=f"memcalc plan: {result.model.name} on {result.gpus} x {result.gpu.name}, seq {result.seq_len}, "
                        f"global batch {result.global_batch}", title_justify="left")
    for column in ("#", "Layout", f"{label}", f"Host {label}", "Step s", "Tokens/s", "MFU"):
        layout = column == "Layout"
        table.add_column(column, justify="left" if layout else "right", no_wrap=not layout,
                         max_width=PLAN_LAYOUT_WIDTH if layout else None)
    for index, item in enumerate(result.top, start=1):
        table.add_row(str(index), item.layout.describe(), format_bytes(item.memory_bytes, unit),
                      format_bytes(item.host_bytes, unit) if item.host_bytes else "-", f"{item.step_time_s:.2f}",
                      f"{item.tokens_per_s:,.0f}", f"{item.mfu:.1%}")
    console = _console()
    console.print(table)
    limit = format_bytes(result.limit_bytes, unit)
    if not result.top:
        console.print(f"No layout fits in {limit} {label} per GPU ({result.headroom:.0%} headroom).", style="bold")
    else:
        console.print(f"Memory is the most loaded GPU's, from the same estimator as `memcalc train`; limit {limit} "
                      f"{label} ({result.headroom:.0%} headroom). Step time: docs/plan.md.")
    if result.rejected:
        console.print("Families that do not fit:", style="bold")
        for item in result.rejected:
            console.print(f"  {item.reason}")
    counts = result.counts
    console.print(f"{counts.valid:,} valid layouts, {counts.estimated:,} estimated, {counts.fitting:,} confirmed to "
                  f"fit, in {elapsed_s:.2f} s. Assumptions: "
                  + ", ".join(f"{key} {value}" for key, value in result.assumptions.items()))


_SWEEP_TITLES = {"weights": "Weights", "master_weights": "Master", "optimizer_states": "Optim.",
                 "gradients": "Grads", "activations": "Activ.", "optimizer_step_temporaries": "Step tmp",
                 "sharding_working_set": "ZeRO-3"}
_STATIC = ("weights", "master_weights", "optimizer_states", "gradients")


def _sweep_table(model: ModelConfig, key: str, points, unit: Unit, gpu, over_point, keys: list[str], merged: bool,
                 phase: bool):
    from rich.table import Table

    from memcalc.sweep import SWEEPABLE

    label = UNIT_LABEL[unit]
    table = Table(title=f"memcalc sweep: {model.name} over {key} ({SWEEPABLE[key]}), {label} per GPU",
                  title_justify="left")
    table.add_column(key, justify="right", no_wrap=True)
    columns = ([k for k in keys if k not in _STATIC] if merged else keys)
    if merged:
        table.add_column("Static", justify="right", no_wrap=True)
    for item in columns:
        table.add_column(_SWEEP_TITLES[item], justify="right", no_wrap=True)
    table.add_column("Allocated", justify="right", no_wrap=True)
    table.add_column("Device", justify="right", no_wrap=True)
    if phase:
        table.add_column("Peak phase", no_wrap=True)
    if gpu is not None:
        table.add_column("Fits", no_wrap=True)
    for point in points:
        if point.estimate is None:
            table.add_row(f"{point.value:,}", *(["-"] * (len(columns) + merged)), "-", "-",
                          *([point.error] if phase else []), *(["-"] if gpu else []))
            continue
        estimate = point.estimate
        parts = {component.key: component.bytes for component in estimate.components}
        cells = [format_bytes(parts[item], unit) if item in parts else "-" for item in columns]
        if merged:
            cells.insert(0, format_bytes(sum(parts.get(item, 0) for item in _STATIC), unit))
        fits = ([("yes" if device_memory(estimate).device_total <= gpu.usable_memory_bytes else "no")]
                if gpu else [])
        table.add_row(f"{point.value:,}", *cells, format_bytes(estimate.total, unit),
                      format_bytes(device_memory(estimate).device_total, unit),
                      *([PHASE_LABELS[estimate.peak_phase]] if phase else []), *fits,
                      style="bold" if point is over_point else None)
    return table


def print_sweep(model: ModelConfig, key: str, points, unit: Unit, gpu=None, over_point=None) -> None:
    """One row per swept value, the components as columns, the most loaded GPU's peak last; a narrow
    terminal sums weights, master weights, optimizer states and gradients into one Static column."""
    label = UNIT_LABEL[unit]
    keys = [k for k in COMPARED if any(p.estimate is not None and k in {c.key for c in p.estimate.components}
                                       for p in points)]
    console = _console()
    variants = [(False, True), (True, True), (True, False)]
    table = _first_fitting(console, [lambda v=v: _sweep_table(model, key, points, unit, gpu, over_point, keys, *v)
                                     for v in variants])
    console.print(table)
    headers = {column.header for column in table.columns}
    if "Static" in headers:
        console.print("Static: weights + master weights + optimizer states + gradients.")
    if "Peak phase" not in headers and any(point.error for point in points):
        console.print("Points without numbers: " + "; ".join(f"{point.value:,}: {point.error}" for point in points
                                                             if point.error))
    if gpu is not None:
        if over_point is None:
            console.print(f"Every point fits on {gpu.name} ({format_bytes(gpu.usable_memory_bytes, unit)} {label} "
                          "usable, device totals).")
        else:
            console.print(f"Stops fitting on {gpu.name} ({format_bytes(gpu.usable_memory_bytes, unit)} {label} usable) at "
                          f"{key} = {over_point.value:,}.")


def _precision_cells(recipe) -> dict[str, str]:
    gemm = recipe.gemm
    if gemm is None:
        master = f" + master {recipe.master_dtype.value}" if recipe.master_dtype else ""
        breakdown = (f"{recipe.weight_dtype.value} weight + {recipe.grad_dtype.value} grad{master} + 2 x "
                     f"{recipe.optimizer_state_dtype.value} moments")
    else:
        parts = [("weight", gemm.weight), ("copies", gemm.copies), ("transpose (Hopper)", gemm.transpose),
                 ("grad", gemm.gradient), ("master", gemm.master), ("m", gemm.first_moment),
                 ("v", gemm.second_moment)]
        breakdown = " + ".join(f"{name} {float(value):g}" for name, value in parts if value)
    total, blackwell = recipe.linear_bytes_per_param(), recipe.linear_bytes_per_param(transpose=False)
    value = f"{float(total):g}" + (f" ({float(blackwell):g} Blackwell)" if blackwell != total else "")
    cached = f"{float(recipe.gemm_input_bytes):g} B" if recipe.gemm_input_bytes else recipe.activation_dtype.value
    return {"Recipe": recipe.name, "B/param (Adam)": value, "Breakdown": breakdown, "GEMM input": cached,
            "Needs": recipe.requires or "-", "Source": recipe.source}


PRECISION_COLUMNS = ("Recipe", "B/param (Adam)", "Breakdown", "GEMM input", "Needs", "Source")
_PROSE_WIDTH = {"Breakdown": 36, "Source": 48}


def _precisions_table(rows: list[dict[str, str]], columns: tuple[str, ...]):
    from rich.table import Table

    table = Table(title="memcalc precisions: bytes per linear-layer weight", title_justify="left")
    for column in columns:
        prose = column in _PROSE_WIDTH
        table.add_column(column, justify="right" if column == "B/param (Adam)" else "left", no_wrap=not prose,
                         max_width=_PROSE_WIDTH.get(column))
    for cells in rows:
        table.add_row(*(cells[column] for column in columns))
    return table


def print_precisions(recipes, explain: bool = False) -> None:
    from rich.table import Table

    rows = [_precision_cells(recipe) for recipe in recipes]
    console = _console()
    narrow = tuple(column for column in PRECISION_COLUMNS if column != "Source")
    table = _first_fitting(console, [lambda: _precisions_table(rows, PRECISION_COLUMNS),
                                     lambda: _precisions_table(rows, narrow),
                                     lambda: _precisions_table(rows, tuple(c for c in narrow if c != "GEMM input"))])
    console.print(table)
    console.print("GEMM input: what a linear layer saves for backward. Embeddings, norms, biases and the output head "
                  "follow each recipe's dtypes; docs/precision.md explains every row.")
    if len(table.columns) < len(PRECISION_COLUMNS):
        if explain:
            console.print()
            console.print("Sources", style="bold underline")
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold", no_wrap=True)
            grid.add_column()
            for cells in rows:
                grid.add_row(cells["Recipe"], cells["Source"])
            console.print(grid)
        else:
            console.print("Sources: add --explain, or widen the terminal to "
                          f"{_natural_width(_precisions_table(rows, PRECISION_COLUMNS))} columns.")


# What a narrower terminal leaves out of `memcalc formats`, first to last (--json has every field).
FORMAT_OPTIONAL_COLUMNS = ("binades", "bias", "finite values", "min subnormal", "inf/NaN")


def _formats_table(rows, columns: tuple[str, ...]):
    from rich.table import Table

    from memcalc.formats import COLUMNS

    table = Table(title="memcalc formats", title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column == COLUMNS[0] else "right", no_wrap=True)
    for cells in rows:
        by_column = dict(zip(COLUMNS, cells, strict=True))
        table.add_row(*(by_column[column] for column in columns))
    return table


def print_formats(rows) -> None:
    from memcalc.formats import COLUMNS, table_rows

    cells = [tuple(map(str, row)) for row in table_rows(rows)]
    # A narrow terminal stacks a value over its power of two instead of folding digits.
    stacked = [tuple(cell.replace(" (", "\n(").replace(", ", ",\n") for cell in row) for row in cells]
    kept = [tuple(column for column in COLUMNS if column not in FORMAT_OPTIONAL_COLUMNS[:dropped])
            for dropped in range(len(FORMAT_OPTIONAL_COLUMNS) + 1)]
    variants = [(cells, columns) for columns in kept[:3]] + [(stacked, columns) for columns in kept]
    console = _console()
    table = _first_fitting(console, [lambda shown=shown, columns=columns: _formats_table(shown, columns)
                                     for shown, columns in variants])
    console.print(table)
    console.print("Computed from each format's bit layout (memcalc/formats.py); sources in docs/precision.md.")
    left_out = [column for column in COLUMNS if column not in {c.header for c in table.columns}]
    if left_out:
        console.print(f"Left out at this width: {', '.join(left_out)} (`memcalc formats --json`, or a wider "
                      "terminal).")


def _models_table(models: list[ModelConfig], aliases: bool, pad_edge: bool = True):
    from rich.table import Table

    # without the outer cells' padding the longest library names still fit 80 columns
    table = Table(title="memcalc models", title_justify="left", pad_edge=pad_edge)
    table.add_column("Name", no_wrap=True)
    if aliases:
        table.add_column("Aliases", max_width=44)
    for column in ("Params", "Active", "Layers", "Hidden", "Heads", "Vocab"):
        table.add_column(column, justify="right", no_wrap=True)
    for model in models:
        params = count_params(model)
        active = format_count(params.active) if model.moe else "-"
        table.add_row(
            model.name, *([", ".join(model.aliases)] if aliases else []), format_count(params.total), active,
            str(model.num_layers), str(model.hidden_size), f"{model.num_attention_heads}/{model.kv_heads}",
            f"{model.vocab_size:,}",
        )
    return table


def print_models(models: list[ModelConfig]) -> None:
    console = _console()
    table = _first_fitting(console, [lambda: _models_table(models, True), lambda: _models_table(models, False),
                                     lambda: _models_table(models, False, pad_edge=False)])
    console.print(table)
    console.print("Heads: query/key-value heads. Active: parameters per token of a mixture of experts.")
    if len(table.columns) == 7:
        console.print("Aliases: `memcalc models --json`, or a wider terminal.")


def _layer_types_summary(types: list[str]) -> str:
    """``28 mamba, 4 full_attention (layers 4, 12, 20, 28)``: each kind's count, the layers of the
    rarer kinds."""
    counts = {kind: types.count(kind) for kind in dict.fromkeys(types)}
    common = max(counts, key=counts.get)
    parts = [f"{counts[common]} {common}"]
    for kind, count in counts.items():
        if kind != common:
            layers = [str(index) for index, item in enumerate(types) if item == kind]
            shown = ", ".join(layers) if len(layers) <= 8 else f"{', '.join(layers[:8])}, ..."
            parts.append(f"{count} {kind} (layers {shown})")
    return ", ".join(parts)


def print_show(document: dict[str, Any]) -> None:
    from rich.table import Table

    config = Table(title=f"memcalc show: {document['model']['name']}", title_justify="left")
    config.add_column("Field", no_wrap=True)
    config.add_column("Value", overflow="fold")  # a URL folds rather than losing its end
    for key, value in document["config"].items():
        if key in ("name", "notes") or value in (None, [], ()):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if v not in (None, [], (), ""))
        elif key == "layer_types":
            value = _layer_types_summary(value)
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        config.add_row(key, str(value))

    parameters = Table(title="Parameters", title_justify="left")
    parameters.add_column("Part")
    parameters.add_column("Parameters", justify="right")
    parameters.add_column("Share", justify="right")
    counts = document["parameters"]
    for key, count in counts.items():
        if key in ("total", "active"):
            continue
        parameters.add_row(key.replace("_", " "), f"{count:,}", _share(count, counts["total"]))
    parameters.add_section()
    parameters.add_row("total", f"{counts['total']:,}", "100.0%", style="bold")
    if counts["active"] != counts["total"]:
        parameters.add_row("active per token", f"{counts['active']:,}", _share(counts["active"], counts["total"]))

    console = _console()
    console.print(config)
    console.print(parameters)
    if "checkpoint" in document:
        table, summary = _checkpoint_table(document["checkpoint"])
        console.print(table)
        console.print(summary)
    for note in document["model"]["notes"]:
        console.print(f"note: {note}")


_PART_LABELS = {"language_model": "language model", "vision": "vision tower", "projector": "projector",
                "mtp": "MTP layers"}


def _checkpoint_table(check: dict[str, Any]):
    """What the files store, from their headers: by dtype (GGUF: ggml type), then by part."""
    from rich.table import Table

    files = check.get("files", [])
    where = f"{len(files)} files" if len(files) > 1 else check["location"]
    kind = "GGUF tensor infos" if check["format"] == "gguf" else "safetensors headers"
    table = Table(title=f"Checkpoint ({kind}: {where})", title_justify="left")
    table.add_column("Stored as")
    table.add_column("Parameters", justify="right")
    table.add_column("Bytes", justify="right")
    table.add_column("GiB", justify="right")
    rows = check.get("by_type") or check.get("by_dtype") or {}
    for name, row in sorted(rows.items(), key=lambda item: -item[1]["bytes"]):
        table.add_row(name, f"{row['params']:,}", f"{row['bytes']:,}", format_bytes(row["bytes"], Unit.GIB))
    table.add_section()
    parts = check.get("parts", {})
    if len(parts) > 1:
        for part, row in parts.items():
            table.add_row(_PART_LABELS.get(part, part), f"{row['logical_params']:,}", f"{row['bytes']:,}",
                          format_bytes(row["bytes"], Unit.GIB))
        table.add_section()
    table.add_row("total", f"{check['stored_params']:,}", f"{check['stored_bytes']:,}",
                  format_bytes(check["stored_bytes"], Unit.GIB), style="bold")
    if check["format"] == "gguf":
        summary = f"GGUF architecture {check['architecture']}" + (
            f", file type {check['file_type']}" if check["file_type"] else "")
    else:
        schemes = ", ".join(check["quantization"]) or "none"
        verdict = "match" if check["matches"] else "differ from"
        summary = (f"quantization: {schemes}; the language model's {check['language_model_params']:,} parameters "
                   f"{verdict} the config's {check['config_params']:,}")
    return table, summary



@contextmanager
def progress_reporter(title: str) -> Iterator:
    """A transient progress line on stderr when it is a terminal; yields ``report(description)``."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda description: None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(title)

        def report(description: str) -> None:
            progress.update(task, description=f"{title}: {description}")

        yield report


def print_comparison(estimate: Estimate, comparison, unit: Unit, tolerance: float | None) -> None:
    from rich.table import Table

    label = UNIT_LABEL[unit]
    table = Table(title=f"memcalc validate: {estimate.model.name} on {comparison.device} ({label})",
                  title_justify="left")
    # the labels wrap, the figures never: an 80-column terminal keeps every number whole
    table.add_column("Component", justify="left", ratio=1)
    for column in ("Estimated", "Measured", "Difference", "Error"):
        table.add_column(column, justify="right", no_wrap=True)

    def cells(row) -> list[str]:
        def amount(value):
            return "-" if value is None else format_bytes(value, unit)

        error = row.error_percent
        return [row.label, amount(row.estimated), amount(row.measured), amount(row.difference),
                "-" if error is None else f"{error:+.2f}%"]

    for row in comparison.rows:
        if row.key == "phase:forward":
            table.add_section()
        table.add_row(*cells(row))
    table.add_section()
    table.add_row(*cells(comparison.total), style="bold")
    console = _console()
    console.print(table)
    settings = estimate.settings
    if isinstance(settings, TrainAssumptions):
        console.print(
            f"{settings.precision}, {settings.optimizer} ({settings.optimizer_impl}), batch "
            f"{settings.batch_size} x seq {settings.seq_len}, {settings.attention} attention, recompute "
            f"{settings.recompute}, activation model {settings.activation_model}; measured on the second iteration."
        )
    else:
        console.print(
            f"{settings.dtype} weights and cache, batch {settings.batch_size}, {settings.decoding} decoding "
            f"({settings.sequences} sequences), prompt {settings.prompt_len} + {settings.max_new_tokens} new "
            "tokens (generate() as in transformers). The runtime overhead is outside the allocator and not compared."
        )
    for note in comparison.notes:
        console.print(f"note: {note}")
    if tolerance is not None:
        verdict = "within" if comparison.within(tolerance) else "OUTSIDE"
        console.print(f"Total error {comparison.total.error_percent:+.2f}%: {verdict} the {tolerance}% tolerance.")


GPU_COLUMNS = ("Name", "GiB", "Usable", "TFLOP/s", "FP8", "MXFP8", "GB/s", "Architecture", "Aliases")


def _gpus_table(catalogue, columns: tuple[str, ...]):
    from rich.table import Table

    table = Table(title="memcalc gpus", title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column in ("GiB", "Usable", "TFLOP/s", "GB/s") else "left",
                         no_wrap=column != "Aliases", max_width=30 if column == "Aliases" else None)
    for spec in catalogue:
        cells = {
            "Name": spec.name, "GiB": f"{spec.memory_gib:g}", "Usable": f"{spec.usable_memory_bytes / 2**30:.2f}",
            "TFLOP/s": f"{spec.bf16_dense_tflops:g}",
            "FP8": "yes" if spec.fp8 else "no", "MXFP8": "yes" if spec.mxfp8 else "no",
            "GB/s": f"{spec.intra_node_gbps:g}", "Architecture": spec.architecture,
            "Aliases": ", ".join(spec.aliases),
        }
        table.add_row(*(cells[column] for column in columns))
    return table


def print_gpus(catalogue) -> None:
    console = _console()
    table = _first_fitting(console, [lambda: _gpus_table(catalogue, GPU_COLUMNS),
                                     lambda: _gpus_table(catalogue, GPU_COLUMNS[:-1]),
                                     lambda: _gpus_table(catalogue, GPU_COLUMNS[:-2])])
    console.print(table)
    console.print("GiB: memory as sold (a datasheet's GB of HBM/GDDR are GiB, 2^30 bytes; --json gives bytes). "
                  "Usable: the GiB CUDA reports, what fit checks use (docs/gpus.md). TFLOP/s: dense bf16. GB/s: the "
                  "GPU-to-GPU link inside a node.")
    left_out = [column for column in GPU_COLUMNS if column not in {c.header for c in table.columns}]
    if left_out:
        console.print(f"{' and '.join(left_out)}: `memcalc gpus --json`, or a wider terminal.")
