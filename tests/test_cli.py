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
    "train_llama-2-70b_tp8_pp2_sp_distopt": ["train", "llama-2-70b", "--gpus", "64", "--tp", "8", "--pp", "2", "--sp",
                                             "--distributed-optimizer", "--seq", "4096", "--gpu", "h100"],
    "train_llama-3-8b_fsdp_offload": ["train", "llama-3-8b", "--gpus", "8", "--fsdp", "full", "--offload", "optimizer"],
    "infer_llama-3-8b_q4_k_rtx4090": ["infer", "llama-3-8b", "--weights", "q4_k", "--context", "8192", "--gpu",
                                      "rtx-4090-24gb"],
    "infer_deepseek-v3_paged_tp8": ["infer", "deepseek-v3", "--weights", "fp8-block", "--engine", "paged", "--tp", "8",
                                    "--batch", "16", "--context", "32768", "--gpu", "h200"],
    "sweep_llama-3-8b_seq": ["sweep", "llama-3-8b", "--over", "seq=1k..8k", "--recompute", "full", "--gpu", "h100"],
    "train_llama-2-7b_qlora": ["train", "llama-2-7b", "--qlora", "--lora-rank", "16", "--lora-targets", "all",
                               "--seq", "1024"],
    "train_llama-3-8b_te-fp8_no_fit": ["train", "llama-3-8b", "--precision", "te-fp8", "--seq", "4096", "--gpu", "h100"],
    "precisions": ["precisions"],
    "gpus": ["gpus"],
    "train_llama-3-8b_explain": ["train", "llama-3-8b", "--explain"],
    "formats": ["formats"],
    "compare_llama-2-70b": ["compare", "llama-2-70b", "--seq", "4096", "--gpu", "h100-80gb",
                            "--scenario", "gpus=64,tp=8,pp=2,sp=true,distributed_optimizer=true",
                            "--scenario", "name=fsdp,gpus=64,fsdp=full", "--scenario", "gpus=64,tp=8,zero=1,recompute=full"],
}


GOLDEN_WIDTHS = (80, 120)


def _golden_path(case: str, columns: int) -> Path:
    return GOLDEN_DIR / f"{case}@{columns}.out"


@pytest.mark.parametrize("columns", GOLDEN_WIDTHS)
@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden_output(case, columns, run_cli, update_golden):
    """Terminal output at 80 and 120 columns without colour; rewrite with ``pytest --update-golden``."""
    result = run_cli(*GOLDEN_CASES[case], columns=columns)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    path = _golden_path(case, columns)
    if update_golden:
        path.write_text(result.stdout)
    assert result.stdout == path.read_text()


@pytest.mark.parametrize("columns", GOLDEN_WIDTHS)
@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden_output_fits_its_width(case, columns):
    """No golden output holds a truncated cell (rich's ellipsis) or a line wider than its terminal."""
    text = _golden_path(case, columns).read_text()
    assert "\u2026" not in text
    assert [line for line in text.splitlines() if len(line.rstrip()) > columns] == []


def test_golden_cases_are_the_golden_files():
    """Every file under tests/golden is a case at one of the widths: none is left over."""
    expected = {_golden_path(case, columns).name for case in GOLDEN_CASES for columns in GOLDEN_WIDTHS}
    assert {path.name for path in GOLDEN_DIR.glob("*.out")} == expected


def test_explain_lists_what_the_narrow_table_leaves_out(run_cli):
    """At 80 columns the Formula column gives way; --explain lists every formula the 160-column table shows."""
    wide = run_cli("train", "llama-3-8b", columns=160).stdout
    narrow = run_cli("train", "llama-3-8b", columns=80).stdout
    explained = run_cli("train", "llama-3-8b", "--explain", columns=80).stdout
    assert "┃ Formula" in wide and "┃ Formula" not in narrow and "--explain" in narrow
    main_table = wide[:wide.index("└")]
    formulas: dict[str, str] = {}
    label = ""
    for line in main_table.splitlines():
        if not line.startswith("│"):
            continue
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells[0]:
            label = cells[0].removesuffix(" (peak)") if cells[0].startswith("During") else cells[0]
            formulas[label] = cells[-1]
        else:  # a wrapped formula continues on the next line
            formulas[label] += " " + cells[-1]
    assert len(formulas) >= 10
    explained_text = " ".join(explained[explained.index("How each row is computed"):].split())
    for label, formula in formulas.items():
        assert f"{label} {formula}" in explained_text, (label, formula)


