"""A whole run, as `python -m experiments.run` does it: data -> distill -> evaluate -> outputs.

A run directory holds config.json, metrics.jsonl, checkpoint.npz, distilled.npz,
distilled.png and results.json (a poisoning run also poisoning.png).
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import flax.linen as nn
import jax

from dd_jax.checkpoint import checkpoint_meta
from dd_jax.data import Dataset, load_dataset
from dd_jax.errors import ConfigError
from dd_jax.evaluation import evaluate
from dd_jax.models import get_model
from dd_jax.outer import CHECKPOINT, METRICS, distill, validate_config
from dd_jax.outputs import MetricsLog, save_distilled, save_image_grid, write_json
from dd_jax.poison import poison_results, save_poison_chart

CONFIG = "config.json"
RESULTS = "results.json"


def prepare_workdir(workdir: Path, resume: bool) -> None:
    """Refuses to overwrite an earlier run's checkpoint or results, and to resume no run.

    A directory whose run stopped before its first checkpoint holds nothing worth keeping:
    a plain rerun starts afresh there, and so does --resume.
    """
    if resume and not (workdir / CONFIG).exists():
        raise ConfigError(f"nothing to resume: {workdir} holds no run; drop --resume")
    if not resume and any((workdir / f).exists() for f in (CHECKPOINT, RESULTS)):
        raise ConfigError(
            f"{workdir} already holds a run; pass --resume to continue it, or choose a new "
            "directory with --output_dir=DIR"
        )
    workdir.mkdir(parents=True, exist_ok=True)


def load_data_and_model(config) -> tuple[Dataset, nn.Module]:
    """The config's dataset (subset as configured) and its model for that many classes."""
    dataset = load_dataset(config.dataset, config.data_dir or None)
    dataset = dataset.subset(config.train_subset, config.test_subset)
    return dataset, get_model(config.model, dataset.num_classes, config.conv)


def run(config, workdir: str | Path, *, name: str = "", resume: bool = False,
        progress: bool = True) -> dict:
    """Runs one experiment into `workdir` and returns what results.json holds."""
    workdir = Path(workdir)
    validate_config(config)
    dataset, model = load_data_and_model(config)
    prepare_workdir(workdir, resume)
    write_json(workdir / CONFIG, {"experiment": name, **config.to_dict()})

    resume = resume and (workdir / CHECKPOINT).exists()
    keep_until = checkpoint_meta(workdir / CHECKPOINT)["iteration"] if resume else None
    log = MetricsLog(workdir / METRICS, keep_until)
    distilled = distill(dataset, model, config, workdir=workdir, resume=resume,
                        progress=progress, log=log)
    save_distilled(workdir / "distilled.npz", distilled, model=config.model)
    save_image_grid(workdir / "distilled.png", distilled)

    t1 = time.perf_counter()
    acc = evaluate(distilled, dataset, model, n_nets=config.n_eval_nets)
    results = {
        "experiment": name,
        "dataset": config.dataset,
        "init_regime": config.init_regime,
        "images": int(distilled.labels.size),
        "steps": distilled.steps,
        "epochs": distilled.epochs,
        "test_examples": int(len(dataset.test_y)),
        "test_acc": acc["mean"],
        "test_acc_std": acc["std"],
        "eval_nets": acc["n_nets"],
        "test_accs": acc["accuracies"],
        "untrained_acc": acc["untrained"]["mean"],
        "untrained_acc_std": acc["untrained"]["std"],
        "step_sizes": distilled.step_sizes.tolist(),
        "distill_seconds": checkpoint_meta(workdir / CHECKPOINT)["seconds"],
        "eval_seconds": time.perf_counter() - t1,
        "machine": {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()],
                    "jax": jax.__version__},
    }
    if config.poison_class >= 0:
        results.update(poison_results(distilled, dataset, model, config, results["distill_seconds"]))
        save_poison_chart(workdir / "poisoning.png", results)
    write_json(workdir / RESULTS, results)
    return results
