"""cluster/: the AWS launcher config passes Ray's own validation, the KubeRay manifests carry what KubeRay needs, and
both advertise exactly the custom resources the stages request (raydseg/resources.py)."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import REPO
from raydseg import resources as R

AWS = REPO / "cluster" / "aws.yaml"
RAYCLUSTER = REPO / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = REPO / "cluster" / "kuberay" / "rayjob.yaml"
MLFLOW_K8S = REPO / "cluster" / "kuberay" / "mlflow.yaml"
RAY_INTERNAL_PORTS = {6379, 8076, 8265, 10001}  # GCS, object manager, dashboard/job API, Ray client
INTERNET = {"0.0.0.0/0", "::/0"}


def load_aws() -> dict:
    return yaml.safe_load(AWS.read_text())


def load_kuberay() -> tuple[dict, dict, dict]:
    """(ServiceAccount, RayCluster, RayJob) documents."""
    docs = {d["kind"]: d for d in yaml.safe_load_all(RAYCLUSTER.read_text())}
    return docs["ServiceAccount"], docs["RayCluster"], yaml.safe_load(RAYJOB.read_text())


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# ----------------------------------------------------------------------------------------------- AWS launcher


def test_aws_config_validates_against_ray_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_aws()
    jsonschema.validate(raw, ray_schema())  # the file as written
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does before validating
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert set(prepared["available_node_types"]) == {"head", "cpu_spot", "gpu"}


def test_ray_validator_rejects_a_broken_aws_config():
    """The check above is not vacuous: Ray's validator refuses a typo and a fractional node resource."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    typo = load_aws()
    typo["available_node_types"]["gpu"]["max_worker"] = typo["available_node_types"]["gpu"].pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(typo))
    frac = load_aws()
    frac["available_node_types"]["cpu_spot"]["resources"][R.CPU_WORKER_RESOURCE] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(frac))


def test_aws_node_types_head_runs_nothing_cpu_is_spot_gpu_is_gpu():
    cfg = load_aws()
    types = cfg["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}

    cpu = types["cpu_spot"]
    assert cpu["min_workers"] == 0 < cpu["max_workers"]
    assert cpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert cpu["resources"] == {R.CPU_WORKER_RESOURCE: R.NODE_CAPACITY}
    assert not re.match(r"(g\d|p\d)", cpu["node_config"]["InstanceType"])

    gpu = types["gpu"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"]
    assert gpu["resources"] == {R.GPU_WORKER_RESOURCE: R.NODE_CAPACITY}
    assert re.match(r"(g[4-6]|p[3-5])", gpu["node_config"]["InstanceType"]), gpu["node_config"]["InstanceType"]

    assert cfg["max_workers"] >= cpu["max_workers"] + gpu["max_workers"]
    for name, t in types.items():  # S3 through an instance profile on every node, never keys
        assert t["node_config"]["IamInstanceProfile"]["Name"], name
    assert not re.search(r"aws_(access_key_id|secret_access_key)|AKIA[0-9A-Z]{16}", AWS.read_text(), re.I)


def test_aws_one_docker_image_and_no_install_at_boot():
    cfg = load_aws()
    docker = cfg["docker"]
    assert re.search(r"/raydseg:[\w.-]+$", docker["image"]), docker["image"]
    assert "head_image" not in docker and "worker_image" not in docker
    assert not any("docker" in t for t in cfg["available_node_types"].values())
    assert cfg["setup_commands"] == [] and cfg["worker_setup_commands"] == []
    # every container turns the stages' node resources on (raydseg/resources.py)
    assert f"-e {R.ENV_FLAG}=1" in docker["run_options"]


def test_aws_security_group_opens_no_ray_port_to_the_internet():
    """The inbound rules Ray will create (its defaults + ours) expose only SSH; the dashboard binds loopback."""
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    cfg = load_aws()
    extra = cfg["provider"]["security_group"].get("IpPermissions", [])
    rules = _create_default_inbound_rules({"sg-raydseg"}, extra)
    for rule in rules:
        cidrs = {r["CidrIp"] for r in rule.get("IpRanges", [])} | {r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])}
        if not cidrs & INTERNET:
            assert rule.get("UserIdGroupPairs") or cidrs, rule  # intra-cluster rule
            continue
        lo, hi = rule["FromPort"], rule["ToPort"]
        assert rule["IpProtocol"] != "-1" and lo != -1, f"all ports open to the internet: {rule}"
        exposed = {p for p in RAY_INTERNAL_PORTS if lo <= p <= hi}
        assert not exposed, f"ports {exposed} open to the internet: {rule}"
        assert (lo, hi) == (22, 22)
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


