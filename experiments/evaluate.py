"""Evaluate a distilled set (distilled.npz, or a baseline_*.npz) under a protocol, on any model.

    python -m experiments.evaluate DISTILLED.npz [--protocol=paper|standard]
        [--model=lenet|mlp|convnet] [--epochs=300] [--n_nets=20] [--augment]
        [--test_subset=N] [--dataset=NAME] [--out=DIR] [--seed=0]

--protocol=standard (default): n_nets networks of --model trained from scratch on the distilled
images by minibatch SGD (lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, --epochs, lr x0.1
for the second half; --augment: random scale, rotation and shift), as DC/DSA/MTT report.
--protocol=paper: the set's own learned steps and step sizes from its regime's
initialisations (fixed: its stored theta_0; random: n_nets held-out draws), on the model it was
distilled for. Mean +- std of the test accuracy (the full test set unless --test_subset) goes
to DIR/evaluate_<protocol>_<model>.json and .md (DIR: --out, default the npz's folder; a file
not named distilled.npz adds its name: evaluate_standard_lenet_baseline_kmeans.json). The
dataset defaults to the one named in config.json beside the npz, else mnist. Under the standard
protocol, networks whose weights end non-finite are counted ('diverged' in the JSON) and a
warning line on stderr says how many, and why when the soft labels have negative entries.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from dd_jax.allocator import command_line_args
from dd_jax.data import load_dataset
from dd_jax.distilled import load_distilled
from dd_jax.errors import ConfigError, DataError, DDJaxError
from dd_jax.outputs import markdown_table, write_json
from dd_jax.protocols import ARCHITECTURES, PROTOCOLS, Recipe, architecture, evaluate_protocol
from experiments.flags import parse_flags

USAGE = ("usage: python -m experiments.evaluate DISTILLED.npz [--protocol=paper|standard] "
         "[--model=lenet|mlp|convnet] [--epochs=300] [--n_nets=20] [--augment] "
         "[--test_subset=N] [--dataset=NAME] [--out=DIR] [--seed=0]")
# flag -> (default, type); None defaults are filled in from the set
FLAGS = {"protocol": ("standard", str), "model": ("lenet", str), "epochs": (300, int),
         "n_nets": (20, int), "test_subset": (0, int), "dataset": (None, str),
         "out": (None, str), "seed": (0, int)}


def parse_args(argv: list[str]) -> tuple[str | None, dict, set[str]]:
    """argv -> (npz path, {flag: value} with defaults, switches). Valued flags are given as
    --flag=VALUE or --flag VALUE."""
    paths, values, switches = parse_flags(argv, FLAGS, USAGE, switches=("augment",), positionals=1)
    return (paths[0] if paths else None), values, switches


def stored_field(path: Path, key: str) -> str:
    """A string field of the npz (e.g. 'model', the architecture it was distilled for); ''
    when absent."""
    with np.load(path) as f:
        return str(f[key]) if key in f.files else ""


def default_dataset(path: Path) -> str:
    """The dataset named in the run's config.json beside the npz, else 'mnist'."""
    config = path.parent / "config.json"
    if config.exists():
        return json.loads(config.read_text()).get("dataset", "mnist")
    return "mnist"


def evaluate_file(path: str | Path, *, protocol: str = "standard", model: str = "lenet",
                  dataset: str | None = None, n_nets: int = 20, seed: int = 0,
                  recipe: Recipe | None = None, test_subset: int = 0) -> dict:
    """Evaluates the set at `path` (experiments.evaluate's flags as keywords); returns the
    record the CLI writes as JSON. The paper protocol needs the set's own architecture."""
    recipe = Recipe() if recipe is None else recipe
    path = Path(path)
    distilled = load_distilled(path)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    if model not in ARCHITECTURES:
        raise ConfigError(f"unknown model {model!r}; choose one of: {', '.join(ARCHITECTURES)}")
    made_for = stored_field(path, "model")
    if protocol == "paper" and made_for and model != made_for:
        raise ConfigError(f"the paper protocol trains the architecture the set was distilled "
                          f"for ({made_for}), not {model}; use --model={made_for}, or "
                          "--protocol=standard")
    dataset = dataset or default_dataset(path)
    data = load_dataset(dataset).subset(0, test_subset)
    if tuple(np.round(data.mean, 4)) != tuple(np.round(distilled.mean, 4)) or \
            tuple(np.round(data.std, 4)) != tuple(np.round(distilled.std, 4)):
        raise DataError(f"the set was normalised with mean {distilled.mean}, std "
                        f"{distilled.std}; {dataset} uses {data.mean}, {data.std}")
    t0 = time.perf_counter()
    acc = evaluate_protocol(protocol, distilled, data, architecture(model, data.num_classes),
                            n_nets=n_nets, seed=seed, recipe=recipe)
    record = {
        "distilled": str(path), "protocol": protocol, "model": model, "dataset": dataset,
        "distilled_for": made_for, "init_regime": distilled.init_regime,
        "images": int(np.prod(distilled.images.shape[:2])),
        "labels": "hard" if distilled.soft_labels is None else "soft",
        "test_examples": int(len(data.test_y)), "test_acc": acc["mean"],
        "test_acc_std": acc["std"], "eval_nets": acc["n_nets"], "test_accs": acc["accuracies"],
        "seconds": time.perf_counter() - t0,
    }
    if protocol == "paper":
        record.update(steps=distilled.steps, epochs=distilled.epochs,
                      inner_optimizer=distilled.inner_optimizer,
                      untrained_acc=acc["untrained"]["mean"],
                      untrained_acc_std=acc["untrained"]["std"])
    else:
        record.update(recipe=dataclasses.asdict(recipe), seed=seed, diverged=acc["diverged"],
                      negative_labels=bool(distilled.soft_labels is not None
                                           and (distilled.soft_labels < 0).any()))
    return record


