"""Mamba-2 training activations: the estimator against mamba_ssm's fused kernel on fake tensors.

    PYTHONPATH=<triton>:<mamba_ssm sources>:<causal_conv1d sources> python benchmarks/mamba_accuracy.py
    python benchmarks/mamba_accuracy.py --csv benchmarks/results/mamba_fake.csv

Each case builds the transformers class from a layer-reduced config.json (transformers'
configuration defaults: Mamba2Config's are Mamba-Codestral-7B's sizes), runs two training iterations through
memcalc.validate.mamba (mamba_ssm's MambaSplitConv1dScanCombinedFn with its Triton launches and
CUDA extensions stubbed; see that module) and compares the second with ``estimate_training``,
phase by phase, and a middle layer's saved bytes and backward peak with the formula
(memcalc/estimate/activations.py ``mamba2_saved_bytes``, ``mamba2_backward_transient``).
The hybrids run through the same harness with transformers' own classes: Nemotron-H
(NemotronHForCausalLM; tests/data/hf_configs/nvidia--Nemotron-H-56B-Base-8K.json cut to 7 blocks
``M-M*-M-``: Mamba-2, MLP and attention blocks) and dense Granite-4.0-H (GraniteMoeHybridForCausalLM;
GraniteMoeHybridConfig with sizes chosen like granite-4.0-h-micro's, not read from its file: h 2048,
4 layers mamba/mamba/attention/mamba, shared MLP 8192, no experts). For them the layer rows are
each kind of block's saved bytes (a layer past the second: the probe's first two readings hold an
extra stream tensor, the hook's input) against ``memcalc.estimate.training._hybrid_layer``. The
hybrids with experts (Nemotron-3-Nano's own config.json cut to 7 blocks, a Granite-4.0-H with experts)
run transformers 5's grouped_mm experts (``hf_grouped_moe_saved_bytes``), bf16 weights only.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memcalc.config import TrainSettings  # noqa: E402
from memcalc.estimate.activations import (  # noqa: E402
    ActivationShape,
    mamba2_backward_transient,
    mamba2_saved_bytes,
    mamba2_weight_copy_elements,
)
from memcalc.estimate.training import StagePlan as _StagePlan  # noqa: E402
from memcalc.estimate.training import check_trainable, estimate_training, mamba2_hybrid  # noqa: E402
from memcalc.errors import InputError  # noqa: E402
from memcalc.hf import model_from_hf  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    model_type: str
    overrides: dict
    precision: str  # a recipe of memcalc.precision.RECIPES
    recompute: str = "none"
    batch: int = 1
    seq: int = 2048
    base: str | None = None  # a config.json (relative to the repository) the overrides apply to


CODESTRAL = ("Mamba-Codestral (Mamba2Config defaults)", "mamba2", {"num_hidden_layers": 4})

CASES = [
    Case(*CODESTRAL, "mixed-bf16"),
    Case(*CODESTRAL, "amp-bf16"),
    Case(*CODESTRAL, "mixed-bf16", "full"),
    Case(*CODESTRAL, "amp-bf16", "full"),
    Case(*CODESTRAL, "pure-bf16", batch=2, seq=4096),
    # a sequence that is not a whole number of chunks; its layer_backward_peak row (-5.8%) is not padding
    # (s1024 reads -4.4%): at short sequences the layer's peak is in in_proj's weight-gradient backward,
    # where the probe counts the layer's own weight gradients (the estimator: in the phase's gradients)
    Case(*CODESTRAL, "mixed-bf16", seq=1000),
]

NEMOTRON_H = ("Nemotron-H-56B (7 blocks M-M*-M-)", "nemotron_h",
              {"hybrid_override_pattern": "M-M*-M-", "num_hidden_layers": 7})
NEMOTRON_H_BASE = "tests/data/hf_configs/nvidia--Nemotron-H-56B-Base-8K.json"
GRANITE_H = ("Granite-4.0-H dense (h2048, 4 layers MM*M)", "granitemoehybrid",
             {"hidden_size": 2048, "num_hidden_layers": 4, "layer_types": ["mamba", "mamba", "attention", "mamba"],
              "num_attention_heads": 16, "num_key_value_heads": 4, "shared_intermediate_size": 8192,
              "num_local_experts": 0, "mamba_n_heads": 64, "mamba_d_head": 64, "mamba_d_state": 128,
              "mamba_n_groups": 1, "mamba_expand": 2, "vocab_size": 100352, "position_embedding_type": "nope"})

CASES += [
    Case(*NEMOTRON_H, "mixed-bf16", base=NEMOTRON_H_BASE),
    Case(*NEMOTRON_H, "amp-bf16", base=NEMOTRON_H_BASE),
    Case(*NEMOTRON_H, "mixed-bf16", "full", base=NEMOTRON_H_BASE),
    Case(*NEMOTRON_H, "amp-bf16", "full", base=NEMOTRON_H_BASE),
    Case(*NEMOTRON_H, "pure-bf16", batch=2, seq=4096, base=NEMOTRON_H_BASE),
    Case(*NEMOTRON_H, "mixed-bf16", seq=1000, base=NEMOTRON_H_BASE),
    Case(*GRANITE_H, "mixed-bf16"),
    Case(*GRANITE_H, "amp-bf16"),
    Case(*GRANITE_H, "mixed-bf16", "full"),
    Case(*GRANITE_H, "amp-bf16", "full"),
    Case(*GRANITE_H, "pure-bf16", batch=2, seq=4096),
]

# Hybrids with experts, transformers 5's grouped_mm experts (bf16 weights: grouped_mm takes no fp32
# ones, so no amp rows): NVIDIA-Nemotron-3-Nano-30B-A3B's own config.json cut to 7 blocks MEM*EME (its
# 128 experts of 1856, top-6, a shared expert of 3712); a Granite-4.0-H with experts, sizes chosen
# (h 2048, 32 experts of 512, top-8, a shared MLP of 1024; GraniteMoeHybridConfig field names)
NEMOTRON_NANO = ("Nemotron-3-Nano-30B-A3B (7 blocks MEM*EME)", "nemotron_h",
                 {"hybrid_override_pattern": "MEM*EME", "num_hidden_layers": 7})
NEMOTRON_NANO_BASE = "tests/data/hf_configs/nvidia--NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json"
GRANITE_MOE = ("Granite-4.0-H MoE (h2048, 32 experts, MM*M)", "granitemoehybrid",
               {**GRANITE_H[2], "shared_intermediate_size": 1024, "num_local_experts": 32, "num_experts_per_tok": 8,
                "intermediate_size": 512, "vocab_size": 49160})

CASES += [
    Case(*NEMOTRON_NANO, "mixed-bf16", base=NEMOTRON_NANO_BASE),
    Case(*NEMOTRON_NANO, "pure-bf16", base=NEMOTRON_NANO_BASE),
    Case(*NEMOTRON_NANO, "mixed-bf16", "full", base=NEMOTRON_NANO_BASE),
    Case(*NEMOTRON_NANO, "pure-bf16", batch=2, seq=4096, base=NEMOTRON_NANO_BASE),
    Case(*GRANITE_MOE, "mixed-bf16"),
    Case(*GRANITE_MOE, "pure-bf16"),
    Case(*GRANITE_MOE, "mixed-bf16", "full"),
    Case(*GRANITE_MOE, "pure-bf16", batch=2, seq=4096),
]


def config_file(case: Case, directory: Path) -> tuple[Path, dict]:
    import transformers

    if case.base is not None:
        data = json.loads((REPO / case.base).read_text())
    else:
        config = transformers.CONFIG_MAPPING[case.model_type](**case.overrides)
        data = json.loads(config.to_json_string())
    data.update(case.overrides)  # the Hub's spelling of layer types, which transformers 5 renames
    data["use_cache"] = False  # training: no cache, so the mixers take the fused kernel
    if "time_step_limit" in data:  # JSON has no infinity: transformers writes it as an object
        data["time_step_limit"] = [0.0, float("inf")]
    path = directory / f"{case.model_type}-{abs(hash(json.dumps(case.overrides, sort_keys=True)))}.json"
    path.write_text(json.dumps(data))
    return path, data


def _shape(case: Case, e_stream: int) -> ActivationShape:
    tokens = case.batch * case.seq
    return ActivationShape(tokens=tokens, seq_len=case.seq, batch_size=case.batch, element_bytes=2,
                           stream_bytes=e_stream, autocast=case.precision.startswith("amp"))


def run_case(case: Case, directory: Path) -> list[tuple[str, int | None, int]]:
    """(quantity, estimated, measured) rows."""
    from memcalc.validate.mamba import LayerProbe, measure_training
    from memcalc.validate.run import TrainWorkload

    path, data = config_file(case, directory)
    model = model_from_hf(data, name=case.name, source=str(path))
    probe = LayerProbe()
    workload = TrainWorkload(precision=case.precision, batch_size=case.batch, seq_len=case.seq, impl="hf",
                             recompute=case.recompute)
    measured = measure_training(model, workload, probe=probe)
    rows = []
    autocast = case.precision.startswith("amp")
    mamba_layers = [index for index, kind in enumerate(model.resolved_layer_types) if kind.value == "mamba"]
    if case.recompute == "none" and mamba2_hybrid(model):
        rows += _hybrid_layer_rows(model, case, probe)
    elif case.recompute == "none":
        # a middle Mamba-2 layer: what it adds to the forward's live bytes (its saved tensors; the
        # residual stream replaces its predecessor), and the most its backward adds to what it starts with
        index = mamba_layers[1] if mamba_layers[1] >= 2 else mamba_layers[-1]
        forward = probe.forward
        held = forward[index] - forward[index - 1]
        if model.separate_blocks:  # the layer before was an MLP block: measure against the one before it
            held = None
        shape = _shape(case, 4 if autocast else 2)
        saved = mamba2_saved_bytes(model, shape) + (2 * mamba2_weight_copy_elements(model) if autocast else 0)
        if held is not None:
            rows.append(("layer_saved", saved, held))
        start, peak, _end = probe.backward[index]
        # the formula's transient is beyond the saved tensors and an e-byte gradient of the stream;
        # the probe's start holds the stream gradient in its own dtype
        from memcalc.estimate.activations import mamba2_residual_in_fp32

        wide = autocast or mamba2_residual_in_fp32(model)
        rows.append(("layer_backward_peak", mamba2_backward_transient(model, shape)
                     - (2 * case.batch * case.seq * model.hidden_size if wide else 0), peak - start))
    try:
        check_trainable(model)
        settings = TrainSettings(precision=case.precision, batch_size=case.batch, seq_len=case.seq,
                                 recompute=case.recompute)
        estimate = estimate_training(model, settings)
    except InputError:
        estimate = None
    for phase in ("forward", "backward", "optimizer_step"):
        estimated = None
        if estimate is not None:
            estimated = estimate.phases[phase]
        rows.append((f"phase:{phase}", estimated, measured.phases[phase].peak_bytes))
    if estimate is not None:
        activations = next(c.bytes for c in estimate.components if c.key == "activations")
        rows.append(("activations", activations, measured.components["activations"]))
    return rows


def _hybrid_layer_rows(model, case: Case, probe) -> list[tuple[str, int, int]]:
    """Each kind of block's saved bytes, estimated (the estimator's layer stack) and measured (what a
    layer past the second adds to the forward's live bytes)."""
    from memcalc.estimate.training import _activation_context, _layer_stack, resolve_recipe
    from memcalc.parallel import ParallelConfig

    settings = TrainSettings(precision=case.precision, batch_size=case.batch, seq_len=case.seq)
    plan = _StagePlan(model, case.seq, 1, True, True, 0, linear_inputs_saved=False)
    stack = _layer_stack(_activation_context(plan, settings, resolve_recipe(settings, ParallelConfig())))
    rows, seen = [], set()
    for index in range(2, len(stack.kinds)):
        kind = stack.kinds[index]
        name = f"layer_saved:{model.resolved_layer_types[index].value}/{kind.block}"
        if name in seen:
            continue
        seen.add(name)
        rows.append((name, stack.by_kind[kind][0], probe.forward[index] - probe.forward[index - 1]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    from memcalc.validate.mamba import available

    if not available():
        print("mamba_ssm / causal_conv1d sources or triton are not importable: see memcalc/validate/mamba.py")
        return 2
    results = []
    with tempfile.TemporaryDirectory() as directory:
        for case in CASES:
            rows = run_case(case, Path(directory))
            for quantity, estimated, measured in rows:
                error = None if estimated is None else 100 * (estimated - measured) / measured
                results.append((case, quantity, estimated, measured, error))
                print(f"{case.name:42s} {case.precision:10s} rc-{case.recompute:4s} b{case.batch} s{case.seq:<5d} "
                      f"{quantity:22s} est {'-' if estimated is None else f'{estimated:>14,}'} "
                      f"meas {measured:>14,} {'' if error is None else f'{error:+.3f}%'}")
    if args.csv:
        with args.csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case", "model_type", "precision", "recompute", "batch", "seq", "quantity",
                             "estimated_bytes", "measured_bytes", "error_percent"])
            for case, quantity, estimated, measured, error in results:
                writer.writerow([case.name, case.model_type, case.precision, case.recompute, case.batch, case.seq,
                                 quantity, "" if estimated is None else estimated, measured,
                                 "" if error is None else f"{error:.4f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
