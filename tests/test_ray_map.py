"""raydseg.ray_map on a real local Ray cluster (2 CPUs): the in-flight bound, results in call order for a feed,
stopping what runs when a call fails, an actor pool's size and its constructor's error."""
import os
import time

import pytest

from raydseg.ray_map import map_actors, map_tasks

pytestmark = pytest.mark.ray


def _record(log_dir, i):
    open(os.path.join(log_dir, str(i)), "w").close()
    return i


def test_tasks_stay_within_the_in_flight_bound_and_every_result_comes_back(ray_local, tmp_path):
    """With one call in flight, the next is submitted only once the caller has taken the previous result: while it
    holds the first, no other call starts. Without the bound, all are submitted at once and the others run."""
    calls = [(str(tmp_path / "bound"), i) for i in range(3)]
    os.mkdir(tmp_path / "bound")
    gen = map_tasks(_record, calls, {"num_cpus": 1}, max_in_flight=1)
    first = next(gen)
    time.sleep(2)
    assert os.listdir(tmp_path / "bound") == [str(first)]
    assert sorted([first, *gen]) == [0, 1, 2]

    os.mkdir(tmp_path / "free")
    gen = map_tasks(_record, [(str(tmp_path / "free"), i) for i in range(3)], {"num_cpus": 1})
    next(gen)
    deadline = time.time() + 60
    while len(os.listdir(tmp_path / "free")) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert len(os.listdir(tmp_path / "free")) >= 2
    assert len(list(gen)) == 2


def _record_later_first(log_dir, i):
    """Call i finishes (5 - i) x 0.2 s after it starts: the later calls finish first."""
    time.sleep((5 - i) * 0.2)
    return _record(log_dir, i)


def test_ordered_tasks_come_back_in_call_order_at_most_the_bound_ahead_of_the_reader(ray_local, tmp_path):
    """Results in the order of the calls although later calls finish first; while the reader holds the first
    result, only the calls within the bound (0, 1) have run; the rest run as the reader goes on."""
    gen = map_tasks(_record_later_first, [(str(tmp_path), i) for i in range(5)], {"num_cpus": 1}, max_in_flight=2,
                    ordered=True)
    assert next(gen) == 0
    time.sleep(2)
    assert sorted(os.listdir(tmp_path)) == ["0", "1"]
    assert list(gen) == [1, 2, 3, 4]


def _slow_or_failing(log_dir, i):
    """Call 1 fails once call 0 runs beside it; call 0 would write `wrote-0` 3 s after call 1 started."""
    started = os.path.join(log_dir, "started-1")
    if i == 1:
        open(started, "w").close()
        time.sleep(0.5)
        raise ValueError("call 1 failed")
    deadline = time.time() + 60
    while not os.path.exists(started) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(3)
    open(os.path.join(log_dir, "wrote-0"), "w").close()


def test_a_failing_call_ends_the_map_and_stops_the_calls_still_running(ray_local, tmp_path):
    with pytest.raises(ValueError, match="call 1 failed"):
        list(map_tasks(_slow_or_failing, [(str(tmp_path), 0), (str(tmp_path), 1)], {"num_cpus": 1}))
    time.sleep(5)  # past the slow call's end, had it gone on
    assert (tmp_path / "started-1").exists() and not (tmp_path / "wrote-0").exists()


class _Pid:
    """An actor's model: records its process in `log_dir` when built."""

    def __init__(self, log_dir="", fail=False):
        if fail:
            raise RuntimeError("model weights missing")
        self.pid, self.log_dir = os.getpid(), log_dir
        open(os.path.join(log_dir, f"actor-{self.pid}"), "w").close()


def _pid_once_two_actors_are_up(obj, i):
    deadline = time.time() + 60
    while len(os.listdir(obj.log_dir)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    return obj.pid


def test_actor_pool_grows_to_the_free_cpus_and_a_constructor_error_ends_the_map(ray_local, tmp_path):
    pids = list(map_actors(_Pid, {"log_dir": str(tmp_path)}, _pid_once_two_actors_are_up, [(i,) for i in range(6)],
                           {"num_cpus": 1}, (1, 4)))
    assert len(pids) == 6 and len(set(pids)) == 2  # (1, 4) on 2 CPUs: two actors, one model each
    import ray.exceptions

    with pytest.raises(ray.exceptions.RayActorError, match="model weights missing"):  # not restarted: it ends
        list(map_actors(_Pid, {"fail": True}, _pid_once_two_actors_are_up, [(0,)], {"num_cpus": 1}, (1, 1)))
