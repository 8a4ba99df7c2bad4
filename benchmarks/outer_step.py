"""Seconds per outer iteration of named experiments' configs (median after warm-up).

    python -m benchmarks.outer_step mnist_fixed_init [more names] [--iterations=60] [--field=value]

Prints one JSON line per experiment and a markdown table; the machine and versions included.
"""
from __future__ import annotations

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


def main(argv: list[str]) -> None:
    names, flags, overrides = parse_flags(argv, {"iterations": 60})
    machine = machine_info()
    rows = []
    for name in names or ["mnist_fixed_init"]:
        config = experiment_config(name, overrides)
        row = {"experiment": name, **time_outer_steps(config, flags["iterations"]),
               "n_nets": config.n_nets, "T": config.steps * config.epochs,
               "real_batch": config.real_batch_size, "conv": config.conv, "machine": machine}
        print(json.dumps(row))
        rows.append(row)
    print()
    print(markdown_table(
        ["experiment", "T", "n_nets", "real batch", "s / outer iteration (median [q1, q3])"],
        [[r["experiment"], r["T"], r["n_nets"], r["real_batch"],
          f"{r['median_s']:.4f} [{r['q1_s']:.4f}, {r['q3_s']:.4f}]"] for r in rows]))
    print(machine_line(machine))


if __name__ == "__main__":
    sys.exit(run_main(main, __doc__))
