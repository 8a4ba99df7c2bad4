"""Seconds per outer iteration vs n_nets: the library's vmap over initialisations versus a
Python loop over them (one jitted meta-gradient per net, gradients averaged, one Adam update).

    python -m benchmarks.n_nets [--n_nets_list=1,4,16] [--iterations=50] [--budget_s=120]
                                [--experiment=mnist_random_init] [--field=value ...]

Both do the same arithmetic (`check_same_updates` compares them). Each (n_nets, method) is timed
for `iterations` outer iterations after 2 warm-up ones, or for as many as fit in `budget_s`
seconds (the JSON line and the table give the count). Prints JSON lines and a markdown table.
"""
from __future__ import annotations

import json
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from benchmarks.common import (
    experiment_config,
    machine_info,
    machine_line,
    number_list,
    parse_flags,
    run_main,
    time_steps,
)
from dd_jax.meta import meta_loss
from dd_jax.outer_step import DistillState, OuterLoop, build_outer_loop
from dd_jax.outputs import markdown_table
from dd_jax.runs import load_data_and_model
from dd_jax.schedule import make_optimizer

METHODS = ("vmap", "loop")


def python_loop_step(loop: OuterLoop, config) -> Callable:
    """(state, iteration) -> (state, meta-loss) like loop.step, but one jitted meta-gradient
    per initialisation, summed in Python, instead of one vmapped over all of them."""
    n = config.n_nets
    optimizer = make_optimizer(config, loop.batches.per_pass)
    inits = jax.jit(loop.regime.train_inits)
    real_batch = jax.jit(lambda idx: (loop.train_x[idx], loop.train_y[idx]))

    @jax.jit
    def net_value_and_grad(learned, init_params, i, real_x, real_y):
        theta0 = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1), init_params)
        return jax.value_and_grad(meta_loss)(
            learned, loop.labels, theta0, real_x, real_y, apply_fn=loop.model.apply,
            epochs=config.epochs, remat=config.remat,
        )

    @jax.jit
    def update(state: DistillState, grads) -> DistillState:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.learned)
        return DistillState(optax.apply_updates(state.learned, updates), opt_state,
                            state.iteration + 1)

    def step(state: DistillState, iteration: int):
        init_params = inits(state.iteration)
        real_x, real_y = real_batch(jnp.asarray(loop.batches(iteration)))
        total_loss, total_grads = 0.0, None
        for i in range(n):
            loss, grads = net_value_and_grad(state.learned, init_params, i, real_x, real_y)
            total_loss = total_loss + loss
            total_grads = grads if total_grads is None else jax.tree.map(jnp.add, total_grads, grads)
        return update(state, jax.tree.map(lambda g: g / n, total_grads)), total_loss / n

    return step


def make_step(dataset, model_fn, config, method: str) -> tuple[Callable, DistillState]:
    """The outer step of `config` by `method` ('vmap': the library's; 'loop') and its state."""
    loop = build_outer_loop(dataset, model_fn, config)
    return (loop.step if method == "vmap" else python_loop_step(loop, config)), loop.state


def check_same_updates(dataset, model_fn, config, iterations: int = 2) -> dict:
    """Runs both methods for `iterations` outer iterations: their losses and the largest
    differences between their learned images and step sizes (equal up to float rounding)."""
    out = {}
    for method in METHODS:
        step, state = make_step(dataset, model_fn, config, method)
        losses = []
        for it in range(iterations):
            state, loss = step(state, it)
            losses.append(float(loss))
        out[method] = (losses, state.learned)
    (lv, av), (ll, al) = out["vmap"], out["loop"]
    return {"vmap_losses": lv, "loop_losses": ll,
            "max_image_diff": float(jnp.max(jnp.abs(av.images - al.images))),
            "max_step_size_diff": float(jnp.max(jnp.abs(av.step_sizes - al.step_sizes)))}


def time_method(dataset, model_fn, config, method: str, iterations: int, budget_s: float,
                warmup: int = 2) -> dict:
    """Median / quartiles of seconds per outer iteration of `method` (compile excluded)."""
    timing = time_steps(*make_step(dataset, model_fn, config, method), iterations, warmup, budget_s)
    timing.pop("carry")
    return timing


def main(argv: list[str]) -> None:
    own = {"n_nets_list": "1,4,16", "iterations": 50, "budget_s": 120.0,
           "experiment": "mnist_random_init"}
    _, flags, overrides = parse_flags(argv, own, max_names=0)
    machine = machine_info()
    rows, dataset = [], None
    for n in number_list("n_nets_list", flags["n_nets_list"]):
        config = experiment_config(flags["experiment"], {**overrides, "n_nets": str(n)})
        if dataset is None:
            dataset, model = load_data_and_model(config)
        for method in METHODS:
            row = {"experiment": flags["experiment"], "n_nets": n, "method": method,
                   **time_method(dataset, model, config, method, flags["iterations"],
                                 flags["budget_s"]),
                   "T": config.steps * config.epochs, "real_batch": config.real_batch_size,
                   "machine": machine}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print()
    by = {(r["n_nets"], r["method"]): r for r in rows}
    table = []
    for n in sorted({r["n_nets"] for r in rows}):
        v, lp = by[n, "vmap"], by[n, "loop"]
        table.append([n, f"{v['median_s']:.3f} [{v['q1_s']:.3f}, {v['q3_s']:.3f}] ({v['iterations']})",
                      f"{lp['median_s']:.3f} [{lp['q1_s']:.3f}, {lp['q3_s']:.3f}] ({lp['iterations']})",
                      f"{lp['median_s'] / v['median_s']:.2f}x"])
    print(markdown_table(["n_nets", "vmap s/it median [q1, q3] (iterations)",
                          "Python loop s/it median [q1, q3] (iterations)", "loop / vmap"], table))
    print(machine_line(machine))


if __name__ == "__main__":
    sys.exit(run_main(main, __doc__))
