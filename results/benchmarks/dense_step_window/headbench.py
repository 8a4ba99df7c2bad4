import sys, time, functools
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "/work/runs/s41")
from headstep import head_step, head_step_ref

def make(stepf, n_nets):
    dims = [400, 120, 84, 10]
    k = jax.random.split(jax.random.PRNGKey(0), 8)
    Ws = tuple(jax.random.normal(k[i], (n_nets, dims[i], dims[i+1])) * 0.05 for i in range(3))
    bs = tuple(jnp.zeros((n_nets, dims[i+1])) for i in range(3))
    imgs = jax.random.normal(k[6], (10, 10, 400))
    Y = jax.nn.one_hot(jnp.tile(jnp.arange(10), (10, 1)), 10)
    lrs = jnp.full((30,), 0.02)
    rx = jax.random.normal(k[7], (16, 400)); ry = jax.nn.one_hot(jnp.arange(16) % 10, 10)
    def meta(imgs, lrs, Ws, bs):
        def one(Ws, bs):
            def step(c, t):
                W, b = c
                W, b, _ = stepf(W, b, imgs[t % 10], Y[t % 10], lrs[t])
                return (W, b), None
            (W, b), _ = jax.lax.scan(step, (Ws, bs), jnp.arange(30))
            a = rx
            for l in range(3):
                a = a @ W[l] + b[l]
                if l < 2: a = jax.nn.relu(a)
            return -(ry * jax.nn.log_softmax(a)).sum(-1).mean()
        return jax.vmap(one)(Ws, bs).mean()
    f = jax.jit(jax.value_and_grad(meta, (0, 1)))
    return f, (imgs, lrs, Ws, bs)

for name in sys.argv[1:]:
    kind, n = name.split(":"); n = int(n)
    f, args = make(head_step if kind == "custom" else head_step_ref, n)
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(30):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    print(name, f"{np.median(ts)*1e3:.1f} ms", flush=True)
