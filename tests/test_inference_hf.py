"""``infer --engine hf`` against transformers' own classes: generate() measured on fake tensors.

Each row is a checkpoint's config.json from tests/data/hf_configs/ cut to a few layers (every layer
kind kept), built as its own transformers class with fake bf16 weights and run through a
generate() loop (``memcalc.validate.run.measure_inference(impl="hf")``: the model's own cache, last-
position logits, fp32 scores, beam reorders), SDPA calls allocating as CUDA's kernels do and
generate()'s all-ones attention mask (``memcalc.validate.hf_forward``). memcalc reads the same file
and layer count. The measurement is transformers' modelling code; the estimate is
memcalc.estimate.hf_engine's transcription of it, so a row that disagrees is a missed tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from memcalc.config import InferSettings  # noqa: E402
from memcalc.estimate.inference import estimate_inference  # noqa: E402
from memcalc.library import resolve_model  # noqa: E402
from memcalc.validate.cli_support import with_layers  # noqa: E402

CONFIGS = Path(__file__).parent / "data" / "hf_configs"
TOLERANCE = 0.002  # of the measured peak


@dataclass(frozen=True)
class Row:
    file: str
    layers: int
    batch: int
    prompt: int
    new_tokens: int
    beams: int = 1
    why: str = ""

    @property
    def id(self) -> str:
        return f"{self.file.split('--')[-1].removesuffix('.json')}-L{self.layers}-b{self.batch}-p{self.prompt}+{self.new_tokens}"


ROWS = [
    Row("Qwen--Qwen3-8B.json", 2, 2, 512, 8, why="GQA with SDPA: the MLP's moment, rotary tables"),
    Row("openai--gpt-oss-20b.json", 2, 2, 1024, 4, beams=2,
        why="no SDPA path: eager attention with the sink column, repeated keys and values, two masks"),
    Row("google--gemma-3-1b-it.json", 6, 2, 1024, 8, why="five sliding layers holding the prompt's storage"),
    Row("google--gemma-3-1b-it.json", 2, 1, 32768, 2,
        why="a sliding layer's boolean mask and its additive copy outgrow the MLP"),
    Row("deepseek-ai--DeepSeek-V3.json", 2, 1, 512, 4, why="MLA: the cached latent, expanded in every forward"),
    Row("deepseek-ai--DeepSeek-V3.json", 4, 1, 1024, 2, why="MLA with a grouped-experts layer, fp32 routing"),
    Row("meta-llama--Llama-4-Scout-17B-16E-Instruct.json", 4, 1, 512, 4,
        why="Llama 4's batched experts: every token through every expert"),
    Row("synthetic/olmo2-defaults.json", 2, 1, 2048, 4, why="post-norm block: one stream tensor fewer"),
    Row("microsoft--phi-4.json", 2, 1, 2048, 4, why="Phi-3's fused gate_up projection"),
    Row("zai-org--GLM-4.5-Air.json", 2, 1, 1024, 2, why="a dense first layer, grouped experts, partial rotary"),
    Row("Qwen--Qwen3-30B-A3B.json", 2, 1, 2048, 2, why="grouped experts"),
    Row("meta-llama--Llama-3.2-1B.json", 2, 2, 64, 200, why="decoding's peak: the last step's key copy"),
]


def _model(row: Row):
    return with_layers(resolve_model(str(CONFIGS / row.file)), row.layers)


def _weights(estimate) -> int:
    return sum(component.bytes for component in estimate.components if component.key.startswith("weights"))


def _settings(row: Row) -> InferSettings:
    # the checkpoints' quantised formats are not built: the class gets bf16 weights
    return InferSettings(batch_size=row.batch, prompt_len=row.prompt, max_new_tokens=row.new_tokens,
                         num_beams=row.beams, weights="bf16")


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_generate_peak_matches_the_transformers_class(row: Row):
    from memcalc.validate.run import InferWorkload, measure_inference

    model = _model(row)
    estimate = estimate_inference(model, _settings(row))
    measured = measure_inference(model, InferWorkload(batch_size=row.batch, prompt_len=row.prompt,
                                                      new_tokens=row.new_tokens, num_beams=row.beams), impl="hf")
    # above the weights: a multimodal file's vision tower is estimated, the text class has none
    above = estimate.peak_allocated - _weights(estimate)
    assert abs(above - (measured.total - measured.components["weights"])) <= TOLERANCE * measured.total, row.why
    assert estimate.component("kv_cache").bytes == pytest.approx(measured.components["kv_cache"], rel=1e-3)


@pytest.mark.parametrize("row", ROWS[:6], ids=[row.id for row in ROWS[:6]])
def test_each_phase_matches_its_forward(row: Row):
    """The prompt's forward and one decoding step, each against its own phase: the decoding phase
    is the step's forward plus generate()'s fp32 scores of the choice (the forward alone has none)."""
    from memcalc.validate.hf_forward import hf_config_data, measure_hf_forward

    model = _model(row)
    estimate = estimate_inference(model, InferSettings(batch_size=row.batch, prompt_len=row.prompt, max_new_tokens=2,
                                                       weights="bf16"))
    measured = measure_hf_forward(hf_config_data(CONFIGS / row.file, row.layers), row.batch, row.prompt)
    weights = _weights(estimate)
    # the rotary inv_freq buffers; DeepSeek's routers, which transformers keeps in fp32
    assert weights == pytest.approx(measured.weights, rel=2e-4)
    prefill = estimate.phases["prefill"] - weights
    assert abs(prefill - measured.prefill) <= TOLERANCE * measured.prefill, row.why
    choice = row.batch * model.vocab_size * 4  # generate()'s fp32 scores (greedy)
    decode = estimate.phases["decode"] - weights - choice
    assert abs(decode - measured.decode) <= TOLERANCE * measured.decode, row.why


GATED_DELTA_ROWS = [
    Row("Qwen--Qwen3-Next-80B-A3B-Instruct.json", 4, 1, 1024, 2,
        why="three gated delta nets and a gated attention layer, experts beside them"),
    Row("synthetic/qwen3_5_text-defaults.json", 4, 2, 600, 2,
        why="Qwen3.5's split projections: fla's chunk states outgrow the MLP"),
    Row("synthetic/qwen3_5_text-defaults.json", 4, 3, 100, 2, why="a prompt shorter than two of fla's chunks"),
]


@pytest.mark.parametrize("row", GATED_DELTA_ROWS, ids=[row.id for row in GATED_DELTA_ROWS])
def test_gated_delta_forwards_with_flash_linear_attention(row: Row):
    """Qwen3-Next's and Qwen3.5's prompt forward and decoding step with fla's chunked kernel and fused
    recurrent step and causal_conv1d's, as on a GPU with both installed (memcalc.validate.gated_delta)."""
    from memcalc.validate import gated_delta

    if not gated_delta.available():
        pytest.skip("fla and triton are not importable")
    from memcalc.validate.hf_forward import hf_config_data, measure_hf_forward

    model = _model(row)
    estimate = estimate_inference(model, _settings(row))
    measured = measure_hf_forward(hf_config_data(CONFIGS / row.file, row.layers), row.batch, row.prompt,
                                  kernels=gated_delta.gated_delta_kernels())
    weights = _weights(estimate)
    prefill = estimate.phases["prefill"] - weights
    assert abs(prefill - measured.prefill) <= TOLERANCE * measured.prefill, row.why
    decode = estimate.phases["decode"] - weights - row.batch * model.vocab_size * 4  # less generate()'s fp32 scores
    assert abs(decode - measured.decode) <= TOLERANCE * measured.decode, row.why


