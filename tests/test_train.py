"""Teacher training on Ray Train: DDP on a two-node local cluster (2 CPU workers, gloo), fault injection,
resume of an interrupted run, both bit-identical to an uninterrupted run of the same seed; MLflow logging on a
real server, `raydseg predict` on the saved weights."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from raydseg.config import load_config
from raydseg.train.synthetic import write_blob_parts
from train_faults import KillAt, PauseAt, WriteDigest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head and one worker node (2 logical CPUs each) in this machine; gloo bound to loopback."""
    import ray
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
                                       "OMP_NUM_THREADS": "1"}})
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    if was_up:  # give the session fixture's local cluster back to later tests
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}})


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    rows = write_blob_parts(str(root / "pl"), n_images=20, h=64, w=96, n_parts=2, n_cls=4, seed=0)
    return root / "pl", rows


def small_cfg(**kw):
    sets = {"teacher.n_cls": 4, "cluster.k": 3, "proposals.sky_margin_deg": -1, "teacher.steps": 6,
            "teacher.batch_size": 4, "teacher.crop_size": 64, "teacher.checkpoint_every": 2, "teacher.log_every": 1,
            "teacher.val_fraction": 0.2, "teacher.val_images": 4, "teacher.val_every": 4, "teacher.lr": 2e-3,
            "teacher.scale_min": 0.5, "teacher.torch_threads": 1, **kw}
    return load_config(overrides=[f"{k}={v}" for k, v in sets.items()])


def model_digest(model_dir) -> str:
    from raydseg.models.io import load_model
    from raydseg.train.engine import weights_digest

    return weights_digest(load_model(str(model_dir)))


@pytest.fixture(scope="module")
def uninterrupted(two_node_cluster, blobs, tmp_path_factory):
    """Digest of the final weights of an uninterrupted 2-worker run of `small_cfg` (the reference of the fault
    tests: a run that survived a fault must end with the same weights)."""
    from raydseg.train.teacher import train

    out = tmp_path_factory.mktemp("reference")
    train(small_cfg(**{"teacher.num_workers": 2}), str(blobs[0]), str(out), name="reference", timeout_s=120)
    return model_digest(out / "model")


def test_ddp_two_nodes_fault_tolerance_mlflow_and_predict(uninterrupted, blobs, tmp_path, mlflow_server):
    import mlflow

    from raydseg.predict import main as predict_main
    from raydseg.train.precision import cpu_has_bf16
    from raydseg.train.teacher import train

    pl_dir, _ = blobs
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run_id = client.create_run(client.create_experiment(f"teacher-{tmp_path.name}")).info.run_id
    marker, digests = tmp_path / "failed_once", tmp_path / "digests"
    cfg = small_cfg(**{"teacher.num_workers": 2})
    out = tmp_path / "out"
    result = train(cfg, str(pl_dir), str(out), tracking_uri=mlflow_server, mlflow_run_id=run_id, name="ddp",
                   timeout_s=120, callbacks=[WriteDigest(str(digests)), KillAt(5, 1, str(marker))])

    # rank 1 was SIGKILLed once at step 5 (its process gone); the restarted attempt resumed from a checkpoint: the
    # step-4 one, or the step-2 one when Ray Train had not yet registered step 4's when it saw the death (under load)
    assert marker.exists()
    assert result.metrics["step"] == 6 and result.metrics["start_step"] in (2, 4)
    # DDP: both ranks (one per node) hold bit-identical weights after the first step
    d0, d1 = (digests / "rank0.txt").read_text(), (digests / "rank1.txt").read_text()
    assert d0 == d1
    # the run that lost a worker process at step 5 ends with the weights of the uninterrupted run, which moved
    assert model_digest(out / "model") == uninterrupted != d0
    # MLflow: params, curves (loss falls), validation mIoU, throughput and the model artifact
    run = client.get_run(run_id)
    assert run.data.params["teacher.num_workers"] == "2" and run.data.params["world_size"] == "2"
    assert run.data.params["grad_accum"] == "1" and run.data.params["micro_batch_size"] == "2"
    assert run.data.params["autocast_bf16"] == str(cpu_has_bf16())  # `amp: auto`, as the worker resolved it
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "teacher/loss")}
    assert sorted(loss) == list(range(1, 7))
    # six steps on shuffled batches need not lower the loss (learning is tested on fixed data elsewhere): the
    # curve is logged at every step and finite, and the logged LR is the warmup + poly schedule at that step
    assert all(np.isfinite(v) and v > 0 for v in loss.values())
    lr = {m.step: m.value for m in client.get_metric_history(run_id, "teacher/lr")}
    w = cfg.teacher.warmup_steps  # closed form: (s + 1) / w during warmup, then (1 - t)^0.9 to 0 at step 6
    factor = [(s + 1) / w if s < w else (1 - (s - w) / (6 - w)) ** 0.9 for s in range(7)]
    assert 0 < w < 6 and lr == pytest.approx({s: cfg.teacher.lr * factor[s] for s in range(1, 7)})
    # the last logged validation mIoU is that of the exported weights on the held-out frames
    from raydseg.models.io import load_model
    from raydseg.train.data import load_val_rows
    from raydseg.train.engine import validate_segmenter

    rows = load_val_rows(str(pl_dir), cfg.teacher.val_fraction, cfg.teacher.val_images)
    assert rows and run.data.metrics["teacher/val_miou"] == pytest.approx(
        validate_segmenter(load_model(str(out / "model")), rows, 4)["val_miou"], abs=1e-9)
    assert run.data.metrics["teacher/images_per_s"] > 0 and "teacher/lr" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/model.pt", "model/model_config.json"} <= artifacts
    assert client.list_artifacts(run_id, "overlays")

    # `raydseg predict` on the saved weights (dir and MLflow run) reproduces the in-training predictions
    from raydseg.data.schema import decode_image

    mlflow.set_tracking_uri(mlflow_server)
    for model_ref, name in ((str(out / "model"), "dir"), (f"runs:/{run_id}", "run")):
        assert predict_main(["--model", model_ref, "--images", str(out / "val_images"),
                             "--out", str(tmp_path / name)]) == 0
        names = sorted(os.listdir(out / "val_predictions"))
        assert names
        for n in names:
            want = decode_image((out / "val_predictions" / n).read_bytes())
            got = decode_image((tmp_path / name / "labels" / n).read_bytes())
            assert np.array_equal(want, got)
            assert (tmp_path / name / "overlays" / n).exists()


