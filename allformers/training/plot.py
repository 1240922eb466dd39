"""Loss curves from a metrics.jsonl file. Uses matplotlib's object API with the Agg canvas,
so it never touches pyplot's global state or needs a display."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path, png_path, title: str = "") -> Path:
    """Train loss at each logged step (thin line) and eval train/val loss (markers) against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.5, color="tab:blue", label="train (batch)")
    for key, color in (("train_loss", "tab:blue"), ("val_loss", "tab:orange")):
        pts = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=4, color=color, label=key.replace("_loss", " (eval)"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    return png_path
