"""One small storage layer: local paths and ``s3://bucket/prefix`` URLs.

S3 goes through boto3 with the endpoint, region and credentials taken from the environment
(``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_PROFILE``,
``AWS_ACCESS_KEY_ID``...) as boto3 resolves them; nothing of them is logged or written.
Connect/read timeouts and a bounded retry count make an unreachable endpoint fail in seconds.
Writes are atomic: local files go to a temporary name and are renamed; S3 objects are uploaded
with ``upload_file`` (multipart above 16 MiB), which makes the object visible only once the
upload completes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

CONNECT_TIMEOUT_S = float(os.environ.get("PRISM_S3_CONNECT_TIMEOUT_S", "3"))
READ_TIMEOUT_S = float(os.environ.get("PRISM_S3_READ_TIMEOUT_S", "60"))
MAX_ATTEMPTS = int(os.environ.get("PRISM_S3_MAX_ATTEMPTS", "3"))


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL and the cause (never secrets)."""


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/key/prefix`` -> (bucket, "key/prefix")."""
    if not is_s3(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"s3 URL without a bucket: {url!r}")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URL or path parts with '/'."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


@lru_cache(maxsize=4)
def _client(endpoint: str | None, profile: str | None, key_hash: int) -> Any:
    # deferred: boto3 (~0.1 s to import) only for s3:// URLs, and the CLI imports this module
    # for --help
    import boto3
    from botocore.config import Config

    cfg = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                 retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"})
    session = boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint or None, config=cfg)


def s3_client() -> Any:
    """A boto3 S3 client configured from the environment (cached per endpoint/profile)."""
    # the cache key includes a hash of the key id, so changed credentials get a new client
    return _client(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
                   os.environ.get("AWS_PROFILE"), hash(os.environ.get("AWS_ACCESS_KEY_ID")))


def _s3_error(op: str, url: str, exc: Exception) -> StorageError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, EndpointConnectionError | ConnectionError) or \
            type(exc).__name__ in {"ConnectTimeoutError", "ReadTimeoutError"}:
        why = "the S3 endpoint is unreachable (check AWS_ENDPOINT_URL / network)"
    elif isinstance(exc, NoCredentialsError):
        why = "no S3 credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID/SECRET)"
    elif isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        why = {"403": "access denied (wrong credentials or no permission)",
               "AccessDenied": "access denied (wrong credentials or no permission)",
               "InvalidAccessKeyId": "the access key id is not valid (wrong credentials)",
               "SignatureDoesNotMatch": "the secret key does not match (wrong credentials)",
               "NoSuchBucket": "the bucket does not exist",
               "404": "not found"}.get(code, f"S3 error {code}")
    else:
        why = type(exc).__name__
    return StorageError(f"{op} {url}: {why}")


def check_access(url: str) -> None:
    """Fail fast (seconds) with a clear StorageError if an s3:// URL's bucket is unusable."""
    if not is_s3(url):
        return
    bucket, _ = split_s3(url)
    try:
        s3_client().head_bucket(Bucket=bucket)
    except Exception as exc:  # noqa: BLE001 - mapped to a clear message
        raise _s3_error("cannot access", url, exc) from None


def exists(url: str) -> bool:
    if not is_s3(url):
        return Path(url).exists()
    bucket, key = split_s3(url)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except Exception as exc:  # noqa: BLE001
        err = _s3_error("head", url, exc)
        if str(err).endswith("not found"):
            return False
        raise err from None


def list_files(url: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files directly under a directory or prefix (sorted), filtered by suffix."""
    if not is_s3(url):
        root = Path(url)
        if not root.is_dir():
            raise StorageError(f"not a directory: {url}")
        return sorted(str(p) for p in root.iterdir()
                      if p.is_file() and (not suffixes or p.name.endswith(suffixes)))
    bucket, prefix = split_s3(url)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    out: list[str] = []
    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, Delimiter="/")
        for page in pages:
            for obj in page.get("Contents", []):
                if not suffixes or obj["Key"].endswith(suffixes):
                    out.append(f"s3://{bucket}/{obj['Key']}")
    except Exception as exc:  # noqa: BLE001
        raise _s3_error("list", url, exc) from None
    return sorted(out)


def read_bytes(url: str) -> bytes:
    if not is_s3(url):
        try:
            return Path(url).read_bytes()
        except OSError as exc:
            raise StorageError(f"read {url}: {exc.strerror or exc}") from None
    bucket, key = split_s3(url)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:  # noqa: BLE001
        raise _s3_error("read", url, exc) from None


def open_read(url: str) -> BinaryIO:
    """A binary file object reading ``url`` from its start: the local file, or the body of an
    S3 GET, streamed as it is read (a context manager; close it when done)."""
    if not is_s3(url):
        try:
            return open(url, "rb")  # noqa: SIM115 - the caller closes it
        except OSError as exc:
            raise StorageError(f"read {url}: {exc.strerror or exc}") from None
    bucket, key = split_s3(url)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as exc:  # noqa: BLE001
        raise _s3_error("read", url, exc) from None


def size(url: str) -> int:
    """Bytes of a file or S3 object."""
    if not is_s3(url):
        try:
            return Path(url).stat().st_size
        except OSError as exc:
            raise StorageError(f"stat {url}: {exc.strerror or exc}") from None
    bucket, key = split_s3(url)
    try:
        return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    except Exception as exc:  # noqa: BLE001
        raise _s3_error("head", url, exc) from None


def download(url: str, local_path: str | Path) -> None:
    """Copy ``url`` (local or S3) to a local file, streaming (never whole in memory)."""
    if not is_s3(url):
        try:
            shutil.copyfile(url, local_path)
        except OSError as exc:
            raise StorageError(f"read {url}: {exc.strerror or exc}") from None
        return
    bucket, key = split_s3(url)
    try:
        s3_client().download_file(bucket, key, str(local_path))
    except Exception as exc:  # noqa: BLE001
        raise _s3_error("read", url, exc) from None


def put_file(local_path: str | Path, url: str) -> None:
    """Copy a finished local file to ``url`` atomically (rename / completed upload)."""
    if is_s3(url):
        from boto3.s3.transfer import TransferConfig

        bucket, key = split_s3(url)
        try:  # multipart above the threshold; the object exists only once completed
            s3_client().upload_file(str(local_path), bucket, key, Config=TransferConfig(
                multipart_threshold=16 * 2**20, multipart_chunksize=16 * 2**20))
        except Exception as exc:  # noqa: BLE001
            raise _s3_error("write", url, exc) from None
        return
    dest = Path(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{os.getpid()}-{dest.name}")
    shutil.copyfile(local_path, tmp)
    os.replace(tmp, dest)


def write_bytes(url: str, data: bytes) -> None:
    """Write bytes atomically to a local path or S3 object."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:  # noqa: BLE001
            raise _s3_error("write", url, exc) from None
        return
    dest = Path(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{os.getpid()}-{dest.name}")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def delete(url: str) -> None:
    """Remove a file or S3 object; a missing one is not an error."""
    if not is_s3(url):
        Path(url).unlink(missing_ok=True)
        return
    bucket, key = split_s3(url)
    try:
        s3_client().delete_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001
        raise _s3_error("delete", url, exc) from None


class LocalStaging:
    """A temporary local directory for building files before ``put_file`` (context manager)."""

    def __enter__(self) -> Path:
        self._dir = tempfile.mkdtemp(prefix="prism-")
        return Path(self._dir)

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
