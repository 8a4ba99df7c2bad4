"""Full-test accuracy against training wall time: runs an experiment's outer loop for a time
budget and evaluates the distilled data every K iterations.

    python -m benchmarks.time_to_accuracy mnist_fixed_init [--minutes=10] [--every=100]
        [--target=0.938] [--out=DIR] [--plot=1] [--field=value ...]

`seconds` is the outer loop's wall time: compilation and every outer step, not the evaluations
(those pause the clock). The schedule is the config's own (its passes and decay), cut off at the
budget. Prints one JSON line per evaluation, a markdown table and when the test accuracy first
reached --target (the paper's 93.76% for mnist_fixed_init, by default); with --out, writes
time_to_accuracy.json and time_to_accuracy.md there, and with --plot=1 also
time_to_accuracy.png (matplotlib).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks.common import (experiment_config, machine_info, machine_line, markdown_table,
                               parse_flags)
from dd_jax.evaluation import Evaluator, summarise
from dd_jax.experiment import load_data_and_model
from dd_jax.outer import build_outer_loop
from dd_jax.outputs import saved_figure, write_json


def time_to_accuracy(dataset, model_fn, config, seconds: float, every: int,
                     report: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Trains (dataset, model_fn, config) until `seconds` of outer-loop wall time have passed
    (or the config's schedule ends), evaluating at iteration 0, every `every` iterations and at the end. Rows:
    {'iteration', 'seconds', 'test_acc', 'test_acc_std', 'eval_nets', 'meta_loss'}; `report`
    gets each row as it is made."""
    loop = build_outer_loop(dataset, model_fn, config)
    evaluator = Evaluator(loop.model.apply, config.epochs, dataset.test_x, dataset.test_y,
                          devices=None if loop.mesh is None else loop.mesh.devices.ravel().tolist())
    eval_inits = loop.regime.eval_inits(1 if loop.regime.fixed_params is not None
                                        else config.n_eval_nets_during)
    rows: list[dict] = []

    def evaluate(state, iteration: int, elapsed: float, loss: float | None) -> None:
        learned = state.learned
        acc = summarise(evaluator(eval_inits, learned.images, loop.labels, learned.step_sizes))
        rows.append({"iteration": iteration, "seconds": elapsed, "test_acc": acc["mean"],
                     "test_acc_std": acc["std"], "eval_nets": acc["n_nets"], "meta_loss": loss})
        report(rows[-1])

    state, elapsed = loop.state, 0.0
    evaluate(state, 0, elapsed, None)
    for it in range(loop.total):
        t = time.perf_counter()
        state, loss = loop.step(state, it)
        loss = float(loss)
        elapsed += time.perf_counter() - t
        done = it + 1
        if done % every == 0 or elapsed >= seconds or done == loop.total:
            evaluate(state, done, elapsed, loss)
        if elapsed >= seconds:
            break
    return rows


def time_to_target(rows: list[dict], target: float) -> str:
    """One line: the first evaluation at or above `target` (seconds, iteration), or the best one
    when none reached it."""
    hit = next((r for r in rows if r["test_acc"] >= target), None)
    if hit is not None:
        return (f"{100 * target:.2f}% first reached after {hit['seconds']:.0f} s "
                f"(iteration {hit['iteration']}: {100 * hit['test_acc']:.2f}%)")
    best = max(rows, key=lambda r: r["test_acc"])
    return (f"{100 * target:.2f}% not reached in {rows[-1]['seconds']:.0f} s "
            f"({rows[-1]['iteration']} iterations); best {100 * best['test_acc']:.2f}% after "
            f"{best['seconds']:.0f} s (iteration {best['iteration']})")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Test accuracy (%) against seconds, with +- std where several nets were evaluated."""
    s = [r["seconds"] for r in rows]
    acc = [100 * r["test_acc"] for r in rows]
    std = [100 * r["test_acc_std"] for r in rows]
    with saved_figure(path, dpi=120, figsize=(6, 4)) as (_, ax):
        ax.plot(s, acc, marker="o", ms=3)
        ax.fill_between(s, [a - d for a, d in zip(acc, std)], [a + d for a, d in zip(acc, std)],
                        alpha=0.2)
        ax.set_xlabel("outer-loop wall time (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)


def main(argv: list[str]) -> None:
    names, flags, overrides = parse_flags(
        argv, {"minutes": 10.0, "every": 100, "target": 0.938, "out": "", "plot": False})
    name = names[0] if names else "mnist_fixed_init"
    config = experiment_config(name, overrides)
    machine = machine_info()
    dataset, model = load_data_and_model(config)
    show = lambda row: print(json.dumps({"experiment": name, **row}), flush=True)
    rows = time_to_accuracy(dataset, model, config, 60 * flags["minutes"], flags["every"],
                            report=show)
    table = markdown_table(
        ["iteration", "seconds", "test accuracy %", "eval nets", "meta-loss"],
        [[r["iteration"], f"{r['seconds']:.1f}",
          f"{100 * r['test_acc']:.2f}"
          + (f" +- {100 * r['test_acc_std']:.2f}" if r["eval_nets"] > 1 else ""),
          r["eval_nets"], "" if r["meta_loss"] is None else f"{r['meta_loss']:.4f}"] for r in rows])
    command = "python -m benchmarks.time_to_accuracy " + " ".join(argv if names else [name, *argv])
    reached = time_to_target(rows, flags["target"])
    text = f"{table}\n\n{reached}\n\n{machine_line(machine)}\ncommand: {command}"
    print()
    print(text)
    if flags["out"]:
        out = Path(flags["out"])
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "time_to_accuracy.json", {
            "experiment": name, "command": command, "config": config.to_dict(),
            "test_examples": int(len(dataset.test_y)), "rows": rows, "target": flags["target"],
            "time_to_target": reached, "machine": machine})
        (out / "time_to_accuracy.md").write_text(text + "\n")
        if flags["plot"]:
            plot(rows, out / "time_to_accuracy.png",
                 f"{name}: accuracy on {len(dataset.test_y)} test images vs time")


if __name__ == "__main__":
    main(sys.argv[1:])
