"""Loading models: bundled names and aliases, memcalc YAML files, Hugging Face config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from memcalc.errors import InputError
from memcalc.estimate.params import count_params
from memcalc.config import config_as_dict
from memcalc.library import (
    bundled_model_names,
    bundled_models,
    configs_dir,
    load_model_file,
    load_model_yaml,
    resolve_model,
)

HF_DIR = Path(__file__).parent / "data" / "hf"

# The same published totals as test_params, reached through each repository's own config.json.
HF_CONFIGS = {
    "gpt2.json": 124_439_808,
    "llama-2-7b.json": 6_738_415_616,
    "qwen2.5-0.5b.json": 494_032_768,
    "mixtral-8x7b.json": 46_702_792_704,
    "gemma-2b.json": 2_506_172_416,
}


# Qwen1.5-MoE-A2.7B (Qwen/Qwen1.5-MoE-A2.7B): 60 routed experts top-4, 4 fused shared experts behind
# a sigmoid gate; model card "14.3B parameters, 2.7B activated".
HF_ONLY_CONFIGS = {"qwen1.5-moe-a2.7b.json": 14_315_784_192}


@pytest.mark.parametrize(("file_name", "expected"), sorted((HF_CONFIGS | HF_ONLY_CONFIGS).items()))
def test_hf_config_json_gives_published_count(file_name, expected):
    assert count_params(resolve_model(str(HF_DIR / file_name))).total == expected


def test_qwen_moe_active_parameters():
    assert count_params(resolve_model(str(HF_DIR / "qwen1.5-moe-a2.7b.json"))).active == pytest.approx(2.7e9, rel=0.01)


@pytest.mark.parametrize("file_name", sorted(HF_CONFIGS))
def test_hf_config_matches_bundled_yaml(file_name):
    """The bundled YAML and the repository's config.json describe the same architecture."""
    from_hf = resolve_model(str(HF_DIR / file_name))
    bundled = resolve_model(file_name.removesuffix(".json"))
    # the checkpoint's storage dtype (torch_dtype) is not architecture
    ignore = {"name", "aliases", "source", "notes", "sliding_window", "num_kv_heads", "head_dim", "checkpoint"}
    assert _without(config_as_dict(from_hf), ignore) == _without(config_as_dict(bundled), ignore)
    assert (from_hf.kv_heads, from_hf.attention_head_dim) == (bundled.kv_heads, bundled.attention_head_dim)


def _without(data: dict, keys: set[str]) -> dict:
    return {key: value for key, value in data.items() if key not in keys}


@pytest.mark.parametrize("name", bundled_model_names())
def test_bundled_file_passes_validation_and_trusted_build_agrees(name):
    """Bundled files are built without pydantic at run time; here each one goes through the full
    validation (types, ranges, unknown keys, cross-field rules) and must give the same config."""
    path = configs_dir() / "models" / f"{name}.yaml"
    assert load_model_yaml(path) == bundled_models()[name]


def test_hf_directory_holding_config_json(tmp_path):
    shutil.copy(HF_DIR / "llama-2-7b.json", tmp_path / "config.json")
    assert count_params(resolve_model(str(tmp_path))).total == 6_738_415_616


def test_hf_model_name_from_name_or_path_directory_or_file(tmp_path):
    assert resolve_model(str(HF_DIR / "llama-2-7b.json")).name == "meta-llama/Llama-2-7b-hf"  # _name_or_path
    assert resolve_model(str(HF_DIR / "gpt2.json")).name == "gpt2"  # the file's stem
    (tmp_path / "my-model").mkdir()
    shutil.copy(HF_DIR / "gpt2.json", tmp_path / "my-model" / "config.json")
    assert resolve_model(str(tmp_path / "my-model")).name == "my-model"  # the directory holding config.json


def test_absent_tie_word_embeddings_uses_model_type_default_and_says_so():
    model = resolve_model(str(HF_DIR / "gemma-2b.json"))
    assert model.tie_word_embeddings is True
    assert any("tie_word_embeddings" in note for note in model.notes)


def test_nested_text_config(tmp_path):
    inner = json.loads((HF_DIR / "llama-2-7b.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": inner}))
    assert count_params(resolve_model(str(tmp_path / "config.json"))).total == 6_738_415_616


