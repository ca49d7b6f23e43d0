"""Gated-delta-net layers (Qwen3-Next, Qwen3.5) as they train on a GPU, measured on fake tensors on the CPU.

On CUDA, transformers' ``Qwen3NextGatedDeltaNet`` (modeling_qwen3_next.py; Qwen3.5's
``Qwen3_5GatedDeltaNet`` and Qwen3.5-MoE's alike) reaches
flash-linear-attention's ``chunk_gated_delta_rule`` (fla/ops/gated_delta_rule/chunk.py,
``ChunkGatedDeltaRuleFunction``) through ``use_kernel_func_from_hub_with_fallback("...", "fla")``,
and causal_conv1d's ``causal_conv1d_fn`` where that package is installed (else ``F.conv1d``, which
saves the same tensors). fla's Function allocates every tensor it saves, returns and uses as a
workspace with torch in Python (``torch.empty``, ``new_empty``, ``empty_like``; the recurrent states
``h`` and their gradients ``dh`` are ``[B, ceil(T / 64), HV, K, V]`` tensors of the input dtype), then
launches Triton kernels that only write into them.

``gated_delta_kernels()`` runs that code as it is, on fake tensors:

* real: fla's Python (its ``input_guard`` contiguous copies, every allocation, the GVA head sums,
  ``save_for_backward``), transformers' model classes around it (norms, the gated RMSNorm, the
  projections, the dispatch), Triton's decorators;
* stubbed: every Triton launch (``memcalc.validate.mamba``'s ``_no_launch``: an autotuner reports its
  first config, which sizes no allocation here) and the device queries fla sizes its block tiling by:
  an H100/H200's 232,448 bytes of shared memory a block (fla/utils/hardware.py ``Backend.HOPPER``),
  so ``chunk_bwd_dqkwg`` splits K as on Hopper (one fp32 ``dg`` partial per 128 channels).

The sources are not a dependency of memcalc: ``fla`` and ``triton`` (it imports without a GPU) must be
importable. ``pip install fla-core`` gives fla's kernels alone; the ``flash-linear-attention`` package
adds fla's model classes, which register themselves with transformers' Auto classes (its ``mamba2``
replaces transformers' own), so the harness should not be run beside it. causal_conv1d is used where
it is importable (its sources, as for memcalc.validate.mamba); without it transformers' torch
convolution runs, as it does on a GPU without that package: its silu keeps the padded convolution
output, b x (s + kernel - 1) x C more bytes a gated delta net layer than the estimate, which assumes
causal-conv1d (tests/test_gated_delta_training.py measures both).
"""

from __future__ import annotations

import contextlib
import importlib

# shared memory per block of an H100/H200 (fla/utils/hardware.py Backend.HOPPER)
HOPPER_SHARED_MEMORY = 232448
# transformers modules whose gated delta net dispatches to fla: Qwen3-Next, Qwen3.5, Qwen3.5-MoE
MIXER_MODULES = ("transformers.models.qwen3_next.modeling_qwen3_next", "transformers.models.qwen3_5.modeling_qwen3_5",
                 "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
# transformers' fallback function, the package function it dispatches to, the package
KERNELS = (("torch_chunk_gated_delta_rule", "chunk_gated_delta_rule", "fla"),
           ("causal_conv1d_fn", "causal_conv1d_fn", "causal_conv1d"),
           # a decoding step (one token with a cache): fla's fused recurrent step, causal_conv1d's update
           ("torch_recurrent_gated_delta_rule", "fused_recurrent_gated_delta_rule", "fla"),
           ("causal_conv1d_update", "causal_conv1d_update", "causal_conv1d"))


class GatedDeltaSourcesMissing(ImportError):
    """fla or triton cannot be imported."""


def available() -> bool:
    """Whether fla and triton can be imported (the measurement needs both)."""
    try:
        _import_sources()
    except GatedDeltaSourcesMissing:
        return False
    return True


def _import_sources():
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        raise GatedDeltaSourcesMissing(f"triton is not importable ({exc})") from None
    try:
        import warnings

        with warnings.catch_warnings():  # fla warns that Triton has no GPU here: the point of the stubs
            warnings.simplefilter("ignore")
            import fla.utils.hardware as hardware
            importlib.import_module("fla.ops.gated_delta_rule")
    except ImportError as exc:
        raise GatedDeltaSourcesMissing(f"flash-linear-attention is not importable ({exc})") from None
    return hardware


def conv_kernel_available() -> bool:
    """Whether causal_conv1d's sources can be imported (its fake ops registered): the convolution the
    estimate assumes; else transformers' torch convolution runs."""
    from memcalc.validate import mamba

    try:
        mamba._stub_extension("causal_conv1d_cuda", ("causal_conv1d_fwd", "causal_conv1d_bwd", "causal_conv1d_update"))
        importlib.import_module("causal_conv1d")
    except ImportError:
        return False
    mamba._register_fake_conv_ops()
    return True


class _EveryDevice:
    """fla's list of shared memory per device, indexed by the tensors' device index (None on the CPU)."""

    def __getitem__(self, index):
        return HOPPER_SHARED_MEMORY


@contextlib.contextmanager
def gated_delta_kernels():
    """Inside: transformers' Qwen3-Next gated delta net calls fla's chunked Function as on CUDA (and
    causal_conv1d's, where importable), their Triton launches doing nothing (see the module docstring)."""
    from triton.runtime.jit import KernelInterface

    from memcalc.validate.mamba import _no_launch, report_unpacked

    hardware = _import_sources()
    packages = ["fla"] + (["causal_conv1d"] if conv_kernel_available() else [])
    from transformers.integrations import hub_kernels

    # imported before the device list is widened: their decorators read it at import, for good
    modules = [importlib.import_module(name) for name in MIXER_MODULES]
    patched: list[tuple[object, str, object]] = []

    def patch(owner, name, value):
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        patched.append((owner, name, original))
        setattr(owner, name, value)

    patch(KernelInterface, "__getitem__", _no_launch)
    report_unpacked(patch)
    patch(hardware, "get_all_max_shared_mem", lambda: _EveryDevice())
    hardware.check_shared_mem.cache_clear()
    # transformers 5.25 sends CPU inputs to the torch path; these fake tensors stand for CUDA ones
    devices = hub_kernels._PACKAGE_SUPPORTED_DEVICES
    patch(hub_kernels, "_PACKAGE_SUPPORTED_DEVICES",
          {**devices, **{package: (*devices.get(package, ()), "cpu") for package in packages}})
    for module in modules:
        for name, function, package in KERNELS:
            if package not in packages:
                continue
            fallback = getattr(module, name)
            fallback = getattr(fallback, "__wrapped__", fallback)
            # transformers' own dispatch, now finding the package (what it does at import where it is installed)
            patch(module, name, hub_kernels.use_kernel_func_from_hub_with_fallback(function, package)(fallback))
    try:
        yield
    finally:
        for owner, name, value in reversed(patched):
            setattr(owner, name, value)
        hardware.check_shared_mem.cache_clear()


def measure_training(model, workload, probe=None, **kwargs):
    """``memcalc.validate.mamba.measure_through_kernels`` with fla's chunked Function
    (``gated_delta_kernels``); ``probe`` (a ``memcalc.validate.mamba.LayerProbe``) records each
    layer's boundaries."""
    from memcalc.validate.mamba import measure_through_kernels

    return measure_through_kernels(model, workload, gated_delta_kernels(), probe, **kwargs)
