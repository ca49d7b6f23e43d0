"""GGUF files written with ``gguf.GGUFWriter``, read back: KV fields, per-tensor bytes, ModelConfig.

Expected bytes come from the block layouts of ggml (``docs/gguf.md``; ``ggml-common.h``): Q8_0 stores
32 values as 32 int8 and an fp16 scale (34 bytes), Q4_0 as 16 bytes of nibbles and an fp16 scale
(18 bytes), F16 2 bytes a value, F32 4. The architectures' parameter counts are checked against
memcalc's own count of the ModelConfig the fields describe (``count_params``), an independent path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QType  # noqa: E402
from gguf.quants import quantize  # noqa: E402

from memcalc.config import ModelConfig, parse  # noqa: E402
from memcalc.errors import InputError  # noqa: E402
from memcalc.estimate.params import count_params  # noqa: E402
from memcalc.gguf_file import read_gguf  # noqa: E402

BYTES_PER_VALUE = {"F32": 4, "F16": 2, "Q8_0": 34 / 32, "Q4_0": 18 / 32}

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FF, VOCAB, CONTEXT = 64, 2, 4, 2, 16, 128, 96, 256


def write_gguf(path: Path, arch: str, kv, tensors: dict[str, tuple[tuple[int, ...], str]]) -> Path:
    """A GGUF file: ``kv(writer)`` adds the metadata; each tensor is (numpy shape, ggml type),
    zero-filled, quantised with gguf's own quantisers for block types."""
    writer = gguf.GGUFWriter(str(path), arch)
    kv(writer)
    for name, (shape, type_name) in tensors.items():
        values = np.zeros(shape, dtype=np.float32)
        if type_name == "F32":
            writer.add_tensor(name, values)
        elif type_name == "F16":
            writer.add_tensor(name, values.astype(np.float16))
        else:
            qtype = QType[type_name]
            writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_kv(writer, head_count_kv=KV_HEADS, vocab_size: int | None = VOCAB) -> None:
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(head_count_kv)
    writer.add_context_length(CONTEXT)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-5)
    if vocab_size is not None:
        writer.add_vocab_size(vocab_size)


def block_tensors(layer: int, weight_type: str = "Q8_0", extra: dict | None = None) -> dict:
    """One llama block in llama.cpp's tensor names; numpy shapes are [d_out, d_in]."""
    prefix = f"blk.{layer}"
    return {
        f"{prefix}.attn_norm.weight": ((HIDDEN,), "F32"),
        f"{prefix}.attn_q.weight": ((HEADS * HEAD_DIM, HIDDEN), weight_type),
        f"{prefix}.attn_k.weight": ((KV_HEADS * HEAD_DIM, HIDDEN), weight_type),
        f"{prefix}.attn_v.weight": ((KV_HEADS * HEAD_DIM, HIDDEN), weight_type),
        f"{prefix}.attn_output.weight": ((HIDDEN, HEADS * HEAD_DIM), weight_type),
        f"{prefix}.ffn_norm.weight": ((HIDDEN,), "F32"),
        f"{prefix}.ffn_gate.weight": ((FF, HIDDEN), weight_type),
        f"{prefix}.ffn_up.weight": ((FF, HIDDEN), weight_type),
        f"{prefix}.ffn_down.weight": ((HIDDEN, FF), "Q4_0"),
        **(extra or {}),
    }


def llama_tensors(tied: bool = False, **block_options) -> dict:
    tensors = {"token_embd.weight": ((VOCAB, HIDDEN), "F16")}
    for layer in range(LAYERS):
        tensors.update(block_tensors(layer, **block_options))
    tensors["output_norm.weight"] = ((HIDDEN,), "F32")
    if not tied:
        tensors["output.weight"] = ((VOCAB, HIDDEN), "Q4_0")
    return tensors


def expected_bytes(shape: tuple[int, ...], type_name: str) -> int:
    return int(np.prod(shape) * BYTES_PER_VALUE[type_name])


@pytest.fixture
def llama_file(tmp_path) -> tuple[Path, dict]:
    tensors = llama_tensors()
    return write_gguf(tmp_path / "tiny-llama-Q8_0.gguf", "llama", llama_kv, tensors), tensors


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- KV fields and tensors ----------------------------------------------------------------------


