"""The built wheel is a complete, importable package on its own (no source tree needed)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
    )
    wheels = list(out.glob("sdft-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_is_abi3_and_ships_typing(wheel: Path) -> None:
    assert "-cp311-abi3-" in wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "sdft/py.typed" in names
    assert "sdft/_kernel.pyi" in names
    assert any(n.startswith("sdft/_kernel") and n.endswith(".so") for n in names)
    # The third-party evaluation data is never packaged.
    assert not any("self-distillation" in n for n in names)


def test_wheel_imports_outside_the_source_tree(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sdft, sdft._kernel\n"
        "from sdft import build_topk_targets, DEFAULT_DEMO_TEMPLATE, SimpleSDFTDataset\n"
        "print(sdft.__file__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip().startswith(str(site))
