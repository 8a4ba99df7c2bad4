"""Seconds per outer iteration of named experiments' configs (median after warm-up).

    python -m benchmarks.outer_step mnist_fixed_init [more names] [--iterations=60] [--field=value]

Prints one JSON line per experiment and a markdown table; the machine and versions included.
"""
from __future__ import annotations

import json
import platform
import sys
import time

import jax
import numpy as np

from dd_jax.experiment import load_data_and_model
from dd_jax.outer import build_outer_loop
from experiments.run import apply_overrides, parse_args
from experiments.configs import EXPERIMENTS


def time_outer_steps(config, iterations: int, warmup: int = 3) -> dict:
    """Median / quartiles of wall seconds per outer iteration (compile excluded)."""
    loop = build_outer_loop(*load_data_and_model(config), config)
    state = loop.state
    times = []
    for it in range(warmup + iterations):
        t = time.perf_counter()
        state, loss = loop.step(state, it)
        jax.block_until_ready(loss)
        if it >= warmup:
            times.append(time.perf_counter() - t)
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return {"median_s": float(med), "q1_s": float(q1), "q3_s": float(q3), "iterations": iterations}


def main(argv: list[str]) -> None:
    names = [a for a in argv if not a.startswith("--")]
    _, overrides, _ = parse_args([a for a in argv if a.startswith("--")])
    iterations = int(overrides.pop("iterations", 60))
    machine = {"platform": platform.platform(), "python": platform.python_version(),
               "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}
    rows = []
    for name in names or ["mnist_fixed_init"]:
        config = apply_overrides(EXPERIMENTS[name](), overrides)
        row = {"experiment": name, **time_outer_steps(config, iterations),
               "n_nets": config.n_nets, "T": config.steps * config.epochs,
               "real_batch": config.real_batch_size, "conv": config.conv, "machine": machine}
        print(json.dumps(row))
        rows.append(row)
    print("\n| experiment | T | n_nets | real batch | s / outer iteration (median [q1, q3]) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['experiment']} | {r['T']} | {r['n_nets']} | {r['real_batch']} | "
              f"{r['median_s']:.4f} [{r['q1_s']:.4f}, {r['q3_s']:.4f}] |")


if __name__ == "__main__":
    main(sys.argv[1:])
