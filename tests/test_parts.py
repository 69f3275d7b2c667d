"""map_parts on a real local Ray cluster: outputs per part, resume after a crash redoes only unfinished parts."""
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from raydseg import storage
from raydseg.parts import map_parts

pytestmark = pytest.mark.ray


def _inputs(root, n=4):
    for i in range(n):
        storage.write_table(pa.table({"x": np.arange(3) + 10 * i}), storage.join(root, "in", f"part-{i:05d}.parquet"))


def _doubler(log_dir, fail_on=None):
    def fn(table):
        first = int(table.column("x")[0].as_py())
        if fail_on is not None and first == fail_on and not os.path.exists(os.path.join(log_dir, "failed-once")):
            open(os.path.join(log_dir, "failed-once"), "w").close()
            raise RuntimeError("injected failure")
        open(os.path.join(log_dir, f"ran-{first}"), "a").write("x")
        out = pa.table({"y": pa.array(table.column("x").to_numpy() * 2)})
        rejects = [{"id": f"row{first}", "reason": "odd part"}] if first % 20 == 10 else []
        return {"": out, "extra": out.slice(0, 1)}, rejects
    return fn


def test_map_parts_writes_aligned_parts_and_resumes(ray_local, tmp_path):
    root = str(tmp_path)
    _inputs(root)
    logs = tmp_path / "logs"
    logs.mkdir()
    with pytest.raises(Exception, match="injected failure"):
        map_parts(storage.join(root, "in"), storage.join(root, "out"), _doubler(str(logs), fail_on=20))
    # a part counts as done once its marker is written; a task cut off by the abort after its fn ran but before its
    # marker may run again (its output was never committed)
    marked = set(storage.listdir(storage.join(root, "out", "_parts")) if storage.exists(
        storage.join(root, "out", "_parts")) else [])
    assert "part-00002.parquet.json" not in marked and not (logs / "ran-20").exists()
    assert marked, "part 2 starts only when a slot of the 2 CPUs frees: some part had finished"
    assert not storage.exists(storage.join(root, "out", "part-00002.parquet"))  # nothing half-written

    result = map_parts(storage.join(root, "in"), storage.join(root, "out"), _doubler(str(logs), fail_on=20))
    # every part ran; a part marked done in the first attempt was not run again
    assert sorted(p.name for p in logs.iterdir() if p.name.startswith("ran-")) == [f"ran-{i}" for i in (0, 10, 20, 30)]
    assert all((logs / f"ran-{10 * int(m[5:10])}").read_text() == "x" for m in marked)
    assert result.counts["parts"] == 4 and result.counts["parts_resumed"] == len(marked)
    assert result.counts["rows_in"] == 12 and result.counts["rows_out"] == 12 and result.counts["rows_out_extra"] == 4
    assert sorted(r["id"] for r in result.rejects) == ["row10", "row30"]
    out = storage.read_table(storage.join(root, "out"))
    assert sorted(out.column("y").to_pylist()) == sorted(2 * v for i in range(4) for v in np.arange(3) + 10 * i)
    assert storage.listdir(storage.join(root, "out", "extra")) == [f"part-{i:05d}.parquet" for i in range(4)]


class Offset:
    """An actor-pool callable: its constructor runs once per actor."""

    def __init__(self, offset):
        self.offset = offset
        self.pid = os.getpid()

    def __call__(self, table):
        return {"": pa.table({"y": pa.array(table.column("x").to_numpy() + self.offset),
                              "pid": pa.array([self.pid] * table.num_rows)})}, []


def test_map_parts_actor_pool(ray_local, tmp_path):
    root = str(tmp_path)
    _inputs(root)
    result = map_parts(storage.join(root, "in"), storage.join(root, "out"), Offset,
                       fn_constructor_kwargs={"offset": 100}, actor_pool=(1, 1))
    out = storage.read_table(storage.join(root, "out"))
    assert result.counts["rows_out"] == 12
    assert sorted(out.column("y").to_pylist()) == sorted(100 + v for i in range(4) for v in np.arange(3) + 10 * i)
    assert len(set(out.column("pid").to_pylist())) == 1  # one actor, model built once


