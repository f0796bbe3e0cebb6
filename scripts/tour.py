"""A guided look at Atlas-B/16 on a real photograph: layout, size, one forward pass, and a figure.

    python scripts/tour.py [--size 1024] [--out results/tour]

The photograph is scikit-image's ``astronaut`` (shipped inside the package, nothing is downloaded). The
weights are random: this shows the machinery (scales, windows, what each stage keeps), not a trained model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib
import numpy as np
import timm
import torch

import atlas  # noqa: F401  (registers the Atlas models with timm)
from atlas.viz import draw_windows, load_photo, upsample_to

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def normalise(picture: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` floats in [0, 1] -> the ImageNet-normalised ``(1, 3, H, W)`` tensor the model expects."""
    x = torch.from_numpy(picture).permute(2, 0, 1)[None]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="atlas_base_patch16")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("results/tour"))
    args = parser.parse_args()
    torch.manual_seed(0)

    model = timm.create_model(args.model, img_size=args.size, num_classes=100).eval()
    layout = model.config.layout
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model} at {args.size}x{args.size}px: {n_params:,} parameters, depths {model.config.depths}")
    print(f"stem: {args.size}px -> {layout.token_size[0]}x{layout.token_size[1]} tokens of {model.embed_dim} channels")
    print(layout.describe())

    picture = load_photo("astronaut", (args.size, args.size))
    x = normalise(picture)
    start = time.perf_counter()
    with torch.no_grad():
        _, stages = model.forward_stages(x)
        logits = model.forward_head(stages[-1][-1].flatten(1, 2))
    seconds = time.perf_counter() - start
    print(f"forward pass on the astronaut photo: {seconds:.1f}s on {torch.get_num_threads()} threads")
    for i, maps in enumerate(stages):
        kept = ", ".join(f"scale {i + j + 1} {m.shape[1]}x{m.shape[2]}" for j, m in enumerate(maps))
        print(f"  after stage {i + 1} ({model.config.depths[i]} blocks): {kept}")
    print(f"logits {tuple(logits.shape)} (random weights, so the classes mean nothing yet)")

    n = layout.num_scales
    fig, axes = plt.subplots(2, n, figsize=(4.5 * n, 9), squeeze=False)
    for s in range(n):
        sc = layout.scales[s]
        axes[0, s].imshow(picture)
        draw_windows(axes[0, s], layout, picture.shape[:2], s, color="yellow")
        axes[0, s].set_title(f"scale {s + 1}: {sc.size[0]}x{sc.size[1]} tokens\n{sc.grid[0]}x{sc.grid[1]} windows")
        norm = stages[0][s][0].norm(dim=-1).numpy()
        axes[1, s].imshow(upsample_to(norm, picture.shape[:2]), cmap="magma")
        axes[1, s].set_title(f"scale {s + 1} after stage 1: token norms")
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(
        f"{args.model} at {args.size}px\neach window is {layout.window_size}x"
        f"{layout.window_size} tokens; one coarse token summarises {layout.pool_stride}x"
        f"{layout.pool_stride} finer ones"
    )
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scales.png"
    fig.savefig(path, dpi=60)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
