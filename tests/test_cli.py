"""The ``polarstore`` command line, through its real entry points.

Most tests drive the click group with ``CliRunner`` (the same ``main`` the console script
runs, so error handling is exercised for real); a few run the installed ``polarstore``
console script in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from polarstore import Entity, FeatureStore, FeatureView
from polarstore._cli import EXAMPLE_DEFINITIONS, _read_csv, cli, parse_keys
from polarstore.demo import DEMO_MARKER, run_demo

SCRIPT = Path(sys.executable).with_name("polarstore")
ROWS_CSV = """\
user_id,event_timestamp,orders_7d,spend_7d
42,2024-05-01T00:00:00Z,3,12.5
42,2024-05-03 10:00:00+02:00,4,20
7,2024-05-02,1,5
"""


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    runner = CliRunner(env={"COLUMNS": "200", **(env or {})})
    return runner.invoke(cli, [str(a) for a in args])


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return result.stdout


def error(result: Result, code: int, *fragments: str) -> str:
    """Assert a clean failure: the exit code, one ``Error:`` line on stderr, no traceback."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository made by ``init`` with its example definitions applied."""
    path = tmp_path / "repo"
    ok(run("init", path))
    ok(run("--repo", path, "apply", path / "features.py"))
    return path


@pytest.fixture
def loaded(repo: Path, tmp_path: Path) -> Path:
    """``repo`` with three rows written to ``user_stats`` from a CSV file (version 0)."""
    csv = tmp_path / "rows.csv"
    csv.write_text(ROWS_CSV)
    ok(run("--repo", repo, "write", "user_stats", csv))
    return repo


# --- help -----------------------------------------------------------------------------------