MAMBA_ROWS = [
    Row("nvidia--Nemotron-H-56B-Base-8K.json", 8, 1, 1024, 4,
        why="four Mamba-2 mixers before an attention layer: the gated norm's fp32 moment, the state's clone"),
    Row("nvidia--Nemotron-H-56B-Base-8K.json", 8, 2, 1000, 2, why="a prompt that is no whole number of chunks"),
    Row("nvidia--NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json", 6, 2, 700, 3,
        why="Mamba-2 mixers, grouped experts in one-mixer blocks"),
    Row("synthetic/mamba2-defaults.json", 3, 2, 300, 3, why="Mamba-Codestral's sizes: an fp32 residual stream"),
    # Mamba-1 mixers: mamba_ssm's selective_scan_fn, its CUDA extension's allocations transcribed
    Row("tiiuae--falcon-mamba-7b.json", 2, 2, 3000, 3,
        why="Falcon-Mamba: the prompt's mask multiplies, weightless norms, no mask when decoding"),
    Row("synthetic/mamba-defaults.json", 3, 1, 5000, 3, why="Mamba: x_proj's output held, A made twice"),
    Row("ai21labs--AI21-Jamba-1.5-Mini.json", 5, 2, 777, 3, why="Jamba: Mamba-1 beside attention and experts"),
]


