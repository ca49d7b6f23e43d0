"""Hugging Face Hub ids through a cache built on disk, never the network.

The cache has the layout huggingface_hub writes (docs, "Understand caching"):
``models--{org}--{name}/refs/{branch}`` holds a commit hash, ``snapshots/{commit}/{file}`` links to
``blobs/{sha256}``. huggingface_hub reads ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, at import, into
``huggingface_hub.constants``: the fixture sets the environment and patches those constants too.
Every test fails if a socket connects or a host name is looked up.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hub_cache import add_to_cache
from memcalc import hub
from memcalc.checkpoint import TensorRole
from memcalc.errors import InputError

COMMIT_MAIN = "a" * 40
COMMIT_DEV = "b" * 40
COMMIT_OLD = "c" * 40
CONFIG_MAIN = {"model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36}
CONFIG_DEV = {"model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 40}
CONFIG_OLD = {"model_type": "qwen3", "hidden_size": 2048, "num_hidden_layers": 28}


def json_bytes(data: dict) -> bytes:
    return json.dumps(data).encode()


def safetensors_bytes(tmp_path: Path, arrays: dict[str, np.ndarray]) -> bytes:
    path = tmp_path / "scratch.safetensors"
    save_file(arrays, str(path))
    return path.read_bytes()


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- Hub ids --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reference", "expected"), [
    ("Qwen/Qwen3-8B", True),
    ("meta-llama/Llama-2-7b-hf", True),
    ("openai/gpt-oss-20b", True),
    ("mistralai/Mistral-7B-Instruct-v0.3", True),
    ("llama-2-7b", False),  # a bundled name: no slash
    ("./models/llama", False),
    ("/abs/path", False),
    ("org/name/config.json", False),
    ("org/config.json", False),
    ("org/model.yaml", False),
    ("TheBloke/model.Q4_K_M.gguf", False),
    ("org/weights.safetensors", False),
    ("a/b/c", False),
    ("org--x/name", False),
    ("org/na..me", False),
    ("-org/name", False),
    ("org/name-", False),
    ("org/" + "n" * 100, False),
])
def test_is_hub_id(reference, expected):
    assert hub.is_hub_id(reference) is expected


def test_existing_local_directory_is_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.is_hub_id("org/name") is False


# --- config.json from the cache, offline ------------------------------------------------------------


def test_cached_config_resolves_offline(hub_cache):
    snapshot = add_to_cache(hub_cache, "Qwen/Qwen3-8B", COMMIT_MAIN, {"config.json": json_bytes(CONFIG_MAIN)})
    path = hub.resolve_config("Qwen/Qwen3-8B")
    assert path == snapshot / "config.json"
    assert json.loads(path.read_text()) == CONFIG_MAIN


def test_uncached_id_offline_is_one_line_error(hub_cache):
    with pytest.raises(InputError) as excinfo:
        hub.resolve_config("Qwen/Qwen3-8B")
    assert one_line(excinfo) == ("Qwen/Qwen3-8B is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                                 "run once online or give a path")


@pytest.mark.parametrize(("revision", "expected"), [
    (None, CONFIG_MAIN),
    ("main", CONFIG_MAIN),
    ("dev", CONFIG_DEV),  # a branch: refs/dev names its commit
    (COMMIT_OLD, CONFIG_OLD),  # a commit hash: its snapshot folder, no ref needed
])
def test_revision_picks_its_snapshot(hub_cache, revision, expected):
    add_to_cache(hub_cache, "org/model", COMMIT_MAIN, {"config.json": json_bytes(CONFIG_MAIN)})
    add_to_cache(hub_cache, "org/model", COMMIT_DEV, {"config.json": json_bytes(CONFIG_DEV)}, refs=("dev",))
    add_to_cache(hub_cache, "org/model", COMMIT_OLD, {"config.json": json_bytes(CONFIG_OLD)}, refs=())
    assert json.loads(hub.resolve_config("org/model", revision).read_text()) == expected


def test_uncached_revision_offline(hub_cache):
    add_to_cache(hub_cache, "org/model", COMMIT_MAIN, {"config.json": json_bytes(CONFIG_MAIN)})
    with pytest.raises(InputError) as excinfo:
        hub.resolve_config("org/model", "v2.0")
    assert one_line(excinfo).startswith("org/model at revision 'v2.0' is not in the Hugging Face cache")


# --- Failures huggingface_hub reports, each one line ----------------------------------------------


def _http_error(name: str, status: int):
    """An instance of ``huggingface_hub.errors.<name>`` with a response of ``status``, built with the
    HTTP library this huggingface_hub uses (its errors module imports ``Response`` from it)."""
    from huggingface_hub import errors

    response_class = errors.Response
    client = importlib.import_module(response_class.__module__.split(".")[0])
    if hasattr(client, "Request") and client.__name__ != "requests":
        response = response_class(status, request=client.Request("GET", "https://huggingface.co/api/models/x"))
    else:  # requests (huggingface_hub 0.x)
        response = response_class()
        response.status_code = status
    return getattr(errors, name)(f"{status} Client Error: the server's own text\nwith a second line", response=response)


def _remote_entry_not_found():
    from huggingface_hub import errors

    name = "RemoteEntryNotFoundError" if hasattr(errors, "RemoteEntryNotFoundError") else "EntryNotFoundError"
    return _http_error(name, 404)


def _connect_error():
    from huggingface_hub import errors

    client = importlib.import_module(errors.Response.__module__.split(".")[0])
    return client.ConnectError("[Errno 101] Network is unreachable")


HUB_FAILURES = {
    "gated": (lambda: _http_error("GatedRepoError", 403), "meta-llama/Llama-3.1-8B is a gated repository", "HF_TOKEN"),
    "not-found": (lambda: _http_error("RepositoryNotFoundError", 401), "repository not found", "HF_TOKEN"),
    "revision": (lambda: _http_error("RevisionNotFoundError", 404), "revision 'nope' not found",
                 "branch, tag or commit"),
    "no-config": (_remote_entry_not_found, "has no config.json", ""),
    "server-error": (lambda: _http_error("HfHubHTTPError", 500), "Hugging Face Hub request failed", "500 Client Error"),
    "connection": (_connect_error, "network error while fetching config.json", "Network is unreachable"),
    "unreachable-online": (
        lambda: importlib.import_module("huggingface_hub.errors").LocalEntryNotFoundError("Connection error"),
        "cannot reach the Hugging Face Hub and config.json is not in the cache", ""),
}


@pytest.mark.parametrize(("make_error", "expected", "hint"), HUB_FAILURES.values(), ids=HUB_FAILURES.keys())
def test_hub_failures_become_one_line(hub_cache, monkeypatch, make_error, expected, hint):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def failing_download(*args, **kwargs):
        raise make_error()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    repo_id = "meta-llama/Llama-3.1-8B"
    with pytest.raises(InputError) as excinfo:
        hub.resolve_config(repo_id, "nope" if "revision" in expected else None)
    message = one_line(excinfo)
    assert expected in message and hint in message
    assert message.startswith(repo_id)


def test_unknown_exception_is_not_disguised(hub_cache, monkeypatch):
    import huggingface_hub

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not an input problem")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken)
    with pytest.raises(RuntimeError):
        hub.resolve_config("org/model")


def test_resolve_config_asks_for_config_json_only(hub_cache, monkeypatch):
    import huggingface_hub

    calls = []

    def recording_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("revision")))
        return str(hub_cache / "config.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording_download)
    hub.resolve_config("org/model", "dev")
    assert calls == [("org/model", "config.json", "dev")]


# --- Safetensors files in the cache ----------------------------------------------------------------


def test_cached_single_safetensors_file(hub_cache, tmp_path):
    arrays = {"model.embed_tokens.weight": np.zeros((16, 4), dtype=np.float16)}
    snapshot = add_to_cache(hub_cache, "org/small", COMMIT_MAIN, {
        "config.json": json_bytes(CONFIG_MAIN), "model.safetensors": safetensors_bytes(tmp_path, arrays)})
    assert hub.cached_safetensors_files("org/small") == [snapshot / "model.safetensors"]
    checkpoint = hub.checkpoint_tensors("org/small")
    assert (checkpoint.total_params, checkpoint.total_bytes) == (64, 128)


def test_cached_sharded_checkpoint(hub_cache, tmp_path):
    shard_1 = {"a.weight": np.zeros((8, 8), dtype=np.float32)}
    shard_2 = {"b.weight": np.zeros((4, 8), dtype=np.float16)}
    index = {"metadata": {"total_size": 256 + 64},
             "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}
    snapshot = add_to_cache(hub_cache, "org/sharded", COMMIT_MAIN, {
        "model.safetensors.index.json": json_bytes(index),
        "model-00001-of-00002.safetensors": safetensors_bytes(tmp_path, shard_1),
        "model-00002-of-00002.safetensors": safetensors_bytes(tmp_path, shard_2),
    })
    assert hub.cached_safetensors_files("org/sharded") == [
        snapshot / "model.safetensors.index.json",
        snapshot / "model-00001-of-00002.safetensors",
        snapshot / "model-00002-of-00002.safetensors",
    ]
    assert hub.checkpoint_tensors("org/sharded").total_bytes == 256 + 64


def test_partly_cached_shards_are_not_used(hub_cache, tmp_path):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    add_to_cache(hub_cache, "org/partial", COMMIT_MAIN, {
        "model.safetensors.index.json": json_bytes(index),
        "model-00001-of-00002.safetensors": safetensors_bytes(tmp_path, {"a": np.zeros(2, dtype=np.float32)}),
    })
    assert hub.cached_safetensors_files("org/partial") is None
    assert hub.checkpoint_tensors("org/partial") is None  # offline: no headers from the Hub either


def test_no_cached_weights(hub_cache):
    add_to_cache(hub_cache, "org/config-only", COMMIT_MAIN, {"config.json": json_bytes(CONFIG_MAIN)})
    assert hub.cached_safetensors_files("org/config-only") is None
    assert hub.cached_safetensors_files("org/never-seen") is None


def test_cached_weights_of_another_revision(hub_cache, tmp_path):
    arrays = {"w": np.zeros(3, dtype=np.float32)}
    add_to_cache(hub_cache, "org/m", COMMIT_MAIN, {"config.json": json_bytes(CONFIG_MAIN)})
    snapshot = add_to_cache(hub_cache, "org/m", COMMIT_DEV, {"model.safetensors": safetensors_bytes(tmp_path, arrays)},
                            refs=("dev",))
    assert hub.cached_safetensors_files("org/m") is None
    assert hub.cached_safetensors_files("org/m", "dev") == [snapshot / "model.safetensors"]


# --- Safetensors headers from the Hub --------------------------------------------------------------


def test_safetensors_metadata_offline_is_none(hub_cache, monkeypatch):
    import huggingface_hub

    def must_not_run(*args, **kwargs):
        raise AssertionError("get_safetensors_metadata called while offline")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", must_not_run)
    assert hub.safetensors_metadata("openai/gpt-oss-20b") is None


def _repo_metadata(files: dict[str, dict[str, tuple[str, list[int], tuple[int, int]]]]):
    """A ``SafetensorsRepoMetadata`` as get_safetensors_metadata returns it, built locally."""
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    files_metadata = {
        filename: SafetensorsFileMetadata(metadata={}, tensors={
            name: TensorInfo(dtype=dtype, shape=shape, data_offsets=offsets)
            for name, (dtype, shape, offsets) in tensors.items()})
        for filename, tensors in files.items()
    }
    weight_map = {name: filename for filename, tensors in files.items() for name in tensors}
    return SafetensorsRepoMetadata(metadata=None, sharded=len(files) > 1, weight_map=weight_map,
                                   files_metadata=files_metadata)


def test_safetensors_metadata_online(hub_cache, monkeypatch):
    """gpt-oss style MXFP4 expert weights, as headers the Hub would serve: 2 x 8 x 64 parameters."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    served = _repo_metadata({
        "model-00001-of-00002.safetensors": {
            "model.layers.0.mlp.experts.down_proj_blocks": ("U8", [2, 8, 2, 16], (0, 512)),
            "model.layers.0.mlp.experts.down_proj_scales": ("U8", [2, 8, 2], (512, 544)),
        },
        "model-00002-of-00002.safetensors": {"lm_head.weight": ("BF16", [32, 64], (0, 4096))},
    })
    calls = []

    def fake_metadata(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision))
        return served

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", fake_metadata)
    checkpoint = hub.safetensors_metadata("openai/gpt-oss-20b", "main")
    assert calls == [("openai/gpt-oss-20b", "main")]
    assert checkpoint.logical_params == 2 * 8 * 64 + 32 * 64
    assert checkpoint.total_bytes == 544 + 4096
    roles = {tensor.name: tensor.role for tensor in checkpoint.tensors}
    assert roles["model.layers.0.mlp.experts.down_proj_scales"] is TensorRole.SCALE


def test_safetensors_metadata_inconsistent_header_is_input_error(hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    served = _repo_metadata({"model.safetensors": {"w": ("F32", [4], (0, 12))}})
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", lambda *args, **kwargs: served)
    with pytest.raises(InputError) as excinfo:
        hub.safetensors_metadata("org/m")
    assert "org/m/model.safetensors: tensor w" in one_line(excinfo)


def test_repository_without_safetensors_is_none(hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import NotASafetensorsRepoError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def bin_only(*args, **kwargs):
        raise NotASafetensorsRepoError("'org/old' is not a safetensors repo")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", bin_only)
    assert hub.safetensors_metadata("org/old") is None


# --- huggingface_hub stays unimported until a Hub id is used ---------------------------------------


def test_bundled_model_does_not_import_huggingface_hub():
    code = (
        "import sys, memcalc.hub, memcalc.checkpoint, memcalc.gguf_file\n"
        "from memcalc.library import resolve_model\n"
        "resolve_model('llama-2-7b'); memcalc.hub.is_hub_id('Qwen/Qwen3-8B')\n"
        "print([m for m in ('huggingface_hub', 'gguf', 'numpy', 'safetensors') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
