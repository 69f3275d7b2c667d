"""Plain Ray tasks or a Ray actor pool over a list of calls, results streamed back as they finish (or in order).

The stages' part-wise maps (raydseg.parts), ingest's shards, evaluation's inference batches and the training feed's
micro-batches (raydseg.train.feed) run here. Ray's own retries cover a lost worker or node: a task is retried up to
`RETRIES` times (`max_retries`), a dead actor is restarted (`max_restarts`) and its call retried
(`max_task_retries`). An exception raised by the called code is not retried: it ends the map, and the calls still
running are stopped before it propagates, so that nothing is written after the map has returned.
"""
from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterable, Iterator

RETRIES = 3  # system-failure retries of a task, restarts of an actor, retries of an actor's call (Ray's task default)
MAX_IN_FLIGHT = 256  # tasks submitted at once: a long list of calls is fed to Ray as earlier ones finish


def _reap(refs: list, cancel: bool) -> None:
    """Stop the calls behind `refs` (tasks: cancelled, their worker killed) and collect their outcomes, which Ray
    would otherwise print with a traceback when an uncollected error is dropped."""
    import ray

    if cancel:
        for ref in refs:
            ray.cancel(ref, force=True)
    for ref in refs:
        try:
            ray.get(ref, timeout=60)
        except Exception:  # noqa: BLE001 - cancelled / killed on purpose
            pass


def map_tasks(fn: Callable, calls: Iterable[tuple], options: dict[str, Any], max_in_flight: int = MAX_IN_FLIGHT,
              ordered: bool = False) -> Iterator[Any]:
    """Run `fn(*args)` for each `args` of `calls` as a Ray task with `options` (num_cpus, num_gpus, memory,
    resources), at most `max_in_flight` submitted at once; yields the results in the order they finish, or with
    `ordered` in the order of `calls` (a stream read in order, a training feed: at most `max_in_flight` calls ahead of
    the reader, which bounds the results held in the object store)."""
    import ray

    task = ray.remote(fn).options(max_retries=RETRIES, **options)
    queue = iter(calls)
    running: list = []
    try:
        while True:
            running += [task.remote(*args) for args in itertools.islice(queue, max_in_flight - len(running))]
            if not running:
                return
            if ordered:
                done = running.pop(0)
            else:
                [done], running = ray.wait(running, num_returns=1)
            yield ray.get(done)
    finally:  # an error or the caller stopped early: end what still runs
        _reap(running, cancel=True)


class _Host:
    """One pool actor: builds `cls(**kwargs)` once, then runs `call(obj, *args)` per call."""

    def __init__(self, cls: type, kwargs: dict[str, Any], call: Callable):
        self.obj, self.call = cls(**kwargs), call

    def ready(self) -> bool:
        return True

    def run(self, *args: Any) -> Any:
        return self.call(self.obj, *args)


def _fitting(options: dict[str, Any]) -> int:
    """How many actors with `options` the cluster's free resources hold now."""
    import ray

    need = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0), "memory": options.get("memory", 0),
            **(options.get("resources") or {})}
    free = ray.available_resources()
    return min((int(free.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v), default=MAX_IN_FLIGHT)


def map_actors(cls: type, kwargs: dict[str, Any], call: Callable, calls: Iterable[tuple], options: dict[str, Any],
               pool: tuple[int, int]) -> Iterator[Any]:
    """Run `call(obj, *args)` for each `args` of `calls` on a pool of Ray actors, each holding one `obj =
    cls(**kwargs)` (a model, built once per actor) and running one call at a time; yields results as they finish.

    `pool=(min, max)`: `min` actors are started at once, then more (up to `max`, never more than calls) whenever
    the cluster has room for them and calls wait. A call goes to the first actor that is up and free.
    """
    import ray

    queue = collections.deque(calls)
    lo, hi = max(1, min(pool[0], pool[1])), max(1, min(pool[1], len(queue)))
    host = ray.remote(_Host).options(max_restarts=RETRIES, max_task_retries=RETRIES, **options)
    actors: list = []
    starting: dict = {}  # ready() ref -> actor, until the actor's constructor has run
    running: dict = {}  # call ref -> actor
    idle: list = []

    def grow(n: int) -> None:
        for _ in range(max(0, min(n, hi - len(actors)))):
            actor = host.remote(cls, kwargs, call)
            actors.append(actor)
            starting[actor.ready.remote()] = actor

    try:
        if queue:
            grow(max(lo, _fitting(options)))
        while queue or running:
            while idle and queue:
                actor = idle.pop()
                running[actor.run.remote(*queue.popleft())] = actor
            if queue and not starting and len(actors) < hi:
                grow(min(len(queue), _fitting(options)))
            [ref], _ = ray.wait([*running, *starting], num_returns=1)
            if ref in starting:
                ray.get(ref)  # the constructor's error, if it raised
                idle.append(starting.pop(ref))
                continue
            result = ray.get(ref)
            idle.append(running.pop(ref))
            yield result
    finally:
        for actor in actors:
            ray.kill(actor)
        _reap([*running, *starting], cancel=False)
