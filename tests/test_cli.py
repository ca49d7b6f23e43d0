"""The command line: golden output, the JSON document, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"

GOLDEN_CASES = {
    "train_llama-13b_bf16": ["train", "llama-13b", "--dtype", "bf16"],
    "infer_llama-2-70b_fp16_b8_c4096": ["infer", "llama-2-70b", "--dtype", "fp16", "--batch", "8", "--context", "4096"],
    "show_mixtral-8x7b": ["show", "mixtral-8x7b"],
    "models": ["models"],
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden_output(case, run_cli, update_golden):
    """Terminal output at 100 columns without colour; rewrite with ``pytest --update-golden``."""
    result = run_cli(*GOLDEN_CASES[case])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    path = GOLDEN_DIR / f"{case}.out"
    if update_golden:
        path.write_text(result.stdout)
    assert result.stdout == path.read_text()


def test_train_table_shows_hand_derived_values(run_cli):
    """The table's figures are test_training's hand derivation (GiB = 2^30 bytes)."""
    out = run_cli("train", "llama-13b", "--dtype", "bf16", "--activation-model", "megatron").stdout
    params = 13_015_864_320
    for label, value in [
        ("Weights", 2 * params),
        ("Master weights (fp32)", 4 * params),
        ("Optimizer states", 8 * params),
        ("Gradients", 2 * params),
        ("Activations (peak)", 48_119_152_640),
        ("Optimizer step temporaries", 6 * params),
        ("During forward", 14 * params + 48_119_152_640),
        ("During optimizer step (peak)", 22 * params),
        ("Total (peak)", 22 * params),
    ]:
        row = next(line for line in out.splitlines() if line.startswith(f"│ {label} "))
        assert f"{value / 2**30:,.2f}" in row, row
    assert "Total: 266.68 GiB (286.35 GB)" in out
    for assumption in ("13.02B (13,015,864,320)", "mixed-bf16", "adamw", "1 x 2048 tokens", "Megatron formula"):
        assert assumption in out


def _json(run_cli, *args: str) -> dict:
    result = run_cli(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_train_json_document(run_cli):
    document = _json(run_cli, "train", "llama-13b", "--dtype", "bf16")
    memory = document["memory"]
    for key in ("weights", "gradients", "optimizer_states", "master_weights", "activations",
                "optimizer_step_temporaries", "total"):
        assert isinstance(memory[key], int)
    assert memory["total"] == max(memory["phases"].values()) == memory["phases"][memory["peak_phase"]]
    assert memory["peak_phase"] == "optimizer_step"
    assert memory["total"] == 22 * 13_015_864_320  # static 14P + bf16 grads 2P + step temporaries 6P
    assert document["model"].items() >= {"name": "llama-13b", "parameters": 13_015_864_320, "active_parameters": 13_015_864_320}.items()
    assert document["settings"].items() >= {
        "dtype": "bf16", "optimizer": "adamw", "batch_size": 1, "seq_len": 2048, "recompute": "none",
        "master_weights": True, "attention": "sdpa", "activation_model": "arch", "optimizer_impl": "foreach",
    }.items()
    assert document["checkpoint"]["weights_only"] == 2 * 13_015_864_320


def test_train_json_pure_bf16_has_zero_master(run_cli):
    memory = _json(run_cli, "train", "llama-2-7b", "--no-master-weights")["memory"]
    assert memory["master_weights"] == 0
    assert memory["optimizer_states"] == 4 * 6_738_415_616


def test_infer_json_document(run_cli):
    document = _json(run_cli, "infer", "llama-3-8b", "--dtype", "bf16", "--batch", "4", "--context", "8192")
    memory = document["memory"]
    assert memory["kv_cache"] == 131_072 * 8192 * 4
    assert memory["weights"] == 2 * 8_030_261_248
    assert memory["total"] == max(memory["phases"].values()) == memory["phases"]["prefill"]
    assert memory["rule_of_thumb_total"] == 19_272_626_996  # 1.2 * 16,060,522,496 = 19,272,626,995.2, rounded up
    assert document["settings"]["kv_cache_bytes_per_token"] == 131_072


def test_models_json_lists_library(run_cli):
    listing = json.loads(run_cli("models", "--json").stdout)
    by_name = {entry["name"]: entry for entry in listing}
    assert len(by_name) == 26
    assert by_name["mixtral-8x7b"]["active_parameters"] == 12_879_925_248
    assert by_name["llama-3-8b"]["kv_heads"] == 8


def test_show_json_parameter_breakdown(run_cli):
    document = _json(run_cli, "show", "gpt2")
    parameters = document["parameters"]
    assert parameters["total"] == 124_439_808
    assert sum(v for k, v in parameters.items() if k not in ("total", "active")) == parameters["total"]


@pytest.mark.parametrize(
    ("units", "expected"),
    [("gib", "24.24"), ("gb", "26.03"), ("mib", "24,825.79"), ("bytes", "26,031,728,640")],
)
def test_units(run_cli, units, expected):
    out = run_cli("train", "llama-13b", "--units", units).stdout
    weights_row = next(line for line in out.splitlines() if line.startswith("│ Weights "))
    assert expected in weights_row  # 2 * 13,015,864,320 bytes


BAD_INPUT = [
    (["train", "llama13b"], "unknown model 'llama13b'; did you mean llama-13b, llama-2-13b?"),
    (["train", "llama-13b", "--dtype", "fp64"], "Invalid value for '--dtype': 'fp64' is not one of 'fp32', 'fp16', 'bf16'."),
    (["train", "llama-13b", "--optimizer", "adam9"],
     "Invalid value for '--optimizer': 'adam9' is not one of 'adamw', 'adam', 'adam8bit', 'sgd', 'sgd-momentum'."),
    (["train", "llama-13b", "--recompute", "some"], "'--recompute': 'some' is not one of 'none', 'selective', 'full'."),
    (["train", "llama-13b", "--batch", "0"], "Invalid value for '--batch' / '-b': 0 is not in the range x>=1."),
    (["train", "llama-13b", "--seq", "-5"], "Invalid value for '--seq' / '-s': -5 is not in the range x>=1."),
    (["infer", "llama-13b", "--context", "0"], "Invalid value for '--context' / '-c': 0 is not in the range x>=1."),
    (["infer", "llama-13b", "--kv-dtype", "int4"], "'--kv-dtype': 'int4' is not one of 'fp32', 'fp16', 'bf16', 'fp8', 'int8'."),
    (["infer", "llama-13b", "--dtype", "q4"], "'--dtype': 'q4' is not one of 'fp32', 'fp16', 'bf16', 'fp8', 'int8', 'int4'."),
    (["train", "llama-13b", "--precision", "fp64"], "--precision: 'fp64' is not one of fp32, mixed-fp16"),
    (["train", "llama-13b", "--attention", "paged"], "'--attention': 'paged' is not one of 'sdpa', 'flash', 'eager'."),
    (["train", "llama-13b", "--units", "tb"], "'--units': 'tb' is not one of 'gib', 'gb', 'mib', 'mb', 'bytes'."),
    (["train", "llama-13b", "--batch", "many"], "Invalid value for '--batch' / '-b': 'many' is not a valid int"),
    (["train", "llama-13b", "--bogus"], "No such option: --bogus"),
    (["train"], "Missing argument 'model'."),
    (["show", "missing.yaml"], "missing.yaml: no such file or directory"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_is_one_line_exit_2(run_cli, args, message):
    result = run_cli(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


def test_malformed_model_file_exit_2(run_cli, tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("name: x\nhidden_size: {\n")
    result = run_cli("train", str(path))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {path}:3:1: invalid YAML")


def test_internal_error_is_one_line_exit_1(run_cli, monkeypatch):
    import memcalc.estimate.training as training

    def broken(*_args, **_kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(training, "estimate_training", broken)
    result = run_cli("train", "gpt2")
    assert result.exit_code == 1
    assert result.stderr == "internal error: ZeroDivisionError: boom (set MEMCALC_DEBUG=1 for the traceback)\n"


def test_no_arguments_prints_help(run_cli):
    result = run_cli()
    assert result.exit_code == 0
    assert "train" in result.stdout and "infer" in result.stdout


def test_python_dash_m_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "memcalc", "train", "--help"], capture_output=True, text=True,
        env={**os.environ, "COLUMNS": "100"}, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Usage: memcalc train" in result.stdout
    assert "memcalc train llama-13b --dtype bf16" in result.stdout


def test_cli_import_loads_neither_torch_nor_numpy():
    code = "import sys, memcalc.cli; print(','.join(m for m in ('torch', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_bundled_model_path_skips_pydantic_schema_machinery():
    """Start-up budget (benchmarks/cli_latency.py): a bundled model and CLI-validated settings need
    no pydantic model building; it loads only for user files (tests/test_library.py covers those)."""
    code = (
        "import sys; from memcalc.cli import main\n"
        "try:\n    main(['train', 'llama-13b', '--seq', '4096'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('pydantic.main', 'pydantic.type_adapter', 'torch', 'numpy') if m in sys.modules),"
        " file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Activations" in result.stdout
    assert result.stderr.strip() == "[]"


def test_json_path_does_not_render_with_rich():
    code = (
        "import sys; from memcalc.cli import main\n"
        "try:\n    main(['train', 'gpt2', '--json'])\nexcept SystemExit:\n    pass\n"
        "print('rich.table' in sys.modules, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    json.loads(result.stdout)
    assert result.stderr.strip() == "False"