def test_unknown_model_type_is_refused_naming_it(tmp_path):
    data = json.loads((HF_DIR / "llama-2-7b.json").read_text()) | {"model_type": "newfangled"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"model_type 'newfangled' is not modelled.*--assume-llama") as info:
        resolve_model(str(tmp_path))
    assert "\n" not in str(info.value)


def test_assume_llama_keeps_the_llama_reading_with_a_note(tmp_path):
    data = json.loads((HF_DIR / "llama-2-7b.json").read_text()) | {"model_type": "newfangled"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    model = resolve_model(str(tmp_path), assume_llama=True)
    assert count_params(model).total == 6_738_415_616
    assert any("newfangled" in note for note in model.notes)


@pytest.mark.parametrize("reference", ["llama-2-7b", "LLAMA-2-7B", "llama2-7b", "meta-llama/Llama-2-7b-hf"])
def test_names_and_aliases_resolve(reference):
    assert resolve_model(reference).name == "llama-2-7b"


def test_aliases_are_unique_across_the_library():
    seen: dict[str, str] = {}
    for name, model in bundled_models().items():
        for key in (name, *model.aliases):
            assert key.lower() not in seen, f"{key} names both {seen.get(key.lower())} and {name}"
            seen[key.lower()] = name


def test_unknown_model_suggests_close_names():
    with pytest.raises(InputError, match=r"unknown model 'llama13b'; did you mean llama-13b"):
        resolve_model("llama13b")


def test_bundled_library_found_in_repository():
    assert (configs_dir() / "models" / "llama-2-7b.yaml").is_file()


# --- bad files: one line naming the file, the place and the problem --------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _valid_yaml() -> str:
    return (configs_dir() / "models" / "llama-2-7b.yaml").read_text()


def test_malformed_yaml_reports_file_line_and_column(tmp_path):
    path = _write(tmp_path, "bad.yaml", "name: x\nhidden_size: [4096\nnum_layers: 2\n")
    with pytest.raises(InputError) as error:
        load_model_file(path)
    message = str(error.value)
    assert message.startswith(f"{path}:3:")
    assert "invalid YAML" in message and "\n" not in message


def test_missing_field_is_named(tmp_path):
    text = "\n".join(line for line in _valid_yaml().splitlines() if not line.startswith("vocab_size"))
    with pytest.raises(InputError, match=r"bad\.yaml: vocab_size: Field required"):
        load_model_file(_write(tmp_path, "bad.yaml", text))


def test_misspelt_field_is_rejected(tmp_path):
    text = _valid_yaml().replace("hidden_size:", "hiden_size:")
    with pytest.raises(InputError) as error:
        load_model_file(_write(tmp_path, "bad.yaml", text))
    assert "hiden_size: Unexpected keyword argument" in str(error.value)
    assert "hidden_size: Field required" in str(error.value)


def test_non_positive_size_is_rejected(tmp_path):
    text = _valid_yaml().replace("num_layers: 32", "num_layers: 0")
    with pytest.raises(InputError, match=r"num_layers: Input should be greater than 0"):
        load_model_file(_write(tmp_path, "bad.yaml", text))


def test_kv_heads_must_divide_heads(tmp_path):
    text = _valid_yaml().replace("num_kv_heads: 32", "num_kv_heads: 5")
    with pytest.raises(InputError, match=r"bad.yaml: num_kv_heads \(5\) must divide num_attention_heads \(32\)$"):
        load_model_file(_write(tmp_path, "bad.yaml", text))


def test_malformed_json_reports_file_line_and_column(tmp_path):
    path = _write(tmp_path, "config.json", '{\n  "hidden_size": 4096,\n  "n_layer": ,\n}')
    with pytest.raises(InputError, match=rf"{path}:3:14: invalid JSON"):
        load_model_file(path)


def test_hf_config_missing_field_is_named(tmp_path):
    data = json.loads((HF_DIR / "llama-2-7b.json").read_text())
    del data["num_hidden_layers"]
    path = _write(tmp_path, "config.json", json.dumps(data))
    with pytest.raises(InputError, match=r"config\.json: num_hidden_layers: Field required"):
        load_model_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        resolve_model(str(tmp_path / "absent.yaml"))
