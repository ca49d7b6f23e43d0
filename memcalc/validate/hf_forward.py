"""A Hugging Face class's no-grad forwards as ``generate()`` runs them, measured on fake tensors:
the prompt's forward with a cache (prefill) and one decoding step after it, each as its peak of
live bytes above the weights (cache included). What ``infer --engine hf`` estimates, checked
against transformers' own modelling code rather than memcalc's reference decoder.

Attention kernels: on the CPU, fake tensors take the CPU's SDPA choice, which differs from CUDA's
where a mask is given or the key and value head dims differ (DeepSeek's MLA: the CPU falls back to
the math kernel, with its fp32 score matrix). ``cuda_sdpa_allocations`` stands in for
``torch.nn.functional.scaled_dot_product_attention`` with what CUDA's kernels allocate
(aten/src/ATen/native/transformers/attention.cpp and cuda/sdp_utils.cpp, PyTorch 2.13): a boolean
mask converted to an additive one in the query's dtype (``convert_boolean_attn_mask``), then the
output and the fp32 log-sum-exp of the flash kernel (no mask, equal head dims up to 256) or of the
memory-efficient kernel (its log-sum-exp rows padded to 32). The values are not computed: the
measurement is of memory, and fake tensors hold none."""

from __future__ import annotations

import contextlib
import json
from unittest import mock
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memcalc.validate.hf import DROPPED_KEYS, reduce_layers

FLASH_MAX_HEAD_DIM = 256
EFFICIENT_LSE_ROWS = 32  # mem-efficient attention pads its log-sum-exp rows (kAlignLSE)


@dataclass(frozen=True)
class ForwardPeaks:
    weights: int  # parameters and buffers of the built class
    prefill: int  # the prompt's forward, above the weights (its cache included)
    decode: int  # one decoding step's forward after it, above the weights (the grown cache included)
    experts_implementation: str | None = None  # how the built class runs its experts (transformers 5: grouped_mm)


