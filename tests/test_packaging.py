"""The wheel carries the model library: build it, install it in a fresh virtual environment,
and run ``memcalc models`` from there (not from this checkout)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_finds_configs(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist), str(REPO)],
        check=True,
    )
    (wheel,) = dist.glob("memcalc-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # typer, rich, pydantic and yaml come from the environment running the tests: its own
    # site-packages, named in a .pth file (--system-site-packages would give the base
    # interpreter's when the tests run inside a virtual environment). A .pth line only appends a
    # directory, so an editable install of this checkout there is not activated: memcalc comes
    # from the wheel, whose site-packages precede those directories on sys.path.
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(venv_site) / "memcalc_test_dependencies.pth").write_text("\n".join(ours) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
    )
    located = subprocess.run(
        [str(python), "-c", "import memcalc.library as l; print(l.__file__); print(l.configs_dir())"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout.split()
    assert all(Path(path).is_relative_to(venv) for path in located), located
    listing = subprocess.run(
        [str(venv / "bin" / "memcalc"), "models"], capture_output=True, text=True, cwd=tmp_path, check=False,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert listing.returncode == 0, listing.stderr
    assert "llama-2-7b" in listing.stdout and "mixtral-8x7b" in listing.stdout
