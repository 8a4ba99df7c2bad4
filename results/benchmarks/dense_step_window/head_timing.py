"""The timings of results/benchmarks/dense_step.md: one jitted meta-gradient of LeNet (or of
its dense head alone), T = 30 (S = 10, E = 3), 10 images per step, median of 30 calls.

    PYTHONPATH=. python results/benchmarks/dense_step_window/head_timing.py lenet NETS REAL_BATCH FUSED
    PYTHONPATH=. python results/benchmarks/dense_step_window/head_timing.py head NETS VJP
    PYTHONPATH=. python results/benchmarks/dense_step_window/head_timing.py profile NETS REAL_BATCH FUSED

lenet: `meta_loss` with the fused step (FUSED = 1, `dense_step.fused_gd_step`) or the differentiated
apply (0). head: a 400-120-84-10 network on 20x20 distilled inputs, its steps differentiated
by JAX (VJP = autodiff) or with `headstep.py`'s hand-written VJP (VJP = custom). profile: the
ops of the lenet meta-gradient over 10 calls (`benchmarks.op_profile.op_events`).
"""
import collections
import functools
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.op_profile import hlo_lines, op_events
from dd_jax.dense_step import fused_gd_step
from dd_jax.meta import distilled_labels, init_learned, meta_loss
from dd_jax.models import LeNet, as_model

sys.path.insert(0, str(Path(__file__).parent))
from headstep import head_step, head_step_ref  # noqa: E402

STEPS, EPOCHS = 10, 3


def median_ms(f, args, calls=30):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def lenet_meta_gradient(nets, real_batch, fused):
    model = as_model(LeNet())
    labels = distilled_labels(STEPS, 1, 10)
    learned = init_learned(jax.random.PRNGKey(0), labels, (28, 28, 1), EPOCHS)
    init = jax.vmap(lambda k: model.init(k, jnp.zeros((1, 28, 28, 1))))(
        jax.random.split(jax.random.PRNGKey(1), nets))
    real_x = jax.random.normal(jax.random.PRNGKey(2), (real_batch, 28, 28, 1))
    real_y = jnp.arange(real_batch) % 10
    loss = functools.partial(meta_loss, apply_fn=model.apply, epochs=EPOCHS,
                             step_fn=fused_gd_step(LeNet()) if fused else None)
    return jax.jit(jax.value_and_grad(loss)), (learned, labels, init, real_x, real_y)


def head_meta_gradient(nets, custom_vjp):
    step = head_step if custom_vjp else head_step_ref
    dims = [400, 120, 84, 10]
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    kernels = tuple(jax.random.normal(keys[i], (nets, dims[i], dims[i + 1])) * 0.05 for i in range(3))
    biases = tuple(jnp.zeros((nets, dims[i + 1])) for i in range(3))
    images = jax.random.normal(keys[6], (STEPS, 10, 400))
    targets = jax.nn.one_hot(jnp.tile(jnp.arange(10), (STEPS, 1)), 10)
    rates = jnp.full((STEPS * EPOCHS,), 0.02)
    real_x = jax.random.normal(keys[7], (16, 400))
    real_y = jax.nn.one_hot(jnp.arange(16) % 10, 10)

    def meta(images, rates, kernels, biases):
        def one_net(kernels, biases):
            def body(carry, t):
                w, b, _ = step(*carry, images[t % STEPS], targets[t % STEPS], rates[t])
                return (w, b), None

            (w, b), _ = jax.lax.scan(body, (kernels, biases), jnp.arange(STEPS * EPOCHS))
            a = real_x
            for layer in range(3):
                a = a @ w[layer] + b[layer]
                a = jax.nn.relu(a) if layer < 2 else a
            return -(real_y * jax.nn.log_softmax(a)).sum(-1).mean()

        return jax.vmap(one_net)(kernels, biases).mean()

    return jax.jit(jax.value_and_grad(meta, (0, 1))), (images, rates, kernels, biases)


def profile(f, args, calls=10, top=45):
    jax.block_until_ready(f(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(f(*args))
        events = op_events(Path(tmp))
    hlo = hlo_lines(f.lower(*args).compile().as_text())
    total, runs = collections.Counter(), collections.Counter()
    for name, us in events:
        total[name] += us
        runs[name] += 1
    print(f"op time {sum(total.values()) / calls / 1e3:.1f} ms, {len(events) // calls} ops per call")
    for name, us in total.most_common(top):
        print(f"{name:40s} {runs[name] // calls:4d} {us / calls / 1e3:7.2f}  {hlo.get(name, '')[:150]}")


if __name__ == "__main__":
    what, nets = sys.argv[1], int(sys.argv[2])
    if what == "head":
        print(f"head, {nets} nets, {sys.argv[3]} VJP: "
              f"{median_ms(*head_meta_gradient(nets, sys.argv[3] == 'custom')):.1f} ms")
    else:
        f, args = lenet_meta_gradient(nets, int(sys.argv[3]), sys.argv[4] == "1")
        if what == "profile":
            profile(f, args)
        else:
            print(f"lenet, {nets} nets, real batch {sys.argv[3]}, fused {sys.argv[4]}: "
                  f"{median_ms(f, args):.1f} ms")
