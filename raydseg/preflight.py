"""Preflight: does every stage's worker request fit some node type of the cluster it will run on?

`raydseg preflight --config C --cluster Y` holds the requests of `raydseg.stage_requests` (CPU, GPU, memory, the
custom node-type resources; how many must run at once) against the node types of a Ray cluster launcher YAML
(AWS: CPU / GPU / memory from `INSTANCE_TYPES` or the node type's explicit `resources`) or a KubeRay RayCluster /
RayJob (through Ray's own translation of the custom resource, the one KubeRay's autoscaler uses:
rayStartParams num-cpus / num-gpus / memory / resources, else the container limits). `check_connected` does the
same at pipeline start-up against the cluster Ray is connected to: its alive nodes plus the autoscaler's node
groups when the autoscaler has published them. A request that can never be scheduled would otherwise wait forever.

Each impossible request is one problem line naming the stage and the config key to change; they are raised
together as a ConfigError (the CLI prints `error: ...` lines and exits 2).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from raydseg.config import Config, load_config
from raydseg.errors import ConfigError, InputError
from raydseg.stage_requests import WorkerRequest, stage_requests

GiB = 2**30
# AWS instance types of cluster/aws.yaml and their usual alternatives: (vCPUs, GPUs, memory GiB)
INSTANCE_TYPES: dict[str, tuple[int, int, int]] = {
    "m6i.2xlarge": (8, 0, 32),
    "m6i.4xlarge": (16, 0, 64),
    "m6i.8xlarge": (32, 0, 128),
    "c6i.4xlarge": (16, 0, 32),
    "g5.xlarge": (4, 1, 16),
    "g5.2xlarge": (8, 1, 32),
    "g5.12xlarge": (48, 4, 192),
    "g5.48xlarge": (192, 8, 768),
    "g6.2xlarge": (8, 1, 32),
    "p4d.24xlarge": (96, 8, 1152),
    "p5.48xlarge": (192, 8, 2048),
}
RAY_MEMORY_FRACTION = 0.7  # Ray's `memory` resource: system memory less the object store's default 30 %
UNBOUNDED = -1  # max_workers of a node group without a limit


@dataclass(frozen=True)
class NodeType:
    """One kind of node a cluster has or can launch: Ray resources per node, and at most `max_workers` of them."""

    name: str
    resources: dict[str, float]
    max_workers: int = 1  # UNBOUNDED (-1) = no limit

    def describe(self) -> str:
        shown = []
        for k in ("CPU", "GPU"):
            shown.append(f"{self.resources.get(k, 0):g} {k}")
        shown += sorted(k for k in self.resources if k not in ("CPU", "GPU", "memory", "object_store_memory"))
        return f"{self.name}: {', '.join(shown)}"


# ----------------------------------------------------------------------------------------------- cluster files


def aws_node_types(doc: dict[str, Any], where: str = "cluster file") -> list[NodeType]:
    """Node types of a Ray cluster launcher YAML: explicit `resources` win over the instance type's table row."""
    out = []
    cap = doc.get("max_workers", UNBOUNDED)
    for name, t in (doc.get("available_node_types") or {}).items():
        explicit = {k: float(v) for k, v in (t.get("resources") or {}).items()}
        itype = (t.get("node_config") or {}).get("InstanceType", "")
        res: dict[str, float] = {}
        if itype in INSTANCE_TYPES:
            cpus, gpus, mem = INSTANCE_TYPES[itype]
            res = {"CPU": float(cpus), "GPU": float(gpus), "memory": RAY_MEMORY_FRACTION * mem * GiB}
        elif not {"CPU", "GPU"} <= set(explicit):
            raise InputError(f"{where}: node type '{name}' has instance type '{itype}', which raydseg.preflight "
                             f"does not know: give its CPU and GPU under `resources`, or add it to INSTANCE_TYPES")
        res.update(explicit)
        if name == doc.get("head_node_type"):
            n = 1
        else:
            n = int(t.get("max_workers", cap))
            n = n if cap == UNBOUNDED else min(n, int(cap))
        out.append(NodeType(name, res, n))
    return out


