"""The built wheel is a complete, importable package on its own (no source tree needed), its
version is written in one place, and the dependency pins agree with the declared ranges."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
import sys
import tomllib
import warnings
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

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
        "print(sdft.__version__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    location, version = result.stdout.split()
    assert location.startswith(str(site))
    assert version == cargo_version()


def cargo_version() -> str:
    return tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]


def test_version_is_written_once_in_cargo_toml(wheel: Path) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project
    assert "version" in project["dynamic"]
    version = cargo_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert wheel.name.startswith(f"sdft-{version}-")
    metadata = zipfile.ZipFile(wheel).read(f"sdft-{version}.dist-info/METADATA").decode()
    assert f"\nVersion: {version}\n" in metadata
    import sdft

    assert sdft.__version__ == importlib.metadata.version("sdft") == version
    for source in (REPO / "python" / "sdft").rglob("*.py"):
        assert version not in source.read_text(), f"{source} repeats the version"


def test_version_of_an_uninstalled_source_tree_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import sdft

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    try:
        importlib.reload(sdft)
        assert sdft.__version__ == "0+unknown"
    finally:
        monkeypatch.undo()
        importlib.reload(sdft)
    assert sdft.__version__ == cargo_version()


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_every_declared_dependency_inside_its_range() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    declared += tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    pins = pinned_versions()
    outside = []
    for text in declared:
        requirement = Requirement(text)
        pinned = pins.get(canonical(requirement.name))
        assert pinned is not None, f"constraints.txt does not pin {requirement.name}"
        if not requirement.specifier.contains(pinned, prereleases=True):
            outside.append(f"{requirement.name}=={pinned} outside {requirement.specifier}")
    assert outside == []


def test_fast_moving_dependencies_have_a_tested_upper_bound() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"]) + project["optional-dependencies"]["local"]
    bounds = {canonical(r.name): r.specifier for r in map(Requirement, declared)}
    pins = pinned_versions()
    for name in ("torch", "transformers", "peft", "tinker", "datasets"):
        uppers = [spec for spec in bounds[name] if spec.operator == "<"]
        assert len(uppers) == 1, f"{name} has no upper bound"
        # The bound admits the pinned (tested) release line and nothing past its next minor.
        major, minor = (int(part) for part in pins[name].split(".")[:2])
        assert uppers[0].version == f"{major}.{minor + 1}", (name, uppers[0], pins[name])


def test_deprecation_warnings_from_sdft_code_fail_the_suite() -> None:
    # pyproject's filterwarnings turns deprecations attributed to sdft modules into errors...
    for module in ("sdft", "sdft.models", "sdft.backends.local._runtime"):
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            try:
                warnings.warn_explicit("renamed", category, "x.py", 1, module=module)
            except category:
                continue
            raise AssertionError(f"{category.__name__} from {module} did not fail the test")
    # ...and leaves other modules' warnings to pytest's summary.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.warn_explicit("renamed", FutureWarning, "x.py", 2, module="sdftx")
    assert len(caught) == 1
