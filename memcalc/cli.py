"""The ``memcalc`` command line: parse, resolve the model, call the core, render.

Exit codes: 0 ok, 1 internal error, 2 bad input, 3 validation out of tolerance.
Known errors print one line on stderr; ``MEMCALC_DEBUG=1`` shows the traceback instead.
Options are declared once, in groups (memcalc.flags); a command takes the groups it needs.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated

import typer

from memcalc.config import Attention, Loss
from memcalc.errors import InputError, MemcalcError, SettingsError, ToleranceExceeded
from memcalc.flags import (
    CALIBRATION_HELP,
    DECODING,
    OUTPUT,
    SERVING,
    ExplainOption,
    Generation,
    GPUOption,
    JsonOption,
    Layout,
    LossOption,
    ModelArgument,
    AttentionOption,
    Output,
    PlotOption,
    Precision,
    PromptOption,
    SeqOption,
    Serving,
    Source,
    Workload,
    _complete_gpu,
    expand,
    flag_of,
    infer_settings,
    parse_size,
    scenario_key_of,
    train_settings,
)

COMMANDS: dict = {}  # name: the command function as written, in registration order


def command(func):
    """Register ``func`` as a command. Its option groups are spread into flags, and its docstring's
    paragraphs reflowed (indented example lines stay as written), only when a click command is
    built: expanding all eleven at import would cost every run a twentieth of its start-up."""
    COMMANDS[func.__name__] = func
    return func


def _register(application: typer.Typer, func) -> None:
    application.command(name=func.__name__, help=_help_text(func.__doc__ or ""))(expand(func))


def _full_app() -> typer.Typer:
    application = typer.Typer(
        name="memcalc",
        help=_group.__doc__,
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
    )
    for func in COMMANDS.values():
        _register(application, func)
    return application


def __getattr__(name: str):
    """``memcalc.cli.app``, the whole Typer app, built on first use (tests, help, completion)."""
    if name == "app":
        application = globals()["app"] = _full_app()
        return application
    raise AttributeError(name)


def _help_text(doc: str) -> str:
    import inspect

    paragraphs = []
    for block in inspect.cleandoc(doc).split("\n\n"):
        lines = block.splitlines()
        paragraphs.append(block if lines and lines[0].startswith(" ") else " ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)


def _group() -> None:
    """GPU memory calculator for training and serving large language models."""


def _click_command(args: list[str]):
    """The click group that runs ``args``. Only the command named is built: typer turns every
    command's options into click parameters up front, a sixth of start-up for all eleven. The
    whole app (``app``) serves the top-level help and shell completion."""
    name = args[0] if args else None
    if name not in COMMANDS or any(key.startswith("_MEMCALC_COMPLETE") for key in os.environ):
        return typer.main.get_command(__getattr__("app"))
    single = typer.Typer(name="memcalc", add_completion=False, pretty_exceptions_enable=False)
    single.callback()(_group)  # a group of one, so the command keeps its name: `memcalc NAME ...`
    _register(single, COMMANDS[name])
    return typer.main.get_command(single)


def _print_json(document) -> None:
    import json  # only --json needs it

    print(json.dumps(document, indent=2))


def _message(exc: MemcalcError, name=flag_of) -> str:
    """The one line for ``exc``; a SettingsError names its fields as ``name`` writes them."""
    return exc.describe(name) if isinstance(exc, SettingsError) else str(exc)


def _emit(command: str, estimate, output: Output, gpu=None, advice=None, explain: bool = False) -> None:
    if output.as_json:
        from memcalc.report import estimate_document

        document = estimate_document(command, estimate, gpu)
        if advice is not None:
            from dataclasses import asdict

            document["advice"] = [asdict(item) for item in advice]
        _print_json(document)
        return
    from memcalc.render import print_advice, print_estimate

    print_estimate(command, estimate, output.units, gpu, explain)
    if advice is not None:
        print_advice(advice, output.units)


def _for_gpu(settings, gpu_spec):
    """Settings as they run on ``gpu_spec``: its FP8 layout (memcalc.gpus)."""
    if gpu_spec is None or settings.fp8_transpose == gpu_spec.keeps_fp8_transpose:
        return settings
    from dataclasses import replace

    return replace(settings, fp8_transpose=gpu_spec.keeps_fp8_transpose)


def _warn_precision_support(recipe_name: str, gpu_spec) -> None:
    """A recipe needing FP8 (Hopper, Ada, Blackwell) or MXFP8 (Blackwell) on a GPU without it: a
    warning on stderr, since the memory estimate itself still stands."""
    from memcalc.precision import RECIPES

    needs = RECIPES[recipe_name].requires
    if gpu_spec is None or needs is None or getattr(gpu_spec, needs):
        return
    print(f"warning: {recipe_name} needs {needs.upper()} tensor cores, which {gpu_spec.name} "
          f"({gpu_spec.architecture}) does not have", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _resolve_gpu(name: str | None):
    if name is None:
        return None
    from memcalc.gpus import resolve_gpu

    return resolve_gpu(name)


@command
def train(
    model: ModelArgument,
    precision: Precision,
    workload: Workload,
    layout: Layout,
    source: Source,
    output: Output,
    gpu: GPUOption = None,
    plot: PlotOption = None,
    explain: ExplainOption = False,
) -> None:
    """Memory of one training step per GPU: weights, gradients, optimizer states, activations.

    Under a parallel layout the numbers are the most loaded GPU's; with pipeline stages the
    first and the last stage are both shown.

    Examples:

      memcalc train llama-13b --dtype bf16

      memcalc train mistral-7b --optimizer adam8bit -b 4 --recompute full

      memcalc train llama-2-70b --gpus 64 --tp 8 --pp 2 --sp --gpu h100

      memcalc train llama-3-8b --gpus 8 --fsdp full --offload optimizer --json
    """
    from memcalc.estimate.training import estimate_training
    from memcalc.scenario import parallel_config

    gpu_spec = _resolve_gpu(gpu)
    settings = _for_gpu(train_settings(precision, workload), gpu_spec)
    parallel = parallel_config(layout.scenario())
    config = source.resolve(model)
    estimate = estimate_training(config, settings, parallel)
    _warn_precision_support(estimate.settings.precision, gpu_spec)
    advice = None
    if gpu_spec is not None:
        from memcalc.estimate.device import allocated_limit, device_memory, fits

        memory = device_memory(estimate)
        if not fits(memory, gpu_spec):
            from memcalc.advice import advise

            # each change's allocated peak against what the usable capacity leaves for it
            advice = advise(config, settings, parallel, allocated_limit(memory, gpu_spec.usable_memory_bytes))
    if plot is not None:
        from memcalc.plot import component_bars

        component_bars(plot, [config.name], [estimate], gpu_spec.usable_memory_bytes if gpu_spec else None,
                       f"memcalc train: {config.name}")
    _emit("train", estimate, output, gpu_spec, advice, explain)


@command
def compare(
    model: ModelArgument,
    precision: Precision,
    workload: Workload,
    layout: Layout,
    source: Source,
    output: Output,
    scenario: Annotated[list[str] | None, typer.Option("--scenario", show_default=False, rich_help_panel="Scenarios",
                                                       help='One scenario, e.g. "gpus=8,tp=2,zero=1"; repeat for more. '
                                                       "Keys: the train flags without dashes (gpus, dp, tp, pp, cp, ep, "
                                                       "sp, zero, fsdp, distributed_optimizer, microbatches, vpp, "
                                                       "offload, batch, seq, precision, recompute, ...), and name.")] = None,
    file: Annotated[str | None, typer.Option("--file", show_default=False, rich_help_panel="Scenarios",
                                             help="A YAML list of scenarios (mappings with the same keys).")] = None,
    gpu: GPUOption = None,
    plot: PlotOption = None,
) -> None:
    """Training scenarios side by side, one column each, per GPU of the most loaded rank.

    The flags set what every scenario shares; each scenario overrides them.

    Examples:

      memcalc compare llama-2-70b --gpus 64 --scenario tp=8 --scenario zero=3

      memcalc compare llama-3-8b --gpus 8 --scenario zero=1 --scenario zero=3

      memcalc compare mixtral-8x7b --file scenarios.yaml --json
    """
    from memcalc.estimate.training import estimate_training
    from memcalc.scenario import parallel_config, parse_scenario, read_scenarios
    from memcalc.scenario import train_settings as scenario_settings

    scenarios = [parse_scenario(text) for text in scenario or []]
    if file is not None:
        scenarios += read_scenarios(file)
    if not scenarios:
        raise InputError("compare needs at least one --scenario or a --file of scenarios")
    gpu_spec = _resolve_gpu(gpu)
    base = _for_gpu(train_settings(precision, workload), gpu_spec)
    shared = layout.scenario()
    config = source.resolve(model)
    results = []
    for item in scenarios:
        combined = item.over(shared)
        try:
            results.append((item.label(), estimate_training(config, scenario_settings(combined, base),
                                                            parallel_config(combined))))
        except InputError as exc:
            raise InputError(f"scenario {item.label()!r}: {_message(exc, scenario_key_of)}") from None
    if plot is not None:
        from memcalc.plot import component_bars

        component_bars(plot, [label for label, _ in results], [estimate for _, estimate in results],
                       gpu_spec.usable_memory_bytes if gpu_spec else None, f"memcalc compare: {config.name}")
    if output.as_json:
        from memcalc.report import compare_document

        _print_json(compare_document(results, gpu_spec))
        return
    from memcalc.render import print_scenarios

    print_scenarios(config, results, output.units, gpu_spec)


@command
def plan(
    model: ModelArgument,
    gpu: Annotated[str, typer.Option("--gpu", show_default=False, autocompletion=_complete_gpu,
                                     rich_help_panel="Search", help="A GPU from `memcalc gpus`.")],
    gpus: Annotated[int, typer.Option("--gpus", min=1, show_default=False, rich_help_panel="Search",
                                      help="GPUs in the job.")],
    global_batch: Annotated[int, typer.Option("--global-batch", min=1, show_default=False, rich_help_panel="Search",
                                              help="Sequences per optimizer step.")],
    precision: Precision,
    source: Source,
    output: Output,
    seq: SeqOption = None,
    attention: AttentionOption = Attention.SDPA,
    loss: LossOption = Loss.FULL,
    headroom: Annotated[float, typer.Option("--headroom", min=0.0, max=0.99, rich_help_panel="Search",
                                            help="Share of GPU memory left free.")] = 0.10,
    top_k: Annotated[int, typer.Option("--top-k", min=1, rich_help_panel="Search", help="Layouts listed.")] = 10,
    mfu: Annotated[float | None, typer.Option("--mfu", min=0.01, max=1.0, show_default=False, rich_help_panel="Search",
                                              help="Assumed efficiency of the executed FLOPs (docs/plan.md; "
                                              "default 0.6).")] = None,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", min=1, rich_help_panel="Search",
                                               help="GPUs per node.")] = 8,
    fsdp: Annotated[bool, typer.Option("--fsdp", rich_help_panel="Search",
                                       help="Model ZeRO-2/3 as PyTorch FSDP2 rather than DeepSpeed.")] = False,
    no_offload: Annotated[bool, typer.Option("--no-offload", rich_help_panel="Search",
                                             help="Leave CPU offload out of the search.")] = False,
    plot: PlotOption = None,
) -> None:
    """Search every parallel layout of --gpus GPUs and rank those that fit by estimated step time.

    The search covers the degrees, ZeRO stage or distributed optimizer, offload, recompute, the
    micro-batch and virtual stages; the flags fix the rest.

    Examples:

      memcalc plan llama-3-70b --gpu h100 --gpus 256 --global-batch 1024

      memcalc plan gpt3-175b --gpu a100 --gpus 64 --global-batch 64 --json

      memcalc plan mixtral-8x7b --gpu h200 --gpus 64 --global-batch 512
    """
    from memcalc.config import resolve_seq_len
    from memcalc.plan import DEFAULT_MFU
    from memcalc.plan import plan as search

    config = source.resolve(model)
    spec = _resolve_gpu(gpu)
    base = _for_gpu(train_settings(precision, attention=attention, loss=loss), spec)
    started = time.perf_counter()
    result = search(config, spec, gpus, seq_len=resolve_seq_len(config, seq), global_batch=global_batch,
                    headroom=headroom, top_k=top_k, settings=base, gpus_per_node=gpus_per_node,
                    mfu=DEFAULT_MFU if mfu is None else mfu, fsdp=fsdp, offload=not no_offload)
    elapsed_s = time.perf_counter() - started
    if plot is not None:
        from memcalc.plot import component_bars

        component_bars(plot, [f"#{index}" for index in range(1, len(result.top) + 1)],
                       [item.estimate for item in result.top], spec.memory_bytes, f"memcalc plan: {config.name}")
    if output.as_json:
        from memcalc.report import plan_document

        _print_json(plan_document(result, elapsed_s))
        return
    from memcalc.render import print_plan

    print_plan(result, output.units, elapsed_s)


@command
def sweep(
    model: ModelArgument,
    over: Annotated[str, typer.Option("--over", show_default=False, rich_help_panel="Sweep",
                                      help="What to sweep: seq=1k..128k (powers of two), batch=1..64, gpus=8..1024, "
                                      "grad_accum=1..16, lora_rank=8..256, or a list such as seq=2048,8192.")],
    precision: Precision,
    workload: Workload,
    layout: Layout,
    source: Source,
    output: Output,
    scenario: Annotated[str | None, typer.Option("--scenario", show_default=False, rich_help_panel="Sweep",
                                                 help='The layout and settings every point shares, e.g. '
                                                 '"tp=8,pp=2,zero=1" (keys as in compare; over the flags).')] = None,
    gpu: GPUOption = None,
    plot: PlotOption = None,
) -> None:
    """Training memory per component across a range, and where it stops fitting on --gpu.

    Examples:

      memcalc sweep llama-3-8b --over seq=1k..128k --gpu h100 --recompute full

      memcalc sweep llama-2-70b --over gpus=8..512 --fsdp full --gpu h100

      memcalc sweep llama-3-8b --over lora_rank=8..256 --qlora --lora-rank 8
    """
    from memcalc.scenario import parse_scenario
    from memcalc.sweep import first_over, parse_over, run_sweep

    key, values = parse_over(over)
    shared = layout.scenario()
    if scenario:
        shared = parse_scenario(scenario).over(shared)
    gpu_spec = _resolve_gpu(gpu)
    base = _for_gpu(train_settings(precision, workload), gpu_spec)
    config = source.resolve(model)
    points = run_sweep(config, base, shared, key, values)
    over_point = first_over(points, gpu_spec.usable_memory_bytes) if gpu_spec else None
    if plot is not None:
        from memcalc.plot import sweep_lines

        sweep_lines(plot, key, [point.value for point in points], [point.estimate for point in points],
                    gpu_spec.usable_memory_bytes if gpu_spec else None, f"memcalc sweep: {config.name}")
    if output.as_json:
        from memcalc.report import sweep_document

        _print_json(sweep_document(config, key, points, gpu_spec, over_point))
        return
    from memcalc.render import print_sweep

    print_sweep(config, key, points, output.units, gpu_spec, over_point)


@command
def infer(
    model: ModelArgument,
    serving: Serving,
    generation: Generation,
    source: Source,
    output: Output,
    gpu: GPUOption = None,
    gpu_util: Annotated[float, typer.Option("--gpu-util", min=0.01, max=1.0, rich_help_panel=OUTPUT,
                                            help="With --gpu: the share of its memory the server may use.")] = 0.9,
    kv_budget: Annotated[str | None, typer.Option("--kv-budget", show_default=False, rich_help_panel=OUTPUT,
                                                  help="Print the tokens and blocks this many bytes of KV cache hold, "
                                                  "e.g. 4.6GiB.")] = None,
    max_num_batched_tokens: Annotated[int | None, typer.Option(
        "--max-num-batched-tokens", metavar="N", min=1, show_default=False, rich_help_panel=SERVING,
        help="Tokens of one forward: vLLM's profile (default: vllm serve's, 8192 on GPUs of 70 GiB or more "
        "other than the A100, else 2048), SGLang's chunked prefill (default: its rule), TensorRT-LLM's "
        "profile (8192).")] = None,
    calibration: Annotated[str | None, typer.Option(
        "--calibration", metavar="FILE", show_default=False, rich_help_panel=SERVING,
        help=CALIBRATION_HELP)] = None,
    memory_fraction: Annotated[float | None, typer.Option(
        "--memory-fraction", metavar="F", show_default=False, rich_help_panel=SERVING,
        help="--engine sglang: the static share of the card (default: its rule from the GPU and TP); "
        "trtllm: the cache's share of the free memory (default 0.9).")] = None,
    cache_type_k: Annotated[str, typer.Option(
        "--cache-type-k", metavar="TYPE", rich_help_panel=SERVING,
        help="--engine llamacpp: K cache type (f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1).")] = "f16",
    cache_type_v: Annotated[str, typer.Option(
        "--cache-type-v", metavar="TYPE", rich_help_panel=SERVING,
        help="--engine llamacpp: V cache type (quantized types need flash attention).")] = "f16",
    tensor_split: Annotated[str | None, typer.Option(
        "--tensor-split", metavar="P,P", show_default=False, rich_help_panel=SERVING,
        help="--engine llamacpp: the layer split over GPUs like --gpu, e.g. 3,1 (default: one GPU).")] = None,
    n_gpu_layers: Annotated[int | None, typer.Option(
        "--n-gpu-layers", metavar="N", min=0, show_default=False, rich_help_panel=SERVING,
        help="--engine llamacpp: layers offloaded, the output layer counted (default: all).")] = None,
    ubatch_size: Annotated[int, typer.Option(
        "--ubatch-size", metavar="N", min=1, rich_help_panel=SERVING,
        help="--engine llamacpp: tokens of one physical batch (n_ubatch).")] = 512,
    no_flash_attn: Annotated[bool, typer.Option(
        "--no-flash-attn", rich_help_panel=SERVING,
        help="--engine llamacpp: without flash attention (llama.cpp's auto turns it on under CUDA).")] = False,
    compute_buffer: Annotated[str | None, typer.Option(
        "--compute-buffer", metavar="SIZE", show_default=False, rich_help_panel=SERVING,
        help="--engine llamacpp: each GPU's compute buffer as a log printed it (\"CUDA0 compute buffer "
        "size\"), e.g. 164MiB (default: a floor).")] = None,
    vllm_version: Annotated[str | None, typer.Option(
        "--vllm-version", metavar="X.Y", show_default=False, rich_help_panel=SERVING,
        help="--engine vllm: the release whose CUDA graph rules apply (0.10 or later; default 0.30).")] = None,
    enforce_eager: Annotated[bool, typer.Option(
        "--enforce-eager", rich_help_panel=SERVING,
        help="--engine vllm: no CUDA graphs, as vLLM's flag.")] = False,
    cudagraph_mode: Annotated[str | None, typer.Option(
        "--cudagraph-mode", metavar="MODE", show_default=False, rich_help_panel=SERVING,
        help="--engine vllm: none, piecewise, full, full_decode_only, full_and_piecewise (default: the "
        "version's).")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(
        "--max-num-seqs", metavar="N", min=1, show_default=False, rich_help_panel=SERVING,
        help="--engine vllm: requests per step, which sets the graphs captured (default: vllm serve's, 1024 "
        "on GPUs of 70 GiB or more other than the A100, else 256).")] = None,
    profile_cudagraphs: Annotated[str | None, typer.Option(
        "--profile-cudagraphs", metavar="1|0", show_default=False, rich_help_panel=SERVING,
        help="--engine vllm: vLLM's graph profiling env var; 1: the graphs are estimated first and taken from "
        "the KV cache (default from 0.20), 0: captured after it.")] = None,
    explain: ExplainOption = False,
) -> None:
    """Memory to serve a model: weights, KV cache, prefill and decoding, overhead, and what fits.

    Without --weights, a .gguf file or a checkpoint with safetensors counts its weights as stored.

    Examples:

      memcalc infer llama-2-70b --dtype fp16 --batch 8 --context 4096

      memcalc infer llama-3-8b --prompt 1024 --max-new-tokens 256

      memcalc infer llama-3-8b --weights q4_k --context 32768 --gpu rtx-4090

      memcalc infer mixtral-8x7b --weights gptq --engine paged --tp 2

      memcalc infer llama-3-8b --engine paged --kv-budget 4.6GiB

      memcalc infer llama-3.1-8b --engine sglang --gpu h100

      memcalc infer ./model.gguf --context 8192
    """
    from memcalc.engines import EngineOptions, engine_budget
    from memcalc.estimate.inference import estimate_inference

    settings = infer_settings(serving, generation)
    budget = parse_size("--kv-budget", kv_budget)
    if budget is not None and budget <= 0:
        raise InputError(f"--kv-budget: {kv_budget!r} holds no tokens; give a positive size such as 4.6GiB")
    config = source.resolve(model)
    estimate = estimate_inference(config, settings)
    stored = None
    if serving.weights is None:  # the checkpoint's own bytes, unless --weights asks for another format
        from memcalc.library import stored_weights

        stored = stored_weights(model, revision=source.revision, warn=_warn)
    if stored is not None:
        from memcalc.estimate.measured import with_stored_weights

        estimate = with_stored_weights(estimate, stored)
    gpu_spec = _resolve_gpu(gpu)
    fit = None
    if gpu_spec is not None and stored is not None:
        from memcalc.estimate.measured import measured_fit_report

        fit = measured_fit_report(config, settings, stored, gpu_spec.name, gpu_spec.usable_memory_bytes,
                                  gpu_util)
    elif gpu_spec is not None:
        from memcalc.estimate.inference import fit_report

        fit = fit_report(config, settings, gpu_spec.name, gpu_spec.usable_memory_bytes, gpu_util)
    startup = engine_budget(serving.engine, config, settings, estimate, stored, gpu_spec, gpu_util,
                            EngineOptions(max_num_batched_tokens, calibration, memory_fraction, cache_type_k,
                                          cache_type_v, tensor_split, n_gpu_layers, ubatch_size,
                                          not no_flash_attn, compute_buffer, vllm_version, enforce_eager,
                                          cudagraph_mode, max_num_seqs, profile_cudagraphs))
    capacity = None
    if budget is not None:
        from memcalc.estimate.inference import kv_capacity

        capacity = kv_capacity(budget, estimate.settings.kv_cache_bytes_per_token, settings.block_size)
    if output.as_json:
        from memcalc.report import inference_document

        _print_json(inference_document(estimate, fit, capacity, startup))
        return
    from memcalc.render import print_inference

    print_inference(estimate, output.units, fit, capacity, explain, startup)


@command
def validate(
    model: ModelArgument,
    precision: Precision,
    workload: Workload,
    generation: Generation,
    source: Source,
    output: Output,
    kind: Annotated[str, typer.Option("--workload", rich_help_panel="Measurement",
                                      help="train: one training step; infer: a generate() run (--prompt, "
                                      "--max-new-tokens, --num-beams).")] = "train",
    device: Annotated[str, typer.Option("--device", rich_help_panel="Measurement",
                                        help="cuda (real allocations), fake (CPU fake tensors, no memory), cpu, "
                                        "or auto: cuda when available, else fake.")] = "auto",
    num_layers: Annotated[int | None, typer.Option("--num-layers", min=1, show_default=False,
                                                   rich_help_panel="Measurement",
                                                   help="Run the same blocks with fewer layers (cheaper).")] = None,
    impl: Annotated[str, typer.Option("--impl", rich_help_panel="Measurement",
                                      help="reference: memcalc's PyTorch decoder; hf: the transformers model class "
                                      "built from the config (transformers installed).")] = "reference",
    prompt: PromptOption = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, rich_help_panel=DECODING,
                                                help="Tokens generated (--workload infer).")] = 16,
    tolerance: Annotated[float | None, typer.Option("--tolerance", min=0, show_default=False,
                                                    rich_help_panel="Measurement",
                                                    help="Exit with code 3 when the total misses by more than this "
                                                    "percentage.")] = None,
    force: Annotated[bool, typer.Option("--force", rich_help_panel="Measurement",
                                        help="Run on CUDA even if the estimate says it will not fit.")] = False,
) -> None:
    """Run the workload with PyTorch and compare its memory with the estimate, part by part.

    --workload infer measures a generate() run of --prompt + --max-new-tokens in --dtype (weights
    and cache); the training flags then do not apply.

    Examples:

      memcalc validate llama-3.2-1b --device fake --seq 1024 --batch 2

      memcalc validate llama-3-8b --num-layers 4 --precision pure-bf16

      memcalc validate gpt2 --workload infer --prompt 512 --num-beams 4
    """
    from memcalc.validate.cli_support import (
        resolve_device,
        run_inference_validation,
        run_training_validation,
        with_layers,
    )

    if kind not in ("train", "infer"):
        raise InputError(f"--workload: {kind!r} is not one of train, infer")
    if impl not in ("reference", "hf"):
        raise InputError(f"--impl: {impl!r} is not one of reference, hf")
    if device not in ("auto", "cuda", "fake", "cpu"):
        raise InputError(f"--device: {device!r} is not one of auto, cuda, fake, cpu")
    config = with_layers(source.resolve(model), num_layers)
    if kind == "train":
        from memcalc.estimate.training import estimate_training

        settings = train_settings(precision, workload)
        estimate = estimate_training(config, settings)

        def run(*args, **kwargs):
            return run_training_validation(*args, **kwargs, impl=impl)
    else:
        from memcalc.estimate.inference import estimate_inference

        if prompt is None:
            raise InputError("--workload infer needs --prompt (and --max-new-tokens) to describe the generate() run")
        settings = infer_settings(None, generation, dtype=precision.dtype.value, batch_size=workload.batch,
                                  prompt_len=prompt, max_new_tokens=max_new_tokens)
        estimate = estimate_inference(config, settings)

        def run(*args, **kwargs):
            return run_inference_validation(*args, **kwargs, impl=impl)
    resolved_device = resolve_device(device)
    if output.as_json:
        comparison = run(config, settings, estimate, resolved_device, force)
        from memcalc.report import estimate_document

        document = {"estimate": estimate_document(kind, estimate), "validation": comparison.document()}
        if tolerance is not None:
            document["validation"]["tolerance_percent"] = tolerance
            document["validation"]["within_tolerance"] = comparison.within(tolerance)
        _print_json(document)
    else:
        from memcalc.render import print_comparison, progress_reporter

        with progress_reporter(f"measuring {config.name} on {resolved_device}") as progress:
            comparison = run(config, settings, estimate, resolved_device, force, progress)
        print_comparison(estimate, comparison, output.units, tolerance)
    if tolerance is not None and not comparison.within(tolerance):
        raise ToleranceExceeded(
            f"total off by {comparison.total.error_percent:+.2f}% (tolerance {tolerance}%)"
        )


@command
def models(as_json: JsonOption = False) -> None:
    """List the bundled model library.

    Examples:

      memcalc models

      memcalc models --json
    """
    from memcalc.library import bundled_models

    library = list(bundled_models().values())
    if as_json:
        from memcalc.report import model_summary

        _print_json([model_summary(model) for model in library])
        return
    from memcalc.render import print_models

    print_models(library)


@command
def gpus(as_json: JsonOption = False) -> None:
    """List the GPU catalogue: memory as sold, dense bf16 throughput, FP8 support, interconnect.

    Examples:

      memcalc gpus

      memcalc gpus --json
    """
    from dataclasses import asdict

    from memcalc.gpus import gpu_catalogue

    catalogue = list(gpu_catalogue().values())
    if as_json:
        _print_json([asdict(spec) | {"memory_bytes": spec.memory_bytes, "usable_memory_bytes": spec.usable_memory_bytes}
                     for spec in catalogue])
        return
    from memcalc.render import print_gpus

    print_gpus(catalogue)


@command
def precisions(
    as_json: JsonOption = False,
    explain: Annotated[bool, typer.Option("--explain", rich_help_panel=OUTPUT,
                                          help="List each recipe's source when the terminal is too narrow for the "
                                          "Source column.")] = False,
) -> None:
    """List the precision recipes: bytes per linear-layer weight with Adam, and their sources.

    Examples:

      memcalc precisions

      memcalc precisions --json
    """
    from memcalc.precision import RECIPES

    if as_json:
        from memcalc.report import precisions_document

        _print_json(precisions_document(RECIPES.values()))
        return
    from memcalc.render import print_precisions

    print_precisions(RECIPES.values(), explain)


@command
def formats(
    names: Annotated[list[str] | None, typer.Argument(help="Formats to show (default: all), e.g. fp8-e4m3 bf16.",
                                                      show_default=False)] = None,
    as_json: JsonOption = False,
) -> None:
    """Number formats from their bit layouts: range, precision and special values.

    Examples:

      memcalc formats

      memcalc formats fp8-e4m3 fp8-e5m2 --json
    """
    from memcalc.formats import describe, format_table, json_document

    rows = [describe(name) for name in names] if names else format_table()
    if as_json:
        _print_json(json_document(rows))
        return
    from memcalc.render import print_formats

    print_formats(rows)


def _bundled(name: str | None):
    """The bundled model a log names (its name or an alias, any case), or None: a name read from a
    log never reaches the Hub."""
    if name is None:
        return None
    from memcalc.library import bundled_models

    wanted = name.lower()
    return next((model for model in bundled_models().values()
                 if wanted in {model.name.lower(), *(alias.lower() for alias in model.aliases)}), None)


@command
def calibrate(
    log: Annotated[str, typer.Argument(help="A vLLM start-up log (the lines it prints while profiling memory), or "
                                       "a torch.cuda.memory_stats() or memory_summary() dump.",
                                       show_default=False)],
    model: Annotated[str | None, typer.Option("--model", show_default=False, rich_help_panel="Model and precision",
                                              help="The model the log is of (default: the log's model='...').")
                     ] = None,
    out: Annotated[str | None, typer.Option("--out", metavar="FILE", show_default=False, rich_help_panel=OUTPUT,
                                            help="Write the measured terms for `infer --engine vllm --calibration "
                                            "FILE`.")] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", show_default=False, autocompletion=_complete_gpu,
                                            rich_help_panel="Model and precision",
                                            help="The GPU the log is of, for its total memory when the log does not "
                                            "print total_gpu_memory (V1 logs).")] = None,
    source: Source = None,
    output: Output = None,
) -> None:
    """Read a real start-up's memory figures and put memcalc's estimate beside each.

    Reads vLLM's start-up log (weights, activation peak, non-torch memory, KV cache, blocks,
    tokens); --out stores the measured activation peak and non-torch memory for later estimates
    on that machine. A torch.cuda.memory_stats() or memory_summary() dump gives the caching
    allocator's reserve over the allocated peak; --out stores it for `train --calibration`.

    Examples:

      memcalc calibrate vllm-startup.log --model llama-3.1-8b

      memcalc calibrate vllm-startup.log --out h100.calibration.json --json

      memcalc calibrate memory_stats.json --out h100.reserve.json
    """
    from memcalc.calibration import AllocatorStats, read_log_file, write_calibration

    startup = read_log_file(log)
    if isinstance(startup, AllocatorStats):
        if out is not None:
            write_calibration(startup, out)
        if output.as_json:
            from memcalc.report import allocator_calibration_document

            _print_json(allocator_calibration_document(startup, out))
            return
        from memcalc.render import print_allocator_calibration

        print_allocator_calibration(startup, output.units, out)
        return
    config = source.resolve(model) if model is not None else _bundled(startup.model)
    gpu_spec = _resolve_gpu(gpu)
    total = startup.total_memory or (gpu_spec.usable_memory_bytes if gpu_spec is not None else None)
    if config is not None and total is None:
        raise InputError(f"{log}: the log prints no total_gpu_memory: give --gpu, the card it ran on, for memcalc's "
                         "budget beside it")
    estimate = None
    if config is not None:
        from memcalc.config import InferSettings
        from memcalc.estimate.inference import DEFAULT_GPU_UTILIZATION
        from memcalc.serving import VLLMGraphOptions, default_batched_tokens, vllm_budget

        settings = InferSettings(context_len=min(8192, config.max_position_embeddings))
        utilization = startup.utilization or DEFAULT_GPU_UTILIZATION  # vLLM's default when the log omits it
        tokens = default_batched_tokens(total, gpu_spec.name if gpu_spec is not None else "")
        # the KV cache as vLLM sized it before 0.20, graphs after it: the log's version is not read, and a
        # 0.20+ log has its graph estimate taken from the KV cache already (docs/serving.md)
        graphs = VLLMGraphOptions(profiled=False, gpu_name=gpu_spec.name if gpu_spec is not None else "")
        estimate = tuple(vllm_budget(config, settings, total, utilization, tokens, measured, graphs)
                         for measured in (startup.calibration(), None))  # with the log's terms, with memcalc's
    if out is not None:
        write_calibration(startup, out)
    if output.as_json:
        from memcalc.report import calibration_document

        _print_json(calibration_document(startup, estimate, out))
        return
    from memcalc.render import print_calibration

    print_calibration(startup, estimate, output.units, out)


@command
def show(model: ModelArgument, source: Source, as_json: JsonOption = False) -> None:
    """Print a model's configuration and its parameter count, part by part.

    A model directory, a cached Hub id or a .gguf file adds its stored tensors, read from the headers.

    Examples:

      memcalc show llama-3-8b

      memcalc show ./config.json --json

      memcalc show ./local-checkpoint-dir
    """
    from memcalc.library import stored_weights
    from memcalc.report import checkpoint_document, show_document

    config = source.resolve(model)
    document = show_document(config)
    stored = stored_weights(model, revision=source.revision, warn=_warn)
    if stored is not None:
        document["checkpoint"] = checkpoint_document(config, stored)
        if stored.checkpoint is not None and not document["checkpoint"]["matches"]:
            check = document["checkpoint"]
            _warn(f"checkpoint headers hold {check['language_model_params']:,} parameters, the config gives "
                  f"{check['config_params']:,}: estimates count the config's ({check['location']})")
    if as_json:
        _print_json(document)
        return
    from memcalc.render import print_show

    print_show(document)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app and maps failures to one line and an exit code."""
    # typer 0.26+ raises the exceptions of its vendored click.
    from typer._click import exceptions as click_errors

    args = sys.argv[1:] if argv is None else argv
    try:
        result = _click_command(args).main(args=args, prog_name="memcalc", standalone_mode=False)
    except MemcalcError as exc:
        if os.environ.get("MEMCALC_DEBUG"):
            raise
        print(f"error: {_message(exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click_errors.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else exc.format_message())
        sys.exit(0)
    except click_errors.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, EOFError):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # an internal error: one line unless debugging
        if os.environ.get("MEMCALC_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set MEMCALC_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)
