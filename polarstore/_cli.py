"""The ``polarstore`` command line: a thin click layer over ``FeatureStore`` with rich output.

Every command takes ``--repo PATH`` (default: ``$POLARSTORE_REPO``, else the current folder).
Bad input ends the command with a one-line ``Error: ...`` on stderr and a non-zero exit
code (2 for usage errors, 1 otherwise), never a traceback. What each command promises is in
docs/contract.md#the-command-line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import polars as pl
from click.core import ParameterSource
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from polarstore._aggregations import AggregationView
from polarstore._definitions import Entity, FeatureService, FeatureView
from polarstore._errors import PolarstoreError, ValidationError, did_you_mean
from polarstore._ondemand import OnDemandView
from polarstore._registry import REGISTRY_FILE
from polarstore._storage import REMOTE_SCHEMES, is_remote
from polarstore._store import FeatureStore
from polarstore._stream import sink_dataset, sink_training_set
from polarstore._time import to_utc

__all__ = ["EXAMPLE_DEFINITIONS", "REPO_ENV", "cli", "main", "parse_keys"]

REPO_ENV = "POLARSTORE_REPO"
DEFAULT_DEMO_PATH = "demo_repo"
F = TypeVar("F", bound=Callable[..., Any])
Definition = Entity | FeatureView | FeatureService | OnDemandView | AggregationView

EXAMPLE_DEFINITIONS = '''\
"""Feature definitions of this repository.

Register them (again after every edit; applying is idempotent) from this folder with:

    polarstore apply features.py

(from elsewhere, name the folder: polarstore --repo FOLDER apply FOLDER/features.py).

Every Entity, FeatureView and FeatureService defined at module level is applied. Adding
features to a view later is fine; changing a stored feature's dtype is refused.
"""

from datetime import timedelta

import polars as pl

from polarstore import Entity, FeatureService, FeatureView

# An entity is the thing features describe; join_keys names its key column(s)
# (a list makes a compound key, e.g. ["user_id", "item_id"]). A dict declares the key
# dtypes, e.g. join_keys={"account_code": pl.String} keeps "0042" a string; undeclared,
# the first write decides.
user = Entity("user", join_keys="user_id", description="a shopper")

# A feature view is one Delta table: the join keys, an event-time column and typed
# features. Load rows from parquet or CSV with:
#     polarstore write user_stats rows.csv
# where rows.csv has the columns user_id, event_timestamp, orders_7d, spend_7d.
user_stats = FeatureView(
    "user_stats",
    entities=[user],
    schema={"orders_7d": pl.Int64, "spend_7d": pl.Float64},
    timestamp_field="event_timestamp",  # when the values were observed
    ttl=timedelta(days=7),  # values older than this read as null (None: never stale)
    description="rolling 7-day order activity",
    owner="you@example.com",
    tags={"team": "growth"},
)

# A feature service names the features one model uses, so training
# (get_historical_features) and serving (polarstore get churn_model --key user_id=42)
# ask for exactly the same ones.
churn_model = FeatureService("churn_model", features=["user_stats:*"])
'''


# --- errors: one line on stderr, never a traceback ----------------------------------------


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"Error: {_one_line(message)}", err=True)
    sys.exit(code)


def _warning_line(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    click.echo(f"Warning: {_one_line(str(message))}", err=True)


class _Group(click.Group):
    """A group whose errors are one line on stderr: usage errors, library errors, OS errors."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            with warnings.catch_warnings():  # e.g. nanoseconds truncated: one line, no source
                warnings.showwarning = _warning_line
                result = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:
                click.echo(e.ctx.get_help())  # bare `polarstore`: the help, not an error
                sys.exit(0)
            where = e.ctx.command_path if e.ctx is not None else "polarstore"
            _fail(f"{e.format_message()} (see '{where} --help')", e.exit_code)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except click.Abort:
            _fail("aborted.", 1)
        except PolarstoreError as e:
            _fail(str(e), 1)
        except OSError as e:
            _fail(str(e), 1)
        sys.exit(result if isinstance(result, int) else 0)


# --- shared helpers ---------------------------------------------------------------------


_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")


class _Folder(click.Path):
    """A local folder; a URI (``s3://b/r``) is refused before ``Path`` folds it into ``s3:/b/r``.

    With ``remote``, an object-store URI is taken as it is (a str), for ``--repo``.
    """

    def __init__(self, *, file_okay: bool = False, remote: bool = False) -> None:
        super().__init__(file_okay=file_okay, path_type=Path)
        self.remote = remote

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.startswith("file://"):
            value = value.removeprefix("file://")  # a local folder, as FeatureStore reads it
        if self.remote and isinstance(value, str) and value.split("://")[0] in REMOTE_SCHEMES:
            return value
        if isinstance(value, str) and _URI.match(value):
            kinds = ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
            where = f"local folders or (with --repo) {kinds} URIs" if self.remote else "a folder"
            self.fail(
                f"{value!r} is a URI; this takes {where}. Pass a folder path"
                + ("." if self.remote else " (an object-store repository: --repo s3://...)."),
                param,
                ctx,
            )
        return super().convert(value, param, ctx)


def _repo_option(func: F) -> F:
    return click.option(
        "--repo",
        type=_Folder(remote=True),
        default=None,
        help=f"The repository folder (default: ${REPO_ENV}, else the current folder).",
    )(func)


