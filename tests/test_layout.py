"""Import boundaries (STYLE.md): one adapter module per outside engine, and the core never
imports the CLI. Imports are read with ``ast`` from every module of the package, including
ones added later and imports inside functions, so the rule holds as the package grows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import polarstore

PACKAGE = Path(polarstore.__file__).parent
# A library (top-level name) and the only modules that may import it.
OWNERS = {
    "deltalake": {"polarstore._offline"},
    "lmdb": {"polarstore._online"},
    "obstore": {"polarstore._storage"},
    "pyspark": {"polarstore._spark"},
    "polarstore._cli": {"polarstore._cli", "polarstore.__main__"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module ``source`` imports, absolute (relative imports resolved), with parents."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from polarstore import _cli`` imports the module polarstore._cli.
            found = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        for name in found:
            parts = name.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def violations(source: str, module: str, *, is_package: bool = False) -> list[str]:
    names = imported(source, module, is_package=is_package)
    return [
        f"{module} imports {library}; only {sorted(owners)} may"
        for library, owners in OWNERS.items()
        if library in names and module not in owners
    ]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_its_modules() -> None:
    names = {module_name(p) for p in MODULES}
    assert {"polarstore", "polarstore._offline", "polarstore._online", "polarstore._store"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_each_module_keeps_to_its_imports(path: Path) -> None:
    is_package = path.name == "__init__.py"
    assert violations(path.read_text(), module_name(path), is_package=is_package) == []


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("import deltalake", "polarstore._retrieval"),
        ("from deltalake.exceptions import DeltaError", "polarstore._store"),
        ("def f():\n    import lmdb\n", "polarstore._store"),
        ("import pyspark.sql", "polarstore._offline"),
        ("from polarstore._cli import main", "polarstore._store"),
        ("from polarstore import _cli", "polarstore._demo"),
        ("from . import _cli", "polarstore._store"),
        ("from .._cli import main", "polarstore._records._codec"),
        ("from .. import _cli", "polarstore._records._codec"),
        ("import polarstore._cli as cli", "polarstore"),
    ],
)
def test_the_check_catches_a_crossed_boundary(source: str, module: str) -> None:
    assert violations(source, module), source


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("import deltalake", "polarstore._offline"),
        ("import lmdb", "polarstore._online"),
        ("from polarstore._store import FeatureStore", "polarstore._cli"),
        ("from ._offline import OfflineStore", "polarstore._store"),
        ("from ._cli import x", "polarstore._records._codec"),
    ],
)
def test_the_check_allows_what_is_allowed(source: str, module: str) -> None:
    assert violations(source, module) == []


def test_the_core_never_loads_pyspark() -> None:
    """pyspark (the optional Spark engine) is imported inside ``_spark``'s functions only:
    importing every module and running a Polars retrieval leaves it unloaded."""
    import subprocess
    import sys

    code = (
        "import sys, tempfile, datetime as dt, polars as pl, polarstore, polarstore._spark\n"
        "from polarstore import Entity, FeatureStore, FeatureView\n"
        "s = FeatureStore(tempfile.mkdtemp())\n"
        "s.apply(FeatureView('v', entities=Entity('u', 'k'), schema={'x': pl.Int64}))\n"
        "t = [dt.datetime(2024, 1, 1)]\n"
        "s.write('v', pl.DataFrame({'k': [1], 'x': [2], 'event_timestamp': t}))\n"
        "spine = pl.DataFrame({'k': [1], 'event_timestamp': t})\n"
        "assert s.get_historical_features(spine, ['v:x']).collect()['x'].to_list() == [2]\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyspark', 'py4j')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "[]", done.stdout
