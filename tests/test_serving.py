"""vLLM's start-up budget against published start-up logs, and reading such logs back.

Published figures (../shared/reference/inference-and-precision.md sec. 6, from vLLM issue logs):
- Llama-2-7B fp16: "Loading model weights took 12.5523 GB" (GiB in fact);
- Llama-3.1-8B bf16: "model weights take 14.99 GiB"; on a 22.07 GiB GPU at utilization 0.9:
  non_torch 0.05 GiB, activation peak 0.22 GiB, KV cache 4.60 GiB, 2,356 blocks, 37,696 tokens;
  on an H100 80GB at 0.9: non_torch 0.12 GiB, activation peak 1.19 GiB, KV cache 54.93 GiB.
vLLM rounds its GiB to two decimals; the 22.07 GiB total is rounded too, so a block or so of
difference is the log's rounding. The logs below are in vLLM's formats with those figures; the
H100's total_gpu_memory line (79.15 GiB) is implied by them ((54.93 + 14.99 + 1.19 + 0.12) / 0.9),
not printed in the source.
"""

from __future__ import annotations

import json

import pytest

from memcalc.calibration import read_vllm_log
from memcalc.config import InferSettings
from memcalc.library import resolve_model
from memcalc.serving import Calibration, default_batched_tokens, vllm_budget

GiB = 2**30
H100_USABLE = 85_028_896_768  # configs/gpus.yaml: what CUDA reports for an H100 80GB


@pytest.mark.parametrize(("model", "dtype", "logged_gib", "places"), [
    ("llama-2-7b", "fp16", 12.5523, 4),  # parameters x 2 B + the 4096 x 128 rotary cache (1 MiB)
    ("llama-3.1-8b", "bf16", 14.99, 2),  # parameters x 2 B + the 131072 x 128 rotary cache (32 MiB)
])
def test_weights_are_what_vllm_logs(model, dtype, logged_gib, places):
    budget = vllm_budget(resolve_model(model), InferSettings(dtype=dtype), 80 * GiB, 0.9, 8192)
    assert round(budget.weights / GiB, places) == logged_gib


@pytest.mark.parametrize(("total", "activation", "non_torch", "kv_gib", "blocks", "tolerance_blocks"), [
    (round(22.07 * GiB), 0.22, 0.05, 4.60, 2356, 1),
    (H100_USABLE, 1.19, 0.12, 54.93, None, None),
])
def test_kv_budget_with_the_logs_own_terms(total, activation, non_torch, kv_gib, blocks, tolerance_blocks):
    """Given the log's activation peak and non-torch memory, memcalc's budget arithmetic, weights
    and page size give the log's KV cache: within 0.01 GiB on the 22 GiB card (a block), within
    0.1% on the H100 (whose exact total the log does not print)."""
    calibration = Calibration("log", round(activation * GiB), round(non_torch * GiB))
    budget = vllm_budget(resolve_model("llama-3.1-8b"), InferSettings(context_len=8192), total, 0.9, 8192,
                         calibration)
    assert budget.page_bytes == 16 * 131_072  # 16 tokens x 128 KiB of keys and values over 32 layers
    if blocks is None:
        assert budget.kv_cache / GiB == pytest.approx(kv_gib, rel=1e-3)
    else:
        assert abs(budget.kv_cache / GiB - kv_gib) < 0.01
        assert abs(budget.blocks - blocks) <= tolerance_blocks
        assert abs(budget.tokens - 37_696) <= 16 * tolerance_blocks


@pytest.mark.parametrize(("total", "tokens", "logged", "tolerance"), [
    (round(22.07 * GiB), 2048, 0.22, 0.05),  # memcalc 0.227 GiB
    (H100_USABLE, 8192, 1.19, 0.25),  # memcalc 0.907 GiB: vLLM's profile holds more than one prefill layer
])
def test_estimated_activation_peak_against_the_logs(total, tokens, logged, tolerance):
    """Without a calibration the profiled peak is memcalc's prefill estimate for that many tokens:
    within 5% of the small card's log, 24% under the H100's (stated tolerance 25%)."""
    budget = vllm_budget(resolve_model("llama-3.1-8b"), InferSettings(context_len=8192), total, 0.9, tokens)
    assert budget.activation_peak / GiB == pytest.approx(logged, rel=tolerance)


def test_default_batched_tokens_follow_vllm_serve():
    assert default_batched_tokens(H100_USABLE, "h100-80gb") == 8192
    assert default_batched_tokens(84_987_740_160, "a100-80gb") == 2048
    assert default_batched_tokens(25_393_692_672, "rtx-4090-24gb") == 2048


