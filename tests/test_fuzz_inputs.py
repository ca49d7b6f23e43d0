"""Every input boundary, fuzzed: whatever the input, memcalc prints a sane estimate (exit 0, every
byte count an ``int`` >= 0 and below 10**18) or refuses it with exit 2 and one line on stderr
starting ``error: ``. Never a traceback, never exit 1 (an internal error).

Boundaries: memcalc YAML model files, Hugging Face config.json, ``--scenario`` strings,
``--kv-budget`` sizes, ``--over`` grammars, safetensors headers and GGUF files. Each example is
written to its own path (the library caches GGUF files by path, size and mtime)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import struct
import tempfile
from functools import cache
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "configs" / "models"
HF_CONFIGS = Path(__file__).parent / "data" / "hf_configs"

ABSURD = 10**18
# run_cli is function-scoped; each example resets its capture and writes to a path of its own
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_counter = itertools.count()


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="memcalc-fuzz-") as folder:
        yield Path(folder)


def fresh_dir(root: Path) -> Path:
    folder = root / f"case{next(_counter)}"
    folder.mkdir()
    return folder


# --- The allowed outcomes ---------------------------------------------------------------------------

_CHECKED_KEYS = {"memory", "components", "kv_budget", "parameters", "active_parameters", "bytes", "phases"}


def _check_numbers(value, path: str = "", checked: bool = False) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _check_numbers(item, f"{path}.{key}", checked or key in _CHECKED_KEYS)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_numbers(item, f"{path}[{index}]", checked)
    elif checked and isinstance(value, (int, float)) and not isinstance(value, bool):
        assert isinstance(value, int), f"{path} = {value!r} is not an int"
        assert 0 <= value < ABSURD, f"{path} = {value:,} is negative or absurd"


def assert_allowed(result, args) -> dict | None:
    """exit 0 with sane JSON (returned), or exit 2 with one ``error: `` line (None)."""
    where = f"memcalc {' '.join(map(str, args))}"
    assert "Traceback" not in result.stderr + result.stdout, f"{where}: traceback\n{result.stderr}"
    if result.exit_code == 0:
        document = json.loads(result.stdout)
        _check_numbers(document)
        for component in document.get("components", []):
            assert isinstance(component["bytes"], int) and 0 <= component["bytes"] < ABSURD, (where, component)
        return document
    assert result.exit_code == 2, f"{where}: exit {result.exit_code}: {result.stderr.strip()}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"{where}: {len(lines)} lines on stderr:\n{result.stderr}"
    assert lines[0].startswith("error: "), f"{where}: {lines[0]!r}"
    assert len(lines[0]) > len("error: ") + 3, f"{where}: an empty message"
    return None


def run_checked(run_cli, *args):
    args = [str(arg) for arg in args]
    result = run_cli(*args)
    if currently_in_test_context():
        event(f"{args[0]}: exit {result.exit_code}")  # pytest --hypothesis-show-statistics: how many got through
    return assert_allowed(result, args)


# --- Values that break things -------------------------------------------------------------------

bad_scalars = st.one_of(
    st.sampled_from([1, 2, 4, 64, 128, 4096, 2**20]),  # valid but odd: a model this small or large
    st.sampled_from([0, -1, 1, 2, 3, 7, -(2**31), 2**31, 2**40, 2**63, 2**64, 10**30, 0.5, -0.0, 1e308,
                     float("inf"), float("-inf"), float("nan"), True, False, None, "", "x", "12", "1e3",
                     "-5", "none", "null", "bf16", "rmsnorm", "gated", "silu"]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
bad_values = st.one_of(
    bad_scalars,
    st.lists(bad_scalars, max_size=3),
    st.dictionaries(st.sampled_from(["a", "num_experts", "rank", "type", "factor"]), bad_scalars, max_size=2),
)


def mutate(data: dict, draw, keys: list[str]) -> dict:
    """Drop a random subset of ``keys``, then set a few keys (known or unknown) to bad values."""
    dropped = draw(st.lists(st.integers(0, 7), min_size=len(keys), max_size=len(keys)))  # 7: drop it
    data = {key: value for key, value in data.items() if key not in keys or dropped[keys.index(key)] != 7}
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        key = draw(st.one_of(st.sampled_from(keys), st.sampled_from(["hiden_size", "unknown_key", "moe_layers"])))
        data[key] = draw(bad_values)
    return data


# --- memcalc YAML model files ------------------------------------------------------------------------

YAML_BASES = ["llama-3-8b", "mixtral-8x7b", "deepseek-v2-lite", "gpt-oss-20b", "jamba-1.5-mini", "gemma-2b",
              "gpt2"]


@cache
def yaml_base(name: str) -> dict:
    return yaml.safe_load((MODELS / f"{name}.yaml").read_text())


@st.composite
def model_yaml_text(draw) -> str:
    base = copy.deepcopy(yaml_base(draw(st.sampled_from(YAML_BASES))))
    base.pop("aliases", None)  # a user file naming a bundled alias is not what is tested here
    keys = [key for key in base if key != "name"]
    data = mutate(base, draw, keys)
    for key, value in list(data.items()):  # nested mappings (moe, mla, mamba) get the same treatment
        if isinstance(value, dict) and value and draw(st.integers(0, 3)) == 3:
            data[key] = mutate(dict(value), draw, list(value))
    text = yaml.safe_dump(data, sort_keys=False)
    if draw(st.integers(0, 9)) < 9:
        return text
    return draw(st.sampled_from([text[: draw(st.integers(0, len(text)))], "- a\n- b\n", "{unclosed: [\n", "42\n", ""]))


@FUZZ
@given(text=model_yaml_text())
def test_fuzz_model_yaml(run_cli, scratch, text):
    path = fresh_dir(scratch) / "model.yaml"
    path.write_text(text)
    run_checked(run_cli, "show", path, "--json")
    run_checked(run_cli, "train", path, "--json", "-s", "128")


# --- Hugging Face config.json ------------------------------------------------------------------------

HF_BASES = ["Qwen--Qwen3-8B.json", "openai--gpt-oss-20b.json", "ai21labs--AI21-Jamba-1.5-Mini.json",
            "Qwen--Qwen3-30B-A3B.json", "deepseek-ai--DeepSeek-V3.json", "Qwen--Qwen3-VL-8B-Instruct.json",
            "meta-llama--Llama-3.2-1B.json", "nvidia--Nemotron-H-56B-Base-8K.json", "tiiuae--falcon-mamba-7b.json"]


KNOWN_DEFECT_KEYS: set[str] = set()  # keys left out of the mutations while a defect is open


@cache
def hf_base(name: str) -> dict:
    return json.loads((HF_CONFIGS / name).read_text())


@st.composite
def hf_config(draw) -> dict:
    data = copy.deepcopy(hf_base(draw(st.sampled_from(HF_BASES))))
    target = data["text_config"] if isinstance(data.get("text_config"), dict) and draw(st.booleans()) else data
    keys = [key for key in target if key not in ("model_type",) or draw(st.booleans())]
    mutated = mutate(target, draw, keys)
    target.clear()
    target.update(mutated)
    for key, value in list(target.items()):
        if isinstance(value, dict) and value and draw(st.integers(0, 3)) == 3:
            target[key] = mutate(dict(value), draw, [item for item in value if item not in KNOWN_DEFECT_KEYS])
    if draw(st.integers(0, 3)) == 3:  # layer types: unknown names, wrong lengths
        layers = target.get("num_hidden_layers")
        count = layers if isinstance(layers, int) and 0 <= layers <= 256 else 4
        count = max(0, count + draw(st.sampled_from([0, 0, -1, 1, -count])))
        names = st.sampled_from(["full_attention", "sliding_attention", "chunked_attention", "mamba",
                                 "linear_attention", "attention", "moe", "bogus", "", 3, None])
        target["layer_types"] = draw(st.lists(names, min_size=count, max_size=count))
    if draw(st.integers(0, 4)) == 4 and "text_config" not in data:  # nest the whole thing
        data = {"model_type": draw(st.sampled_from(["qwen3_vl", "llava", "gemma3", "mistral3", "unknown"])),
                "text_config": data}
    return data


@FUZZ
@given(data=hf_config())
def test_fuzz_hf_config(run_cli, scratch, data):
    path = fresh_dir(scratch) / "config.json"
    path.write_text(json.dumps(data))
    run_checked(run_cli, "show", path, "--json")


@pytest.mark.parametrize("value", [1, 2.5])
def test_modules_to_not_convert_not_a_list(run_cli, tmp_path, value):
    data = copy.deepcopy(hf_base("openai--gpt-oss-20b.json"))
    data["quantization_config"]["modules_to_not_convert"] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    run_checked(run_cli, "show", tmp_path / "config.json", "--json")


@settings(FUZZ, max_examples=15)
@given(data=hf_config())
def test_fuzz_hf_config_infer(run_cli, scratch, data):
    path = fresh_dir(scratch) / "config.json"
    path.write_text(json.dumps(data))
    run_checked(run_cli, "infer", path, "--json", "--context", "256")


@FUZZ
@given(text=st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda raw: raw.decode("latin-1")),
                      st.sampled_from(["[]", "null", "1", "{", '{"model_type": null}', '{"text_config": 3}',
                                       '{"model_type": "llama", "num_hidden_layers": "2"}'])))
def test_fuzz_hf_config_raw_text(run_cli, scratch, text):
    path = fresh_dir(scratch) / "config.json"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    run_checked(run_cli, "show", path, "--json")


# --- --scenario, --kv-budget, --over -----------------------------------------------------------------

SCENARIO_KEYS = ["name", "gpus", "dp", "tp", "pp", "cp", "ep", "sp", "zero", "fsdp", "distributed_optimizer",
                 "microbatches", "vpp", "offload", "pad_vocab", "prefetch", "gpus_per_node", "tp_impl", "batch",
                 "seq", "dtype", "precision", "optimizer", "recompute", "attention", "loss", "activation_model",
                 "tpp", "gpu", "distributed-optimizer", ""]
scenario_values = st.one_of(
    st.sampled_from(["1", "2", "4", "8", "3", "0", "-1", "x", "true", "false", "yes", "full", "grad-op", "hybrid",
                     "optimizer", "both", "bf16", "fp8", "amp-bf16", "adamw", "selective", "flash", "chunked",
                     "megatron", "1.5", "1e3", "99999999999999999999", "", " ", "=", "none", "null"]),
    st.integers(-5, 2**40).map(str),
    st.text(alphabet="abz019=,;.- ", max_size=6),
)


@st.composite
def scenario_text(draw) -> str:
    pairs = draw(st.lists(st.tuples(st.sampled_from(SCENARIO_KEYS), scenario_values), max_size=5))
    separator = draw(st.sampled_from([",", ";", ", "]))
    items = [key if draw(st.integers(0, 9)) == 9 else f"{key}={value}" for key, value in pairs]
    return separator.join(items)


@FUZZ
@given(texts=st.lists(scenario_text(), min_size=1, max_size=2))
def test_fuzz_scenario(run_cli, texts):
    args = ["compare", "llama-3-8b", "-s", "128", "--json"]
    for text in texts:
        args += ["--scenario", text]
    run_checked(run_cli, *args)


size_text = st.one_of(
    st.tuples(st.sampled_from(["0", "1", "4.6", "-1", "1e3", "1e-9", ".5", "5.", "1e400", "99999999999999999999",
                               "nan", "inf", "0x10", "1_000", "", " 3 "]),
              st.sampled_from(["", "B", "KiB", "kb", "MiB", "MB", "GiB", "gb", "TiB", "TB", "PB", "g", "GiBs",
                               " GiB", "%"]))
    .map("".join),
    st.text(max_size=8),
)


def _plausible_size(text: str) -> bool:
    """Sizes up to about 10**18 bytes; larger ones are the known defect below."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*[A-Za-z]*\s*", text)
    return match is None or float(match.group(1)) < 1e5


