"""Hugging Face Hub model ids: ``config.json`` through the standard cache, never the weights.

Everything goes through ``huggingface_hub`` (imported inside each function, so a bundled model
never loads it), which reads its own settings: the cache (``HF_HUB_CACHE``, ``HF_HOME``), offline
mode (``HF_HUB_OFFLINE=1``) and the token for gated repositories (``HF_TOKEN`` or ``hf auth
login``). Downloads are limited to ``config.json`` (``hf_hub_download``). Safetensors headers come
either from files already in the cache (``try_to_load_from_cache``, which never downloads) or,
online, from ``get_safetensors_metadata``, which fetches only the headers with HTTP range requests
(huggingface_hub docs, "Interact with the Hub: get_safetensors_metadata"; cache layout: "Understand
caching": ``models--{org}--{name}/refs/{branch}``, ``snapshots/{commit}/``, ``blobs/``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NoReturn

from memcalc.checkpoint import (
    INDEX_FILE_NAME,
    SINGLE_FILE_NAME,
    CheckpointTensors,
    checkpoint_from_headers,
    read_checkpoint,
)
from memcalc.errors import InputError

CONFIG_FILE_NAME = "config.json"

# huggingface_hub's ``validate_repo_id``: letters, digits, ``-``, ``_`` and ``.``, no ``--`` or ``..``,
# neither starting nor ending with ``-`` or ``.``, at most 96 characters (``org/name``: one slash).
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".gguf", ".safetensors")


def is_hub_id(reference: str) -> bool:
    """An ``org/name`` Hub model id: not a local path that exists, not a model file name."""
    return (
        len(reference) <= 96
        and _REPO_ID.fullmatch(reference) is not None
        and "--" not in reference
        and ".." not in reference
        and not reference.lower().endswith(_FILE_SUFFIXES)
        and not Path(reference).exists()
    )


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it (its ``constants``, set at its import)."""
    from huggingface_hub import constants

    offline = getattr(constants, "is_offline_mode", None)
    return bool(offline() if callable(offline) else constants.HF_HUB_OFFLINE)


def resolve_config(repo_id: str, revision: str | None = None) -> Path:
    """The local path of the repository's ``config.json`` (downloaded into the standard cache when
    online and not already there; read from the cache when offline)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, CONFIG_FILE_NAME, revision=revision))
    except Exception as exc:  # noqa: BLE001 -- sorted into one-line messages; anything else re-raised
        _raise_input_error(exc, repo_id, revision, CONFIG_FILE_NAME)


def cached_safetensors_files(repo_id: str, revision: str | None = None) -> list[Path] | None:
    """``model.safetensors``, or ``model.safetensors.index.json`` followed by every shard it lists,
    when all of them are already in the cache; otherwise None. Never downloads."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> Path | None:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
        return Path(found) if isinstance(found, str) else None  # a sentinel marks a file known absent

    index = cached(INDEX_FILE_NAME)
    if index is not None:
        names = list(dict.fromkeys(_index_shards(index)))
        shards = [path for path in map(cached, names) if path is not None]
        return [index, *shards] if len(shards) == len(names) else None
    single = cached(SINGLE_FILE_NAME)
    return [single] if single is not None else None


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{index}: cannot read the weight_map of the cached index: {exc}") from None
    return [shard for shard in weight_map.values() if isinstance(shard, str)]


def safetensors_metadata(repo_id: str, revision: str | None = None) -> CheckpointTensors | None:
    """Per-tensor dtype and shape from the Hub's safetensors headers (HTTP range requests, no
    weights), validated like a local header. None when offline or the repository has no
    safetensors weights (``.bin`` only)."""
    if is_offline():
        return None
    from huggingface_hub import get_safetensors_metadata
    from huggingface_hub.errors import NotASafetensorsRepoError

    try:
        metadata = get_safetensors_metadata(repo_id, revision=revision)
    except NotASafetensorsRepoError:
        return None
    except Exception as exc:  # noqa: BLE001 -- sorted into one-line messages; anything else re-raised
        _raise_input_error(exc, repo_id, revision, "safetensors headers")
    headers = []
    for filename, file_metadata in metadata.files_metadata.items():
        header: dict[str, Any] = {
            name: {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.data_offsets)}
            for name, info in file_metadata.tensors.items()
        }
        # The buffer's size is not fetched: data past the end cannot be checked here.
        headers.append((f"{repo_id}/{filename}", header, None))
    return checkpoint_from_headers(headers)


def checkpoint_tensors(repo_id: str, revision: str | None = None) -> CheckpointTensors | None:
    """The repository's tensors: from cached safetensors files when present, else (online) from the
    Hub's headers; None when neither is available."""
    files = cached_safetensors_files(repo_id, revision)
    if files is not None:
        return read_checkpoint(files[0])
    return safetensors_metadata(repo_id, revision)


def _raise_input_error(exc: Exception, repo_id: str, revision: str | None, what: str) -> NoReturn:
    """One line for each failure huggingface_hub reports; an unknown exception propagates."""
    message = _describe_hub_error(exc, repo_id, revision, what)
    if message is None:
        raise exc
    raise InputError(message) from None


def _describe_hub_error(exc: Exception, repo_id: str, revision: str | None, what: str) -> str | None:
    from huggingface_hub import errors

    at = f" at revision {revision!r}" if revision else ""
    # Order matters: GatedRepoError is a RepositoryNotFoundError, and LocalEntryNotFoundError an
    # EntryNotFoundError (remote in huggingface_hub 0.x, the base class in 1.x).
    if isinstance(exc, errors.GatedRepoError):
        return (f"{repo_id} is a gated repository: accept its licence on https://huggingface.co/{repo_id} "
                "and set HF_TOKEN (or run `hf auth login`)")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (f"{repo_id}: repository not found on the Hugging Face Hub (if it is private, set HF_TOKEN "
                "to a token that can read it)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{repo_id}: revision {revision!r} not found (a branch, tag or commit hash of the repository)"
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        if is_offline():
            return (f"{repo_id}{at} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: run once online "
                    "or give a path")
        cause = exc.__cause__ or exc.__context__
        reason = f" ({type(cause).__name__}: {_first_line(cause)})" if isinstance(cause, Exception) else ""
        return f"{repo_id}{at}: cannot reach the Hugging Face Hub and {what} is not in the cache{reason}"
    if isinstance(exc, errors.EntryNotFoundError):
        return f"{repo_id}{at} has no {what}"
    if isinstance(exc, errors.HFValidationError):
        return f"{repo_id!r} is not a valid Hugging Face repository id: {_first_line(exc)}"
    if isinstance(exc, errors.SafetensorsParsingError):
        return f"{repo_id}{at}: cannot parse its safetensors headers: {_first_line(exc)}"
    if isinstance(exc, errors.HfHubHTTPError):
        return f"{repo_id}{at}: Hugging Face Hub request failed: {_first_line(exc)}"
    if _is_network_error(exc):
        return f"{repo_id}{at}: network error while fetching {what}: {_first_line(exc)}"
    return None


def _is_network_error(exc: Exception) -> bool:
    """Connection failures of whichever HTTP client huggingface_hub uses (requests in 0.x, httpx
    in 1.x, httpx2 in 2.x); their base classes differ, their modules say which they are."""
    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, (OSError, TimeoutError)) or module in ("requests", "httpx", "httpx2", "urllib3")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
