"""Sharded vs single-device results on 4 simulated CPU devices; run by tests/test_scaleout.py.

    python tests/multidevice_check.py OUTPUT_DIR

XLA's device count must be set before jax is imported, hence a separate process. Prints one JSON
object: for two mesh layouts, the meta-loss and its gradient on 1 device and on 4; and a short
dd_jax.distill run (stopped, resumed, then evaluated) on 1 device and on all 4.
"""
from __future__ import annotations

import os
import sys

# 4 CPU devices; and XLA's cheap compile (no LLVM optimisation): compiling dominates this check
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4",
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR") or
                  os.path.join(sys.argv[1], "xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dd_jax  # noqa: E402
from conftest import make_tiny_convnet  # noqa: E402
from dd_jax.config import default_config  # noqa: E402
from dd_jax.dataset import Dataset  # noqa: E402
from dd_jax.meta import meta_loss  # noqa: E402
from dd_jax.outer_step import build_outer_loop  # noqa: E402
from dd_jax.sharding import sharded_meta_loss  # noqa: E402

ITERATIONS = 3
# (init regime, n_nets, C++ kernels, fused step) -> the 4-device mesh splits the 4 nets, or 2
# nets x 2 halves of the real batch (the fixed regime's 1 x 4 mesh runs the same code); the last
# two with every batch through the C++ kernels, whose gradients are summed over the axes they
# vary on, the last with the dense layer's inner steps in `dense_step.dense_head_step`
LAYOUTS = {"nets": ("random", 4, False, False), "nets_and_batch": ("random", 2, False, False),
           "native_nets_and_batch": ("random", 2, True, False),
           "fused_nets_and_batch": ("random", 2, True, True)}


def tiny_dataset() -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(94, 8, 8, 1)).astype(np.float32)
    y = (np.arange(94) % 10).astype(np.int32)
    # 30 test images: 4 devices evaluate 8 each, the last 2 of them padding
    return Dataset("tiny", x[:64], y[:64], x[64:], y[64:], 10, (0.0,), (1.0,))


def tiny_config(init_regime: str, n_nets: int, devices: int):
    c = default_config()
    c.update(dict(init_regime=init_regime, n_nets=n_nets, devices=devices, steps=2, epochs=2,
                  real_batch_size=16, outer_lr=0.01, log_every=1, checkpoint_every=1,
                  n_eval_nets_during=3))
    return c


def meta_gradient(dataset: Dataset, config, native: bool, fused: bool) -> dict:
    """The meta-loss and its gradient at the initial state, for the first real batch; with
    `native` every convolution through the C++ kernels, with `fused` the inner steps the
    loop's fused step (`dense_step.fused_gd_step`)."""
    model = make_tiny_convnet(native=True, patches_up_to=0, head=fused) if native else make_tiny_convnet()
    loop = build_outer_loop(dataset, model, config)
    assert (loop.step_fn is not None) == fused
    loss_fn = meta_loss if loop.mesh is None else sharded_meta_loss(loop.mesh)
    idx = jnp.asarray(loop.batches(0))
    loss, grads = jax.jit(jax.value_and_grad(loss_fn),
                          static_argnames=("apply_fn", "epochs", "step_fn"))(
        loop.state.learned, loop.labels, loop.regime.train_inits(0), loop.train_x[idx],
        loop.train_y[idx], apply_fn=loop.model.apply, epochs=config.epochs,
        step_fn=loop.step_fn,
    )
    return {
        "mesh": None if loop.mesh is None else dict(loop.mesh.shape),
        "loss": float(loss),
        "grad_images": np.asarray(grads.images).ravel().tolist(),
        "grad_raw_step_sizes": np.asarray(grads.raw_step_sizes).tolist(),
    }


def resumed_run(dataset: Dataset, config, workdir: Path) -> dict:
    """dd_jax.distill stopped after 2 iterations, resumed to ITERATIONS, then dd_jax.evaluate
    with the same number of devices: the meta-losses, learned data and test accuracies."""
    rows = []
    workdir.mkdir()
    for iterations, resume in ((2, False), (ITERATIONS, True)):
        distilled = dd_jax.distill(dataset, make_tiny_convnet(), config, workdir=workdir,
                                   resume=resume, progress=False, log=rows.append,
                                   iterations=iterations)
    acc = dd_jax.evaluate(distilled, dataset, make_tiny_convnet(), n_nets=3, devices=config.devices)
    return {
        "losses": [r["meta_loss"] for r in rows],
        "images": distilled.images.ravel().tolist(),
        "step_sizes": distilled.step_sizes.tolist(),
        "test_accs": acc["accuracies"],
        "untrained_accs": acc["untrained"]["accuracies"],
    }


def main(out: Path) -> None:
    dataset = tiny_dataset()
    report = {"device_count": jax.device_count(), "gradients": {}, "runs": {}}
    for name, (regime, n_nets, native, fused) in LAYOUTS.items():
        report["gradients"][name] = {
            "one": meta_gradient(dataset, tiny_config(regime, n_nets, 1), native, fused),
            "four": meta_gradient(dataset, tiny_config(regime, n_nets, 4), native, fused),
        }
    config = lambda devices: tiny_config(*LAYOUTS["nets_and_batch"][:2], devices)
    report["runs"] = {"one": resumed_run(dataset, config(1), out / "one"),
                      "all": resumed_run(dataset, config(0), out / "all")}
    print(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
