"""The paper's error-feedback demonstration on the Rosenbrock function.

    python examples/rosenbrock.py --out rosenbrock.png

Three optimizers minimise the Rosenbrock function from the same start: Adam; top-k
Adam without error feedback (MicroAdam with its EF cleared after every step, so what
top-k drops is lost); and top-k Adam with error feedback (MicroAdam as it is).

With only two coordinates, keeping the top 1 lets each coordinate through often
(the valley wall's gradient vanishes on the valley floor), so the loss of the
dropped coordinates hardly shows. We therefore use the standard multi-dimensional
form, `pairs` independent copies of f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 in one
tensor (10 coordinates by default), and keep 1 coordinate per step (density 10%).
Without EF, the small valley-floor gradients are never the largest and those
coordinates stall; with EF they accumulate until they are selected.

Prints each variant's final distance to the optimum (all ones) and writes a PNG of
the three paths of the first (x, y) pair.
"""

from __future__ import annotations

import argparse

import torch

from microadam_dist import MicroAdam

START = (-1.2, 1.0)  # the classic starting point, for every pair
OPTIMUM = (1.0, 1.0)


def rosenbrock(z: torch.Tensor) -> torch.Tensor:
    """Sum over pairs (z[2i], z[2i+1]) of (1 - x)^2 + 100 (y - x^2)^2."""
    x, y = z[0::2], z[1::2]
    return ((1 - x) ** 2 + 100 * (y - x ** 2) ** 2).sum()


def run(variant: str, steps: int, lr: float, pairs: int = 5) -> tuple[list[tuple[float, float]], float]:
    """One variant ("adam", "topk" without EF, "topk_ef"): the first pair's path and the
    final distance of the whole vector to the optimum."""
    d = 2 * pairs
    z = torch.nn.Parameter(torch.tensor(START * pairs, dtype=torch.float32))
    if variant == "adam":
        opt = torch.optim.Adam([z], lr=lr)
    else:
        # keep 1 of the d coordinates per step; quant blocks of 2 keep the EF nearly exact
        opt = MicroAdam([z], lr=lr, m=10, density=1.0 / d, topk_block=d, quant_block=2)
    path = [tuple(z.detach()[:2].tolist())]
    for _ in range(steps):
        opt.zero_grad()
        rosenbrock(z).backward()
        opt.step()
        if variant == "topk":
            state = opt.state[z]
            for key in ("ef", "ef_min", "ef_max"):  # forget what top-k dropped
                state[key].zero_()
        path.append(tuple(z.detach()[:2].tolist()))
    return path, float((z.detach() - 1.0).norm())


def plot(paths: dict[str, list[tuple[float, float]]], distances: dict[str, float], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"adam": "Adam", "topk": "Top-k Adam (no EF)", "topk_ef": "Top-k Adam + EF (MicroAdam)"}
    xs = torch.linspace(-2.0, 2.0, 300)
    ys = torch.linspace(-1.0, 3.0, 300)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    z = (1 - gx) ** 2 + 100 * (gy - gx ** 2) ** 2
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    for ax, (name, path) in zip(axes, paths.items()):
        ax.contour(gx.numpy(), gy.numpy(), torch.log1p(z).numpy(), levels=25, cmap="viridis", linewidths=0.6)
        px, py = zip(*path)
        ax.plot(px, py, "r.-", markersize=2, linewidth=0.8)
        ax.plot(*START, "ko", label="start")
        ax.plot(*OPTIMUM, "b*", markersize=12, label="optimum")
        ax.set_title(f"{titles[name]}\ndistance to optimum {distances[name]:.3f}")
        ax.set_xlabel("x (first pair)")
    axes[0].set_ylabel("y")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--out", default="rosenbrock.png")
    args = ap.parse_args()
    runs = {v: run(v, args.steps, args.lr, args.pairs) for v in ("adam", "topk", "topk_ef")}
    paths = {name: r[0] for name, r in runs.items()}
    distances = {name: r[1] for name, r in runs.items()}
    for name in runs:
        print(f"{name:8s} first pair ends at ({paths[name][-1][0]: .4f}, {paths[name][-1][1]: .4f}); "
              f"distance of all {2 * args.pairs} coordinates to the optimum {distances[name]:.4f}")
    plot(paths, distances, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
