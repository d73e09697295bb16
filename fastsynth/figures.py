"""Figures: triplets (paper Fig. 4), training curves, sorted feature variance with the lambda
line (Fig. 2's point), and a 2-D embedding of test features.

Plots use matplotlib's file-only backend; the triplets need only torchvision.
"""
from __future__ import annotations

import json

import torch
from torchvision.utils import save_image

from fastsynth.data.transforms import denormalize


def save_triplets(x: torch.Tensor, x_hat: torch.Tensor, x_tilde: torch.Tensor, path: str, n: int = 8) -> None:
    """Three rows: plain images x, reconstructions D(z), perturbed reconstructions D(z_tilde)."""
    n = min(n, x.shape[0])
    rows = [denormalize(t[:n].detach().cpu()) for t in (x, x_hat, x_tilde)]
    save_image(torch.cat(rows, dim=0), path, nrow=n, padding=2)


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt
    return plt


def save_curves(metrics_jsonl: str, path: str) -> None:
    """Per-epoch loss terms of the warm-up and SSL stages from a run's metrics.jsonl."""
    plt = _plt()
    records = [json.loads(line) for line in open(metrics_jsonl) if line.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, stage in zip(axes, ("warmup", "ssl")):
        rows = [r for r in records if r.get("stage") == stage and "epoch" in r]
        keys = sorted({k for r in rows for k in r if k.startswith("l") or k == "loss"} - {"lr"})
        for k in keys:
            pts = [(r["epoch"] + 1, r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=k)
        ax.set_title(f"{stage} losses"), ax.set_xlabel("epoch")
        if keys:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_variance(variance: torch.Tensor, lam: float, path: str) -> None:
    """Per-dimension variance of the bank's features, normalised (v_bar, Sec. 3.4) and sorted,
    with the lambda threshold: the dimensions left of the crossing get eps_v."""
    plt = _plt()
    v = variance.double()
    v_bar = (v / v.norm().clamp_min(1e-12)).sort(descending=True).values.numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(v_bar, label="v_bar (sorted)")
    ax.axhline(lam, color="r", linestyle="--", label=f"lambda = {lam}")
    low = int((v_bar < lam).sum())
    ax.set_title(f"bank variance: {low} of {len(v_bar)} dims below lambda")
    ax.set_xlabel("dimension (sorted)"), ax.set_yscale("log"), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_embedding(features: torch.Tensor, labels: torch.Tensor, path: str, seed: int = 0) -> str:
    """2-D t-SNE (scikit-learn) of test features coloured by class; UMAP when installed.
    Returns the method used."""
    plt = _plt()
    x = torch.nn.functional.normalize(features.float(), dim=1).numpy()
    try:
        import umap  # optional
        xy, method = umap.UMAP(random_state=seed).fit_transform(x), "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE
        xy = TSNE(n_components=2, init="pca", random_state=seed,
                  perplexity=min(30.0, max(2.0, (len(x) - 1) / 3))).fit_transform(x)
        method = "t-SNE"
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(xy[:, 0], xy[:, 1], c=labels.numpy(), cmap="tab20", s=6)
    ax.set_title(f"test features ({method})"), ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return method
