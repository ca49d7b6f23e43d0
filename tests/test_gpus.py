"""The GPU catalogue: datasheet memory sizes and throughput, names, and the `gpus` command."""

from __future__ import annotations

import json

import pytest

from memcalc.errors import InputError
from memcalc.gpus import gpu_catalogue, resolve_gpu

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
    row = next(line for line in run_cli("gpus").stdout.splitlines() if "h200-141gb" in line)
    assert "141" in row and "989" in row
