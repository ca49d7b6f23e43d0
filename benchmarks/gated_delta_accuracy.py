"""Qwen3-Next and Qwen3.5 training memory: the estimator against fla's chunked gated delta rule on fake tensors.

    python benchmarks/gated_delta_accuracy.py
    python benchmarks/gated_delta_accuracy.py --csv benchmarks/results/gated_delta_fake.csv

Each case builds transformers' Qwen3NextForCausalLM from a layer-reduced configuration with
Qwen3-Next-80B-A3B's layer sizes (Qwen3NextConfig field names: h 2048, layers linear/linear/full/
linear, 16 QK / 32 V linear heads of 128, 16 / 2 attention heads of 256, 512 experts of 512, top-10,
a shared expert of 512, vocabulary 151936; and Qwen3.5-9B's and Qwen3.5-35B-A3B's, below), runs two
training iterations through
memcalc.validate.gated_delta (fla's ChunkGatedDeltaRuleFunction and causal-conv1d with their Triton
launches and CUDA extensions stubbed; see that module) and compares the second with
``estimate_training``, phase by phase, and each kind of layer's saved bytes with the estimator's
layer stack. The small-vocabulary rows (2048) put the forward and backward peaks inside the layers
(fla's forward, the experts' reorder and backward) instead of at the loss. There is no activations
row: the tracker's activations are live bytes less the accumulated gradients, so they include the
512 experts' weight gradients (3.2 GB a layer) between their ``grouped_mm`` and their accumulation,
which the estimator counts as gradients (the phases compare the whole).

Needs fla (``pip install fla-core``), triton and causal_conv1d's sources on the path (the estimate
assumes causal-conv1d; see memcalc/validate/gated_delta.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memcalc.config import TrainSettings  # noqa: E402
from memcalc.estimate.training import StagePlan, _activation_context, _layer_stack, estimate_training  # noqa: E402
from memcalc.estimate.training import resolve_recipe  # noqa: E402
from memcalc.hf import model_from_hf  # noqa: E402

QWEN3_NEXT_80B = {"hidden_size": 2048, "num_hidden_layers": 4, "vocab_size": 151936, "head_dim": 256,
                  "num_attention_heads": 16, "num_key_value_heads": 2, "num_experts": 512, "num_experts_per_tok": 10,
                  "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "intermediate_size": 5120,
                  "linear_num_key_heads": 16, "linear_key_head_dim": 128, "linear_num_value_heads": 32,
                  "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "tie_word_embeddings": False,
                  "layer_types": ["linear_attention", "linear_attention", "full_attention", "linear_attention"]}


# Qwen3.5 (Qwen3_5TextConfig, Qwen3_5MoeTextConfig field names): Qwen3.5-9B's layer sizes (h 4096, 16 QK /
# 32 V linear heads of 128, 16 / 4 attention heads of 256, a dense MLP of 12288, vocabulary 248320) and
# Qwen3.5-35B-A3B's (h 2048, 2 KV heads, 256 experts of 512, top-8, a shared expert of 512)
QWEN3_5_9B = {"hidden_size": 4096, "num_hidden_layers": 4, "vocab_size": 248320, "head_dim": 256,
              "num_attention_heads": 16, "num_key_value_heads": 4, "intermediate_size": 12288,
              "linear_num_key_heads": 16, "linear_key_head_dim": 128, "linear_num_value_heads": 32,
              "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "tie_word_embeddings": False,
              "layer_types": QWEN3_NEXT_80B["layer_types"]}
QWEN3_5_35B_A3B = {**{key: value for key, value in QWEN3_5_9B.items() if key != "intermediate_size"},
                   "hidden_size": 2048, "num_key_value_heads": 2, "num_experts": 256, "num_experts_per_tok": 8,
                   "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512}
BASES = {"qwen3_next": QWEN3_NEXT_80B, "qwen3_5_text": QWEN3_5_9B, "qwen3_5_moe_text": QWEN3_5_35B_A3B}


@dataclass(frozen=True)
class Case:
    name: str
    precision: str
    recompute: str = "none"
    batch: int = 1
    seq: int = 2048
    overrides: dict = field(default_factory=dict)
    model_type: str = "qwen3_next"


FULL = "Qwen3-Next-80B-A3B (4 layers LLFL)"
SMALL_VOCAB = "Qwen3-Next-80B-A3B (4 layers, vocab 2048)"
CASES = [
    Case(FULL, "mixed-bf16"),
    Case(FULL, "pure-bf16"),
    Case(FULL, "mixed-bf16", "full"),
    Case(FULL, "pure-bf16", batch=2, seq=4096),
    Case(FULL, "mixed-bf16", seq=1000),
    Case(SMALL_VOCAB, "mixed-bf16", overrides={"vocab_size": 2048}),
    Case(SMALL_VOCAB, "mixed-bf16", "full", overrides={"vocab_size": 2048}),
    Case(SMALL_VOCAB, "pure-bf16", "full", batch=2, seq=1024, overrides={"vocab_size": 2048}),
    Case("Qwen3-Next (4 layers, 8 x 64 linear key heads, vocab 2048)", "mixed-bf16", seq=1000,
         overrides={"vocab_size": 2048, "linear_num_key_heads": 8, "linear_key_head_dim": 64}),
    Case("Qwen3.5-9B (4 layers LLFL)", "mixed-bf16", model_type="qwen3_5_text"),
    Case("Qwen3.5-9B (4 layers LLFL)", "mixed-bf16", "full", model_type="qwen3_5_text"),
    Case("Qwen3.5-9B (4 layers LLFL)", "pure-bf16", batch=2, seq=1000, model_type="qwen3_5_text"),
    Case("Qwen3.5-35B-A3B (4 layers LLFL)", "mixed-bf16", model_type="qwen3_5_moe_text"),
    Case("Qwen3.5-35B-A3B (4 layers LLFL)", "mixed-bf16", "full", model_type="qwen3_5_moe_text"),
    Case("Qwen3.5-35B-A3B (4 layers, vocab 2048)", "mixed-bf16", overrides={"vocab_size": 2048},
         model_type="qwen3_5_moe_text"),
]


def _model(case: Case, directory: Path):
    import transformers

    config = transformers.CONFIG_MAPPING[case.model_type](**{**BASES[case.model_type], **case.overrides})
    data = json.loads(config.to_json_string())
    data["use_cache"] = False  # training: no cache
    path = directory / f"{case.model_type}-{abs(hash(json.dumps(case.overrides, sort_keys=True)))}.json"
    path.write_text(json.dumps(data))
    return model_from_hf(data, name=case.name, source=str(path))


def run_case(case: Case, directory: Path) -> list[tuple[str, int, int]]:
    """(quantity, estimated, measured) rows."""
    from memcalc.parallel import ParallelConfig
    from memcalc.validate.gated_delta import measure_training
    from memcalc.validate.mamba import LayerProbe
    from memcalc.validate.run import TrainWorkload

    model = _model(case, directory)
    probe = LayerProbe()
    workload = TrainWorkload(precision=case.precision, batch_size=case.batch, seq_len=case.seq, impl="hf",
                             recompute=case.recompute)
    measured = measure_training(model, workload, probe=probe)
    settings = TrainSettings(precision=case.precision, batch_size=case.batch, seq_len=case.seq,
                             recompute=case.recompute)
    estimate = estimate_training(model, settings)
    rows = []
    if case.recompute == "none":
        plan = StagePlan(model, case.seq, 1, True, True, 0, linear_inputs_saved=False)
        stack = _layer_stack(_activation_context(plan, settings, resolve_recipe(settings, ParallelConfig())))
        for index in (2, 3):  # past the second layer (the probe's first readings hold an extra stream tensor)
            kind = model.resolved_layer_types[index].value
            rows.append((f"layer_saved:{kind}", stack.by_kind[stack.kinds[index]][0],
                         probe.forward[index] - probe.forward[index - 1]))
    for phase in ("forward", "backward", "optimizer_step"):
        rows.append((f"phase:{phase}", estimate.phases[phase], measured.phases[phase].peak_bytes))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    from memcalc.validate.gated_delta import available, conv_kernel_available

    if not available() or not conv_kernel_available():
        print("fla, triton or causal_conv1d's sources are not importable: see memcalc/validate/gated_delta.py")
        return 2
    results = []
    with tempfile.TemporaryDirectory() as directory:
        for case in CASES:
            for quantity, estimated, measured in run_case(case, Path(directory)):
                error = 100 * (estimated - measured) / measured
                results.append((case, quantity, estimated, measured, error))
                print(f"{case.name[:44]:44s} {case.precision:10s} rc-{case.recompute:4s} b{case.batch} s{case.seq:<5d} "
                      f"{quantity:28s} est {estimated:>15,} meas {measured:>15,} {error:+.4f}%")
    if args.csv:
        with args.csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case", "precision", "recompute", "batch", "seq", "quantity", "estimated_bytes",
                             "measured_bytes", "error_percent"])
            for case, quantity, estimated, measured, error in results:
                writer.writerow([case.name, case.precision, case.recompute, case.batch, case.seq, quantity,
                                 estimated, measured, f"{error:.4f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
