"""Tensors of a safetensors checkpoint, read from its headers alone: no torch, no weights loaded.

The format (safetensors README, "Format"; ``safetensors/src/tensor.rs``): 8 bytes of little-endian
unsigned header length N, N bytes of UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin,
end]}, "__metadata__": {...}}``, then the byte buffer. Offsets are relative to the buffer, which the
tensors must cover without holes or overlaps. A tensor holds ``numel * bits(dtype) / 8`` bytes, and
sub-byte dtypes (F4, F6) must end on a byte boundary (``Metadata::validate``). Headers over 100 MB
are refused (``MAX_HEADER_SIZE``). The header is read with ``struct`` and ``json``: the safetensors
loader would map the whole file, which is what this module exists to avoid.

Sharded checkpoints keep ``model.safetensors.index.json`` with a ``weight_map`` from tensor name to
shard file (transformers ``modeling_utils``, ``SAFE_WEIGHTS_INDEX_NAME``).

Quantised checkpoints store a linear weight as several tensors; each tensor gets a ``TensorRole``
and the number of model parameters it stands for (``logical_params``), from its naming convention:

* gpt-oss MXFP4: ``*_blocks`` U8 (two FP4 values per byte) and ``*_scales`` U8 (one E8M0 scale per
  32 values) (transformers ``integrations/mxfp4.py``);
* FP8: ``weight`` F8_E4M3 with ``weight_scale_inv`` F32 per 128x128 block (DeepSeek-V3) or a
  per-tensor ``weight_scale`` (compressed-tensors, ModelOpt), plus activation ``input_scale``;
* GPTQ/AWQ: ``qweight`` I32 packing ``32 / bits`` values per word, ``qzeros``, ``scales``, ``g_idx``
  (AutoGPTQ ``QuantLinear``; AutoAWQ ``WQLinear``);
* bitsandbytes 4-bit: ``weight`` U8 (two values per byte) with ``weight.absmax``,
  ``weight.quant_map``, ``weight.nested_*`` and ``weight.quant_state.bitsandbytes__{nf4,fp4}``
  (bitsandbytes ``Params4bit``/``QuantState.as_dict``); 8-bit: ``weight`` I8 with ``SCB``;
* NVFP4 (ModelOpt): ``weight`` U8 (two FP4 values per byte) with an F8_E4M3 ``weight_scale``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from memcalc.errors import InputError

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"

# safetensors MAX_HEADER_SIZE (tensor.rs): larger headers are refused as corrupt.
MAX_HEADER_BYTES = 100_000_000
_HEADER_LENGTH = struct.Struct("<Q")

# Bits per element of every safetensors Dtype (tensor.rs, ``Dtype::bitsize``).
SAFETENSORS_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


class TensorRole(StrEnum):
    """What a stored tensor is to the model: parameters, or the bookkeeping of a quantised format."""

    PARAMETER = "parameter"  # weights, biases, norms, embeddings; quantised data (packed or not)
    SCALE = "scale"  # quantisation scales and absmax values
    ZERO_POINT = "zero_point"  # GPTQ/AWQ qzeros
    GROUP_INDEX = "group_index"  # GPTQ g_idx (the group of each input channel)
    QUANT_STATE = "quant_state"  # bitsandbytes code tables and serialised quantisation state


class ModelPart(StrEnum):
    """Parts of a checkpoint that an engine may load, skip or place apart from the decoder."""

    LANGUAGE_MODEL = "language_model"
    VISION = "vision"  # vision encoder
    PROJECTOR = "projector"  # multimodal projector from the vision encoder into the decoder
    MTP = "mtp"  # multi-token-prediction layers (DeepSeek-V3, GLM-4.5, MiMo, Qwen3-Next)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint. ``numel``: elements as stored (packed words count once);
    ``nbytes``: bytes in the file; ``logical_params``: parameters of the unquantised model it
    stands for (0 for scales, zero points, indices and quantisation state)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    role: TensorRole = TensorRole.PARAMETER
    logical_params: int = 0
    file: str = ""


@dataclass(frozen=True)
class CheckpointTensors:
    """The tensors of a checkpoint (one file, or every shard of an index), in file order."""

    tensors: tuple[TensorEntry, ...]
    files: tuple[str, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()  # the ``__metadata__`` of the first file

    @property
    def total_params(self) -> int:
        """Elements as stored, summed over every tensor (a packed int32 word counts once)."""
        return sum(tensor.numel for tensor in self.tensors)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data, exactly as stored (headers excluded)."""
        return sum(tensor.nbytes for tensor in self.tensors)

    @property
    def stored_bytes(self) -> int:
        """The same exact figure as ``total_bytes``: what loading every tensor as stored costs."""
        return self.total_bytes

    @property
    def logical_params(self) -> int:
        """Parameters of the unquantised model these tensors represent."""
        return sum(tensor.logical_params for tensor in self.tensors)

    def bytes_by_dtype(self) -> dict[str, int]:
        return _sum_by(self.tensors, lambda tensor: tensor.dtype)

    def bytes_by_role(self) -> dict[str, int]:
        return _sum_by(self.tensors, lambda tensor: tensor.role.value)

    def quantization_schemes(self) -> tuple[str, ...]:
        """The quantised formats recognised from tensor names, sorted (empty: none)."""
        names = frozenset(tensor.name for tensor in self.tensors)
        return tuple(sorted({scheme for tensor in self.tensors if (scheme := _scheme_of(tensor, names))}))

    def split_by_part(self, num_hidden_layers: int | None = None) -> dict[ModelPart, CheckpointTensors]:
        """Tensors grouped by ``ModelPart`` (parts without tensors are left out). Decoder layers
        numbered ``num_hidden_layers`` or above are multi-token-prediction layers, as DeepSeek-V3
        stores them (``model.layers.61`` of a 61-layer model); None: no layer counts as MTP."""
        groups: dict[ModelPart, list[TensorEntry]] = {}
        for tensor in self.tensors:
            groups.setdefault(part_of(tensor.name, num_hidden_layers), []).append(tensor)
        return {part: CheckpointTensors(tuple(items), self.files, self.metadata) for part, items in groups.items()}


