"""A tiny training job: fits y = 3x + 1 by gradient descent, one line per epoch, and
writes its model to model.json in --out (its working folder by default), starting from
the model found there if a previous attempt left one. Standard library only, so it
runs on any python3 (bring PyTorch with an image: `--image`)."""

import argparse
import json
import os
import random

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--out", default=".", help="where model.json goes")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)
saved = os.path.join(args.out, "model.json")

random.seed(0)
data = [(x, 3 * x + 1) for x in (random.uniform(-1, 1) for _ in range(256))]
w = b = 0.0
if os.path.exists(saved):  # a retry, or a volume a previous task wrote
    with open(saved) as handle:
        model = json.load(handle)
    w, b = model["w"], model["b"]
    print(f"resuming from {saved}", flush=True)
gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "none")
print(f"training on GPU(s) {gpus}", flush=True)
for epoch in range(1, args.epochs + 1):
    for _ in range(50):
        dw = sum(2 * (w * x + b - y) * x for x, y in data) / len(data)
        db = sum(2 * (w * x + b - y) for x, y in data) / len(data)
        w, b = w - args.lr * dw, b - args.lr * db
    loss = sum((w * x + b - y) ** 2 for x, y in data) / len(data)
    print(f"epoch {epoch}: loss {loss:.4f}", flush=True)
with open(saved, "w") as handle:
    json.dump({"w": w, "b": b}, handle)
print(f"saved {saved}: w={w:.3f} b={b:.3f}")
