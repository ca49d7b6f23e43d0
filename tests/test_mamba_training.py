"""Training estimates of Mamba-2 blocks (memcalc/estimate/activations.py ``mamba2_saved_bytes``,
``mamba2_backward_transient``): a hand-derived byte count that needs nothing installed, the
refusals, and, where mamba_ssm's and causal_conv1d's sources and triton are importable, the
measurement of mamba_ssm's fused Function on fake tensors (memcalc.validate.mamba)."""

from __future__ import annotations

import json

import pytest

from memcalc.config import Recompute, TrainSettings
from memcalc.errors import InputError
from memcalc.estimate.activations import ActivationShape, mamba2_saved_bytes
from memcalc.estimate.training import estimate_training
from memcalc.hf import model_from_hf

# A tiny Mamba-2 model: h 64, 8 heads of 16 channels (D = 128), 2 groups of B/C with state 16,
# conv kernel 4, 2 layers, vocabulary 128 (transformers' Mamba2Config field names)
TINY = {"model_type": "mamba2", "hidden_size": 64, "num_heads": 8, "head_dim": 16, "expand": 2, "n_groups": 2,
        "state_size": 16, "conv_kernel": 4, "num_hidden_layers": 2, "vocab_size": 128, "chunk_size": 256,
        "tie_word_embeddings": False, "use_bias": False, "use_conv_bias": True, "use_cache": False}


def _tiny(tmp_path=None, **overrides):
    data = {**TINY, **overrides}
    source = ""
    if tmp_path is not None:
        path = tmp_path / "config.json"
        path.write_text(json.dumps(data))
        source = str(path)
    return model_from_hf(data, name="tiny-mamba2", source=source)


def test_config_json_chunk_and_residual_keys_are_read():
    """chunk_size and residual_in_fp32 size the activations: read from config.json, and where the
    file leaves them out, transformers' Mamba2Config defaults."""
    transformers = pytest.importorskip("transformers")
    defaults = transformers.Mamba2Config()
    absent = {key: value for key, value in TINY.items() if key != "chunk_size"}
    model = model_from_hf(absent, name="tiny-mamba2", source="")
    assert (model.mamba.chunk_size, model.mamba.residual_in_fp32) == (defaults.chunk_size, defaults.residual_in_fp32)
    given = _tiny(chunk_size=128, residual_in_fp32=False)
    assert (given.mamba.chunk_size, given.mamba.residual_in_fp32) == (128, False)
    # the fp32 residual stream between blocks costs bytes: without it the step holds less
    settings = TrainSettings(batch_size=1, seq_len=256)
    fp32_stream = estimate_training(_tiny(), settings).component("activations").bytes
    assert estimate_training(_tiny(residual_in_fp32=False), settings).component("activations").bytes < fp32_stream


def test_tiny_layer_saved_bytes_by_hand():
    """One block at b1 s256 in bf16 (T = 256 tokens), term by term from the code that saves it."""
    T, h, D, G, N, H = 256, 64, 128, 2, 16, 8
    width = 2 * D + 2 * G * N + H  # in_proj's output: z (D), xBC (D + 2GN), dt (H) = 328
    expected = (
        T * h * 4 + T * h * 2 + T * 4  # input RMSNorm: fp32 upcast, bf16 normed tensor, fp32 rsqrt per token
        + T * h * 2  # in_proj's input (F.linear saves it)
        + T * width * 2  # zxbcdt, saved whole (MambaSplitConv1dScanCombinedFn.forward save_for_backward)
        + T * D * 2  # out_x: the SSD output before the gated norm (saved)
        + T * G * 4  # the gated norm's fp32 rstd, one per token and group (_layer_norm_fwd)
        + 2 * H * 4  # A = -exp(A_log.float()): exp's fp32 output and A itself
    )
    assert expected == 367_680
    shape = ActivationShape(tokens=T, seq_len=256, batch_size=1, element_bytes=2, stream_bytes=2, autocast=False)
    assert mamba2_saved_bytes(_tiny(), shape) == expected


