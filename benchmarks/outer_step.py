"""Seconds per outer iteration of named experiments' configs (median after warm-up).

    python -m benchmarks.outer_step mnist_fixed_init_paper [more names] [--iterations=60] [--field=value]
        [--mock_examples=N]

Prints one JSON line per experiment and a markdown table; the machine and versions included.
With --mock_examples=N a tensorflow-datasets dataset is replaced by N random examples of its
real shapes (`tfds.testing.mock_data`): timing an experiment whose data is not prepared here,
e.g. cifar10_fixed_init. MNIST and digits are carried, not mocked.
"""
from __future__ import annotations

import contextlib
import json
import sys

from benchmarks.common import (experiment_config, machine_info, machine_line, parse_flags,
                               run_main, time_steps)
from dd_jax.experiment import load_data_and_model
from dd_jax.outer import build_outer_loop
from dd_jax.outputs import markdown_table


def time_outer_steps(config, iterations: int, warmup: int = 3) -> dict:
    """Median / quartiles of wall seconds per outer iteration (compile excluded)."""
    loop = build_outer_loop(*load_data_and_model(config), config)
    timing = time_steps(loop.step, loop.state, iterations, warmup)
    timing.pop("carry")
    return timing


def mock_data(examples: int):
    """tfds' mock data with `examples` examples per split, or no change for 0."""
    if not examples:
        return contextlib.nullcontext()
    import tensorflow_datasets as tfds

    return tfds.testing.mock_data(num_examples=examples)


def main(argv: list[str]) -> None:
    names, flags, overrides = parse_flags(argv, {"iterations": 60, "mock_examples": 0})
    machine = machine_info()
    rows = []
    for name in names or ["mnist_fixed_init_paper"]:
        config = experiment_config(name, overrides)
        with mock_data(flags["mock_examples"]):
            timing = time_outer_steps(config, flags["iterations"])
        row = {"experiment": name, **timing, "mock_examples": flags["mock_examples"],
               "n_nets": config.n_nets, "T": config.steps * config.epochs,
               "real_batch": config.real_batch_size, "conv": config.conv, "machine": machine}
        print(json.dumps(row))
        rows.append(row)
    print()
    print(markdown_table(
        ["experiment", "T", "n_nets", "real batch", "s / outer iteration (median [q1, q3])"],
        [[r["experiment"] + (f" (mock data, {m} examples)" if (m := r["mock_examples"]) else ""),
          r["T"], r["n_nets"], r["real_batch"],
          f"{r['median_s']:.4f} [{r['q1_s']:.4f}, {r['q3_s']:.4f}]"] for r in rows]))
    print(machine_line(machine))


if __name__ == "__main__":
    sys.exit(run_main(main, __doc__))
