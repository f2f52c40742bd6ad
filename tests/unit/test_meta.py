"""Project-wide rules checked as tests: public surfaces, packaging, generated code, imports."""

from __future__ import annotations

import importlib
import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import flctl
from tests.conftest import REPO

SUBPACKAGES = sorted(
    m.name
    for m in pkgutil.walk_packages(flctl.__path__, "flctl.")
    if m.ispkg and "._" not in m.name
)


@pytest.mark.parametrize("name", ["flctl", *SUBPACKAGES])
def test_all_is_sorted_and_complete(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert list(exported) == sorted(exported), f"{name}.__all__ is not sorted"
    for item in exported:
        assert hasattr(module, item), f"{name}.__all__ names missing {item!r}"
    public = {
        k
        for k, v in vars(module).items()
        if not k.startswith("_")
        and getattr(v, "__module__", "").startswith(name + ".")
        and not isinstance(v, type(module))
    }
    assert public <= set(exported), f"{name} exposes {public - set(exported)} outside __all__"


def test_packaging_lists_every_subpackage() -> None:
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {"flctl", *(m.name for m in pkgutil.walk_packages(flctl.__path__, "flctl.") if m.ispkg)}
    found.discard("flctl.templates")
    assert found <= listed, found - listed


def test_generated_stubs_match_proto(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed")
    out = tmp_path / "gen"
    env_path = str(Path(sys.executable).parent)
    subprocess.run(
        ["bash", str(REPO / "scripts" / "gen-proto"), str(out)],
        check=True,
        env={"PATH": f"{env_path}:/usr/bin:/bin", "PYTHON": sys.executable},
        capture_output=True,
    )
    committed = REPO / "flctl" / "transport" / "grpc" / "_proto"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi"))
    drifted = [
        name
        for name in names
        if _without_version_stamps((out / name).read_text())
        != _without_version_stamps((committed / name).read_text())
    ]
    assert not drifted, f"run scripts/gen-proto: {drifted} drifted"


def _without_version_stamps(text: str) -> str:
    """Generated code minus the generator's version stamps.

    A newer grpcio-tools or protoc stamps its own version (and the stubs then demand at least
    that runtime); the stubs' content is what must match the proto.
    """
    text = re.sub(
        r"^GRPC_GENERATED_VERSION = '[^']*'$", "GRPC_GENERATED_VERSION = ''", text, flags=re.M
    )
    text = re.sub(
        r"^# Protobuf Python Version: .*$", "# Protobuf Python Version:", text, flags=re.M
    )
    return re.sub(
        r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,",
        r"\1",
        text,
    )


def test_import_contracts() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed")
    result = subprocess.run([lint], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_unpickling_in_the_package() -> None:
    offenders = []
    for path in (REPO / "flctl").rglob("*.py"):
        text = path.read_text()
        for needle in ("pickle.load", "cloudpickle", "torch.load("):
            if needle in text and "weights_only=True" not in text:
                offenders.append(f"{path}: {needle}")
    assert not offenders


def test_help_is_fast_to_import() -> None:
    """`flctl --help` must not import torch (lint rule TID253 keeps it lazy)."""
    code = "import sys, flctl.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