# ----------------------------------------------------------------------------------------------- KubeRay


def _spec_checks(spec: dict, where: str) -> None:
    """The fields KubeRay's RayCluster CRD requires, and our layout."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    assert head["template"]["spec"]["containers"][0]["image"], where
    assert head["rayStartParams"]["num-cpus"] == "0", f"{where}: the head must run no tasks"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head service exposed outside the cluster"
    assert spec["enableInTreeAutoscaling"] is True, where
    for g in spec["workerGroupSpecs"]:
        for key in ("groupName", "minReplicas", "maxReplicas", "template", "rayStartParams"):
            assert key in g, f"{where}: worker group misses {key}"
        assert 0 == g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
        assert g["template"]["spec"]["containers"][0]["image"], g["groupName"]
    # every pod carries the IRSA service account (S3 access) and the same image
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    assert {p["serviceAccountName"] for p in pods} == {"raydseg"}, where
    assert len({c["image"] for p in pods for c in p["containers"]}) == 1, f"{where}: one image for all pods"
    for p in pods:
        env = {e["name"]: e.get("value") for e in p["containers"][0]["env"]}
        assert env[R.ENV_FLAG] == "1", where
        assert env["MLFLOW_TRACKING_URI"] == mlflow_service_uri(), where


def mlflow_service_uri() -> str:
    """In-cluster URI of the MLflow Service of cluster/kuberay/mlflow.yaml (namespace raydseg)."""
    svc = next(d for d in yaml.safe_load_all(MLFLOW_K8S.read_text()) if d["kind"] == "Service")
    return f"http://{svc['metadata']['name']}.raydseg.svc.cluster.local:{svc['spec']['ports'][0]['port']}"


def test_kuberay_mlflow_server_runs_our_script_with_s3_artifacts():
    docs = {d["kind"]: d for d in yaml.safe_load_all(MLFLOW_K8S.read_text())}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    script = container["command"][-1]
    assert script == "/home/ray/raydseg/jobs/mlflow_server.sh" and (REPO / "jobs" / "mlflow_server.sh").exists()
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_DEFAULT_ARTIFACT_ROOT"]["value"].startswith("s3://")
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]  # database password not in the file
    assert env["MLFLOW_HOST"]["value"] == "0.0.0.0" and docs["Service"]["spec"]["type"] == "ClusterIP"
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert pod["serviceAccountName"] == "raydseg"


def test_kuberay_manifests_carry_required_fields():
    sa, rc, job = load_kuberay()
    assert sa["metadata"]["name"] == "raydseg"
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for doc, kind in ((rc, "RayCluster"), (job, "RayJob")):
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    _spec_checks(rc["spec"], "RayCluster")
    import ray

    minor = ".".join(ray.__version__.split(".")[:2])
    assert str(rc["spec"]["rayVersion"]).startswith(minor + "."), "rayVersion differs from the installed Ray"
    _spec_checks(job["spec"]["rayClusterSpec"], "RayJob")
    assert job["spec"]["entrypoint"] == "python jobs/full_run.py --config configs/waymo.yaml"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/raydseg"  # WORKDIR of docker/Dockerfile
    assert "WORKDIR /home/ray/raydseg" in (REPO / "docker" / "Dockerfile").read_text()
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://")
    assert job["spec"]["rayClusterSpec"] == rc["spec"], "rayjob.yaml's cluster drifted from raycluster.yaml"


@pytest.mark.parametrize("which", ["RayCluster", "RayJob"])
def test_kuberay_autoscaler_sees_our_node_types(which):
    """KubeRay's autoscaler (Ray's own translation of the CR) gets a valid config with our resources."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    _, rc, job = load_kuberay()
    job_cr = {"metadata": {"name": "raydseg-full-run"}, "spec": job["spec"]["rayClusterSpec"]}
    cr = copy.deepcopy(rc if which == "RayCluster" else job_cr)
    cr["metadata"]["namespace"] = "raydseg"
    cfg = _derive_autoscaling_config_from_ray_cr(cr)  # calls validate_config itself
    types = cfg["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    cpu, gpu = types["cpu-spot"], types["gpu"]
    assert cpu["resources"][R.CPU_WORKER_RESOURCE] == R.NODE_CAPACITY and "GPU" not in cpu["resources"]
    assert R.GPU_WORKER_RESOURCE not in cpu["resources"]
    assert gpu["resources"][R.GPU_WORKER_RESOURCE] == R.NODE_CAPACITY and gpu["resources"]["GPU"] >= 1
    assert R.CPU_WORKER_RESOURCE not in gpu["resources"]
    assert (cpu["min_workers"], gpu["min_workers"]) == (0, 0) and cpu["max_workers"] > 0 and gpu["max_workers"] > 0


# ----------------------------------------------------------------------------------------------- resources


def _custom_resources_in_cluster_files() -> set[str]:
    names = set()
    for t in load_aws()["available_node_types"].values():
        names |= {k for k in t["resources"] if k not in ("CPU", "GPU", "memory")}
    _, rc, _ = load_kuberay()
    for g in rc["spec"]["workerGroupSpecs"]:
        if "resources" in g["rayStartParams"]:
            names |= set(json.loads(json.loads(g["rayStartParams"]["resources"])))
    return names


def test_cluster_files_advertise_exactly_the_resources_stages_request():
    assert _custom_resources_in_cluster_files() == set(R.NODE_KINDS.values())
    assert R.node_resources("cpu", use_node_resources=True) == {R.CPU_WORKER_RESOURCE: R.TASK_AMOUNT}
    assert R.node_resources("gpu", use_node_resources=True) == {R.GPU_WORKER_RESOURCE: R.TASK_AMOUNT}
    assert R.node_resources("cpu", use_node_resources=False) == {}


def test_node_resources_follow_the_cluster_env_flag(monkeypatch):
    monkeypatch.delenv(R.ENV_FLAG, raising=False)
    assert R.node_resources("gpu") == {}  # plain local Ray: nothing a laptop lacks
    monkeypatch.setenv(R.ENV_FLAG, "1")
    assert R.node_resources("gpu") == {R.GPU_WORKER_RESOURCE: R.TASK_AMOUNT}
    assert R.node_resources("gpu", use_node_resources=False) == {}  # an explicit choice wins
    # Ray keeps resource quantities to 1e-4; a node must fit far more tasks than it has CPUs
    assert R.TASK_AMOUNT >= 1e-4 and R.NODE_CAPACITY / R.TASK_AMOUNT >= 10_000
    with pytest.raises(ValueError, match="unknown node kind 'tpu'"):
        R.node_resources("tpu", use_node_resources=True)


@pytest.mark.ray
@pytest.mark.slow
def test_node_resources_place_tasks_on_the_matching_node_type():
    """A real 3-node Ray cluster shaped like cluster/: a CPU-0 head, a `cpu_worker` node and a `gpu_worker` node."""
    import ray
    from ray.cluster_utils import Cluster

    types = load_aws()["available_node_types"]
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": types["head"]["resources"]["CPU"],
                                                             "include_dashboard": False})
    try:
        cpu_node = cluster.add_node(num_cpus=1, resources=types["cpu_spot"]["resources"])
        gpu_node = cluster.add_node(num_cpus=1, num_gpus=1, resources=types["gpu"]["resources"])
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()

        @ray.remote
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        cpu = [where.options(num_cpus=1, resources=R.node_resources("cpu", use_node_resources=True)).remote()
               for _ in range(4)]
        gpu = [where.options(num_cpus=1, num_gpus=1,
                             resources=R.node_resources("gpu", use_node_resources=True)).remote() for _ in range(2)]
        assert set(ray.get(cpu, timeout=120)) == {cpu_node.node_id}
        assert set(ray.get(gpu, timeout=120)) == {gpu_node.node_id}
        # nothing fits the head: a plain CPU task goes to a worker, never to the CPU-0 head
        assert ray.get(where.options(num_cpus=1).remote(), timeout=120) != cluster.head_node.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_the_config_the_rayjob_runs_loads_and_writes_to_s3():
    """rayjob.yaml runs `--config configs/waymo.yaml` with no overrides: that file must load and use S3."""
    from raydseg.config import load_config

    _, _, job = load_kuberay()
    entry = job["spec"]["entrypoint"].split()
    cfg_path = REPO / entry[entry.index("--config") + 1]
    assert (REPO / entry[1]).exists(), entry[1]
    cfg = load_config(cfg_path)
    assert cfg.data.source == "waymo"
    assert cfg.run.output_root.startswith("s3://"), "a RayJob's outputs must outlive its cluster"


