"""Evaluation protocols for a distilled set, on any architecture.

- 'paper': the set's own T learned steps (its step sizes) from its regime's initialisations,
  through `dd_jax.evaluation.evaluate` (the architecture it was distilled for only).
- 'standard': the protocol of the later papers (DC, DSA, MTT): train fresh networks from
  scratch on the distilled images with ordinary minibatch SGD (`Recipe`: lr 0.01, momentum 0.9,
  weight decay 5e-4, batch 256, 300 epochs, lr x0.1 for the second half), optionally with
  DSA-style augmentation (`augment`), and report mean +- std of the test accuracy over the
  networks.

Both train on `DistilledData.train_labels`: hard (S, n) integers, or learned soft (S, n, K)
label vectors with the soft-target cross-entropy -sum_c y_c log softmax(logits)_c.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dd_jax.errors import ConfigError, DataError
from dd_jax.evaluation import Evaluator, evaluate, summarise
from dd_jax.inner import example_cross_entropy
from dd_jax.models import MLP, ConvNet, LeNet, Model, as_model

Params = Any
PROTOCOLS = ("paper", "standard")
# --model of `python -m experiments.evaluate`: name -> Flax module class (num_classes=...)
ARCHITECTURES = {"lenet": LeNet, "mlp": MLP, "convnet": ConvNet}


def architecture(name: str, num_classes: int):
    """The named evaluation architecture (`ARCHITECTURES`) for num_classes classes."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](num_classes=num_classes)