def _stalls_once(log_dir, who):
    """A part function that stalls once, on the first part for which `who(first x)` names itself (its pid, its node):
    it writes that name to `log_dir/stalled` and waits to be killed under it; every part it finishes it records."""
    def fn(table):
        first = int(table.column("x")[0].as_py())
        flag = os.path.join(log_dir, "stalled")
        name = who(first)
        if name is not None and not os.path.exists(flag):
            with open(flag + ".tmp", "w") as f:
                f.write(name)
            os.replace(flag + ".tmp", flag)
            time.sleep(120)  # killed long before
        open(os.path.join(log_dir, f"ran-{first}"), "a").write("x")
        return {"": pa.table({"y": pa.array(table.column("x").to_numpy() * 2)})}, []
    return fn


def _pid_on_part(victim):
    return lambda first: str(os.getpid()) if first == victim else None


class KilledOnce:
    """The actor-pool form of `_stalls_once(log_dir, _pid_on_part(victim))` (features, evaluate: a model per actor)."""

    def __init__(self, log_dir, victim):
        self.fn = _stalls_once(log_dir, _pid_on_part(victim))

    def __call__(self, table):
        return self.fn(table)


def _when_stalled(log_dir, act):
    """A thread that calls `act(name)` with what `_stalls_once` wrote, as soon as it has."""
    def wait():
        flag = os.path.join(log_dir, "stalled")
        deadline = time.time() + 120
        while not os.path.exists(flag):
            if time.time() > deadline:
                return
            time.sleep(0.05)
        act(open(flag).read())
    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def _assert_every_part_doubled(root, result):
    assert result.counts["parts"] == 4 and result.counts["rows_out"] == 12
    out = storage.read_table(storage.join(root, "out"))
    assert sorted(out.column("y").to_pylist()) == sorted(2 * v for i in range(4) for v in np.arange(3) + 10 * i)


@pytest.mark.parametrize("pool", [False, True], ids=["task", "actor_pool"])
def test_a_sigkilled_worker_is_replaced_and_the_stage_finishes_with_every_part(ray_local, tmp_path, pool):
    """Ray retries the task of a worker killed mid-part (task retries; an actor is restarted, its call retried); the map
    finishes within the same call, and its outputs equal an unkilled run's."""
    root = str(tmp_path)
    _inputs(root)
    logs = tmp_path / "logs"
    logs.mkdir()
    killer = _when_stalled(str(logs), lambda pid: os.kill(int(pid), signal.SIGKILL))
    if pool:
        result = map_parts(storage.join(root, "in"), storage.join(root, "out"), KilledOnce,
                           fn_constructor_kwargs={"log_dir": str(logs), "victim": 20}, actor_pool=(1, 1))
    else:
        result = map_parts(storage.join(root, "in"), storage.join(root, "out"),
                           _stalls_once(str(logs), _pid_on_part(20)))
    killer.join(timeout=5)
    assert (logs / "stalled").exists(), "the victim part never started"
    assert sorted(p.name for p in logs.iterdir() if p.name.startswith("ran-")) == [f"ran-{i}" for i in (0, 10, 20, 30)]
    _assert_every_part_doubled(root, result)


def test_a_worker_node_removed_mid_stage_is_survived(ray_two_nodes, tmp_path):
    """`Cluster.remove_node` of the node running a part: the part is retried on the remaining node, the map
    finishes with every part."""
    import ray

    cluster = ray_two_nodes
    root = str(tmp_path)
    _inputs(root)
    logs = tmp_path / "logs"
    logs.mkdir()
    head = cluster.head_node.node_id

    def off_head(first):
        node = ray.get_runtime_context().get_node_id()
        return node if node != head else None

    remover = _when_stalled(str(logs), lambda node: cluster.remove_node(
        next(n for n in cluster.worker_nodes if n.node_id == node), allow_graceful=False))
    result = map_parts(storage.join(root, "in"), storage.join(root, "out"), _stalls_once(str(logs), off_head))
    remover.join(timeout=5)
    assert (logs / "stalled").exists() and not cluster.worker_nodes, "no part ran on the worker node"
    _assert_every_part_doubled(root, result)

