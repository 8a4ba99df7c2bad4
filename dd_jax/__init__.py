"""dd_jax: Dataset Distillation (Wang et al., 2018) in JAX.

The data flow, one module per stage (docs/layout.md draws the same map):

    data (dataset: the type, the real batches' order; usps, tfds_data: more loaders)
         -> models (conv: the 5x5 layers; native: their C++ kernels)
         -> pretrain (pools of trained networks) -> regimes (the initialisations theta_0)
         -> inner (T steps of GD on the distilled data; unroll: other optimisers, windows;
            dense_step: a step whose dense head runs in C++)
         -> meta (the meta-loss on a real batch; objective: plain or poison)
         -> outer (the outer loop; outer_step: its jitted iteration; schedule, validation,
            selection, interrupts; sharding over devices)
         -> evaluation (protocols: training from scratch on any architecture)
         -> distilled (the result and its .npz) -> outputs (figures, metrics, tables)

Beside the pipeline: baselines (real-image baselines; baseline_run runs them, knn scores them)
and linear (the Sec. 3.3 analysis).
`experiment.run` runs a config of any kind into a directory (runs: what every run shares);
config holds every field, checkpoint and files how state reaches the disk.
"""
__version__ = "0.1.0"  # the package's one version: setup.cfg reads it

from dd_jax.config import default_config
from dd_jax.data import load_dataset
from dd_jax.dataset import Dataset
from dd_jax.distilled import DistilledData, load_distilled, save_distilled
from dd_jax.errors import ConfigError, DataError, DDJaxError, DivergedError
from dd_jax.evaluation import evaluate
from dd_jax.inner import inner_train
from dd_jax.meta import Learned, meta_loss
from dd_jax.models import AlexCifarNet, LeNet, Model, as_model
from dd_jax.objective import MetaObjective, Plain
from dd_jax.outer import distill
from dd_jax.poison import Poisoning, evaluate_poison, poison_labels
from dd_jax.pretrain import load_pool, save_pool, train_pool
from dd_jax.regimes import INIT_DISTRIBUTIONS, make_regime, sample_init, sample_inits

__all__ = [
    "__version__",
    "ConfigError", "DDJaxError", "DataError", "Dataset", "DistilledData", "DivergedError",
    "INIT_DISTRIBUTIONS", "LeNet", "Learned", "Model", "as_model", "default_config", "distill", "evaluate",
    "inner_train", "load_dataset", "load_distilled", "make_regime", "meta_loss", "sample_init",
    "sample_inits", "save_distilled",
    "load_pool", "save_pool", "train_pool",  # pretrained networks
    "MetaObjective", "Plain", "Poisoning", "evaluate_poison", "poison_labels",  # objectives
    "AlexCifarNet",
]
