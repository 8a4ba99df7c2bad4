"""Microseconds and GFLOP/s of each C++ kernel call (`dd_jax.native`) at LeNet's shapes.

    python -m benchmarks.kernels [--nets=4] [--blocks=1] [--lanes=16] [--calls=200]

One call computes `nets` vmapped networks on `blocks` blocks of `lanes` images each (the
defaults: `mnist_random_init`'s inner loop, 10 distilled images in one block of 16; its real
batch is ``--blocks=32 --lanes=32``). Each kernel runs `calls` times in one jitted
``lax.scan``, so the time per call includes XLA's per-op overhead but no dispatch from Python.
The FLOPs are the layer's useful multiply-adds (the forward convolution's, also for its input
and kernel gradients, whose padded borders the kernels skip), padding lanes counted; the
pooling gradients move memory only (GB/s of the bytes read and written). The kernel gradient
"from the pooled gradient" unpools the gradient itself (the pooled layers' backward pass);
compare it with the kernel gradient plus the unpool. Prints one JSON line per kernel and a
markdown table.
"""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine_info, machine_line, parse_flags, run_main, time_steps
from benchmarks.outer_step import matmul_peak_gflops
from dd_jax import native
from dd_jax.errors import ConfigError
from dd_jax.outputs import markdown_table

# LeNet's convolutions: (input (H, W, Ci), kernel (5, 5, Ci, Co), padding).
CONV1 = ((28, 28, 1), (5, 5, 1, 6), 2)
CONV2 = ((14, 14, 6), (5, 5, 6, 16), 0)


def seconds_per_call(fn, *args, calls: int, repeats: int = 5) -> float:
    """Median over `repeats` of the wall time of `calls` chained calls of fn(*args), divided by
    `calls` (the first argument perturbed by the carry so that no call is hoisted)."""
    def body(c, _):
        out = fn(args[0] + c, *args[1:])
        leaves = [o for o in jax.tree.leaves(out) if o.dtype != jnp.int8]
        return c + 1e-30 * sum(jnp.sum(o[..., :1]) for o in leaves), None

    run = jax.jit(lambda c: jax.lax.scan(body, c, None, length=calls)[0])
    timing = time_steps(lambda c, _: (c, run(0.0)), None, iterations=repeats, warmup=1)
    return timing["median_s"] / calls


def cases(nets: int, blocks: int, lanes: int) -> list[tuple[str, callable, tuple, float, float]]:
    """(name, function, arguments, FLOPs, bytes) of each kernel call to time."""
    key = iter(jax.random.split(jax.random.PRNGKey(0), 32))
    normal = lambda *shape: jax.random.normal(next(key), (nets, *shape), jnp.float32)
    out = []
    for layer, (hwc, k, pad) in (("conv1", CONV1), ("conv2", CONV2)):
        x, w, b = normal(blocks, *hwc, lanes), normal(*k), normal(k[3])
        h, wd = hwc[0] + 2 * pad - k[0] + 1, hwc[1] + 2 * pad - k[1] + 1  # output, unpooled
        flops = 2.0 * nets * blocks * lanes * h * wd * np.prod(k)
        dy = normal(blocks, h, wd, k[3], lanes)
        forward = jax.vmap(lambda x, w, b, pad=pad: native.conv_layer(x, w, b, pad, True, True))
        out += [
            (f"{layer} forward, pool, relu", forward, (x, w, b), flops, 0.0),
            (f"{layer} input gradient",
             jax.vmap(lambda d, w, pad=pad, kh=k[0]: native.conv(d, native._flip(w), kh - 1 - pad)),
             (dy, w), flops, 0.0),
            (f"{layer} kernel gradient",
             jax.vmap(lambda x, d, pad=pad, hw=k[:2]: native.conv_weight_grad(x, d, (pad, pad), hw)),
             (x, dy), flops, 0.0),
        ]
        y = forward(x, w, b)
        _, index = jax.vmap(lambda x, w, b: native._layer_call(x, w, b, (pad, pad), True, True))(x, w, b)
        moved = 4.0 * (dy.size + 2 * y.size) + index.size
        out += [
            (f"{layer} kernel and bias gradient from the pooled gradient",
             jax.vmap(lambda x, g, y, i, pad=pad, hw=k[:2]:
                      native.conv_weight_grad_pooled(x, g, y, i, (pad, pad), hw, True)),
             (x, y, y, index), flops, 0.0),
            (f"{layer} unpool (pooling gradient)",
             jax.vmap(lambda g, y, i: native.unpool(g, y, i, True)), (y, y, index), 0.0, moved),
            (f"{layer} pool_gather (its transpose)",
             jax.vmap(lambda d, y, i: native.pool_gather(d, y, i, True)), (dy, y, index), 0.0, moved),
        ]
    return out


def main(argv: list[str]) -> None:
    _, flags, overrides = parse_flags(argv, {"nets": 4, "blocks": 1, "lanes": 16, "calls": 200},
                                      max_names=0)
    if overrides:
        raise ConfigError(f"unknown flag --{sorted(overrides)[0]}: this benchmark takes --nets, "
                          "--blocks, --lanes and --calls")
    if flags["lanes"] not in native.BLOCKS or min(flags["nets"], flags["blocks"], flags["calls"]) < 1:
        raise ConfigError(f"--lanes must be one of {native.BLOCKS} and --nets, --blocks, --calls >= 1")
    if not native.enabled():
        raise ConfigError("the C++ kernels are not enabled here (a CPU backend, a C++ compiler "
                          "and DD_JAX_NATIVE unset or 1 are needed)")
    machine, peak = machine_info(), matmul_peak_gflops()
    rows = []
    for name, fn, args, flops, moved in cases(flags["nets"], flags["blocks"], flags["lanes"]):
        s = seconds_per_call(fn, *args, calls=flags["calls"])
        row = {"kernel": name, **{k: flags[k] for k in ("nets", "blocks", "lanes")},
               "us_per_call": 1e6 * s, "gflops": flops / s / 1e9 if flops else None,
               "share_of_peak": flops / s / 1e9 / peak if flops else None,
               "gb_per_s": moved / s / 1e9 if moved else None, "machine": machine}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print()
    print(markdown_table(
        ["kernel", "us / call", "GFLOP/s", "of the matmul peak", "GB/s"],
        [[r["kernel"], f"{r['us_per_call']:.1f}",
          "" if r["gflops"] is None else f"{r['gflops']:.1f}",
          "" if r["gflops"] is None else f"{100 * r['share_of_peak']:.0f}%",
          "" if r["gb_per_s"] is None else f"{r['gb_per_s']:.1f}"] for r in rows]))
    print(f"{flags['nets']} nets x {flags['blocks']} blocks of {flags['lanes']} images per call; "
          f"float32 matmul peak (2048 x 2048, best of 20): {peak:.1f} GFLOP/s")
    print(machine_line(machine))


if __name__ == "__main__":
    sys.exit(run_main(main, __doc__))
