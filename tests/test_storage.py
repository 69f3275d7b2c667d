import os

import numpy as np
import pyarrow as pa
import pytest

from raydseg import storage
from raydseg.errors import StorageError


def _roots(tmp_path, request):
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/prefix"


@pytest.fixture(params=["local", "s3"])
def root(tmp_path, request):
    return _roots(tmp_path, request)


def test_bytes_json_table_round_trip(root):
    storage.write_bytes(storage.join(root, "a", "b.bin"), b"hello")
    assert storage.read_bytes(storage.join(root, "a", "b.bin")) == b"hello"
    storage.write_json(storage.join(root, "m.json"), {"x": [1, 2]})
    assert storage.read_json(storage.join(root, "m.json")) == {"x": [1, 2]}
    t = pa.table({"v": np.arange(5, dtype=np.int32)})
    storage.write_table(t, storage.join(root, "tab", "part-00000.parquet"))
    storage.write_table(t, storage.join(root, "tab", "part-00001.parquet"))
    storage.write_table(pa.table({"reason": ["x"]}), storage.join(root, "tab", "rejects.parquet"))
    assert storage.read_table(storage.join(root, "tab")).column("v").to_pylist() == [0, 1, 2, 3, 4] * 2
    assert storage.listdir(storage.join(root, "tab")) == ["part-00000.parquet", "part-00001.parquet", "rejects.parquet"]
    assert storage.exists(storage.join(root, "m.json")) and not storage.exists(storage.join(root, "nope"))
    storage.rmtree(storage.join(root, "tab"))
    assert storage.listdir(storage.join(root, "tab")) == []
    assert storage.listdir(storage.join(root, "never")) == []


def test_local_copy_of_s3_object(s3_bucket):
    path = f"s3://{s3_bucket}/weights/model.bin"
    storage.write_bytes(path, b"\x00\x01weights")
    local = storage.local_copy(path)
    assert os.path.isfile(local) and open(local, "rb").read() == b"\x00\x01weights"


def test_failed_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out" / "file.parquet"

    storage.write_bytes(str(target), b"old content")
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), object())  # fails while writing
    assert target.read_bytes() == b"old content"  # the previous complete file survives
    assert [p.name for p in target.parent.iterdir()] == ["file.parquet"]  # no temp file left behind


def test_reader_never_sees_half_written_table_locally(tmp_path, monkeypatch):
    """Kill the write between the temp file and the rename: the final name must not exist."""
    target = tmp_path / "t" / "part-00000.parquet"

    def crash(src, dst):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.write_table(pa.table({"v": [1, 2, 3]}), str(target))
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_transient_s3_faults_are_retried_and_leave_whole_objects(s3_bucket, s3_endpoint, monkeypatch):
    """503 SlowDown, connection resets and truncated bodies between us and S3 (a fault proxy in front of moto's
    server): every operation retries until it succeeds, with the same bytes, and no partial object is visible."""
    from s3_faults import FaultProxy

    root = f"s3://{s3_bucket}/faults"
    t = pa.table({"v": np.arange(10_000, dtype=np.int64)})
    blob = os.urandom(300_000)
    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proxy.plan = [("PUT", "/faults/blob.bin", "503"), ("PUT", "/faults/blob.bin", "reset"),
                      ("PUT", "/faults/t/part-00000.parquet", "503")]
        storage.write_bytes(f"{root}/blob.bin", blob)
        storage.write_table(t, f"{root}/t/part-00000.parquet")
        proxy.plan = [("GET", "/faults/blob.bin", "truncate"), ("GET", "/faults/blob.bin", "503"),
                      ("GET", "/faults/blob.bin", "reset"), ("GET", "list-type", "503"),
                      ("GET", "/faults/t/part-00000.parquet", "truncate"), ("HEAD", "/faults/t", "503")]
        assert storage.read_bytes(f"{root}/blob.bin") == blob
        assert storage.listdir(root) == ["blob.bin", "t"]
        assert storage.read_table(f"{root}/t").equals(t)
        assert not proxy.plan, f"faults not reached: {proxy.plan}"
        assert len(proxy.faults()) == 9
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # straight to S3: the objects are whole
    assert storage.read_bytes(f"{root}/blob.bin") == blob


def test_persistent_s3_failure_names_the_path_and_leaves_the_object(s3_bucket, s3_endpoint, monkeypatch):
    """An endpoint that keeps answering 503: the retries give up and the error names the path; the object that
    was there before is untouched."""
    from s3_faults import FaultProxy

    path = f"s3://{s3_bucket}/keep/a.bin"
    storage.write_bytes(path, b"before")
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 3)  # fewer backoff waits; the count is what is checked
    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proxy.plan = [("PUT", "/keep/a.bin", "503")] * 50
        with pytest.raises(StorageError) as e:
            storage.write_bytes(path, b"after")
        assert str(e.value).startswith(f"{path}: write failed: ") and "SLOW_DOWN" in str(e.value)
        assert "\n" not in str(e.value)
        assert sum(1 for m, p, f in proxy.log if m == "PUT") == storage.S3_MAX_ATTEMPTS  # retried, then gave up
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert storage.read_bytes(path) == b"before"