def _sum_by(tensors: Iterable[TensorEntry], key: Callable[[TensorEntry], str]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for tensor in tensors:
        totals[key(tensor)] = totals.get(key(tensor), 0) + tensor.nbytes
    return totals


# --- Parts of a multimodal or MTP checkpoint --------------------------------------------------------

_VISION_COMPONENTS = frozenset({"vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder"})
_PROJECTOR_COMPONENTS = frozenset({"multi_modal_projector", "mm_projector", "vision_projector", "merger_projector"})
_VISION_MERGERS = frozenset({"merger", "deepstack_merger_list"})  # Qwen-VL's projector, inside ``visual``
_LAYER_NUMBER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def part_of(name: str, num_hidden_layers: int | None = None) -> ModelPart:
    """The ``ModelPart`` of a tensor, from the naming of transformers' multimodal models (LLaVA,
    Gemma-3, Qwen2-VL, Llama-4: ``vision_tower``/``vision_model``/``visual``, ``multi_modal_projector``/
    ``mm_projector``) and of MTP layers (a ``mtp`` component, or a layer index past the decoder)."""
    components = name.split(".")
    if _PROJECTOR_COMPONENTS.intersection(components) or (
            _VISION_COMPONENTS.intersection(components) and _VISION_MERGERS.intersection(components)):
        return ModelPart.PROJECTOR
    if _VISION_COMPONENTS.intersection(components):
        return ModelPart.VISION
    if "mtp" in components:
        return ModelPart.MTP
    match = _LAYER_NUMBER.search(name)
    if num_hidden_layers is not None and match and int(match.group(1)) >= num_hidden_layers:
        return ModelPart.MTP
    return ModelPart.LANGUAGE_MODEL


# --- Reading headers ------------------------------------------------------------------------------


def read_checkpoint(path: Path | str) -> CheckpointTensors:
    """A ``.safetensors`` file, a ``model.safetensors.index.json``, or a directory holding either."""
    path = Path(path)
    if path.is_dir():
        if (path / INDEX_FILE_NAME).is_file():
            return read_sharded_checkpoint(path / INDEX_FILE_NAME)
        if (path / SINGLE_FILE_NAME).is_file():
            path = path / SINGLE_FILE_NAME
        else:
            raise InputError(f"{path}: no {SINGLE_FILE_NAME} or {INDEX_FILE_NAME} in this directory")
    if path.name.endswith(".index.json"):
        return read_sharded_checkpoint(path)
    header, data_bytes = read_safetensors_header(path)
    return checkpoint_from_headers([(str(path), header, data_bytes)])


def read_sharded_checkpoint(index_path: Path) -> CheckpointTensors:
    """Every shard named by an index's ``weight_map``, in the order they first appear; a shard that
    is missing, or lacks a tensor the map puts in it, is an error naming it."""
    weight_map = read_weight_map(index_path)
    shards = list(dict.fromkeys(weight_map.values()))
    headers = []
    for shard in shards:
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise InputError(f"{index_path}: shard {shard} listed in weight_map is missing ({shard_path})")
        header, data_bytes = read_safetensors_header(shard_path)
        headers.append((str(shard_path), header, data_bytes))
    for name, shard in weight_map.items():
        if name not in headers[shards.index(shard)][1]:
            raise InputError(f"{index_path}: tensor {name} is mapped to {shard}, whose header lacks it")
    return checkpoint_from_headers(headers)


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json``: tensor name -> shard file name."""
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{index_path}: cannot read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{index_path}: invalid JSON: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_path}: expected a non-empty 'weight_map' object")
    bad = next((name for name, shard in weight_map.items() if not isinstance(shard, str) or "/" in shard
                or shard.startswith(".")), None)
    if bad is not None:
        raise InputError(f"{index_path}: tensor {bad}: shard {weight_map[bad]!r} is not a file name beside the index")
    return weight_map


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The parsed JSON header of one file and the size in bytes of its data buffer."""
    try:
        with open(path, "rb") as file:
            file_bytes = os.fstat(file.fileno()).st_size
            prefix = file.read(_HEADER_LENGTH.size)
            if len(prefix) < _HEADER_LENGTH.size:
                raise InputError(f"{path}: not a safetensors file: {file_bytes} bytes, shorter than the 8-byte "
                                 "header length")
            (header_bytes,) = _HEADER_LENGTH.unpack(prefix)
            if header_bytes > MAX_HEADER_BYTES:
                raise InputError(f"{path}: header length {header_bytes} bytes exceeds safetensors' limit of "
                                 f"{MAX_HEADER_BYTES} (corrupt file?)")
            raw = file.read(header_bytes)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) < header_bytes:
        raise InputError(f"{path}: truncated: header of {header_bytes} bytes but the file has {file_bytes}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: invalid safetensors header JSON: {_one_line(exc)}") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is {type(header).__name__}, expected a JSON object")
    return header, file_bytes - _HEADER_LENGTH.size - header_bytes


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


