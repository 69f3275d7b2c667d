"""Local or s3:// paths through pyarrow.fs, with atomic writes.

Every write goes to a temporary name first and is renamed into place (local) or uploaded as one object
(S3 objects appear whole or not at all), so a reader never sees a half-written file. The S3 endpoint comes
from `AWS_ENDPOINT_URL` (pyarrow ignores it, so we pass it explicitly), credentials and region from the
standard AWS environment / instance profile. Transient S3 failures (503 SlowDown, connection resets, truncated
bodies) are retried by the AWS SDK's standard strategy with exponential backoff, up to S3_MAX_ATTEMPTS; what still
fails is a raydseg.errors.StorageError whose one line names the path.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import tempfile
import uuid
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydseg.errors import StorageError

S3_MAX_ATTEMPTS = 6  # tries per S3 request (the AWS SDK's standard retry strategy: exponential backoff, jitter)


def is_s3(path: str) -> bool:
    return str(path).startswith("s3://")


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kwargs: dict[str, Any] = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS), **kwargs)


@contextlib.contextmanager
def _failing(path: str, action: str):
    """Re-raise a storage failure as one StorageError line naming `path` (not-found stays as it is: callers ask)."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, StorageError):
        raise
    except OSError as e:
        reason = " ".join(str(e).split())
        raise StorageError(f"{path}: {action} failed: {reason}") from e


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it): `bucket/key` for s3://, an absolute path for local."""
    path = str(path)
    if is_s3(path):
        return _s3_filesystem(), path[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(*parts: str) -> str:
    first, rest = str(parts[0]), [str(p).strip("/") for p in parts[1:]]
    if is_s3(first):
        return posixpath.join(first.rstrip("/"), *rest)
    return os.path.join(first, *rest)


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def isdir(path: str) -> bool:
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        return True
    if is_s3(path) and info.type == pafs.FileType.NotFound:  # S3 "directories" exist only through their keys
        return bool(listdir(path))
    return False


def makedirs(path: str) -> None:
    fs, p = filesystem(path)
    fs.create_dir(p, recursive=True)


def listdir(path: str) -> list[str]:
    """Names (not paths) directly under `path`, sorted; [] when it does not exist."""
    fs, p = filesystem(path)
    try:
        with _failing(path, "list"):
            infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def rmtree(path: str) -> None:
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory or (is_s3(path) and listdir(path)):
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


def tree_size(path: str) -> int:
    """Bytes of every file under `path` (0 when it does not exist)."""
    fs, p = filesystem(path)
    with _failing(path, "list"):
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with _failing(path, "read"), fs.open_input_stream(p) as f:
        return f.read()


def read_range(path: str, offset: int, length: int) -> bytes:
    """`length` bytes of `path` from byte `offset` (on S3 a ranged read: the object is not downloaded)."""
    fs, p = filesystem(path)
    with _failing(path, "read"), fs.open_input_file(p) as f:
        return f.read_at(length, offset)


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically: local files via a temp name in the same folder + rename; S3 as one PUT."""
    fs, p = filesystem(path)
    parent = posixpath.dirname(p) if is_s3(path) else os.path.dirname(p)
    with _failing(path, "write"):
        if is_s3(path):
            with fs.open_output_stream(p) as f:
                f.write(data)
            return
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def write_table(table: pa.Table, path: str) -> None:
    """Write one parquet file atomically."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(path, buf.getvalue())


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """Read one parquet file, or every `part-*.parquet` directly in a folder (in name order; never rejects)."""
    fs, p = filesystem(path)
    with _failing(path, "read"):
        if fs.get_file_info(p).type == pafs.FileType.File:
            return pq.read_table(p, filesystem=fs, columns=columns)
        names = [n for n in listdir(path) if n.startswith("part-") and n.endswith(".parquet")]
        if not names:
            raise FileNotFoundError(f"no parquet files under {path}")
        return pa.concat_tables([pq.read_table(fs_join(p, n, path), filesystem=fs, columns=columns) for n in names])


def parquet_rows(path: str) -> int:
    """Row count of one parquet file, from its footer (no column data is read)."""
    fs, p = filesystem(path)
    with _failing(path, "read"):
        with fs.open_input_file(p) as f:
            return pq.ParquetFile(f).metadata.num_rows


def parquet_columns(path: str) -> list[str]:
    """Top-level column names of one parquet file, from its footer (no column data is read)."""
    fs, p = filesystem(path)
    with _failing(path, "read"):
        with fs.open_input_file(p) as f:
            return list(pq.ParquetFile(f).schema_arrow.names)


def fs_join(fs_path: str, name: str, like: str) -> str:
    return posixpath.join(fs_path, name) if is_s3(like) else os.path.join(fs_path, name)


def local_copy(path: str, cache_dir: str | None = None) -> str:
    """A local file with the content of `path` (downloads s3:// objects once into a cache folder)."""
    if not is_s3(path):
        return os.path.abspath(path)
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "raydseg-cache")
    target = os.path.join(cache_dir, uuid.uuid5(uuid.NAMESPACE_URL, path).hex + "-" + posixpath.basename(path))
    if not os.path.exists(target):
        os.makedirs(cache_dir, exist_ok=True)
        write_bytes(target, read_bytes(path))
    return target
