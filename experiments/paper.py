"""The paper's numbers (Wang et al., Dataset Distillation, arXiv 1811.10959), in one place.

PAPER maps an experiment name (a run of distilled data) or (experiment, method) (one row of a
run with "rows", e.g. a baseline) to a `PaperResult`. Accuracies are in percent, test accuracy
after training on the set (or, for `knn`, of k-NN classification with it). `status` is
'confirmed' when the shared reference notes (../shared/reference/dataset-distillation.md) lists the number as confirmed, else
'unconfirmed' (recalled from the paper, not checked against it). Keys of experiments that do not
exist yet name the experiment that should report them. The learned-label experiments carry the
soft-label paper's numbers (Sucholutsky & Schonlau, arXiv 1910.02551; the reference gives them
as "over 96%" and "almost 92%"), named in their note.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PaperResult:
    acc: float | None  # percent; None where the paper gives only a k-NN number
    std: float | None = None  # over the paper's held-out initialisations
    status: str = "confirmed"
    knn: float | None = None  # k-NN accuracy with the same set as the reference, percent
    knn_std: float | None = None
    note: str = ""

    def text(self) -> str:
        """'93.76', '79.5 ± 8.1', with ' (unconfirmed)' where it is."""
        return _with_std(self.acc, self.std) + self._mark()

    def knn_text(self) -> str:
        return _with_std(self.knn, self.knn_std) + self._mark() if self.knn is not None else ""

    def _mark(self) -> str:
        return "" if self.status == "confirmed" else " (unconfirmed)"


def _with_std(value: float | None, std: float | None) -> str:
    if value is None:
        return ""
    return f"{value:g}" + (f" ± {std:g}" if std is not None else "")


UNCONFIRMED = "unconfirmed"
# Table 1's baselines (as recalled: unknown random inits, 100 images, S=10, E=3, a tuned fixed
# step size; k-NN reported for random real and k-means only).
_TABLE1_MNIST = "Table 1, MNIST, random init, 100 images"

PAPER: dict[str | tuple[str, str], PaperResult] = {
    # distilled data, MNIST LeNet
    "mnist_fixed_init": PaperResult(93.76, note="Fig. 2a, 10 images, from 12.90% untrained"),
    "mnist_fixed_init_100": PaperResult(96.6, status=UNCONFIRMED, note="Table 1, 100 images"),
    "mnist_random_init": PaperResult(79.5, 8.1, note="Table 1, 100 images, 200 unseen inits"),
    # learned labels, MNIST LeNet, fixed init (the soft-label paper)
    "mnist_soft_labels": PaperResult(96.0, note="soft-label paper: over 96%, 10 images"),
    "mnist_soft_labels_5": PaperResult(92.0, note="soft-label paper: almost 92%, 5 images"),
    # distilled data, CIFAR-10 AlexCifarNet
    "cifar10_fixed_init_100": PaperResult(54.03, note="100 images, from 8.82% untrained"),
    "cifar10_random_init": PaperResult(36.8, 1.2, note="Table 1, 100 images"),
    # adaptation (pretrained inits), 100 images
    "usps_to_mnist_random_pretrained": PaperResult(92.7, 1.4, note="from 67.5 ± 3.9"),
    "mnist_to_usps_fixed_pretrained": PaperResult(97.9, status=UNCONFIRMED),
    "usps_to_mnist_fixed_pretrained": PaperResult(93.2, status=UNCONFIRMED),
    "svhn_to_mnist_fixed_pretrained": PaperResult(96.2, status=UNCONFIRMED),
    # full training set, for scale
    "mnist_full_data": PaperResult(99.0, note="~99%"),
    "cifar10_full_data": PaperResult(80.0, note="~80%"),
    # Table 1 baselines (MNIST) - recalled
    ("mnist_baselines_random", "random_real"): PaperResult(
        68.6, 9.8, UNCONFIRMED, knn=71.5, knn_std=2.1, note=_TABLE1_MNIST),
    ("mnist_baselines_random", "optimised_real"): PaperResult(73.0, 7.6, UNCONFIRMED, note=_TABLE1_MNIST),
    ("mnist_baselines_random", "kmeans"): PaperResult(
        76.4, 9.5, UNCONFIRMED, knn=92.2, knn_std=0.1, note=_TABLE1_MNIST),
    ("mnist_baselines_random", "mean"): PaperResult(77.1, 2.7, UNCONFIRMED, note=_TABLE1_MNIST),
}
# the same setting: the authors' exact hyperparameters, and a smaller real batch
PAPER["mnist_fixed_init_paper"] = PAPER["mnist_fixed_init_b256"] = PAPER["mnist_fixed_init"]
# the distilled row of a baselines run (--distilled=<that regime's distilled.npz>)
PAPER[("mnist_baselines", "distilled")] = PAPER["mnist_fixed_init_100"]
PAPER[("mnist_baselines_random", "distilled")] = PAPER["mnist_random_init"]


def paper_result(experiment: str, method: str | None = None) -> PaperResult | None:
    """The paper's number for a run (method None) or for one row of it."""
    return PAPER.get(experiment if method is None else (experiment, method))