def _repo_path(repo: Path | str | None) -> Path | str:
    """The repository: the command's ``--repo``, else the group's (or the env var), else .

    An object-store URI stays a str.
    """
    if repo is not None:
        return repo
    group_repo = click.get_current_context().find_root().params.get("repo")
    if isinstance(group_repo, str) and is_remote(group_repo):
        return group_repo
    return Path(group_repo) if group_repo else Path()


def _local_repo(repo: Path | str | None, command: str) -> Path:
    path = _repo_path(repo)
    if isinstance(path, str):
        msg = (
            f"{command} needs a local folder, not {path!r}. For an object-store repository, "
            f"run 'polarstore --repo {path} apply features.py' (the first apply creates it)."
        )
        raise click.UsageError(msg)
    return path


def _open(repo: Path | str | None, *, must_exist: bool = True) -> FeatureStore:
    path = _repo_path(repo)
    if isinstance(path, str):  # storage options from AWS_* (GOOGLE_*, AZURE_*)
        store = FeatureStore(path)
        if must_exist and store._registry.location.get(REGISTRY_FILE) is None:  # type: ignore[union-attr]
            msg = (
                f"{path!r} is not a polarstore repository (it has no {REGISTRY_FILE}). "
                f"Run 'polarstore --repo {path} apply FILE' first, or check the URI."
            )
            raise click.ClickException(msg)
        return store
    if must_exist and not (path / REGISTRY_FILE).is_file():
        msg = (
            f"{str(path)!r} is not a polarstore repository (it has no {REGISTRY_FILE}). "
            f"Run 'polarstore init {path}' first, or pass --repo / set ${REPO_ENV}."
        )
        raise click.ClickException(msg)
    return FeatureStore(path)


# Piped or captured output is never wrapped: a table row or a copy-paste hint stays one line.
_UNWRAPPED = 10_000


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=_UNWRAPPED, soft_wrap=True)
    return console


def _cell(value: Any) -> Text:
    """A table cell showing ``value`` literally (never as rich markup)."""
    if value is None:
        return Text("∅", style="dim")
    if isinstance(value, datetime):
        # Whole seconds stay short; otherwise every microsecond is shown (never rounded away).
        text = value.isoformat(sep=" ", timespec="microseconds" if value.microsecond else "seconds")
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    elif isinstance(value, dict):
        text = ", ".join(f"{k}={v}" for k, v in value.items())
    else:
        text = str(value)
    return Text(text)


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", header_style="bold")
    for name in columns:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    return table


def _frame_table(title: str, frame: pl.DataFrame) -> Table:
    return _table(title, frame.columns, list(frame.iter_rows()))


def _utc(text: str) -> datetime:
    """An ISO-8601 text (a trailing ``Z`` allowed; naive means UTC) as a UTC datetime.

    Raises ``ValidationError`` for a text that is not ISO 8601 or a time that leaves the
    years 1 to 9999 once converted to UTC.
    """
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    return to_utc(text)


def _is_iso(text: str) -> bool:
    try:
        datetime.fromisoformat(text.strip().removesuffix("Z").removesuffix("z"))
    except ValueError:
        return False
    return True


def _parse_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        return _utc(value)
    except ValidationError as e:
        msg = str(e)
        if not _is_iso(value):
            msg = (
                f"{value!r} is not a date or time; use ISO 8601, e.g. 2024-05-01 or "
                "2024-05-01T12:00:00Z (naive times are UTC)."
            )
        raise click.BadParameter(msg, param_hint=option) from None


_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)\Z", re.DOTALL)
_INT = re.compile(r"[+-]?(0|[1-9][0-9]*)\Z")


def _unquote(text: str) -> tuple[str, bool]:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1], True
    return text, False


def _key_column(name: str, texts: list[str], dtype: pl.DataType | None) -> list[int | str]:
    """The values of key ``name`` in its declared or stored dtype (a guess when unknown)."""
    values = [_unquote(t) for t in texts]
    if dtype == pl.String:
        return [v for v, _ in values]  # "0042" stays "0042", 42 is the string "42"
    if dtype is not None and dtype.is_integer():
        bad = [v for v, _ in values if not re.fullmatch(r"[+-]?[0-9]+", v)]
        if bad:
            msg = f"key {name!r} is an integer key ({dtype}), got {bad[0]!r}."
            raise click.BadParameter(msg, param_hint="--key")
        return [int(v) for v, _ in values]
    if any(quoted or not _INT.match(v) for v, quoted in values):
        return [v for v, _ in values]  # one string among them: all strings
    return [int(v) for v, _ in values]