def test_interrupted_run_restarts_at_its_step_with_the_uninterrupted_weights(uninterrupted, blobs, tmp_path):
    from raydseg.train.teacher import train

    pl_dir, _ = blobs
    cfg = small_cfg(**{"teacher.num_workers": 2, "teacher.max_failures": 0, "teacher.val_every": -1})
    out = str(tmp_path / "out")
    with pytest.raises(Exception, match="injected failure at step 3"):
        train(cfg, str(pl_dir), out, name="interrupted", timeout_s=120,
              callbacks=[KillAt(3, 0, str(tmp_path / "m"), sigkill=False)])
    assert not os.path.exists(os.path.join(out, "model"))
    result = train(cfg, str(pl_dir), out, name="interrupted", timeout_s=120)  # same RunConfig: resumes
    assert result.metrics["start_step"] == 2 and result.metrics["step"] == 6
    assert model_digest(os.path.join(out, "model")) == uninterrupted


def test_a_worker_node_removed_during_training_is_survived_with_the_uninterrupted_weights(two_node_cluster, blobs,
                                                                                         tmp_path):
    """`Cluster.remove_node` of the node that runs the training worker, at step 3: Ray Train restarts the worker on
    the other free node from the step-2 checkpoint, and the run ends with the weights of an uninterrupted run."""
    import json
    import threading

    from raydseg.train.teacher import train

    pl_dir, _ = blobs
    cluster = two_node_cluster
    # the worker needs 3 CPUs: only the two nodes added here fit it (head and first worker node have 2 CPUs, which
    # run the 1-CPU augmentation tasks)
    added = [cluster.add_node(num_cpus=3) for _ in range(2)]
    cluster.wait_for_nodes()
    marker, events = tmp_path / "paused", {}

    def remove_the_workers_node():
        deadline = time.time() + 300
        while time.time() < deadline and "node" not in events:
            try:
                events["node"] = json.loads(marker.read_text())["node_id"]
            except (OSError, ValueError):
                time.sleep(0.2)
        ckpts = tmp_path / "out" / "ray_train" / "removed"
        while time.time() < deadline and not any(p.name.startswith("checkpoint_") for p in ckpts.glob("*")):
            time.sleep(0.2)
        time.sleep(3)  # the worker waits at step 3: give Ray Train time to register the step-2 checkpoint
        node = next(n for n in added if n.node_id == events["node"])
        cluster.remove_node(node)
        added.remove(node)
        events["removed"] = True

    try:
        cfg = small_cfg(**{"teacher.num_workers": 1, "teacher.cpus_per_worker": 3, "teacher.val_every": -1})
        train(cfg, str(pl_dir), str(tmp_path / "ref"), name="ref", timeout_s=120)
        remover = threading.Thread(target=remove_the_workers_node, daemon=True)
        remover.start()
        result = train(cfg, str(pl_dir), str(tmp_path / "out"), name="removed", timeout_s=120,
                       callbacks=[PauseAt(3, 0, str(marker))])
        remover.join(timeout=5)
        assert events.get("removed"), f"the worker never reached step 3 on an added node: {events}"
        assert result.metrics["step"] == 6 and result.metrics["start_step"] == 2
        assert model_digest(tmp_path / "out" / "model") == model_digest(tmp_path / "ref" / "model")
    finally:
        for node in added:
            cluster.remove_node(node)


