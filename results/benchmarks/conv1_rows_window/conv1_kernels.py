"""Median ms of one jitted call of LeNet's conv1 at the real batch's shape (32 blocks of 32).

    PYTHONPATH=. python results/benchmarks/conv1_rows_window/conv1_kernels.py fwd|wgrad|wgradp NETS CALLS

fwd: the pooled forward pass (`native.conv_layer`, pool and relu); wgrad: the kernel gradient
from an unpooled dy (`native.conv_weight_grad`); wgradp: the forward pass and its VJP w.r.t.
the kernel (the kernel and bias gradient from the pooled gradient). NETS vmapped networks.
"""
import sys
import time

import jax

from dd_jax import native

which, nets, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
assert native.enabled()
k = jax.random.split(jax.random.PRNGKey(0), 4)
x = jax.random.normal(k[0], (nets, 32, 28, 28, 1, 32))
w = jax.random.normal(k[1], (nets, 5, 5, 1, 6))
b = jax.random.normal(k[2], (nets, 6))
forward = jax.vmap(lambda x, w, b: native.conv_layer(x, w, b, 2, True, True))
if which == "fwd":
    f, args = jax.jit(forward), (x, w, b)
elif which == "wgrad":
    dy = jax.random.normal(k[3], (nets, 32, 28, 28, 6, 32))
    f = jax.jit(jax.vmap(lambda x, dy: native.conv_weight_grad(x, dy, (2, 2), (5, 5))))
    args = (x, dy)
else:
    g = jax.random.normal(k[3], (nets, 32, 14, 14, 6, 32))
    f = jax.jit(lambda x, w, b, g: jax.vjp(lambda w: forward(x, w, b), w)[1](g)[0])
    args = (x, w, b, g)
jax.block_until_ready(f(*args))
times = []
for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
print(which, "median ms", 1e3 * sorted(times)[calls // 2])