@FUZZ
@given(text=size_text.filter(_plausible_size))
def test_fuzz_kv_budget(run_cli, text):
    run_checked(run_cli, "infer", "llama-3-8b", "--json", "--context", "256", f"--kv-budget={text}")


@pytest.mark.parametrize("text", ["1e400", "1e10000000", "99999999999999999999TB"])
def test_absurd_kv_budget_is_refused(run_cli, text):
    run_checked(run_cli, "infer", "llama-3-8b", "--json", "--context", "256", f"--kv-budget={text}")


over_number = st.one_of(st.sampled_from(["1", "1k", "2k", "4k", "1m", "0", "-1", "x", "k", "1.5k", "1K", "1M",
                                         "64", "3", "", " 8 ", "1g", "99999999999999"]),
                        st.integers(-3, 10**6).map(str))


@st.composite
def over_text(draw) -> str:
    key = draw(st.sampled_from(["seq", "batch", "gpus", "grad_accum", "lora_rank", "grad-accum", "tp", "", "SEQ"]))
    numbers = draw(st.lists(over_number, min_size=1, max_size=3))
    spec = draw(st.sampled_from(["..", ",", "...", ".. ", ";"])).join(numbers)
    return draw(st.sampled_from([f"{key}={spec}", f"{key}={spec}", f"{key}{spec}", f"{key}=", spec]))


