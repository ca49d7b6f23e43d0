"""Mamba-2 layers as they train on a GPU, measured on fake tensors on the CPU.

On CUDA, transformers' Mamba-2 mixers (``Mamba2Mixer``, ``GraniteMoeHybridMambaLayer``,
``NemotronHMamba2Mixer``, ``FalconH1Mixer``) in training without a cache call mamba_ssm's
``mamba_split_conv1d_scan_combined`` (mamba_ssm/ops/triton/ssd_combined.py,
``MambaSplitConv1dScanCombinedFn``) through ``use_kernel_func_from_hub_with_fallback``. That
autograd Function allocates every tensor it returns, saves and uses as a workspace with torch in
Python, then launches Triton kernels (and causal_conv1d's CUDA kernel, ``causal_conv1d_fwd_function``
/ ``causal_conv1d_bwd_function`` in causal_conv1d/cpp_functions.py, which allocates in Python too
and calls a ``torch.library.custom_op`` that only writes into the tensors it is given).

``mamba_kernels()`` runs that code as it is, on fake tensors:

* real: mamba_ssm's and causal_conv1d's Python (every ``torch.empty``, view, cast, ``.sum``,
  ``save_for_backward``), transformers' model classes around them (norms, residuals, in_proj, the
  dispatch to the kernel), Triton's decorators (autotune and heuristics objects);
* stubbed: every Triton launch (``kernel[grid](...)`` does nothing; an autotuner reports its first
  config as the best, which only sizes a slice of a per-head reduction), the compiled
  ``causal_conv1d_cuda`` and ``selective_scan_cuda`` extensions (no-ops; nothing is allocated in
  them), ``torch.cuda.get_device_properties`` for mamba_ssm (an H100/H200's 132 SMs, which size
  two backward buffers), and CUDA's autocast state, read as the CPU's (the tensors are CPU fakes:
  a fake CUDA tensor aborts a CPU-only build; mamba_ssm's ``custom_fwd``/``custom_bwd`` and its
  ``torch.is_autocast_enabled()`` then see the autocast region the run opened).

Not seen: what a Triton kernel allocates on the device itself (the SSD kernels use none), and the
autotuner's first-call benchmarking (clones of its ``restore_value`` tensors), which the measured
second iteration does not run.

The sources are not a dependency of memcalc: ``mamba_ssm`` and ``causal_conv1d`` must be importable
(``pip download --no-binary :all: --no-deps --no-build-isolation mamba-ssm causal-conv1d`` with
``MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE``, unpacked on ``PYTHONPATH``),
and so must ``triton`` (``pip install triton``; it imports without a GPU).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

# SMs of the GPU mamba_ssm sizes its split reductions for (H100 SXM and H200: 132)
SM_COUNT = 132

# transformers modules whose Mamba-2 mixer calls the fused kernel, and the function's name there
MIXER_MODULES = (
    "transformers.models.mamba2.modeling_mamba2",
    "transformers.models.granitemoehybrid.modeling_granitemoehybrid",
    "transformers.models.nemotron_h.modeling_nemotron_h",
    "transformers.models.falcon_h1.modeling_falcon_h1",
)
KERNEL_NAME = "mamba2_split_conv1d_scan_combined"
# transformers modules whose Mamba-1 mixer (MambaMixer, FalconMambaMixer, JambaMambaMixer) calls the packages
MAMBA1_MODULES = ("transformers.models.mamba.modeling_mamba", "transformers.models.falcon_mamba.modeling_falcon_mamba",
                  "transformers.models.jamba.modeling_jamba")
# with a cache, Mamba-1: the prompt's scan through selective_scan_fn (its CUDA extension's allocations
# transcribed, ``selective_scan_fwd_allocations``), a step through selective_state_update
MAMBA1_INFERENCE_KERNELS = (("causal_conv1d_fn", "causal_conv1d_fn", "causal_conv1d"),
                            ("causal_conv1d_update", "causal_conv1d_update", "causal_conv1d"),
                            ("mamba_selective_scan", "selective_scan_fn", "mamba_ssm"),
                            ("mamba_selective_state_update", "selective_state_update", "mamba_ssm"))
# with a cache: transformers' fallback name in those modules, the package's function, the package
INFERENCE_KERNELS = (("causal_conv1d_fn", "causal_conv1d_fn", "causal_conv1d"),
                     ("causal_conv1d_update", "causal_conv1d_update", "causal_conv1d"),
                     ("mamba2_chunk_scan", "mamba_chunk_scan_combined", "mamba_ssm"),
                     ("mamba2_selective_state_update", "selective_state_update", "mamba_ssm"))
# mamba_ssm modules whose ``torch`` reads CUDA's device properties or autocast state
TRITON_MODULES = ("ssd_combined", "ssd_chunk_scan", "ssd_chunk_state", "ssd_state_passing", "ssd_bmm",
                  "layernorm_gated", "k_activations", "selective_state_update")


class MambaSourcesMissing(ImportError):
    """mamba_ssm, causal_conv1d or triton cannot be imported."""


def available() -> bool:
    """Whether the sources and triton can be imported (the measurement needs all three)."""
    try:
        _import_sources()
    except MambaSourcesMissing:
        return False
    return True


def _stub_extension(name: str, functions: tuple[str, ...]) -> None:
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    module = types.ModuleType(name)
    module.__doc__ = "memcalc.validate.mamba: a no-op stand-in for the compiled CUDA extension"

    def no_op(*args, **kwargs):
        return None

    for function in functions:
        setattr(module, function, no_op)
    sys.modules[name] = module


SELECTIVE_SCAN_CHUNK = 2048  # selective_scan.cpp: the forward keeps one state per 2048 tokens


def selective_scan_fwd_allocations(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """A stand-in for the compiled ``selective_scan_cuda.fwd`` (Mamba-1's scan) allocating what
    mamba_ssm 2.3's csrc/selective_scan/selective_scan.cpp ``selective_scan_fwd`` allocates, in order:
    ``out_z`` like z (with a gate), ``out`` like delta, and ``x``, the fp32 (A's dtype) running states,
    (batch, dim, ceil(seqlen / 2048), 2 x dstate); the CUDA kernel only writes into them."""
    import torch

    batch, dim, seqlen = u.shape
    out_z = torch.empty_like(z) if z is not None else None
    out = torch.empty_like(delta)
    states = torch.empty(batch, dim, -(-seqlen // SELECTIVE_SCAN_CHUNK), 2 * A.shape[1], dtype=A.dtype,
                         device=u.device)
    return [out, states] + ([out_z] if out_z is not None else [])


def _import_sources():
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        raise MambaSourcesMissing(f"triton is not importable ({exc})") from None
    _stub_extension("causal_conv1d_cuda", ("causal_conv1d_fwd", "causal_conv1d_bwd", "causal_conv1d_update"))
    _stub_extension("selective_scan_cuda", ("fwd", "bwd"))
    scan = sys.modules["selective_scan_cuda"]
    if getattr(scan, "__doc__", "").startswith("memcalc.validate.mamba"):
        scan.fwd = selective_scan_fwd_allocations
    try:
        import causal_conv1d.cpp_functions as conv
        import mamba_ssm.ops.triton.ssd_combined as ssd
    except ImportError as exc:
        raise MambaSourcesMissing(f"mamba_ssm / causal_conv1d sources are not importable ({exc})") from None
    return ssd, conv


class _Torch(types.ModuleType):
    """``torch`` as the mamba_ssm modules see it during a measurement: CUDA's autocast state is the
    CPU's, and the device has ``SM_COUNT`` multiprocessors."""

    def __init__(self, torch_module, sm_count: int):
        super().__init__("torch")
        self._torch = torch_module
        self._cuda = types.SimpleNamespace(
            get_device_properties=lambda device=None: types.SimpleNamespace(multi_processor_count=sm_count),
            # selects the tensor's device on a GPU; nothing to select for a CPU fake
            device=lambda index=None: contextlib.nullcontext())

    def __getattr__(self, name):
        if name == "cuda":
            return self._cuda
        return getattr(self._torch, name)

    def is_autocast_enabled(self, device_type=None):
        return self._torch.is_autocast_enabled("cpu" if device_type in (None, "cuda") else device_type)

    def get_autocast_gpu_dtype(self):
        return self._torch.get_autocast_dtype("cpu")


def _no_launch(self, grid):
    """A Triton launch that does nothing (the kernels write into tensors allocated in Python)."""
    configs = getattr(self, "configs", None)
    if configs and getattr(self, "best_config", None) is None:
        self.best_config = configs[0]

    def launch(*args, **kwargs):
        return None

    return launch


def _register_fake_conv_ops() -> None:
    import torch

    for name in ("DaoAILab::_causal_conv1d_fwd_cpp", "DaoAILab::_causal_conv1d_bwd_cpp",
                 "DaoAILab::_causal_conv1d_update_cpp"):
        try:
            torch.library.register_fake(name)(lambda *args, **kwargs: None)
        except RuntimeError:  # registered already
            pass


def _with_device_type(function, device_type: str, decorator):
    original = getattr(function, "__wrapped__", function)
    return staticmethod(decorator(original, device_type=device_type))


def report_unpacked(patch) -> None:
    """Without a cache (the mixers' fused paths need none) transformers looks for packed sequences in
    the position ids (masking_utils ``find_packed_sequence_indices``); on fake tensors it cannot
    read them and reports a packing, so the causal mask is built and SDPA repeats grouped K/V
    heads. On a GPU the model's own ``arange`` positions are one sequence: no mask, SDPA's
    ``is_causal`` with ``enable_gqa``. The harness never packs: ``patch`` (owner, name, value)
    reports no packing, as the GPU does."""
    from transformers import masking_utils

    patch(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)


@contextlib.contextmanager
def _routed_to_packages(routes, sm_count: int):
    """Inside: for each (transformers modules, functions) in ``routes``, each (fallback name, package
    function, package) of the functions in each of those modules dispatches to the package, as transformers does at import where the package
    is installed, with mamba_ssm's Triton launches and CUDA extensions doing nothing; yields mamba_ssm's
    ``ssd_combined`` module."""
    import torch
    from triton.runtime.jit import KernelInterface

    ssd, _conv = _import_sources()
    importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    from transformers.integrations import hub_kernels

    _register_fake_conv_ops()
    # imported before the device list is widened: their decorators read it at import, for good
    modules = [([importlib.import_module(name) for name in names], functions) for names, functions in routes]
    patched: list[tuple[object, str, object]] = []

    def patch(owner, name, value):
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        patched.append((owner, name, original))
        setattr(owner, name, value)

    proxy = _Torch(torch, sm_count)
    for module_name in TRITON_MODULES:
        module = sys.modules.get(f"mamba_ssm.ops.triton.{module_name}")
        if module is not None and hasattr(module, "torch"):
            patch(module, "torch", proxy)
    patch(KernelInterface, "__getitem__", _no_launch)
    for function in (ssd.MambaSplitConv1dScanCombinedFn, ssd.MambaChunkScanCombinedFn):
        patch(function, "forward", _with_device_type(function.forward, "cpu", torch.amp.custom_fwd))
        patch(function, "backward", _with_device_type(function.backward, "cpu", torch.amp.custom_bwd))
    report_unpacked(patch)
    # transformers 5.25 sends inputs on a device a package does not list (mamba_ssm: CUDA only) to the
    # torch path; these fake tensors stand for CUDA ones, so mamba_ssm's path takes them
    devices = getattr(hub_kernels, "_PACKAGE_SUPPORTED_DEVICES", None)
    if devices is not None:
        patch(hub_kernels, "_PACKAGE_SUPPORTED_DEVICES",
              {**devices, **{package: (*devices.get(package, ()), "cpu") for package in ("mamba_ssm", "causal_conv1d")}})
    for module, functions in ((module, functions) for group, functions in modules for module in group):
        for name, package_function, package in functions:
            fallback = getattr(module, name)
            fallback = getattr(fallback, "__wrapped__", fallback)
            # transformers' own dispatch, now finding the package (what it does at import where it is installed)
            patch(module, name, hub_kernels.use_kernel_func_from_hub_with_fallback(package_function, package)(fallback))
    try:
        yield ssd
    finally:
        for owner, name, value in reversed(patched):
            setattr(owner, name, value)


def mamba_kernels(sm_count: int = SM_COUNT):
    """Inside: transformers' Mamba-2 mixers call mamba_ssm's fused Function as on CUDA, its
    Triton launches and CUDA extensions doing nothing (see the module docstring)."""
    return _routed_to_packages(((MIXER_MODULES, ((KERNEL_NAME, "mamba_split_conv1d_scan_combined", "mamba_ssm"),)),),
                               sm_count)


def mamba_inference_kernels(sm_count: int = SM_COUNT):
    """Inside: transformers' Mamba-2 mixers with a cache (generate()'s forwards) call what they call on
    CUDA with mamba_ssm and causal_conv1d installed: ``causal_conv1d_fn`` for the prompt's convolution
    and ``causal_conv1d_update`` for a decoding step's (causal_conv1d_interface.py), mamba_ssm's
    ``mamba_chunk_scan_combined`` (ops/triton/ssd_combined.py, ``MambaChunkScanCombinedFn``) for the
    prompt's scan and ``selective_state_update`` (ops/triton/selective_state_update.py) for a step's;
    the gated RMSNorm and the projections stay transformers' torch code, as on a GPU. Mamba-1 mixers
    (Mamba, Falcon-Mamba, Jamba) call causal_conv1d's two functions too, mamba_ssm's ``selective_scan_fn``
    (ops/selective_scan_interface.py; its CUDA extension's allocations transcribed,
    ``selective_scan_fwd_allocations``) for the prompt and ``selective_state_update`` for a step."""
    return _routed_to_packages(((MIXER_MODULES, INFERENCE_KERNELS), (MAMBA1_MODULES, MAMBA1_INFERENCE_KERNELS)),
                               sm_count)


def build_hf_model(model, attention: str):
    """``memcalc.validate.hf.build_hf_model``, for classes without attention layers too (Mamba-2's
    refuses an SDPA setting it has no use for)."""
    import transformers

    from memcalc.validate.hf import hf_config_for

    config = hf_config_for(model)
    config._attn_implementation = "eager" if attention == "eager" else "sdpa"
    try:
        return transformers.AutoModelForCausalLM.from_config(config)
    except ValueError:
        if any(kind.value.endswith("attention") for kind in model.resolved_layer_types):
            raise
        config._attn_implementation = "eager"
        return transformers.AutoModelForCausalLM.from_config(config)


def decoder_layers(module):
    """The decoder layers of a transformers causal LM (``model.layers`` or Mamba-2's ``backbone.layers``)."""
    inner = getattr(module, "model", None) or getattr(module, "backbone", None)
    return list(inner.layers)


class LayerProbe:
    """Live bytes at each decoder layer's boundaries in the measured iteration: the forward's
    (after each layer) and the backward's (when its output gradient arrives, the most while its
    backward runs, when its input gradient is made). Read from the running LiveBytesTracker."""

    def __init__(self):
        self.forward: list[int] = []
        self.backward: dict[int, tuple[int, int, int]] = {}
        self._open: dict[int, list[int]] = {}
        self.tracker = None

    def _live(self) -> int:
        if self.tracker is None:
            from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

            from memcalc.validate.tracker import LiveBytesTracker

            self.tracker = next(mode for mode in _get_current_dispatch_mode_stack()
                                if isinstance(mode, LiveBytesTracker))
            original, probe = self.tracker._update_peaks, self

            def update_peaks():
                original()
                for record in probe._open.values():
                    record[1] = max(record[1], probe.tracker.live_bytes)

            self.tracker._update_peaks = update_peaks
        return self.tracker.live_bytes

    def attach(self, model) -> None:
        import torch

        for index, layer in enumerate(decoder_layers(model)):
            def after_forward(_module, _args, _output, index=index):
                if torch.is_grad_enabled() and not self._in_backward:
                    if index == 0:
                        self.forward = []
                    self.forward.append(self._live())

            def before_backward(_module, _grad_output, index=index):
                self._in_backward = True
                live = self._live()
                self._open[index] = [live, live]

            def after_backward(_module, _grad_input, _grad_output, index=index):
                start, peak = self._open.pop(index)
                self.backward[index] = (start, peak, self._live())

            layer.register_forward_hook(after_forward)
            layer.register_full_backward_pre_hook(before_backward)
            layer.register_full_backward_hook(after_backward)
        self._in_backward = False

        def reset(_module, _args):
            self._in_backward = False

        model.register_forward_pre_hook(reset)


def measure_through_kernels(model, workload, kernels, probe: LayerProbe | None = None, **kwargs):
    """``memcalc.validate.run.measure_training`` on fake tensors with the transformers class
    (``workload.impl`` must be "hf") inside ``kernels`` (a context manager that routes its mixers to
    the packages' own code); ``probe`` records each layer's boundaries."""
    from memcalc.validate import hf, run

    if workload.impl != "hf":
        raise ValueError("these layers are measured through their transformers class: impl='hf'")

    def build(model_config, attention):
        built = build_hf_model(model_config, attention)
        if probe is not None:
            probe.attach(built)
        return built

    original = hf.build_hf_model
    hf.build_hf_model = build
    try:
        with kernels:
            return run.measure_training(model, workload, device="fake", **kwargs)
    finally:
        hf.build_hf_model = original


def measure_training(model, workload, sm_count: int = SM_COUNT, probe: LayerProbe | None = None, **kwargs):
    """``measure_through_kernels`` with mamba_ssm's fused Mamba-2 Function (``mamba_kernels``)."""
    return measure_through_kernels(model, workload, mamba_kernels(sm_count), probe, **kwargs)