def test_augmentation_keeps_labels_aligned():
    from raydseg.data.schema import encode_png
    from raydseg.train.data import make_views
    from raydseg.train.synthetic import COLOURS, blob_example

    rng = np.random.default_rng(3)
    rows = []
    for i in range(12):
        image, label, seg, gt = blob_example(rng, 48, 64)
        image = COLOURS[gt]  # noise-free: every pixel's colour names its class
        rows.append({"image": encode_png(image), "label": encode_png(label), "segment_ids": encode_png(seg)})
    out = make_views(rows, [0] * 12, [np.random.default_rng(i) for i in range(12)], crop=32, scale_min=0.3,
                     scale_max=1.0, flip=True, jitter=0.0, with_segments=True)
    assert out["image"].shape == (12, 32, 32, 3) and out["label"].shape == (12, 32, 32)
    assert out["segments"].shape == (12, 32, 32)
    assert set(np.unique(out["label"])) <= {0, 1, 2, 3, 255}  # nearest resize: no interpolated label values
    # labelled pixels away from edges carry the colour of their class (crop/flip applied to both alike)
    for im, lb in zip(out["image"], out["label"]):
        inner = np.zeros_like(lb, bool)
        inner[1:-1, 1:-1] = True
        same = (lb[1:-1, 1:-1] == lb[:-2, 1:-1]) & (lb[1:-1, 1:-1] == lb[2:, 1:-1]) & \
               (lb[1:-1, 1:-1] == lb[1:-1, :-2]) & (lb[1:-1, 1:-1] == lb[1:-1, 2:])
        inner[1:-1, 1:-1] &= same & (lb[1:-1, 1:-1] != 255)
        if inner.any():  # bilinear image vs nearest labels: allow a few blended pixels along boundaries
            err = np.abs(im[inner].astype(int) - COLOURS[lb[inner]].astype(int)).max(axis=1)
            assert (err <= 10).mean() > 0.9


@pytest.mark.parametrize("seed", range(6))
def test_augmented_labels_and_segments_sample_the_crop_at_pixel_centres_like_the_image(seed):
    """Labels and segment ids of a view are the source's at each output pixel's centre (nearest with centre
    sampling), crop box and flip as drawn; the image is PIL's bilinear resize of the same box: one geometry."""
    from PIL import Image

    from raydseg.train.data import augment_example, random_resized_crop_box

    src = np.random.default_rng(100 + seed)
    h, w, crop = 40, 70, 48
    image = src.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = src.integers(0, 13, (h, w)).astype(np.uint8)
    segments = src.integers(0, 60_000, (h, w)).astype(np.int32)
    draw = np.random.default_rng(seed)
    y0, x0, ch, cw = random_resized_crop_box(h, w, draw, (0.3, 1.0))
    flipped = draw.random() < 0.5
    im, lb, sg = augment_example(image, label, segments, np.random.default_rng(seed), crop, (0.3, 1.0), True, 0.0)
    rows = y0 + np.floor((np.arange(crop) + 0.5) * ch / crop).astype(int)
    cols = x0 + np.floor((np.arange(crop) + 0.5) * cw / crop).astype(int)
    cols = cols[::-1] if flipped else cols
    assert np.array_equal(lb, label[rows][:, cols]) and np.array_equal(sg, segments[rows][:, cols])
    ref = np.asarray(Image.fromarray(image[y0:y0 + ch, x0:x0 + cw]).resize((crop, crop), Image.BILINEAR))
    ref = ref[:, ::-1] if flipped else ref
    assert np.abs(im.astype(int) - ref.astype(int)).max() <= 1


