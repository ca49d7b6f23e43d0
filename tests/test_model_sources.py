"""Models from a Hub id, a GGUF file and a checkpoint directory, through the command line.

Hub ids resolve from a Hugging Face cache built on disk (the layout of tests/test_hub.py), offline,
and every test that touches huggingface_hub fails if a socket connects. Checkpoint files are written
by the safetensors and gguf packages; expected bytes are the sizes those packages wrote (numpy's
``nbytes``; Q8_0's 34 bytes per 32 values, ggml ``docs/gguf.md``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from hub_cache import add_to_cache
from memcalc.estimate.breakdown import Component, Estimate, Kind

HIDDEN, LAYERS, HEADS, KV_HEADS, FF, VOCAB, CONTEXT = 64, 2, 4, 2, 128, 96, 256
HEAD_DIM = HIDDEN // HEADS
LLAMA_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": HIDDEN,
    "intermediate_size": FF, "max_position_embeddings": CONTEXT, "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "vocab_size": VOCAB,
}
COMMIT_MAIN, COMMIT_DEV = "a" * 40, "b" * 40


def _json(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


# --- Hub ids from an on-disk cache, offline --------------------------------------------------------


def test_hub_id_from_cache_matches_the_same_config_by_path(run_cli, hub_cache, tmp_path):
    content = json.dumps(LLAMA_CONFIG).encode()
    add_to_cache(hub_cache, "tiny-org/tiny-llama", COMMIT_MAIN, {"config.json": content})
    local = tmp_path / "config.json"
    local.write_bytes(content)
    from_hub = _json(run_cli("train", "tiny-org/tiny-llama", "--json"))
    by_path = _json(run_cli("train", str(local), "--json"))
    assert from_hub["memory"] == by_path["memory"]
    assert from_hub["model"]["parameters"] == by_path["model"]["parameters"]
    assert from_hub["model"]["name"] == "tiny-org/tiny-llama"
    assert from_hub["model"]["source"] == "hf://tiny-org/tiny-llama@main"


def test_uncached_hub_id_offline_is_one_line(run_cli, hub_cache):
    stderr = _one_line_error(run_cli("train", "Qwen/Qwen3-14B"))
    assert "Qwen/Qwen3-14B is not in the Hugging Face cache and HF_HUB_OFFLINE is set" in stderr


def test_revision_selects_its_snapshot(run_cli, hub_cache):
    deeper = LLAMA_CONFIG | {"num_hidden_layers": 2 * LAYERS}
    add_to_cache(hub_cache, "tiny-org/tiny-llama", COMMIT_MAIN, {"config.json": json.dumps(LLAMA_CONFIG).encode()})
    add_to_cache(hub_cache, "tiny-org/tiny-llama", COMMIT_DEV, {"config.json": json.dumps(deeper).encode()},
                 refs=("dev",))
    main = _json(run_cli("show", "tiny-org/tiny-llama", "--json"))
    dev = _json(run_cli("show", "tiny-org/tiny-llama", "--revision", "dev", "--json"))
    assert (main["model"]["layers"], dev["model"]["layers"]) == (LAYERS, 2 * LAYERS)
    assert dev["model"]["source"] == "hf://tiny-org/tiny-llama@dev"


def test_revision_with_a_bundled_model_is_refused(run_cli):
    assert "--revision 'dev': applies to Hugging Face Hub ids" in _one_line_error(
        run_cli("train", "llama-2-7b", "--revision", "dev"))


def test_cached_hub_checkpoint_in_show(run_cli, hub_cache, tmp_path):
    from safetensors.numpy import save_file

    save_file(llama_arrays(), str(tmp_path / "model.safetensors"))
    add_to_cache(hub_cache, "tiny-org/tiny-llama", COMMIT_MAIN, {
        "config.json": json.dumps(LLAMA_CONFIG).encode(),
        "model.safetensors": (tmp_path / "model.safetensors").read_bytes()})
    check = _json(run_cli("show", "tiny-org/tiny-llama", "--json"))["checkpoint"]
    assert check["matches"] is True and check["location"] == "hf://tiny-org/tiny-llama@main"


# --- GGUF ------------------------------------------------------------------------------------------


def write_llama_gguf(path: Path) -> Path:
    """A two-layer llama with Q8_0 linear weights (gguf's own quantiser), F32 norms."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_context_length(CONTEXT)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    tensors = {"token_embd.weight": (VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        prefix = f"blk.{layer}"
        tensors |= {f"{prefix}.attn_norm.weight": (HIDDEN,), f"{prefix}.attn_q.weight": (HIDDEN, HIDDEN),
                    f"{prefix}.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                    f"{prefix}.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                    f"{prefix}.attn_output.weight": (HIDDEN, HIDDEN), f"{prefix}.ffn_norm.weight": (HIDDEN,),
                    f"{prefix}.ffn_gate.weight": (FF, HIDDEN), f"{prefix}.ffn_up.weight": (FF, HIDDEN),
                    f"{prefix}.ffn_down.weight": (HIDDEN, FF)}
    tensors |= {"output_norm.weight": (HIDDEN,), "output.weight": (VOCAB, HIDDEN)}
    for name, shape in tensors.items():
        values = np.zeros(shape, dtype=np.float32)
        if len(shape) == 1:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, quantize(values, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_tensor_bytes(shapes) -> int:
    return sum(int(np.prod(shape)) * 4 if len(shape) == 1 else int(np.prod(shape)) // 32 * 34 for shape in shapes)


def test_gguf_infer_weights_are_the_files_tensor_bytes(run_cli, tmp_path):
    path = write_llama_gguf(tmp_path / "tiny-llama-Q8_0.gguf")
    from memcalc.gguf_file import read_gguf

    stored = read_gguf(path)
    norms = (2 * LAYERS + 1) * HIDDEN
    assert stored.total_bytes == norms * 4 + (stored.total_params - norms) // 32 * 34  # Q8_0: 34 B per 32
    document = _json(run_cli("infer", str(path), "--json"))
    weights = next(component for component in document["components"] if component["key"] == "weights")
    assert weights["bytes"] == document["memory"]["weights"] == stored.total_bytes
    assert weights["formula"].startswith("GGUF tensors: Q8_0 x ") and "F32 x" in weights["formula"]
    assert weights["source"] == "the file's tensor infos"
    memory = document["memory"]
    rows = sum(component["bytes"] for component in document["components"])
    assert memory["total"] == memory["peak_allocated"] and memory["device_total"] > memory["peak_reserved"]
    assert memory["peak_allocated"] == max(memory["phases"].values())
    assert rows >= memory["total"]  # the rows coexist at most; the peak is a phase
    assert document["checkpoint"]["weights_only"] == stored.total_bytes
    # --weights asks for a format instead: the formula path
    formula = _json(run_cli("infer", str(path), "--weights", "bf16", "--json"))
    assert formula["memory"]["weights"] != stored.total_bytes


def test_gguf_show_and_table(run_cli, tmp_path):
    path = write_llama_gguf(tmp_path / "tiny.gguf")
    check = _json(run_cli("show", str(path), "--json"))["checkpoint"]
    assert check["format"] == "gguf" and set(check["by_type"]) == {"Q8_0", "F32"}
    table = run_cli("infer", str(path))
    assert table.exit_code == 0 and "GGUF tensors: Q8_0" in table.stdout and "as stored (GGUF Q8_0)" in table.stdout


def test_corrupt_gguf_is_one_line(run_cli, tmp_path):
    path = write_llama_gguf(tmp_path / "cut.gguf")
    path.write_bytes(path.read_bytes()[:200])
    assert str(path) in _one_line_error(run_cli("infer", str(path)))
    (tmp_path / "bad.gguf").write_bytes(b"GGUX" + bytes(40))
    assert "not a GGUF file" in _one_line_error(run_cli("show", str(tmp_path / "bad.gguf")))


# --- Checkpoint directories --------------------------------------------------------------------


def llama_arrays(drop: str | None = None) -> dict[str, np.ndarray]:
    """Every tensor of transformers' LlamaForCausalLM for LLAMA_CONFIG, in bf16-sized fp16."""
    def zeros(*shape):
        return np.zeros(shape, dtype=np.float16)

    arrays = {"model.embed_tokens.weight": zeros(VOCAB, HIDDEN), "model.norm.weight": zeros(HIDDEN),
              "lm_head.weight": zeros(VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        arrays |= {f"{prefix}.self_attn.q_proj.weight": zeros(HIDDEN, HIDDEN),
                   f"{prefix}.self_attn.k_proj.weight": zeros(KV_HEADS * HEAD_DIM, HIDDEN),
                   f"{prefix}.self_attn.v_proj.weight": zeros(KV_HEADS * HEAD_DIM, HIDDEN),
                   f"{prefix}.self_attn.o_proj.weight": zeros(HIDDEN, HIDDEN),
                   f"{prefix}.mlp.gate_proj.weight": zeros(FF, HIDDEN), f"{prefix}.mlp.up_proj.weight": zeros(FF, HIDDEN),
                   f"{prefix}.mlp.down_proj.weight": zeros(HIDDEN, FF),
                   f"{prefix}.input_layernorm.weight": zeros(HIDDEN),
                   f"{prefix}.post_attention_layernorm.weight": zeros(HIDDEN)}
    arrays.pop(drop, None)
    return arrays


def checkpoint_dir(tmp_path: Path, arrays: dict[str, np.ndarray], name: str = "ckpt") -> Path:
    from safetensors.numpy import save_file

    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    save_file(arrays, str(folder / "model.safetensors"))
    return folder


def test_checkpoint_dir_show_matches(run_cli, tmp_path):
    arrays = llama_arrays()
    result = run_cli("show", str(checkpoint_dir(tmp_path, arrays)), "--json")
    assert result.stderr == ""
    document = _json(result)
    check = document["checkpoint"]
    total = sum(array.size for array in arrays.values())
    assert check["matches"] is True
    assert check["language_model_params"] == check["config_params"] == document["parameters"]["total"] == total
    assert check["stored_bytes"] == sum(array.nbytes for array in arrays.values())
    assert check["by_dtype"] == {"F16": {"params": total, "bytes": 2 * total}}
    assert check["quantization"] == []
    table = run_cli("show", str(checkpoint_dir(tmp_path, arrays, "again")))
    assert table.exit_code == 0 and "Checkpoint (safetensors headers" in table.stdout
    assert table.stderr == ""


def test_checkpoint_missing_tensor_warns(run_cli, tmp_path):
    arrays = llama_arrays(drop="model.layers.1.mlp.down_proj.weight")
    result = run_cli("show", str(checkpoint_dir(tmp_path, arrays)), "--json")
    check = _json(result)["checkpoint"]
    stored, config = check["language_model_params"], check["config_params"]
    assert check["matches"] is False and config - stored == HIDDEN * FF
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"warning: checkpoint headers hold {stored:,} parameters, the config gives {config:,}: ")


def test_checkpoint_dir_infer_uses_stored_bytes(run_cli, tmp_path):
    arrays = llama_arrays()
    folder = checkpoint_dir(tmp_path, arrays)
    document = _json(run_cli("infer", str(folder), "--json"))
    assert document["memory"]["weights"] == sum(array.nbytes for array in arrays.values())
    assert document["settings"]["weights_from"] == str(folder)
    # fp16 as stored equals P x fp16, the formula's figure
    assert document["memory"] == _json(run_cli("infer", str(folder), "--weights", "fp16", "--json"))["memory"] | {
        "rule_of_thumb_total": document["memory"]["rule_of_thumb_total"]}


def test_truncated_safetensors_header_is_one_line(run_cli, tmp_path):
    folder = checkpoint_dir(tmp_path, llama_arrays())
    file = folder / "model.safetensors"
    (header_bytes,) = struct.unpack("<Q", file.read_bytes()[:8])
    file.write_bytes(file.read_bytes()[: 8 + header_bytes // 2])
    for command in ("show", "infer"):
        assert "truncated" in _one_line_error(run_cli(command, str(folder)))


# --- The measured-weights helper -------------------------------------------------------------------


def _estimate() -> Estimate:
    from memcalc.config import InferSettings
    from memcalc.estimate.inference import estimate_inference
    from memcalc.library import resolve_model

    return estimate_inference(resolve_model("llama-3-8b"), InferSettings(weights="q4_k", prompt_len=128,
                                                                          max_new_tokens=16))


def test_with_weight_bytes_moves_phases_and_totals_by_the_difference():
    from memcalc.estimate.measured import weight_total, with_weight_bytes

    before = _estimate()
    assert {"weights_quantised", "weights_unquantised"} <= {component.key for component in before.components}
    extra = Component("vision_checkpoint", "Vision", 1000, Kind.STATIC, "f", "s")
    after = with_weight_bytes(before, 5_000_000_000, "measured", "test", extra=(extra,))
    delta = 5_000_001_000 - weight_total(before)
    keys = [component.key for component in after.components]
    assert keys[:2] == ["weights", "vision_checkpoint"] and not any(key.startswith("weights_") for key in keys)
    assert after.phases == {phase: live + delta for phase, live in before.phases.items()}
    assert after.total == before.total + delta
    assert after.component("rule_of_thumb_total").bytes == -(-5_000_001_000 * 6 // 5)
    assert after.component("weights_only").bytes == 5_000_001_000
    assert [c for c in after.components if c.key not in ("weights", "vision_checkpoint")] == [
        c for c in before.components if not c.key.startswith("weights")]


def test_bundled_infer_does_not_load_checkpoint_libraries():
    import subprocess
    import sys

    code = (
        "import sys; from memcalc.cli import main\n"
        "try:\n    main(['infer', 'llama-3-8b', '--json'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('huggingface_hub', 'gguf', 'numpy', 'safetensors', 'pydantic.type_adapter')"
        " if m in sys.modules), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr.strip() == "[]"


def test_assume_llama_reads_an_unknown_model_type(run_cli, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_CONFIG | {"model_type": "brand-new-arch"}))
    assert "--assume-llama" in _one_line_error(run_cli("train", str(path)))
    known = tmp_path / "llama" / "config.json"
    known.parent.mkdir()
    known.write_text(json.dumps(LLAMA_CONFIG))
    assert (_json(run_cli("train", str(path), "--assume-llama", "--json"))["memory"]
            == _json(run_cli("train", str(known), "--json"))["memory"])


@pytest.mark.parametrize("command", ["train", "infer", "validate", "compare", "sweep", "plan", "show"])
def test_every_model_command_takes_revision_and_assume_llama(command):
    import typer

    from memcalc.cli import app

    params = {option for param in typer.main.get_command(app).commands[command].params for option in param.opts}
    assert {"--revision", "--assume-llama"} <= params
