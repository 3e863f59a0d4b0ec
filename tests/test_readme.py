"""The README's Python and CLI examples run as written and give the answers they promise."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from polarstore._cli import cli

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


def test_readme_cli_example_runs_against_a_fresh_init_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every line of the README's CLI block, in order, on its own rows.csv: all succeed."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## The command line", 1)[1].split("\n## ", 1)[0]
    (csv,) = re.findall(r"```csv\n(.*?)```", section, re.S)
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("POLARSTORE_REPO", raising=False)
    (tmp_path / "rows.csv").write_text(csv, encoding="utf-8")
    runner = CliRunner(env={"COLUMNS": "200"})
    lines = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert len(lines) >= 8
    assert lines[0][:2] == ["polarstore", "init"]
    for argv in lines:
        assert argv[0] == "polarstore"
        result = runner.invoke(cli, argv[1:])
        assert result.exit_code == 0, (argv, result.output)
        assert result.stderr == ""
    # The README says what the last command prints; the CSV above is the whole input.
    claimed = re.search(r"The last command prints `(.*?)`", section)
    assert claimed is not None
    assert json.loads(result.stdout) == json.loads(claimed.group(1))
    assert json.loads(result.stdout) == [{"user_id": 42, "spend_7d": 12.5}]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_to_the_docs_resolve() -> None:
    """README and package links into docs/ name files and headings that exist."""
    root = README.parent
    sources = [README, *sorted((root / "polarstore").glob("*.py"))]
    links = [
        link
        for path in sources
        for link in re.findall(r"docs/[\w./-]+\.md(?:#[\w-]+)?", path.read_text(encoding="utf-8"))
    ]
    assert "docs/contract.md" in links
    for link in links:
        file, _, anchor = link.partition("#")
        assert (root / file).is_file(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (root / file).read_text(encoding="utf-8"), re.M)
            assert anchor in {_anchor(h) for h in headings}, link
    contract = (root / "docs" / "contract.md").read_text(encoding="utf-8")
    for anchor in re.findall(r"\]\(#([\w-]+)\)", contract):  # the page's own table of contents
        assert anchor in {_anchor(h) for h in re.findall(r"^#+ (.+)$", contract, re.M)}, anchor
