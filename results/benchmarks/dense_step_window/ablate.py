import sys, time, functools
import jax, jax.numpy as jnp, numpy as np
import flax.linen as nn
from dd_jax.models import LeNet, as_model, MLP
from dd_jax.meta import meta_loss, init_learned, distilled_labels

def bench(model, img_shape, n_nets, steps, epochs, real_b, reps=30, fused=False):
    m = as_model(model)
    labels = distilled_labels(steps, 1, 10)
    learned = init_learned(jax.random.PRNGKey(0), labels, img_shape, epochs)
    x0 = jnp.zeros((1,)+img_shape)
    params = jax.vmap(lambda k: m.init(k, x0))(jax.random.split(jax.random.PRNGKey(1), n_nets))
    rx = jax.random.normal(jax.random.PRNGKey(2), (real_b,)+img_shape)
    ry = jnp.arange(real_b) % 10
    f = jax.jit(jax.value_and_grad(functools.partial(meta_loss, apply_fn=m.apply, epochs=epochs, step_fn=m.gd_step if fused else None)))
    out = f(learned, labels, params, rx, ry); jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); jax.block_until_ready(f(learned, labels, params, rx, ry)); ts.append(time.perf_counter()-t)
    return float(np.median(ts))

class Head(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120)(x)); x = nn.relu(nn.Dense(84)(x)); return nn.Dense(10)(x)

which = sys.argv[1:] or ["full", "inner", "head", "inner1", "head1"]
for w in which:
    if w == "full": r = bench(LeNet(), (28,28,1), 4, 10, 3, 1024)
    if w == "inner": r = bench(LeNet(), (28,28,1), 4, 10, 3, 16)
    if w == "head": r = bench(Head(), (20,20,1), 4, 10, 3, 16)
    if w == "inner1": r = bench(LeNet(), (28,28,1), 1, 10, 3, 16)
    if w == "full_f": r = bench(LeNet(), (28,28,1), 4, 10, 3, 1024, fused=True)
    if w == "inner_f": r = bench(LeNet(), (28,28,1), 4, 10, 3, 16, fused=True)
    if w == "inner1_f": r = bench(LeNet(), (28,28,1), 1, 10, 3, 16, fused=True)
    if w == "full1": r = bench(LeNet(), (28,28,1), 1, 10, 3, 1024)
    if w == "full1_f": r = bench(LeNet(), (28,28,1), 1, 10, 3, 1024, fused=True)
    if w == "head1": r = bench(Head(), (20,20,1), 1, 10, 3, 16)
    print(w, f"{r*1000:.1f} ms", flush=True)