COMMANDS = ["init", "apply", "ls", "describe", "history", "write", "materialize", "get", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example_and_a_repo_option(command: str) -> None:
    out = ok(run(command, "--help"))
    assert "Example" in out
    assert "--repo" in out
    assert f"polarstore {command}" in out or f"polarstore --repo my_repo {command}" in out


def test_group_help_lists_the_commands_and_a_quick_start() -> None:
    out = ok(run("--help"))
    assert "Quick start" in out
    for command in COMMANDS:
        assert command in out


def test_no_arguments_prints_the_help() -> None:
    assert "Quick start" in ok(run())


def test_unknown_command_and_option_are_one_line_usage_errors() -> None:
    error(run("frobnicate"), 2, "No such command 'frobnicate'")
    error(run("ls", "--frob"), 2, "No such option '--frob'", "polarstore ls --help")


# --- init and apply -------------------------------------------------------------------------


def test_init_creates_a_repository_with_example_definitions(tmp_path: Path) -> None:
    path = tmp_path / "new"
    out = ok(run("init", path))
    assert "initialised a repository" in out
    assert (path / "registry.json").is_file()
    source = (path / "features.py").read_text()
    assert source.startswith('"""Feature definitions')
    assert "# An entity is" in source
    compile(source, "features.py", "exec")
    (path / "features.py").write_text("# mine\n")
    out = ok(run("init", path))
    assert "already a repository" in out
    assert "kept the existing" in out
    assert (path / "features.py").read_text() == "# mine\n"


HOSTILE_NAMES = [
    'x"""+__import__("pathlib").Path("PWNED").touch()+"""',
    "x'''+__import__('pathlib').Path('PWNED').touch()+'''",
    "quote\"s and 'apostrophes'",
    "back\\slash\\n",
    "new\nline",
    "$(touch PWNED) `touch PWNED`",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_init_never_writes_the_folder_name_into_features_py(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A folder name is data: it must not become code in features.py, nor break the hint."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    out = ok(run("init", path))
    assert (path / "features.py").read_text(encoding="utf-8") == EXAMPLE_DEFINITIONS
    hint = out.split("then: ", 1)[1]
    # The printed command is shell-quoted: pasted into a shell it names the folder exactly.
    assert shlex.split(hint) == [
        "polarstore",
        "--repo",
        str(path),
        "apply",
        str(path / "features.py"),
    ]
    ok(run("--repo", path, "apply", path / "features.py"))
    assert not (tmp_path / "PWNED").exists()
    assert not (path / "PWNED").exists()
    with FeatureStore(path) as store:
        assert [v.name for v in store.list_feature_views()] == ["user_stats"]


def test_the_command_in_features_py_works_from_the_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(run("init", tmp_path / "r"))
    command = "polarstore apply features.py"
    assert command in EXAMPLE_DEFINITIONS
    monkeypatch.chdir(tmp_path / "r")
    assert "created" in ok(run(*shlex.split(command)[1:]))


def test_init_defaults_to_repo_option_and_env(tmp_path: Path) -> None:
    ok(run("--repo", tmp_path / "a", "init"))
    assert (tmp_path / "a" / "registry.json").is_file()
    ok(run("init", env={"POLARSTORE_REPO": str(tmp_path / "b")}))
    assert (tmp_path / "b" / "features.py").is_file()


def test_init_on_a_file_fails_cleanly(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    error(run("init", target), 2, "is a file")


def test_apply_registers_module_level_definitions_idempotently(repo: Path) -> None:
    with FeatureStore(repo) as store:
        assert [v.name for v in store.list_feature_views()] == ["user_stats"]
        assert [s.name for s in store.list_feature_services()] == ["churn_model"]
    out = ok(run("--repo", repo, "apply", repo / "features.py"))
    assert out.count("unchanged") == 3
    extended = EXAMPLE_DEFINITIONS.replace(
        '"spend_7d": pl.Float64}', '"spend_7d": pl.Float64, "returns_7d": pl.Int64}'
    )
    (repo / "features.py").write_text(extended)
    out = ok(run("apply", repo / "features.py", "--repo", repo))
    assert "updated" in out


def test_apply_imports_sibling_modules(tmp_path: Path, repo: Path) -> None:
    (tmp_path / "common.py").write_text(
        "from polarstore import Entity\nshop = Entity('shop', join_keys='shop_id')\n"
    )
    defs = tmp_path / "defs.py"
    defs.write_text("from common import shop\n")
    out = ok(run("--repo", repo, "apply", defs))
    assert "Entity" in out
    assert "shop" in out
    assert "created" in out
    assert "common" not in sys.modules


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        ("x = (\n", ["cannot import the definitions file", "SyntaxError", "line 1"]),
        ("raise RuntimeError('boom')\n", ["RuntimeError: boom"]),
        (
            "from polarstore import Entity\nu = Entity('a b', join_keys='id')\n",
            ["ValidationError", "entity name 'a b' is invalid"],
        ),
        ("x = 1\n", ["defines no Entity, FeatureView, AggregationView, OnDemandView or"]),
    ],
)
def test_apply_rejects_a_bad_definitions_file(
    repo: Path, tmp_path: Path, source: str, fragments: list[str]
) -> None:
    defs = tmp_path / "bad.py"
    defs.write_text(source)
    error(run("--repo", repo, "apply", defs), 1, *fragments)


def test_apply_reports_a_schema_conflict_and_a_missing_file(loaded: Path, tmp_path: Path) -> None:
    changed = EXAMPLE_DEFINITIONS.replace('"orders_7d": pl.Int64', '"orders_7d": pl.Float64')
    defs = tmp_path / "changed.py"
    defs.write_text(changed)
    error(run("--repo", loaded, "apply", defs), 1, "cannot change the dtype", "'orders_7d'")
    error(run("--repo", loaded, "apply", tmp_path / "nope.py"), 2, "does not exist")


# --- ls, describe, history ------------------------------------------------------------------


def test_ls_shows_entities_views_and_services(loaded: Path) -> None:
    out = ok(run("--repo", loaded, "ls"))
    for text in ("Entities", "Feature views", "Feature services", "user_id", "user_stats"):
        assert text in out
    assert "churn_model" in out
    assert "user_stats:*" in out
    assert "7d" in out


def test_ls_uses_the_env_var_and_says_when_empty(tmp_path: Path) -> None:
    ok(run("init", tmp_path / "empty"))
    (tmp_path / "empty" / "features.py").unlink()
    out = ok(run("ls", env={"POLARSTORE_REPO": str(tmp_path / "empty")}))
    assert "no definitions yet" in out


def test_commands_outside_a_repository_fail_cleanly(tmp_path: Path) -> None:
    for args in (["ls"], ["describe", "v"], ["history", "v"], ["get", "v:f", "--key", "k=1"]):
        error(run("--repo", tmp_path / "nowhere", *args), 1, "is not a polarstore repository")
    assert not (tmp_path / "nowhere").exists()


def test_describe_shows_schema_rows_and_online_state(loaded: Path) -> None:
    out = ok(run("--repo", loaded, "describe", "user_stats"))
    for text in ("Schema", "orders_7d", "Int64", "spend_7d", "Float64", "rows", "3"):
        assert text in out
    assert "2024-05-03 08:00:00+00:00" in out  # the latest event time, in UTC


def test_ls_and_describe_show_aggregation_views(loaded: Path, tmp_path: Path) -> None:
    defs = tmp_path / "windows.py"
    defs.write_text(
        "from polarstore import Aggregation, AggregationView\n"
        "spend = AggregationView('spend', 'user_stats', [\n"
        "    Aggregation('spend_7d', 'sum', '30d'),\n"
        "    Aggregation(None, 'count', '1h', forward=True, name='next_hour'),\n"
        "])\n"
    )
    ok(run("--repo", loaded, "apply", defs))
    listed = ok(run("--repo", loaded, "ls"))
    assert "Aggregation views" in listed
    assert "spend_7d_sum_30d" in listed
    out = ok(run("--repo", loaded, "describe", "spend"))
    for text in ("Aggregation view spend", "user_stats", "spend_7d_sum_30d", "last 30d"):
        assert text in out
    assert "next 1:00:00" in out
    assert "(rows)" in out


def test_tables_show_every_microsecond(repo: Path, tmp_path: Path) -> None:
    csv = tmp_path / "us.csv"
    csv.write_text(
        "user_id,event_timestamp,orders_7d,spend_7d\n1,2024-05-03T08:00:00.000700Z,1,1\n"
    )
    ok(run("--repo", repo, "write", "user_stats", csv))
    assert "2024-05-03 08:00:00.000700+00:00" in ok(run("--repo", repo, "describe", "user_stats"))


def test_history_lists_versions(loaded: Path, tmp_path: Path) -> None:
    csv = tmp_path / "more.csv"
    csv.write_text(ROWS_CSV)
    ok(run("--repo", loaded, "write", "user_stats", csv))
    out = ok(run("--repo", loaded, "history", "user_stats"))
    assert "History of user_stats" in out
    lines = [line for line in out.splitlines() if " write " in line]
    assert len(lines) == 2
    assert lines[0].split("│")[1].strip() == "0"
    assert lines[1].split("│")[1].strip() == "1"


def test_history_of_a_view_without_data(repo: Path) -> None:
    assert "no data yet" in ok(run("--repo", repo, "history", "user_stats"))


@pytest.mark.parametrize("command", ["describe", "history"])
def test_unknown_view_gets_a_hint(loaded: Path, command: str) -> None:
    error(run("--repo", loaded, command, "user_stat"), 1, "no feature view 'user_stat'", "Did you")


# --- write ----------------------------------------------------------------------------------


def test_write_csv_parses_timestamps_to_utc(loaded: Path) -> None:
    with FeatureStore(loaded) as store:
        rows = store.read("user_stats").collect()
    assert rows["event_timestamp"].to_list() == [
        datetime(2024, 5, 1, tzinfo=timezone.utc),
        datetime(2024, 5, 2, tzinfo=timezone.utc),
        datetime(2024, 5, 3, 8, tzinfo=timezone.utc),
    ]
    assert rows["spend_7d"].to_list() == [12.5, 5.0, 20.0]  # integers in the CSV, Float64 stored
    assert rows["user_id"].dtype == pl.Int64


def test_write_parquet_appends_a_version(loaded: Path, tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    pl.DataFrame(
        {
            "user_id": [42],
            "event_timestamp": [datetime(2024, 5, 4)],
            "orders_7d": [5],
            "spend_7d": [30.0],
        }
    ).write_parquet(path)
    out = ok(run("--repo", loaded, "write", "user_stats", path))
    assert "wrote 1 rows to user_stats: version 1" in out


@pytest.mark.parametrize(
    ("name", "content", "code", "fragments"),
    [
        ("missing.csv", None, 2, ["'FILE'", "does not exist"]),
        ("rows.json", "[]", 1, ["use a .parquet or .csv file"]),
        ("bad.parquet", "not parquet", 1, ["cannot read", "as PARQUET"]),
        (
            "badtime.csv",
            "user_id,event_timestamp,orders_7d,spend_7d\n1,last tuesday,1,1.0\n",
            1,
            ["column 'event_timestamp'", "'last tuesday'", "ISO-8601"],
        ),
        (
            "badvalue.csv",
            "user_id,event_timestamp,orders_7d,spend_7d\n1,2024-01-01,1.5,1.0\n",
            1,
            ["cannot read", "as CSV", "orders_7d"],
        ),
        (
            "extra.csv",
            "user_id,event_timestamp,orders_7d,spend\n1,2024-01-01,1,1.0\n",
            1,
            ["unknown column(s) ['spend']", "Did you mean 'spend_7d'", "missing column(s) "],
        ),
        (
            "both.csv",
            "user_id,event_timestamp,spend,extra\n1,2024-01-01,1.0,2\n",
            1,
            ["unknown column(s) ['spend', 'extra']", "missing column(s) ['orders_7d', 'spend_7d']"],
        ),
        (
            "semicolons.csv",
            "user_id;event_timestamp;orders_7d;spend_7d\n42;2024-05-01;3;12.5\n",
            1,
            ["missing column(s)", "';'-separated", "comma-separated"],
        ),
        (
            "tabs.csv",
            "user_id\tevent_timestamp\torders_7d\tspend_7d\n42\t2024-05-01\t3\t12.5\n",
            1,
            ["'\\t'-separated"],
        ),
    ],
)
def test_write_rejects_bad_files(
    loaded: Path,
    tmp_path: Path,
    name: str,
    content: str | None,
    code: int,
    fragments: list[str],
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    error(run("--repo", loaded, "write", "user_stats", path), code, *fragments)
    with FeatureStore(loaded) as store:
        assert store.versions() == {"user_stats": 0}  # nothing was written


def test_write_to_an_unknown_view(loaded: Path, tmp_path: Path) -> None:
    csv = tmp_path / "rows.csv"
    csv.write_text(ROWS_CSV)
    error(run("--repo", loaded, "write", "users_stats", csv), 1, "Did you mean 'user_stats'")


# --- materialize and get --------------------------------------------------------------------


def test_materialize_then_get_as_table_and_json(loaded: Path) -> None:
    out = ok(run("--repo", loaded, "materialize"))
    assert "Materialized" in out
    assert "user_stats" in out
    out = ok(
        run("--repo", loaded, "get", "user_stats:*", "--key", "user_id=42", "--now", "2024-05-04")
    )
    assert "user_id=42" in out
    assert "orders_7d" in out
    assert "20" in out
    out = ok(
        run(
            "--repo",
            loaded,
            "get",
            "churn_model",
            "--key",
            "user_id=42",
            "--key",
            "user_id=7",
            "--key",
            "user_id=99",
            "--now",
            "2024-05-04T00:00:00Z",
            "--json",
        )
    )
    assert json.loads(out) == [
        {"user_id": 42, "orders_7d": 4, "spend_7d": 20.0},
        {"user_id": 7, "orders_7d": 1, "spend_7d": 5.0},
        {"user_id": 99, "orders_7d": None, "spend_7d": None},
    ]


def test_get_applies_ttl_at_now(loaded: Path) -> None:
    ok(run("--repo", loaded, "materialize", "user_stats"))
    args = ["--repo", loaded, "get", "user_stats:spend_7d", "--key", "user_id=42"]
    stale = ok(run(*args, "--now", "2025-01-01", "--json", "--full-names"))
    assert json.loads(stale) == [{"user_id": 42, "user_stats__spend_7d": None}]
    assert "∅" in ok(run(*args, "--now", "2025-01-01"))
    assert "∅" not in ok(run(*args, "--now", "2024-05-04"))


def test_materialize_with_end_syncs_only_rows_up_to_it(loaded: Path) -> None:
    ok(run("--repo", loaded, "materialize", "user_stats", "--end", "2024-05-01T12:00:00Z"))
    args = ["--repo", loaded, "get", "user_stats:orders_7d", "--now", "2024-05-04", "--json"]
    assert json.loads(ok(run(*args, "--key", "user_id=42"))) == [{"user_id": 42, "orders_7d": 3}]
    ok(run("--repo", loaded, "materialize"))
    assert json.loads(ok(run(*args, "--key", "user_id=42"))) == [{"user_id": 42, "orders_7d": 4}]


def test_materialize_errors(loaded: Path) -> None:
    error(run("--repo", loaded, "materialize", "--end", "soon"), 2, "--end", "'soon'", "ISO 8601")
    error(run("--repo", loaded, "materialize", "user_stat"), 1, "Did you mean 'user_stats'")


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (["user_stats:orders_7d", "--key", "user42"], 2, ["--key", "'user42' is not NAME=VALUE"]),
        (["user_stats:orders_7d", "--key", "user_id="], 2, ["'user_id=' is not NAME=VALUE"]),
        (["user_stats:orders_7d"], 2, ["Missing option '--key'"]),
        (["--key", "user_id=1"], 2, ["Missing argument 'FEATURES...'"]),
        (["users:orders_7d", "--key", "user_id=1"], 1, ["no feature view 'users'"]),
        (["user_stats:orders", "--key", "user_id=1"], 1, ["has no feature 'orders'"]),
        (
            ["user_stats", "--key", "user_id=1"],
            1,
            ["'user_stats' is a feature view, not a feature service", "'user_stats:*'"],
        ),
        (
            ["churn_modle", "--key", "user_id=1"],
            1,
            ["no feature service 'churn_modle'", "Did you mean 'churn_model'"],
        ),
        (["user_stats:*", "--key", "user_id=1", "--now", "nope"], 2, ["--now", "'nope'"]),
        (
            ["user_stats:*", "--key", "user_id=1", "--key", "user_id=2", "--key", "x=1"],
            2,
            ["same number of values"],
        ),
    ],
)
def test_get_errors(loaded: Path, args: list[str], code: int, fragments: list[str]) -> None:
    ok(run("--repo", loaded, "materialize"))
    error(run("--repo", loaded, "get", *args), code, *fragments)


@pytest.mark.parametrize(
    "args",
    [
        ["get", "user_stats:*", "--key", "user_id=42", "--now", "0001-01-01T00:00:00+05:00"],
        ["materialize", "--end", "9999-12-31T23:00:00-05:00"],
    ],
)
def test_times_outside_years_1_to_9999_are_one_error_line(loaded: Path, args: list[str]) -> None:
    """Valid ISO 8601 that leaves the datetime range once converted to UTC: no traceback."""
    option = args[-2]
    error(run("--repo", loaded, *args), 2, f"Invalid value for {option}")


def test_get_now_never_returns_a_value_from_the_future_of_now(repo: Path, tmp_path: Path) -> None:
    # Passes once the "online" branch (online never serves a row after `now`) is merged.
    csv = tmp_path / "two.csv"
    csv.write_text(
        "user_id,event_timestamp,orders_7d,spend_7d\n"
        "1,2024-01-01T00:00:00Z,3,1.0\n"
        "1,2024-01-03T00:00:00Z,5,2.0\n"
    )
    ok(run("--repo", repo, "write", "user_stats", csv))
    ok(run("--repo", repo, "materialize"))
    args = ["--repo", repo, "get", "user_stats:orders_7d", "--key", "user_id=1", "--json"]
    assert json.loads(ok(run(*args, "--now", "2024-01-04"))) == [{"user_id": 1, "orders_7d": 5}]
    assert json.loads(ok(run(*args, "--now", "2024-01-02"))) == [{"user_id": 1, "orders_7d": None}]


@pytest.mark.parametrize(
    "value", ["02/04/2024 10:00", "04/02/2024", "2024/05/01", "1714521600", "May 1, 2024"]
)
def test_write_csv_accepts_only_iso_8601_times(loaded: Path, tmp_path: Path, value: str) -> None:
    """Day-first, month-first, slashed or epoch times are refused, never guessed."""
    csv = tmp_path / "dates.csv"
    csv.write_text(
        f'user_id,event_timestamp,orders_7d,spend_7d\n1,2024-05-01,1,1.0\n2,"{value}",1,1.0\n'
    )
    error(
        run("--repo", loaded, "write", "user_stats", csv),
        1,
        "column 'event_timestamp'",
        repr(value),
        "ISO-8601",
        "nothing was written",
    )
    with FeatureStore(loaded) as store:
        assert store.versions() == {"user_stats": 0}


def test_write_csv_iso_forms_parse_like_python(repo: Path, tmp_path: Path) -> None:
    """The vectorised parse agrees with datetime.fromisoformat (naive = UTC) on ISO forms."""
    forms = [
        "2024-05-01",
        "2024-05-01T10:00",
        "2024-05-01 10:00:00",
        "2024-05-01T10:00:00.000001",
        "2024-05-01T10:00:00.5+02:00",
        "2024-05-01T10:00:00Z",
        "2024-05-01T10:00:00-0130",
    ]
    expected: list[datetime] = []
    chunks = [[f, f] for f in forms] + [forms]  # one form per file (vectorised), then mixed
    for chunk in chunks:
        csv = tmp_path / "iso.csv"
        rows = "".join(f"{i},{t},1,1.0\n" for i, t in enumerate(chunk))
        csv.write_text("user_id,event_timestamp,orders_7d,spend_7d\n" + rows)
        ok(run("--repo", repo, "write", "user_stats", csv))
        for text in chunk:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            aware = parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
            expected.append(aware.astimezone(timezone.utc))
    with FeatureStore(repo) as store:
        got = store.read("user_stats").collect()["event_timestamp"].to_list()
    assert sorted(got) == sorted(expected)


@st.composite
def iso_texts(draw: st.DrawFn) -> str:
    """An ISO-8601 text as people write them: µs times, offsets, Z, date-only, T or space."""
    moment = draw(st.datetimes(datetime(1970, 1, 1), datetime(2100, 1, 1)))
    if draw(st.booleans()):
        return moment.date().isoformat()
    sep = draw(st.sampled_from(["T", " "]))
    spec = draw(st.sampled_from(["minutes", "seconds", "microseconds", "auto"]))
    text = moment.isoformat(sep=sep, timespec=spec)
    zone = draw(st.sampled_from(["", "Z", "offset"]))
    if zone == "offset":
        minutes = draw(st.integers(-14 * 60, 14 * 60))
        sign = "-" if minutes < 0 else "+"
        text += f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return text + ("Z" if zone == "Z" else "")


def reference_utc(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    aware = parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return aware.astimezone(timezone.utc)


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(iso_texts(), min_size=1, max_size=6), uniform=st.booleans())
def test_csv_times_parse_like_fromisoformat(texts: list[str], uniform: bool) -> None:
    """The CSV reader (vectorised where it can) agrees with datetime.fromisoformat to the µs."""
    if uniform:
        texts = [texts[0]] * len(texts)  # one form: the vectorised path
    view = FeatureView("v", entities=[Entity("e", join_keys="k")], schema={"x": pl.Int64})
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.csv"
        rows = "".join(f"{i},{t},1\n" for i, t in enumerate(texts))
        path.write_text("k,event_timestamp,x\n" + rows)
        frame = _read_csv(path, view, {})
    got = frame["event_timestamp"]
    if got.dtype.time_zone is None:  # type: ignore[attr-defined]
        got = got.dt.replace_time_zone("UTC")
    assert got.dt.convert_time_zone("UTC").to_list() == [reference_utc(t) for t in texts]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--repo", "s3://bucket/repo", "init"], "init needs a local folder"),
        (["init", "s3://bucket/repo"], "is a URI"),
        (["demo", "az://container/repo"], "is a URI"),
        (["--repo", "gs://bucket/repo", "demo"], "demo needs a local folder"),
        (["--repo", "http://example.com/repo", "ls"], "is a URI"),
        (["ls", "--repo", "ftp://example.com/repo"], "is a URI"),
    ],
)
def test_uris_where_a_local_folder_is_needed_are_refused_and_create_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], says: str
) -> None:
    # --repo takes object-store URIs (tests/test_s3.py); init, demo and other schemes do not.
    monkeypatch.chdir(tmp_path)
    error(run(*args), 2, says)
    assert list(tmp_path.iterdir()) == []