# ----------------------------------------------------------------------------------------------- token auth


def test_aws_cluster_turns_on_ray_token_auth_with_the_token_from_a_file():
    """Every container runs with RAY_AUTH_MODE=token and gets Ray's default token file from the launching machine;
    no token value is written in the file."""
    cfg = load_aws()
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    assert Path("~/.ray/auth_token").expanduser() == _get_default_token_path()  # where Ray looks by default
    assert "RAY_AUTH_TOKEN" not in AWS.read_text()


def test_kuberay_cluster_and_job_turn_on_ray_token_auth_through_the_operator():
    _, rc, job = load_kuberay()
    for spec, where in ((rc["spec"], "RayCluster"), (job["spec"]["rayClusterSpec"], "RayJob")):
        assert spec["authOptions"] == {"mode": "token"}, where
        major, minor = (int(x) for x in str(spec["rayVersion"]).split(".")[:2])
        assert (major, minor) >= (2, 52), f"{where}: token authentication needs Ray >= 2.52"
    for path in (RAYCLUSTER, RAYJOB):  # the operator makes the secret: no token (env var or value) in the manifests
        assert "RAY_AUTH_TOKEN" not in json.dumps(list(yaml.safe_load_all(path.read_text())))


# ----------------------------------------------------------------------------------------------- preflight

