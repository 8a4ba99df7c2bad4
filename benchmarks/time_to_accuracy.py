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

from benchmarks.common import experiment_config, machine_info, machine_line, parse_flags, run_main
from dd_jax.outer_step import build_outer_loop
from dd_jax.outputs import markdown_table, saved_figure, write_json
from dd_jax.runs import load_data_and_model


def time_to_accuracy(dataset, model_fn, config, seconds: float, every: int,
                     report: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Trains (dataset, model_fn, config) until `seconds` of outer-loop wall time have passed
    (or the config's schedule ends), evaluating at iteration 0, every `every` iterations and at
    the end. Rows: {'iteration', 'seconds', 'test_acc', 'test_acc_std', 'eval_nets',
    'meta_loss'}; with config.val_size also 'val_acc' and 'selected_test_acc', the test
    accuracy of the iterate best on the holdout so far (what `dd_jax.distill` would return
    then). The holdout evaluations are part of the method: they run on the clock. `report`
    gets each row as it is made."""
    loop = build_outer_loop(dataset, model_fn, config)
    test_accuracy = loop.accuracy_on(dataset.test_x, dataset.test_y, config.n_eval_nets_during)
    best = loop.best_on_validation(config.n_eval_nets_during)
    rows: list[dict] = []

    def evaluate(state, iteration: int, elapsed: float, loss: float | None) -> float:
        """Appends the row of `iteration`; returns the seconds the holdout evaluation took."""
        val_acc, spent = None, 0.0
        if best is not None:
            t = time.perf_counter()
            val_acc = best.update(state.learned, iteration)
            spent = time.perf_counter() - t
        acc = test_accuracy(state.learned)
        row = {"iteration": iteration, "seconds": elapsed + spent, "test_acc": acc["mean"],
               "test_acc_std": acc["std"], "eval_nets": acc["n_nets"], "meta_loss": loss}
        if best is not None:  # the choice is this iterate, or stays the previous row's
            row["val_acc"] = val_acc
            row["selected_test_acc"] = (acc["mean"] if best.iteration == iteration
                                        else rows[-1]["selected_test_acc"])
        rows.append(row)
        report(row)
        return spent

    state, elapsed = loop.state, 0.0
    elapsed += evaluate(state, 0, elapsed, None)
    for it in range(loop.total):
        t = time.perf_counter()
        state, loss = loop.step(state, it)
        loss = float(loss)
        elapsed += time.perf_counter() - t
        done = it + 1
        if done % every == 0 or elapsed >= seconds or done == loop.total:
            elapsed += evaluate(state, done, elapsed, loss)
        if elapsed >= seconds:
            break
    return rows


def reported_acc(row: dict) -> float:
    """The test accuracy the run would report at that row: of the iterate chosen on the
    validation holdout when there is one, else of the current iterate."""
    return row.get("selected_test_acc", row["test_acc"])


def time_to_target(rows: list[dict], target: float) -> str:
    """One line: the first evaluation whose reported accuracy is at or above `target`
    (seconds, iteration), or the best one when none reached it."""
    hit = next((r for r in rows if reported_acc(r) >= target), None)
    if hit is not None:
        return (f"{100 * target:.2f}% first reached after {hit['seconds']:.0f} s "
                f"(iteration {hit['iteration']}: {100 * reported_acc(hit):.2f}%)")
    best = max(rows, key=reported_acc)
    return (f"{100 * target:.2f}% not reached in {rows[-1]['seconds']:.0f} s "
            f"({rows[-1]['iteration']} iterations); best {100 * reported_acc(best):.2f}% after "
            f"{best['seconds']:.0f} s (iteration {best['iteration']})")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Test accuracy (%) against seconds, with +- std where several nets were evaluated; with
    a validation holdout also the test accuracy of the iterate it chose."""
    s = [r["seconds"] for r in rows]
    acc = [100 * r["test_acc"] for r in rows]
    std = [100 * r["test_acc_std"] for r in rows]
    with saved_figure(path, dpi=120, figsize=(6, 4)) as (_, ax):
        ax.plot(s, acc, marker="o", ms=3, label="current iterate")
        if "selected_test_acc" in rows[0]:
            ax.plot(s, [100 * r["selected_test_acc"] for r in rows], drawstyle="steps-post",
                    label="iterate best on the holdout")
            ax.legend(loc="lower right")
        ax.fill_between(s, [a - d for a, d in zip(acc, std)], [a + d for a, d in zip(acc, std)],
                        alpha=0.2)
        ax.set_xlabel("outer-loop wall time (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)


def main(argv: list[str]) -> None:
    names, flags, overrides = parse_flags(
        argv, {"minutes": 10.0, "every": 100, "target": 0.938, "out": "", "plot": False},
        max_names=1)
    name = names[0] if names else "mnist_fixed_init"
    config = experiment_config(name, overrides)
    machine = machine_info()
    dataset, model = load_data_and_model(config)
    show = lambda row: print(json.dumps({"experiment": name, **row}), flush=True)
    rows = time_to_accuracy(dataset, model, config, 60 * flags["minutes"], flags["every"],
                            report=show)
    selection = "val_acc" in rows[0]
    table = markdown_table(
        ["iteration", "seconds", "test accuracy %", "eval nets", "meta-loss"]
        + (["holdout accuracy %", "test accuracy % of the holdout's best"] if selection else []),
        [[r["iteration"], f"{r['seconds']:.1f}",
          f"{100 * r['test_acc']:.2f}"
          + (f" +- {100 * r['test_acc_std']:.2f}" if r["eval_nets"] > 1 else ""),
          r["eval_nets"], "" if r["meta_loss"] is None else f"{r['meta_loss']:.4f}"]
         + ([f"{100 * r['val_acc']:.2f}", f"{100 * r['selected_test_acc']:.2f}"] if selection else [])
         for r in rows])
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
    sys.exit(run_main(main, __doc__))