@pytest.mark.parametrize("case", ["train_llama-2-70b_tp8_pp2_sp_distopt", "compare_llama-2-70b", "precisions"])
def test_colour_adds_only_escape_codes(case, run_cli, monkeypatch):
    """Coloured output is the plain output with ANSI styles added: piping loses nothing."""
    import re

    plain = run_cli(*GOLDEN_CASES[case], columns=80).stdout
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TERM", "xterm-256color")
    coloured = run_cli(*GOLDEN_CASES[case], columns=80).stdout
    assert coloured != plain
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == plain


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
        ("Peak allocated", 22 * params),
    ]:
        row = next(line for line in out.splitlines() if line.startswith(f"│ {label} "))
        assert f"{value / 2**30:,.2f}" in row, row
    peak = 22 * params  # 266.68 GiB, 286.35 GB
    # the allocator's reserve, the context and two cuBLAS workspaces (forward and autograd threads)
    device = peak + round(peak * 0.0533) + (400 + 2 * 32) * 2**20
    assert f"On the device: {device / 2**30:,.2f} GiB ({device / 1e9:,.2f} GB); peak allocated 266.68, " in out
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
    assert memory["peak_allocated"] == max(memory["phases"].values()) == memory["phases"]["prefill"]
    # the runtime overhead is a line of its own, outside the allocator: in the device total
    assert memory["overhead"] == (400 + 32) * 2**20
    assert memory["total"] == memory["peak_allocated"]
    assert memory["device_total"] == memory["peak_allocated"] + round(memory["peak_allocated"] * 0.0566) + memory["overhead"]
    for key in ("weights", "kv_cache", "activations", "logits", "overhead", "total", "rule_of_thumb_total"):
        assert isinstance(memory[key], int)
    assert memory["rule_of_thumb_total"] == 19_272_626_996  # 1.2 * 16,060,522,496 = 19,272,626,995.2, rounded up
    assert document["settings"]["kv_cache_bytes_per_token"] == 131_072


def test_infer_kv_assumption_counts_only_the_attention_layers(run_cli):
    """Nemotron-H-56B caches keys and values in its attention blocks alone: the '*' of the checkpoint's
    hybrid_override_pattern, 10 of its 118 blocks (2 x 8 heads x 128 x 2 B x 10 = 40,960 bytes a token)."""
    data = json.loads((Path(__file__).parent / "data" / "hf_configs" / "nvidia--Nemotron-H-56B-Base-8K.json").read_text())
    attention = data["hybrid_override_pattern"].count("*")
    assert attention == 10
    result = run_cli("infer", "nemotron-h-56b", "--engine", "hf", "--prompt", "1024", "--max-new-tokens", "4",
                     columns=200)
    assert result.exit_code == 0
    line = next(line for line in result.stdout.splitlines() if line.startswith("KV cache "))
    assert f"{2 * 8 * 128 * 2 * attention:,} bytes/token" in line
    assert f"8 KV heads x 128 head dim x {attention} of {len(data['hybrid_override_pattern'])} layers" in line


