"""dd_jax: Dataset Distillation (Wang et al., 2018) in JAX.

The data flow, one module per stage: data -> models -> regimes -> inner -> meta -> outer ->
evaluation -> outputs; `experiment.run` strings them together.
"""
__version__ = "0.1.0"  # the package's one version: setup.cfg reads it

from dd_jax.config import default_config
from dd_jax.data import Dataset, load_dataset
from dd_jax.errors import ConfigError, DataError, DDJaxError, DivergedError
from dd_jax.evaluation import evaluate
from dd_jax.inner import inner_train
from dd_jax.meta import Learned, meta_loss
from dd_jax.models import AlexCifarNet, LeNet, Model, as_model
from dd_jax.outer import DistilledData, distill
from dd_jax.outputs import load_distilled, save_distilled
from dd_jax.pretrain import load_pool, save_pool, train_pool
from dd_jax.poison import evaluate_poison, poison_labels
from dd_jax.regimes import INIT_DISTRIBUTIONS, make_regime, sample_init, sample_inits

__all__ = [
    "__version__",
    "ConfigError", "DDJaxError", "DataError", "Dataset", "DistilledData", "DivergedError",
    "INIT_DISTRIBUTIONS", "LeNet", "Learned", "Model", "as_model", "default_config", "distill", "evaluate",
    "inner_train", "load_dataset", "load_distilled", "make_regime", "meta_loss", "sample_init",
    "sample_inits", "save_distilled",
    "load_pool", "save_pool", "train_pool",  # pretrained networks
    # poisoning and CIFAR-10 (branch poison_cifar)
    "AlexCifarNet", "evaluate_poison", "poison_labels",
]
