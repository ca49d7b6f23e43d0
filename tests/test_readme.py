"""README.md starts with two commands that work on a fresh machine; CI (.ci/run) runs those same
two commands, verbatim, in a fresh virtual environment."""

from __future__ import annotations

import csv
import json
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_readme_opens_with_the_install_and_run_and_the_test_commands():
    run, test = _readme_commands()
    assert run.startswith("pip install . && memcalc ")
    assert test.startswith("pip install -e ") and test.endswith("python -m pytest")
    assert (REPO / "README.md").read_text().split("```bash")[0].strip() == "# memcalc"


def test_ci_runs_the_readme_commands_verbatim_in_a_fresh_venv():
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    run, test = _readme_commands()
    assert run in lines and test in lines
    assert lines.index(run) < lines.index(test)
    venv = lines.index("python -m venv .venv-ci")
    assert venv < lines.index("source .venv-ci/bin/activate") < lines.index(run)


# --- README's claims against the code ------------------------------------------------------------
#
# README is read as data: its bash lines, its prose split into paragraphs and sentences, its
# `--flag a|b|c` lists, recipe and format names, and the "What is counted, and what is not yet"
# section. Each claim is checked against the typer app, the enums, the recipe and reader tables,
# the accuracy results, or a CLI run, so the README cannot drift from the code.

README = (REPO / "README.md").read_text()
TEXT = " ".join(README.split())  # line breaks as spaces, as Markdown reads them
FENCE = re.compile(r"```bash\n(.*?)\n```", flags=re.S)
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?![\w-])")
SPAN = re.compile(r"`([^`]+)`")
# A code span that runs another tool (its flags are that tool's, not memcalc's).
OTHER_TOOL = re.compile(r"^(?:python|pip|bash) ")


@lru_cache(maxsize=1)
def _commands() -> dict:
    import typer

    from memcalc.cli import app

    return dict(typer.main.get_command(app).commands)


def _options(command: str) -> dict[str, object]:
    """Every spelling of every option of ``command`` (``--batch``, ``-b``) -> its click parameter."""
    return {opt: param for param in _commands()[command].params for opt in (*param.opts, *param.secondary_opts)
            if opt.startswith("-")}


def _model_commands() -> tuple[str, ...]:
    """The commands that take a model: flags README names without a command must exist on all of them."""
    return tuple(name for name, command in _commands().items()
                 if any(param.param_type_name == "argument" and param.name == "model" for param in command.params))


def _bash_lines() -> list[tuple[str, list[str]]]:
    """(command, argv after ``memcalc``) of every memcalc line in README's bash blocks, comments removed."""
    lines = []
    for block in FENCE.findall(README):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if "memcalc" in words:  # `pip install . && memcalc train ...`, `HF_HUB_OFFLINE=1 memcalc infer ...`
                argv = words[words.index("memcalc") + 1:]
                lines.append((argv[0], argv))
    return lines


def _prose() -> list[str]:
    """README outside its code blocks and headings, as paragraphs (list items apart), lines joined."""
    text = FENCE.sub("\n\n", README)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if not line.startswith("#")]
        items = re.split(r"\n(?=- )", "\n".join(lines))
        paragraphs += [" ".join(item.split()) for item in items if item.strip()]
    return paragraphs


def _sentences(paragraph: str) -> list[str]:
    return re.split(r"(?<=\.)\s+(?=[A-Z`])", paragraph)


def _section(title: str) -> str:
    heading = f"## {title}\n"
    start = README.index(heading) + len(heading)
    end = README.find("\n## ", start)
    return " ".join(README[start:end if end >= 0 else None].split())


def _named_commands(text: str) -> list[str]:
    """The memcalc commands named in code spans of ``text`` (`train`, `train --gpu NAME`)."""
    names = [span.removeprefix("memcalc ").split()[0] for span in SPAN.findall(text)]
    return [name for name in names if name in _commands()]


