"""loss.png: training and validation curves, drawn from metrics.jsonl when matplotlib is present."""

from __future__ import annotations

from pathlib import Path

from minigpt_cli.engine.core.io import atomic_write_bytes
from minigpt_cli.engine.runs.checkpoint import read_metrics
from minigpt_cli.errors import describe_os_error


def plot_run(run_dir: Path, step: int) -> str | None:
    """Draw a finished run's loss.png; returns the note to log when it could not be written.

    The picture is a view of metrics.jsonl: a full disk here loses nothing of the run, which is
    complete and saved, so it is said, not raised. Without matplotlib (the optional `plot` extra)
    there is simply no picture."""
    try:
        plot_metrics(run_dir)
    except ImportError:
        return None
    except OSError as error:
        reason = describe_os_error(error)
        return f"loss plot not written ({reason}); the run is complete at step {step}"
    return None


def plot_metrics(run_dir: Path) -> Path | None:
    """Write `run_dir/loss.png`; returns its path, or None when there is nothing to draw."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    val = [
        (r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval" and "val_loss" in r
    ]
    if not train and not val:
        return None
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        axis.plot(*zip(*train, strict=True), label="train loss")
    if val:
        axis.plot(*zip(*val, strict=True), marker="o", label="validation loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (nats/token)")
    axis.set_title(run_dir.name)
    axis.grid(alpha=0.3)
    axis.legend()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    target = run_dir / "loss.png"
    atomic_write_bytes(target, buffer.getvalue())
    return target
