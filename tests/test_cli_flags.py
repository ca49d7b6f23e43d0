"""One path from flags to settings: every command builds its settings the same way, options are
declared once, help is grouped in panels at 80 columns, and shell completion lists models and GPUs."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import typer

from memcalc.cli import app
from memcalc.flags import PANELS, _complete_gpu, _complete_model

COMMAND = typer.main.get_command(app)
TRAINING_COMMANDS = ("train", "compare", "sweep", "validate")


def _train_total(run_cli, command: str, flags: list[str]) -> int:
    """The peak for ``flags`` through ``command``: a one-scenario compare and a one-point sweep run
    the same step as train."""
    args = {
        "train": ["train", "llama-3.2-1b", *flags, "--json"],
        "compare": ["compare", "llama-3.2-1b", *flags, "--scenario", "name=same", "--json"],
        "sweep": ["sweep", "llama-3.2-1b", *flags, "--over", "batch=2", "--batch", "2", "--json"],
    }[command]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    if command == "compare":
        return document["scenarios"][0]["memory"]["total"]
    if command == "sweep":
        return document["points"][0]["memory"]["total"]
    return document["memory"]["total"]


# Settings that once reached only `train` (the --paged check, the Blackwell FP8 layout, LoRA
# options) and layout flags that compare and sweep now take as the base of their scenarios.
SAME_STEP = [
    ["--precision", "te-fp8", "--gpu", "b200", "--batch", "2"],
    ["--optimizer", "adam8bit", "--paged", "--batch", "2"],
    ["--lora-rank", "16", "--qlora", "--lora-targets", "all", "--batch", "2"],
    ["--gpus", "8", "--fsdp", "full", "--offload", "optimizer", "--batch", "2"],
    ["--no-master-weights", "--optimizer-in-backward", "--recompute", "full", "--batch", "2"],
]


@pytest.mark.parametrize("flags", SAME_STEP, ids=lambda flags: " ".join(flags[:2]))
def test_train_compare_and_sweep_estimate_the_same_step(flags, run_cli):
    totals = {command: _train_total(run_cli, command, flags) for command in ("train", "compare", "sweep")}
    assert len(set(totals.values())) == 1, totals


def test_blackwell_keeps_one_fp8_copy_in_every_command(run_cli):
    """The catalogue's FP8 layout applies wherever --gpu is given: te-fp8 drops the transposed FP8
    weight copy on Blackwell (1 byte per linear weight) and keeps it on Hopper."""
    for command in ("train", "compare", "sweep"):
        hopper = _train_total(run_cli, command, ["--precision", "te-fp8", "--gpu", "h100", "--batch", "2"])
        blackwell = _train_total(run_cli, command, ["--precision", "te-fp8", "--gpu", "b200", "--batch", "2"])
        assert hopper > blackwell, command


@pytest.mark.parametrize(("flags", "message"), [
    (["--paged"], "error: --paged applies to bitsandbytes' 8-bit optimizers: use --optimizer adam8bit"),
    (["--qlora"], "error: --qlora needs --lora-rank"),
    (["--lora-rank", "8", "--lora-targets", "q,x"], "error: --lora-targets 'x' is not one of q, k, v, o, gate, up, "
                                                      "down"),
    (["--optimizer-in-backward", "--grad-accum", "2"], "error: --optimizer-in-backward steps during backward: it "
                                                       "cannot accumulate gradients (--grad-accum)"),
    (["--precision", "fp3"], "error: --precision: 'fp3' is not one of"),
])
@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_every_training_command_refuses_bad_settings_alike(command, flags, message, run_cli):
    extra = {"compare": ["--scenario", "tp=1"], "sweep": ["--over", "batch=1,2"], "validate": ["--device", "fake"],
             "train": []}[command]
    result = run_cli(command, "llama-3.2-1b", *flags, *extra)
    assert result.exit_code == 2
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1


def _options(name: str) -> dict[str, object]:
    return {opt: param for param in COMMAND.commands[name].params for opt in param.opts}


# Flags whose meaning differs by command on purpose: the training and the serving dtype, the
# prefill's attention, inference TP (per-GPU weights) and the planner's required GPU.
DIFFERENT_ON_PURPOSE = {"--dtype", "--attention", "--tp", "--gpu", "--gpus", "--gpus-per-node", "--fsdp",
                        "--max-new-tokens", "--scenario", "--top-k", "--explain", "--prompt"}


def test_an_option_means_the_same_in_every_command():
    """Options are declared once: a flag two commands share has one help text and one default,
    except the few that mean something else by design."""
    seen: dict[str, tuple[str, object, str]] = {}
    for name in COMMAND.commands:
        for opt, param in _options(name).items():
            if opt in DIFFERENT_ON_PURPOSE or opt == "--help":
                continue
            if opt in seen:
                help_text, default, first = seen[opt]
                assert (param.help, param.default) == (help_text, default), f"{opt}: {first} vs {name}"
            else:
                seen[opt] = (param.help, param.default, name)
    assert len(seen) > 40


def _help(run_cli, name: str) -> str:
    result = run_cli(name, "--help", columns=80)
    assert result.exit_code == 0
    return result.stdout


@pytest.mark.parametrize("name", sorted(COMMAND.commands))
def test_help_fits_80_columns_in_panels_with_examples_that_parse(name, run_cli):
    text = _help(run_cli, name)
    assert "\u2026" not in text
    assert all(len(line.rstrip()) <= 80 for line in text.splitlines())
    panels = re.findall(r"^╭─ (.+?) ─", text, flags=re.M)
    shared = [panel for panel in panels if panel in PANELS]
    assert shared == sorted(shared, key=PANELS.index), panels
    examples = [line.strip() for line in text.splitlines() if line.strip().startswith(f"memcalc {name}")]
    assert len(examples) >= 2, text
    assert all(len(example) <= 72 for example in examples), "an example wraps at 80 columns"
    for example in examples:
        args = shlex.split(example)[2:]
        context = COMMAND.commands[name].make_context(name, args)  # options and choices exist and parse
        assert context.params


@pytest.mark.parametrize("name", ["train", "compare", "sweep"])
def test_training_help_has_the_panels_a_user_scans(name, run_cli):
    panels = re.findall(r"^╭─ (.+?) ─", _help(run_cli, name), flags=re.M)
    for panel in ("Model and precision", "Batch and sequence", "Memory savers", "Fine-tuning (LoRA)",
                  "Parallel layout", "Output"):
        assert panel in panels


def test_completion_lists_models_and_gpus():
    assert {"llama-3-8b", "llama-3.2-1b"} <= set(_complete_model("llama-3"))
    assert "h100-80gb" in _complete_gpu("h1") and "h200-141gb" in _complete_gpu("H2")
    assert _complete_gpu("zzz") == []
