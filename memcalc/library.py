"""The bundled model library and loading of model files (memcalc YAML or Hugging Face config.json)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from memcalc.config import ModelConfig, model_from_trusted, parse
from memcalc.errors import InputError

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


def load_hf_config(path: Path) -> ModelConfig:
    """A Hugging Face ``config.json`` (or a directory holding one), read locally with ``json``."""
    from pydantic import ValidationError

    from memcalc.errors import describe_validation_error
    from memcalc.hf import HFConfig

    if path.is_dir():
        path = path / "config.json"
    data = _read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    # Multimodal configs nest the language model.
    text_config = data.get("text_config")
    if isinstance(text_config, dict):
        data = {"model_type": text_config.get("model_type", data.get("model_type", "")), **text_config}
    try:
        hf_config = HFConfig.model_validate(data)
    except ValidationError as exc:
        raise InputError(describe_validation_error(exc, str(path))) from None
    name = data.get("_name_or_path") or (path.parent.resolve().name if path.name == "config.json" else path.stem)
    return hf_config.to_model_config(name=str(name), source=str(path))


def _looks_like_path(reference: str) -> bool:
    return reference.endswith((".yaml", ".yml", ".json")) or "/" in reference or Path(reference).exists()


def load_model_file(path: Path) -> ModelConfig:
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir() or path.suffix == ".json":
        return load_hf_config(path)
    if path.suffix in (".yaml", ".yml"):
        return load_model_yaml(path)
    raise InputError(f"{path}: expected a .yaml model file, a config.json or a directory holding one")


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


def resolve_model(reference: str) -> ModelConfig:
    """A bundled name or alias (case-insensitive), or a path to a model file.

    A bundled model whose file name matches is read alone; aliases need the whole library."""
    direct = models_dir() / f"{reference}.yaml"
    if direct.is_file():
        return _load_bundled(direct)
    index = _alias_index()
    if reference.lower() in index:
        return bundled_models()[index[reference.lower()]]
    if _looks_like_path(reference):
        return load_model_file(Path(reference))
    import difflib

    suggestions = difflib.get_close_matches(reference.lower(), list(index), n=3, cutoff=0.6)
    suggested = list(dict.fromkeys(index[match] for match in suggestions))
    hint = f"; did you mean {', '.join(suggested)}?" if suggested else ""
    raise InputError(f"unknown model {reference!r}{hint} (`memcalc models` lists the library; a path to a .yaml or config.json also works)")