def cuda_sdpa_allocations(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False):
    import torch

    batch, heads, queries, _ = query.shape
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype)  # convert_boolean_attn_mask's where()
    flash = attn_mask is None and query.shape[-1] == key.shape[-1] == value.shape[-1] <= FLASH_MAX_HEAD_DIM
    rows = queries if flash else -(-queries // EFFICIENT_LSE_ROWS) * EFFICIENT_LSE_ROWS
    output = query.new_empty(batch, heads, queries, value.shape[-1])
    log_sum_exp = query.new_empty(batch, heads, rows, dtype=torch.float32)
    del log_sum_exp, attn_mask
    return output


def cuda_attention_kernels():
    import torch

    return mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", cuda_sdpa_allocations)


@contextlib.contextmanager
def unpadded_attention_masks():
    """generate() passes an all-ones attention mask (no prompt is padded here). transformers skips a
    mask wherever the kernel's ``is_causal`` suffices once it has checked that no token is padded
    (``masking_utils.fast_all`` and ``_ignore_causal_mask_sdpa``'s ``padding_mask.all()``), data
    fake tensors do not hold: those checks answer as they would for that mask. The masks built
    (sliding and chunked layers, eager attention) still carry the padding mask's batch dimension."""
    from transformers import masking_utils

    ignore = masking_utils._ignore_causal_mask_sdpa

    def ignore_unpadded(padding_mask, *args, **kwargs):
        return ignore(None, *args, **kwargs)

    with (mock.patch.object(masking_utils, "fast_all", lambda tensor: True),
          mock.patch.object(masking_utils, "_ignore_causal_mask_sdpa", ignore_unpadded),
          _no_recurrent_padding_mask(masking_utils)):
        yield


def _unpadded_recurrent_mask(config, inputs_embeds, attention_mask, cache=None, **kwargs):
    return None


@contextlib.contextmanager
def _no_recurrent_padding_mask(masking_utils):
    """Mamba and linear-attention layers get no padding mask for an all-ones one on a GPU
    (``create_recurrent_attention_mask`` returns None, so the mixers skip their two masking
    products); on fake tensors transformers reads "tracing" and returns the mask. The modeling
    modules import the function by name (some only once the class is built), so its code is
    replaced, which every reference sees."""
    function = getattr(masking_utils, "create_recurrent_attention_mask", None)
    # the function inside transformers' deprecate_kwarg wrapper, whose code has no closure
    function = getattr(function, "__wrapped__", function)
    if function is None:
        yield
        return
    code = function.__code__
    function.__code__ = _unpadded_recurrent_mask.__code__
    try:
        yield
    finally:
        function.__code__ = code


@contextlib.contextmanager
def generate_kernels():
    """The attention kernels and masks of a generate() on CUDA, for fake tensors on the CPU."""
    with cuda_attention_kernels(), unpadded_attention_masks():
        yield


# classes whose prepare_inputs_for_generation drops the attention mask once the cache holds the prompt
# (``model_inputs["attention_mask"] = None`` unless the first iteration): generate() decodes without one
DECODING_WITHOUT_MASK = ("mamba", "falcon_mamba", "mamba2")


def decoding_attention_mask(model, mask):
    """The attention mask generate() passes a decoding step of ``model``: ``mask``, or None."""
    return None if getattr(model.config, "model_type", None) in DECODING_WITHOUT_MASK else mask


def cache_keyword(model) -> str:
    """The forward's name for the cache: ``cache`` from transformers 5.x (``past_key_values`` before,
    still taken with a deprecation warning until 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output):
    return getattr(output, "cache", None) or output.past_key_values


def hf_config_data(path: str | Path, num_layers: int | None = None) -> dict[str, Any]:
    """A config.json as the mapping memcalc reads (``memcalc.hf.model_from_hf``), cut to its first
    ``num_layers`` layers; a multimodal file keeps its text model."""
    data = json.loads(Path(path).read_text())
    if isinstance(data.get("text_config"), dict):
        data = {**data["text_config"], "model_type": data["text_config"].get("model_type", data["model_type"])}
    return reduce_layers(data, num_layers) if num_layers is not None else data


def measure_hf_forward(data: dict[str, Any], batch_size: int, prompt_len: int, dtype: str = "bf16",
                       kernels=None) -> ForwardPeaks:
    """Build ``data``'s transformers class (``model_type``'s own class, random fake weights in
    ``dtype``) and run the prompt's forward with ``use_cache=True`` and last-position logits, then
    one decoding step, with generate()'s all-ones attention mask, tracking live bytes; ``kernels``: a
    context that routes the mixers to their packages (``memcalc.validate.gated_delta``)."""
    import torch
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memcalc.validate.run import TORCH_DTYPES
    from memcalc.validate.tracker import LiveBytesTracker

    fields = {key: value for key, value in data.items() if key not in DROPPED_KEYS and not key.startswith("_synthetic")}
    config = transformers.AutoConfig.for_model(**fields)
    tracker = LiveBytesTracker()
    previous = torch.get_default_dtype()
    try:
        with (FakeTensorMode(), torch.device("cpu"), tracker, generate_kernels(), kernels or contextlib.nullcontext(),
              torch.no_grad()):
            torch.set_default_dtype(TORCH_DTYPES[dtype])
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
            weights = tracker.live_bytes
            ids = torch.randint(0, config.vocab_size, (batch_size, prompt_len))
            mask = torch.ones(batch_size, prompt_len, dtype=torch.long)
            tracker.reset_peaks()
            output = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            prefill = tracker.peak_bytes - weights
            cache = returned_cache(output)
            del output
            step = torch.randint(0, config.vocab_size, (batch_size, 1))
            ids = torch.cat([ids, step], dim=-1)  # generate()'s token ids so far
            mask = torch.cat([mask, mask.new_ones((batch_size, 1))], dim=-1)
            tracker.reset_peaks()
            output = model(input_ids=step, attention_mask=decoding_attention_mask(model, mask), use_cache=True,
                           logits_to_keep=1, **{cache_keyword(model): cache})
            decode = tracker.peak_bytes - weights
            del output, cache
    finally:
        torch.set_default_dtype(previous)
    return ForwardPeaks(weights, prefill, decode, getattr(model.config, "_experts_implementation", None))