def parse_keys(
    pairs: Sequence[str], dtypes: dict[str, pl.DataType] | None = None
) -> list[dict[str, Any]]:
    """Turn ``--key NAME=VALUE`` options into entity rows.

    Repeating a name gives several entities; different names form one compound key. A key
    whose dtype is known (``dtypes``: declared or stored) gets values of that dtype; otherwise
    values that look like integers become ints (quote them to keep a string).

    Examples
    --------
    >>> parse_keys(["user_id=42"])
    [{'user_id': 42}]
    >>> parse_keys(["user_id=1", "user_id=2"])
    [{'user_id': 1}, {'user_id': 2}]
    >>> parse_keys(["user_id=7", "item_id='0012'"])
    [{'user_id': 7, 'item_id': '0012'}]
    >>> import polars as pl
    >>> parse_keys(["account_code=0042", "account_code=42"], {"account_code": pl.String()})
    [{'account_code': '0042'}, {'account_code': '42'}]
    """
    texts: dict[str, list[str]] = {}
    for pair in pairs:
        match = _KEY.match(pair.strip())
        if not match or not match.group(2):
            msg = f"{pair!r} is not NAME=VALUE, e.g. --key user_id=42."
            raise click.BadParameter(msg, param_hint="--key")
        name, raw = match.groups()
        texts.setdefault(name, []).append(raw)
    counts = {name: len(values) for name, values in texts.items()}
    if len(set(counts.values())) > 1:
        msg = f"every key name needs the same number of values, got {counts}."
        raise click.BadParameter(msg, param_hint="--key")
    columns = {n: _key_column(n, v, (dtypes or {}).get(n)) for n, v in texts.items()}
    height = next(iter(counts.values()), 0)
    return [{name: values[i] for name, values in columns.items()} for i in range(height)]


def _key_dtypes(store: FeatureStore, views: Sequence[FeatureView]) -> dict[str, pl.DataType]:
    """Each join key's dtype: declared on the entity, else the stored table's, else absent."""
    versions = store.versions()
    dtypes: dict[str, pl.DataType] = {}
    for view in views:
        # Declared key dtypes win: the first CSV must not decide them.
        known: dict[str, pl.DataType] = dict(view.key_dtypes)
        undeclared = [k for k in view.join_keys if k not in known and k not in dtypes]
        if undeclared and versions.get(view.name, -1) >= 0:
            stored = store.read(view.name).collect_schema()
            known.update({k: stored[k] for k in undeclared if k in stored})
        for key, dtype in known.items():
            dtypes.setdefault(key, dtype)
    return dtypes


def _views_of(store: FeatureStore, features: Sequence[str]) -> list[FeatureView]:
    """The views a ``get`` reads; a bare name must be a feature service."""
    refs: list[Any] = list(features)
    views = {v.name: v for v in store.list_feature_views()}
    if len(features) == 1 and ":" not in features[0]:
        name = features[0]
        if name in views and name not in {s.name for s in store.list_feature_services()}:
            msg = (
                f"{name!r} is a feature view, not a feature service: ask for {name + ':*'!r} "
                f"(all its features) or {name + ':FEATURE'!r}."
            )
            raise ValidationError(msg)
        refs = list(store.get_feature_service(name).features)  # NotFoundError with a hint
    names = {r.split(":", 1)[0] if isinstance(r, str) else r.name for r in refs}
    for odv in store.list_on_demand_views():  # their inputs' views hold the keys
        if odv.name in names and not odv.broken:
            names.update(ref.split(":", 1)[0] for ref in odv.references)
    return [views[n] for n in sorted(names) if n in views]


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _ttl(value: timedelta | None) -> str:
    if value is None:
        return "∞"
    if value % timedelta(days=1) == timedelta(0):
        return f"{value.days}d"
    return str(value)


# --- the commands -------------------------------------------------------------------------


@click.group(
    name="polarstore",
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--repo",
    type=_Folder(remote=True),
    envvar=REPO_ENV,
    default=None,
    help=f"The repository folder (default: ${REPO_ENV}, else the current folder).",
)
@click.version_option(package_name="polarstore", prog_name="polarstore")
def cli(repo: str | None) -> None:
    """polarstore: a serverless, time-travel feature store on Polars, Delta Lake and LMDB.

    \b
    Quick start:
      polarstore demo                       # the whole story on synthetic data
      polarstore init my_repo               # a repository with an example features.py
      polarstore --repo my_repo apply my_repo/features.py
      polarstore --repo my_repo write user_stats rows.csv
      polarstore --repo my_repo materialize
      polarstore --repo my_repo get user_stats:spend_7d --key user_id=42
    """


@cli.command(short_help="Create a repository with an example features.py.")
@click.argument("path", required=False, type=_Folder())
@_repo_option
def init(path: Path | None, repo: Path | None) -> None:
    """Create a repository with a commented example definitions file, features.py.

    PATH defaults to --repo (or the current folder). An existing features.py is kept.

    \b
    Example:
      polarstore init my_repo
      polarstore --repo my_repo apply my_repo/features.py
    """
    target = path if path is not None else _local_repo(repo, "init")
    existed = (target / REGISTRY_FILE).is_file()
    store = FeatureStore(target)
    if not existed:
        store.apply([])  # writes an empty registry.json
    console = _console()
    defs = target / "features.py"
    if defs.exists():
        console.print(Text(f"kept the existing {defs}"))
    else:
        # Written verbatim: the file never contains the path, so no folder name can become code.
        defs.write_text(EXAMPLE_DEFINITIONS, encoding="utf-8")
    state = "already a repository" if existed else "initialised a repository"
    console.print(Text(f"{state} at {store.path}", style="green"))
    repo_arg, defs_arg = shlex.quote(str(target)), shlex.quote(str(defs))
    console.print(Text(f"next: edit {defs}, then: polarstore --repo {repo_arg} apply {defs_arg}"))