def test_llama_kv_fields(llama_file):
    path, _ = llama_file
    model = read_gguf(path)
    assert model.architecture == "llama"
    assert model.name == "tiny-llama"
    assert (model.file_type, model.file_type_name) == (7, "Q8_0")
    assert model.vocab_size == VOCAB
    assert {key: model.arch_value(key) for key in ("block_count", "embedding_length", "feed_forward_length",
                                                   "attention.head_count", "attention.head_count_kv",
                                                   "context_length")} == {
        "block_count": LAYERS, "embedding_length": HIDDEN, "feed_forward_length": FF,
        "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS, "context_length": CONTEXT}


def test_every_tensor_with_exact_bytes(llama_file):
    path, tensors = llama_file
    model = read_gguf(path)
    by_name = {tensor.name: tensor for tensor in model.tensors}
    assert set(by_name) == set(tensors)
    for name, (shape, type_name) in tensors.items():
        tensor = by_name[name]
        assert tensor.type_name == type_name
        assert tensor.shape == tuple(reversed(shape))  # ggml order: ne[0] = d_in first
        assert tensor.numel == int(np.prod(shape))
        assert tensor.nbytes == expected_bytes(shape, type_name)


@pytest.mark.parametrize(("type_name", "shape", "nbytes"), [
    ("Q8_0", (4, 64), 4 * 2 * 34),  # 8 blocks of 32
    ("Q4_0", (4, 64), 4 * 2 * 18),
    ("F16", (4, 64), 4 * 64 * 2),
    ("F32", (3, 5), 60),
])
def test_block_type_bytes(tmp_path, type_name, shape, nbytes):
    path = write_gguf(tmp_path / "one.gguf", "llama", lambda writer: None, {"w": (shape, type_name)})
    (tensor,) = read_gguf(path).tensors
    assert (tensor.type_name, tensor.numel, tensor.nbytes) == (type_name, int(np.prod(shape)), nbytes)


def test_totals_by_type_and_bits_per_weight(llama_file):
    path, tensors = llama_file
    model = read_gguf(path)
    params: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for shape, type_name in tensors.values():
        params[type_name] = params.get(type_name, 0) + int(np.prod(shape))
        nbytes[type_name] = nbytes.get(type_name, 0) + expected_bytes(shape, type_name)
    assert model.params_by_type() == params
    assert model.bytes_by_type() == nbytes
    assert model.total_params == sum(params.values())
    assert model.total_bytes == sum(nbytes.values())
    assert model.bits_per_weight == pytest.approx(8 * sum(nbytes.values()) / sum(params.values()))


def test_vocab_size_from_token_list(tmp_path):
    def kv(writer):
        llama_kv(writer, vocab_size=None)
        writer.add_token_list([f"tok{i}" for i in range(VOCAB)])

    path = write_gguf(tmp_path / "tokens.gguf", "llama", kv, llama_tensors())
    assert read_gguf(path).vocab_size == VOCAB


def test_per_layer_head_count_kv_is_kept_as_a_list(tmp_path):
    path = write_gguf(tmp_path / "varying.gguf", "llama", lambda writer: llama_kv(writer, head_count_kv=[2, 4]),
                      llama_tensors())
    model = read_gguf(path)
    assert model.arch_value("attention.head_count_kv") == [2, 4]
    derived = model.model_fields()
    assert "num_kv_heads" in derived.missing and not derived.complete
    assert any("varies per layer (2, 4)" in note for note in derived.notes)


def test_uniform_per_layer_head_count_kv_is_one_value(tmp_path):
    path = write_gguf(tmp_path / "uniform.gguf", "llama", lambda writer: llama_kv(writer, head_count_kv=[2, 2]),
                      llama_tensors())
    assert read_gguf(path).model_fields().fields["num_kv_heads"] == 2


# --- ModelConfig fields, checked by memcalc's own parameter count -----------------------------------


def model_config_of(path: Path) -> ModelConfig:
    derived = read_gguf(path).model_fields()
    assert derived.complete, derived.missing
    return parse(ModelConfig, derived.fields, str(path))


def test_llama_model_fields(llama_file):
    path, _ = llama_file
    derived = read_gguf(path).model_fields()
    assert derived.complete
    expected = dict(hidden_size=HIDDEN, num_layers=LAYERS, num_attention_heads=HEADS, num_kv_heads=KV_HEADS,
                    intermediate_size=FF, vocab_size=VOCAB, max_position_embeddings=CONTEXT,
                    tie_word_embeddings=False, qkv_bias=False, qk_norm=False, norms_per_layer=2, hidden_act="silu")
    assert {key: derived.fields[key] for key in expected} == expected
    assert "moe" not in derived.fields and "sliding_window" not in derived.fields


def test_llama_count_matches_the_file(llama_file):
    path, _ = llama_file
    assert count_params(model_config_of(path)).total == read_gguf(path).total_params


def test_tied_output_head(tmp_path):
    path = write_gguf(tmp_path / "tied.gguf", "llama", llama_kv, llama_tensors(tied=True))
    config = model_config_of(path)
    assert config.tie_word_embeddings is True
    assert count_params(config).total == read_gguf(path).total_params


def test_qwen2_biases_from_tensors(tmp_path):
    biases = lambda layer: {  # noqa: E731
        f"blk.{layer}.attn_q.bias": ((HEADS * HEAD_DIM,), "F32"),
        f"blk.{layer}.attn_k.bias": ((KV_HEADS * HEAD_DIM,), "F32"),
        f"blk.{layer}.attn_v.bias": ((KV_HEADS * HEAD_DIM,), "F32"),
    }
    tensors = {"token_embd.weight": ((VOCAB, HIDDEN), "F16"), "output_norm.weight": ((HIDDEN,), "F32")}
    for layer in range(LAYERS):
        tensors.update(block_tensors(layer, extra=biases(layer)))
    path = write_gguf(tmp_path / "qwen2.gguf", "qwen2", llama_kv, tensors)
    config = model_config_of(path)
    assert (config.qkv_bias, config.attn_output_bias, config.tie_word_embeddings) == (True, False, True)
    assert count_params(config).total == read_gguf(path).total_params


def test_qwen3_qk_norm_and_head_dim(tmp_path):
    def kv(writer):
        llama_kv(writer)
        writer.add_key_length(HEAD_DIM)
        writer.add_value_length(HEAD_DIM)

    norms = lambda layer: {  # noqa: E731
        f"blk.{layer}.attn_q_norm.weight": ((HEAD_DIM,), "F32"),
        f"blk.{layer}.attn_k_norm.weight": ((HEAD_DIM,), "F32"),
    }
    tensors = {"token_embd.weight": ((VOCAB, HIDDEN), "F16"), "output_norm.weight": ((HIDDEN,), "F32"),
               "output.weight": ((VOCAB, HIDDEN), "Q8_0")}
    for layer in range(LAYERS):
        tensors.update(block_tensors(layer, extra=norms(layer)))
    path = write_gguf(tmp_path / "qwen3.gguf", "qwen3", kv, tensors)
    config = model_config_of(path)
    assert (config.qk_norm, config.head_dim) == (True, HEAD_DIM)
    assert count_params(config).total == read_gguf(path).total_params


def test_gemma2_sandwich_norms_and_sliding_window(tmp_path):
    def kv(writer):
        llama_kv(writer)
        writer.add_sliding_window(128)

    post_norms = lambda layer: {  # noqa: E731
        f"blk.{layer}.post_attention_norm.weight": ((HIDDEN,), "F32"),
        f"blk.{layer}.post_ffw_norm.weight": ((HIDDEN,), "F32"),
    }
    tensors = {"token_embd.weight": ((VOCAB, HIDDEN), "F16"), "output_norm.weight": ((HIDDEN,), "F32")}
    for layer in range(LAYERS):
        tensors.update(block_tensors(layer, extra=post_norms(layer)))
    path = write_gguf(tmp_path / "gemma2.gguf", "gemma2", kv, tensors)
    config = model_config_of(path)
    assert (config.norms_per_layer, config.sliding_window, config.sliding_window_pattern) == (4, 128, 2)
    assert (config.hidden_act, config.tie_word_embeddings) == ("gelu_tanh", True)
    assert count_params(config).total == read_gguf(path).total_params


@pytest.mark.parametrize(("pattern", "expected"), [
    (3, 3),
    ([True, True, False, True, True, False], 3),
    ([True, False, True, True], None),  # not one global layer every n: no pattern
])
def test_sliding_window_pattern_key(tmp_path, pattern, expected):
    def kv(writer):
        llama_kv(writer)
        writer.add_sliding_window(128)
        writer.add_sliding_window_pattern(pattern)

    path = write_gguf(tmp_path / "swa.gguf", "gemma3", kv, llama_tensors())
    assert read_gguf(path).model_fields().fields.get("sliding_window_pattern") == expected


def test_mixtral_style_moe(tmp_path):
    experts, used = 4, 2

    def kv(writer):
        llama_kv(writer)
        writer.add_expert_count(experts)
        writer.add_expert_used_count(used)

    tensors = {"token_embd.weight": ((VOCAB, HIDDEN), "F16"), "output_norm.weight": ((HIDDEN,), "F32"),
               "output.weight": ((VOCAB, HIDDEN), "F16")}
    for layer in range(LAYERS):
        block = {name: spec for name, spec in block_tensors(layer).items() if ".ffn_" not in name or "norm" in name}
        block.update({
            f"blk.{layer}.ffn_gate_inp.weight": ((experts, HIDDEN), "F32"),
            f"blk.{layer}.ffn_gate_exps.weight": ((experts, FF, HIDDEN), "Q8_0"),
            f"blk.{layer}.ffn_up_exps.weight": ((experts, FF, HIDDEN), "Q8_0"),
            f"blk.{layer}.ffn_down_exps.weight": ((experts, HIDDEN, FF), "Q8_0"),
        })
        tensors.update(block)
    path = write_gguf(tmp_path / "moe.gguf", "llama", kv, tensors)
    config = model_config_of(path)
    assert (config.moe.num_experts, config.moe.experts_per_token, config.moe.expert_intermediate_size) == (4, 2, FF)
    assert count_params(config).total == read_gguf(path).total_params
    expert_bytes = read_gguf(path).bytes_by_type()["Q8_0"]
    q8_values = LAYERS * (3 * experts * FF * HIDDEN + (HEADS + 2 * KV_HEADS + HEADS) * HEAD_DIM * HIDDEN)
    assert expert_bytes == q8_values // 32 * 34


def test_unknown_architecture_lists_what_is_missing(tmp_path):
    def kv(writer):
        writer.add_block_count(LAYERS)
        writer.add_embedding_length(HIDDEN)

    path = write_gguf(tmp_path / "mamba.gguf", "mamba", kv, {"token_embd.weight": ((VOCAB, HIDDEN), "F16")})
    derived = read_gguf(path).model_fields()
    assert not derived.architecture_supported and not derived.complete
    assert derived.fields["hidden_size"] == HIDDEN and derived.fields["num_layers"] == LAYERS
    assert set(derived.missing) == {"num_attention_heads", "intermediate_size", "max_position_embeddings"}
    assert derived.fields["vocab_size"] == VOCAB  # from token_embd's shape
    assert any("'mamba'" in note for note in derived.notes)


# --- Corrupt files: one line naming the file -------------------------------------------------------


def _cut(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


def _tensor_info_region(path: Path) -> tuple[int, int]:
    """Where the tensor infos start and the data section begins, from the reader itself."""
    reader = gguf.GGUFReader(path)
    return reader.tensors[0].field.offset, reader.data_offset


def _overwrite(path: Path, offset: int, data: bytes) -> Path:
    content = path.read_bytes()
    path.write_bytes(content[:offset] + data + content[offset + len(data):])
    return path


READER_FAILURE = "corrupt or truncated GGUF file ("  # what the gguf reader raised, wrapped
CORRUPTIONS = {
    # case: (corrupt(path, tensor infos start, data start), text the message must contain)
    "bad-magic": (lambda path, start, end: _overwrite(path, 0, b"GGML"), "not a GGUF file (magic b'GGML'"),
    "empty": (lambda path, start, end: path.write_bytes(b""), "not a GGUF file"),
    "cut-in-header": (lambda path, start, end: _cut(path, 12), "truncated GGUF file: 12 bytes"),
    "cut-in-kv": (lambda path, start, end: _cut(path, 60), "corrupt or truncated GGUF file"),
    "cut-in-tensor-infos": (lambda path, start, end: _cut(path, (start + end) // 2), READER_FAILURE),
    "cut-at-data-start": (lambda path, start, end: _cut(path, end), READER_FAILURE),
    "cut-in-tensor-data": (lambda path, start, end: _cut(path, end + 100), READER_FAILURE),
    "last-byte-missing": (lambda path, start, end: _cut(path, len(path.read_bytes()) - 1), READER_FAILURE),
    "absurd-tensor-count": (lambda path, start, end: _overwrite(path, 8, (2**62).to_bytes(8, "little")),
                            "and 4611686018427387904 tensors"),
}


@pytest.mark.parametrize(("corrupt", "expected"), CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_file_is_one_line_input_error(llama_file, corrupt, expected):
    path, _ = llama_file
    start, end = _tensor_info_region(path)
    corrupt(path, start, end)
    with pytest.raises(InputError) as excinfo:
        read_gguf(path)
    message = one_line(excinfo)
    assert message.startswith(str(path)) and expected in message


def test_cut_in_a_long_token_list(tmp_path):
    """Cut inside the KV section, where the counts alone still fit: the reader itself runs out."""
    def kv(writer):
        llama_kv(writer)
        writer.add_token_list([f"token-{i:04d}" for i in range(2000)])

    path = write_gguf(tmp_path / "tokens.gguf", "llama", kv, llama_tensors())
    start, _ = _tensor_info_region(path)
    _cut(path, start - 5000)
    with pytest.raises(InputError) as excinfo:
        read_gguf(path)
    assert one_line(excinfo).startswith(f"{path}: corrupt or truncated GGUF file (")


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as excinfo:
        read_gguf(tmp_path / "absent.gguf")
    assert "cannot read" in one_line(excinfo)


def test_import_does_not_load_gguf_or_numpy():
    code = "import sys, memcalc.gguf_file; print([m for m in ('gguf', 'numpy') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
