"""Custom Ray resources that tie stages to cluster node types (one place for the names; cluster/ YAML must agree).

The cluster configs (`cluster/aws.yaml`, `cluster/kuberay/*.yaml`) give each worker node type a custom resource
with a large capacity (`NODE_CAPACITY`): CPU workers advertise `cpu_worker`, GPU workers `gpu_worker`; the head
advertises neither (and 0 CPUs), so no stage task runs on it. A stage that requests `TASK_AMOUNT` of a node
type's resource can only be placed on that node type, so the autoscaler launches the right nodes, while the
number of concurrent tasks per node is still bounded by `num_cpus` / `num_gpus`.

Locally (`ray.init()`, no such resources) the same stages must not request them, or their tasks would wait
forever. The cluster files set `RAYDSEG_NODE_RESOURCES=1` in every container (`ENV_FLAG`), so a driver started
by `ray job submit` on such a cluster turns them on by itself, and the same config runs locally and on a cluster.
`tests/test_cluster_configs.py` checks that the cluster files and these constants agree. The stages' requests
(these resources with CPU / GPU) are built in `raydseg/stage_requests.py`, and `raydseg/preflight.py` holds them
against the node types of the cluster files and of the running cluster.
"""
from __future__ import annotations

import os

CPU_WORKER_RESOURCE = "cpu_worker"  # geometry stages (ingest, proposals, cluster): CPU spot nodes
GPU_WORKER_RESOURCE = "gpu_worker"  # features, teacher, student, evaluate: GPU nodes
NODE_CAPACITY = 1000  # units of its custom resource each worker node advertises (integer: Ray's schema)
TASK_AMOUNT = 0.001  # units one task / actor / train worker requests (Ray's resource precision is 1e-4)

NODE_KINDS = {"cpu": CPU_WORKER_RESOURCE, "gpu": GPU_WORKER_RESOURCE}
ENV_FLAG = "RAYDSEG_NODE_RESOURCES"  # "1" in the containers of cluster/aws.yaml and cluster/kuberay/*.yaml


def node_resources_enabled() -> bool:
    """True when this process runs on a cluster made from `cluster/` (its containers set RAYDSEG_NODE_RESOURCES=1)."""
    return os.environ.get(ENV_FLAG, "0").strip().lower() in ("1", "true", "yes")


def node_resources(kind: str, *, use_node_resources: bool | None = None) -> dict[str, float]:
    """Custom resources a task of `kind` ("cpu" or "gpu") must request.

    Args:
        kind: "cpu" for the geometry stages, "gpu" for features / training / inference.
        use_node_resources: True on a cluster launched from `cluster/` (the node types advertise these
            resources); False for a local Ray (returns {} so tasks fit a plain `ray.init()`); None (default):
            `node_resources_enabled()`, i.e. the RAYDSEG_NODE_RESOURCES flag the cluster files set.

    Returns:
        e.g. `{"cpu_worker": 0.001}`, to pass as `resources=` to `ray.remote`, `map_batches` or
        `ScalingConfig(resources_per_worker=...)` (merged with CPU / GPU there).
    """
    if kind not in NODE_KINDS:
        raise ValueError(f"unknown node kind {kind!r}; expected one of {sorted(NODE_KINDS)}")
    if use_node_resources is None:
        use_node_resources = node_resources_enabled()
    if not use_node_resources:
        return {}
    return {NODE_KINDS[kind]: TASK_AMOUNT}


def for_gpus(num_gpus: float, *, use_node_resources: bool | None = None) -> dict[str, float]:
    """Custom resources of a task that asks for `num_gpus`: GPU nodes when it uses a GPU, CPU nodes otherwise."""
    return node_resources("gpu" if num_gpus > 0 else "cpu", use_node_resources=use_node_resources)
