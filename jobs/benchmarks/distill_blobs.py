"""Teacher vs student (and the student ablations) on synthetic blob pseudo-labels with known ground truth.

`python jobs/benchmarks/distill_blobs.py --out FILE.json [--teacher-steps N --student-steps N]`: trains the teacher
on sparse blob pseudo-labels (Ray Train, 1 worker), distils it into students (full recipe, no EMA, hard targets,
no refinement), each an MLflow run in experiment `distill_blobs`, and evaluates all on held-out blob images against
the dense ground truth (Hungarian mapping, mIoU). The teacher is the named baseline; ratios are student / teacher.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def evaluate(model_dir: str, rows: list[dict], n_cls: int) -> dict[str, float]:
    from raydseg.eval.matching import fit_mapping
    from raydseg.eval.metrics import apply_mapping, confusion_matrix, scores
    from raydseg.models.infer import predict_image
    from raydseg.models.io import load_model

    model = load_model(model_dir)
    conf = sum(confusion_matrix(predict_image(model, r["image"]), r["gt"], n_cls, n_cls) for r in rows)
    s = scores(apply_mapping(conf, fit_mapping(conf, "hungarian")))
    return {"miou": float(s["miou"]), "pixel_acc": float(s["pixel_acc"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--teacher-steps", type=int, default=60)
    p.add_argument("--student-steps", type=int, default=40)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--workdir", default="")
    args = p.parse_args(argv)

    import mlflow
    import ray

    from raydseg.config import load_config
    from raydseg.train import student, teacher
    from raydseg.train.synthetic import write_blob_parts

    work = args.workdir or tempfile.mkdtemp(prefix="distill-blobs-")
    n_cls = 4
    write_blob_parts(os.path.join(work, "pl"), n_images=args.images, h=96, w=128, n_parts=4, n_cls=n_cls, seed=0)
    held_out = write_blob_parts(os.path.join(work, "heldout"), n_images=12, h=96, w=128, n_parts=1, n_cls=n_cls,
                                seed=99)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment("distill_blobs").experiment_id
    client = mlflow.MlflowClient()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    common = {"crop_size": 96, "batch_size": 8, "log_every": 10, "val_every": -1, "checkpoint_every": 1000}
    tcfg = load_config(overrides=[f"teacher.{k}={v}" for k, v in {**common, "n_cls": n_cls,
                                                                   "steps": args.teacher_steps}.items()]
                       + [f"cluster.k={n_cls - 1}"])  # blob classes stand for ground + k pseudo-classes
    results = {}
    run = client.create_run(exp, run_name="teacher")
    teacher.train(tcfg, os.path.join(work, "pl"), os.path.join(work, "teacher"), tracking_uri=uri,
                  mlflow_run_id=run.info.run_id, name="teacher")
    results["teacher"] = evaluate(os.path.join(work, "teacher", "model"), held_out, n_cls)
    client.log_metric(run.info.run_id, "heldout_miou", results["teacher"]["miou"])
    client.set_terminated(run.info.run_id)
    # the paper's student (EMA teacher, soft targets, refinement, plain distillation), then each part off alone
    variants = {"student": [], "student_no_ema": ["ema=false"], "student_hard": ["soft_targets=false"],
                "student_no_refine": ["refine=false"]}
    for name, extra in variants.items():
        over = [f"student.{k}={v}" for k, v in {**common, "steps": args.student_steps, "ema": "true",
                                                "refine": "true", "class_balance": 0}.items()]
        cfg = load_config(overrides=over + [f"student.{e}" for e in extra])
        run = client.create_run(exp, run_name=name)
        student.train(cfg, os.path.join(work, "pl"), os.path.join(work, "teacher", "model"),
                      os.path.join(work, name), tracking_uri=uri, mlflow_run_id=run.info.run_id, name=name)
        results[name] = evaluate(os.path.join(work, name, "model"), held_out, n_cls)
        client.log_metric(run.info.run_id, "heldout_miou", results[name]["miou"])
        client.set_terminated(run.info.run_id)
    ray.shutdown()
    flat = {f"{k}_miou": v["miou"] for k, v in results.items()}
    flat.update({f"{k}_pixel_acc": v["pixel_acc"] for k, v in results.items()})
    flat.update({f"{k}_miou_ratio_vs_teacher": v["miou"] / max(results["teacher"]["miou"], 1e-9)
                 for k, v in results.items() if k != "teacher"})
    flat.update({"baseline": "teacher", "teacher_steps": args.teacher_steps, "student_steps": args.student_steps})
    print(f"{'model':20s} {'mIoU':>8s} {'pix acc':>8s}")
    for k, v in results.items():
        print(f"{k:20s} {v['miou']:8.3f} {v['pixel_acc']:8.3f}")
    with open(args.out, "w") as f:
        json.dump(flat, f, indent=1)
    return 0


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
