"""What one Ray worker of each stage asks the scheduler for: the single home of the stages' resource requests.

Every stage builds its `map_batches` / `ray.remote` / `ScalingConfig` arguments from the `WorkerRequest` of this
module, and `raydseg.preflight` holds the same requests against a cluster's node types, so that the check and the
run cannot drift apart. A request names, per resource, the config key that sets it, so an impossible request is
reported by the key the user can change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raydseg.config import Config
from raydseg.resources import ENV_FLAG, for_gpus, node_resources

GEOMETRY_TASK_CPUS = 1.0  # ingest / proposals / pseudo-label tasks: single-threaded numba + open3d kernels
KMEANS_ACTOR_CPUS = 1.0  # one k-means shard actor (faiss search, one-hot sums)
EVAL_ACTOR_CPUS = 1.0  # one evaluation actor (image decoding beside the forward)
AUGMENT_TASK_CPUS = 1.0  # a Ray task decoding + augmenting a micro-batch of training views (raydseg/train/data.py)


@dataclass(frozen=True)
class WorkerRequest:
    """The resources one task / actor / Ray Train worker of a stage requests.

    Attributes:
        stage: pipeline stage name (raydseg.pipeline.STAGE_ORDER).
        role: what the worker is, in words ("feature actor", "train worker").
        resources: Ray resource name -> amount per worker: "CPU", "GPU" (counts), "memory" (bytes) and the
            custom node-type resources of raydseg.resources.
        keys: resource name -> the config key (or environment flag) that sets it; absent = fixed in raydseg.
        gang: how many such workers must be placed at the same time (Ray Train's placement group, the k-means
            shard actors, which all hold a shard before the first iteration); 1 for task and actor pools.
        gang_key: the config key that sets `gang`.
    """

    stage: str
    role: str
    resources: dict[str, float]
    keys: dict[str, str] = field(default_factory=dict)
    gang: int = 1
    gang_key: str = ""

    @property
    def cpus(self) -> float:
        return float(self.resources.get("CPU", 0.0))

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0.0))

    @property
    def memory(self) -> float:
        return float(self.resources.get("memory", 0.0))

    @property
    def custom(self) -> dict[str, float]:
        return {k: v for k, v in self.resources.items() if k not in ("CPU", "GPU", "memory")}

    def ray_options(self) -> dict[str, Any]:
        """`num_cpus`, `num_gpus`, `memory`, `resources` for `ray.remote(...).options` / `map_batches`; absent
        entries (None) are left out so that Ray's defaults apply."""
        opts = {"num_cpus": self.cpus, "num_gpus": self.gpus or None, "memory": self.memory or None,
                "resources": self.custom or None}
        return {k: v for k, v in opts.items() if v is not None}

    def describe(self) -> str:
        """`8 CPU + 1 GPU + 0.001 gpu_worker` (memory in GiB)."""
        parts = []
        for name, amount in self.resources.items():
            shown = f"{amount / 2**30:g} GiB" if name == "memory" else f"{amount:g}"
            parts.append(f"{shown} {name}")
        return " + ".join(parts) or "nothing"


def _node(kind: str, use_node_resources: bool | None, key_of: dict[str, str]) -> dict[str, float]:
    res = node_resources(kind, use_node_resources=use_node_resources)
    key_of.update({name: ENV_FLAG for name in res})
    return res


def _gpu_node(num_gpus: float, use_node_resources: bool | None, key_of: dict[str, str]) -> dict[str, float]:
    res = for_gpus(num_gpus, use_node_resources=use_node_resources)
    key_of.update({name: ENV_FLAG for name in res})
    return res


def ingest(cfg: Config, use_node_resources: bool | None = None) -> WorkerRequest:
    keys: dict[str, str] = {}
    res = {"CPU": GEOMETRY_TASK_CPUS, **_node("cpu", use_node_resources, keys)}
    return WorkerRequest("ingest", "ingest task", res, keys)


def proposals(cfg: Config, use_node_resources: bool | None = None) -> WorkerRequest:
    keys: dict[str, str] = {}
    res = {"CPU": GEOMETRY_TASK_CPUS, **_node("cpu", use_node_resources, keys)}
    return WorkerRequest("proposals", "proposals task", res, keys)


