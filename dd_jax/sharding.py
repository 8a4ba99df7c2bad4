"""Scale-out: the outer meta-step and the evaluation on several devices (jax.sharding, shard_map).

The meta-step's devices form a 2-D mesh ('nets', 'batch'). The n_nets initialisations of an
outer iteration are split over the 'nets' axis, which gets gcd(n_nets, devices) devices; the
real batch is split over the rest ('batch'). Each device computes `meta_loss` on its nets and
its slice of the real batch. All shares are equal, so the mean over devices is the single-device
meta-loss, and the gradient (the transpose of `shard_map`) is summed over devices.
Evaluation splits the test set over the same devices.

One device (``--devices=1``, the default) never builds a mesh: the single-device code path.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dd_jax.errors import ConfigError
from dd_jax.meta import meta_loss

NETS, BATCH = "nets", "batch"
TEST = "test"  # the evaluation mesh's one axis


def init_distributed() -> None:
    """Joins a multi-host run (`jax.distributed.initialize`); call it before any other JAX call.

    On SLURM, Open MPI, Kubernetes or Cloud TPU JAX reads the cluster's environment; elsewhere
    set JAX_COORDINATOR_ADDRESS=host:port (process 0's), JAX_NUM_PROCESSES and JAX_PROCESS_ID
    on every host. Afterwards jax.devices() lists every host's devices.
    """
    env = lambda name: int(os.environ[name]) if os.environ.get(name) else None
    try:
        jax.distributed.initialize(num_processes=env("JAX_NUM_PROCESSES"),
                                   process_id=env("JAX_PROCESS_ID"))
    except (ValueError, RuntimeError) as e:
        raise ConfigError(
            f"--distributed: {str(e).splitlines()[0]} (outside SLURM / Open MPI / Kubernetes / "
            "Cloud TPU set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
        ) from None


def select_devices(n: int) -> list[jax.Device]:
    """The first `n` of jax.devices() (all of them for n = 0; on several hosts, every host's)."""
    available = jax.devices()
    if n < 0 or n > len(available):
        raise ConfigError(
            f"devices={n}, but {len(available)} {available[0].platform} device(s) are available; "
            f"use --devices=0 for all of them, or a number from 1 to {len(available)}"
        )
    return available[: n or len(available)]


def make_mesh(devices: Sequence[jax.Device], n_nets: int, batch_size: int) -> Mesh:
    """The ('nets', 'batch') mesh: gcd(n_nets, len(devices)) devices split the initialisations,
    the remaining factor splits the real batch (which must divide evenly)."""
    nets = math.gcd(n_nets, len(devices))
    batch = len(devices) // nets
    if batch_size % batch:
        raise ConfigError(
            f"devices={len(devices)} with n_nets={n_nets} leaves {batch} device(s) to split the "
            f"real batch of {batch_size}, which is not divisible by {batch}; use a real_batch_size "
            f"that is a multiple of {batch}, an n_nets that is a multiple of {len(devices)}, "
            f"or fewer --devices"
        )
    return Mesh(np.asarray(devices).reshape(nets, batch), (NETS, BATCH))


def replicate(tree, mesh: Mesh):
    """`tree` with every leaf copied to all devices of `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def sharded_meta_loss(mesh: Mesh) -> Callable[..., jax.Array]:
    """`meta_loss` with the same signature, computed on the ('nets', 'batch') `mesh`:
    init_params' leading axis split over 'nets', real_x / real_y over 'batch' (a truncated
    unroll's `stop` replicated)."""

    def loss(learned, labels, init_params, real_x, real_y, *, apply_fn, epochs, remat=False,
             inner=None, stop=None, step_fn=None):
        local = functools.partial(meta_loss, apply_fn=apply_fn, epochs=epochs, remat=remat,
                                  inner=inner, step_fn=step_fn)
        if stop is None:
            return jax.shard_map(
                lambda *args: jax.lax.pmean(local(*args), (NETS, BATCH)),
                mesh=mesh, in_specs=(P(), P(), P(NETS), P(BATCH), P(BATCH)), out_specs=P(),
            )(learned, labels, init_params, real_x, real_y)
        return jax.shard_map(  # the window's stop: the same on every device
            lambda *args: jax.lax.pmean(local(*args[:5], stop=args[5]), (NETS, BATCH)),
            mesh=mesh, in_specs=(P(), P(), P(NETS), P(BATCH), P(BATCH), P()), out_specs=P(),
        )(learned, labels, init_params, real_x, real_y, stop)

    return loss


def eval_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """A 1-D mesh ('test',) over `devices`, to split the test set in evaluation."""
    return Mesh(np.asarray(devices), (TEST,))
