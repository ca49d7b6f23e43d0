"""The bundled model library and loading of models: memcalc YAML, Hugging Face config.json (a file,
a directory or a Hub id), GGUF files; and the weights a checkpoint stores, read from its headers."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memcalc.config import ModelConfig, model_from_trusted, parse
from memcalc.errors import InputError

if TYPE_CHECKING:
    from memcalc.checkpoint import CheckpointTensors
    from memcalc.gguf_file import GGUFModel

_PACKAGE_DIR = Path(__file__).resolve().parent


def configs_dir() -> Path:
    """``configs/`` inside an installed wheel, else the repository's top-level ``configs/``
    (editable installs and source checkouts)."""
    for candidate in (_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent / "configs"):
        if (candidate / "models").is_dir():
            return candidate
    raise InputError(f"model library not found (looked in {_PACKAGE_DIR / 'configs'} and {_PACKAGE_DIR.parent / 'configs'})")


def models_dir() -> Path:
    return configs_dir() / "models"


def bundled_model_names() -> list[str]:
    """Canonical names, from file names alone (cheap enough for shell completion)."""
    return sorted(path.stem for path in models_dir().glob("*.yaml"))


def read_yaml(path: Path) -> object:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.load(text, Loader=loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        raise InputError(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: invalid YAML: {exc}") from None


def _read_json(path: Path) -> object:
    import json  # only a config.json needs it: a bundled model's start-up leaves it out

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None


def _read_model_mapping(path: Path) -> dict:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of model fields, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return data


def load_model_yaml(path: Path) -> ModelConfig:
    """A memcalc model file: every field is checked and unknown keys are errors (typos)."""
    return parse(ModelConfig, _read_model_mapping(path), str(path))


def _load_bundled(path: Path) -> ModelConfig:
    return model_from_trusted(_read_model_mapping(path))


def load_hf_config(path: Path, *, assume_llama: bool = False, name: str | None = None,
                   source: str | None = None) -> ModelConfig:
    """A Hugging Face ``config.json`` (or a directory holding one), read locally with ``json``.
    ``assume_llama`` reads an unknown ``model_type`` as a Llama block instead of refusing it;
    ``name`` and ``source`` replace the ones taken from the file (a Hub id names its model)."""
    from memcalc.hf import model_from_hf

    if path.is_dir():
        path = path / "config.json"
    data = _read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if name is None:
        # _name_or_path is a Hub id when the file was saved from one; a local save writes its path ("./")
        saved_as = str(data.get("_name_or_path") or "")
        local_save = saved_as.startswith((".", "/", "~")) or saved_as.strip("./") == ""
        name = saved_as if not local_save else (path.parent.resolve().name if path.name == "config.json" else path.stem)
    return model_from_hf(data, name=str(name), source=source or str(path), assume_llama=assume_llama)


def load_gguf_model(path: Path) -> ModelConfig:
    """A ``.gguf`` file's architecture fields as a model; one line naming the architecture and the
    missing fields when memcalc cannot model it."""
    gguf = _read_gguf(path)
    derived = gguf.model_fields()
    if not derived.complete:
        problems = [*derived.notes]
        if derived.missing:
            problems.append(f"missing {', '.join(derived.missing)}")
        raise InputError(f"{path}: cannot model GGUF architecture {gguf.architecture!r}: {'; '.join(problems)}")
    return parse(ModelConfig, derived.fields, str(path))


def _read_gguf(path: Path) -> GGUFModel:
    """``read_gguf``, once per file and version of it in this process (show and infer read it twice)."""
    stat = path.stat()
    return _read_gguf_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@cache
def _read_gguf_cached(path: str, _mtime_ns: int, _size: int) -> GGUFModel:
    from memcalc.gguf_file import read_gguf

    return read_gguf(path)


_MODEL_FILE_SUFFIXES = (".yaml", ".yml", ".json", ".gguf")


def _is_local_path(reference: str) -> bool:
    return reference.endswith(_MODEL_FILE_SUFFIXES) or Path(reference).exists()


def _looks_like_path(reference: str) -> bool:
    return "/" in reference or reference.startswith(("~", "."))


def load_model_file(path: Path, *, assume_llama: bool = False) -> ModelConfig:
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir() or path.suffix == ".json":
        return load_hf_config(path, assume_llama=assume_llama)
    if path.suffix in (".yaml", ".yml"):
        return load_model_yaml(path)
    if path.suffix == ".gguf":
        return load_gguf_model(path)
    raise InputError(f"{path}: expected a .yaml model file, a config.json (or a directory holding one) or a .gguf file")


def hub_source(repo_id: str, revision: str | None) -> str:
    return f"hf://{repo_id}@{revision or 'main'}"


def load_hub_model(repo_id: str, *, revision: str | None = None, assume_llama: bool = False) -> ModelConfig:
    """A Hub id's ``config.json``, through the Hugging Face cache (``memcalc.hub``), named by the id."""
    from memcalc import hub

    path = hub.resolve_config(repo_id, revision)
    return load_hf_config(path, assume_llama=assume_llama, name=repo_id, source=hub_source(repo_id, revision))


