"""Module boundaries: one adapter per storage library, a small public surface, no pickle."""

from __future__ import annotations

import ast
from pathlib import Path

import polarstore

PACKAGE = Path(polarstore.__file__).parent
OWNERS = {"deltalake": "_offline.py", "lmdb": "_online.py"}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_adapters_import_storage_libraries() -> None:
    for path in PACKAGE.glob("*.py"):
        for library, owner in OWNERS.items():
            if library in imports(path):
                assert path.name == owner, f"{path.name} imports {library}; only {owner} may"


def test_nothing_imports_pickle() -> None:
    for path in PACKAGE.glob("*.py"):
        assert not {"pickle", "cloudpickle", "dill", "marshal"} & imports(path), path.name


def test_public_surface_is_small_and_private_modules_are_private() -> None:
    assert len(polarstore.__all__) <= 20
    for name in polarstore.__all__:
        assert hasattr(polarstore, name)
    public_modules = [p.name for p in PACKAGE.glob("*.py") if not p.name.startswith("_")]
    assert public_modules == ["demo.py"]  # polarstore.demo: the demo's pieces, for notebooks
    assert (PACKAGE / "py.typed").exists()


def test_errors_are_also_builtins() -> None:
    assert issubclass(polarstore.NotFoundError, KeyError)
    assert issubclass(polarstore.ValidationError, ValueError)
    assert issubclass(polarstore.SchemaError, ValueError)
    for name in ("NotFoundError", "ValidationError", "SchemaError", "ConflictError"):
        assert issubclass(getattr(polarstore, name), polarstore.PolarstoreError)
