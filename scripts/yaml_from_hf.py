"""Write a bundled model YAML from a checkpoint's own config.json (tests/data/hf_configs/).

    python scripts/yaml_from_hf.py tests/data/hf_configs/Qwen--Qwen3-8B.json qwen3-8b [--alias NAME ...]

The file is memcalc's reading of the config (memcalc.hf.model_from_hf) with the fields that equal
their defaults left out, so the YAML and the config.json cannot disagree: tests/test_library.py
imports both and compares them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import yaml

from memcalc.config import ModelConfig, config_as_dict
from memcalc.hf import model_from_hf

REPOSITORY = Path(__file__).resolve().parent.parent


def _non_default(instance, data: dict) -> dict:
    """``data`` (config_as_dict of ``instance``) without the fields that equal their default."""
    kept = {}
    for field in dataclasses.fields(instance):
        value = data[field.name]
        default = field.default if field.default is not dataclasses.MISSING else None
        plain_default = config_as_dict(default) if dataclasses.is_dataclass(default) else (
            default.value if hasattr(default, "value") else list(default) if isinstance(default, tuple) else default)
        nested = getattr(instance, field.name)
        if dataclasses.is_dataclass(nested) and value is not None:
            value = _non_default(nested, value)
        if value != plain_default or field.name in ("tie_word_embeddings",):
            kept[field.name] = value
    return kept


def model_yaml(config_path: Path, name: str, aliases: list[str]) -> str:
    data = json.loads(config_path.read_text())
    repo = config_path.stem.replace("--", "/", 1)
    model: ModelConfig = model_from_hf(data, name=name, source=str(config_path))
    fields = _non_default(model, config_as_dict(model))
    fields.update(name=name, aliases=[repo, *aliases], source=f"https://huggingface.co/{repo}/blob/main/config.json")
    order = ["name", "aliases", "source", "notes"]
    ordered = {key: fields[key] for key in order if key in fields} | {k: v for k, v in fields.items() if k not in order}
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=None, width=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("name")
    parser.add_argument("--alias", action="append", default=[])
    args = parser.parse_args()
    target = REPOSITORY / "configs" / "models" / f"{args.name}.yaml"
    target.write_text(model_yaml(args.config, args.name, args.alias))
    print(target)


if __name__ == "__main__":
    main()
