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
    c.conv = "native"  # "native" (C++ kernels on CPU), "toeplitz" or "xla"; same function (models.CONVS)
    # initialisation regime
    c.init_regime = "fixed"  # fixed, random, fixed_pretrained or random_pretrained (regimes.py)
    c.init_dist = "xavier_normal"  # see dd_jax.INIT_DISTRIBUTIONS, or 'model'
    c.init_gain = 1.0
    # distilled data and inner loop
    c.steps = 1
    c.epochs = 3
    c.images_per_class = 1
    c.step_size_init = 0.02
    c.remat = False
    c.learn_labels = False  # learn a label vector per image too (one-hot init, soft-target CE)
    c.images_per_step = 0  # images per distilled step (0 = images_per_class x classes); with
    #   hard labels a multiple of the classes, with learn_labels any number (classes in turn)
    c.inner_optimizer = "gd"  # "gd", "momentum" or "adam" (dd_jax.unroll)
    c.inner_momentum = 0.9  # momentum's coefficient, Adam's beta1
    c.inner_lr = 0.0  # > 0: one fixed inner step size for every step, not learned
    c.window = 0  # > 0: backpropagate through a window of this many steps at a random
    #   position (the unroll stops at the window's end; dd_jax.unroll); 0 = all T steps
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
    c.lr_schedule = "step"  # "step" (the authors': decay_passes, decay_factor) or "cosine"
    c.warmup_iterations = 0  # cosine: linear warm-up from 0 to outer_lr over this many iterations
    c.seed = 0
    # data poisoning (dd_jax.poison): the meta-objective's real labels K -> T
    c.poison_class = -1  # K: the attacked class (-1 = off, plain distillation)
    c.poison_target = -1  # T: the class that K is to be predicted as
    # evaluation, logging, checkpoints
    c.n_eval_nets = 20  # held-out initialisations for the final random-regime evaluation
    c.n_eval_nets_during = 4  # ... for the periodic evaluation while training
    c.val_size = 0  # training images held out (never trained on) to choose the returned iterate
    #   at the evaluations: the one best on them (0 = the last iterate, as the authors report)
    c.eval_every = 500
    c.log_every = 10
    c.checkpoint_every = 200
    c.output_dir = ""  # '' = runs/<experiment name>
    # what a run does: a key of dd_jax.experiment.RUNNERS ('distill', 'baselines', ...)
    c.kind = "distill"
    # baselines (dd_jax/baselines.py): real-image sets with the distilled data's layout
    c.baselines = "random_real,optimised_real,kmeans,mean"  # comma-separated, in table order
    c.optimised_candidates = 20  # optimised_real: best of this many random real sets
    c.step_size_grid = "0.01,0.02,0.03,0.05,0.07,0.1,0.15,0.2,0.3,0.5,1.0"  # fixed step sizes searched
    c.score_holdout = 2000  # training images held out to score sets and step sizes
    c.knn_k = 1  # neighbours in the k-NN classification with each set
    c.distilled = ""  # a distilled.npz to add to the baselines' table (k-NN and test accuracy)
    # pretrained networks: pool training and the pretrained init regimes (feature: pretrained)
    c.pool_path = ""  # pool.npz of fixed_/random_pretrained ('' = runs/<pool_source>_pool/pool.npz)
    c.pool_source = ""  # dataset the pool must have been trained on ('' = any)
    c.pool_eval_nets = 10  # random_pretrained: last pool members held out for evaluation only
    c.pool_size = 20  # pretrain_pool: networks to train
    c.pool_epochs = 1
    c.pool_batch_size = 64
    c.pool_optimizer = "adam"  # 'adam' (beta1, beta2 above) or 'sgd' (plain), constant step size
    c.pool_lr = 1e-3
    # scale-out (dd_jax.sharding): devices that split the initialisations and the real batch
    c.devices = 1  # 0 = all available (on several hosts: all hosts' devices)
    return c
