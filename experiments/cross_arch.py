"""The cross-architecture table: every committed distilled set under both protocols, on LeNet,
MLP and ConvNet-3.

    python -m experiments.cross_arch [--out=results/cross_arch] [--epochs=300] [--n_nets=5]
        [--convnet_nets=2] [--paper_nets=20]

The sets: every distilled.npz and baseline_*.npz under results/ (results/archive and
results/benchmarks aside), one name per distinct file: where the same file is committed twice
(a named experiment's canonical run and its paper-table row) the shorter name. Each cell is
one `experiments.evaluate.evaluate_file` call: the paper protocol with --paper_nets held-out
initialisations for random regimes (it applies only to the model a set was distilled for, and
needs the pool of a random_pretrained set: "n/a" otherwise), the standard protocol with
--epochs and --n_nets networks (--convnet_nets for ConvNet-3). Cells run cheapest first
(every paper cell, then LeNet and MLP, then ConvNet-3 on the smallest sets first); after each
one OUT/table.json (every cell's record) and OUT/TABLE.md are rewritten, and a rerun skips the
cells table.json already holds.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from dd_jax.allocator import command_line_args
from dd_jax.distilled import load_distilled
from dd_jax.errors import DataError, DDJaxError
from dd_jax.outputs import markdown_table, write_json
from dd_jax.protocols import Recipe
from experiments.evaluate import evaluate_file, percent, stored_field
from experiments.flags import parse_flags

USAGE = ("usage: python -m experiments.cross_arch [--out=DIR] [--epochs=300] [--n_nets=5] "
         "[--convnet_nets=2] [--paper_nets=20]")
FLAGS = {"out": "results/cross_arch", "epochs": 300, "n_nets": 5, "convnet_nets": 2,
         "paper_nets": 20}
MODELS = ("lenet", "mlp", "convnet")
COLUMNS = [(p, m) for p in ("paper", "standard") for m in MODELS]


SKIPPED = ("archive", "benchmarks")  # folders of results/ whose sets are not in the table


def find_sets(root: Path = Path("results")) -> dict[str, Path]:
    """name -> npz of every distinct committed set under `root`: '<run>' for
    <run>/distilled.npz, '<run>/<method>' for a baselines run's baseline_<method>.npz (<run>
    relative to `root`, e.g. 'paper/mnist_random_init'); a file with the same bytes as one
    already named (fewest path parts first) is left out."""
    found = {}
    for p in [*root.rglob("distilled.npz"), *root.rglob("baseline_*.npz")]:
        run = p.parent.relative_to(root)
        if run.parts and run.parts[0] not in SKIPPED:
            name = run.as_posix() if p.name == "distilled.npz" else \
                f"{run.as_posix()}/{p.stem[len('baseline_'):]}"
            found[name] = p
    sets, seen = {}, set()
    for name in sorted(found, key=lambda n: (len(found[n].relative_to(root).parts), n)):
        digest = hashlib.sha256(found[name].read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            sets[name] = found[name]
    return dict(sorted(sets.items()))


def cells(sets: dict[str, Path]) -> list[tuple[str, str, str]]:
    """Every (set, protocol, model), in the order they run: paper cells, then standard LeNet
    and MLP, then standard ConvNet-3 by set size (fewest images first)."""
    size = {name: load_distilled(p).images.shape[:2] for name, p in sets.items()}
    order = [(s, "paper", m) for s in sets for m in MODELS]
    order += [(s, "standard", m) for s in sets for m in ("lenet", "mlp")]
    order += [(s, "standard", "convnet")
              for s in sorted(sets, key=lambda s: (int(np.prod(size[s])), "baselines" in s, s))]
    return order


def key(cell: tuple[str, str, str]) -> str:
    return "|".join(cell)


def run_cell(path: Path, protocol: str, model: str, flags: dict) -> dict:
    """One cell's record: evaluate_file's, or {'status': 'n/a', 'why', 'reason'} where the
    protocol does not apply (paper protocol: why 'architecture', another one than the set's, or
    'no pool', a pool that is not here)."""
    made_for = stored_field(path, "model")
    if protocol == "paper" and made_for and model != made_for:
        return {"status": "n/a", "why": "architecture", "reason": f"distilled for {made_for}"}
    nets = {"paper": flags["paper_nets"], "convnet": flags["convnet_nets"]}
    n_nets = nets.get(protocol if protocol == "paper" else model, flags["n_nets"])
    try:
        return evaluate_file(path, protocol=protocol, model=model, n_nets=n_nets,
                             recipe=Recipe(epochs=flags["epochs"]))
    except DataError as e:
        if protocol == "paper" and load_distilled(path).init_regime == "random_pretrained":
            return {"status": "n/a", "why": "no pool", "reason": f"its pool is not committed ({e})"}
        raise


def cell_text(record: dict | None) -> str:
    if record is None:
        return "not run"
    if record.get("status") == "n/a":
        return "n/a"
    return f"{percent(record)} ({record['eval_nets']})"


def table(sets: dict[str, Path], records: dict[str, dict], flags: dict) -> str:
    """TABLE.md: one row per set, one column per (protocol, model), with what ran."""
    rows = []
    for name, path in sets.items():
        d = load_distilled(path)
        rows.append((name, int(np.prod(d.images.shape[:2])),
                     "hard" if d.soft_labels is None else "learned", d.init_regime,
                     *(cell_text(records.get(key((name, p, m)))) for p, m in COLUMNS)))
    done = [r for r in records.values() if "test_acc" in r]
    poolless = sorted({k.split("|")[0] for k, r in records.items()
                       if r.get("status") == "n/a" and r["why"] == "no pool"})
    lines = [
        "# Cross-architecture evaluation of the committed distilled sets",
        "",
        "Test accuracy (%) on the full test set (MNIST: 10,000 images; mnist_to_digits: the "
        "300 digits test images), mean ± std over the networks (their number in brackets).",
        "",
        markdown_table(("set", "images", "labels", "init", *(f"{p} {m}" for p, m in COLUMNS)), rows),
        "",
        "What ran (`python -m experiments.cross_arch " + " ".join(
            f"--{k}={v}" for k, v in flags.items()) + "`):",
        "",
        "- paper: the set's own learned steps and step sizes (`--protocol=paper`), from its "
        f"stored theta_0 (fixed) or {flags['paper_nets']} held-out initialisations (random); "
        "only for the architecture the set was distilled for (LeNet for all of these), "
        "\"n/a\" elsewhere;",
        "- standard: networks trained from scratch on the set's images (`--protocol=standard`): "
        f"SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, {flags['epochs']} epochs, "
        f"lr x0.1 at half, no augmentation; {flags['n_nets']} networks for LeNet and MLP, "
        f"{flags['convnet_nets']} for ConvNet-3 (the papers use 20), seed 0;",
        "- MLP: 784-128-128-10 ReLU; ConvNet-3: 3 x (conv3x3-128, instance norm, ReLU, 2x2 "
        "average pooling), 3x3x128 features, linear classifier; \"not run\": not computed yet.",
        f"- {len(done)} cells computed, {sum(r['seconds'] for r in done):.0f} s of evaluation "
        "in all, on the machine's 2 CPU cores.",
    ]
    if poolless:
        lines += ["", "Paper protocol n/a for lack of a pool: " + ", ".join(poolless) + " start "
                  "from networks pretrained on their source data (random_pretrained), evaluated "
                  "on the pool's held-out members; pools are not committed (`python -m "
                  "experiments.run mnist_pool` or `digits_pool` trains one; each record in "
                  "table.json names the file it looked for)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> dict:
    """--flag=value (or --flag value) over FLAGS' defaults."""
    return parse_flags(argv, {name: (default, type(default)) for name, default in FLAGS.items()},
                       USAGE)[1]


def main(argv: list[str] | None = None) -> int:
    argv = command_line_args(argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    try:
        flags = parse_args(argv)
        out = Path(flags["out"])
        out.mkdir(parents=True, exist_ok=True)
        sets = find_sets()
        if not sets:
            raise DataError("no distilled set under results/; run from the repository root")
        saved = out / "table.json"
        records = json.loads(saved.read_text())["cells"] if saved.exists() else {}
        for cell in cells(sets):
            if key(cell) in records:
                continue
            record = run_cell(sets[cell[0]], cell[1], cell[2], flags)
            records[key(cell)] = record
            write_json(saved, {"flags": flags, "cells": records})
            (out / "TABLE.md").write_text(table(sets, records, flags))
            print(f"{key(cell)}: {cell_text(record)}", flush=True)
        (out / "TABLE.md").write_text(table(sets, records, flags))
    except DDJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"cross-architecture table: {out / 'TABLE.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
