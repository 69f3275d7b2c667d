"""`raydseg serve` throughput over HTTP on loopback: batched requests against one request per forward (baseline).

`python jobs/benchmarks/serve.py --model MODEL_DIR --eval-dir DIR --out FILE.json [--requests N --concurrency C]`
DIR: a Cityscapes-layout split (e.g. `<run>/ingest/eval/day`). For each max batch size (1 = the baseline, then 8) it
deploys the model on a local Ray cluster (one replica), sends N PNG requests from C client threads at once, and
reports requests/s, the mean batch size the server formed, the median latency and the ratio to the baseline.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import time
import urllib.request


def _post(url: str, body: bytes) -> tuple[float, int]:
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=body, method="POST")
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()
        return time.perf_counter() - t0, int(r.headers["X-Batch-Size"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--eval-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()

    import ray
    from ray import serve

    from raydseg.eval.sets import EvalSet, list_samples
    from raydseg.serve import SERVE_ENV, start

    samples = list_samples(EvalSet("bench", "cityscapes", args.eval_dir))
    bodies = [open(samples[i % len(samples)].image_path, "rb").read() for i in range(args.requests)]
    for k, v in SERVE_ENV.items():
        os.environ.setdefault(k, v)
    ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    results: dict = {"requests": args.requests, "concurrency": args.concurrency, "model": args.model}
    for max_batch in (1, 8):
        url = start(args.model, port=args.port, max_batch_size=max_batch)
        _post(url, bodies[0])  # warm-up
        with cf.ThreadPoolExecutor(args.concurrency) as pool:
            t0 = time.perf_counter()
            answers = list(pool.map(lambda b: _post(url, b), bodies))
            wall = time.perf_counter() - t0
        results[f"batch{max_batch}_requests_per_s"] = args.requests / wall
        results[f"batch{max_batch}_mean_batch"] = statistics.mean(b for _, b in answers)
        results[f"batch{max_batch}_median_latency_s"] = statistics.median(t for t, _ in answers)
        serve.shutdown()
    results["speedup_vs_batch1"] = results["batch8_requests_per_s"] / results["batch1_requests_per_s"]
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