def kuberay_node_types(spec: dict[str, Any], name: str = "raydseg") -> list[NodeType]:
    """Node types of a RayCluster spec (also a RayJob's rayClusterSpec), as KubeRay's autoscaler derives them."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
          "metadata": {"name": name, "namespace": "default"}, "spec": copy.deepcopy(spec)}
    cfg = _derive_autoscaling_config_from_ray_cr(cr)
    head = cfg.get("head_node_type")
    return [NodeType(n, {k: float(v) for k, v in t.get("resources", {}).items()},
                     1 if n == head else int(t.get("max_workers", UNBOUNDED)))
            for n, t in cfg["available_node_types"].items()]


def cluster_file_node_types(path: str | Path) -> list[NodeType]:
    """Node types of an AWS launcher YAML or a KubeRay RayCluster / RayJob manifest (other documents ignored)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"--cluster: {path} does not exist")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    except yaml.YAMLError as e:
        raise InputError(f"--cluster: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    for d in docs:
        if d.get("kind") == "RayCluster":
            return kuberay_node_types(d["spec"], d.get("metadata", {}).get("name", "raydseg"))
        if d.get("kind") == "RayJob":
            return kuberay_node_types(d["spec"]["rayClusterSpec"], d.get("metadata", {}).get("name", "raydseg"))
        if "available_node_types" in d:
            return aws_node_types(d, str(path))
    raise InputError(f"--cluster: {path} is neither a Ray cluster launcher config (available_node_types) nor a "
                     "KubeRay RayCluster / RayJob")


# ----------------------------------------------------------------------------------------------- connected cluster


def _ray_resources(res: dict[str, float]) -> dict[str, float]:
    """A node's schedulable resources without Ray's per-node markers (`node:<ip>`, accelerator_type:...)."""
    return {k: float(v) for k, v in res.items() if not k.startswith(("node:", "accelerator_type:"))}


LAUNCHER_BOOTSTRAP = Path("~/ray_bootstrap_config.yaml")  # the head's autoscaling config (Ray cluster launcher)
KUBERAY_ENV = ("KUBERAY_GEN_RAY_START_CMD", "RAY_CLUSTER_NAME")  # set by the KubeRay operator in its Ray pods


def connected_node_types() -> tuple[list[NodeType], bool]:
    """(node types, complete) of the cluster Ray is connected to.

    Node types: every alive node, plus the node groups the autoscaler may launch. `complete` is False when an
    autoscaler may launch nodes of types this process cannot read: on a KubeRay pod (the operator's autoscaler reads
    the RayCluster from the Kubernetes API) without a published cluster config. Then a request that fits no known
    node type may still be served by a node group the autoscaler knows.
    """
    import ray

    alive = [NodeType(f"node {n.get('NodeManagerAddress', '?')}", _ray_resources(n.get("Resources", {})), 1)
             for n in ray.nodes() if n.get("Alive")]
    groups = autoscaler_node_groups()
    complete = bool(groups) or not any(os.environ.get(k) for k in KUBERAY_ENV)
    return alive + groups, complete


def autoscaler_node_groups() -> list[NodeType]:
    """Node groups the autoscaler may launch: the cluster config it published in the GCS, else the launcher's
    bootstrap config on this machine (the driver of `ray job submit` runs on the head); [] when neither exists (a
    local or fixed-size cluster)."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no GCS autoscaler state: a local or fixed-size cluster
        config = None
    if config and config.node_group_configs:
        return [NodeType(f"node group {g.name}", {k: float(v) for k, v in g.resources.items()},
                         int(g.max_count) if g.max_count >= 0 else UNBOUNDED)
                for g in config.node_group_configs if g.max_count != 0]
    bootstrap = LAUNCHER_BOOTSTRAP.expanduser()
    if bootstrap.is_file():
        return [NodeType(f"node type {n.name}", n.resources, n.max_workers)
                for n in cluster_file_node_types(bootstrap)]
    return []


# ----------------------------------------------------------------------------------------------- the check


def fits(req: WorkerRequest, node: NodeType) -> bool:
    return all(node.resources.get(r, 0.0) + 1e-9 >= amt for r, amt in req.resources.items() if amt > 0)


def per_node(req: WorkerRequest, node: NodeType) -> float:
    """How many of `req` one node of this type holds at once (inf when the request asks for nothing)."""
    counts = [math.floor(node.resources.get(r, 0.0) / amt + 1e-9) for r, amt in req.resources.items() if amt > 0]
    return float(min(counts)) if counts else math.inf


def capacity(req: WorkerRequest, nodes: list[NodeType]) -> float:
    """How many of `req` the cluster can run at once at its largest size (inf for unbounded node groups)."""
    total = 0.0
    for n in nodes:
        k = per_node(req, n)
        if k > 0:
            total += math.inf if n.max_workers == UNBOUNDED else k * n.max_workers
    return total


def _culprits(req: WorkerRequest, nodes: list[NodeType]) -> list[str]:
    """The resources of `req` without which it would fit some node type (all of them when no single one does)."""
    out = []
    for r in req.resources:
        others = WorkerRequest(req.stage, req.role, {k: v for k, v in req.resources.items() if k != r})
        if any(fits(others, n) for n in nodes):
            out.append(r)
    return out or list(req.resources)


def _key_text(req: WorkerRequest, resources: list[str], cfg: Config | None) -> str:
    parts = []
    for r in resources:
        key = req.keys.get(r)
        if key is None:
            parts.append(f"{r} fixed in raydseg.stage_requests")
        elif "." in key and cfg is not None:
            section, name = key.split(".", 1)
            value = getattr(getattr(cfg, section), name)
            parts.append(f"{key}={json.dumps(value)}")
        else:
            parts.append(key)  # the node-resource environment flag
    return ", ".join(parts)


def request_problems(reqs: list[WorkerRequest], nodes: list[NodeType], where: str,
                     cfg: Config | None = None) -> list[str]:
    """One line per request that no node type of `where` can ever schedule, naming the stage and the key."""
    out = []
    shapes = "; ".join(n.describe() for n in nodes) or "no nodes"
    for req in reqs:
        if not any(fits(req, n) for n in nodes):
            keys = _key_text(req, _culprits(req, nodes), cfg)
            out.append(f"{req.stage}: one {req.role} asks for {req.describe()} ({keys}), but no node type of "
                       f"{where} has that much ({shapes})")
            continue
        can = capacity(req, nodes)
        if req.gang > can:
            out.append(f"{req.stage}: {req.gang} {req.role}s must run at once ({req.gang_key}={req.gang}), each "
                       f"{req.describe()}, but {where} holds at most {can:g} at its largest")
    return out


def stages_of(cfg: Config, stages: list[str] | None = None) -> list[str]:
    from raydseg.pipeline import STAGE_ORDER

    wanted = stages or cfg.run.stages or STAGE_ORDER
    return [s for s in STAGE_ORDER if s in wanted]


def check_cluster_file(cfg: Config, path: str | Path, stages: list[str] | None = None) -> list[WorkerRequest]:
    """Raise ConfigError when a request of `stages` cannot run on the cluster of `path`; returns the requests.
    The cluster files set RAYDSEG_NODE_RESOURCES=1, so the custom node-type resources are requested."""
    nodes = cluster_file_node_types(path)
    reqs = stage_requests(cfg, stages_of(cfg, stages), use_node_resources=True)
    problems = request_problems(reqs, nodes, str(path), cfg)
    if problems:
        raise ConfigError(problems)
    return reqs


def check_connected(cfg: Config, stages: list[str] | None = None,
                    log: Callable[[str], None] = print) -> None:
    """Raise ConfigError when a request of `stages` can never run on the cluster Ray is connected to (its alive
    nodes and the autoscaler's node types). Where the autoscaler's node types cannot be read (KubeRay), the
    problems are logged as warnings instead: `raydseg preflight --cluster` checks those before the launch."""
    nodes, complete = connected_node_types()
    reqs = stage_requests(cfg, stages_of(cfg, stages))
    problems = request_problems(reqs, nodes, "the connected Ray cluster", cfg)
    if problems and complete:
        raise ConfigError(problems)
    for p in problems:
        log(f"warning: {p} (the autoscaler's node types are unknown here: it may still launch a node that fits)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raydseg preflight", description=(
        "Check that every stage's worker request (CPU, GPU, memory, node-type resources) fits a node type of a "
        "cluster file (AWS launcher YAML or KubeRay RayCluster / RayJob) before launching anything."))
    p.add_argument("--config", default=None, help="YAML config (default: the packaged default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")
    p.add_argument("--cluster", required=True, help="cluster/aws.yaml or cluster/kuberay/{raycluster,rayjob}.yaml")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    reqs = check_cluster_file(cfg, args.cluster)
    nodes = cluster_file_node_types(args.cluster)
    print(f"preflight: every worker request fits {args.cluster}")
    for req in reqs:
        where = ", ".join(n.name for n in nodes if fits(req, n))
        gang = f" x{req.gang} at once" if req.gang > 1 else ""
        print(f"  {req.stage:9s} {req.role:20s} {req.describe()}{gang}  -> {where}")
    return 0
