"""Safetensors headers read without loading weights: exact counts and bytes, quantised naming, errors.

Files written by the safetensors package are checked against the numpy arrays that went in
(``size``, ``nbytes``); quantised layouts, which need dtypes numpy lacks, are written by hand in the
format of the safetensors README and checked against sizes derived from each format's definition.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from memcalc.checkpoint import (
    CheckpointTensors,
    ModelPart,
    TensorRole,
    part_of,
    read_checkpoint,
    read_safetensors_header,
)
from memcalc.errors import InputError

BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F16": 16, "BF16": 16,
        "I32": 32, "F32": 32, "I64": 64, "F4": 4, "F6_E2M3": 6}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], *, metadata: dict | None = None,
                      data_bytes: int | None = None, header_bytes: bytes | None = None) -> None:
    """A safetensors file by hand: tensors laid out back to back in the given order, zero-filled.
    ``data_bytes`` overrides the buffer length (to cut it short); ``header_bytes`` the JSON."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset if data_bytes is None else data_bytes))


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- Files written by the safetensors package -------------------------------------------------------


def small_model_arrays() -> dict[str, np.ndarray]:
    return {
        "model.embed_tokens.weight": np.zeros((32, 8), dtype=np.float16),
        "model.layers.0.self_attn.q_proj.weight": np.zeros((8, 8), dtype=np.float32),
        "model.layers.0.input_layernorm.weight": np.zeros((8,), dtype=np.float32),
        "model.layers.0.mlp.experts": np.zeros((2, 3, 5), dtype=np.int8),
        "lm_head.weight": np.zeros((32, 8), dtype=np.float16),
        "model.step": np.zeros((), dtype=np.int64),  # a scalar: shape [], one element
    }