@settings(FUZZ, max_examples=20)
@given(text=over_text())
def test_fuzz_over(run_cli, text):
    run_checked(run_cli, "sweep", "llama-3.2-1b", "--json", f"--over={text}")


def test_absurd_over_is_refused(run_cli):
    run_checked(run_cli, "sweep", "llama-3.2-1b", "--json", "--over=seq=99999999999999")


# --- safetensors headers -----------------------------------------------------------------------------

TINY_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
               "vocab_size": 96, "max_position_embeddings": 256, "tie_word_embeddings": True,
               "hidden_act": "silu", "rms_norm_eps": 1e-5}
DTYPES = ["F32", "F16", "BF16", "I8", "U8", "F8_E4M3", "F4", "I64", "BOOL", "Q4", "f16", "", 7, None]
shape_item = st.one_of(st.integers(0, 256), st.sampled_from([-1, -(2**40), 2**40, 2**63, 2**64, 10**30, 1.5, "4",
                                                             None]))


BITS = {"F32": 32, "F16": 16, "BF16": 16, "I8": 8, "U8": 8, "F8_E4M3": 8, "F4": 4, "I64": 64, "BOOL": 8}


@st.composite
def tensor_entry(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.one_of(st.lists(st.integers(1, 256), max_size=3), st.lists(shape_item, max_size=4), bad_scalars))
    consistent = isinstance(shape, list) and all(type(item) is int for item in shape) and dtype in BITS
    size = math.prod(shape) * BITS[dtype] // 8 if consistent else 0
    offsets = draw(st.one_of(st.just([0, size]), st.lists(st.integers(-10, 2**40), max_size=3),
                             st.tuples(st.just(0), st.integers(0, 4096)).map(list), bad_scalars))
    entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    for key in list(entry):
        if draw(st.integers(0, 6)) == 6:
            del entry[key]
    return draw(bad_values) if draw(st.integers(0, 9)) == 9 else entry