def test_models_json_lists_library(run_cli):
    listing = json.loads(run_cli("models", "--json").stdout)
    by_name = {entry["name"]: entry for entry in listing}
    assert len(by_name) == 48
    assert by_name["mixtral-8x7b"]["active_parameters"] == 12_879_925_248
    # Qwen3-Next-80B-A3B: the total less 48 layers' 502 idle experts of 3 x 512 x 2048
    assert by_name["qwen3-next-80b-a3b"]["active_parameters"] == 79_674_391_296 - 48 * 502 * 3 * 512 * 2048
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
     "Invalid value for '--optimizer': 'adam9' is not one of 'adamw', 'adam', 'adam8bit', 'adafactor', 'lion', "
     "'ademamix', 'sgd', 'sgd-momentum'."),
    (["train", "llama-13b", "--recompute", "some"], "'--recompute': 'some' is not one of 'none', 'selective', 'full', 'op'."),
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
    (["train", "llama-3-8b", "--tp", "3"], "--tp 3 does not divide the 32 attention heads of llama-3-8b"),
    (["train", "llama-3-8b", "--tp", "16"], "--tp 16 does not divide the 8 key/value heads of llama-3-8b"),
    (["train", "llama-3-8b", "--pp", "3"], "--pp 3 x --vpp 1 = 3 does not divide the 32 layers of llama-3-8b"),
    (["train", "llama-3-8b", "--pp", "4", "--vpp", "3"], "--pp 4 x --vpp 3 = 12 does not divide the 32 layers"),
    (["train", "llama-3-8b", "--gpus", "6", "--tp", "4"], "--gpus 6 is not divisible by tp x pp x cp = 4 x 1 x 1"),
    (["train", "llama-3-8b", "--gpus", "16", "--dp", "2", "--tp", "4"], "--gpus 16 is not dp x tp x pp x cp = 2 x 4 x 1 x 1 = 8"),
    (["train", "llama-3-8b", "--ep", "2"], "--ep 2 needs a mixture-of-experts model; llama-3-8b is dense"),
    (["train", "mixtral-8x7b", "--gpus", "6", "--ep", "3"], "--ep 3 does not divide the 8 experts of mixtral-8x7b"),
    (["train", "mixtral-8x7b", "--ep", "2"], "--ep 2 does not divide dp x cp = 1"),
    (["train", "llama-3-8b", "--cp", "2", "--attention", "eager"], "--cp needs a fused attention kernel"),
    (["train", "llama-3-8b", "--zero", "4"], "Invalid value for '--zero': 4 is not in the range 0<=x<=3."),
    (["train", "llama-3-8b", "--fsdp", "half"], "Invalid value for '--fsdp': 'half' is not one of 'full', 'grad-op', 'hybrid'"),
    (["train", "llama-3-8b", "--fsdp", "full", "--zero", "1"], "--fsdp full is ZeRO stage 3; it contradicts --zero 1"),
    (["train", "llama-3-8b", "--offload", "disk"], "Invalid value for '--offload': 'disk' is not one of 'none', 'optimizer', 'params', 'both'"),
    (["train", "llama-3-8b", "--offload", "params", "--zero", "2"], "--offload params needs --zero 3"),
    (["train", "llama-3-8b", "--zero", "1", "--distributed-optimizer"], "--distributed-optimizer is Megatron's ZeRO-1"),
    (["train", "llama-3-8b", "--sp"], "--sp needs --tp > 1"),
    (["train", "llama-3-8b", "--lora-rank", "8", "--lora-targets", "q,x"], "--lora-targets 'x' is not one of q, k"),
    (["train", "llama-3-8b", "--tp-impl", "deepspeed"], "Invalid value for '--tp-impl': 'deepspeed' is not one of 'megatron', 'dtensor'"),
    (["train", "llama-3-8b", "--vpp", "2"], "--vpp needs --pp > 1"),
    (["train", "llama-3-8b", "--gpu", "h1000"], "unknown GPU 'h1000'; did you mean"),
    (["compare", "llama-3-8b"], "compare needs at least one --scenario or a --file of scenarios"),
    (["compare", "llama-3-8b", "--scenario", "tpp=2"], "unknown key 'tpp' (did you mean tp?)"),
    (["compare", "llama-3-8b", "--scenario", "tp=x"], "--scenario 'tp=x': tp: Input should be a valid integer"),
    (["compare", "llama-3-8b", "--scenario", "tp"], "'tp' is not key=value"),
    (["compare", "llama-3-8b", "--scenario", "tp=3"], "scenario 'tp=3': tp 3 does not divide the 32 attention heads"),
    (["compare", "llama-3-8b", "--file", "nowhere.yaml"], "--file: nowhere.yaml does not exist"),
]


