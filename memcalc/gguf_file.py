"""A ``.gguf`` file's architecture fields and tensors, read with the ``gguf`` package (imported here
only, inside functions): the header, key-value metadata and tensor infos; the weights stay on disk.

Layout (ggml ``docs/gguf.md``): magic ``GGUF``, version, tensor count, KV count, the KV pairs
(``general.architecture``, ``{arch}.block_count``, ``{arch}.attention.head_count_kv``, ...), the
tensor infos (name, dimensions ``ne[0..n)`` with ``ne[0]`` the contiguous one, ggml type, offset),
padding to ``general.alignment``, then the data. A tensor of a block type stores
``numel / block_size * type_size`` bytes (``GGML_QUANT_SIZES``; Q8_0: 34 bytes per 32 values);
``gguf.GGUFReader`` computes that as ``ReaderTensor.n_bytes``.

``GGUFReader`` maps the file and raises whatever its parsing meets (``ValueError`` for a bad magic,
``IndexError`` when a read runs past the end, ``KeyError`` for a duplicate key, numpy's reshape
``ValueError`` for data cut short): ``read_gguf`` turns all of them into one ``InputError`` line.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memcalc.errors import InputError

GGUF_MAGIC = b"GGUF"
_COUNTS = struct.Struct("<4sIQQ")  # magic, version, tensor count, KV count (gguf.md, "File Structure")
# The smallest KV pair (empty key, type, one byte) and tensor info (empty name, 1 dim, type, offset).
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8

# The ``{arch}.*`` keys memcalc reads (gguf.md, "Standardized key-value pairs" > LLM).
ARCH_KEYS = (
    "block_count", "embedding_length", "feed_forward_length", "context_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.sliding_window", "attention.sliding_window_pattern",
    "expert_count", "expert_used_count", "expert_feed_forward_length", "expert_shared_feed_forward_length",
    "expert_shared_count", "leading_dense_block_count",
)
GENERAL_KEYS = ("general.architecture", "general.name", "general.file_type", "general.alignment")
TOKEN_LIST_KEY = "tokenizer.ggml.tokens"

# Decoder blocks memcalc models, by ``general.architecture`` (llama.cpp ``llama-arch.cpp``): what the
# file does not say. Mistral and Mixtral convert to ``llama``. Gemma-2 alternates sliding and global
# layers (every 2nd global), Gemma-3 has five sliding layers per global one (transformers
# ``Gemma2Config``/``Gemma3TextConfig``; llama.cpp ``set_swa_pattern``).
_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {"hidden_act": "silu"},
    "mistral": {"hidden_act": "silu"},
    "qwen2": {"hidden_act": "silu"},
    "qwen2moe": {"hidden_act": "silu"},
    "qwen3": {"hidden_act": "silu"},
    "qwen3moe": {"hidden_act": "silu"},
    "phi3": {"hidden_act": "silu"},
    "gemma": {"hidden_act": "gelu_tanh"},
    "gemma2": {"hidden_act": "gelu_tanh", "sliding_window_pattern": 2},
    "gemma3": {"hidden_act": "gelu_tanh", "sliding_window_pattern": 6},
}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)
_REQUIRED_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                    "max_position_embeddings")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor info. ``shape`` in ggml order (``ne[0]`` first: a matrix is ``[d_in, d_out]``);
    ``nbytes``: exact bytes of its data on disk."""

    name: str
    type_name: str  # ggml type: F32, F16, BF16, Q8_0, Q4_K, ...
    shape: tuple[int, ...]
    numel: int
    nbytes: int


@dataclass(frozen=True)
class GGUFModelFields:
    """``ModelConfig`` keyword arguments derived from a GGUF file (``fields``, with name, source and
    notes), the required ones it could not derive (``missing``), and whether memcalc knows the block
    layout of its architecture. Usable as ``ModelConfig`` input only when ``complete``."""

    fields: dict[str, Any]
    missing: tuple[str, ...]
    notes: tuple[str, ...]
    architecture_supported: bool

    @property
    def complete(self) -> bool:
        return self.architecture_supported and not self.missing