def _load_definitions(path: Path) -> list[Definition]:
    """Import a definitions file and return its module-level definitions, in order."""
    name = f"_polarstore_definitions_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        msg = f"cannot import {str(path)!r}: not a Python file."
        raise click.ClickException(msg)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    loaded = set(sys.modules)
    sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # any error in user code: report it in one line
        detail = f"{type(e).__name__}: {e}"
        msg = f"cannot import the definitions file {str(path)!r}: {detail}"
        raise click.ClickException(msg) from e
    finally:
        # Forget the file and its sibling modules, so a later apply sees their edits.
        for added in set(sys.modules) - loaded:
            origin = getattr(sys.modules[added], "__file__", None) or ""
            if added == name or origin.startswith(folder + os.sep):
                del sys.modules[added]
        if folder in sys.path:
            sys.path.remove(folder)
    found: dict[int, Definition] = {}
    for value in vars(module).values():
        if isinstance(value, (Entity, FeatureView, FeatureService, OnDemandView, AggregationView)):
            found.setdefault(id(value), value)
    if not found:
        msg = (
            f"the definitions file {str(path)!r} defines no Entity, FeatureView, "
            "AggregationView, OnDemandView or FeatureService at module level."
        )
        raise click.ClickException(msg)
    rank = {Entity: 0, FeatureView: 1, AggregationView: 2, OnDemandView: 3, FeatureService: 4}
    return sorted(found.values(), key=lambda d: rank[type(d)])


def _registered(store: FeatureStore) -> dict[tuple[str, str], Definition]:
    items: list[Definition] = [
        *store.list_entities(),
        *store.list_feature_views(),
        *store.list_feature_services(),
        *store.list_on_demand_views(),
        *store.list_aggregation_views(),
    ]
    return {(type(d).__name__, d.name): d for d in items}


