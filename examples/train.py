"""Train an example model on scikit-learn's digits on the CPU, print test accuracy, save a loss curve.

    python examples/train.py --model vit            # or navit, pit, cct, all
    python examples/train.py --model navit --epochs 10 --backend reference

NaViT trains on the digits resized to mixed native resolutions (8-16 px per side, varying aspect ratios),
packed with token dropping; the others on the 8×8 originals.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digits  # noqa: E402
from cct import CCT  # noqa: E402
from navit import NaViT  # noqa: E402
from pit import PiT  # noqa: E402
from vit import ViT  # noqa: E402

MODELS = {
    "vit": lambda backend: ViT(img_size=8, patch_size=2, dim=64, depth=4, num_heads=4, backend=backend),
    "navit": lambda backend: NaViT(patch_size=4, dim=64, depth=4, num_heads=4, max_tokens=256,
                                   token_drop=(0.0, 0.25), backend=backend),
    "pit": lambda backend: PiT(img_size=8, dim=64, depth=4, num_heads=4, pos_embed="sincos", backend=backend),
    "cct": lambda backend: CCT(img_size=8, dim=64, depth=4, num_heads=4, backend=backend),
}


def _batches(n: int, batch_size: int, shuffle: bool, g: torch.Generator):
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _forward(model, name, x, idx):
    return model([x[i] for i in idx.tolist()]) if name == "navit" else model(x[idx])


def train(name: str, epochs: int = 20, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
          backend=None, out_dir: str = "examples/out", progress: bool = True, limit: int = 0) -> dict:
    """Trains model ``name``; returns {"model", "test_accuracy", "seconds", "losses", "plot"}."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits.load(seed)
    if limit:  # a quick run on the first ``limit`` training images (smoke tests)
        x_train, y_train = x_train[:limit], y_train[:limit]
    if name == "navit":
        x_train, x_test = digits.mixed_resolution(x_train, seed=seed), digits.mixed_resolution(x_test, seed=seed + 1)
    model = MODELS[name](backend)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(y_train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"{name:5s}", disable=not progress, leave=False)
    model.train()
    for _ in range(epochs):
        for idx in _batches(len(y_train), batch_size, True, g):
            loss = F.cross_entropy(_forward(model, name, x_train, idx), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for idx in _batches(len(y_test), 256, False, g):
            correct += int((_forward(model, name, x_test, idx).argmax(-1) == y_test[idx]).sum())
    acc = correct / len(y_test)
    plot = _plot(losses, name, out_dir)
    return {"model": name, "test_accuracy": acc, "seconds": seconds, "steps": steps, "losses": losses,
            "plot": plot}


def _plot(losses, name: str, out_dir: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"loss_{name}.png")
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{name} on sklearn digits")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS) + ["all"], default="all")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default=None, help="vitkern backend (default: fastest), or 'torch' for torch SDPA")
    ap.add_argument("--out-dir", default="examples/out")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--limit", type=int, default=0, help="train on the first N training images only (0: all)")
    args = ap.parse_args(argv)
    names = sorted(MODELS) if args.model == "all" else [args.model]
    results = []
    for name in names:
        r = train(name, args.epochs, args.batch_size, args.lr, args.seed, args.backend, args.out_dir,
                  not args.no_progress, args.limit)
        print(f"{name:5s}  test accuracy {r['test_accuracy']:.4f}  ({r['steps']} steps, {r['seconds']:.1f} s)  "
              f"loss curve: {r['plot']}", flush=True)
        results.append({k: v for k, v in r.items() if k != "losses"})
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"torch_threads": torch.get_num_threads(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