def features(cfg: Config, use_node_resources: bool | None = None) -> WorkerRequest:
    f = cfg.features
    keys = {"CPU": "features.cpus_per_actor", "GPU": "features.num_gpus"}
    res = {"CPU": f.cpus_per_actor, "GPU": f.num_gpus, **_gpu_node(f.num_gpus, use_node_resources, keys)}
    return WorkerRequest("features", "feature actor", _drop_zero_gpu(res), keys)


def kmeans(cfg: Config, use_node_resources: bool | None = None) -> WorkerRequest:
    c = cfg.cluster
    keys = {"GPU": "cluster.num_gpus"}
    res = {"CPU": KMEANS_ACTOR_CPUS, "GPU": c.num_gpus, **_gpu_node(c.num_gpus, use_node_resources, keys)}
    return WorkerRequest("cluster", "k-means shard actor", _drop_zero_gpu(res), keys, gang=c.n_actors,
                         gang_key="cluster.n_actors")


def pseudolabels(cfg: Config, use_node_resources: bool | None = None) -> WorkerRequest:
    keys: dict[str, str] = {}
    res = {"CPU": GEOMETRY_TASK_CPUS, **_node("cpu", use_node_resources, keys)}
    return WorkerRequest("cluster", "pseudo-label task", res, keys)


def train_worker(cfg: Config, stage: str, use_node_resources: bool | None = None) -> WorkerRequest:
    """One Ray Train worker of `stage` (pretrain, teacher or student): cpus_per_worker, one GPU when use_gpu."""
    return train_worker_for(getattr(cfg, stage), stage, use_node_resources)


def train_worker_for(t: Any, stage: str, use_node_resources: bool | None = None) -> WorkerRequest:
    """`train_worker` from the stage's config section `t` (a raydseg.config.TrainConfig)."""
    keys = {"CPU": f"{stage}.cpus_per_worker", "GPU": f"{stage}.use_gpu"}
    res = {"CPU": t.cpus_per_worker, "GPU": float(t.use_gpu),
           **_gpu_node(float(t.use_gpu), use_node_resources, keys)}
    return WorkerRequest(stage, "train worker", _drop_zero_gpu(res), keys, gang=t.num_workers,
                         gang_key=f"{stage}.num_workers")


def augment_task(cfg: Config, stage: str) -> WorkerRequest:
    """A Ray task that decodes and augments a micro-batch of the training views of `stage` (any node with a CPU)."""
    return WorkerRequest(stage, "augmentation task", {"CPU": AUGMENT_TASK_CPUS})


def evaluate(cfg: Config, use_node_resources: bool | None = None) -> WorkerRequest:
    e = cfg.eval
    keys = {"GPU": "eval.num_gpus"}
    res = {"CPU": EVAL_ACTOR_CPUS, "GPU": e.num_gpus, **_gpu_node(e.num_gpus, use_node_resources, keys)}
    return WorkerRequest("evaluate", "inference actor", _drop_zero_gpu(res), keys)


def _drop_zero_gpu(res: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in res.items() if not (k == "GPU" and not v)}


def stage_requests(cfg: Config, stages: list[str], use_node_resources: bool | None = None) -> list[WorkerRequest]:
    """Every worker request of `stages` (pipeline order), as the stages will make them."""
    out: list[WorkerRequest] = []
    for s in stages:
        if s == "ingest":
            out.append(ingest(cfg, use_node_resources))
        elif s == "proposals":
            out.append(proposals(cfg, use_node_resources))
        elif s == "features":
            out.append(features(cfg, use_node_resources))
        elif s == "cluster":
            out += [kmeans(cfg, use_node_resources), pseudolabels(cfg, use_node_resources)]
        elif s in ("pretrain", "teacher", "student"):
            out += [train_worker(cfg, s, use_node_resources), augment_task(cfg, s)]
        elif s == "evaluate":
            out.append(evaluate(cfg, use_node_resources))
    return out
