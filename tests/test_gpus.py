"""The GPU catalogue: datasheet memory sizes and throughput, the capacity CUDA reports (usable
bytes), names, and the `gpus` command."""

from __future__ import annotations

import dataclasses
import json

import pytest

from memcalc.config import parse
from memcalc.errors import InputError
from memcalc.gpus import USABLE_FALLBACK_RESERVE, GPUSpec, gpu_catalogue, resolve_gpu

# (memory as sold in GiB, dense bf16 TFLOP/s, FP8 tensor cores) from each vendor's datasheet.
DATASHEETS = {
    "a100-40gb": (40, 312, False),
    "a100-80gb": (80, 312, False),
    "h100-80gb": (80, 989, True),
    "h200-141gb": (141, 989, True),
    "b200-180gb": (180, 2250, True),
    "l40s-48gb": (48, 362, True),
    "rtx-4090-24gb": (24, 165, True),
    "mi300x-192gb": (192, 1307, True),
}


@pytest.mark.parametrize(("name", "expected"), sorted(DATASHEETS.items()))
def test_catalogue_matches_datasheets(name, expected):
    memory_gib, tflops, fp8 = expected
    spec = gpu_catalogue()[name]
    assert spec.memory_bytes == memory_gib * 2**30
    assert (spec.bf16_dense_tflops, spec.fp8) == (tflops, fp8)


# Total device memory as the runtime reports it (cudaMemGetInfo total = totalGlobalMem = torch
# total_memory; HIP on AMD), each as printed in a public log; docs/gpus.md lists the others found.
USABLE = {
    # deviceQuery, A100-SXM4-40GB, CUDA driver 12.2: "40339 MBytes (42298834944 bytes)"
    # https://github.com/bottlerocket-os/bottlerocket/pull/3873
    "a100-40gb": 42_298_834_944,
    # totalGlobalMem, A100-SXM4-80GB, CUDA driver 12.2 (deviceQuery there: "81051 MBytes")
    # https://github.com/maximilianmbeck/vlstm_cuda/blob/813e4a7cbf353894a7258dcc1e53ce2bd8f631e2/CUDA_DEVICES_PROPS.md
    "a100-80gb": 84_987_740_160,
    # deviceQuery, H100 80GB HBM3, driver 570.133.20: "81090 MBytes (85028896768 bytes)"; nvidia-smi 81559MiB
    # https://github.com/orimanabu/zenndocs/blob/292c9f9852c22f4e85514f772f4f9cfac2be1756/articles/try-rhel-with-nvidia-gpu.md
    "h100-80gb": 85_028_896_768,
    # torch repr, NVIDIA H200: total_memory=143156MB (totalGlobalMem // 2^20: whole MiB only)
    # https://github.com/ai-bot-pro/achatbot/blob/298019b35ebdd32d4ec0daae998b2308099ba77c/deploy/modal/src/llm/vllm/vlm/skywork_r1v.py
    "h200-141gb": 143_156 * 2**20,
    # torch repr, NVIDIA B200: total_memory=182642MB (whole MiB; the same file)
    "b200-180gb": 182_642 * 2**20,
    # cuDeviceTotalMem, L40S, ECC on, CUDA driver 12.4: "45373 MBytes (47576711168 bytes)"
    # https://github.com/alvarobartt/cuda-device-query/blob/785c09f81d56cedba22460cb643b23ae0e1ba3b3/README.md
    "l40s-48gb": 47_576_711_168,
    # torch total_memory, GeForce RTX 4090, Linux driver 530.41.03 ("23.65 GB")
    # https://github.com/autonomi-ai/nos/blob/c119d9d91d65b791bbc9fa15f212dbe61a29f43a/docs/cli/system.md
    "rtx-4090-24gb": 25_393_692_672,
    # torch repr, MI300X, ROCm 6.2.4: total_memory=196592MB; rocminfo VRAM pool 201310208 KB, the same bytes
    # https://github.com/ROCm/legacy-rocm-build/issues/4203 (ROCm/ROCm#4203), ROCm/rocm-examples#187
    "mi300x-192gb": 206_141_652_992,
}


@pytest.mark.parametrize(("name", "expected"), sorted(USABLE.items()))
def test_usable_bytes_are_the_published_figures(name, expected):
    spec = gpu_catalogue()[name]
    assert spec.usable_bytes == spec.usable_memory_bytes == expected
    assert "https://github.com/" in spec.usable_source


