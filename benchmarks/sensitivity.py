"""How far the test accuracy of a fixed-init distilled set moves when its images move a little.

    python -m benchmarks.sensitivity results/mnist_fixed_init/distilled.npz [--draws=5]
        [--scales=1e-6,1e-5,1e-4,1e-3]

Adds Gaussian noise of each scale (normalised pixel units; the images' own std is ~1.4) to the
images, keeping theta_0 and the step sizes, retrains and tests on the full test set. Prints a
markdown table: the unperturbed accuracy, then per scale each draw's accuracy.
"""
from __future__ import annotations

import sys

import jax

from benchmarks.common import machine_info, machine_line, number_list, parse_flags, run_main
from dd_jax.data import load_dataset
from dd_jax.distilled import load_distilled
from dd_jax.errors import ConfigError
from dd_jax.evaluation import evaluation_setup
from dd_jax.models import as_model, get_model
from dd_jax.outputs import markdown_table


def perturbed_accuracies(distilled, dataset, model, scales: list[float], draws: int,
                         seed: int = 0) -> dict[float, list[float]]:
    """{scale: [test accuracy after training on images + scale * N(0, 1)] for `draws` draws},
    scale 0 included (the data as it is); theta_0 and step sizes unchanged."""
    evaluator, init, (images, labels, steps) = evaluation_setup(distilled, dataset, model)
    key = jax.random.PRNGKey(seed)
    out = {0.0: [float(evaluator(init, images, labels, steps)[0])]}
    for i, scale in enumerate(scales):
        noise = jax.random.normal(jax.random.fold_in(key, i), (draws, *images.shape))
        out[scale] = [float(evaluator(init, images + scale * n, labels, steps)[0]) for n in noise]
    return out


def main(argv: list[str]) -> None:
    paths, flags, rest = parse_flags(argv, {"draws": 5, "scales": "1e-6,1e-5,1e-4,1e-3",
                                            "dataset": "mnist", "model": "lenet"})
    if len(paths) != 1 or rest:
        raise ConfigError("give one distilled.npz path and only the flags --draws, --scales, "
                          f"--dataset, --model; got {' '.join(argv) or 'nothing'}")
    distilled = load_distilled(paths[0])
    if distilled.init_params is None:
        raise ConfigError(f"{paths[0]} has no theta_0: only fixed-init distilled data can be "
                          "checked")
    scales = number_list("scales", flags["scales"], float)
    dataset = load_dataset(flags["dataset"])
    model = as_model(get_model(flags["model"], dataset.num_classes))
    accs = perturbed_accuracies(distilled, dataset, model, scales, flags["draws"])
    print(markdown_table(["noise std", "test accuracy % (each draw)", "range"],
                         [[f"{s:g}", ", ".join(f"{100 * a:.2f}" for a in v),
                           f"{100 * (max(v) - min(v)):.2f}"] for s, v in accs.items()]))
    print(machine_line(machine_info()))
    print("command: python -m benchmarks.sensitivity " + " ".join(argv))


if __name__ == "__main__":
    sys.exit(run_main(main, __doc__))
