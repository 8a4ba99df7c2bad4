"""The 'baselines' kind of run: every method of config.baselines built (`baselines.BaselineMaker`),
saved as a distilled set, tested like distilled data (`evaluation.evaluate`) and by k-NN
(`knn.knn_of`), with config.distilled's own set as a last row when given."""
from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from dd_jax.baselines import BaselineMaker, parse_methods, validate_baselines_config
from dd_jax.dataset import Dataset
from dd_jax.distilled import DistilledData, distilled_model, load_distilled, save_distilled
from dd_jax.errors import ConfigError, DataError
from dd_jax.evaluation import accuracy_row, evaluate
from dd_jax.knn import knn_of
from dd_jax.models import as_model
from dd_jax.outputs import save_image_grid, write_json
from dd_jax.runs import RESULTS, load_data_and_model, refuse_resume, start_run


def evaluate_row(method: str, data: DistilledData, dataset: Dataset, model_fn, config) -> dict:
    """Test accuracy (`evaluate`, n_eval_nets held-out inits in the random regime) and k-NN
    accuracy of one set, as a results.json row."""
    acc = evaluate(data, dataset, model_fn, n_nets=config.n_eval_nets)
    return {**accuracy_row(method, acc), "untrained_acc": acc["untrained"]["mean"],
            "knn_acc": knn_of(data, dataset, config.knn_k)}


# --------------------------------------------------------------------------- the experiment


def shapes(tree) -> dict[str, tuple[int, ...]]:
    """{leaf path: shape} of a parameter tree."""
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def load_reference(config, dataset: Dataset, model_fn) -> DistilledData:
    """The distilled data at config.distilled, checked against the dataset, the model (its
    recorded name and, for a fixed theta_0, the parameters' shapes) and knn_k."""
    d = load_distilled(config.distilled)
    if d.images.shape[2:] != dataset.image_shape:
        raise DataError(f"{config.distilled} holds images of shape {d.images.shape[2:]}, but "
                        f"{config.dataset} has {dataset.image_shape}; pass its own dataset")
    made_for = distilled_model(config.distilled)
    if made_for and made_for != config.model:
        raise DataError(f"{config.distilled} was distilled for model {made_for!r}, this run "
                        f"uses {config.model!r}; pass --model={made_for} or data distilled for "
                        f"{config.model}")
    if d.labels.max() >= dataset.num_classes:
        raise DataError(f"{config.distilled} has labels up to {d.labels.max()}, but "
                        f"{config.dataset} has {dataset.num_classes} classes; pass its own dataset")
    if d.init_params is not None and shapes(d.init_params) != shapes(jax.eval_shape(
            as_model(model_fn).init, jax.random.PRNGKey(0), dataset.train_x[:1])):
        raise DataError(f"{config.distilled} holds a theta_0 whose parameters do not fit "
                        f"{config.model} for {config.dataset}; pass data distilled for it")
    if config.knn_k > d.labels.size:
        raise ConfigError(f"knn_k={config.knn_k} exceeds the {d.labels.size} images in "
                          f"{config.distilled}; lower --knn_k")
    return d


def run_baselines(config, workdir: str | Path, *, name: str = "", resume: bool = False,
                   progress: bool = True) -> dict:
    """A 'baselines' run: every method of config.baselines (and config.distilled, if given) into
    `workdir` - baseline_<method>.npz/.png and results.json with one row per set."""
    from tqdm.auto import tqdm

    refuse_resume(config, resume)
    workdir = Path(workdir)
    validate_baselines_config(config)
    methods = parse_methods(config.baselines)
    dataset, model = load_data_and_model(config)
    distilled = load_reference(config, dataset, model) if config.distilled else None
    t0 = time.perf_counter()
    maker = BaselineMaker(dataset, model, config)  # checks the split before anything is written
    machine = start_run(config, workdir, name)

    rows = []
    for method in tqdm(methods, desc="baselines", disable=not progress, dynamic_ncols=True):
        t = time.perf_counter()
        b = maker.make(method)
        save_distilled(workdir / f"baseline_{method}.npz", b.data, model=config.model)
        save_image_grid(workdir / f"baseline_{method}.png", b.data)
        row = evaluate_row(method, b.data, dataset, model, config)
        rows.append({**row, "step_size": b.step_size, "score_acc": b.score,
                     "step_size_scores": {str(k): v for k, v in b.step_size_scores.items()},
                     **({"candidate_scores": b.candidate_scores} if b.candidate_scores else {}),
                     "seconds": time.perf_counter() - t})
    if distilled is not None:
        t = time.perf_counter()
        row = evaluate_row("distilled", distilled, dataset, model, config)
        rows.append({**row, "step_size": None, "source": str(config.distilled),
                     "source_init_regime": distilled.init_regime, "seconds": time.perf_counter() - t})

    best = max(rows[:len(methods)], key=lambda r: r["test_acc"])
    results = {
        "experiment": name, "kind": "baselines", "dataset": config.dataset,
        "init_regime": config.init_regime, "images": int(maker.labels.size),
        "steps": config.steps, "epochs": config.epochs, "test_examples": int(len(dataset.test_y)),
        "test_acc": best["test_acc"], "test_acc_std": best["test_acc_std"],
        "eval_nets": best["eval_nets"], "test_acc_method": best["method"],
        "score_holdout": config.score_holdout, "knn_k": config.knn_k, "rows": rows,
        "distill_seconds": time.perf_counter() - t0, "machine": machine,
    }
    write_json(workdir / RESULTS, results)
    return results