@cli.command(short_help="Register the definitions of a Python file.")
@click.argument("defs", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_repo_option
def apply(defs: Path, repo: Path | None) -> None:
    """Register every Entity, view and FeatureService defined in DEFS (a .py file).

    The file is imported; its module-level definitions are applied in one go. Applying
    the same definitions again changes nothing.

    \b
    Example:
      polarstore --repo my_repo apply my_repo/features.py
    """
    definitions = _load_definitions(defs)
    store = _open(repo, must_exist=False)
    before = _registered(store)
    store.apply(definitions)
    after = _registered(store)
    rows = []
    for item in definitions:
        key = (type(item).__name__, item.name)
        status = "created" if key not in before else "unchanged"
        if key in before and before[key] != after.get(key):
            status = "updated"
        rows.append((key[0], item.name, status))
    console = _console()
    console.print(
        _table(f"applied {len(definitions)} definitions", ["kind", "name", "status"], rows)
    )


@cli.command(name="ls", short_help="List entities, feature views and services.")
@_repo_option
def ls_(repo: Path | None) -> None:
    """List the entities, feature views and feature services of the repository.

    \b
    Example:
      polarstore --repo my_repo ls
    """
    store = _open(repo)
    console = _console()
    entities = store.list_entities()
    views = store.list_feature_views()
    services = store.list_feature_services()
    if not (entities or views or services):
        console.print(f"the repository at {store.path} has no definitions yet.")
        console.print("add them to a file such as features.py and run: polarstore apply FILE")
        return
    console.print(
        _table(
            "Entities",
            ["name", "join keys", "description"],
            [(e.name, list(e.join_keys), e.description) for e in entities],
        )
    )
    versions = store.versions()
    fresh = {v.name: _freshness(store, v.name) for v in views}
    console.print(
        _table(
            "Feature views",
            [*_VIEW_COLUMNS, "latest event", "lag", "materialized"],
            [
                (
                    v.name,
                    [e.name for e in v.entities],  # type: ignore[union-attr]
                    list(v.feature_names),
                    _ttl(v.ttl),
                    "yes" if v.online else "no",
                    versions.get(v.name, -1) if versions.get(v.name, -1) >= 0 else "no data",
                    v.owner,
                    *fresh[v.name],
                )
                for v in views
            ],
        )
    )
    console.print(
        _table(
            "Feature services",
            ["name", "features", "owner", "description"],
            [(s.name, list(s.features), s.owner, s.description) for s in services],
        )
    )
    derived = store.list_on_demand_views()
    if derived:
        console.print(
            _table(
                "On-demand views",
                ["name", "features", "request columns", "owner"],
                [(d.name, list(d.schema), list(d.request_schema or {}), d.owner) for d in derived],
            )
        )
    windows = store.list_aggregation_views()
    if windows:
        console.print(
            _table(
                "Aggregation views",
                ["name", "source", "aggregates", "online", "owner"],
                [
                    (
                        w.name,
                        w.source_name,
                        list(w.feature_names),
                        "yes" if w.online else "no",
                        w.owner,
                    )
                    for w in windows
                ],
            )
        )


@cli.command(short_help="Show a feature view's schema and state.")
@click.argument("view")
@_repo_option
def describe(view: str, repo: Path | None) -> None:
    """Show a feature view: schema, rows, versions, latest event time, online state.

    \b
    Example:
      polarstore --repo my_repo describe user_stats
    """
    store = _open(repo)
    info = store.describe(view)
    schema = info.pop("schema")
    if info.get("kind") == "on_demand":
        _describe_on_demand(view, info, schema)
        return
    if info.get("kind") == "aggregation":
        _describe_aggregation(view, info, schema)
        return
    info["ttl"] = _ttl(info["ttl"])
    console = _console()
    console.print(_table(f"Feature view {view}", ["property", "value"], list(info.items())))
    console.print(_table("Schema", ["feature", "dtype"], [(n, str(t)) for n, t in schema.items()]))


@cli.command(short_help="Show the table versions of a feature view.")
@click.argument("view")
@_repo_option
def history(view: str, repo: Path | None) -> None:
    """Show one row per table version of VIEW: version, commit time, operation, rows added.

    \b
    Example:
      polarstore --repo my_repo history user_stats
    """
    store = _open(repo)
    frame = store.history(view)
    console = _console()
    if frame.is_empty():
        console.print(f"view {view!r} has no data yet.")
        return
    console.print(_frame_table(f"History of {view}", frame))


_READERS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
# Extended ISO 8601, the only text the fast (vectorised) parse may see: Polars' own format
# inference would also read 02/04/2024 as a date, day or month first by guess.
_ISO_DATE = r"^\d{4}-\d{2}-\d{2}$"
_ISO_TIME = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?([Zz]|[+-]\d{2}:?\d{2})?$"


def _read_file(path: Path, view: FeatureView, key_dtypes: dict[str, pl.DataType]) -> pl.DataFrame:
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        msg = f"cannot read {str(path)!r}: use a .parquet or .csv file."
        raise click.ClickException(msg)
    try:
        if kind == "parquet":
            frame = pl.read_parquet(path)
            _check_columns(path, view, frame.columns)
            return frame
        return _read_csv(path, view, key_dtypes)
    except pl.exceptions.PolarsError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = f"cannot read {str(path)!r} as {kind.upper()}: {first}"
        raise click.ClickException(msg) from e


def _check_columns(path: Path, view: FeatureView, columns: Sequence[str]) -> None:
    """Name the unknown and the missing columns together, with a hint for a wrong delimiter."""
    created = [view.created_timestamp_field] if view.created_timestamp_field else []
    expected = [*view.join_keys, view.timestamp_field, *created, *view.feature_names]
    unknown = [c for c in columns if c not in expected]
    missing = [c for c in expected if c not in columns]
    if not (unknown or missing):
        return
    problems = []
    if unknown:
        hints = "".join(did_you_mean(c, expected) for c in unknown[:3])
        problems.append(f"unknown column(s) {unknown}.{hints}")
    if missing:
        problems.append(f"missing column(s) {missing}.")
    delimiter = next((d for d in (";", "\t", "|") if any(d in c for c in columns)), None)
    hint = ""
    if delimiter is not None and len(columns) < len(expected):
        hint = (
            f" The header holds {delimiter!r}: the file looks {delimiter!r}-separated, and "
            "polarstore reads comma-separated CSV; convert it (or write it as parquet)."
        )
    msg = (
        f"{str(path)!r} does not match view {view.name!r}: {' '.join(problems)} Expected the "
        f"columns {expected}; nothing was written.{hint}"
    )
    raise click.ClickException(msg)


def _read_csv(path: Path, view: FeatureView, key_dtypes: dict[str, pl.DataType]) -> pl.DataFrame:
    """A CSV read in the view's dtypes, its time columns parsed from ISO 8601 only.

    Keys take ``key_dtypes`` (declared, else stored; inferred when absent), features the
    schema's dtypes; timestamp and date/time feature columns are read as text and parsed here,
    never by Polars' format guessing.
    """
    header = pl.read_csv(path, n_rows=0).columns
    _check_columns(path, view, header)
    temporal = [view.timestamp_field]
    if view.created_timestamp_field:
        temporal.append(view.created_timestamp_field)
    overrides: dict[str, pl.DataType] = {}
    for name, dtype in view.schema.items():
        if isinstance(dtype, (pl.Datetime, pl.Date)):
            temporal.append(name)
        elif not isinstance(dtype, (pl.List, pl.Binary)):
            overrides[name] = dtype
    overrides.update(key_dtypes)
    overrides.update({name: pl.String() for name in temporal})  # parsed below, never guessed
    frame = pl.read_csv(path, schema_overrides={k: v for k, v in overrides.items() if k in header})
    for name in temporal:
        if name in frame.columns:
            want_date = view.schema.get(name) == pl.Date
            frame = frame.with_columns(_parse_column(frame[name], path, want_date=want_date))
    return frame


def _parse_column(column: pl.Series, path: Path, *, want_date: bool) -> pl.Series:
    iso = column.str.contains(_ISO_DATE if want_date else _ISO_TIME)
    if iso.all(ignore_nulls=True):
        try:
            if want_date:
                return column.str.to_date("%Y-%m-%d", strict=True)
            return column.str.to_datetime(time_unit="us", strict=True)
        except pl.exceptions.PolarsError:
            pass  # mixed ISO forms (offsets, date-only): value by value below
    values: list[Any] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for text in column:
            values.append(_parse_value(text, column.name, path, want_date=want_date))
    if caught:  # one warning per column, not one per value
        msg = f"{str(path)!r}: column {column.name!r}: {len(caught)} value(s): {caught[0].message}"
        warnings.warn(msg, caught[0].category, stacklevel=2)
    dtype = pl.Date() if want_date else pl.Datetime("us", "UTC")
    return pl.Series(column.name, values, dtype=dtype)


def _parse_value(text: str | None, name: str, path: Path, *, want_date: bool) -> Any:
    try:
        parsed = None if text is None else _utc(text)
    except ValidationError:
        msg = (
            f"{str(path)!r}: column {name!r} has {text!r}, which is not an ISO-8601 date or "
            "time (e.g. 2024-05-01T12:00:00Z; day-first and month-first dates are ambiguous); "
            "nothing was written."
        )
        raise click.ClickException(msg) from None
    return parsed.date() if parsed is not None and want_date else parsed


@cli.command(short_help="Append a parquet or CSV file to a view.")
@click.argument("view")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_repo_option
def write(view: str, file: Path, repo: Path | None) -> None:
    """Append the rows of FILE (.parquet or .csv) to VIEW as one new table version.

    The file holds the join keys, the timestamp column(s) and every declared feature. CSV
    columns are read in the view's dtypes (keys: declared, else as already stored);
    timestamps must be ISO 8601 (naive times are UTC), anything else is refused.

    \b
    Example:
      polarstore --repo my_repo write user_stats rows.csv
    """
    store = _open(repo)
    definition = store.get_feature_view(view)
    frame = _read_file(file, definition, _key_dtypes(store, [definition]))
    version = store.write(view, frame)
    _console().print(
        Text(f"wrote {frame.height:,} rows to {view}: version {version}", style="green")
    )


@cli.command(short_help="Sync online views into the online store.")
@click.argument("views", nargs=-1)
@click.option("--end", default=None, help="Sync only rows with event time at or before this.")
@_repo_option
def materialize(views: tuple[str, ...], end: str | None, repo: Path | None) -> None:
    """Sync the latest values of online views (default: all) into the online store.

    Incremental: only rows committed since the last sync are read. Rows after --end are
    not lost; a later materialize syncs them.

    \b
    Examples:
      polarstore --repo my_repo materialize
      polarstore --repo my_repo materialize user_stats --end 2024-05-01T00:00:00Z
    """
    until = _parse_time(end, "--end")
    store = _open(repo)
    names = list(views) or [v.name for v in store.list_feature_views() if v.online]
    for name in names:
        store.get_feature_view(name)  # unknown names fail before anything is synced
    console = _console()
    if not names:
        console.print("there are no online feature views to materialize.")
        return
    summary: dict[str, dict[str, Any]] = {}
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("materialize", total=len(names))
        for name in names:
            progress.update(task, description=f"materialize {name}")
            summary.update(store.materialize([name], end=until, progress=False))
            progress.advance(task)
    columns: list[str] = []
    for info in summary.values():
        columns.extend(k for k in info if k not in columns)
    rows = [(name, *(info.get(c) for c in columns)) for name, info in summary.items()]
    console.print(_table("Materialized", ["view", *columns], rows))


@cli.command(short_help="Look up feature values online.")
@click.argument("features", nargs=-1, required=True)
@click.option(
    "--key",
    "keys",
    multiple=True,
    required=True,
    help="A join key value, NAME=VALUE; repeat a name for several entities.",
)
@click.option(
    "--request",
    "requests",
    multiple=True,
    help="A request column of on-demand features, NAME=VALUE (every entity, or one per entity).",
)
@click.option("--now", default=None, help="Look up as of this time (default: now); for TTLs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of rows.")
@click.option("--full-names", is_flag=True, help="Name outputs view__feature.")
@_repo_option
def get(
    features: tuple[str, ...],
    keys: tuple[str, ...],
    requests: tuple[str, ...],
    now: str | None,
    as_json: bool,
    full_names: bool,
    repo: Path | None,
) -> None:
    """Look up the latest feature values of entities in the online store.

    FEATURES are view:feature references, view:* for all features of a view, or the name
    of a feature service. Key values take the key's declared (or stored) dtype, so
    account_code=0042 looks up the string "0042" when the key is a String; a key of
    unknown dtype is an integer when it looks like one (quote it to keep a string).

    \b
    Examples:
      polarstore --repo my_repo get user_stats:spend_7d --key user_id=42
      polarstore --repo my_repo get churn_model --key user_id=1 --key user_id=2 --json
      polarstore --repo my_repo get txn:amount_vs_spend --key user_id=42 --request amount=12.5
    """
    parse_keys(keys)  # malformed keys are usage errors, reported before opening anything
    moment = _parse_time(now, "--now")
    store = _open(repo)
    rows = parse_keys(keys, _key_dtypes(store, _views_of(store, features)))
    if requests:
        rows = _with_requests(store, rows, requests)
    requested: str | list[str] = features[0] if len(features) == 1 else list(features)
    frame = store.get_online_features(rows, requested, full_feature_names=full_names, now=moment)
    if as_json:
        click.echo(json.dumps(frame.to_dicts(), default=_json_default, indent=2))
        return
    console = _console()
    key_names = [k for k in rows[0] if k in frame.columns]
    if frame.height <= 4:  # one column per entity reads best
        labels = [", ".join(f"{k}={r[k]}" for k in key_names) for r in rows]
        values = [frame[c].to_list() for c in frame.columns if c not in key_names]
        names = [c for c in frame.columns if c not in key_names]
        console.print(
            _table(
                "Online features",
                ["feature", *labels],
                [(n, *v) for n, v in zip(names, values, strict=True)],
            )
        )
    else:
        console.print(_frame_table("Online features", frame))


@cli.command(short_help="Build a demo repository: a churn story.")
@click.argument("path", required=False, type=_Folder(file_okay=True))
@click.option("--users", default=20_000, show_default=True, help="How many users to simulate.")
@_repo_option
def demo(path: Path | None, users: int, repo: Path | None) -> None:
    """Build a demo repository and walk through a churn model's feature story.

    PATH (or --repo given on the command line) defaults to ./demo_repo. The folder must be
    new, empty, or a previous demo, which is wiped and rebuilt; anything else is refused.

    \b
    Example:
      polarstore demo
      polarstore --repo demo_repo ls
    """
    from polarstore.demo import run_demo

    target = path or (None if repo is None else _local_repo(repo, "demo"))
    if target is None:
        root = click.get_current_context().find_root()
        if root.get_parameter_source("repo") == ParameterSource.COMMANDLINE:
            target = _local_repo(root.params["repo"], "demo")
    if users < 1:
        raise click.BadParameter(f"must be at least 1, got {users}.", param_hint="--users")
    run_demo(target or Path(DEFAULT_DEMO_PATH), _console(), n_users=users)


@cli.command(name="train-set", short_help="Stream a point-in-time training set to Parquet.")
@click.argument("features", nargs=-1)
@click.option(
    "--spine",
    "spine_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A Parquet or CSV file of join keys and timestamps (one training row each).",
)
@click.option("--dataset", default=None, help="Rebuild this saved dataset instead.")
@click.option("--output", "-o", required=True, help="The Parquet file to write (or s3://...).")
@click.option("--timestamp-field", default="event_timestamp", show_default=True)
@click.option("--as-of", default=None, help="Time travel: every view as it was at this time.")
@click.option("--bitemporal", is_flag=True, help="Only rows known at each spine time.")
@click.option("--full-names", is_flag=True, help="Name outputs view__feature.")
@_repo_option
def train_set(
    features: tuple[str, ...],
    spine_file: Path | None,
    dataset: str | None,
    output: str,
    timestamp_field: str,
    as_of: str | None,
    bitemporal: bool,
    full_names: bool,
    repo: Path | None,
) -> None:
    """Write the point-in-time join of a spine and FEATURES straight to a Parquet file.

    The join runs in time slices of the spine, each reading only the view rows of its own
    window, and streams into the file: the views may be larger than memory. FEATURES are
    view:feature references, view:* or a feature service. With --dataset NAME, the saved
    dataset is rebuilt exactly instead (its spine, features and pinned versions; no FEATURES
    or --spine).

    \b
    Examples:
      polarstore --repo my_repo train-set churn_model --spine labels.parquet -o train.parquet
      polarstore --repo s3://bucket/repo train-set --dataset train_v1 -o train_v1.parquet
    """
    if (dataset is None) == (spine_file is None) or (dataset is not None and features):
        msg = "give either --spine FILE and FEATURES, or --dataset NAME (alone)."
        raise click.UsageError(msg)
    if dataset is None and not features:
        raise click.UsageError("name the FEATURES to join (view:feature, view:* or a service).")
    moment = _parse_time(as_of, "--as-of")
    store = _open(repo)
    started = time.perf_counter()
    if dataset is not None:
        where = sink_dataset(store, dataset, output)
    else:
        assert spine_file is not None
        requested: str | list[str] = features[0] if len(features) == 1 else list(features)
        key_dtypes = _key_dtypes(store, _views_of(store, features))
        spine = _read_spine(spine_file, timestamp_field, key_dtypes)
        where = sink_training_set(
            store,
            spine,
            requested,
            output,
            timestamp_field=timestamp_field,
            full_feature_names=full_names,
            as_of=moment,
            bitemporal=bitemporal,
            what="train-set",
        )
    seconds = time.perf_counter() - started
    count = None if is_remote(where) else pl.scan_parquet(where).select(pl.len()).collect().item()
    rows = "" if count is None else f"{count:,} rows "
    _console().print(Text(f"wrote {rows}to {where} in {seconds:.2f} s", style="green"))


def _read_spine(path: Path, timestamp_field: str, keys: dict[str, pl.DataType]) -> pl.DataFrame:
    """A spine file: Parquet as it is; CSV with keys as their dtypes and ISO-8601 times."""
    try:
        if path.suffix.lower() != ".csv":
            return pl.read_parquet(path)
        text_keys = {k: pl.String() for k, t in keys.items() if t == pl.String}
        frame = pl.read_csv(path, schema_overrides=text_keys, infer_schema_length=10_000)
    except (pl.exceptions.PolarsError, OSError) as e:
        msg = f"{str(path)!r} cannot be read as a Parquet or CSV spine: {_one_line(str(e))}"
        raise click.ClickException(msg) from e
    if timestamp_field in frame.columns and frame[timestamp_field].dtype == pl.String:
        parsed = _parse_column(frame[timestamp_field], path, want_date=False)
        frame = frame.with_columns(parsed)
    return frame


def main(argv: Sequence[str] | None = None) -> None:
    """The ``polarstore`` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="polarstore")


_VIEW_COLUMNS = ("name", "entities", "features", "ttl", "online", "version", "owner")


def _freshness(store: FeatureStore, view: str) -> tuple[Any, Any, Any]:
    """Latest event time, its lag behind now, and what is materialized (version at time)."""
    info = store.describe(view)
    lag = info["freshness_lag"]
    lag = None if lag is None else timedelta(seconds=round(lag.total_seconds()))
    version, at = info["materialized_version"], info["materialized_at"]
    synced = "no" if version is None else f"v{version} at {_cell(at).plain}"
    return info["latest_event_time"], lag, synced


def _version_or_moment(text: str, option: str) -> int | datetime:
    if _INT.match(text.strip()):
        return int(text)
    moment = _parse_time(text, option)
    assert moment is not None
    return moment


def _side(text: str, option: str) -> Any:
    """A drift side: a version, a moment, or an event-time range START..END."""
    if ".." in text:
        start, _, end = text.partition("..")
        return (_parse_time(start, option), _parse_time(end, option))
    return _version_or_moment(text, option)


def _quality_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """Lists of {value, count} as ``value=count`` text, for a table cell."""
    if "top_values" in frame.columns:
        frame = frame.with_columns(
            pl.col("top_values").list.eval(
                pl.concat_str(
                    pl.element().struct.field("value"),
                    pl.lit("="),
                    pl.element().struct.field("count").cast(pl.String),
                )
            )
        )
    return frame


@cli.command(short_help="Show per-feature statistics of a view.")
@click.argument("view")
@click.option("--as-of", "as_of", default=None, help="A table version or an ISO 8601 moment.")
@_repo_option
def stats(view: str, as_of: str | None, repo: Path | None) -> None:
    """Show count, nulls, mean, std, quantiles, distinct values and top values per feature.

    \b
    Example:
      polarstore --repo my_repo stats user_stats
      polarstore --repo my_repo stats user_stats --as-of 3
    """
    store = _open(repo)
    pin = None if as_of is None else _version_or_moment(as_of, "--as-of")
    frame = _quality_frame(store.statistics(view, as_of=pin))
    title = f"Statistics of {view}" + ("" if as_of is None else f" as of {as_of}")
    _console().print(_frame_table(title, frame))


@cli.command(short_help="Compare a view's distributions between two states.")
@click.argument("view")
@click.option(
    "--reference",
    required=True,
    help="A table version, an ISO 8601 moment, or an event-time range START..END.",
)
@click.option("--current", default=None, help="As --reference; default: the current table.")
@_repo_option
def drift(view: str, reference: str, current: str | None, repo: Path | None) -> None:
    """Show PSI, KS / chi-square and a drifted flag per feature (docs/contract.md).

    \b
    Example:
      polarstore --repo my_repo drift user_stats --reference 0
      polarstore drift user_stats --reference 2024-01-01..2024-02-01 --current 5
    """
    store = _open(repo)
    ref = _side(reference, "--reference")
    cur = None if current is None else _side(current, "--current")
    frame = store.drift(view, reference=ref, current=cur)
    _console().print(_frame_table(f"Drift of {view}", frame))


if __name__ == "__main__":  # pragma: no cover
    main()


def _describe_on_demand(name: str, info: dict[str, Any], schema: dict[str, Any]) -> None:
    console = _console()
    expressions = info.pop("expressions")
    info["request_schema"] = {n: str(t) for n, t in info["request_schema"].items()}
    console.print(_table(f"On-demand view {name}", ["property", "value"], list(info.items())))
    console.print(
        _table(
            "Schema",
            ["feature", "dtype", "expression"],
            [(n, str(t), expressions.get(n, "")) for n, t in schema.items()],
        )
    )


def _describe_aggregation(name: str, info: dict[str, Any], schema: dict[str, Any]) -> None:
    console = _console()
    aggregations = {a["name"]: a for a in info.pop("aggregations")}
    console.print(_table(f"Aggregation view {name}", ["property", "value"], list(info.items())))
    rows = []
    for feature, dtype in schema.items():
        a = aggregations[feature]
        window = f"{'next' if a['forward'] else 'last'} {_ttl(a['window'])}"
        rows.append((feature, str(dtype), a["function"], a["column"] or "(rows)", window))
    console.print(_table("Schema", ["feature", "dtype", "function", "column", "window"], rows))


def _with_requests(
    store: FeatureStore, rows: list[dict[str, Any]], pairs: Sequence[str]
) -> list[dict[str, Any]]:
    """``rows`` with the ``--request NAME=VALUE`` values, read as the declared dtypes."""
    declared: dict[str, pl.DataType] = {}
    for odv in store.list_on_demand_views():
        declared.update(odv.request_schema or {})
    texts: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            msg = f"{pair!r} is not NAME=VALUE, e.g. --request amount=12.5."
            raise click.BadParameter(msg, param_hint="--request")
        texts.setdefault(name.strip(), []).append(raw.strip())
    out = [dict(r) for r in rows]
    for name, values in texts.items():
        if name not in declared:
            msg = f"{name!r} is no request column of an on-demand view." + did_you_mean(
                name, declared
            )
            raise click.BadParameter(msg, param_hint="--request")
        if len(values) not in (1, len(out)):
            msg = f"give {name!r} once, or once per entity ({len(out)}), got {len(values)}."
            raise click.BadParameter(msg, param_hint="--request")
        try:
            parsed = pl.Series(name, [_unquote(v)[0] for v in values]).cast(
                declared[name], strict=True
            )
        except pl.exceptions.PolarsError as e:
            msg = f"{name!r} is {declared[name]}; cannot read {values!r} as that."
            raise click.BadParameter(msg, param_hint="--request") from e
        for i, row in enumerate(out):
            row[name] = parsed[0 if len(values) == 1 else i]
    return out
