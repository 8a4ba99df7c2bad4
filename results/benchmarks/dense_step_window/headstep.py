"""The dense head's GD step with a hand-written VJP in JAX: the math of _native/dense.cc
(`head_step`), checked against autodiff (`head_step_ref`) by running this file.

kernels, biases: tuples over the L layers; f (N, D_0) features; targets (N, K); lr ().
"""
import jax
import jax.numpy as jnp


def forward_backward(kernels, biases, f, targets):
    """The activations a_0 .. a_{L-1}, ReLU masks, gradients d_1 .. d_L at the
    pre-activations, softmax p, target sums s and the feature gradient e_0."""
    n, layers = f.shape[0], len(kernels)
    acts, masks, a = [f], [], f
    for i in range(layers):
        z = a @ kernels[i] + biases[i]
        if i < layers - 1:
            masks.append(z > 0)
            a = jnp.where(masks[-1], z, 0.0)
            acts.append(a)
    p = jax.nn.softmax(z)
    s = targets.sum(-1, keepdims=True)
    ds = [None] * layers
    ds[-1] = d = (p * s - targets) / n
    for i in range(layers - 1, 0, -1):
        ds[i - 1] = d = jnp.where(masks[i - 1], d @ kernels[i].T, 0.0)
    return acts, masks, ds, p, s, ds[0] @ kernels[0].T


@jax.custom_vjp
def head_step(kernels, biases, f, targets, lr):
    acts, _, ds, _, _, e0 = forward_backward(kernels, biases, f, targets)
    new_kernels = tuple(w - lr * (a.T @ d) for w, a, d in zip(kernels, acts, ds))
    new_biases = tuple(b - lr * d.sum(0) for b, d in zip(biases, ds))
    return new_kernels, new_biases, e0


def head_step_fwd(kernels, biases, f, targets, lr):
    return head_step(kernels, biases, f, targets, lr), (kernels, biases, f, targets, lr)


def head_step_bwd(residuals, cotangents):
    kernels, biases, f, targets, lr = residuals
    kernels_ct, biases_ct, e0_ct = cotangents
    layers, n = len(kernels), f.shape[0]
    acts, masks, ds, p, s, _ = forward_backward(kernels, biases, f, targets)
    lr_bar = 0.0
    for i in range(layers):
        lr_bar -= jnp.sum((acts[i] @ kernels_ct[i]) * ds[i]) + jnp.dot(biases_ct[i], ds[i].sum(0))
    # the reverse of the backward pass, layer 1 up
    e_bars, e_bar, d_bars = [e0_ct], e0_ct, []
    for i in range(layers):
        d_bars.append(e_bar @ kernels[i] - lr * (acts[i] @ kernels_ct[i]) - lr * biases_ct[i])
        if i < layers - 1:
            e_bar = jnp.where(masks[i], d_bars[-1], 0.0)
            e_bars.append(e_bar)
    # softmax cross-entropy: d = (p s - targets) / n
    db = d_bars[-1]
    pdb = jnp.sum(p * db, -1, keepdims=True)
    z_bar = s * (p * db - p * pdb) / n
    targets_bar = (pdb - db) / n
    kernels_bar, biases_bar = [None] * layers, [None] * layers
    for i in range(layers - 1, -1, -1):
        kernels_bar[i] = kernels_ct[i] + acts[i].T @ z_bar + e_bars[i].T @ ds[i]
        biases_bar[i] = biases_ct[i] + z_bar.sum(0)
        a_bar = z_bar @ kernels[i].T - lr * (ds[i] @ kernels_ct[i].T)
        if i > 0:
            z_bar = jnp.where(masks[i - 1], a_bar, 0.0)
    return tuple(kernels_bar), tuple(biases_bar), a_bar, targets_bar, lr_bar


head_step.defvjp(head_step_fwd, head_step_bwd)


def head_step_ref(kernels, biases, f, targets, lr):
    def loss(kernels, biases, f):
        a = f
        for i in range(len(kernels)):
            a = a @ kernels[i] + biases[i]
            a = jax.nn.relu(a) if i < len(kernels) - 1 else a
        return -(targets * jax.nn.log_softmax(a)).sum(-1).mean()

    g_kernels, g_biases, g_f = jax.grad(loss, (0, 1, 2))(kernels, biases, f)
    return (tuple(w - lr * g for w, g in zip(kernels, g_kernels)),
            tuple(b - lr * g for b, g in zip(biases, g_biases)), g_f)


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    keys = jax.random.split(jax.random.PRNGKey(0), 10)
    dims = [400, 120, 84, 10]
    kernels = tuple(jax.random.normal(keys[i], (dims[i], dims[i + 1]), jnp.float64) * 0.1 for i in range(3))
    biases = tuple(jax.random.normal(keys[3 + i], (dims[i + 1],), jnp.float64) * 0.1 for i in range(3))
    args = (kernels, biases, jax.random.normal(keys[6], (10, 400), jnp.float64),
            jax.random.uniform(keys[7], (10, 10), jnp.float64), jnp.float64(0.3))
    out, vjp = jax.vjp(head_step, *args)
    ref, ref_vjp = jax.vjp(head_step_ref, *args)
    cotangent = jax.tree.map(lambda a: jax.random.normal(keys[8], a.shape, a.dtype), ref)
    error = lambda a, b: float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30))  # noqa: E731
    print("step:", max(jax.tree.leaves(jax.tree.map(error, out, ref))))
    print("vjp:", max(jax.tree.leaves(jax.tree.map(error, vjp(cotangent), ref_vjp(cotangent)))))
