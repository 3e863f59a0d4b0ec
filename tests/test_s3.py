"""Repositories on S3: the workflow, concurrent writers and appliers, errors, the CLI.

Against a real S3-compatible server process (moto's server mode, tests/_s3server.py) on
127.0.0.1, started once for the module. Every test gets a bucket of its own.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from polarstore import (
    Entity,
    FeatureStore,
    FeatureView,
    NotFoundError,
    PolarstoreError,
    StorageError,
    ValidationError,
)
from tests import _s3server
from tests._s3server import S3Server, s3_server

pytest.importorskip("moto")

CTX = multiprocessing.get_context("forkserver")
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
USER = Entity("user", join_keys="user_id")
STATS = FeatureView(
    "stats",
    entities=[USER],
    schema={"clicks": pl.Int64, "spend": pl.Float64},
    created_timestamp_field="created",
    ttl=timedelta(days=3),
)
EVENTS = FeatureView("events", entities=[USER], schema={"batch": pl.Int64})


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with s3_server() as s:
        yield s


@pytest.fixture
def uri(server: S3Server) -> str:
    return f"s3://{server.bucket()}/team/repo"


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLARSTORE_CACHE", str(tmp_path / "cache"))


def _rows(seed: int, n: int = 60) -> pl.DataFrame:
    """Rows with exact ties and many rows inside one millisecond."""
    import random

    rng = random.Random(seed)
    times = [
        T0 + timedelta(microseconds=rng.choice([0, 1, 999, 1000, 86_400_000_000])) for _ in range(n)
    ]
    return pl.DataFrame(
        {
            "user_id": [rng.randrange(4) for _ in range(n)],
            "event_timestamp": times,
            "created": [t + timedelta(microseconds=rng.choice([0, 0, 1])) for t in times],
            "clicks": [rng.randrange(100) if rng.random() > 0.1 else None for _ in range(n)],
            "spend": [rng.random() for _ in range(n)],
        }
    )


def _workflow(store: FeatureStore, tmp: Path) -> dict[str, object]:
    """write -> read -> PIT join -> as_of -> dataset -> materialize -> online, as plain data."""
    store.apply([USER, STATS])
    versions = [store.write("stats", _rows(s)) for s in range(3)]
    spine = pl.DataFrame(
        {
            "user_id": [0, 1, 2, 3, 9, 0],
            "event_timestamp": [
                T0 + timedelta(microseconds=us) for us in (0, 1, 999, 1000, 5, 10**11)
            ],
        }
    )
    train = store.get_historical_features(spine, ["stats:*"]).collect()
    pinned = store.get_historical_features(spine, ["stats:clicks"], as_of={"stats": 0}).collect()
    store.save_dataset("train", spine, ["stats:*"])
    store.write("stats", _rows(7))  # after the save: the dataset must not see it
    loaded = store.load_dataset("train").collect()
    store.materialize()
    now = T0 + timedelta(days=2)
    online = store.get_online_features([{"user_id": u} for u in range(5)], ["stats:*"], now=now)
    offline_now = store.get_historical_features(
        pl.DataFrame({"user_id": list(range(5)), "event_timestamp": [now] * 5}), ["stats:*"]
    ).collect()
    streamed = store.get_historical_features(spine, ["stats:*"]).collect(engine="streaming")
    sink = tmp / "train.parquet"
    store.get_historical_features(spine, ["stats:*"]).sink_parquet(sink)
    return {
        "versions": versions,
        "read": store.read("stats").collect(),
        "train": train,
        "pinned": pinned,
        "loaded": loaded,
        "online": online,
        "offline_now": offline_now.drop("event_timestamp"),
        "streamed": streamed,
        "sunk": pl.read_parquet(sink),
        "history_ops": store.history("stats")["operation"].to_list(),
    }


def test_the_workflow_on_s3_gives_what_a_local_folder_gives(
    server: S3Server, uri: str, tmp_path: Path
) -> None:
    remote = FeatureStore(uri, storage_options=server.options())
    local = FeatureStore(tmp_path / "local")
    (tmp_path / "r").mkdir()
    (tmp_path / "l").mkdir()
    got, want = _workflow(remote, tmp_path / "r"), _workflow(local, tmp_path / "l")
    assert got["versions"] == want["versions"] == [0, 1, 2]
    for name in ("read", "train", "pinned", "loaded", "online", "streamed", "sunk"):
        assert_frame_equal(got[name], want[name], check_dtypes=True), name  # type: ignore[arg-type,func-returns-value]
    assert got["history_ops"] == want["history_ops"]
    # Train/serve parity holds on the remote repository too.
    assert_frame_equal(got["online"], got["offline_now"])  # type: ignore[arg-type]
    vector = remote.get_feature_vector({"user_id": 1}, ["stats:*"], now=T0 + timedelta(days=2))
    assert vector == got["online"].filter(pl.col("user_id") == 1).drop("user_id").to_dicts()[0]  # type: ignore[attr-defined]
    assert_frame_equal(got["sunk"], got["streamed"])  # type: ignore[arg-type]
    # Statistics (kept per data file, on the object store) time-travel as on a local folder.
    for version in (0, None):
        assert_frame_equal(
            remote.statistics("stats", as_of=version), local.statistics("stats", as_of=version)
        )
    # Everything but the online store is in the bucket; LMDB is in the derived cache folder.
    keys = {
        o["Key"]
        for o in server.client().list_objects_v2(  # type: ignore[attr-defined]
            Bucket=uri.split("/")[2]
        )["Contents"]
    }
    assert "team/repo/registry.json" in keys
    assert any(k.startswith("team/repo/views/stats/_delta_log/") for k in keys)
    assert any(k.startswith("team/repo/datasets/train-") for k in keys)
    assert any(k.startswith("team/repo/.polarstore/stats/stats/") for k in keys)
    assert not any("online" in k or k.endswith(".mdb") for k in keys)
    cache = tmp_path / "cache" / "online" / "s3" / uri.split("/")[2] / "team"
    assert remote.online_path.parent == cache
    assert (remote.online_path / "data.mdb").is_file()


def test_bitemporal_and_the_commit_times_file_on_s3(server: S3Server, uri: str) -> None:
    store = FeatureStore(uri, storage_options=server.options())
    store.apply([USER, STATS])
    store.write("stats", _rows(1))
    commit_ms = store._offline.commit_times("stats")[0]
    committed = datetime.fromtimestamp(commit_ms / 1000, timezone.utc)
    spine = pl.DataFrame({"user_id": [0, 1, 2, 3], "event_timestamp": [T0 + timedelta(days=1)] * 4})
    plain = store.get_historical_features(spine, ["stats:clicks"]).collect()
    known = store.get_historical_features(spine, ["stats:clicks"], bitemporal=True).collect()
    assert committed > T0 + timedelta(days=1)  # written today: unknown at the spine time
    assert known["clicks"].null_count() == 4
    assert plain["clicks"].null_count() < 4
    # A commit time kept in .polarstore/commit_times (as a purge leaves it) is read from S3.
    server.client().put_object(  # type: ignore[attr-defined]
        Bucket=uri.split("/")[2],
        Key="team/repo/.polarstore/commit_times/stats.json",
        Body=b'{"0": 0}',
    )
    assert store._offline.commit_times("stats") == {0: 0}  # the kept file is authoritative
    assert store._offline.commit_times("nothing") == {}


def test_online_path_overrides_the_cache_folder(server: S3Server, uri: str, tmp_path: Path) -> None:
    store = FeatureStore(uri, storage_options=server.options(), online_path=tmp_path / "lmdb")
    store.apply([USER, STATS])
    store.write("stats", _rows(2))
    store.materialize()
    assert (tmp_path / "lmdb" / "data.mdb").is_file()
    assert not (tmp_path / "cache").exists()
    other = FeatureStore(uri.replace("/repo", "/other"), storage_options=server.options())
    assert other.online_path != FeatureStore(uri, storage_options=server.options()).online_path


def test_storage_options_come_from_the_environment(
    server: S3Server, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    # Read by each library itself, not copied into the options (Polars refuses a profile next
    # to explicit keys).
    monkeypatch.setenv("AWS_PROFILE", "not-a-profile")
    store = FeatureStore(uri)
    store.apply([USER, STATS])
    assert store.write("stats", _rows(3)) == 0
    assert store.read("stats").collect().height == 60
    # An explicit option wins over the environment's.
    with pytest.raises(StorageError, match="refused the credentials"):
        FeatureStore(uri, storage_options={"aws_secret_access_key": "wrong"})


# --- concurrency ------------------------------------------------------------------------------


def _run(target: object, uri: str, server: S3Server, per_process: int) -> list[object]:
    """Run ``target`` in two processes that start their work at the same moment."""
    go, out = CTX.Event(), CTX.Queue()
    procs = [
        CTX.Process(
            target=_s3server.report, args=(out, target, uri, server.options(), w, per_process, go)
        )
        for w in (1, 2)
    ]
    for p in procs:
        p.start()
    go.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    failed = [r for r in results if isinstance(r, str)]
    assert not failed, failed
    return results


def test_two_processes_writing_at_once_land_every_write_once(server: S3Server, uri: str) -> None:
    store = FeatureStore(uri, storage_options=server.options())
    store.apply([USER, EVENTS])
    per = 6
    landed = [pair for part in _run(_s3server.write_batches, uri, server, per) for pair in part]
    versions = [v for _, v in landed]
    assert sorted(versions) == list(range(2 * per))  # unique, and no gaps: none was lost
    rows = store.read("events").collect()
    raw = store._offline.scan(EVENTS).collect()  # type: ignore[union-attr]
    assert rows.group_by("batch").len()["len"].to_list() == [5] * (2 * per)
    assert raw["_polarstore_seq"].n_unique() == raw.height
    # Each row's sequence names the version that committed it.
    by_batch = dict(landed)
    seq_version = raw.select(pl.col("batch"), (pl.col("_polarstore_seq") // (1 << 32)).alias("v"))
    assert all(by_batch[b] == v for b, v in seq_version.iter_rows())
    last = max(versions)
    store.materialize()
    online = store.get_online_features([{"user_id": u} for u in range(5)], ["events:batch"], now=T0)
    offline = store.get_historical_features(
        pl.DataFrame({"user_id": list(range(5)), "event_timestamp": [T0] * 5}), ["events:batch"]
    ).collect()
    assert_frame_equal(online, offline.drop("event_timestamp"))
    winner = next(b for b, v in landed if v == last)  # all rows tie on time: the last write wins
    assert online["batch"].to_list() == [winner] * 5


def test_two_processes_writing_the_same_keys_at_once_land_each_once(
    server: S3Server, uri: str
) -> None:
    store = FeatureStore(uri, storage_options=server.options())
    store.apply([USER, EVENTS])
    per = 5
    _run(_s3server.write_same_batches, uri, server, per)
    assert store.versions() == {"events": per - 1}  # one commit per key, whoever landed it
    counts = store.read("events").collect().group_by("batch").len()
    assert sorted(counts["len"].to_list()) == [5] * per


def test_idempotency_keys_hold_across_stores(server: S3Server, uri: str) -> None:
    a = FeatureStore(uri, storage_options=server.options())
    b = FeatureStore(uri, storage_options=server.options(), online_path=os.devnull + "-x")
    a.apply([USER, STATS])
    assert a.write("stats", _rows(4), idempotency_key="nightly-1") == 0
    assert b.write("stats", _rows(4), idempotency_key="nightly-1") == 0
    assert b.write("stats", _rows(5), idempotency_key="nightly-2") == 1
    assert a.read("stats").collect().height == 120


def test_two_processes_applying_at_once_lose_nothing(server: S3Server, uri: str) -> None:
    FeatureStore(uri, storage_options=server.options()).apply([USER])
    per = 8
    _run(_s3server.apply_views, uri, server, per)
    names = {
        v.name for v in FeatureStore(uri, storage_options=server.options()).list_feature_views()
    }
    assert names == {f"w{w}_v{v}" for w in (1, 2) for v in range(per)}


# --- errors -----------------------------------------------------------------------------------


def test_an_unreachable_endpoint_is_one_clear_error(uri: str, server: S3Server) -> None:
    options = server.options(AWS_ENDPOINT_URL="http://127.0.0.1:9")
    with pytest.raises(StorageError, match=r"s3://.*/team/repo: cannot reach .*127\.0\.0\.1:9"):
        FeatureStore(uri, storage_options=options)


def test_a_missing_bucket_is_one_clear_error(server: S3Server) -> None:
    with pytest.raises(
        StorageError, match=r"s3://no-such-bucket/r: the bucket 'no-such-bucket' does not exist"
    ):
        FeatureStore("s3://no-such-bucket/r", storage_options=server.options())


def test_bad_credentials_are_one_clear_error(server: S3Server, uri: str) -> None:
    with pytest.raises(StorageError, match=r"s3://.*/team/repo: .*refused the credentials"):
        FeatureStore(uri, storage_options=server.options(AWS_SECRET_ACCESS_KEY="wrong"))


def test_unsupported_schemes_and_bad_uris_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"scheme 'http://' is not supported"):
        FeatureStore("http://example.com/repo")
    with pytest.raises(ValidationError, match=r"expected s3://BUCKET"):
        FeatureStore("s3://b/../x")
    with pytest.raises(ValidationError, match="online_path"):
        FeatureStore("s3://b/x", online_path="s3://b/online")


def test_a_vacuumed_file_is_one_clear_error(server: S3Server, uri: str) -> None:
    store = FeatureStore(uri, storage_options=server.options())
    store.apply([USER, STATS])
    store.write("stats", _rows(1))
    store.write("stats", _rows(2))
    spine = pl.DataFrame({"user_id": [0], "event_timestamp": [T0 + timedelta(days=2)]})
    store.compact("stats")  # an overwrite on S3: version 0 and 1's files are no longer current
    removed = store.vacuum(retention=timedelta(0))
    assert len(removed["stats"]) == 2
    with pytest.raises(NotFoundError, match=r"version 1 can no longer be read.*removed from s3://"):
        store.get_historical_features(spine, ["stats:clicks"], as_of={"stats": 1})
    bucket = uri.split("/")[2]
    current = [
        o["Key"]
        for o in server.client().list_objects_v2(
            Bucket=bucket, Prefix="team/repo/views/stats/part"
        )[  # type: ignore[attr-defined]
            "Contents"
        ]
    ]
    server.client().delete_object(Bucket=bucket, Key=current[0])  # type: ignore[attr-defined]
    with pytest.raises(NotFoundError, match=r"current version \d+ needs 1 data file.*s3://"):
        store.read("stats")


def test_errors_after_opening_name_the_uri(server: S3Server, uri: str) -> None:
    store = FeatureStore(uri, storage_options=server.options())
    store.apply([USER, STATS])
    store.write("stats", _rows(1))
    store._offline.location.options["AWS_SECRET_ACCESS_KEY"] = "wrong"  # type: ignore[union-attr]
    store._offline.location._store = None  # type: ignore[union-attr]
    store._offline.storage_options["AWS_SECRET_ACCESS_KEY"] = "wrong"  # type: ignore[index]
    with pytest.raises(PolarstoreError, match=r"s3://.*/team/repo: .*refused the credentials"):
        store.versions()


# --- the command line -------------------------------------------------------------------------

DEFINITIONS = """
from datetime import timedelta
import polars as pl
from polarstore import Entity, FeatureView
user = Entity("user", join_keys="user_id")
stats = FeatureView("stats", entities=[user], schema={"clicks": pl.Int64}, ttl=timedelta(days=3))
"""


def test_the_cli_on_an_s3_repository(server: S3Server, uri: str, tmp_path: Path) -> None:
    from tests.test_cli import error, ok, run

    env = server.env()
    (tmp_path / "features.py").write_text(DEFINITIONS)
    error(run("--repo", uri, "ls", env=env), 1, "is not a polarstore repository", uri)
    ok(run("--repo", uri, "apply", tmp_path / "features.py", env=env))
    (tmp_path / "rows.csv").write_text(
        "user_id,event_timestamp,clicks\n1,2024-01-01T00:00:00Z,3\n1,2024-01-02T00:00:00Z,5\n"
        "2,2024-01-01T00:00:00.000001Z,7\n"
    )
    ok(run("--repo", uri, "write", "stats", tmp_path / "rows.csv", env=env))
    assert "stats" in ok(run("ls", env={**env, "POLARSTORE_REPO": uri}))
    ok(run("--repo", uri, "materialize", env=env))
    got = ok(
        run(
            "--repo",
            uri,
            "get",
            "stats:clicks",
            "--key",
            "user_id=1",
            "--json",
            "--now",
            "2024-01-03T00:00:00Z",
            env=env,
        )
    )
    assert '"clicks": 5' in got
    # train-set: a CSV spine, the join streamed to a local file and to the bucket.
    (tmp_path / "spine.csv").write_text(
        "user_id,event_timestamp\n1,2024-01-01T12:00:00Z\n2,2024-01-01T00:00:00Z\n3,2024-01-02T00:00:00Z\n"
    )
    out = tmp_path / "train.parquet"
    said = ok(
        run(
            "--repo",
            uri,
            "train-set",
            "stats:clicks",
            "--spine",
            tmp_path / "spine.csv",
            "-o",
            out,
            env=env,
        )
    )
    assert "wrote 3 rows" in said
    store = FeatureStore(uri, storage_options=server.options())
    spine = pl.DataFrame(
        {
            "user_id": [1, 2, 3],
            "event_timestamp": [T0 + timedelta(hours=12), T0, T0 + timedelta(days=1)],
        }
    )
    want = store.get_historical_features(spine, ["stats:clicks"]).collect()
    assert_frame_equal(pl.read_parquet(out), want)
    assert pl.read_parquet(out)["clicks"].to_list() == [3, None, None]  # 2's row is 1 µs later
    ok(
        run(
            "--repo",
            uri,
            "train-set",
            "stats:clicks",
            "--spine",
            tmp_path / "spine.csv",
            "-o",
            f"{uri}/exports/train.parquet",
            env=env,
        )
    )
    exported = pl.read_parquet(f"{uri}/exports/train.parquet", storage_options=server.options())
    assert_frame_equal(exported, want)


def test_train_set_from_a_saved_dataset_and_save_dataset_output(
    server: S3Server, uri: str, tmp_path: Path
) -> None:
    from tests.test_cli import error, ok, run

    store = FeatureStore(uri, storage_options=server.options())
    store.apply([USER, STATS])
    store.write("stats", _rows(1))
    spine = pl.DataFrame({"user_id": [0, 1, 2, 3], "event_timestamp": [T0 + timedelta(days=1)] * 4})
    saved = store.save_dataset("v1", spine, ["stats:*"], output=tmp_path / "v1.parquet")
    store.write("stats", _rows(2))  # after the save
    want = saved.collect()
    assert_frame_equal(pl.read_parquet(tmp_path / "v1.parquet"), want)
    ok(
        run(
            "--repo",
            uri,
            "train-set",
            "--dataset",
            "v1",
            "-o",
            tmp_path / "again.parquet",
            env=server.env(),
        )
    )
    assert_frame_equal(pl.read_parquet(tmp_path / "again.parquet"), want)
    error(
        run("--repo", uri, "train-set", "stats:clicks", "-o", "x.parquet", env=server.env()),
        2,
        "--spine",
    )
    bad = tmp_path / "no" / "such" / "folder" / "t.parquet"
    with pytest.raises(StorageError, match=r"writing the training set to .* failed; no file"):
        store.save_dataset("v2", spine, ["stats:*"], output=bad)
    assert "v2" not in store.list_datasets()


def test_a_purge_is_refused_up_front_on_s3(server: S3Server, uri: str) -> None:
    from polarstore import ValidationError

    store = FeatureStore(uri, storage_options=server.options())
    store.apply([USER, STATS])
    store.write("stats", _rows(1))
    store.write("stats", _rows(2))
    before = store.history("stats")
    with pytest.raises(ValidationError, match="needs a local repository"):
        store.vacuum(retention=timedelta(0), force=True)
    assert_frame_equal(store.history("stats"), before)
    assert store.read("stats", as_of=0).collect().height == 60  # version 0 still readable