def _prose_flags() -> list[tuple[tuple[str, ...], str, str]]:
    """(commands, flag, sentence) for every flag README's prose names. A sentence's commands are
    those named before its first flag ("`train` counts ...", "`infer`, `plan` ... take"), every
    command after "every command"/"all commands", else the previous sentence's in the paragraph,
    else every command that takes a model."""
    found = []
    for paragraph in _prose():
        current = _model_commands()
        for sentence in _sentences(paragraph):
            text = SPAN.sub(lambda span: "" if OTHER_TOOL.match(span.group(1)) else span.group(0), sentence)
            first = FLAG.search(text)
            head = text[:first.start()] if first else text
            if re.search(r"\b(?:every command|all commands)\b", head, flags=re.I):
                current = tuple(_commands())
            elif _named_commands(head):
                current = tuple(_named_commands(head))
            found += [(current, flag, sentence) for flag in FLAG.findall(text)]
    return found


def test_every_readme_command_line_parses_with_the_cli():
    """Each memcalc line of README's bash blocks names a command and options that exist, with values
    the options accept (choices, integer ranges): click parses it without running it."""
    lines = _bash_lines()
    assert len(lines) >= 20
    for command, argv in lines:
        assert command in _commands(), f"README runs `memcalc {command}`, which does not exist"
        _commands()[command].make_context(command, argv[1:])  # raises UsageError / BadParameter


# validate needs torch, a Hub id the network, ./paths files that are not there: those are parsed above
RUNNABLE = list({tuple(argv): argv for command, argv in _bash_lines()
                 if command != "validate" and not any(word.startswith(("./", "Qwen/")) for word in argv)}.values())


@pytest.mark.parametrize("argv", RUNNABLE, ids=[" ".join(argv) for argv in RUNNABLE])
def test_readme_commands_run(argv, run_cli):
    """The examples that need no torch, no network and no local file run and exit 0."""
    result = run_cli(*argv)
    assert result.exit_code == 0, result.stderr


def test_every_flag_the_prose_names_exists_on_its_command():
    found = _prose_flags()
    assert len(found) >= 60
    missing = [f"{flag} on `{command}` ({sentence[:60]}...)" for commands, flag, sentence in found
               for command in commands if flag not in _options(command)]
    assert missing == []


def test_flags_are_attributed_to_the_command_their_paragraph_names():
    """The attribution itself: a few flags and the command each must be checked against."""
    by_flag: dict[str, set[str]] = {}
    for commands, flag, _ in _prose_flags():
        by_flag.setdefault(flag, set()).update(commands)
    assert by_flag["--activation-model"] == {"train"}
    assert by_flag["--mfu"] == {"plan"}
    assert by_flag["--over"] == {"sweep"}
    assert by_flag["--scenario"] == {"compare"}
    assert by_flag["--kv-budget"] == {"infer"}
    assert by_flag["--tolerance"] == by_flag["--impl"] == {"validate"}
    assert by_flag["--json"] == set(_commands())


def _units_commands() -> set[str]:
    sentence = next(s for p in _prose() for s in _sentences(p) if "take `--units " in s)
    return set(_named_commands(sentence.split("take `--units ")[0]))


def test_readme_names_exactly_the_commands_that_take_units_and_every_command_takes_json():
    with_units = {name for name in _commands() if "--units" in _options(name)}
    assert _units_commands() == with_units
    assert with_units and with_units != set(_commands())  # `show`, `models`, `gpus` print no sizes in units
    for name in with_units:
        assert _options(name)["--units"].default == "gib"  # "(GiB by default)"
    assert "Every command takes `--json`" in README
    assert all("--json" in _options(name) for name in _commands())


def _choice_enums() -> dict[str, type]:
    from memcalc.config import (ActivationModel, Attention, Decoding, Engine, Loss, Optimizer, OptimizerImpl,
                                PrefillLogits, Recompute, TrainDType)
    from memcalc.parallel import FSDPMode, Offload
    from memcalc.units import Unit

    return {"--dtype": TrainDType, "--optimizer": Optimizer, "--optimizer-impl": OptimizerImpl,
            "--recompute": Recompute, "--attention": Attention, "--loss": Loss,
            "--activation-model": ActivationModel, "--fsdp": FSDPMode, "--offload": Offload, "--engine": Engine,
            "--decoding": Decoding, "--prefill-logits": PrefillLogits, "--units": Unit}


