"""Tiny models written as config.json files, as a user brings them (memcalc.hf.model_from_hf)."""

from __future__ import annotations

import json

from memcalc.hf import model_from_hf


def model_from_config(base: dict, tmp_path=None, name: str = "tiny", **overrides):
    """``base`` with ``overrides`` read as a config.json (written under ``tmp_path`` when given, so the
    transformers class can be built from it)."""
    data = {**base, **overrides}
    source = ""
    if tmp_path is not None:
        path = tmp_path / "config.json"
        path.write_text(json.dumps(data))
        source = str(path)
    return model_from_hf(data, name=name, source=source)