SHIPPED_CONFIGS = sorted((REPO / "raydseg" / "configs").glob("*.yaml"))
CLUSTER_FILES = [AWS, RAYCLUSTER, RAYJOB]


@pytest.mark.parametrize("cluster_file", CLUSTER_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda p: p.stem)
def test_preflight_passes_every_shipped_config_on_every_shipped_cluster(config, cluster_file, capsys):
    from raydseg.cli import main

    assert main(["preflight", "--config", str(config), "--cluster", str(cluster_file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"preflight: every worker request fits {cluster_file}")


def test_preflight_node_types_of_the_shipped_cluster_files():
    """The shapes the check works with: the AWS instance table and Ray's own reading of the KubeRay CR."""
    from raydseg.preflight import GiB, RAY_MEMORY_FRACTION, cluster_file_node_types

    aws = {n.name: n for n in cluster_file_node_types(AWS)}
    assert aws["head"].resources["CPU"] == 0 and aws["head"].max_workers == 1
    assert aws["gpu"].resources == {"CPU": 8, "GPU": 1, "memory": RAY_MEMORY_FRACTION * 32 * GiB,
                                    R.GPU_WORKER_RESOURCE: R.NODE_CAPACITY}
    assert (aws["cpu_spot"].resources["CPU"], aws["cpu_spot"].max_workers) == (16, 16)
    for path in (RAYCLUSTER, RAYJOB):
        k8s = {n.name: n for n in cluster_file_node_types(path)}
        assert k8s["gpu"].resources["CPU"] == 7 and k8s["gpu"].resources["GPU"] == 1
        assert k8s["gpu"].resources[R.GPU_WORKER_RESOURCE] == R.NODE_CAPACITY and k8s["gpu"].max_workers == 8
        assert k8s["cpu-spot"].resources["CPU"] == 15 and k8s["headgroup"].resources["CPU"] == 0


def test_preflight_names_stage_and_key_of_a_train_worker_larger_than_kuberay_gpu_pods(capsys):
    """The defect of the paper configs before this check: 8 CPUs + 1 GPU per train worker on 7-CPU GPU pods."""
    from raydseg.cli import main

    rc = main(["preflight", "--config", "configs/waymo.yaml", "--cluster", str(RAYCLUSTER),
               "--set", "teacher.cpus_per_worker=8"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert err == [
        f"error: teacher: one train worker asks for 8 CPU + 1 GPU + 0.001 gpu_worker (teacher.cpus_per_worker=8.0), "
        f"but no node type of {RAYCLUSTER} has that much (headgroup: 0 CPU, 0 GPU; cpu-spot: 15 CPU, 0 GPU, "
        "cpu_worker; gpu: 7 CPU, 1 GPU, gpu_worker)"]


def test_preflight_reports_every_impossible_request_once_each(capsys):
    from raydseg.cli import main

    rc = main(["preflight", "--config", "configs/waymo.yaml", "--cluster", str(AWS), "--set", "eval.num_gpus=2",
               "--set", "cluster.num_gpus=2", "--set", "student.num_workers=16", "--set",
               "student.batch_size=16"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 3, err
    assert err[0].startswith("error: cluster: one k-means shard actor asks for 1 CPU + 2 GPU + 0.001 gpu_worker "
                             "(cluster.num_gpus=2.0), but no node type of")
    assert err[1] == ("error: student: 16 train workers must run at once (student.num_workers=16), each 6 CPU + 1 GPU "
                      f"+ 0.001 gpu_worker, but {AWS} holds at most 8 at its largest")
    assert err[2].startswith("error: evaluate: one inference actor asks for 1 CPU + 2 GPU + 0.001 gpu_worker "
                             "(eval.num_gpus=2.0), but no node type of")


def test_preflight_names_the_node_resource_flag_when_no_node_type_advertises_it(tmp_path):
    from raydseg.errors import ConfigError
    from raydseg.config import load_config
    from raydseg.preflight import check_cluster_file

    doc = load_aws()
    doc["available_node_types"]["cpu_spot"]["resources"] = {}  # the CPU nodes lost their custom resource
    path = tmp_path / "aws.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        check_cluster_file(load_config("configs/smoke.yaml"), path, ["ingest"])
    assert e.value.problems == [
        f"ingest: one ingest task asks for 1 CPU + 0.001 cpu_worker ({R.ENV_FLAG}), but no node type of {path} has "
        "that much (head: 0 CPU, 0 GPU; cpu_spot: 16 CPU, 0 GPU; gpu: 8 CPU, 1 GPU, gpu_worker)"]


def test_preflight_refuses_an_unknown_instance_type_without_explicit_resources(tmp_path):
    from raydseg.errors import InputError
    from raydseg.preflight import cluster_file_node_types

    doc = load_aws()
    doc["available_node_types"]["gpu"]["node_config"]["InstanceType"] = "x9.huge"
    path = tmp_path / "aws.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(InputError, match=r"node type 'gpu' has instance type 'x9.huge'"):
        cluster_file_node_types(path)
    doc["available_node_types"]["gpu"]["resources"].update(CPU=12, GPU=2)  # explicit resources: no table needed
    path.write_text(yaml.safe_dump(doc))
    gpu = {n.name: n for n in cluster_file_node_types(path)}["gpu"]
    assert (gpu.resources["CPU"], gpu.resources["GPU"]) == (12, 2)


def test_stage_requests_are_what_the_stages_pass_to_ray():
    """The preflight's requests are the stages' own: the same WorkerRequest builds their Ray options."""
    import inspect

    from raydseg import stage_requests as S
    from raydseg.config import load_config
    from raydseg.eval import inference
    from raydseg.stages import cluster, features, ingest, proposals
    from raydseg.train import loop, teacher

    for module, call in ((ingest, "stage_requests.ingest("), (proposals, "stage_requests.proposals("),
                         (features, "stage_requests.features("), (cluster, "stage_requests.kmeans("),
                         (cluster, "stage_requests.pseudolabels("), (inference, "stage_requests.evaluate("),
                         (teacher, "train_worker_for("), (loop, "task_cpus=AUGMENT_TASK_CPUS")):
        assert call in inspect.getsource(module), (module.__name__, call)
    cfg = load_config("configs/waymo.yaml")
    w = S.train_worker(cfg, "teacher", use_node_resources=True)
    assert w.resources == {"CPU": 6, "GPU": 1, R.GPU_WORKER_RESOURCE: R.TASK_AMOUNT} and w.gang == 4
    assert S.features(cfg, use_node_resources=False).ray_options() == {"num_cpus": 1.0, "num_gpus": 1}
    assert S.ingest(cfg, use_node_resources=True).ray_options() == {
        "num_cpus": 1.0, "resources": {R.CPU_WORKER_RESOURCE: R.TASK_AMOUNT}}


def test_ray_train_gets_the_preflight_request_and_packs_workers(monkeypatch, tmp_path):
    """run_trainer's ScalingConfig asks Ray Train for exactly the WorkerRequest the preflight checks (6 CPU + 1 GPU
    + the GPU node resource per worker, 4 workers) and packs them (NCCL inside a multi-GPU node), not SPREAD."""
    import ray.train.torch

    from raydseg import stage_requests as S
    from raydseg.config import load_config
    from raydseg.train.teacher import run_trainer

    seen = {}

    class FakeTrainer:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)

        def fit(self):
            return type("Result", (), {"error": None})()

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    monkeypatch.setenv(R.ENV_FLAG, "1")
    cfg = load_config("configs/waymo.yaml")
    run_trainer(cfg.teacher, {"prefix": "teacher/"}, str(tmp_path), "t")
    sc = seen["scaling_config"]
    assert sc.placement_strategy == "PACK" and sc.num_workers == 4 and sc.use_gpu
    assert sc._resources_per_worker_not_none == S.train_worker(cfg, "teacher").resources == {
        "CPU": 6, "GPU": 1, R.GPU_WORKER_RESOURCE: R.TASK_AMOUNT}
