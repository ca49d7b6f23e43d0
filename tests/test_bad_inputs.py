"""The committed corpus of bad inputs (tests/data/bad_inputs.yaml): each case exits 2 with one line on
stderr that starts with the exact words given, never a traceback and never an internal error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CORPUS = yaml.safe_load((Path(__file__).parent / "data" / "bad_inputs.yaml").read_text())
FILES: dict[str, str] = CORPUS.get("files", {})


def _params():
    for case in CORPUS["cases"]:
        marks = [pytest.mark.xfail(reason=case["xfail"], strict=True)] if case.get("xfail") else []
        yield pytest.param(case, id=case["id"], marks=marks)


def test_corpus_is_well_formed():
    ids = [case["id"] for case in CORPUS["cases"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 50
    commands = {case["args"][0] for case in CORPUS["cases"]}
    assert {"train", "infer", "compare", "sweep", "plan", "validate", "show", "formats", "precisions",
            "gpus"} <= commands
    for case in CORPUS["cases"]:
        assert set(case) <= {"id", "args", "exit", "starts_with", "xfail"}, case["id"]
        assert case["starts_with"].startswith("error: "), case["id"]


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input(case, run_cli, tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    args = [str(arg).replace("{tmp}", str(tmp_path)) for arg in case["args"]]
    result = run_cli(*args)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.exit_code == case["exit"], f"exit {result.exit_code}: {result.stderr.strip()}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(case["starts_with"].replace("{tmp}", str(tmp_path))), lines[0]