# --- Validation and classification ------------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    begin: int
    file: str


def checkpoint_from_headers(headers: Iterable[tuple[str, Mapping[str, Any], int | None]]) -> CheckpointTensors:
    """Validate headers (``(file, header, data_bytes)``; ``data_bytes`` None when the buffer size is
    unknown, as for headers fetched from the Hub) and classify their tensors."""
    stored: list[_Stored] = []
    files: list[str] = []
    metadata: tuple[tuple[str, str], ...] = ()
    seen: dict[str, str] = {}
    for file, header, data_bytes in headers:
        files.append(file)
        tensors = _validated_tensors(file, header, data_bytes)
        for tensor in tensors:
            if tensor.name in seen:
                raise InputError(f"{file}: tensor {tensor.name} also appears in {seen[tensor.name]}")
            seen[tensor.name] = file
        stored.extend(tensors)
        if not metadata and isinstance(header.get("__metadata__"), dict):
            metadata = tuple(sorted((str(key), str(value)) for key, value in header["__metadata__"].items()))
    return CheckpointTensors(_classify(stored), tuple(files), metadata)


def _validated_tensors(file: str, header: Mapping[str, Any], data_bytes: int | None) -> list[_Stored]:
    tensors = [_validated_entry(file, name, entry) for name, entry in header.items() if name != "__metadata__"]
    tensors.sort(key=lambda tensor: (tensor.begin, tensor.begin + tensor.nbytes))
    # The buffer is covered without holes or overlaps (the README's rule against polyglot files).
    expected_begin = 0
    for tensor in tensors:
        if tensor.begin != expected_begin:
            problem = "overlaps the previous tensor" if tensor.begin < expected_begin else "leaves a gap before it"
            raise InputError(f"{file}: tensor {tensor.name}: data_offsets start {tensor.begin} {problem} "
                             f"(expected {expected_begin})")
        expected_begin += tensor.nbytes
    if data_bytes is not None and expected_begin > data_bytes:
        last = tensors[-1]
        raise InputError(f"{file}: tensor {last.name}: data ends at byte {expected_begin} of the buffer, past the "
                         f"end of the file ({data_bytes} bytes after the header; truncated?)")
    if data_bytes is not None and expected_begin < data_bytes:
        raise InputError(f"{file}: {data_bytes - expected_begin} bytes after the last tensor are not covered by "
                         "the header")
    return tensors


