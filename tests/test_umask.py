"""Every file and folder polarstore creates follows the umask, so a team can share a repository.

``mkstemp`` (0600) or a hard-coded mode would lock colleagues out of a folder they share with a
group-writable umask; the workflow runs in a subprocess because the umask is per process.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

WORKFLOW = """
import os, sys
from datetime import datetime, timedelta
import polars as pl
from polarstore import Entity, FeatureService, FeatureStore, FeatureView

os.umask(int(sys.argv[2], 8))
user = Entity("user", join_keys="user_id")
stats = FeatureView("stats", entities=[user], schema={"clicks": pl.Int64}, ttl=timedelta(days=9))
with FeatureStore(sys.argv[1]) as store:
    store.apply([user, stats, FeatureService("churn", ["stats:clicks"])])
    t = datetime(2024, 1, 1)
    rows = pl.DataFrame({"user_id": [1, 2], "event_timestamp": [t, t], "clicks": [3, 4]})
    store.write("stats", rows)
    store.write("stats", rows.with_columns(pl.col("clicks") + 1))
    spine = rows.select("user_id", "event_timestamp")
    store.save_dataset("train", spine, "churn")
    store.save_dataset("train", spine, "churn", overwrite=True)
    store.materialize()
    store.get_online_features({"user_id": 1}, "churn", now=t)
    store.compact("stats")
"""


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_file_follows_the_umask(tmp_path: Path, umask: int) -> None:
    repo = tmp_path / "repo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(
        [sys.executable, "-c", WORKFLOW, str(repo), oct(umask)], check=True, env=env, timeout=120
    )
    wrong = []
    for path in [repo, *repo.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        if mode != want:
            wrong.append(f"{path.relative_to(tmp_path)}: {oct(mode)}, expected {oct(want)}")
    assert wrong == []
    assert (repo / "registry.json").exists()
    assert list((repo / "datasets").iterdir())
