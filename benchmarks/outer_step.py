"""Seconds per outer iteration of named experiments' configs (median after warm-up).

    python -m benchmarks.outer_step mnist_fixed_init_paper [more names] [--iterations=60] [--field=value]
        [--mock_examples=N]

Prints one JSON line per experiment and a markdown table; the machine and versions included.
The roofline columns: the FLOPs of one outer iteration as XLA's cost analysis counts them for
the same step with plain convolutions (``conv='xla'``: the C++ kernels' work is invisible to it,
and the Toeplitz matmuls do extra work), the achieved GFLOP/s at the measured median, and that
as a share of the peak of a large float32 matmul measured on this machine in the same process.
With --mock_examples=N a tensorflow-datasets dataset is replaced by N random examples of its
real shapes (`tfds.testing.mock_data`): timing an experiment whose data is not prepared here,
e.g. cifar10_fixed_init. MNIST and digits are carried, not mocked.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks.common import experiment_config, machine_info, machine_line, parse_flags, run_main, time_steps
from dd_jax.outer_step import build_outer_loop
from dd_jax.outputs import markdown_table
from dd_jax.runs import load_data_and_model


def time_outer_steps(config, iterations: int, warmup: int = 3) -> dict:
    """Median / quartiles of wall seconds per outer iteration (compile excluded)."""
    loop = build_outer_loop(*load_data_and_model(config), config)
    timing = time_steps(loop.step, loop.state, iterations, warmup)
    timing.pop("carry")
    return timing


def compiled_flops(config) -> float:
    """FLOPs of one outer iteration of `config` as XLA's cost analysis counts its meta-step
    compiled with plain convolutions (``conv='xla'``: the same function) on one device (the
    cost analysis of a program sharded over devices counts one device's part)."""
    plain = config.copy_and_resolve_references()
    plain.conv = "xla"
    plain.devices = 1
    loop = build_outer_loop(*load_data_and_model(plain), plain)
    return float(loop.compiled_step().cost_analysis()["flops"])


def step_flops(config) -> float:
    """FLOPs of one outer iteration: the algorithm's, without the recomputation of inner
    steps in the backward pass. XLA's cost analysis counts a loop's body once whatever its
    trip count, so the T-step unroll is counted as the line through one- and two-step
    unrolls of the same batches (`compiled_flops` with steps = epochs = 1, then epochs = 2;
    both at most `inner.UNROLL_UP_TO` steps, unrolled in full): F(T) = F(1) + (T - 1)
    (F(2) - F(1)), every inner step costing the same. The remat and window paths' loops
    (`--remat`, `--window`) stay loops: their FLOPs are undercounted."""
    one, two = config.copy_and_resolve_references(), config.copy_and_resolve_references()
    one.steps = two.steps = one.epochs = 1
    two.epochs = 2
    f1, f2 = compiled_flops(one), compiled_flops(two)
    return f1 + (config.steps * config.epochs - 1) * (f2 - f1)


def matmul_peak_gflops(n: int = 2048, repeats: int = 20) -> float:
    """GFLOP/s of the best of `repeats` float32 (n, n) @ (n, n) products (2 n^3 FLOPs)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def mock_data(examples: int):
    """tfds' mock data with `examples` examples per split, or no change for 0."""
    if not examples:
        return contextlib.nullcontext()
    import tensorflow_datasets as tfds

    return tfds.testing.mock_data(num_examples=examples)


def main(argv: list[str]) -> None:
    names, flags, overrides = parse_flags(argv, {"iterations": 60, "mock_examples": 0})
    machine = machine_info()
    peak = matmul_peak_gflops()
    rows = []
    for name in names or ["mnist_fixed_init_paper"]:
        config = experiment_config(name, overrides)
        with mock_data(flags["mock_examples"]):
            timing = time_outer_steps(config, flags["iterations"])
            flops = step_flops(config)
        gflops = flops / timing["median_s"] / 1e9
        row = {"experiment": name, **timing, "mock_examples": flags["mock_examples"],
               "gflop_per_iteration": flops / 1e9, "achieved_gflops": gflops,
               "matmul_peak_gflops": peak, "share_of_peak": gflops / peak,
               "n_nets": config.n_nets, "T": config.steps * config.epochs,
               "real_batch": config.real_batch_size, "conv": config.conv, "machine": machine}
        print(json.dumps(row))
        rows.append(row)
    print()
    print(markdown_table(
        ["experiment", "T", "n_nets", "real batch", "s / outer iteration (median [q1, q3])",
         "GFLOP / iteration", "GFLOP/s", "of the matmul peak"],
        [[r["experiment"] + (f" (mock data, {m} examples)" if (m := r["mock_examples"]) else ""),
          r["T"], r["n_nets"], r["real_batch"],
          f"{r['median_s']:.4f} [{r['q1_s']:.4f}, {r['q3_s']:.4f}]",
          f"{r['gflop_per_iteration']:.2f}", f"{r['achieved_gflops']:.1f}",
          f"{100 * r['share_of_peak']:.1f}%"] for r in rows]))
    print(f"float32 matmul peak (2048 x 2048, best of 20): {peak:.1f} GFLOP/s")
    print(machine_line(machine))


if __name__ == "__main__":
    sys.exit(run_main(main, __doc__))