def test_a_file_uri_is_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ok(run("init", f"file://{tmp_path / 'r'}"))
    assert (tmp_path / "r" / "registry.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_uri_in_the_env_var_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    error(run("init", env={"POLARSTORE_REPO": "s3://bucket/repo"}), 2, "needs a local folder")
    assert list(tmp_path.iterdir()) == []


def test_piped_output_is_not_wrapped(tmp_path: Path) -> None:
    """Without a terminal (and no COLUMNS), tables and copy-paste hints stay whole lines."""
    path = tmp_path / ("deep_" * 12) / "repo"
    result = CliRunner(env={"COLUMNS": None}).invoke(cli, ["init", str(path)])
    out = ok(result)
    hint = next(line for line in out.splitlines() if "then: " in line)
    assert hint.endswith(f"apply {path / 'features.py'}"), out
    defs = path / "features.py"
    defs.write_text(
        EXAMPLE_DEFINITIONS.replace("rolling 7-day order activity", "a long description " * 8)
    )
    result = CliRunner(env={"COLUMNS": None}).invoke(cli, ["--repo", str(path), "apply", str(defs)])
    ok(result)
    result = CliRunner(env={"COLUMNS": None}).invoke(cli, ["--repo", str(path), "ls"])
    row = next(line for line in ok(result).splitlines() if "user_stats" in line and "│" in line)
    assert "orders_7d, spend_7d" in row
    assert "you@example.com" in row


ACCOUNTS = """\
from polarstore import Entity, FeatureView
import polars as pl

account = Entity("account", join_keys={KEYS})
balances = FeatureView(
    "balances", entities=[account], schema={"balance": pl.Float64, "branch": pl.String}
)
"""


def accounts_repo(tmp_path: Path, keys: str) -> Path:
    path = tmp_path / "accounts"
    ok(run("init", path))
    (path / "features.py").write_text(ACCOUNTS.replace("{KEYS}", keys))
    ok(run("--repo", path, "apply", path / "features.py"))
    return path


def test_csv_keys_take_the_stored_dtype_and_get_looks_them_up(tmp_path: Path) -> None:
    path = accounts_repo(tmp_path, '"account_code"')
    with FeatureStore(path) as store:  # the first write (from Python) stores String keys
        store.write(
            "balances",
            pl.DataFrame(
                {
                    "account_code": ["A1"],
                    "event_timestamp": [datetime(2024, 1, 1)],
                    "balance": [1.0],
                    "branch": ["x"],
                }
            ),
        )
    csv = tmp_path / "more.csv"
    csv.write_text(
        "account_code,event_timestamp,balance,branch\n0042,2024-01-02,5,007\n42,2024-01-02,6,8\n"
    )
    ok(run("--repo", path, "write", "balances", csv))
    with FeatureStore(path) as store:
        rows = store.read("balances").collect()
    assert rows["account_code"].to_list() == ["A1", "0042", "42"]
    assert rows["branch"].to_list() == ["x", "007", "8"]  # a String feature keeps its digits
    assert rows["balance"].dtype == pl.Float64
    ok(run("--repo", path, "materialize"))
    args = ["--repo", path, "get", "balances:balance", "--now", "2024-01-03", "--json"]
    assert json.loads(ok(run(*args, "--key", "account_code=42"))) == [
        {"account_code": "42", "balance": 6.0}
    ]
    assert json.loads(ok(run(*args, "--key", "account_code=0042"))) == [
        {"account_code": "0042", "balance": 5.0}
    ]


def test_csv_keys_take_the_declared_dtype(tmp_path: Path) -> None:
    # Needs Entity(join_keys={name: dtype}) and FeatureView.key_dtypes from the "types"
    # branch: this test FAILS on the audit-cli branch alone and passes after the merge.
    path = accounts_repo(tmp_path, '{"account_code": pl.String}')
    csv = tmp_path / "first.csv"
    csv.write_text("account_code,event_timestamp,balance,branch\n0042,2024-01-02,5,007\n")
    ok(run("--repo", path, "write", "balances", csv))  # the first write: nothing stored yet
    with FeatureStore(path) as store:
        rows = store.read("balances").collect()
    assert rows["account_code"].to_list() == ["0042"]
    assert rows["branch"].to_list() == ["007"]
    ok(run("--repo", path, "materialize"))
    args = ["--repo", path, "get", "balances:balance", "--now", "2024-01-03", "--json"]
    out = ok(run(*args, "--key", "account_code=0042"))
    assert json.loads(out) == [{"account_code": "0042", "balance": 5.0}]


def test_get_refuses_a_non_integer_value_for_an_integer_key(loaded: Path) -> None:
    ok(run("--repo", loaded, "materialize"))
    args = ["--repo", loaded, "get", "user_stats:*", "--key", "user_id=abc"]
    error(run(*args), 2, "key 'user_id' is an integer key (Int64)", "'abc'")


def test_parse_keys_types_and_compound_keys() -> None:
    assert parse_keys(["user_id=42", "item=ab"]) == [{"user_id": 42, "item": "ab"}]
    assert parse_keys(["id=-3", "id=007", "id=x"]) == [{"id": "-3"}, {"id": "007"}, {"id": "x"}]
    assert parse_keys(["id=-3", "id=+4"]) == [{"id": -3}, {"id": 4}]
    assert parse_keys(['id="12"']) == [{"id": "12"}]


# --- demo -----------------------------------------------------------------------------------


def test_demo_builds_a_repository_and_prints_the_story(tmp_path: Path) -> None:
    path = tmp_path / "demo"
    out = ok(run("demo", path, "--users", "300"))
    for text in ("Point-in-time training set", "Leakage check", "Time travel", "parity"):
        assert text in out
    assert "0 mismatching rows" in out
    assert (path / DEMO_MARKER).is_file()
    listing = ok(run("--repo", path, "ls"))
    assert "churn_model" in listing
    assert "sessions" in listing
    out = ok(run("--repo", path, "get", "churn_model", "--key", "user_id=1", "--now", "2024-07-01"))
    assert "plan" in out


def test_run_demo_returns_the_key_figures(tmp_path: Path) -> None:
    quiet = Console(file=io.StringIO())
    figures = run_demo(tmp_path / "demo", quiet, n_users=400)
    assert figures["spine_rows"] == figures["training_rows"] == 1_000
    assert figures["orders_rows"] > 4_000
    assert figures["corrections_rows"] == figures["orders_rows"] // 50
    assert 0.1 < figures["churn_rate"] < 0.6
    assert 0 < figures["leaky_rows"] <= figures["spine_rows"]
    assert sum(figures["leaky_rows_by_view"].values()) >= figures["leaky_rows"]
    assert figures["plan_differs"] > 0
    assert 0 < figures["backfill_leaky_rows"] <= figures["spine_rows"]
    assert figures["bitemporal_equals_as_of"] is True
    assert figures["versions_before_corrections"] == {"orders": 0, "sessions": 0, "user_profile": 0}
    assert figures["versions_after_corrections"]["orders"] == 1
    assert figures["time_travel_changed_rows"] > 0
    assert figures["saved_dataset_reproduced"] is True
    assert set(figures["materialize"]) == {"orders", "sessions", "user_profile"}
    assert figures["vector_matches_online"] is True
    assert set(figures["online_vector"]) == set(figures["training_columns"][3:])
    assert figures["parity_checked"] == 400
    assert figures["parity_mismatches"] == 0
    assert set(figures["seconds"]) >= {"generate", "training", "materialize", "parity"}
    again = run_demo(tmp_path / "demo", quiet, n_users=400)  # seeded: the same figures
    for key in (
        "orders_rows",
        "leaky_rows",
        "backfill_leaky_rows",
        "time_travel_changed_rows",
        "online_vector",
    ):
        assert again[key] == figures[key]


def test_the_demo_is_public_and_its_steps_can_be_extended(tmp_path: Path) -> None:
    """A later capability adds a step: a function (run, notes) and an entry after the others."""
    from polarstore import demo

    assert [d.name for d in demo.definitions()][-1] == "churn_model"
    assert [s.key for s in demo.STEPS][:3] == ["generate", "apply", "write"]

    def rows_per_view(run: demo.DemoRun, notes: list[object]) -> None:
        run.figures["rows_per_view"] = {v: run.store.read(v).collect().height for v in ("orders",)}
        notes.append("counted")

    buf = io.StringIO()
    steps = (*demo.STEPS, demo.Step("count", "Count the rows", rows_per_view))
    figures = demo.run_demo(tmp_path / "d", Console(file=buf), n_users=50, steps=steps)
    assert (
        figures["rows_per_view"]["orders"] == figures["orders_rows"] + figures["corrections_rows"]
    )
    assert f"{len(steps)}/{len(steps)} Count the rows" in buf.getvalue()
    assert list(figures["seconds"])[-1] == "count"


def test_demo_rebuilds_a_previous_demo_but_refuses_other_folders(tmp_path: Path) -> None:
    path = tmp_path / "demo"
    ok(run("--repo", path, "demo", "--users", "100"))
    (path / "leftover.txt").write_text("from the last run")
    ok(run("demo", path, "--users", "100"))
    assert not (path / "leftover.txt").exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    error(run("demo", precious), 1, "refusing", "not a previous polarstore demo")
    assert (precious / "thesis.tex").read_text() == "years of work"
    (tmp_path / "afile").write_text("x")
    error(run("demo", tmp_path / "afile"), 1, "refusing", "not a folder")
    error(run("demo", path, "--users", "0"), 2, "--users")


def test_demo_ignores_the_env_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("x")
    ok(run("demo", "--users", "50", env={"POLARSTORE_REPO": str(precious)}))
    assert (tmp_path / "demo_repo" / DEMO_MARKER).is_file()
    assert (precious / "keep").exists()


# --- the installed console script -----------------------------------------------------------


def script(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("POLARSTORE_REPO", None)
    return subprocess.run(
        [str(SCRIPT), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_console_script_full_demo_and_lookups(tmp_path: Path) -> None:
    """The real ``polarstore`` script: the full-size demo, then commands on its repository."""
    done = script("demo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "0 mismatching rows" in done.stdout
    assert "20,000 users" in done.stdout
    repo = tmp_path / "demo_repo"
    assert (repo / DEMO_MARKER).is_file()
    done = script(
        "--repo", repo, "get", "churn_model", "--key", "user_id=42", "--json", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["user_id"] == 42
    done = script("--repo", repo, "get", "nope:x", "--key", "user_id=42", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("Error: feature reference 'nope:x'")
    assert len(done.stderr.strip().splitlines()) == 1
    done = script("--repo", repo, "materialize", "--end", "not-a-time", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("Error: Invalid value for --end")
