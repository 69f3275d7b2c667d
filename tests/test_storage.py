import os

import numpy as np
import pyarrow as pa
import pytest

from raydseg import storage


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
