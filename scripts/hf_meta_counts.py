#!/usr/bin/env python3
"""Count parameters of real Hugging Face configs by building the transformers
model class on the meta device.

For each entry of tests/data/hf_configs/manifest.yaml this script loads the
checkpoint's config.json, builds the class named in ``architectures`` (or
AutoModelForCausalLM) under ``torch.device("meta")`` and writes back:

  meta_params         sum(p.numel() for p in model.parameters())
  meta_params_text    the same, excluding tensors whose name mentions the
                      vision tower / projector (only for multimodal classes)
  meta_params_vision  the excluded part (vision tower + projector)
  meta_build_s        seconds the build took
  meta_class          the class that was built
  meta_error          why it could not be built, when it could not

A build slower than SLOW_S seconds (or an entry with ``meta_layers_reduced``
already set) is also repeated on a layer-reduced copy (num_hidden_layers = N,
per-layer lists truncated consistently); that count goes to
``meta_params_reduced``.

Usage: python scripts/hf_meta_counts.py [--only SUBSTR] [--no-write]
Needs torch and transformers (>= 5); no network.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "hf_configs"
MANIFEST = DATA / "manifest.yaml"
SLOW_S = 20.0
DEFAULT_REDUCED_LAYERS = 4

VISION_MARKERS = (
    "vision",
    "multi_modal_projector",
    "vision_model",
    "vision_tower",
    "visual",
    "mm_projector",
    "patch_merger",
)

# Per-layer list keys that must be truncated together with num_hidden_layers.
PER_LAYER_LIST_KEYS = ("layer_types", "no_rope_layers", "moe_layers", "layers_block_type")
# Index lists (entries are layer indices) that must be filtered.
LAYER_INDEX_KEYS = ("mlp_only_layers",)


def _prepare_dict(raw: dict) -> dict:
    """Turn a raw config.json dict into kwargs transformers can build."""
    cfg = copy.deepcopy(raw)
    # Quantized checkpoints: count the logical (unquantized) parameters.
    cfg.pop("quantization_config", None)
    cfg.pop("auto_map", None)
    if cfg.get("model_type") == "kimi_k2":
        # trust_remote_code is unavailable; Kimi K2 is DeepSeek-V3 shaped.
        cfg["model_type"] = "deepseek_v3"
    for sub in ("text_config",):
        if isinstance(cfg.get(sub), dict):
            cfg[sub].pop("quantization_config", None)
    return cfg


def _reduce_layers(cfg: dict, n: int) -> dict:
    cfg = copy.deepcopy(cfg)
    targets = [cfg]
    if isinstance(cfg.get("text_config"), dict):
        targets = [cfg["text_config"]]
    for t in targets:
        old = t.get("num_hidden_layers")
        if old is None:
            continue
        n_eff = min(n, old)
        t["num_hidden_layers"] = n_eff
        for key in PER_LAYER_LIST_KEYS:
            v = t.get(key)
            if isinstance(v, list) and len(v) == old:
                t[key] = v[:n_eff]
            elif isinstance(v, str) and len(v) == old:
                t[key] = v[:n_eff]
        for key in LAYER_INDEX_KEYS:
            v = t.get(key)
            if isinstance(v, list):
                t[key] = [i for i in v if i < n_eff]
        # hybrid pattern strings (nemotron-h style)
        v = t.get("hybrid_override_pattern")
        if isinstance(v, str) and len(v) == old:
            t["hybrid_override_pattern"] = v[:n_eff]
        if "max_window_layers" in t and isinstance(t["max_window_layers"], int):
            t["max_window_layers"] = min(t["max_window_layers"], n_eff)
    return cfg


def _build_config(cfg: dict):
    from transformers import AutoConfig

    model_type = cfg["model_type"]
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    return AutoConfig.for_model(model_type, **kwargs)


def _model_class(cfg: dict):
    import transformers

    for arch in cfg.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def count(raw: dict) -> dict:
    import torch

    cfg = _prepare_dict(raw)
    config = _build_config(cfg)
    cls = _model_class(cfg)
    t0 = time.perf_counter()
    with torch.device("meta"):
        if cls.__name__.startswith("Auto"):
            model = cls.from_config(config)
        else:
            model = cls(config)
    dt = time.perf_counter() - t0
    total = 0
    vision = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if any(m in name for m in VISION_MARKERS):
            vision += n
    out = {
        "meta_class": type(model).__name__,
        "meta_params": int(total),
        "meta_build_s": round(dt, 2),
    }
    if vision:
        out["meta_params_text"] = int(total - vision)
        out["meta_params_vision"] = int(vision)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="only entries whose file contains this")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    entries = yaml.safe_load(MANIFEST.read_text())
    for e in entries:
        if args.only and args.only not in e["file"]:
            continue
        raw = json.loads((DATA / e["file"]).read_text())
        for k in ("meta_error", "meta_params_reduced", "meta_params_text", "meta_params_vision"):
            e.pop(k, None)
        try:
            res = count(raw)
            e.update(res)
            slow = res["meta_build_s"] > SLOW_S
            if slow or e.get("meta_layers_reduced"):
                n = int(e.get("meta_layers_reduced") or DEFAULT_REDUCED_LAYERS)
                red = count(_reduce_layers(_prepare_dict(raw), n))
                e["meta_layers_reduced"] = n
                e["meta_params_reduced"] = red["meta_params"]
                if slow:
                    e["meta_slow"] = True
        except Exception as exc:  # record, keep going
            e["meta_error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(
            f"{e['file']:60s} {e.get('meta_params', '-')!s:>16} "
            f"text={e.get('meta_params_text', '-')!s:>16} "
            f"{e.get('meta_build_s', '-')}s {e.get('meta_error', '')}",
            flush=True,
        )
    if not args.no_write:
        MANIFEST.write_text(yaml.safe_dump(entries, sort_keys=False, width=120))
    return 0


if __name__ == "__main__":
    sys.exit(main())