def test_tiny_autocast_saves_fp32_norm_tensors():
    """amp-bf16: the norm saves the fp32 stream itself and an fp32 normed tensor, in_proj a bf16 cast."""
    T, h = 256, 64
    bf16 = ActivationShape(tokens=T, seq_len=256, batch_size=1, element_bytes=2, stream_bytes=2, autocast=False)
    amp = ActivationShape(tokens=T, seq_len=256, batch_size=1, element_bytes=2, stream_bytes=4, autocast=True)
    model = _tiny()
    assert mamba2_saved_bytes(model, amp) - mamba2_saved_bytes(model, bf16) == T * h * 2


def test_train_estimates_a_mamba2_model():
    model = _tiny()
    for recompute in (Recompute.NONE, Recompute.FULL):
        for precision in ("mixed-bf16", "amp-bf16"):
            estimate = estimate_training(model, TrainSettings(precision=precision, seq_len=512, recompute=recompute))
            assert estimate.phases["backward"] > 0


@pytest.mark.parametrize("settings", [
    dict(precision="fp32"), dict(precision="mixed-fp16"), dict(recompute="selective"), dict(attention="eager"),
    dict(lora_rank=8), dict(recompute="op"),
])
def test_unmeasured_mamba2_options_are_refused(settings):
    with pytest.raises(InputError, match="Mamba-2 training activations are modelled"):
        estimate_training(_tiny(), TrainSettings(seq_len=256, **settings))


def test_mamba1_and_hybrids_stay_refused():
    from memcalc.library import resolve_model

    with pytest.raises(InputError, match="training activations of"):
        estimate_training(resolve_model("jamba-1.5-mini"), TrainSettings(seq_len=256))


def test_attention_estimates_unchanged_by_mamba_terms():
    from memcalc.library import resolve_model

    estimate = estimate_training(resolve_model("llama-3.2-1b"), TrainSettings(seq_len=1024, batch_size=2))
    assert estimate.phases["backward"] > 0  # the golden tests pin the figures themselves


# --- measured: mamba_ssm's Function on fake tensors -----------------------------------------------

mamba = pytest.importorskip("memcalc.validate.mamba")
needs_sources = pytest.mark.skipif(not mamba.available(), reason="mamba_ssm / causal_conv1d sources or triton "
                                                                 "not importable")


@needs_sources
@pytest.mark.parametrize(("precision", "recompute"), [("mixed-bf16", "none"), ("amp-bf16", "none"),
                                                      ("mixed-bf16", "full")])
def test_measured_tiny_model(tmp_path, precision, recompute):
    pytest.importorskip("transformers")
    from memcalc.estimate.activations import mamba2_backward_transient, mamba2_weight_copy_elements
    from memcalc.validate.run import TrainWorkload

    model = _tiny(tmp_path, num_hidden_layers=4)
    probe = mamba.LayerProbe()
    workload = TrainWorkload(precision=precision, seq_len=512, impl="hf", recompute=recompute)
    measured = mamba.measure_training(model, workload, probe=probe)
    estimate = estimate_training(model, TrainSettings(precision=precision, seq_len=512, recompute=recompute))
    # a tiny vocabulary: the forward peaks inside the last block's fused forward (modelled to ~1%),
    # not at the loss as in the full-size rows (benchmarks/results/mamba_fake.csv: exact)
    assert estimate.phases["forward"] == pytest.approx(measured.phases["forward"].peak_bytes, rel=0.02)
    assert estimate.phases["backward"] == pytest.approx(measured.phases["backward"].peak_bytes, rel=0.005)
    if recompute == "none":
        autocast = precision.startswith("amp")
        shape = ActivationShape(tokens=512, seq_len=512, batch_size=1, element_bytes=2,
                                stream_bytes=4 if autocast else 2, autocast=autocast)
        saved = mamba2_saved_bytes(model, shape) + (2 * mamba2_weight_copy_elements(model) if autocast else 0)
        assert probe.forward[2] - probe.forward[1] == saved
        start, peak, _end = probe.backward[2]
        # the transient counts the fp32 stream gradient's extra 2 bytes beyond the caller's e bytes
        assert peak - start == pytest.approx(mamba2_backward_transient(model, shape) - 2 * 512 * 64, abs=512)
