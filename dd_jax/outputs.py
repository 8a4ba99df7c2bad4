"""Stage 8 - outputs: the distilled data as a portable .npz, image grids, metrics, JSON.

The .npz format is documented in README.md ("The distilled-data file"): version 1 holds hard
labels and plain-GD data; version 2 adds learned label vectors (`soft_labels`) and the inner
optimiser. A file needing neither is written as version 1; both versions load.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dd_jax.errors import DataError
from dd_jax.outer import DistilledData

FORMAT_VERSION = 2  # the newest version written; FORMAT_VERSIONS are read
FORMAT_VERSIONS = (1, 2)


def _flatten(tree: dict, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _unflatten(flat: dict[str, np.ndarray], prefix: str) -> dict | None:
    tree: dict = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        *path, leaf = key[len(prefix):].split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree or None


def save_distilled(path: str | Path, d: DistilledData, model: str = "") -> None:
    """Writes `d` as an .npz (atomically); init_params, if any, as 'init/<layer>/<name>'.
    Version 2 (with 'soft_labels' (S, n, K) float32 if learned, 'inner_optimizer',
    'inner_momentum') when the data has learned labels or an inner optimiser other than plain
    GD, else version 1."""
    path = Path(path)
    v2 = d.soft_labels is not None or d.inner_optimizer != "gd"
    arrays = {
        "format_version": np.int32(FORMAT_VERSION if v2 else 1),
        "images": np.asarray(d.images, np.float32),
        "labels": np.asarray(d.labels, np.int32),
        "step_sizes": np.asarray(d.step_sizes, np.float32),
        "steps": np.int32(d.steps),
        "epochs": np.int32(d.epochs),
        "mean": np.asarray(d.mean, np.float32),
        "std": np.asarray(d.std, np.float32),
        "init_regime": np.array(d.init_regime),
        "init_dist": np.array(d.init_dist),
        "init_gain": np.float32(d.init_gain),
        "seed": np.int64(d.seed),
        "model": np.array(model),
    }
    if d.init_params is not None:
        arrays.update(_flatten(d.init_params, "init/"))
    if d.pool is not None:
        arrays["pool"] = np.array(json.dumps(d.pool, sort_keys=True))
    if d.selected is not None:
        arrays["selected"] = np.array(json.dumps(d.selected, sort_keys=True))
    if v2:
        arrays["inner_optimizer"] = np.array(d.inner_optimizer)
        arrays["inner_momentum"] = np.float32(d.inner_momentum)
    if d.soft_labels is not None:
        arrays["soft_labels"] = np.asarray(d.soft_labels, np.float32)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_distilled(path: str | Path) -> DistilledData:
    """Reads an .npz written by `save_distilled` (format version 1 or 2)."""
    try:
        with np.load(path) as f:
            flat = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read distilled data from {path}: {e}") from None
    if int(flat.get("format_version", -1)) not in FORMAT_VERSIONS:
        raise DataError(f"{path} is not a dd_jax distilled-data file (format "
                        f"{' or '.join(map(str, FORMAT_VERSIONS))})")
    return DistilledData(
        images=flat["images"], labels=flat["labels"], step_sizes=flat["step_sizes"],
        epochs=int(flat["epochs"]), mean=tuple(flat["mean"].tolist()),
        std=tuple(flat["std"].tolist()), init_regime=str(flat["init_regime"]),
        init_dist=str(flat["init_dist"]), init_gain=float(flat["init_gain"]),
        seed=int(flat["seed"]), init_params=_unflatten(flat, "init/"),
        pool=json.loads(str(flat["pool"])) if "pool" in flat else None,
        selected=json.loads(str(flat["selected"])) if "selected" in flat else None,
        soft_labels=flat.get("soft_labels"),
        inner_optimizer=str(flat.get("inner_optimizer", "gd")),
        inner_momentum=float(flat.get("inner_momentum", 0.9)),
    )


def distilled_model(path: str | Path) -> str:
    """The model name an .npz of `save_distilled` records ('' if none was given)."""
    try:
        with np.load(path) as f:
            return str(f["model"]) if "model" in f.files else ""
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read distilled data from {path}: {e}") from None


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


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty JSON, written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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


def markdown_table(columns: list[str] | tuple[str, ...], rows: list) -> str:
    """A markdown table of `rows` (sequences of cells, printed with str) under `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
