"""Prototype: the MLP head's GD step with a hand-written VJP."""
import functools
import jax, jax.numpy as jnp

def forward_backward(Ws, bs, f, Y):
    """Y (N,K) targets (one-hot or label vectors). returns acts, masks, ds, e0, loss-free."""
    n = f.shape[0]
    acts, masks = [f], []
    a = f
    L = len(Ws)
    for l in range(L):
        z = a @ Ws[l] + bs[l]
        if l < L - 1:
            m = z > 0
            masks.append(m)
            a = jnp.where(m, z, 0.0)
            acts.append(a)
    logits = z
    p = jax.nn.softmax(logits)
    s = Y.sum(-1, keepdims=True)
    d = (p * s - Y) / n
    ds = [None] * L
    ds[L - 1] = d
    for l in range(L - 1, 0, -1):
        d = jnp.where(masks[l - 1], d @ Ws[l].T, 0.0)
        ds[l - 1] = d
    e0 = ds[0] @ Ws[0].T
    return acts, masks, ds, p, s, e0

@jax.custom_vjp
def head_step(Ws, bs, f, Y, lr):
    acts, masks, ds, p, s, e0 = forward_backward(Ws, bs, f, Y)
    newW = tuple(W - lr * (a.T @ d) for W, a, d in zip(Ws, acts, ds))
    newb = tuple(b - lr * d.sum(0) for b, d in zip(bs, ds))
    return newW, newb, e0

def head_step_fwd(Ws, bs, f, Y, lr):
    return head_step(Ws, bs, f, Y, lr), (Ws, bs, f, Y, lr)

def head_step_bwd(res, cts):
    Ws, bs, f, Y, lr = res
    Wb, bb, e0b = cts
    L = len(Ws); n = f.shape[0]
    acts, masks, ds, p, s, e0 = forward_backward(Ws, bs, f, Y)
    lr_bar = 0.0
    for l in range(L):
        lr_bar = lr_bar - jnp.sum((acts[l] @ Wb[l]) * ds[l]) - jnp.dot(bb[l], ds[l].sum(0))
    # reverse of the backward pass, layer 1 up
    e_bars = [e0b]
    e_bar = e0b
    d_bars = []
    for l in range(L):
        d_bar = e_bar @ Ws[l] - lr * (acts[l] @ Wb[l]) - lr * bb[l]
        d_bars.append(d_bar)
        if l < L - 1:
            e_bar = jnp.where(masks[l], d_bar, 0.0)
            e_bars.append(e_bar)
    # softmax-CE: d = (p s - Y)/n
    db = d_bars[L - 1]
    pdb = jnp.sum(p * db, -1, keepdims=True)
    z_bar = s * (p * db - p * pdb) / n
    Y_bar = (pdb - db) / n
    Wbar = [None] * L; bbar = [None] * L
    for l in range(L - 1, -1, -1):
        Wbar[l] = Wb[l] + acts[l].T @ z_bar + e_bars[l].T @ ds[l]
        bbar[l] = bb[l] + z_bar.sum(0)
        a_bar = z_bar @ Ws[l].T - lr * (ds[l] @ Wb[l].T)
        if l > 0:
            z_bar = jnp.where(masks[l - 1], a_bar, 0.0)
    return tuple(Wbar), tuple(bbar), a_bar, Y_bar, lr_bar

head_step.defvjp(head_step_fwd, head_step_bwd)

def head_step_ref(Ws, bs, f, Y, lr):
    def loss(Ws, bs, f):
        a = f
        for l in range(len(Ws)):
            a = a @ Ws[l] + bs[l]
            if l < len(Ws) - 1: a = jax.nn.relu(a)
        return -(Y * jax.nn.log_softmax(a)).sum(-1).mean()
    gW, gb, gf = jax.grad(loss, (0, 1, 2))(Ws, bs, f)
    return (tuple(W - lr * g for W, g in zip(Ws, gW)), tuple(b - lr * g for b, g in zip(bs, gb)), gf)

if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    k = jax.random.split(jax.random.PRNGKey(0), 10)
    dims = [400, 120, 84, 10]
    Ws = tuple(jax.random.normal(k[i], (dims[i], dims[i+1]), jnp.float64) * 0.1 for i in range(3))
    bs = tuple(jax.random.normal(k[3+i], (dims[i+1],), jnp.float64) * 0.1 for i in range(3))
    f = jax.random.normal(k[6], (10, 400), jnp.float64)
    Y = jax.random.uniform(k[7], (10, 10), jnp.float64)
    lr = jnp.float64(0.3)
    ct = jax.tree.map(lambda a: jax.random.normal(k[8], a.shape, a.dtype), head_step_ref(Ws, bs, f, Y, lr))
    out1, vjp1 = jax.vjp(head_step, Ws, bs, f, Y, lr)
    out2, vjp2 = jax.vjp(head_step_ref, Ws, bs, f, Y, lr)
    print(max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a-b).max()), out1, out2))))
    g1, g2 = vjp1(ct), vjp2(ct)
    print(jax.tree.map(lambda a, b: float(jnp.abs(a-b).max() / (jnp.abs(b).max() + 1e-30)), g1, g2))
