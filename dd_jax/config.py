"""The configuration of a run: every field, with the authors' defaults.

`default_config()` is what `dd_jax.distill` uses when given no config; the named experiments in
experiments/configs.py start from it, and every field is a command-line flag.
"""
from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """The authors' defaults (MNIST, LeNet, fixed init, S=1 step x E=3 epochs, 1 image/class)."""
    c = ml_collections.ConfigDict()
    # data and model
    c.dataset = "mnist"  # 'mnist', 'digits' or a prepared tensorflow-datasets name
    c.data_dir = ""  # tfds data_dir ('' = tfds default)
    c.train_subset = 0  # use the first N training images (0 = all)
    c.test_subset = 0  # evaluate on the first N test images (0 = the full test set)
    c.model = "lenet"
    c.conv = "im2col"  # 'im2col' (fast on CPU) or 'xla' (flax.linen.Conv); same function
    # initialisation regime
    c.init_regime = "fixed"  # 'fixed' or 'random'
    c.init_dist = "xavier_normal"  # see dd_jax.INIT_DISTRIBUTIONS, or 'model'
    c.init_gain = 1.0
    # distilled data and inner loop
    c.steps = 1
    c.epochs = 3
    c.images_per_class = 1
    c.step_size_init = 0.02
    c.remat = False
    # outer loop
    c.n_nets = 1
    c.real_batch_size = 1024
    c.passes = 400  # passes over the real training set
    c.iterations = 0  # if > 0, overrides passes
    c.outer_lr = 0.01
    c.beta1 = 0.5
    c.beta2 = 0.999
    c.decay_passes = 40
    c.decay_factor = 0.5
    c.seed = 0
    # data poisoning (dd_jax.poison): the meta-objective's real labels K -> T
    c.poison_class = -1  # K: the attacked class (-1 = off, plain distillation)
    c.poison_target = -1  # T: the class that K is to be predicted as
    # evaluation, logging, checkpoints
    c.n_eval_nets = 20  # held-out initialisations for the final random-regime evaluation
    c.n_eval_nets_during = 4  # ... for the periodic evaluation while training
    c.eval_every = 500
    c.log_every = 10
    c.checkpoint_every = 200
    c.output_dir = ""  # '' = runs/<experiment name>
    return c
