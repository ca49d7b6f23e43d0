"""`memcalc calibrate` of PyTorch's own allocator counters (torch.cuda.memory_stats() dumped or
printed, memory_summary()'s table) and `train --calibration` with the measured reserve."""

from __future__ import annotations

import json

import pytest

from memcalc.calibration import read_allocator_stats

GiB = 2**30
# Answer.AI's published run (../shared/reference: 10.24 GiB reserved, 8.28 GiB allocated):
# 10.24 / 8.28 - 1 = 23.67%
ALLOCATED, RESERVED = round(8.28 * GiB), round(10.24 * GiB)


def test_a_memory_stats_json_dump():
    text = json.dumps({"active.all.current": 7, "allocated_bytes.all.current": 1, "allocated_bytes.all.peak": ALLOCATED,
                       "num_alloc_retries": 2, "reserved_bytes.all.peak": RESERVED})
    stats = read_allocator_stats(text, "stats.json")
    assert (stats.peak_allocated, stats.peak_reserved, stats.alloc_retries, stats.exact) == (ALLOCATED, RESERVED, 2,
                                                                                              True)
    assert stats.reserve_percent == 23.67


def test_a_printed_memory_stats_dict():
    text = (f"OrderedDict([('active.all.allocated', 10), ('allocated_bytes.all.peak', {ALLOCATED}), "
            f"('num_alloc_retries', 0), ('reserved_bytes.all.peak', {RESERVED})])")
    stats = read_allocator_stats(text, "stats.txt")
    assert (stats.peak_allocated, stats.peak_reserved, stats.alloc_retries) == (ALLOCATED, RESERVED, 0)


def test_torchs_own_memory_summary_table(monkeypatch):
    """The table torch.cuda.memory_summary() prints, made by torch's formatter from given counters:
    each figure floored to the unit it shows (MiB here), so within one MiB."""
    torch = pytest.importorskip("torch")
    import torch.cuda.memory as memory

    stats = {f"{metric}.{pool}.{kind}": 0 for metric in (
        "allocated_bytes", "active_bytes", "requested_bytes", "reserved_bytes", "inactive_split_bytes", "allocation",
        "active", "segment", "inactive_split") for pool in ("all", "large_pool", "small_pool")
        for kind in ("current", "peak", "allocated", "freed")}
    stats |= {f"{metric}.{kind}": 0 for metric in ("oversize_allocations", "oversize_segments")
              for kind in ("current", "peak", "allocated", "freed")}
    stats |= {"allocated_bytes.all.peak": ALLOCATED, "reserved_bytes.all.peak": RESERVED,
              "allocated_bytes.all.current": 2 * GiB, "num_alloc_retries": 3, "num_ooms": 0}
    monkeypatch.setattr(memory, "memory_stats", lambda device=None: dict(stats))
    assert torch.cuda.memory is memory
    table = memory.memory_summary(device=0)
    parsed = read_allocator_stats(table, "summary.txt")
    assert not parsed.exact and parsed.alloc_retries == 3
    assert 0 <= ALLOCATED - parsed.peak_allocated < 2**20 and 0 <= RESERVED - parsed.peak_reserved < 2**20


def test_calibrate_then_train_with_the_measured_reserve(run_cli, tmp_path):
    dump = tmp_path / "stats.json"
    dump.write_text(json.dumps({"allocated_bytes.all.peak": ALLOCATED, "reserved_bytes.all.peak": RESERVED}))
    calibration = tmp_path / "reserve.json"
    result = run_cli("calibrate", str(dump), "--out", str(calibration))
    assert result.exit_code == 0, result.stderr
    assert "+23.67% over the allocated peak" in " ".join(result.stdout.split())
    document = json.loads(run_cli("train", "llama-3-8b", "--calibration", str(calibration), "--json").stdout)
    memory = document["memory"]
    assert memory["peak_reserved"] == memory["peak_allocated"] + round(memory["peak_allocated"] * 0.2367)
    assert document["device"]["reserve_source"] == str(dump)
    table = " ".join(run_cli("train", "llama-3-8b", "--calibration", str(calibration), columns=120).stdout.split())
    assert f"reserve +23.67% over the allocated peak (measured: {dump})" in table


@pytest.mark.parametrize(("content", "args", "message"), [
    ("nothing to see", ("calibrate", "{file}"), "neither vLLM memory lines"),
    (json.dumps({"allocated_bytes.all.peak": 10, "reserved_bytes.all.peak": 5}), ("calibrate", "{file}"),
     "peak reserved (5 B) must be at least the peak allocated"),
    (json.dumps({"engine": "vllm", "source": "x"}), ("train", "llama-3-8b", "--calibration", "{file}"),
     "not an allocator calibration"),
])
def test_bad_calibration_inputs_exit_2(content, args, message, run_cli, tmp_path):
    file = tmp_path / "input.json"
    file.write_text(content)
    result = run_cli(*(arg.replace("{file}", str(file)) for arg in args))
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr
