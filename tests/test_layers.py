"""The layer contracts `make lint` checks hold for the package, and break on a wrong import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """import-linter run over the ``consumer`` package found in ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the package and its contracts, to break."""
    shutil.copytree(ROOT / "consumer", tmp_path / "consumer")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_import(module: Path, line: str) -> None:
    text = module.read_text()
    future = "from __future__ import annotations\n"
    module.write_text(text.replace(future, f"{future}\n{line}\n", 1))


def test_the_package_keeps_its_layers(tree: Path) -> None:
    """Today's tree keeps both contracts."""
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_driver_in_the_core_is_refused(tree: Path) -> None:
    """The core imports no I/O driver."""
    add_import(tree / "consumer" / "core" / "ladder.py", "import pymongo")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "consumer.core.ladder -> pymongo" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "arrow"),
    [
        (
            "store/jobs.py",
            "from consumer.amqp import publish",
            "consumer.store.jobs -> consumer.amqp.publish",
        ),
        (
            "core/schedule.py",
            "from consumer.store import jobs",
            "consumer.core.schedule -> consumer.store.jobs",
        ),
        (
            "service/picker.py",
            "from consumer.cli import output",
            "consumer.service.picker -> consumer.cli.output",
        ),
        ("settings.py", "from consumer.core import ladder", "consumer.settings -> consumer.core"),
    ],
)
def test_an_import_against_the_layers_is_refused(
    tree: Path, module: str, line: str, arrow: str
) -> None:
    """Adapters stay independent of each other, and nothing imports a layer above it."""
    add_import(tree / "consumer" / module, line)
    result = lint_imports(tree)
    assert result.returncode != 0
    assert arrow in result.stdout, result.stdout


# Imports each module into an interpreter holding no other mailbus module, so that an
# import cycle shows whichever module a process happens to import first.
EACH_ALONE = """
import importlib, pkgutil, sys
import consumer
names = [m.name for m in pkgutil.walk_packages(consumer.__path__, "consumer.")]
for name in names:
    if name == "consumer.__main__":
        continue
    for loaded in [m for m in sys.modules if m == "consumer" or m.startswith("consumer.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as exc:
        print(f"{name}: {exc}")
"""


def test_every_module_imports_first() -> None:
    """No import cycle: every module can be the first one a process imports."""
    result = subprocess.run(
        [sys.executable, "-c", EACH_ALONE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