def test_safetensors_package_file_counts_and_bytes(tmp_path):
    arrays = small_model_arrays()
    save_file(arrays, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    checkpoint = read_checkpoint(tmp_path)  # the directory: its model.safetensors
    assert checkpoint.total_params == sum(array.size for array in arrays.values())
    assert checkpoint.total_bytes == sum(array.nbytes for array in arrays.values())
    assert checkpoint.logical_params == checkpoint.total_params  # nothing quantised
    assert dict(checkpoint.metadata) == {"format": "pt"}
    by_name = {tensor.name: tensor for tensor in checkpoint.tensors}
    for name, array in arrays.items():
        entry = by_name[name]
        assert (entry.shape, entry.numel, entry.nbytes) == (array.shape, array.size, array.nbytes)
        assert by_name[name].role is TensorRole.PARAMETER


def test_bytes_by_dtype(tmp_path):
    arrays = small_model_arrays()
    save_file(arrays, str(tmp_path / "model.safetensors"))
    expected = {"F16": 2 * 32 * 8 * 2, "F32": (64 + 8) * 4, "I8": 30, "I64": 8}
    assert read_checkpoint(tmp_path / "model.safetensors").bytes_by_dtype() == expected


def test_header_gives_the_data_buffer_size(tmp_path):
    save_file({"w": np.zeros((1024, 1024), dtype=np.float32)}, str(tmp_path / "big.safetensors"))
    header, data_bytes = read_safetensors_header(tmp_path / "big.safetensors")
    assert data_bytes == 1024 * 1024 * 4
    assert header["w"]["shape"] == [1024, 1024]


def test_sharded_directory_with_index(tmp_path):
    shard_arrays = [
        {"model.embed_tokens.weight": np.zeros((16, 4), dtype=np.float16),
         "model.layers.0.mlp.up_proj.weight": np.zeros((12, 4), dtype=np.float16)},
        {"model.layers.1.mlp.up_proj.weight": np.zeros((12, 4), dtype=np.float32),
         "lm_head.weight": np.zeros((16, 4), dtype=np.float16)},
    ]
    weight_map = {}
    for number, arrays in enumerate(shard_arrays, start=1):
        shard = f"model-{number:05d}-of-00002.safetensors"
        save_file(arrays, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(arrays, shard))
    total = sum(array.nbytes for arrays in shard_arrays for array in arrays.values())
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint.total_bytes == total
    assert checkpoint.total_params == 64 + 48 + 48 + 64
    assert len(checkpoint.files) == 2
    assert {tensor.name for tensor in checkpoint.tensors} == set(weight_map)


def test_sharded_index_missing_shard_is_named(tmp_path):
    save_file({"a": np.zeros(4, dtype=np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(tmp_path)
    assert "model-00002-of-00002.safetensors" in one_line_error(excinfo)


def test_sharded_index_tensor_absent_from_its_shard(tmp_path):
    save_file({"a": np.zeros(4, dtype=np.float32)}, str(tmp_path / "shard.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "shard.safetensors", "ghost": "shard.safetensors"}}))
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(tmp_path / "model.safetensors.index.json")
    assert "ghost" in one_line_error(excinfo)


def test_directory_without_weights(tmp_path):
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(tmp_path)
    assert "model.safetensors" in one_line_error(excinfo)


# --- Quantised naming conventions ---------------------------------------------------------------------

# gpt-oss MXFP4 (transformers integrations/mxfp4.py): an expert projection of E experts, d_out rows and
# d_in inputs stores [E, d_out, d_in / 32, 16] bytes of blocks (32 FP4 values in 16 bytes) and
# [E, d_out, d_in / 32] E8M0 scales. Here E=4, d_out=64, d_in=96: 4*64*96 = 24,576 parameters.
MXFP4 = {
    "model.layers.0.mlp.experts.gate_up_proj_blocks": ("U8", [4, 64, 3, 16]),
    "model.layers.0.mlp.experts.gate_up_proj_scales": ("U8", [4, 64, 3]),
    "model.layers.0.mlp.experts.gate_up_proj_bias": ("BF16", [4, 64]),
}
# DeepSeek-V3 FP8: a 256 x 384 weight in F8_E4M3 with an F32 scale per 128 x 128 block (2 x 3).
FP8_BLOCK = {
    "model.layers.0.mlp.down_proj.weight": ("F8_E4M3", [256, 384]),
    "model.layers.0.mlp.down_proj.weight_scale_inv": ("F32", [2, 3]),
    "model.norm.weight": ("BF16", [384]),
}
# GPTQ 4-bit, group 128 (AutoGPTQ QuantLinear): in=256, out=64. qweight [in/8, out] int32,
# qzeros [in/128, out/8] int32, scales [in/128, out] fp16, g_idx [in] int32.
GPTQ_4BIT = {
    "model.layers.0.self_attn.q_proj.qweight": ("I32", [32, 64]),
    "model.layers.0.self_attn.q_proj.qzeros": ("I32", [2, 8]),
    "model.layers.0.self_attn.q_proj.scales": ("F16", [2, 64]),
    "model.layers.0.self_attn.q_proj.g_idx": ("I32", [256]),
}
# GPTQ 8-bit: four values per int32, so qweight has in/4 rows; g_idx still has one entry per input.
GPTQ_8BIT = {
    "model.layers.0.self_attn.q_proj.qweight": ("I32", [64, 64]),
    "model.layers.0.self_attn.q_proj.qzeros": ("I32", [2, 16]),
    "model.layers.0.self_attn.q_proj.scales": ("F16", [2, 64]),
    "model.layers.0.self_attn.q_proj.g_idx": ("I32", [256]),
}
# AWQ (AutoAWQ WQLinear_GEMM): qweight [in, out/8] int32, no g_idx. in=256, out=64.
AWQ = {
    "model.layers.0.mlp.up_proj.qweight": ("I32", [256, 8]),
    "model.layers.0.mlp.up_proj.qzeros": ("I32", [2, 8]),
    "model.layers.0.mlp.up_proj.scales": ("F16", [2, 64]),
}
# bitsandbytes NF4 with double quantisation (Params4bit, blocksize 64): a 64 x 128 weight is 4096
# bytes of packed pairs stored [4096, 1]; 128 absmax codes (U8), 256-entry nested code table, etc.
BNB_NF4 = {
    "model.layers.0.mlp.gate_proj.weight": ("U8", [4096, 1]),
    "model.layers.0.mlp.gate_proj.weight.absmax": ("U8", [128]),
    "model.layers.0.mlp.gate_proj.weight.quant_map": ("F32", [16]),
    "model.layers.0.mlp.gate_proj.weight.nested_absmax": ("F32", [1]),
    "model.layers.0.mlp.gate_proj.weight.nested_quant_map": ("F32", [256]),
    "model.layers.0.mlp.gate_proj.weight.quant_state.bitsandbytes__nf4": ("U8", [95]),
    "model.layers.0.post_attention_layernorm.weight": ("F16", [128]),
}
# ModelOpt NVFP4: a 64 x 128 weight as [64, 64] bytes, F8_E4M3 scales per 16 values, F32 global scales.
NVFP4 = {
    "model.layers.0.mlp.up_proj.weight": ("U8", [64, 64]),
    "model.layers.0.mlp.up_proj.weight_scale": ("F8_E4M3", [64, 8]),
    "model.layers.0.mlp.up_proj.weight_scale_2": ("F32", []),
    "model.layers.0.mlp.up_proj.input_scale": ("F32", []),
}
# safetensors' own 4-bit dtype: F4 elements are counted directly, two per byte.
NATIVE_F4 = {"w": ("F4", [64, 32]), "w_scale": ("F8_E8M0", [64, 1])}

QUANTISED_CASES = {
    # name: (tensors, logical parameters, scheme)
    "mxfp4": (MXFP4, 4 * 64 * 96 + 4 * 64, ("mxfp4",)),
    "fp8-block": (FP8_BLOCK, 256 * 384 + 384, ("fp8-block",)),
    "gptq-4bit": (GPTQ_4BIT, 256 * 64, ("gptq",)),
    "gptq-8bit": (GPTQ_8BIT, 256 * 64, ("gptq",)),
    "awq": (AWQ, 256 * 64, ("awq",)),
    "bnb-nf4": (BNB_NF4, 64 * 128 + 128, ("bnb-4bit",)),
    "nvfp4": (NVFP4, 64 * 128, ("nvfp4",)),
    "native-f4": (NATIVE_F4, 64 * 32 + 64, ()),
}


@pytest.mark.parametrize(("tensors", "logical", "schemes"), QUANTISED_CASES.values(), ids=QUANTISED_CASES.keys())
def test_quantised_logical_params_and_exact_bytes(tmp_path, tensors, logical, schemes):
    write_safetensors(tmp_path / "model.safetensors", tensors)
    checkpoint = read_checkpoint(tmp_path / "model.safetensors")
    assert checkpoint.logical_params == logical
    assert checkpoint.stored_bytes == checkpoint.total_bytes == sum(
        math.prod(shape) * BITS[dtype] // 8 for dtype, shape in tensors.values())
    assert checkpoint.total_params == sum(math.prod(shape) for _, shape in tensors.values())
    assert checkpoint.quantization_schemes() == schemes


@pytest.mark.parametrize(("tensors", "expected"), [
    (MXFP4, {"parameter": 4 * 64 * 3 * 16 + 4 * 64 * 2, "scale": 4 * 64 * 3}),
    (FP8_BLOCK, {"parameter": 256 * 384 + 384 * 2, "scale": 6 * 4}),
    (GPTQ_4BIT, {"parameter": 32 * 64 * 4, "zero_point": 16 * 4, "scale": 2 * 64 * 2, "group_index": 256 * 4}),
    (BNB_NF4, {"parameter": 4096 + 128 * 2, "scale": 128 + 4, "quant_state": 16 * 4 + 256 * 4 + 95}),
], ids=["mxfp4", "fp8-block", "gptq", "bnb-nf4"])
def test_bytes_by_role(tmp_path, tensors, expected):
    write_safetensors(tmp_path / "q.safetensors", tensors)
    assert read_checkpoint(tmp_path / "q.safetensors").bytes_by_role() == expected


def test_uint8_weight_without_companions_is_one_value_per_byte(tmp_path):
    write_safetensors(tmp_path / "u8.safetensors", {"model.layers.0.mlp.up_proj.weight": ("U8", [16, 8])})
    assert read_checkpoint(tmp_path / "u8.safetensors").logical_params == 128


# --- Parts: language model, vision tower, projector, MTP layers --------------------------------------


@pytest.mark.parametrize(("name", "num_layers", "part"), [
    ("model.layers.0.self_attn.q_proj.weight", 61, ModelPart.LANGUAGE_MODEL),
    ("model.layers.60.mlp.experts.0.up_proj.weight", 61, ModelPart.LANGUAGE_MODEL),
    ("model.layers.61.eh_proj.weight", 61, ModelPart.MTP),  # DeepSeek-V3's MTP module
    ("model.layers.61.eh_proj.weight", None, ModelPart.LANGUAGE_MODEL),
    ("mtp.layers.0.input_layernorm.weight", None, ModelPart.MTP),  # Qwen3-Next
    ("vision_tower.vision_model.encoder.layers.30.mlp.fc1.weight", 4, ModelPart.VISION),  # LLaVA
    ("model.vision_model.encoder.layers.0.self_attn.k_proj.weight", 4, ModelPart.VISION),
    ("visual.blocks.0.attn.qkv.weight", None, ModelPart.VISION),  # Qwen2-VL
    ("multi_modal_projector.linear_1.weight", None, ModelPart.PROJECTOR),
    ("model.mm_projector.0.weight", None, ModelPart.PROJECTOR),
    ("language_model.model.layers.3.mlp.down_proj.weight", 4, ModelPart.LANGUAGE_MODEL),
    ("lm_head.weight", 4, ModelPart.LANGUAGE_MODEL),
])
def test_part_of(name, num_layers, part):
    assert part_of(name, num_layers) is part


def test_split_by_part_sums_to_the_whole(tmp_path):
    tensors = {
        "model.embed_tokens.weight": ("BF16", [64, 8]),
        "model.layers.0.mlp.up_proj.weight": ("BF16", [16, 8]),
        "model.layers.1.mlp.up_proj.weight": ("BF16", [16, 8]),
        "model.layers.2.eh_proj.weight": ("BF16", [8, 16]),
        "vision_tower.blocks.0.weight": ("F32", [4, 4]),
        "multi_modal_projector.linear.weight": ("F32", [8, 4]),
    }
    write_safetensors(tmp_path / "mm.safetensors", tensors)
    checkpoint = read_checkpoint(tmp_path / "mm.safetensors")
    parts = checkpoint.split_by_part(num_hidden_layers=2)
    assert {part: piece.total_params for part, piece in parts.items()} == {
        ModelPart.LANGUAGE_MODEL: 512 + 128 + 128, ModelPart.MTP: 128, ModelPart.VISION: 16, ModelPart.PROJECTOR: 32}
    assert sum(piece.total_bytes for piece in parts.values()) == checkpoint.total_bytes
    assert all(isinstance(piece, CheckpointTensors) for piece in parts.values())


# --- Malformed files: one line naming the file and, where there is one, the tensor -------------------


def _entry(dtype: str, shape, offsets) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _raw_file(path: Path, header: dict | bytes, data_bytes: int) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_bytes))


MALFORMED = {
    # case: (file contents writer, text the message must contain)
    "shorter-than-8-bytes": (lambda path: path.write_bytes(b"\x10\x00\x00"), "8-byte"),
    "header-past-end": (lambda path: path.write_bytes(struct.pack("<Q", 500) + b'{"a": 1}'), "truncated"),
    "absurd-header-length": (lambda path: path.write_bytes(struct.pack("<Q", 2**40) + b"{}"), "exceeds"),
    "invalid-json": (lambda path: _raw_file(path, b'{"w": {"dtype": ', 0), "invalid safetensors header JSON"),
    "not-an-object": (lambda path: _raw_file(path, b"[1, 2]", 0), "expected a JSON object"),
    "missing-shape": (lambda path: _raw_file(path, {"w": {"dtype": "F32", "data_offsets": [0, 4]}}, 4),
                      "tensor w: missing shape"),
    "unknown-dtype": (lambda path: _raw_file(path, {"w": _entry("F12", [1], [0, 4])}, 4),
                      "tensor w: unknown dtype 'F12'"),
    "wrong-length": (lambda path: _raw_file(path, {"w": _entry("F32", [2, 3], [0, 20])}, 20),
                     "tensor w: F32 [2, 3] needs 24 bytes but data_offsets span 20"),
    "sub-byte-misaligned": (lambda path: _raw_file(path, {"w": _entry("F4", [3], [0, 2])}, 2),
                            "tensor w: 3 F4 values do not fill whole bytes"),
    "offsets-past-end": (lambda path: _raw_file(path, {"w": _entry("F32", [4], [0, 16])}, 8),
                         "tensor w: data ends at byte 16"),
    "absurd-shape": (lambda path: _raw_file(path, {"w": _entry("BF16", [2**40, 2**40], [0, 8])}, 8),
                     "tensor w: BF16 [1099511627776, 1099511627776] needs"),
    "negative-dimension": (lambda path: _raw_file(path, {"w": _entry("F32", [-1], [0, 4])}, 4),
                           "tensor w: shape [-1]"),
    "overlap": (lambda path: _raw_file(path, {"a": _entry("F32", [2], [0, 8]), "b": _entry("F32", [2], [4, 12])}, 12),
                "tensor b: data_offsets start 4 overlaps"),
    "gap": (lambda path: _raw_file(path, {"a": _entry("F32", [1], [0, 4]), "b": _entry("F32", [1], [8, 12])}, 12),
            "tensor b: data_offsets start 8 leaves a gap"),
    "trailing-bytes": (lambda path: _raw_file(path, {"a": _entry("F32", [1], [0, 4])}, 12), "8 bytes after the last"),
    "end-before-begin": (lambda path: _raw_file(path, {"a": _entry("F32", [0], [4, 0])}, 4), "before begin"),
}


@pytest.mark.parametrize(("write", "expected"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_file_is_one_line_input_error(tmp_path, write, expected):
    path = tmp_path / "bad.safetensors"
    write(path)
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(path)
    message = one_line_error(excinfo)
    assert message.startswith(str(path))
    assert expected in message


def test_truncated_file_written_by_the_package(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": np.zeros((64, 64), dtype=np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(path)
    assert "tensor w" in one_line_error(excinfo) and "past the end" in str(excinfo.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(tmp_path / "absent.safetensors")
    assert "cannot read" in one_line_error(excinfo)


def test_import_needs_neither_numpy_nor_safetensors():
    import subprocess
    import sys

    code = "import sys, memcalc.checkpoint; print([m for m in ('numpy', 'safetensors', 'torch') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
