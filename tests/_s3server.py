"""A real S3-compatible server for the tests: moto's server mode on 127.0.0.1, a free port.

The server checks credentials (``INITIAL_NO_AUTH_ACTION_COUNT``: only the first three
requests, which create the test user and its access key, go unsigned), so a wrong secret is
refused as by S3. It supports the conditional writes delta-rs and the registry rely on
(``If-None-Match: *``, ``If-Match``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["S3Server", "s3_server"]


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    def options(self, **overrides: str) -> dict[str, str]:
        """Storage options for polarstore (delta-rs, Polars and obstore read the same keys)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
            **overrides,
        }

    def env(self) -> dict[str, str]:
        """The same options as the ``AWS_*`` environment variables the CLI reads."""
        return self.options()

    def client(self) -> object:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def bucket(self) -> str:
        """A new, empty bucket of its own for one test."""
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
        return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start the server for the block; stop it (and only it) after."""
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    msg = f"moto server did not start on {endpoint}"
                    raise RuntimeError(msg) from None
                time.sleep(0.05)
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
            aws_secret_access_key="unused",
            region_name="us-east-1",
        )
        iam.create_user(UserName="polarstore")
        allow_all = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="polarstore", PolicyName="all", PolicyDocument=json.dumps(allow_all)
        )
        key = iam.create_access_key(UserName="polarstore")["AccessKey"]
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- workers of the concurrency tests (run in child processes) ----------------------------


def write_batches(
    uri: str, options: dict[str, str], writer: int, batches: int, go: Any
) -> list[tuple[int, int]]:
    """Write ``batches`` batches (one row per user, all at one event time, so only the write
    order tells them apart) to view ``events``; return (batch, version) of each."""
    from datetime import datetime, timezone

    import polars as pl

    from polarstore import FeatureStore

    store = FeatureStore(uri, storage_options=options, online_path=os.devnull + "-unused")
    go.wait()
    landed = []
    for b in range(batches):
        batch = writer * 1000 + b
        rows = pl.DataFrame(
            {
                "user_id": list(range(5)),
                "event_timestamp": [datetime(2024, 1, 1, tzinfo=timezone.utc)] * 5,
                "batch": [batch] * 5,
            }
        )
        landed.append((batch, store.write("events", rows, idempotency_key=f"b{batch}")))
    return landed


def apply_views(uri: str, options: dict[str, str], writer: int, views: int, go: Any) -> None:
    """Apply ``views`` new views, one ``apply`` each, named after the writer."""
    import polars as pl

    from polarstore import Entity, FeatureStore, FeatureView

    store = FeatureStore(uri, storage_options=options, online_path=os.devnull + "-unused")
    user = Entity("user", join_keys="user_id")
    go.wait()
    for v in range(views):
        store.apply(FeatureView(f"w{writer}_v{v}", entities=[user], schema={"x": pl.Int64}))


def report(out: Any, target: Any, *args: Any) -> None:
    """Run ``target(*args)`` and put its result (or the traceback, as a str) on ``out``."""
    import traceback

    try:
        out.put(target(*args))
    except BaseException:
        out.put(traceback.format_exc())


def write_same_batches(
    uri: str, options: dict[str, str], writer: int, batches: int, go: Any
) -> list[tuple[int, int]]:
    """``write_batches`` with the batches (and idempotency keys) of writer 0, whoever runs it."""
    return write_batches(uri, options, 0, batches, go)
