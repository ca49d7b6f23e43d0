"""README.md starts with two commands that work on a fresh machine; CI (.ci/run) runs those same
two commands, verbatim, in a fresh virtual environment."""

from __future__ import annotations

import re
from pathlib import Path

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