def check_labels(labels: np.ndarray, num_classes: int) -> None:
    """DataError unless `labels` are what a distilled set trains on: hard (S, n) integers in
    [0, num_classes) or soft (S, n, num_classes) floats (`DistilledData.train_labels`)."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and np.issubdtype(labels.dtype, np.integer):
        if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
            raise DataError(f"the distilled labels must lie in [0, {num_classes}), got "
                            f"{labels.min()}..{labels.max()}")
        return
    if labels.ndim == 3 and np.issubdtype(labels.dtype, np.floating):
        if labels.shape[-1] != num_classes:
            raise DataError(f"the distilled soft labels have {labels.shape[-1]} classes, the "
                            f"dataset {num_classes}")
        return
    raise DataError(f"distilled labels must be (S, n) integers or (S, n, K) soft label vectors, "
                    f"got shape {labels.shape} of {labels.dtype}")


def check_model_fits(model: Model, image_shape: tuple[int, ...]) -> None:
    """ConfigError unless `model` runs on images of `image_shape` (H, W, C)."""
    try:
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)))
    except (ValueError, TypeError, ConfigError) as e:
        raise ConfigError(f"the model cannot take {'x'.join(map(str, image_shape))} images: "
                          f"{str(e).splitlines()[0]}") from None


def check_init_matches(init_params: Params, model: Model, image_shape: tuple[int, ...]) -> None:
    """ConfigError unless the fixed theta_0 `init_params` has the parameter tree (structure
    and shapes) of `model` on images of `image_shape`."""
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)))
    shapes = lambda tree: jax.tree.map(lambda a: tuple(np.shape(a)), tree)
    if shapes(expected) != shapes(init_params):
        raise ConfigError("the set's stored theta_0 is not this model's parameter tree: the "
                          "paper protocol trains the architecture the set was distilled for")


def evaluate_paper(distilled, dataset, model_fn, n_nets: int | None = None) -> dict:
    """The paper's protocol: `dd_jax.evaluation.evaluate`, on the labels the set trains on
    (fixed regimes: its stored theta_0, checked against the model; random: `n_nets` held-out
    draws; random_pretrained: its pool's held-out members). Returns `summarise` of the
    accuracies plus 'untrained'."""
    model = as_model(model_fn)
    check_labels(distilled.train_labels, dataset.num_classes)
    if distilled.init_params is not None:
        check_init_matches(distilled.init_params, model, dataset.image_shape)
    return evaluate(distilled, dataset, model, n_nets=n_nets)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The standard protocol's training: minibatch SGD with momentum and weight decay (as
    PyTorch's SGD: g += weight_decay * p; buf = momentum * buf + g; p -= lr_t * buf), the
    distilled set reshuffled every epoch, lr_t = lr for the first epochs // 2 epochs and
    lr / 10 after; `augment` applies `augment` to every minibatch."""

    epochs: int = 300
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Minibatches in one pass over n images (the last one may be smaller)."""
    return -(-n // batch_size)


def learning_rate(recipe: Recipe, steps_per_epoch: int) -> optax.Schedule:
    """step -> lr_t: recipe.lr until epoch epochs // 2 begins, recipe.lr / 10 from then on."""
    return optax.piecewise_constant_schedule(
        recipe.lr, {steps_per_epoch * (recipe.epochs // 2): 0.1})


def sgd(recipe: Recipe, steps_per_epoch: int) -> optax.GradientTransformation:
    """The recipe's optimiser: weight decay added to the gradient, then SGD with momentum
    (optax's trace: buf = momentum * buf + g, update = -lr_t * buf)."""
    return optax.chain(
        optax.add_decayed_weights(recipe.weight_decay),
        optax.sgd(learning_rate(recipe, steps_per_epoch), momentum=recipe.momentum),
    )


def minibatches(key: jax.Array, n: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """One epoch's shuffled minibatches of n examples: indices (nb, b) and a mask (nb, b),
    b = min(batch_size, n), nb = ceil(n / b); the last batch's padding slots (index 0) have
    mask 0."""
    b = min(batch_size, n)
    nb = batches_per_epoch(n, b)
    order = jnp.concatenate([jax.random.permutation(key, n), jnp.zeros(nb * b - n, jnp.int32)])
    mask = (jnp.arange(nb * b) < n).astype(jnp.float32)
    return order.reshape(nb, b), mask.reshape(nb, b)


def augment(key: jax.Array, x: jax.Array, scale: float = 1.2, rotate: float = 15.0,
            shift: float = 0.125) -> jax.Array:
    """DSA-style differentiable augmentation, x (N, H, W, C) -> (N, H, W, C): each image under
    its own random affine map about its centre - x and y scaled by factors uniform in
    [1/scale, scale], rotated by an angle uniform in +-`rotate` degrees, shifted by up to
    +-`shift` of its size in x and y - sampled bilinearly, zeros (in normalised pixel space,
    as DSA's grid_sample) outside the image. No flips, colour changes or cutout."""
    n, h, w, _ = x.shape
    k_scale, k_angle, k_shift = jax.random.split(key, 3)
    factors = jax.random.uniform(k_scale, (n, 2), minval=1 / scale, maxval=scale)
    angle = jnp.deg2rad(jax.random.uniform(k_angle, (n,), minval=-rotate, maxval=rotate))
    offset = jax.random.uniform(k_shift, (n, 2), minval=-shift, maxval=shift) * jnp.array([h, w])
    centre = jnp.array([(h - 1) / 2, (w - 1) / 2])
    grid = jnp.stack(jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij"), -1) - centre

    def one(img, f, a, t):
        rot = jnp.array([[jnp.cos(a), -jnp.sin(a)], [jnp.sin(a), jnp.cos(a)]])
        src = (grid @ (rot * f).T) + centre + t  # (H, W, 2): where each output pixel reads
        sample = lambda channel: jax.scipy.ndimage.map_coordinates(
            channel, [src[..., 0], src[..., 1]], order=1, mode="constant", cval=0.0)
        return jax.vmap(sample, in_axes=-1, out_axes=-1)(img)

    return jax.vmap(one)(x, factors, angle, offset)


def train_network(apply_fn, params: Params, key: jax.Array, x: jax.Array, y: jax.Array,
                  recipe: Recipe) -> Params:
    """theta after `recipe` on (x, y) from `params`: x (N, H, W, C), y (N,) integers or (N, K)
    soft labels. `key` draws each epoch's shuffle (fold_in(key, epoch)) and augmentation."""
    n = x.shape[0]
    steps_per_epoch = batches_per_epoch(n, min(recipe.batch_size, n))
    opt = sgd(recipe, steps_per_epoch)

    def loss(p, xb, yb, mask):
        return jnp.sum(mask * example_cross_entropy(apply_fn(p, xb), yb)) / jnp.sum(mask)

    def epoch(carry, e):
        order_key, augment_key = jax.random.split(jax.random.fold_in(key, e))
        index, mask = minibatches(order_key, n, recipe.batch_size)

        def step(carry, batch):
            p, state = carry
            b, i, m = batch
            xb = augment(jax.random.fold_in(augment_key, b), x[i]) if recipe.augment else x[i]
            updates, state = opt.update(jax.grad(loss)(p, xb, y[i], m), state, p)
            return (optax.apply_updates(p, updates), state), None

        return jax.lax.scan(step, carry, (jnp.arange(steps_per_epoch), index, mask))[0], None

    (params, _), _ = jax.lax.scan(epoch, (params, opt.init(params)), jnp.arange(recipe.epochs))
    return params


def train_networks(model_fn, key: jax.Array, n_nets: int, x: jax.Array, y: jax.Array,
                   recipe: Recipe, vmap: bool = True) -> Params:
    """n_nets networks trained from scratch by `train_network` (params with a leading n_nets
    axis). Network i: (init key, data key) = split(split(key, n_nets)[i]), initialised by
    the model's own init. Vmapped over the networks, or one after another (lax.map) with
    ``vmap=False``: the same networks."""
    model = as_model(model_fn)

    def one(net_key):
        init_key, data_key = jax.random.split(net_key)
        return train_network(model.apply, model.init(init_key, x[:1]), data_key, x, y, recipe)

    keys = jax.random.split(key, n_nets)
    run = jax.vmap(one) if vmap else lambda ks: jax.lax.map(one, ks)
    return jax.jit(run)(keys)


def flat_set(images: np.ndarray, labels: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Distilled images (S, n, H, W, C) and labels (S, n) or (S, n, K) as one training set
    x (S*n, H, W, C), y (S*n,) or (S*n, K)."""
    s, n = images.shape[:2]
    labels = np.asarray(labels)
    return (jnp.asarray(images).reshape(s * n, *images.shape[2:]),
            jnp.asarray(labels).reshape(s * n, *labels.shape[2:]))


def evaluate_standard(distilled, dataset, model_fn, n_nets: int = 20, seed: int = 0,
                      recipe: Recipe = Recipe(), vmap: bool = True) -> dict:
    """The standard protocol: `n_nets` networks trained from scratch on the distilled images
    (all S steps' batches as one set, its own labels) by `recipe`, each tested on dataset's
    test set (in chunks of 500 images: ConvNet-3's im2col patches of larger chunks take
    gigabytes). Keys from jax.random.PRNGKey(seed). Returns `summarise` of the accuracies and
    'diverged': how many networks ended with non-finite weights (their accuracy is chance's;
    e.g. soft labels with negative entries make the soft-target cross-entropy unbounded
    below)."""
    model = as_model(model_fn)
    check_labels(distilled.train_labels, dataset.num_classes)
    if n_nets < 1 or recipe.epochs < 1 or recipe.batch_size < 1:
        raise ConfigError(f"n_nets, epochs and batch_size must be >= 1, got {n_nets}, "
                          f"{recipe.epochs}, {recipe.batch_size}")
    x, y = flat_set(distilled.images, distilled.train_labels)
    params = train_networks(model, jax.random.PRNGKey(seed), n_nets, x, y, recipe, vmap)
    evaluator = Evaluator(model.apply, 1, dataset.test_x, dataset.test_y, chunk=500)
    finite = jax.vmap(lambda p: jnp.all(jnp.stack([jnp.isfinite(a).all()
                                                   for a in jax.tree.leaves(p)])))(params)
    return {**summarise(evaluator.untrained(params)), "diverged": int(n_nets - finite.sum())}


def evaluate_protocol(protocol: str, distilled, dataset, model_fn, *, n_nets: int | None = None,
                      seed: int = 0, recipe: Recipe = Recipe()) -> dict:
    """`evaluate_paper` or `evaluate_standard` (n_nets default 20 there; seed and recipe are
    the standard protocol's) of `distilled` on dataset's test set."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    check_model_fits(as_model(model_fn), dataset.image_shape)
    if tuple(distilled.images.shape[2:]) != tuple(dataset.image_shape):
        raise DataError(f"the distilled images are {distilled.images.shape[2:]}, the dataset's "
                        f"{dataset.image_shape}")
    if protocol == "paper":
        return evaluate_paper(distilled, dataset, model_fn, n_nets)
    return evaluate_standard(distilled, dataset, model_fn, n_nets or 20, seed, recipe)