@cache
def bundled_models() -> dict[str, ModelConfig]:
    """Every bundled model by canonical name (reads all files: use ``resolve_model`` for one)."""
    return {path.stem: _load_bundled(path) for path in sorted(models_dir().glob("*.yaml"), key=lambda p: p.stem)}


def _alias_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for name, model in bundled_models().items():
        index[name.lower()] = name
        for alias in model.aliases:
            index[alias.lower()] = name
    return index


def _bundled_path(reference: str) -> Path | None:
    direct = models_dir() / f"{reference}.yaml"
    return direct if direct.is_file() else None


def resolve_model(reference: str, *, revision: str | None = None, assume_llama: bool = False) -> ModelConfig:
    """A bundled name or alias (case-insensitive), a path to a model file (memcalc .yaml, config.json
    or a directory holding one, .gguf), or a Hugging Face Hub id (``org/name``, at ``revision``).

    A bundled model whose file name matches is read alone; aliases need the whole library."""
    direct = _bundled_path(reference)
    if direct is not None:
        _check_revision(reference, revision)
        return _load_bundled(direct)
    index = _alias_index()
    if reference.lower() in index:
        _check_revision(reference, revision)
        return bundled_models()[index[reference.lower()]]
    if _is_local_path(reference):
        _check_revision(reference, revision)
        return load_model_file(Path(reference), assume_llama=assume_llama)
    from memcalc.hub import is_hub_id

    if is_hub_id(reference):
        return load_hub_model(reference, revision=revision, assume_llama=assume_llama)
    if _looks_like_path(reference):
        return load_model_file(Path(reference), assume_llama=assume_llama)
    import difflib

    suggestions = difflib.get_close_matches(reference.lower(), list(index), n=3, cutoff=0.6)
    suggested = list(dict.fromkeys(index[match] for match in suggestions))
    hint = f"; did you mean {', '.join(suggested)}?" if suggested else ""
    raise InputError(f"unknown model {reference!r}{hint} (`memcalc models` lists the library; a path to a .yaml, "
                     "config.json or .gguf, or a Hugging Face id such as Qwen/Qwen3-8B also works)")


def _check_revision(reference: str, revision: str | None) -> None:
    if revision is not None:
        raise InputError(f"--revision {revision!r}: applies to Hugging Face Hub ids (org/name), not to {reference!r}")


# --- Weights as a checkpoint stores them ------------------------------------------------------------


@dataclass(frozen=True)
class StoredWeights:
    """The tensors a model's files hold, read from their headers (never the data): a GGUF file's
    tensor infos, or safetensors headers (a local directory, or a Hub id's cache or HTTP headers)."""

    location: str  # the path, or hf://org/name@revision
    gguf: GGUFModel | None = None
    checkpoint: CheckpointTensors | None = None

    @property
    def format(self) -> str:
        return "gguf" if self.gguf is not None else "safetensors"


def stored_weights(reference: str, *, revision: str | None = None,
                   warn: Any = None) -> StoredWeights | None:
    """The checkpoint behind ``reference`` (as ``resolve_model`` resolved it), or None: bundled
    models, memcalc YAML, a config.json without weights beside it, an uncached Hub id offline.
    ``warn(message)`` receives a Hub header fetch that failed (the estimate still stands)."""
    if _bundled_path(reference) is not None or reference.lower() in _alias_index():
        return None
    if _is_local_path(reference):
        path = Path(reference)
        if path.suffix == ".gguf" and path.is_file():
            return StoredWeights(str(path), gguf=_read_gguf(path))
        folder = path if path.is_dir() else path.parent if path.name == "config.json" else None
        return _local_safetensors(folder) if folder is not None else None
    from memcalc import hub

    if not hub.is_hub_id(reference):
        return None
    location = hub_source(reference, revision)
    files = hub.cached_safetensors_files(reference, revision)
    if files is not None:
        from memcalc.checkpoint import read_checkpoint

        return StoredWeights(location, checkpoint=read_checkpoint(files[0]))
    try:
        checkpoint = hub.safetensors_metadata(reference, revision)
    except InputError as exc:
        if warn is not None:
            warn(f"checkpoint headers not read ({exc}); the estimate uses the config")
        return None
    return StoredWeights(location, checkpoint=checkpoint) if checkpoint is not None else None


def _local_safetensors(folder: Path) -> StoredWeights | None:
    from memcalc.checkpoint import INDEX_FILE_NAME, SINGLE_FILE_NAME, read_checkpoint

    if not ((folder / INDEX_FILE_NAME).is_file() or (folder / SINGLE_FILE_NAME).is_file()):
        return None
    return StoredWeights(str(folder), checkpoint=read_checkpoint(folder))