def _validated_entry(file: str, name: str, entry: Any) -> _Stored:
    where = f"{file}: tensor {name}"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected an object with dtype, shape and data_offsets")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise InputError(f"{where}: missing {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPE_BITS:
        raise InputError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPE_BITS)})")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(value) for value in offsets)):
        raise InputError(f"{where}: data_offsets {offsets!r} is not [begin, end] in bytes")
    begin, end = offsets
    if end < begin:
        raise InputError(f"{where}: data_offsets end {end} is before begin {begin}")
    numel = math.prod(shape)
    bits = numel * SAFETENSORS_DTYPE_BITS[dtype]
    if bits % 8:
        raise InputError(f"{where}: {numel} {dtype} values do not fill whole bytes ({bits} bits)")
    if end - begin != bits // 8:
        raise InputError(f"{where}: {dtype} {shape} needs {bits // 8} bytes but data_offsets span {end - begin}")
    return _Stored(name, dtype, tuple(shape), numel, bits // 8, begin, file)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# Suffixes of quantisation bookkeeping tensors, longest first so ``weight_scale_2`` wins over ``scale``.
_AUXILIARY_SUFFIXES: tuple[tuple[str, TensorRole], ...] = (
    (".weight_scale_inv", TensorRole.SCALE),
    (".weight_scale_2", TensorRole.SCALE),
    (".weight_scale", TensorRole.SCALE),
    (".weight_zero_point", TensorRole.ZERO_POINT),
    (".input_scale", TensorRole.SCALE),
    (".k_scale", TensorRole.SCALE),
    (".v_scale", TensorRole.SCALE),
    (".qzeros", TensorRole.ZERO_POINT),
    (".g_idx", TensorRole.GROUP_INDEX),
    (".SCB", TensorRole.SCALE),
    (".weight_format", TensorRole.QUANT_STATE),
)
_BNB_STATE_PARTS: dict[str, TensorRole] = {
    "absmax": TensorRole.SCALE,
    "nested_absmax": TensorRole.SCALE,
    "quant_map": TensorRole.QUANT_STATE,
    "nested_quant_map": TensorRole.QUANT_STATE,
}


@dataclass(frozen=True)
class _Neighbours:
    """The other tensors of a checkpoint, which decide what a quantised tensor is."""

    by_name: Mapping[str, _Stored]
    quant_state_owners: frozenset[str]  # bitsandbytes weights with a ``.quant_state.*`` tensor


def _classify(stored: list[_Stored]) -> tuple[TensorEntry, ...]:
    owners = frozenset(tensor.name.partition(".quant_state.")[0] for tensor in stored if ".quant_state." in tensor.name)
    neighbours = _Neighbours({tensor.name: tensor for tensor in stored}, owners)
    return tuple(_entry(tensor, neighbours) for tensor in stored)


def _entry(tensor: _Stored, neighbours: _Neighbours) -> TensorEntry:
    role, logical = _role_and_logical_params(tensor, neighbours)
    return TensorEntry(tensor.name, tensor.dtype, tensor.shape, tensor.numel, tensor.nbytes, role, logical, tensor.file)


def _role_and_logical_params(tensor: _Stored, neighbours: _Neighbours) -> tuple[TensorRole, int]:
    name, by_name = tensor.name, neighbours.by_name
    bnb_role = _bitsandbytes_state_role(name, by_name)
    if bnb_role is not None:
        return bnb_role, 0
    for suffix, role in _AUXILIARY_SUFFIXES:
        if name.endswith(suffix):
            return role, 0
    if name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" in by_name:
        return TensorRole.SCALE, 0  # MXFP4 E8M0 scales, one per block of 32
    if name.endswith(".scales") and name.removesuffix(".scales") + ".qweight" in by_name:
        return TensorRole.SCALE, 0  # GPTQ/AWQ group scales
    if name.endswith("_blocks") and tensor.dtype == "U8" and name.removesuffix("_blocks") + "_scales" in by_name:
        return TensorRole.PARAMETER, 2 * tensor.numel  # MXFP4: two FP4 values per byte
    if name.endswith(".qweight") and tensor.dtype in ("I32", "U32"):
        return TensorRole.PARAMETER, tensor.numel * 32 // _gptq_bits(tensor, by_name)
    if _is_packed_fp4_weight(tensor, neighbours):
        return TensorRole.PARAMETER, 2 * tensor.numel
    return TensorRole.PARAMETER, tensor.numel


def _bitsandbytes_state_role(name: str, by_name: Mapping[str, _Stored]) -> TensorRole | None:
    """``<weight>.absmax`` and friends of a bitsandbytes 4-bit ``<weight>`` (``QuantState.as_dict``)."""
    if ".quant_state." in name:
        return TensorRole.QUANT_STATE
    owner, _, part = name.rpartition(".")
    if owner.endswith(".weight") and owner in by_name:
        return _BNB_STATE_PARTS.get(part)
    return None


def _is_packed_fp4_weight(tensor: _Stored, neighbours: _Neighbours) -> bool:
    """A U8 ``weight`` that holds two 4-bit values per byte: bitsandbytes 4-bit (an absmax or a
    quant_state beside it) or NVFP4 (an F8_E4M3 ``weight_scale`` beside it)."""
    if tensor.dtype != "U8" or not tensor.name.endswith(".weight"):
        return False
    if tensor.name + ".absmax" in neighbours.by_name or tensor.name in neighbours.quant_state_owners:
        return True
    scale = neighbours.by_name.get(tensor.name + "_scale")
    return scale is not None and scale.dtype == "F8_E4M3"


def _gptq_bits(qweight: _Stored, by_name: Mapping[str, _Stored]) -> int:
    """Bits per packed value. GPTQ's ``g_idx`` has one entry per input channel and ``qweight`` has
    ``in_features * bits / 32`` rows, so the two give the bits; without ``g_idx`` (AWQ), 4."""
    g_idx = by_name.get(qweight.name.removesuffix(".qweight") + ".g_idx")
    if g_idx is not None and len(g_idx.shape) == 1 and qweight.shape and g_idx.shape[0]:
        bits, remainder = divmod(32 * qweight.shape[0], g_idx.shape[0])
        if not remainder and bits in (2, 3, 4, 8):
            return bits
    return 4


def _scheme_of(tensor: TensorEntry, names: frozenset[str]) -> str | None:
    name = tensor.name
    if name.endswith("_blocks") and tensor.logical_params == 2 * tensor.numel and tensor.dtype == "U8":
        return "mxfp4"
    if name.endswith(".qweight"):
        return "gptq" if name.removesuffix(".qweight") + ".g_idx" in names else "awq"
    if name.endswith(".weight") and tensor.dtype == "U8" and tensor.logical_params == 2 * tensor.numel:
        return "bnb-4bit" if name + ".absmax" in names else "nvfp4"
    if name.endswith(".weight") and tensor.dtype == "I8" and name.removesuffix(".weight") + ".SCB" in names:
        return "bnb-int8"
    if name.endswith(".weight") and tensor.dtype in ("F8_E4M3", "F8_E5M2"):
        return "fp8-block" if name + "_scale_inv" in names else "fp8"
    return None