TENSOR_NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight",
                "model.norm.weight", "visual.blocks.0.attn.qkv.weight", "__metadata__", "x"]


@st.composite
def safetensors_bytes(draw) -> bytes:
    header = draw(st.dictionaries(st.sampled_from(TENSOR_NAMES), tensor_entry(), max_size=4))
    if draw(st.integers(0, 9)) == 9:
        raw = draw(st.binary(max_size=64))
    else:
        raw = json.dumps(header).encode()
        if draw(st.integers(0, 9)) == 9:
            raw = raw[: draw(st.integers(0, len(raw)))]
    length = draw(st.one_of(st.just(len(raw)), st.just(len(raw)), st.integers(0, 2**64 - 1),
                            st.sampled_from([0, len(raw) + 1, max(0, len(raw) - 1), 2**63])))
    data = struct.pack("<Q", length) + raw + bytes(draw(st.integers(0, 4096)))
    if draw(st.integers(0, 4)) == 4:
        data = data[: draw(st.integers(0, len(data)))]
    return data


@FUZZ
@given(data=safetensors_bytes(), index=st.booleans())
def test_fuzz_safetensors_header(run_cli, scratch, data, index):
    folder = fresh_dir(scratch)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    if index:  # a sharded checkpoint whose index points at the file
        name = "model-00001-of-00001.safetensors"
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"model.embed_tokens.weight": name}}))
        (folder / name).write_bytes(data)
    else:
        (folder / "model.safetensors").write_bytes(data)
    run_checked(run_cli, "show", folder, "--json")


# --- GGUF files --------------------------------------------------------------------------------------


@cache
def tiny_gguf() -> bytes:
    """A two-layer llama GGUF file written by gguf.GGUFWriter (F32 tensors, zero-filled)."""
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    hidden, layers, heads, kv_heads, ff, vocab = 64, 2, 4, 2, 128, 96
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_name("tiny-llama")
        writer.add_block_count(layers)
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(ff)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_context_length(256)
        writer.add_rope_dimension_count(hidden // heads)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(vocab)
        head_dim = hidden // heads
        shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
        for layer in range(layers):
            prefix = f"blk.{layer}"
            shapes |= {f"{prefix}.attn_norm.weight": (hidden,), f"{prefix}.ffn_norm.weight": (hidden,),
                       f"{prefix}.attn_q.weight": (heads * head_dim, hidden),
                       f"{prefix}.attn_k.weight": (kv_heads * head_dim, hidden),
                       f"{prefix}.attn_v.weight": (kv_heads * head_dim, hidden),
                       f"{prefix}.attn_output.weight": (hidden, heads * head_dim),
                       f"{prefix}.ffn_gate.weight": (ff, hidden), f"{prefix}.ffn_up.weight": (ff, hidden),
                       f"{prefix}.ffn_down.weight": (hidden, ff)}
        for name, shape in shapes.items():
            writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def _header_length() -> int:
    """Where the tensor data starts, roughly: the fuzzing concentrates on the header and tensor infos."""
    data = tiny_gguf()
    return min(len(data), 4096)


@st.composite
def gguf_bytes(draw) -> bytes:
    data = bytearray(tiny_gguf())
    head = _header_length()
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, head - 1))
        data[position] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, data[position] ^ 0x01, data[position] ^ 0x40]))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, head))]
    return bytes(data)


def test_tiny_gguf_reads(run_cli, tmp_path):
    """The unmutated file is a model: the fuzzing starts from something valid."""
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_gguf())
    assert run_checked(run_cli, "show", path, "--json") is not None


@settings(FUZZ, max_examples=40)
@given(data=gguf_bytes())
def test_fuzz_gguf(run_cli, scratch, data):
    path = fresh_dir(scratch) / "model.gguf"
    path.write_bytes(data)
    run_checked(run_cli, "show", path, "--json")
    run_checked(run_cli, "infer", path, "--json", "--context", "128")
