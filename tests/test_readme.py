"""The README's Python example runs as written and gives the answers its comments promise."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    names: dict[str, Any] = {}
    exec(compile(blocks[0], str(README), "exec"), names)
    store, train, now = names["store"], names["train"], names["now"]
    assert train.select("user_id", "clicks", "spend").rows() == [(1, 3, 9.5), (2, 1, 3.0)]
    assert names["again"].collect()["clicks"].to_list() == [3, 1]
    assert store.load_dataset("train_v1").collect().equals(train)
    online = store.get_online_features([{"user_id": 1}, {"user_id": 2}], "churn", now=now)
    assert online.rows() == [(1, 5, 12.0), (2, 1, 3.0)]
    assert store.get_feature_vector({"user_id": 1}, ["user_stats:clicks"], now=now) == {"clicks": 5}
    # At the current time the 2024 rows are past the 7-day ttl: the default `now` gives nulls.
    assert store.get_feature_vector({"user_id": 1}, ["user_stats:clicks"]) == {"clicks": None}
    assert (tmp_path / "my_repo" / "views" / "user_stats" / "_delta_log").is_dir()
    assert isinstance(train, pl.DataFrame)
