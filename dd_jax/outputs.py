"""Stage 8 - outputs: image grids, learning curves, the poisoning chart, metrics, JSON and
markdown tables (the distilled data's own file: dd_jax.distilled)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dd_jax.distilled import DistilledData
from dd_jax.errors import ConfigError
from dd_jax.files import atomic_path


@contextlib.contextmanager
def saved_figure(path: str | Path, *, dpi: int, pad: float = 1.08, **subplots) -> Iterator[tuple]:
    """``with saved_figure(path, dpi=..., figsize=...) as (fig, axes):`` draw, and on leaving
    the figure is laid out (``tight_layout(pad)``), written to `path` and closed.

    matplotlib (Agg backend, no display) is imported only here; `subplots` goes to
    ``plt.subplots``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout(pad=pad)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def save_image_grid(path: str | Path, d: DistilledData, class_names: list[str] | None = None) -> None:
    """PNG: one row per distilled step (its step sizes in the row title), one column per image,
    titled with its label (learned labels: the largest entry's class and value)."""
    steps, n = d.labels.shape
    pixels = np.clip(np.asarray(d.images) * np.asarray(d.std) + np.asarray(d.mean), 0, 1)
    size = (n * 0.9 + 1.3, steps * 1.05 + 0.1)
    with saved_figure(path, dpi=100, pad=0.2, nrows=steps, ncols=n, figsize=size,
                      squeeze=False) as (_, axes):
        for s in range(steps):
            etas = ", ".join(f"{d.step_sizes[s + e * steps]:.3g}" for e in range(d.epochs))
            for j in range(n):
                ax = axes[s, j]
                img = pixels[s, j]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                label = int(d.labels[s, j])
                title = class_names[label] if class_names else str(label)
                if d.soft_labels is not None:
                    title += f" ({d.soft_labels[s, j, label]:.2f})"
                ax.set_title(title, fontsize=7, pad=2)
            axes[s, 0].set_ylabel(f"step {s}\nlr {etas}".replace(", ", ",\n"), fontsize=6,
                                  rotation=0, ha="right", va="center")


def save_curves(path: str | Path, rows: list[dict]) -> None:
    """PNG of metrics.jsonl rows against iterations: the meta-loss, each learned step size, and
    the test (and validation) accuracy of the periodic evaluations."""
    logged = [r for r in rows if "step_sizes" in r]
    with saved_figure(path, dpi=100, nrows=1, ncols=3, figsize=(14, 3.8)) as (_, axes):
        loss_ax, steps_ax, acc_ax = axes
        losses = [r["meta_loss"] for r in rows]
        loss_ax.plot([r["iteration"] for r in rows], losses)
        loss_ax.set(xlabel="iteration", ylabel="meta-loss", title="meta-loss",
                    yscale="log" if min(losses, default=0) > 0 else "linear")
        if logged:
            steps_ax.plot([r["iteration"] for r in logged],
                          np.array([r["step_sizes"] for r in logged]), linewidth=0.8)
        steps_ax.set(xlabel="iteration", ylabel="step size",
                     title="learned step sizes (one line per inner step)")
        for key, label in (("test_acc", "test"), ("val_acc", "validation")):
            points = [r for r in rows if key in r]
            if points:
                acc_ax.plot([r["iteration"] for r in points], [100 * r[key] for r in points],
                            marker="o", markersize=3, label=label)
        acc_ax.set(xlabel="iteration", ylabel="accuracy (%)", title="accuracy at evaluations")
        if acc_ax.lines:
            acc_ax.legend()


def save_poison_chart(path, results: dict) -> None:
    """PNG: attack success and other classes' accuracy, before and after (mean +- std over the
    evaluation networks), from a poisoning run's results (`poison.poison_results` merged in)."""
    k, t = results["poison_class"], results["poison_target"]
    metrics = (("attack_success", f"class {k} predicted as {t}"),
               ("other_class_acc", f"accuracy on classes other than {k}"))
    with saved_figure(path, dpi=110, figsize=(6.4, 3.4)) as (_, ax):
        width = 0.38
        for i, row in enumerate(results["rows"]):
            xs = np.arange(len(metrics)) + (i - 0.5) * width
            means = [100 * row[m] for m, _ in metrics]
            bars = ax.bar(xs, means, width, yerr=[100 * row[f"{m}_std"] for m, _ in metrics],
                          capsize=3, label=row["method"], color=("0.65", "tab:red")[i])
            ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        ax.set_xticks(np.arange(len(metrics)), [label for _, label in metrics], fontsize=8)
        ax.set_ylabel("% of test images")
        ax.set_ylim(0, 125)
        ax.set_yticks(range(0, 101, 20))
        n_nets = results["rows"][-1]["eval_nets"]
        ax.set_title(f"{results.get('experiment') or 'poisoning'}: {results['images']} distilled images,"
                     f" {n_nets} network{'s' if n_nets != 1 else ''}", fontsize=9)
        ax.legend(title="trained on the\ndistilled data", fontsize=8, title_fontsize=8,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty JSON, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


class MetricsLog:
    """Appends one JSON object per line; on resume drops rows past the checkpoint's iteration."""

    def __init__(self, path: str | Path, keep_until: int | None = None):
        self.path = Path(path)
        if keep_until is not None and self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r.get("iteration", 0) <= keep_until]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif keep_until is None:
            self.path.write_text("")

    def __call__(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class TensorBoardLog:
    """Writes each metrics row's numbers as TensorBoard scalars at step row['iteration']
    (meta_loss, test_acc, val_acc, ...; step_sizes as step_size/<t>) into the directory `path`.
    A resumed run passes the checkpoint's iteration as `purge_after`: the curves drop the
    rows written after it, as `MetricsLog` does."""

    def __init__(self, path: str | Path, purge_after: int | None = None):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboardX package: pip install "
                              "tensorboardX (or pip install -e '.[tensorboard]')") from None
        self.writer = SummaryWriter(str(path), purge_step=None if purge_after is None else purge_after + 1)

    def __call__(self, row: dict) -> None:
        step = row["iteration"]
        for key, value in row.items():
            if key == "step_sizes":
                for t, size in enumerate(value):
                    self.writer.add_scalar(f"step_size/{t}", size, step)
            elif key != "iteration" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        """Writes what is still queued and closes the event file."""
        self.writer.close()


def markdown_table(columns: list[str] | tuple[str, ...], rows: list) -> str:
    """A markdown table of `rows` (sequences of cells, printed with str) under `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