@dataclass(frozen=True)
class GGUFModel:
    """What memcalc reads from a ``.gguf``: the architecture, its KV fields (full keys; per-layer
    arrays kept as lists), the vocabulary size and every tensor."""

    path: str
    architecture: str
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]
    vocab_size: int | None = None  # ``{arch}.vocab_size``, else the token list's length
    version: int = 3

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or Path(self.path).stem)

    @property
    def file_type(self) -> int | None:
        """``general.file_type``: llama.cpp's ``llama_ftype`` (15 = MOSTLY_Q4_K_M)."""
        value = self.metadata.get("general.file_type")
        return int(value) if value is not None else None

    @property
    def file_type_name(self) -> str | None:
        if self.file_type is None:
            return None
        from gguf import LlamaFileType

        try:
            return LlamaFileType(self.file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            return f"unknown ({self.file_type})"

    def arch_value(self, key: str) -> Any:
        """The value of ``{architecture}.{key}``, None when absent."""
        return self.metadata.get(f"{self.architecture}.{key}")

    @property
    def total_params(self) -> int:
        return sum(tensor.numel for tensor in self.tensors)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data on disk (header, metadata and alignment padding excluded)."""
        return sum(tensor.nbytes for tensor in self.tensors)

    def bytes_by_type(self) -> dict[str, int]:
        return _sum_by_type(self.tensors, lambda tensor: tensor.nbytes)

    def params_by_type(self) -> dict[str, int]:
        return _sum_by_type(self.tensors, lambda tensor: tensor.numel)

    @property
    def bits_per_weight(self) -> float:
        """Average stored bits per element over every tensor (llama.cpp prints the same "BPW")."""
        return 8 * self.total_bytes / self.total_params if self.total_params else 0.0

    def model_fields(self) -> GGUFModelFields:
        return derive_model_fields(self)


def _sum_by_type(tensors: tuple[GGUFTensor, ...], value: Callable[[GGUFTensor], int]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for tensor in tensors:
        totals[tensor.type_name] = totals.get(tensor.type_name, 0) + value(tensor)
    return totals


# --- Reading --------------------------------------------------------------------------------------


def read_gguf(path: Path | str) -> GGUFModel:
    """Header, KV fields and tensor infos of a ``.gguf`` file; weights are not read."""
    path = Path(path)
    file_bytes = _check_preamble(path)
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
        model = _model_from_reader(path, reader)
    except InputError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, struct.error) as exc:
        # ValueError covers numpy's reshape of data cut short and UnicodeDecodeError.
        raise InputError(f"{path}: corrupt or truncated GGUF file ({type(exc).__name__}: {_one_line(exc)})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    _check_tensor_data(path, reader, file_bytes)
    return model


def _check_preamble(path: Path) -> int:
    """The magic, and counts the file could hold (a corrupt count would make the reader loop)."""
    try:
        with open(path, "rb") as file:
            preamble = file.read(_COUNTS.size)
            file.seek(0, 2)
            file_bytes = file.tell()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if preamble[:4] != GGUF_MAGIC:
        raise InputError(f"{path}: not a GGUF file (magic {preamble[:4]!r}, expected {GGUF_MAGIC!r})")
    if len(preamble) < _COUNTS.size:
        raise InputError(f"{path}: truncated GGUF file: {file_bytes} bytes, shorter than its "
                         f"{_COUNTS.size}-byte header")
    _, _, tensor_count, kv_count = _COUNTS.unpack(preamble)
    if kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES > file_bytes:
        raise InputError(f"{path}: corrupt or truncated GGUF file: its header announces {kv_count} KV pairs and "
                         f"{tensor_count} tensors, more than {file_bytes} bytes can hold")
    return file_bytes


def _check_tensor_data(path: Path, reader: Any, file_bytes: int) -> None:
    """Every tensor's data inside the file. The reader fails first today (it reshapes each tensor's
    view), but that is a side effect of its implementation, not a check it promises."""
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > file_bytes:
            raise InputError(f"{path}: tensor {tensor.name}: data ends at byte {end}, past the end of the file "
                             f"({file_bytes} bytes; truncated?)")


def _model_from_reader(path: Path, reader: Any) -> GGUFModel:
    architecture = _field_value(reader.fields.get("general.architecture"))
    if not isinstance(architecture, str) or not architecture:
        raise InputError(f"{path}: GGUF file has no general.architecture")
    keys = [*GENERAL_KEYS, *(f"{architecture}.{key}" for key in ARCH_KEYS)]
    metadata = {key: _field_value(reader.fields[key]) for key in keys if key in reader.fields}
    tensors = tuple(
        GGUFTensor(str(tensor.name), tensor.tensor_type.name, tuple(int(dim) for dim in tensor.shape),
                   int(tensor.n_elements), int(tensor.n_bytes))
        for tensor in reader.tensors
    )
    version = _field_value(reader.fields.get("GGUF.version"))
    return GGUFModel(str(path), architecture, metadata, tensors, _vocab_size(metadata, architecture, reader, tensors),
                     int(version) if version is not None else 3)


def _field_value(reader_field: Any) -> Any:
    """A KV value as Python (str, int, float, bool, or a list of them), from the reader's raw parts;
    this works on gguf releases that predate ``ReaderField.contents``."""
    if reader_field is None:
        return None
    from gguf import GGUFValueType

    types, parts, data = reader_field.types, reader_field.parts, reader_field.data
    if types[0] == GGUFValueType.ARRAY:
        if types[-1] == GGUFValueType.STRING:
            return [bytes(parts[index]).decode("utf-8") for index in data]
        return [parts[index].tolist()[0] for index in data]
    if types[0] == GGUFValueType.STRING:
        return bytes(parts[data[0]]).decode("utf-8")
    return parts[data[0]].tolist()[0]


def _vocab_size(metadata: dict[str, Any], architecture: str, reader: Any,
                tensors: tuple[GGUFTensor, ...]) -> int | None:
    value = metadata.get(f"{architecture}.vocab_size")
    if isinstance(value, int):
        return value
    tokens = reader.fields.get(TOKEN_LIST_KEY)
    if tokens is not None:
        return len(tokens.data)  # the count alone: the token strings are not decoded
    embedding = next((tensor for tensor in tensors if tensor.name == "token_embd.weight"), None)
    return embedding.shape[1] if embedding is not None and len(embedding.shape) == 2 else None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- ModelConfig fields ---------------------------------------------------------------------------


@dataclass
class _Derivation:
    fields: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def derive_model_fields(model: GGUFModel) -> GGUFModelFields:
    """``ModelConfig`` keywords from the KV fields and the tensor names of block 0 (biases, q/k norms,
    sandwich norms); ``tie_word_embeddings`` is true when there is no ``output.weight``."""
    arch = model.architecture
    supported = arch in _ARCHITECTURES
    result = _Derivation()
    result.fields.update(name=model.name, source=model.path, **_ARCHITECTURES.get(arch, {}))
    if not supported:
        result.notes.append(f"architecture {arch!r} is not one memcalc models from GGUF "
                            f"({', '.join(SUPPORTED_ARCHITECTURES)})")
    _put_int(result, "hidden_size", model.arch_value("embedding_length"), "embedding_length")
    _put_int(result, "num_layers", model.arch_value("block_count"), "block_count")
    _put_int(result, "num_attention_heads", model.arch_value("attention.head_count"), "attention.head_count")
    _put_int(result, "num_kv_heads", model.arch_value("attention.head_count_kv"), "attention.head_count_kv",
             required=False)
    _put_int(result, "intermediate_size", model.arch_value("feed_forward_length"), "feed_forward_length")
    _put_int(result, "max_position_embeddings", model.arch_value("context_length"), "context_length")
    _put_int(result, "vocab_size", model.vocab_size, "vocab_size")
    _put_head_dim(result, model)
    _put_block_layout(result, model)
    _put_sliding_window(result, model)
    _put_moe(result, model)
    result.fields["notes"] = tuple(result.notes)
    return GGUFModelFields(result.fields, tuple(result.missing), tuple(result.notes), supported)


def _uniform(value: Any) -> Any:
    """A per-layer array whose entries are all equal, as one value; other values unchanged."""
    if isinstance(value, list) and value and all(item == value[0] for item in value):
        return value[0]
    return value


def _put_int(result: _Derivation, name: str, value: Any, key: str, required: bool = True) -> None:
    value = _uniform(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        result.fields[name] = value
        return
    if isinstance(value, list):
        result.notes.append(f"{key} varies per layer ({_brief(value)}): memcalc needs one value for {name}")
        result.missing.append(name)
    elif value is not None:
        result.notes.append(f"{key} is {value!r}, not a positive integer")
        result.missing.append(name)
    elif required:
        result.missing.append(name)


def _brief(values: list[Any]) -> str:
    return ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")


def _put_head_dim(result: _Derivation, model: GGUFModel) -> None:
    key_length, value_length = model.arch_value("attention.key_length"), model.arch_value("attention.value_length")
    if key_length is None:
        return  # ModelConfig's default: hidden_size / num_attention_heads
    _put_int(result, "head_dim", key_length, "attention.key_length", required=False)
    if value_length is not None and value_length != key_length:
        result.notes.append(f"attention.value_length {value_length} differs from key_length {key_length}: "
                            "head_dim uses key_length")


def _tensor_names(model: GGUFModel) -> frozenset[str]:
    return frozenset(tensor.name for tensor in model.tensors)


def _put_block_layout(result: _Derivation, model: GGUFModel) -> None:
    """What block 0's tensors show (llama.cpp tensor names, ``LLM_TENSOR_NAMES``)."""
    names = _tensor_names(model)

    def has(suffix: str) -> bool:
        return f"blk.0.{suffix}" in names

    result.fields["tie_word_embeddings"] = "output.weight" not in names
    if "output.weight" not in names:
        result.notes.append("no output.weight tensor: the output head is tied to token_embd")
    result.fields["qkv_bias"] = has("attn_q.bias") or has("attn_qkv.bias")
    result.fields["attn_output_bias"] = has("attn_output.bias")
    result.fields["mlp_bias"] = has("ffn_up.bias") or has("ffn_down.bias")
    result.fields["qk_norm"] = has("attn_q_norm.weight")
    norms = sum(has(f"{norm}.weight") for norm in ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm"))
    if norms:
        result.fields["norms_per_layer"] = norms


def _put_sliding_window(result: _Derivation, model: GGUFModel) -> None:
    window = model.arch_value("attention.sliding_window")
    if window is None:
        result.fields.pop("sliding_window_pattern", None)
        return
    _put_int(result, "sliding_window", window, "attention.sliding_window", required=False)
    pattern = model.arch_value("attention.sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 0:
        result.fields["sliding_window_pattern"] = pattern
    elif isinstance(pattern, list):
        period = _global_layer_period(pattern)
        if period is None:
            result.notes.append(f"attention.sliding_window_pattern ({_brief(pattern)}) is not one global layer "
                                "every n: treating every layer as sliding")
            result.fields.pop("sliding_window_pattern", None)
        else:
            result.fields["sliding_window_pattern"] = period


def _global_layer_period(is_sliding: list[Any]) -> int | None:
    """n when layer i slides exactly unless (i + 1) % n == 0 (memcalc's sliding_window_pattern);
    None for any other per-layer pattern (None also for all-sliding: no pattern)."""
    if all(is_sliding):
        return None
    period = [bool(item) for item in is_sliding].index(False) + 1
    expected = [(layer + 1) % period != 0 for layer in range(len(is_sliding))]
    return period if expected == [bool(item) for item in is_sliding] else None


def _put_moe(result: _Derivation, model: GGUFModel) -> None:
    experts = model.arch_value("expert_count")
    if not experts:
        return
    used = model.arch_value("expert_used_count")
    width = _uniform(model.arch_value("expert_feed_forward_length") or model.arch_value("feed_forward_length"))
    shared_width = model.arch_value("expert_shared_feed_forward_length")
    if used is None or not isinstance(width, int):
        result.missing.append("moe")
        result.notes.append("expert_count without expert_used_count or an expert width")
        return
    moe: dict[str, Any] = dict(num_experts=experts, experts_per_token=used, expert_intermediate_size=width,
                               first_dense_layers=model.arch_value("leading_dense_block_count") or 0)
    if shared_width:
        moe.update(num_shared_experts=1, shared_expert_intermediate_size=shared_width,
                   shared_expert_gate="blk.0.ffn_gate_inp_shexp.weight" in _tensor_names(model))
    result.fields["moe"] = moe
