"""A small public surface, no pickle, errors that are builtins, clear errors at the edges.

The import boundaries between modules are held by ``test_layout.py``.
"""

from __future__ import annotations

import ast
import re
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

import polarstore
from polarstore import Entity, FeatureStore, FeatureView, ValidationError

PACKAGE = Path(polarstore.__file__).parent


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


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


# --- raw errors turned into clear ones (issue 10, item 13) -----------------------------------


def test_a_repository_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a repository")
    with pytest.raises(ValidationError, match=rf"{path} is a file, not a folder"):
        FeatureStore(path)
    with pytest.raises(ValidationError, match=rf"{path} is a file, not a folder"):
        FeatureStore(path / "repo")
    assert path.read_text() == "not a repository"


@pytest.mark.parametrize("keys", [5, None, 1.5, b"user_id", object()])
def test_join_keys_of_the_wrong_type_are_a_validation_error(keys: object) -> None:
    with pytest.raises(ValidationError, match=r"entity 'e': join_keys must be a str, a list"):
        Entity("e", join_keys=keys)  # type: ignore[arg-type]


def test_entities_of_the_wrong_type_are_a_validation_error() -> None:
    for entities in (5, [5], [], None):
        with pytest.raises(ValidationError, match=r"entities must be a non-empty list of Entity"):
            FeatureView("v", entities=entities, schema={"x": pl.Int64})  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [None, 5, ["user"]])
def test_search_needs_text(store: FeatureStore, text: object) -> None:
    with pytest.raises(ValidationError, match=r"search\(text\): text must be a str"):
        store.search(text)  # type: ignore[arg-type]


OUT_OF_RANGE = ["0001-01-01T00:00:00+05:00", "9999-12-31T23:00:00-05:00"]


@pytest.mark.parametrize("moment", OUT_OF_RANGE)
def test_moments_outside_years_1_to_9999_in_utc_are_a_validation_error(
    store: FeatureStore, moment: str
) -> None:
    view = FeatureView("v", entities=Entity("e", "k"), schema={"x": pl.Int64})
    store.apply(view)
    spine = pl.DataFrame({"k": [1], "event_timestamp": [datetime(2024, 1, 1)]})
    expected = rf"'{re.escape(moment)}' is outside the years 1 to 9999 once converted to UTC"
    with pytest.raises(ValidationError, match=rf"as_of {expected}"):
        store.get_historical_features(spine, ["v:x"], as_of=moment)
    with pytest.raises(ValidationError, match=rf"end {expected}"):
        store.materialize(end=moment)
    with pytest.raises(ValidationError, match=rf"now {expected}"):
        store.get_online_features({"k": 1}, ["v:x"], now=moment)  # type: ignore[arg-type]
    aware = datetime.fromisoformat(moment)
    with pytest.raises(ValidationError, match=r"outside the years 1 to 9999"):
        store.read("v", as_of=aware)


def test_an_online_path_uri_is_refused_and_creates_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError, match=r"online_path 's3://b/online'.*local folder"):
        FeatureStore(tmp_path / "repo", online_path="s3://b/online")
    assert not (tmp_path / "s3:").exists()