def test_train_parallel_json_document(run_cli):
    """Megatron's distributed optimizer over dp = 64 / (8 x 2) = 4: bf16 weights and fp32 main grads
    whole on the rank, fp32 master weights and moments a quarter each (docs: 6 + 12/d B/param)."""
    document = _json(run_cli, "train", "llama-2-70b", "--gpus", "64", "--tp", "8", "--pp", "2", "--sp",
                     "--distributed-optimizer", "--seq", "4096", "--gpu", "h100")
    memory, layout = document["memory"], document["settings"]["parallel"]
    assert layout["dp"] == 4 and layout["gpus"] == 64 and layout["dense_shards"] == 4
    assert document["settings"]["precision"] == "megatron-bf16"
    first, last = document["ranks"]
    assert (first["name"], last["name"]) == ("first stage", "last stage")
    # first stage: 40 of the 80 layers and the embedding, split by TP 8 except the two norms per
    # layer; the 32000-row vocabulary is padded to a multiple of 128 x 8 = 1024: 32768 rows
    layer = 8192 * (8192 + 1024 + 1024 + 8192) // 8 + 3 * 8192 * 28672 // 8 + 2 * 8192
    params = 40 * layer + 32768 * 8192 // 8
    assert first["parameters"] == params
    assert first["memory"]["weights"] == 2 * params
    assert first["memory"]["gradients"] == 4 * params
    assert first["memory"]["master_weights"] == 4 * params // 4
    assert first["memory"]["optimizer_states"] == 8 * params // 4
    assert memory["total"] == max(first["memory"]["total"], last["memory"]["total"])
    # on the device: +5.33% allocator reserve, the 400 MiB context and two 32 MiB workspaces, and NCCL for the
    # data-parallel (4 ranks) and tensor-parallel (8) groups and the pipeline pair: 688 + 688 + 544 MB
    device = memory["total"] + round(memory["total"] * 0.0533) + (400 + 2 * 32) * 2**20 + (688 + 688 + 544) * 10**6
    assert memory["device_total"] == device and document["device"]["nccl_communicators"] == [4, 8, 2]
    usable = 85_028_896_768  # what CUDA reports for an H100 80GB (configs/gpus.yaml)
    assert document["fits"] == {"gpu": "h100-80gb", "gpu_memory": usable, "memory_as_sold": 80 * 2**30,
                                "required": device, "fits": device <= usable, "free": usable - device}


def test_train_offload_moves_optimizer_to_cpu(run_cli):
    """ZeRO-3 + optimizer offload over 8 GPUs (DeepSpeed ZeRO-Offload): the GPU keeps bf16 parameter
    shards; the CPU holds fp32 gradient, master and Adam moment shards, 16 B/param / 8."""
    document = _json(run_cli, "train", "llama-3-8b", "--gpus", "8", "--fsdp", "full", "--offload", "optimizer")
    params = 8_030_261_248
    where = {component["key"]: component["location"] for component in document["components"]}
    assert where["weights"] == "gpu" and where["optimizer_states"] == where["master_weights"] == "cpu"
    assert document["memory"]["weights"] == 2 * params // 8
    assert document["memory"]["cpu_total"] == 16 * params // 8


def test_activation_model_both_shows_megatron_beside_arch(run_cli):
    """``both``: the arch model sets the total; the reference row is what ``megatron`` computes."""
    both = _json(run_cli, "train", "llama-2-7b", "--tp", "2", "--activation-model", "both")
    arch = _json(run_cli, "train", "llama-2-7b", "--tp", "2")
    megatron = _json(run_cli, "train", "llama-2-7b", "--tp", "2", "--activation-model", "megatron")
    assert both["memory"]["total"] == arch["memory"]["total"]
    assert both["memory"]["activations_megatron"] == megatron["memory"]["activations"]
    # Korthikanti Table 2 at t = 2, s = 2048, b = 1, h = 4096, a = 32, L = 32: sbh(10 + 24/2 + 5as/(2h)),
    # plus the output layer 4sbh + 4sbV/2 (V = 32000)
    sbh = 2048 * 4096
    assert megatron["memory"]["activations"] == 32 * sbh * (10 + 12 + 40) + 4 * sbh + 4 * 2048 * 32000 // 2


def test_formats_json_computed_from_bit_layouts(run_cli):
    """OCP 8-bit FP spec / Micikevicius et al. 2022: E4M3 max 448, E5M2 max 57344; IEEE fp16 max 65504."""
    document = _json(run_cli, "formats", "fp8-e4m3", "fp8-e5m2", "fp16")
    by_name = {row["name"]: row for row in document["formats"]}
    assert by_name["fp8-e4m3"]["max"] == 448
    assert by_name["fp8-e5m2"]["max"] == 57344
    assert by_name["fp16"]["max"] == 65504
    result = run_cli("formats", "fp7")
    assert result.exit_code == 2 and "fp7" in result.stderr