V0_LOG = """INFO 01-12 10:00:00 llm_engine.py:234] Initializing an LLM engine (v0.7.2) with config: model='meta-llama/Llama-3.1-8B-Instruct', speculative_config=None
INFO 01-12 10:00:09 model_runner.py:1115] Loading model weights took 14.9888 GB
INFO 01-12 10:00:12 worker.py:266] Memory profiling takes 2.31 seconds
INFO 01-12 10:00:12 worker.py:266] the current vLLM instance can use total_gpu_memory (79.15GiB) x gpu_memory_utilization (0.90) = 71.23GiB
INFO 01-12 10:00:12 worker.py:266] model weights take 14.99GiB; non_torch_memory takes 0.12GiB; PyTorch activation peak memory takes 1.19GiB; the rest of the memory reserved for KV Cache is 54.93GiB.
INFO 01-12 10:00:12 executor_base.py:108] # CUDA blocks: 28125, # CPU blocks: 2048
"""
V1_LOG = """INFO 06-01 core.py:58] Initializing a V1 LLM engine (v0.9.0) with config: model='Qwen/Qwen3-8B', max_model_len=8192
INFO 06-01 gpu_model_runner.py:1329] Model loading took 15.2683 GiB and 4.1 seconds
INFO 06-01 gpu_worker.py:227] Available KV cache memory: 54.10 GiB
INFO 06-01 kv_cache_utils.py:634] GPU KV cache size: 393,936 tokens
INFO 06-01 kv_cache_utils.py:637] Maximum concurrency for 8,192 tokens per request: 48.09x
"""


def test_reading_a_v0_startup_log():
    startup = read_vllm_log(V0_LOG, "v0.log")
    assert startup.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert startup.total_memory == round(79.15 * GiB) and startup.utilization == 0.90
    assert startup.weights == round(14.9888 * GiB)  # the first weights line: the more precise one
    assert (startup.non_torch, startup.activation_peak, startup.kv_cache) == (
        round(0.12 * GiB), round(1.19 * GiB), round(54.93 * GiB))
    assert startup.gpu_blocks == 28125 and startup.kv_tokens is None


def test_reading_a_v1_startup_log():
    startup = read_vllm_log(V1_LOG, "v1.log")
    assert startup.model == "Qwen/Qwen3-8B" and startup.weights == round(15.2683 * GiB)
    assert startup.kv_cache == round(54.10 * GiB) and startup.kv_tokens == 393_936
    assert startup.non_torch is None and startup.activation_peak is None


def test_calibrate_then_infer_with_the_calibration(run_cli, tmp_path):
    log = tmp_path / "startup.log"
    log.write_text(V0_LOG)
    stored = tmp_path / "h100.json"
    result = run_cli("calibrate", str(log), "--model", "llama-3.1-8b", "--out", str(stored), "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["measured"]["activation_peak"] == round(1.19 * GiB)
    calibrated = document["estimate_calibrated"]
    assert abs(calibrated["kv_cache"] / GiB - 54.93) < 0.01  # the log's total, its terms, memcalc's weights
    assert json.loads(stored.read_text())["non_torch"] == round(0.12 * GiB)
    inferred = run_cli("infer", "llama-3.1-8b", "--engine", "vllm", "--gpu", "h100", "--calibration", str(stored),
                       "--json")
    assert inferred.exit_code == 0, inferred.stderr
    vllm = json.loads(inferred.stdout)["vllm"]
    assert vllm["activation_peak"] == round(1.19 * GiB) and vllm["activation_from"] == str(log)
    text = run_cli("calibrate", str(log), "--model", "llama-3.1-8b", columns=80).stdout
    assert "vLLM start-up budget" in text and "54.93" in text
    unknown = run_cli("calibrate", str(log), columns=80)  # the log's -Instruct id is not bundled: no Hub call
    assert unknown.exit_code == 0 and "give --model" in " ".join(unknown.stdout.split())


def test_calibrate_needs_the_cards_total_when_the_log_has_none(run_cli, tmp_path):
    """A V1 log prints no total_gpu_memory: memcalc asks for the card instead of a budget of 0 bytes."""
    log = tmp_path / "v1.log"
    log.write_text(V1_LOG)
    refused = run_cli("calibrate", str(log), "--model", "qwen3-8b")
    assert refused.exit_code == 2 and "prints no total_gpu_memory: give --gpu" in refused.stderr
    result = run_cli("calibrate", str(log), "--model", "qwen3-8b", "--gpu", "h100", "--json")
    assert result.exit_code == 0, result.stderr
    budget = json.loads(result.stdout)["estimate"]
    assert budget["total_memory"] == H100_USABLE and budget["utilization"] == 0.9
    assert budget["kv_cache"] > 0


@pytest.mark.parametrize(("args", "message"), [
    (["infer", "llama-3-8b", "--engine", "vllm"], "error: --engine vllm computes vLLM's start-up budget for a GPU"),
    (["infer", "llama-3-8b", "--max-num-batched-tokens", "4096"], "error: --max-num-batched-tokens and --calibration"),
])
def test_vllm_options_need_their_engine_and_gpu(args, message, run_cli):
    result = run_cli(*args)
    assert result.exit_code == 2 and result.stderr.startswith(message)


def test_calibrate_refuses_a_log_without_memory_lines(run_cli, tmp_path):
    log = tmp_path / "other.log"
    log.write_text("hello\n")
    result = run_cli("calibrate", str(log))
    assert result.exit_code == 2 and "no vLLM memory lines found" in result.stderr