def test_degraded_view_is_seeded_lowers_contrast_with_strength_and_leaves_the_clean_view_unchanged():
    from raydseg.data.schema import encode_png
    from raydseg.train.data import degraded_view, make_views
    from raydseg.train.synthetic import COLOURS, blob_example

    rng = np.random.default_rng(5)
    image = rng.integers(60, 200, (32, 48, 3), dtype=np.uint8)
    assert degraded_view(image, np.random.default_rng(1), 0.0) is image
    a, b = degraded_view(image, np.random.default_rng(1), 1.0), degraded_view(image, np.random.default_rng(1), 1.0)
    assert np.array_equal(a, b) and a.shape == image.shape and a.dtype == np.uint8
    views = {s: [degraded_view(image, np.random.default_rng(i), s) for i in range(40)] for s in (0.2, 1.0)}
    change = {s: np.mean([np.abs(v.astype(int) - image).mean() for v in vs]) for s, vs in views.items()}
    assert 5 < change[0.2] < change[1.0] / 2  # magnitudes scale with the strength
    assert np.mean([v.std() for v in views[1.0]]) < 0.6 * image.std()  # contrast, haze and blur flatten the view
    assert sum(np.array_equal(v, image) for v in views[1.0]) <= 2

    rows = []
    for _ in range(4):
        im, label, seg, gt = blob_example(rng, 48, 64)
        rows.append({"image": encode_png(COLOURS[gt]), "label": encode_png(label), "segment_ids": encode_png(seg)})
    kw = dict(crop=32, scale_min=0.3, scale_max=1.0, flip=True, jitter=0.2, with_segments=False)
    plain = make_views(rows, [0] * 4, [np.random.default_rng(i) for i in range(4)], **kw)
    both = make_views(rows, [0] * 4, [np.random.default_rng(i) for i in range(4)], degrade=0.8, **kw)
    assert "degraded" not in plain and both["degraded"].shape == both["image"].shape
    assert np.array_equal(plain["image"], both["image"]) and np.array_equal(plain["label"], both["label"])
    night = make_views(rows, [0] * 4, [np.random.default_rng(i) for i in range(4)], degrade=0.8, lowlight=1.0, **kw)
    assert np.array_equal(night["image"], both["image"]) and night["degraded"].mean() < 0.5 * both["image"].mean()


def test_night_exposure_scales_linear_light_adds_light_pools_and_poisson_gaussian_noise():
    """Known values: exposure alone is x -> (x^2.2 * e)^(1/2.2) per pixel; a pool adds its peak to the gain at its
    centre; the noise's variance in linear light is shot * x + read."""
    from raydseg.train.data import degraded_view, low_light_view, night_exposure

    image = np.full((40, 60, 3), 200, np.uint8)
    lin = (200 / 255) ** 2.2
    dark = night_exposure(image, 0.01, [], 0.0, 0.0, None)
    assert np.all(dark == int((lin * 0.01) ** (1 / 2.2) * 255 + 0.5))  # 25 of 200
    lit = night_exposure(image, 0.01, [(20.0, 30.0, 5.0, 0.09)], 0.0, 0.0, None)
    assert lit[20, 30, 0] == int((lin * 0.1) ** (1 / 2.2) * 255 + 0.5) and lit[0, 0, 0] == dark[0, 0, 0]
    grey = np.full((200, 200, 3), 128, np.uint8)
    noise = np.random.default_rng(0).standard_normal(grey.shape, dtype=np.float32)
    x = ((128 / 255) ** 2.2) * 0.2  # far enough from 0 that the clip at black does not cut the noise
    noisy = (night_exposure(grey, 0.2, [], 1e-3, 1e-5, noise).astype(np.float64) / 255) ** 2.2
    assert abs(noisy.var() / (1e-3 * x + 1e-5) - 1) < 0.05

    a, b = (low_light_view(grey, np.random.default_rng(3)) for _ in range(2))
    assert np.array_equal(a, b) and a.dtype == np.uint8 and a.shape == grey.shape
    means = [low_light_view(grey, np.random.default_rng(i)).mean() for i in range(20)]
    assert max(means) < 128 and np.median(means) < 64  # darker, most views much darker
    rng = np.random.default_rng(7)  # lowlight 1: one draw decides, then the low-light view
    rng.random()
    assert np.array_equal(degraded_view(grey, np.random.default_rng(7), 0.8, 1.0), low_light_view(grey, rng))