def divergence_warning(record: dict) -> str:
    """'' or a line saying how many networks diverged, and why when the labels say why."""
    if not record.get("diverged"):
        return ""
    why = (": the soft labels have negative entries, which make the soft-target cross-entropy "
           "unbounded below under long training (--nonneg_labels=true keeps distilled labels >= 0)"
           if record["negative_labels"] else "")
    return (f"warning: {record['diverged']} of {record['eval_nets']} networks diverged "
            f"(non-finite weights; their accuracy is chance's){why}")


def output_stem(path: Path, protocol: str, model: str) -> str:
    """evaluate_<protocol>_<model>, plus _<file stem> unless the file is distilled.npz."""
    stem = f"evaluate_{protocol}_{model}"
    return stem if path.stem == "distilled" else f"{stem}_{path.stem}"


def accuracy_text(record: dict) -> str:
    """'97.12% +- 0.35 over 20 networks' (one network: '93.76%')."""
    text = f"{100 * record['test_acc']:.2f}%"
    if record["eval_nets"] > 1:
        text += f" +- {100 * record['test_acc_std']:.2f} over {record['eval_nets']} networks"
    return text


def percent(record: dict) -> str:
    """'97.12 ± 0.35' (one network: '93.76')."""
    text = f"{100 * record['test_acc']:.2f}"
    return text + (f" ± {100 * record['test_acc_std']:.2f}" if record["eval_nets"] > 1 else "")


def how(record: dict) -> str:
    """What trained the networks, in words."""
    if record["protocol"] == "paper":
        steps = {"gd": "GD", "momentum": "momentum", "adam": "Adam"}[
            record.get("inner_optimizer", "gd")]
        return (f"{record['steps']} x {record['epochs']} {steps} steps at the set's step sizes, "
                f"{record['init_regime']} init")
    r = record["recipe"]
    return (f"SGD lr {r['lr']} momentum {r['momentum']} wd {r['weight_decay']}, batch "
            f"{r['batch_size']}, {r['epochs']} epochs, lr x0.1 at half"
            + (", augmented" if r["augment"] else ""))


def markdown(record: dict) -> str:
    """The record as a one-row markdown table."""
    return markdown_table(
        ("set", "protocol", "model", "dataset", "images", "labels", "test acc (%)", "nets",
         "training", "seconds"),
        [(record["distilled"], record["protocol"], record["model"], record["dataset"],
          record["images"], record["labels"],
          percent(record),
          f"{record['eval_nets']}" + (f" ({d} diverged)" if (d := record.get("diverged")) else ""),
          how(record), f"{record['seconds']:.0f}")]) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = command_line_args(argv)
    try:
        path, flags, switches = parse_args(argv)
        if "help" in switches:
            print(__doc__)
            return 0
        if path is None:
            raise ConfigError(f"no distilled set named; {USAGE}")
        for name in ("epochs", "n_nets"):
            if flags[name] < 1:
                raise ConfigError(f"--{name} must be >= 1, got {flags[name]}")
        if flags["test_subset"] < 0:
            raise ConfigError(f"--test_subset must be >= 0 (0: all), got {flags['test_subset']}")
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path} is not a file; name a distilled.npz")
        recipe = Recipe(epochs=flags["epochs"], augment="augment" in switches)
        record = evaluate_file(path, protocol=flags["protocol"], model=flags["model"],
                               dataset=flags["dataset"], n_nets=flags["n_nets"],
                               seed=flags["seed"], recipe=recipe,
                               test_subset=flags["test_subset"])
        out = Path(flags["out"]) if flags["out"] else path.parent
        out.mkdir(parents=True, exist_ok=True)
        stem = output_stem(path, record["protocol"], record["model"])
        write_json(out / f"{stem}.json", record)
        (out / f"{stem}.md").write_text(markdown(record))
    except DDJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path}: {record['protocol']} protocol, {record['model']}: test accuracy "
          f"{accuracy_text(record)} ({record['test_examples']} test images, "
          f"{record['seconds']:.0f} s); outputs in {out / stem}.json")
    if warning := divergence_warning(record):
        print(warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