def _mamba_kernels():
    from memcalc.validate import mamba

    if not mamba.available():
        pytest.skip("mamba_ssm, causal_conv1d and triton are not importable")
    return mamba.mamba_inference_kernels()


@pytest.mark.parametrize("row", MAMBA_ROWS, ids=[row.id for row in MAMBA_ROWS])
def test_mamba_generate_with_mamba_ssm(row: Row):
    """A Mamba-2 or Mamba-1 model's generate() with mamba_ssm's and causal_conv1d's kernels, as on a GPU
    with both installed (memcalc.validate.mamba.mamba_inference_kernels): the peak, the state and KV cache
    exact, and each phase against its own forward."""
    from memcalc.validate.hf_forward import hf_config_data, measure_hf_forward
    from memcalc.validate.run import InferWorkload, measure_inference

    model = _model(row)
    estimate = estimate_inference(model, _settings(row))
    measured = measure_inference(model, InferWorkload(batch_size=row.batch, prompt_len=row.prompt,
                                                      new_tokens=row.new_tokens), impl="hf",
                                 mixer_kernels=_mamba_kernels())
    above = estimate.peak_allocated - _weights(estimate)
    assert abs(above - (measured.total - measured.components["weights"])) <= TOLERANCE * measured.total, row.why
    # the harness's "kv_cache" is everything the model's cache holds: keys, values, conv and SSM states
    cache = estimate.component("kv_cache").bytes + estimate.component("state_cache").bytes
    assert cache == measured.components["kv_cache"]

    weights = _weights(estimate)
    phases = estimate_inference(model, InferSettings(batch_size=row.batch, prompt_len=row.prompt, max_new_tokens=2,
                                                     weights="bf16")).phases
    forward = measure_hf_forward(hf_config_data(CONFIGS / row.file, row.layers), row.batch, row.prompt,
                                 kernels=_mamba_kernels())
    assert abs(phases["prefill"] - weights - forward.prefill) <= TOLERANCE * forward.prefill, row.why
    decode = phases["decode"] - weights - row.batch * model.vocab_size * 4  # less generate()'s fp32 scores
    assert abs(decode - forward.decode) <= TOLERANCE * forward.decode, row.why


NEMOTRON_H_ARGS = ("validate", str(CONFIGS / "nvidia--Nemotron-H-56B-Base-8K.json"), "--workload", "infer",
                   "--impl", "hf", "--num-layers", "8", "--prompt", "512", "--max-new-tokens", "2", "--device", "fake",
                   "--json")


def test_validate_measures_a_mamba2_hybrid_through_mamba_ssm(run_cli):
    """`memcalc validate --workload infer --impl hf` on fake tensors routes a Mamba-2 hybrid's mixers to
    mamba_ssm and causal_conv1d, as the estimate assumes; the cache rows hold the states too."""
    _mamba_kernels()
    import json

    result = run_cli(*NEMOTRON_H_ARGS)
    assert result.exit_code == 0, result.stdout
    validation = json.loads(result.stdout)["validation"]
    rows = {row["key"]: row for row in validation["rows"]}
    for key in ("kv_cache_after_prefill", "kv_cache"):
        assert rows[key]["estimated"] == rows[key]["measured"] > 0
    assert abs(validation["total"]["error_percent"]) <= 100 * TOLERANCE


def test_validate_refuses_a_mamba2_hybrid_without_the_sources(run_cli, monkeypatch):
    """Without mamba_ssm's sources the class would run transformers' torch scan, which the estimate
    does not describe: refused in one line, exit 2."""
    from memcalc.validate import mamba

    monkeypatch.setattr(mamba, "available", lambda: False)
    result = run_cli(*NEMOTRON_H_ARGS)
    assert result.exit_code == 2
    assert "mamba_ssm" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_gpt_oss_prefill_is_eager_by_default():
    """gpt-oss under the hf engine: the class has no SDPA path, so `--attention sdpa` (the default)
    estimates eager attention, and the assumptions say so; a flash kernel with sinks does not."""
    model = resolve_model("gpt-oss-20b")
    default = estimate_inference(model, InferSettings(prompt_len=8192, max_new_tokens=2))
    flash = estimate_inference(model, InferSettings(prompt_len=8192, max_new_tokens=2, attention="flash"))
    assert default.settings.attention.value == "eager"
    # one layer's masked scores, sink-concatenated scores and their shift: 64 heads x 8192 x (3 x 8192 + 2) x 2 B
    scores = 64 * 8192 * (3 * 8192 + 2) * 2
    assert default.component("activations").bytes > scores > 10 * flash.component("activations").bytes
