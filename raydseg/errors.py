"""User errors: a problem with what the user gave (config, paths, data), as opposed to a bug in raydseg.

Every entry point prints a user error as `error: ...` lines without a traceback and exits with status 2
(`raydseg.cli.guarded`); any other exception is internal and keeps its traceback.
"""
from __future__ import annotations

import re
import sys


class UserError(Exception):
    """One or more problems, each a line that names the key or path at fault."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(UserError, ValueError):
    """A config file or override names an unknown key, gives a value of the wrong type or out of range, or breaks a
    rule between fields."""


class InputError(UserError):
    """An input path is missing, unreadable or holds nothing usable (no frames, no shards, no images)."""


class StorageError(UserError, OSError):
    """A storage operation failed for good (after S3's retries): permission, missing bucket, endpoint down, disk
    full. Its line names the path."""


def _causes(exc: BaseException):
    """exc, then what it wraps: Ray's task errors keep the original in `.cause`, Ray Data's and Ray Train's user-code
    errors in `__cause__`."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__


_REMOTE = re.compile(r"^raydseg\.errors\.(\w+): (.+)$", re.M)


def user_error(exc: BaseException) -> UserError | None:
    """The user error in `exc` or what it wraps, also one raised in a Ray task (Ray's error poses as an instance of
    its cause's class: the cause itself is taken) or where Ray kept only the traceback text of the original (Ray
    Data, Ray Train: the cause chain is not pickled); None for anything else."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    wrapper = ray_exceptions.RayError if ray_exceptions is not None else ()
    for e in _causes(exc):
        if isinstance(e, UserError) and not isinstance(e, wrapper):
            return e
    found = _REMOTE.search(str(exc))
    cls = getattr(sys.modules[__name__], found.group(1), None) if found else None
    if isinstance(cls, type) and issubclass(cls, UserError):
        return cls(found.group(2).strip())
    return None


def user_problems(exc: BaseException) -> list[str] | None:
    """The problem lines of a user error, also of one that Ray re-raised around its cause; None for anything else."""
    e = user_error(exc)
    return list(e.problems) if e is not None else None


def in_stage(stage: str, exc: BaseException) -> UserError | None:
    """A stage's failure that the user can act on, with the stage named on each line: a user error (also one Ray
    re-raised around its cause; a StorageError stays one, e.g. a full disk naming the part's path) or a worker
    killed for lack of memory. None for anything else (a bug: keep its traceback)."""
    found = user_error(exc)
    if found is not None:
        return type(found)([f"stage '{stage}': {p}" for p in found.problems])
    ray_exceptions = sys.modules.get("ray.exceptions")  # loaded whenever a Ray worker could have run out of memory
    if ray_exceptions is not None and any(isinstance(e, ray_exceptions.OutOfMemoryError) for e in _causes(exc)):
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        return UserError(f"stage '{stage}': a worker ran out of memory ({first}); give its workers more memory or "
                         f"smaller batches and rerun: finished parts are kept")
    return None
