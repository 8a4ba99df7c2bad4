import sys, functools, tempfile, collections
from pathlib import Path
import jax, jax.numpy as jnp
from dd_jax.models import LeNet, as_model
from dd_jax.meta import meta_loss, init_learned, distilled_labels
from benchmarks.op_profile import op_events, hlo_lines
n_nets = int(sys.argv[1]); fused = sys.argv[2] == "1"; real_b = int(sys.argv[3]) if len(sys.argv) > 3 else 16
m = as_model(LeNet()); img_shape=(28,28,1); steps, epochs = 10, 3
labels = distilled_labels(steps, 1, 10)
learned = init_learned(jax.random.PRNGKey(0), labels, img_shape, epochs)
params = jax.vmap(lambda k: m.init(k, jnp.zeros((1,)+img_shape)))(jax.random.split(jax.random.PRNGKey(1), n_nets))
rx = jax.random.normal(jax.random.PRNGKey(2), (real_b,)+img_shape); ry = jnp.arange(real_b) % 10
f = jax.jit(jax.value_and_grad(functools.partial(meta_loss, apply_fn=m.apply, epochs=epochs, step_fn=m.gd_step if fused else None)))
args = (learned, labels, params, rx, ry)
jax.block_until_ready(f(*args))
n = 10
with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
        for _ in range(n): jax.block_until_ready(f(*args))
    ev = op_events(Path(tmp))
hlo = hlo_lines(f.lower(*args).compile().as_text())
by, cnt = collections.Counter(), collections.Counter()
for name, d in ev: by[name] += d; cnt[name] += 1
print("total ms", sum(by.values())/n/1e3, "ops", len(ev)//n)
for name, t in by.most_common(int(sys.argv[4]) if len(sys.argv) > 4 else 30):
    print(f"{name:40s} {cnt[name]//n:4d} {t/n/1e3:7.2f}  {hlo.get(name,'')[:150]}")