def test_every_card_has_a_sourced_usable_figure():
    assert set(USABLE) == set(gpu_catalogue())


@pytest.mark.parametrize("name", sorted(DATASHEETS))
def test_usable_is_below_memory_as_sold_and_above_90_percent(name):
    spec = gpu_catalogue()[name]
    assert 0.9 * spec.memory_bytes < spec.usable_memory_bytes < spec.memory_bytes


def test_h100_usable_sits_below_the_nvidia_smi_total():
    """81920 MiB as sold > 81559 MiB in nvidia-smi > 81090 MiB for CUDA (one machine, driver 570)."""
    assert gpu_catalogue()["h100-80gb"].usable_memory_bytes < 81559 * 2**20 < 80 * 2**30


def _unmeasured(name):
    return dataclasses.replace(gpu_catalogue()[name], usable_bytes=None, usable_source=None)


def test_fallback_applies_without_a_measured_figure():
    # 80 GiB less 2% = 80281.6 MiB, rounded down to whole MiB
    assert USABLE_FALLBACK_RESERVE == 0.02
    assert _unmeasured("h100-80gb").usable_memory_bytes == 80281 * 2**20
    spec = parse(GPUSpec, {"name": "new-gpu", "vendor": "nvidia", "architecture": "hopper (sm90)", "memory_gib": 141,
                           "bf16_dense_tflops": 989, "fp8": True, "mxfp8": False, "intra_node_gbps": 900,
                           "source": "datasheet"}, "test")
    assert spec.usable_bytes is None and spec.usable_memory_bytes == 141_496 * 2**20  # 141 GiB x 0.98 = 141496.32 MiB


@pytest.mark.parametrize("name", sorted(set(USABLE) - {"l40s-48gb"}))
def test_fallback_is_below_every_measured_card_without_gddr_ecc(name):
    """The 2% reserve is more than any measured card loses but the L40S, whose GDDR6 ECC keeps 1/16."""
    assert _unmeasured(name).usable_memory_bytes < USABLE[name]


def test_l40s_loses_more_than_the_fallback_to_gddr_ecc():
    assert USABLE["l40s-48gb"] < _unmeasured("l40s-48gb").usable_memory_bytes


@pytest.mark.parametrize(("extra", "message"), [
    ({"usable_bytes": 10**9}, "usable_bytes needs a usable_source"),
    ({"usable_source": "a log"}, "usable_source without usable_bytes"),
    ({"usable_bytes": 2 * 2**30, "usable_source": "a log"}, r"usable_bytes \(2147483648\) exceeds memory_gib"),
    ({"usable_bytes": 0, "usable_source": "a log"}, "greater than 0"),
])
def test_usable_fields_are_validated(extra, message):
    entry = {"name": "x", "vendor": "nvidia", "architecture": "a", "memory_gib": 1, "bf16_dense_tflops": 1,
             "fp8": False, "mxfp8": False, "intra_node_gbps": 1, "source": "s"}
    with pytest.raises(InputError, match=message):
        parse(GPUSpec, entry | extra, "gpus.yaml: GPU 1")


def test_a100_80gb_is_the_81920_mib_nvidia_smi_reports():
    assert gpu_catalogue()["a100-80gb"].memory_bytes == 81920 * 2**20


def test_only_blackwell_has_mxfp8():
    assert [name for name, spec in gpu_catalogue().items() if spec.mxfp8] == ["b200-180gb"]


@pytest.mark.parametrize("reference", ["h100", "H100-SXM5-80GB", "h100-80gb", "H100"])
def test_aliases_resolve(reference):
    assert resolve_gpu(reference).name == "h100-80gb"


def test_unknown_gpu_suggests_close_names():
    with pytest.raises(InputError, match=r"unknown GPU 'h10'; did you mean h100-80gb"):
        resolve_gpu("h10")


def test_gpus_command(run_cli):
    listing = json.loads(run_cli("gpus", "--json").stdout)
    assert {entry["name"] for entry in listing} == set(DATASHEETS)
    assert next(e for e in listing if e["name"] == "h200-141gb")["memory_bytes"] == 151_397_597_184  # 141 x 2^30
    assert {entry["name"]: entry["usable_bytes"] for entry in listing} == USABLE
    row = next(line for line in run_cli("gpus").stdout.splitlines() if "h200-141gb" in line)
    assert "141" in row and "989" in row