def _readme_choice_lists() -> list[tuple[tuple[str, ...], str, list[str]]]:
    """(commands, flag, values) of every `--flag a|b|c` in README's prose."""
    lists = []
    for commands, flag, sentence in _prose_flags():
        for span in SPAN.findall(sentence):
            match = re.fullmatch(rf"{re.escape(flag)} ([\w.-]+(?:\|[\w.-]+)+)", span)
            if match:
                lists.append((commands, flag, match.group(1).split("|")))
    return lists


def test_readme_lists_every_choice_of_each_option_in_the_code_order():
    lists = _readme_choice_lists()
    assert {flag for _, flag, _ in lists} == set(_choice_enums())  # each list README writes is checked here
    for commands, flag, values in lists:
        assert values == [member.value for member in _choice_enums()[flag]], flag
        for command in commands:
            assert list(_options(command)[flag].type.choices) == values, f"{flag} on `{command}`"


def test_zero_stages_are_0_to_3():
    assert "`--zero 0-3`" in README and "ZeRO 0-3" in README
    for command in ("train", "compare", "sweep"):
        zero = _options(command)["--zero"].type
        assert (zero.min, zero.max) == (0, 3)


def _precision_names() -> set[str]:
    """Recipe names README spells: values of --precision, and recipe-shaped code spans."""
    names = set(re.findall(r"--precision ([\w.-]+)", README))
    for span in SPAN.findall(" ".join(_prose())):  # code blocks' fences would pair the backticks wrongly
        if re.fullmatch(r"(?:mixed|amp|pure|megatron|te|torchao|deepseek|msamp)-[\w-]+|mxfp8", span):
            names.add(span)
    return names


def _fp8_recipes_named() -> list[str]:
    listed = re.search(r"FP8 training recipes \(`--precision ([^)]*)\)", TEXT)
    return [name.strip(" `") for name in listed.group(1).split(",")] if listed else []


def test_every_recipe_readme_names_exists():
    from memcalc.precision import RECIPES

    names = _precision_names()
    assert {"amp-bf16", "pure-bf16", "te-fp8", "msamp-o3"} <= names
    assert names - set(RECIPES) == set()


def test_readme_names_every_fp8_recipe():
    from memcalc.precision import RECIPES

    assert set(_fp8_recipes_named()) == {name for name, recipe in RECIPES.items() if recipe.requires}


def test_every_weight_format_readme_names_parses():
    from memcalc.estimate.weights import parse_weight_format

    listed = re.search(r"`--weights` for a format \(([^;]*);", TEXT).group(1)
    names = []
    for item in listed.split(","):
        item = item.strip()
        if item != "...":
            names += item.removeprefix("GGUF ").split("/")
    names += re.findall(r"--weights ([\w.-]+)", README)
    assert {"fp8-block", "nvfp4", "bnb-nf4", "q4_k", "gptq"} <= set(names)
    for name in names:
        assert parse_weight_format(name).value == name


# --- What is counted, and what is not yet ---------------------------------------------------------

COUNTED_SECTION = "What is counted, and what is not yet"


def _counted() -> str:
    return _section(COUNTED_SECTION).split("Not yet:")[0]


def _not_yet() -> list[str]:
    text = _section(COUNTED_SECTION).split("Not yet:")[1].split(". See ")[0]
    return [item.strip() for item in re.split(r",\s*(?![^()]*\))", text)]