def test_train_lora_flags(run_cli):
    """PEFT prints 4,194,304 trainable parameters for Llama-2-7B with r = 8 on q_proj and v_proj:
    32 layers x 2 x 8 x (4096 + 4096). Gradients and AdamW states exist for those only (fp32)."""
    document = _json(run_cli, "train", "llama-2-7b", "--lora-rank", "8", "--lora-targets", "q,v")
    lora = document["settings"]["lora"]
    assert lora["trainable_params"] == 32 * 2 * 8 * (4096 + 4096) == 4_194_304
    assert document["memory"]["gradients"] == 4 * 4_194_304
    assert document["memory"]["optimizer_states"] == 8 * 4_194_304
    every = _json(run_cli, "train", "llama-2-7b", "--lora-rank", "8", "--lora-targets", "all")
    # q, k, v, o: 4 x (4096 + 4096); gate, up: 2 x (4096 + 11008); down: (11008 + 4096)
    assert every["settings"]["lora"]["trainable_params"] == 32 * 8 * (4 * 8192 + 3 * (4096 + 11008))
    result = run_cli("train", "llama-2-7b", "--qlora")
    assert result.exit_code == 2 and "--qlora needs --lora-rank" in result.stderr


def test_paged_optimizer_states_are_managed_memory_outside_the_allocator(run_cli):
    """bitsandbytes' paged states are CUDA managed memory (cudaMallocManaged): the same bytes as
    plain 8-bit states, but outside PyTorch's allocated peaks and outside what must fit (they move
    to the host under pressure); the device section reports them."""
    paged = _json(run_cli, "train", "llama-2-7b", "--optimizer", "adam8bit", "--paged")
    plain = _json(run_cli, "train", "llama-2-7b", "--optimizer", "adam8bit")
    states = plain["memory"]["optimizer_states"]
    assert paged["memory"]["optimizer_states"] == states and paged["settings"]["paged_optimizer"]
    assert {phase: plain["memory"]["phases"][phase] - value for phase, value in paged["memory"]["phases"].items()} \
        == {phase: states for phase in plain["memory"]["phases"]}
    assert paged["device"]["managed"] == states and plain["device"]["managed"] == 0
    location = {c["key"]: c["location"] for c in paged["components"]}
    assert location["optimizer_states"] == "gpu-managed"
    result = run_cli("train", "llama-2-7b", "--paged")
    assert result.exit_code == 2 and "--paged applies to bitsandbytes' 8-bit optimizers" in result.stderr


def test_compare_json_matches_train(run_cli):
    """Each compare column is the train estimate with the scenario's flags."""
    compared = _json(run_cli, "compare", "llama-3-8b", "--scenario", "gpus=8,zero=3", "--scenario", "tp=2,seq=4096")
    first = _json(run_cli, "train", "llama-3-8b", "--gpus", "8", "--zero", "3")
    second = _json(run_cli, "train", "llama-3-8b", "--tp", "2", "--seq", "4096")
    assert [item["scenario"] for item in compared["scenarios"]] == ["gpus=8,zero=3", "tp=2,seq=4096"]
    assert compared["scenarios"][0]["memory"] == first["memory"]
    assert compared["scenarios"][1]["memory"] == second["memory"]


def test_compare_reads_a_scenario_file(run_cli, tmp_path):
    path = tmp_path / "scenarios.yaml"
    path.write_text("- {name: fsdp8, gpus: 8, fsdp: full}\n- {name: ddp, gpus: 8}\n")
    compared = _json(run_cli, "compare", "llama-3-8b", "--file", str(path))
    assert [item["scenario"] for item in compared["scenarios"]] == ["fsdp8", "ddp"]
    fsdp, ddp = (item["memory"] for item in compared["scenarios"])
    assert fsdp["optimizer_states"] * 8 == ddp["optimizer_states"] == 8 * 8_030_261_248


def test_compare_file_errors_name_the_scenario(run_cli, tmp_path):
    path = tmp_path / "scenarios.yaml"
    path.write_text("- {gpus: 8}\n- {gpus: 8, zero: five}\n")
    result = run_cli("compare", "llama-3-8b", "--file", str(path))
    assert result.exit_code == 2
    assert f"{path}: scenario 2: zero: Input should be a valid integer" in result.stderr


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
        "print(sorted(m for m in ('pydantic.main', 'pydantic.type_adapter', 'torch', 'numpy', 'memcalc.vision',"
        " 'memcalc.hf', 'huggingface_hub') if m in sys.modules),"
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


