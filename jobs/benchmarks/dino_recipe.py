"""One DINO recipe run without Ray (raydseg.train.pretrain.pretrain_local, the stage's task and schedules).

`THREADS=1 python jobs/benchmarks/dino_recipe.py DATA OUT [pretrain_key=value ...]`: DATA from dino_images.py;
logs loss / teacher entropy / k-NN accuracy of the probe's LiDAR segments; writes OUT/history.json and the
backbone OUT/backbone.safetensors.
"""
import sys, os, time, json, numpy as np, torch
from raydseg.config import load_config
from raydseg.train.pretrain import build_knn_probe, pretrain_local
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
data, out = sys.argv[1], sys.argv[2]
cfg = load_config("configs/default.yaml")
p = cfg.pretrain.model_dump()
for kv in sys.argv[3:]:
    k, v = kv.split("=", 1)
    p[k] = type(p[k])(v) if not isinstance(p[k], bool) else v == "true"
p.update(seed=0, out_dir=out)
imgs = list(np.load(f"{data}/images.npy"))
t0 = time.time()
probe = build_knn_probe(f"{data}/frames", cfg.proposals, 16, 0)
print("probe", len(probe["seg_id"]), time.time() - t0, flush=True)
os.makedirs(out, exist_ok=True)
hist = pretrain_local(p, imgs, "cpu", probe=probe, log=lambda s: print(s, flush=True))
json.dump({"config": p, "history": hist}, open(f"{out}/history.json", "w"), indent=1, default=str)
