"""Loss curves from a metrics.jsonl file. Uses matplotlib's object API with the Agg canvas,
so it never touches pyplot's global state or needs a display."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


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


def plot_rlhf(ppo_metrics, dpo_metrics, png_path, baseline_rate: Optional[float] = None) -> Path:
    """Three panels against optimizer step: PPO's mean reward-model score and KL per reply to the
    starting policy (per rollout phase), the property rate of PPO's rollouts, and DPO's loss and
    pair accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ppo = [r for r in read_metrics(ppo_metrics) if r.get("event") == "train"]
    dpo = [r for r in read_metrics(dpo_metrics) if r.get("event") == "train"]
    fig = Figure(figsize=(13, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    if ppo:
        steps = [r["step"] for r in ppo]
        ax1.plot(steps, [r.get("score") for r in ppo], color="tab:green", label="reward (RM score)")
        ax1.set_ylabel("reward")
        twin = ax1.twinx()
        twin.plot(steps, [r.get("kl") for r in ppo], color="tab:red", label="KL / reply (nats)")
        twin.set_ylabel("KL to start (nats / reply)")
        ax1.legend(loc="upper left")
        twin.legend(loc="lower right")
        ax2.plot(steps, [r.get("property") for r in ppo], color="tab:purple", label="PPO rollouts")
        if baseline_rate is not None:
            ax2.axhline(baseline_rate, ls="--", color="gray", label="start (held-out)")
        ax2.set_ylim(-0.02, 1.02)
        ax2.legend()
    ax1.set_title("PPO: reward and KL")
    ax2.set_title("PPO: replies with the property")
    ax2.set_ylabel("share")
    if dpo:
        steps = [r["step"] for r in dpo]
        ax3.plot(steps, [r["loss"] for r in dpo], color="tab:blue", label="DPO loss")
        ax3.plot(steps, [r.get("accuracy") for r in dpo], color="tab:orange", label="pair accuracy")
        ax3.legend()
    ax3.set_title("DPO")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    return png_path