@pytest.mark.parametrize(("part", "whole", "expected"), [
    (1, 2, "#####" + " " * 7 + "50.0%"), (1, 1, "########## 100.0%"), (1, 16, "+" + " " * 12 + "6.2%"),
    (3, 20, "#+" + " " * 10 + "15.0%"), (0, 5, " " * 13 + "0.0%"),
])
def test_share_bar_draws_the_share_in_halves_of_tenths(part, whole, expected):
    """Ten characters for 100%: 50% is five #; 6.25% rounds to one half (+); 15% is # and +."""
    from memcalc.render import _share_bar

    assert _share_bar(part, whole) == expected


def test_natural_width_is_what_rich_measures():
    """render's own sum of cell widths (a fast path for choosing columns) equals rich's measurement
    of the same tables, wrapped prose columns included."""
    from rich.console import Console
    from rich.measure import Measurement

    from memcalc import render
    from memcalc.config import InferSettings, TrainSettings
    from memcalc.estimate.inference import estimate_inference
    from memcalc.estimate.training import estimate_training
    from memcalc.formats import COLUMNS, table_rows
    from memcalc.gpus import gpu_catalogue
    from memcalc.library import bundled_models, resolve_model
    from memcalc.parallel import Offload, ParallelConfig
    from memcalc.precision import RECIPES
    from memcalc.units import Unit

    model = resolve_model("llama-3-8b")
    estimates = [
        estimate_training(model, TrainSettings()),
        estimate_training(model, TrainSettings(), ParallelConfig(dp=8, zero=1, offload=Offload.OPTIMIZER)),
        estimate_inference(model, InferSettings(weights="q4_k")),
    ]
    tables = [render._estimate_table("train", estimate, Unit.GIB, formula, bar, kind)
              for estimate in estimates for formula, bar, kind in [(True, 10, True), (False, 5, False)]]
    tables += [render._models_table(list(bundled_models().values()), True),
               render._gpus_table(list(gpu_catalogue().values()), render.GPU_COLUMNS),
               render._formats_table([tuple(map(str, row)) for row in table_rows()], COLUMNS),
               render._precisions_table([render._precision_cells(r) for r in RECIPES.values()],
                                        render.PRECISION_COLUMNS)]
    console = Console(width=80)
    for table in tables:
        assert render._natural_width(table) == Measurement.get(console, console.options.update_width(10_000),
                                                               table).maximum


def test_estimates_carry_typed_settings_and_only_the_json_writer_makes_strings(run_cli):
    """The breakdown holds enums and dataclasses; report.settings_document gives the JSON values
    the CLI prints, unchanged from when the estimators built that dictionary themselves."""
    from memcalc.config import Recompute, TrainSettings
    from memcalc.estimate.assumptions import LayoutSummary, TrainAssumptions
    from memcalc.estimate.training import estimate_training
    from memcalc.library import resolve_model
    from memcalc.parallel import Offload, ParallelConfig
    from memcalc.report import settings_document

    estimate = estimate_training(resolve_model("llama-3-8b"), TrainSettings(recompute="full"),
                                 ParallelConfig(dp=2, pp=2, zero=1, offload=Offload.OPTIMIZER))
    assert isinstance(estimate.settings, TrainAssumptions) and isinstance(estimate.settings.parallel, LayoutSummary)
    assert estimate.settings.recompute is Recompute.FULL and estimate.settings.parallel.offload is Offload.OPTIMIZER
    document = settings_document(estimate.settings)
    assert document["recompute"] == "full" and document["parallel"]["offload"] == "optimizer"
    assert document["parallel"]["inflight_chunks"] == {"0": 2, "1": 1}
    printed = json.loads(run_cli("train", "llama-3-8b", "--recompute", "full", "--dp", "2", "--pp", "2", "--zero", "1",
                                 "--offload", "optimizer", "--json").stdout)
    assert printed["settings"] == document
    inferred = json.loads(run_cli("infer", "llama-3-8b", "--weights", "q4_k", "--json").stdout)["settings"]
    assert inferred["weights_from"] == "--weights" and "weights_detail" not in inferred