def _train(run_cli, *args: str) -> dict:
    result = run_cli("train", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _parallel(document: dict) -> dict:
    return document["settings"]["parallel"]


BASE = ("llama-3-8b", "--seq", "1024")
DP8 = (*BASE, "--gpus", "8")
MOE = ("mixtral-8x7b", "--seq", "1024", "--gpus", "8")


def _zero_shards(stage: int):
    """ZeRO stage ``stage`` on 8 ranks against stage 0: moments, then gradients, then weights are split 8 ways."""
    def shows(document: dict, base: dict) -> bool:
        memory, full = document["memory"], base["memory"]
        sharded = {key: memory[key] * 8 == full[key] for key in ("optimizer_states", "gradients", "weights")}
        return _parallel(document)["zero"] == stage and sharded == {
            "optimizer_states": stage >= 1, "gradients": stage >= 2, "weights": stage >= 3}
    return shows


def _fsdp_mode(mode: str):
    """FULL_SHARD and HYBRID_SHARD are ZeRO-3 (hybrid shards within an 8-GPU node), SHARD_GRAD_OP ZeRO-2."""
    stage, shards = {"full": (3, 16), "grad-op": (2, 16), "hybrid": (3, 8)}[mode]

    def shows(document: dict, base: dict) -> bool:
        layout, memory = _parallel(document), document["memory"]
        return (layout["fsdp"] is True and layout["zero"] == stage and layout["dense_shards"] == shards
                and memory["optimizer_states"] * shards == base["memory"]["optimizer_states"])
    return shows


def _smaller(key: str, by: float):
    return lambda document, base: document["memory"][key] * by <= base["memory"][key]


# (phrase of the Counted paragraph, train arguments, the same without the feature, what the JSON shows)
COUNTED = [
    ("DP", DP8, BASE, lambda d, b: _parallel(d)["dp"] == 8 and "parallel" not in b["settings"]),
    ("TP", (*DP8, "--tp", "8"), DP8, lambda d, b: _parallel(d)["tp"] == 8 and _smaller("weights", 7.9)(d, b)),
    ("SP", (*DP8, "--tp", "8", "--sp"), (*DP8, "--tp", "8"),
     lambda d, b: _parallel(d)["sp"] is True and _smaller("activations", 2)(d, b)),
    ("PP with 1F1B", (*DP8, "--pp", "4"), DP8,
     lambda d, b: _parallel(d)["pp"] == 4 and [r["name"] for r in d["ranks"]] == ["first stage", "last stage"]
     and _smaller("weights", 3)(d, b)),
    ("and interleaving", (*DP8, "--pp", "4", "--vpp", "2"), (*DP8, "--pp", "4"),
     lambda d, b: _parallel(d)["vpp"] == 2 and d["memory"]["activations"] > b["memory"]["activations"]),
    ("CP", (*DP8, "--cp", "2"), DP8, lambda d, b: _parallel(d)["cp"] == 2 and _smaller("activations", 1.5)(d, b)),
    ("EP", (*MOE, "--ep", "8"), MOE, lambda d, b: _parallel(d)["ep"] == 8 and _smaller("weights", 4)(d, b)),
    *[("ZeRO 0-3", (*DP8, "--zero", str(stage)), (*DP8, "--zero", "0"), _zero_shards(stage)) for stage in range(4)],
    *[("FSDP", (*BASE, "--gpus", "16", "--gpus-per-node", "8", "--fsdp", mode), (*BASE, "--gpus", "16"),
       _fsdp_mode(mode)) for mode in ("full", "grad-op", "hybrid")],
    ("Megatron's distributed optimizer", (*DP8, "--tp", "2", "--distributed-optimizer"), (*DP8, "--tp", "2"),
     lambda d, b: _parallel(d)["distributed_optimizer"] is True and _smaller("optimizer_states", 4)(d, b)),
    ("CPU offload", (*DP8, "--fsdp", "full", "--offload", "optimizer"), (*DP8, "--fsdp", "full"),
     lambda d, b: _parallel(d)["offload"] == "optimizer" and d["memory"]["cpu_total"] > 0
     and {c["key"]: c["location"] for c in d["components"]}["optimizer_states"] == "cpu"
     and d["memory"]["total"] < b["memory"]["total"]),
    ("LoRA", (*BASE, "--lora-rank", "16"), BASE,
     lambda d, b: d["settings"]["lora"]["rank"] == 16 and d["settings"]["lora"]["qlora"] is False
     and "lora" not in b["settings"] and _smaller("gradients", 100)(d, b)),
    ("QLoRA", (*BASE, "--lora-rank", "16", "--qlora"), (*BASE, "--lora-rank", "16"),
     lambda d, b: d["settings"]["lora"]["qlora"] is True and "nf4" in d["settings"]["lora"]["base_format"]
     and _smaller("weights", 2.5)(d, b)),
]


@pytest.mark.parametrize(("phrase", "args", "without", "shows"), COUNTED, ids=[" ".join(row[1]) for row in COUNTED])
def test_each_counted_feature_runs_and_its_json_shows_it(phrase, args, without, shows, run_cli):
    assert phrase in _counted()
    document = _train(run_cli, *args)
    assert shows(document, _train(run_cli, *without))
    assert document["memory"]["total"] == max(document["memory"]["phases"].values())


@pytest.mark.parametrize("recipe", _fp8_recipes_named())
def test_each_fp8_recipe_readme_names_is_counted(recipe, run_cli):
    """The recipe is the one the JSON reports and sources; one that keeps FP8 weights or caches FP8
    GEMM inputs changes the bytes (torchao's casts are freed per GEMM: bf16's bytes, its own source)."""
    from memcalc.precision import RECIPES

    assert "FP8 training recipes" in _counted()
    document = _train(run_cli, *BASE, "--precision", recipe)
    assert document["settings"]["precision"] == recipe
    assert {c["key"]: c["source"] for c in document["components"]}["weights"] == RECIPES[recipe].source
    if RECIPES[recipe].gemm or RECIPES[recipe].gemm_input_bytes:
        assert document["memory"]["phases"] != _train(run_cli, *BASE)["memory"]["phases"]


def test_inference_counts_the_state_of_mamba_layers(run_cli):
    assert "Mamba and linear-attention layers keep their conv and SSM state per sequence" in _counted()
    result = run_cli("infer", "jamba-1.5-mini", "--json")
    assert result.exit_code == 0, result.stderr
    state = {c["key"]: c["bytes"] for c in json.loads(result.stdout)["components"]}["state_cache"]
    assert state > 0


def _recurrent_configs(tmp_path: Path) -> dict[str, Path]:
    """A Mamba-1, a Mamba-2 and a gated-delta-net (Qwen3-Next) config.json."""
    mamba2 = {"model_type": "mamba2", "vocab_size": 128, "hidden_size": 64, "num_heads": 8, "head_dim": 16,
              "state_size": 8, "n_groups": 2, "num_hidden_layers": 2, "conv_kernel": 4, "expand": 2}
    qwen3_next = {"model_type": "qwen3_next", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 32,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2,
                  "layer_types": ["linear_attention", "full_attention"], "linear_key_head_dim": 8,
                  "linear_value_head_dim": 12, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                  "linear_conv_kernel_dim": 4, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
                  "max_position_embeddings": 4096}
    paths = {"mamba": REPO / "tests" / "data" / "hf_configs" / "tiiuae--falcon-mamba-7b.json"}
    falcon_h1 = {"model_type": "falcon_h1", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 128,
                 "mamba_d_ssm": 128, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_n_groups": 2}
    for name, data in (("mamba2", mamba2), ("linear_attention", qwen3_next), ("attention_mamba", falcon_h1)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    return paths


def _refuses_recurrent_training(run_cli, tmp_path: Path) -> None:
    configs = _recurrent_configs(tmp_path)
    # a model of Mamba-2 blocks alone is estimated (mamba_ssm's fused kernel, docs/formulas.md sec. 3.11)
    assert run_cli("train", str(configs.pop("mamba2"))).exit_code == 0
    # Nemotron-H's blocks, with experts or without, are estimated (docs/formulas.md sec. 3.11)
    for name in ("nvidia--Nemotron-H-56B-Base-8K.json", "nvidia--NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json"):
        assert run_cli("train", str(REPO / "tests" / "data" / "hf_configs" / name)).exit_code == 0
    # and so is Qwen3-Next, its gated delta nets through fla's chunked kernel (sec. 3.12)
    result = run_cli("train", str(configs.pop("linear_attention")), "--json")
    assert result.exit_code == 0, result.stderr
    source = {c["key"]: c["source"] for c in json.loads(result.stdout)["components"]}["activations"]
    assert "flash-linear-attention" in source
    for kind, path in (*configs.items(), ("mamba", "jamba-1.5-mini")):
        result = run_cli("train", str(path))
        assert result.exit_code == 2, (kind, result.stdout)
        expected = "mamba" if kind == "mamba" else kind
        assert f"training activations of {expected} layers are not modelled yet" in result.stderr
        assert run_cli("infer", str(path)).exit_code == 0  # the model itself is read; only training is refused


def _counts_no_cuda_graphs(run_cli, tmp_path: Path) -> None:
    for args in (("train", *BASE), ("infer", "llama-3-8b", "--engine", "paged")):
        result = run_cli(*args, "--json")
        assert result.exit_code == 0, result.stderr
        document = json.loads(result.stdout)
        assert not re.search(r"graph", json.dumps(document["components"]) + json.dumps(document["device"]), flags=re.I)


def _refuses_lora_with_dropout(run_cli, tmp_path: Path) -> None:
    result = run_cli("train", "gpt2", "--lora-rank", "8")
    assert result.exit_code == 2 and "not modelled with LoRA" in result.stderr
    assert _train(run_cli, "gpt2", "--lora-rank", "8", "--dropout", "0")["settings"]["dropout"] == {
        "attention": 0.0, "embedding": 0.0, "residual": 0.0}


NOT_YET = {
    "CUDA graphs other than vLLM's": _counts_no_cuda_graphs,
    "a model's own dropout under LoRA (`train` refuses it; `--dropout 0` estimates without it)": _refuses_lora_with_dropout,
    "training activations of Mamba-1 layers and of Falcon-H1's parallel blocks (refused by `train`)":
        _refuses_recurrent_training,
}


def test_readme_lists_exactly_the_not_yet_items_checked_here():
    assert _not_yet() == list(NOT_YET)


@pytest.mark.parametrize("item", list(NOT_YET))
def test_each_not_yet_item_is_really_not_counted(item, run_cli, tmp_path):
    NOT_YET[item](run_cli, tmp_path)


def test_json_totals_are_as_readme_says(run_cli):
    document = _train(run_cli, *BASE)
    memory = document["memory"]
    assert memory["total"] == max(memory["phases"].values())
    assert memory["phases"][memory["peak_phase"]] == memory["total"]
    assert all(isinstance(memory[key], int) for key in ("total", "weights", "activations"))
    result = run_cli("infer", "llama-3-8b", "--prompt", "1024", "--max-new-tokens", "256", "--num-beams", "4", "--json")
    assert result.exit_code == 0, result.stderr
    memory = json.loads(result.stdout)["memory"]
    assert memory["peak_allocated"] == memory["total"] == max(memory["phases"].values())
    assert memory["peak_allocated"] < memory["peak_reserved"] < memory["device_total"]
    assert memory["rule_of_thumb_total"] > 0


# --- Model families and the accuracy suite --------------------------------------------------------

# README's family names -> the config.json model_type(s) memcalc reads for each
FAMILY_MODEL_TYPES = {
    "Qwen3": ("qwen3",), "Qwen3-MoE": ("qwen3_moe",), "Qwen3-Next": ("qwen3_next",),
    "Qwen3.5": ("qwen3_5", "qwen3_5_text"), "Qwen3.5-MoE": ("qwen3_5_moe", "qwen3_5_moe_text"), "gpt-oss": ("gpt_oss",),
    "Gemma 2/3": ("gemma2", "gemma3_text", "gemma3"), "OLMo 2/3": ("olmo2", "olmo3"), "SmolLM3": ("smollm3",),
    "Llama 4": ("llama4_text", "llama4"), "Mistral 3": ("mistral3",),
    "Qwen2-VL": ("qwen2_vl", "qwen2_vl_text"), "Qwen2.5-VL": ("qwen2_5_vl", "qwen2_5_vl_text"), "Qwen3-VL": ("qwen3_vl", "qwen3_vl_text"),
    "Qwen3-VL-MoE": ("qwen3_vl_moe", "qwen3_vl_moe_text"), "GLM-4.5": ("glm4_moe",),
    "DeepSeek-V2/V3": ("deepseek_v2", "deepseek_v3"), "Kimi K2": ("kimi_k2",), "Jamba": ("jamba",),
    "Granite-4.0-H": ("granitemoehybrid",), "Nemotron-H": ("nemotron_h",), "Falcon-H1": ("falcon_h1",),
    "Mamba": ("mamba", "falcon_mamba"), "Mamba-2": ("mamba2",),
}
# readers of the older families README does not list among the 2024-2026 ones
OLDER_MODEL_TYPES = {"llama", "mistral", "mixtral", "phi3", "qwen2", "qwen2_moe", "gemma", "gpt2"}


def test_the_families_readme_lists_are_the_model_types_hf_reads():
    from memcalc import hf

    listed = re.search(r"as the default weight format \(([^)]*)\)", TEXT).group(1)
    assert [name.strip() for name in " ".join(listed.split()).split(",")] == list(FAMILY_MODEL_TYPES)
    named = {model_type for types in FAMILY_MODEL_TYPES.values() for model_type in types}
    readable = set(hf._READERS) | set(hf._MULTIMODAL_TEXT_TYPES)
    assert named - readable == set()
    assert readable - named == OLDER_MODEL_TYPES  # a new reader is either listed in README or an older family
    assert set(hf.KNOWN_MODEL_TYPES) == readable


def _accuracy_cases() -> dict[str, dict[str, str]]:
    with (REPO / "benchmarks" / "results" / "accuracy_fake.csv").open() as file:
        return {row["case"]: row for row in csv.DictReader(file)}


def test_accuracy_suite_counts_are_as_readme_quotes():
    """Rows with ``layers`` set ran a layer-reduced model through its transformers class (``hf L4``);
    the others are full size, training steps or generate() runs (``infer``), GPT-2's through its
    transformers class (``GPT-2 hf``)."""
    cases = _accuracy_cases()
    full = [case for case, row in cases.items() if not row["layers"]]
    reduced = [case for case, row in cases.items() if row["layers"]]
    assert all(" hf L" in case for case in reduced)
    full_hf = [case for case in full if " hf " in case and " infer " not in case]
    assert all(case.startswith("GPT-2") for case in full_hf)
    assert f"covers {len(full)} full-size configurations" in TEXT
    assert f"{len(full_hf)} of them through transformers' GPT-2 class" in TEXT
    reduced_infer = [case for case in reduced if " infer " in case]
    assert f"{len(reduced) - len(reduced_infer)} layer-reduced training steps" in TEXT
    assert f"{len(reduced_infer)} layer-reduced generate() runs" in TEXT
    reduced = [case for case in reduced if " infer " not in case]
    infer = [case for case in cases if " infer " in case]
    trained = len(cases) - len(infer)
    summary = (REPO / "docs" / "accuracy.md").read_text()
    assert f"{len(cases)} configurations: {trained} training steps, {len(infer)} generate() runs." in summary
    # the families README says the layer-reduced steps cover, and the features among the full-size ones
    families = re.search(r"layer-reduced training steps of (.*?) through their own", TEXT).group(1)
    prefixes = {"Qwen3": "Qwen3-8B", "Gemma 3": "Gemma3-", "OLMo 2": "OLMo2 ", "SmolLM3": "SmolLM3 ",
                "Llama 4": "Llama4-", "Qwen3-MoE": "Qwen3-30B-A3B", "Mixtral": "Mixtral-"}
    assert re.split(r", | and ", families) == list(prefixes)
    assert {next(p for p, prefix in prefixes.items() if case.startswith(prefix)) for case in reduced} == set(prefixes)
    for marker in (" lora-", " qlora-", " accum-", " moments-bf16", " beams 4", " sample ", " rc-op", " dropout-"):
        assert any(marker in case for case in full), marker


def test_readme_links_and_paths_exist():
    targets = re.findall(r"\]\(([^)#]+)\)", README)
    targets += re.findall(r"(?<![\w/])((?:benchmarks|docs|scripts|tests|configs)/[\w./-]*\w/?)", README)
    assert len(targets) >= 15
    assert [target for target in targets if not (REPO / target).exists()] == []
