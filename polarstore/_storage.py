"""Repositories on object storage: URIs, storage options, small objects and their errors.

Delta Lake (delta-rs) and Polars reach the tables themselves; this module handles the rest of
a remote repository: ``registry.json``, the ``.polarstore/`` metadata files and dataset spines,
read and written with obstore (the Rust ``object_store`` crate delta-rs and Polars use too, so
the storage options mean the same everywhere). Updates of shared objects are conditional puts
(``If-None-Match`` to create, ``If-Match`` on the ETag to replace): two machines updating the
registry at once cannot both win, and the loser retries on what the winner wrote.

Storage options are the environment's credentials, region and endpoint (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ...; ``GOOGLE_*``, ``AZURE_*``), overridden by the ``storage_options``
given; every library gets the same dict.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import obstore
from obstore import exceptions as oe
from obstore.store import from_url

from polarstore._errors import PolarstoreError, StorageError

__all__ = [
    "REMOTE_SCHEMES",
    "Location",
    "PreconditionError",
    "default_online_path",
    "is_remote",
    "open_location",
    "sink_parquet",
]

# What delta-rs reads and writes (gs:// and az:// untested here: no emulator in the tests).
REMOTE_SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss")
_ENV_PREFIXES = {"s3": "AWS_", "s3a": "AWS_", "gs": "GOOGLE_", "az": "AZURE_"}
_ENV_PREFIXES |= {"abfs": "AZURE_", "abfss": "AZURE_"}
# The AWS_* variables taken into the options. Not AWS_PROFILE and the like: each library reads
# those from the environment itself, and Polars refuses a profile next to explicit keys.
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT",
    "AWS_ALLOW_HTTP",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    "AWS_SKIP_SIGNATURE",
}
# Keys only delta-rs knows; obstore refuses them.
_DELTA_ONLY = re.compile(r"(aws_s3_|aws_conditional_put|delta_|aws_dynamo|dynamo).*", re.I)
_CLIENT_KEYS = {"allow_http", "aws_allow_http", "google_allow_http", "azure_allow_http"}
# A registry read should fail in seconds, not after object_store's default 3 minutes.
_RETRY: Any = {
    "max_retries": 3,
    "retry_timeout": timedelta(seconds=10),
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2)},
}


class PreconditionError(Exception):
    """A conditional put lost: the object changed (or appeared) since it was read."""


def is_remote(text: str) -> bool:
    """Whether ``text`` names an object-store location rather than a local folder."""
    return "://" in text and not text.startswith("file://")


def open_location(text: str, storage_options: dict[str, str] | None) -> Location:
    """A remote repository location; ``ValidationError`` for a scheme or URI it cannot be.

    Examples
    --------
    >>> open_location("s3://bucket/repo/", {"AWS_REGION": "eu-west-1"}).uri
    's3://bucket/repo'
    """
    from polarstore._errors import ValidationError

    scheme, _, rest = text.partition("://")
    if scheme.lower() not in REMOTE_SCHEMES:
        msg = (
            f"repository {text!r}: scheme {scheme + '://'!r} is not supported; use a local "
            f"folder or one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}."
        )
        raise ValidationError(msg)
    bucket, _, prefix = rest.partition("/")
    parts = [p for p in prefix.split("/") if p]
    if not bucket or any(p in (".", "..") for p in parts):
        msg = f"repository {text!r}: expected {scheme}://BUCKET[/PREFIX] (no '.' or '..')."
        raise ValidationError(msg)
    if storage_options is not None and not (
        isinstance(storage_options, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in storage_options.items())
    ):
        msg = f"repository {text!r}: storage_options must be a dict of str to str."
        raise ValidationError(msg)
    uri = f"{scheme.lower()}://{'/'.join([bucket, *parts])}"
    prefix_env = _ENV_PREFIXES[scheme.lower()]
    options = {
        k: v
        for k, v in os.environ.items()
        if (k in _AWS_ENV if prefix_env == "AWS_" else k.startswith(prefix_env))
    }
    # Explicit options win over the environment's, whatever their case.
    given = dict(storage_options or {})
    options = {k: v for k, v in options.items() if k.lower() not in {g.lower() for g in given}}
    return Location(uri, {**options, **given})


def default_online_path(location: Location) -> Path:
    """The local folder of a remote repository's online store.

    ``$POLARSTORE_CACHE`` (else ``$XDG_CACHE_HOME/polarstore``, else ``~/.cache/polarstore``)
    ``/online/<scheme>/<bucket>/<prefix>-<hash>``: readable, and the hash of the URI and the
    endpoint keeps two repositories (say a test server's and the real bucket) apart.

    Examples
    --------
    >>> path = default_online_path(open_location("s3://bkt/team/repo", {}))
    >>> path.parent.parts[-4:], path.name.startswith("repo-")
    (('online', 's3', 'bkt', 'team'), True)
    """
    base = os.environ.get("POLARSTORE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "polarstore"
    )
    scheme, _, rest = location.uri.partition("://")
    endpoint = next((v for k, v in location.options.items() if "endpoint" in k.lower()), "default")
    digest = hashlib.sha256(f"{location.uri}\n{endpoint}".encode()).hexdigest()[:10]
    safe = [re.sub(r"[^A-Za-z0-9._=-]", "_", p) for p in rest.split("/")]
    return Path(base, "online", scheme, *safe[:-1], f"{safe[-1]}-{digest}")


@dataclass
class Location:
    """A remote repository root (``scheme://bucket/prefix``) and its storage options."""

    uri: str
    options: dict[str, str]
    _store: Any = field(default=None, repr=False)

    def url(self, relative: str) -> str:
        return f"{self.uri}/{relative}"

    def _client(self) -> Any:
        if self._store is None:
            config: Any = {k.lower(): v for k, v in self.options.items()}
            flags = [config.pop(k) for k in list(config) if k in _CLIENT_KEYS]
            client: Any = {"allow_http": flags[-1].lower() == "true"} if flags else {}
            config = {k: v for k, v in config.items() if not _DELTA_ONLY.fullmatch(k)}
            while True:
                try:
                    self._store = from_url(
                        self.uri, config=config, client_options=client, retry_config=_RETRY
                    )
                    break
                except oe.UnknownConfigurationKeyError as e:
                    # A key some other library reads (an AWS_PROFILE in the environment, say).
                    bad = re.search(r"key: '([^']+)'", str(e))
                    if bad is None or bad.group(1) not in config:
                        raise self.error(e, "configuring the object store client") from e
                    del config[bad.group(1)]
                except (oe.BaseError, ValueError) as e:
                    raise self.error(e, "configuring the object store client") from e
        return self._store

    def get(self, relative: str) -> tuple[bytes, str | None] | None:
        """The object's bytes and ETag; None if there is no such object (the bucket exists)."""
        try:
            result = obstore.get(self._client(), relative)
            return bytes(result.bytes()), result.meta.get("e_tag")
        except (FileNotFoundError, oe.NotFoundError) as e:
            if _no_bucket(e):
                raise self.error(e, f"reading {relative}") from e
            return None
        except (oe.BaseError, OSError) as e:
            raise self.error(e, f"reading {relative}") from e

    def put(self, relative: str, data: bytes, *, expect: str | bool | None) -> str | None:
        """Write ``data``; return the new ETag.

        ``expect``: ``None`` the object must not exist yet, an ETag the object must still have
        it, ``True`` unconditionally. A lost condition raises :class:`PreconditionError`.
        """
        mode: Any = "overwrite" if expect is True else "create" if expect is None else None
        if mode is None:
            mode = {"e_tag": expect}
        try:
            result = obstore.put(self._client(), relative, data, mode=mode)
        except (oe.PreconditionError, oe.AlreadyExistsError, FileExistsError) as e:
            raise PreconditionError(relative) from e
        except (oe.BaseError, OSError) as e:
            raise self.error(e, f"writing {relative}") from e
        return result.get("e_tag")

    def delete(self, relative: str) -> None:
        try:
            obstore.delete(self._client(), relative)
        except (FileNotFoundError, oe.NotFoundError):
            return
        except (oe.BaseError, OSError) as e:
            raise self.error(e, f"deleting {relative}") from e

    def sizes(self, folder: str) -> dict[str, int]:
        """Name -> size of the objects directly in ``folder`` (not in its sub-folders)."""
        try:
            listed = obstore.list_with_delimiter(self._client(), folder.rstrip("/") + "/")
        except (oe.BaseError, OSError) as e:
            raise self.error(e, f"listing {folder}") from e
        return {o["path"].rsplit("/", 1)[-1]: int(o["size"]) for o in listed["objects"]}

    def error(self, e: BaseException, doing: str) -> PolarstoreError:
        """One clear error for a failure of the object store, naming the URI."""
        text = str(e)
        first = text.splitlines()[0] if text else type(e).__name__
        where = f"the repository {self.uri}"
        endpoint = next((v for k, v in self.options.items() if "endpoint" in k.lower()), None)
        at = f" at {endpoint}" if endpoint else ""
        if _no_bucket(e):
            bucket = self.uri.split("://", 1)[1].split("/", 1)[0]
            msg = f"{where}: the bucket {bucket!r} does not exist{at}. Create it first."
            return StorageError(errno.ENOENT, msg)
        if isinstance(e, (PermissionError, oe.PermissionDeniedError, oe.UnauthenticatedError)) or (
            re.search(r"\b(403|401)\b|privileges|InvalidAccessKeyId|SignatureDoesNotMatch", text)
        ):
            msg = (
                f"{where}: the object store{at} refused the credentials while {doing} "
                "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the storage_options): "
                f"{_short(first)}"
            )
            return StorageError(errno.EACCES, msg)
        if re.search(r"error sending request|connect|dns|timed out|Connection refused", text, re.I):
            msg = (
                f"{where}: cannot reach the object store{at or ' (its default endpoint)'} "
                f"while {doing}; is it running, and is the endpoint right? {_short(first)}"
            )
            return StorageError(errno.ECONNREFUSED, msg)
        msg = f"{where}: {doing} failed: {_short(first)}"
        return StorageError(errno.EIO, msg)

    def diagnose(self) -> PolarstoreError | None:
        """The object store's problem, if a plain read of the registry shows one.

        delta-rs reports an unreachable endpoint or a missing bucket as "Generic S3 error":
        a read through this client tells which it is.
        """
        try:
            self.get("registry.json")
        except PolarstoreError as e:
            return e
        return None


def _no_bucket(e: BaseException) -> bool:
    return "NoSuchBucket" in repr(e) or "NoSuchBucket" in str(e)


def _short(text: str) -> str:
    # object_store's messages carry the whole response body and a debug dump.
    return text if len(text) <= 300 else text[:300] + "..."


def sink_parquet(frame: Any, target: str | os.PathLike[str], what: str) -> str:
    """Stream the lazy ``frame`` into one Parquet file at ``target``; return where it went.

    Polars' streaming engine writes it batch by batch, so a training set larger than memory
    never is in memory whole. A local file appears whole or not at all (written next to it,
    then renamed); an object-store upload completes only at its end. A URI takes its storage
    options from the environment (``AWS_*``), as the CLI's ``--repo`` does.

    Examples
    --------
    >>> import tempfile, polars as pl
    >>> path = sink_parquet(pl.LazyFrame({"x": [1, 2]}), tempfile.mkdtemp() + "/t.parquet", "x")
    >>> pl.read_parquet(path)["x"].to_list()
    [1, 2]
    """
    import polars as pl

    text = os.fspath(target)
    try:
        if is_remote(text):
            location = open_location(text, None)
            frame.sink_parquet(location.uri, storage_options=location.options)
            return location.uri
        path = Path(text).expanduser().resolve()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            frame.sink_parquet(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return str(path)
    except PolarstoreError:
        raise
    except (pl.exceptions.PolarsError, OSError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        msg = f"{what}: writing the training set to {text!r} failed; no file was left: {first}"
        raise StorageError(getattr(e, "errno", None) or errno.EIO, msg) from e
