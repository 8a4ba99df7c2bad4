"""The paper's Section 3.3: a linear model, quadratic loss, one GD step on M distilled points.

Data X (N, D), y = X theta_true + noise; L(theta) = mean_i (x_i . theta - y_i)^2 / 2, minimised
by the least-squares theta*. Distilled data: M points d (M, D), targets t (M,) and a step size
eta, all learned; training is one GD step
``theta_1 = theta_0 - eta grad l(d, t; theta_0) = (I - eta/M d^T d) theta_0 + eta/M d^T t``.
theta_1 = theta* for every theta_0 needs eta/M d^T d = I, so rank d = D, so M >= D. With M < D
the component of theta_0 in the null space of d is never changed: over unseen
theta_0 ~ N(0, s^2 I) the expected excess loss L(theta_1) - L(theta*) is at least
s^2/2 x (the sum of the D - M smallest eigenvalues of X^T X / N).

`run_linear` learns (d, t, eta) for every M in 1..max_points by the outer loop over random
inits (the library's `meta_loss` with a squared loss, vmapped over `n_nets` inits per
iteration) and measures the distance to theta* and the excess loss on held-out inits.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from dd_jax.config import Field, Sections, config_from, require
from dd_jax.errors import ConfigError, DivergedError
from dd_jax.inner import inner_train
from dd_jax.meta import Learned, init_learned, meta_loss
from dd_jax.models import Model
from dd_jax.outputs import saved_figure, write_json
from dd_jax.regimes import DATA_STREAM, IMAGES_STREAM, make_regime
from dd_jax.runs import RESULTS, refuse_resume, start_run
from dd_jax.schedule import check_lr_schedule, make_optimizer

PLOT = "linear_analysis.png"


LINEAR_SECTIONS: Sections = {
    "what a run does": (
        Field("kind", "linear", "dispatched by dd_jax.experiment.run to run_linear"),
    ),
    "the regression problem": (
        Field("dim", 10, "D, features"),
        Field("train_points", 1000, "N, real data points (the meta-loss uses all of them)"),
        Field("noise", 0.1, "std of the label noise"),
        Field("init_scale", 1.0, "theta_0 ~ N(0, init_scale^2 I)"),
    ),
    "distilled data: one GD step on M points, M = 1..max_points": (
        Field("max_points", 20, "the largest M"),
        Field("step_size_init", 0.1, "initial learned step size eta"),
    ),
    "outer loop (one iteration = one pass over the N real points)": (
        Field("n_nets", 16, "theta_0 per iteration, vmapped"),
        Field("iterations", 2000, "outer iterations for each M"),
        Field("outer_lr", 0.03, "Adam learning rate"),
        Field("beta1", 0.9, "Adam beta1"),
        Field("beta2", 0.999, "Adam beta2"),
        Field("decay_passes", 500, "lr_schedule 'step': learning rate x decay_factor every this many passes (here one pass is one iteration)"),
        Field("decay_factor", 0.5, "lr_schedule 'step': the decay's factor"),
        Field("lr_schedule", "step", "'step' or 'cosine' (dd_jax.schedule.make_optimizer)"),
        Field("warmup_iterations", 0, "cosine: linear warm-up from 0 to outer_lr over this many iterations"),
        Field("seed", 0, "everything random derives from it: same seed, same result"),
    ),
    "evaluation and outputs": (
        Field("n_eval_nets", 200, "held-out theta_0 (the paper's count for random inits)"),
        Field("output_dir", "", "where the run writes ('' = runs/<experiment name>)"),
    ),
}


def linear_config() -> ml_collections.ConfigDict:
    """The linear analysis at D = 10, M = 1..20 (about a minute on 2 CPU cores)."""
    return config_from(LINEAR_SECTIONS)


def validate_linear_config(config) -> None:
    """Raises ConfigError naming the first impossible value and what would work."""
    require(config, at_least_one=("dim", "train_points", "max_points", "n_nets", "iterations",
                                  "decay_passes", "n_eval_nets"),
            positive=("init_scale", "step_size_init", "outer_lr", "decay_factor"),
            non_negative=("noise",))
    check_lr_schedule(config)
    if config.max_points < config.dim:
        raise ConfigError(
            f"max_points ({config.max_points}) must be >= dim ({config.dim}) so that the sweep "
            f"covers both M < D and M >= D; raise --max_points or lower --dim"
        )
    if config.train_points < config.dim:
        raise ConfigError(
            f"train_points ({config.train_points}) must be >= dim ({config.dim}) for a unique "
            "least-squares optimum; raise --train_points"
        )


def squared_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """mean_i (outputs_i - targets_i)^2 / 2; outputs, targets (N,)."""
    return 0.5 * jnp.mean(jnp.square(outputs - targets))


def apply_linear(theta: jax.Array, x: jax.Array) -> jax.Array:
    """x (N, D) theta (D,) -> (N,)."""
    return x @ theta


def linear_model(init_scale: float = 1.0) -> Model:
    """theta (D,) ~ N(0, init_scale^2 I), applied by `apply_linear`."""
    return Model(
        init=lambda key, x: init_scale * jax.random.normal(key, x.shape[-1:], x.dtype),
        apply=apply_linear,
    )


@dataclasses.dataclass(frozen=True)
class LinearProblem:
    """Real data x (N, D), y (N,) and the least-squares optimum theta_star (D,)."""

    x: jax.Array
    y: jax.Array
    theta_star: jax.Array

    @property
    def hessian(self) -> jax.Array:
        """(D, D): X^T X / N, the Hessian of L."""
        return self.x.T @ self.x / self.x.shape[0]


def make_problem(key: jax.Array, dim: int, n_points: int, noise: float) -> LinearProblem:
    """x ~ N(0, I), theta_true ~ N(0, I), y = x theta_true + noise * N(0, 1); theta* solved
    in float64."""
    kx, kt, kn = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n_points, dim))
    y = x @ jax.random.normal(kt, (dim,)) + noise * jax.random.normal(kn, (n_points,))
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    theta_star = np.linalg.lstsq(x64, y64, rcond=None)[0]
    return LinearProblem(x, y, jnp.asarray(theta_star, x.dtype))


def excess_loss(theta: jax.Array, problem: LinearProblem) -> jax.Array:
    """L(theta) - L(theta*) = (theta - theta*)^T H (theta - theta*) / 2; theta (..., D)."""
    delta = theta - problem.theta_star
    return 0.5 * jnp.einsum("...i,ij,...j->...", delta, problem.hessian, delta)


def excess_loss_bound(problem: LinearProblem, m: int, init_scale: float) -> float:
    """Lower bound on the expected excess loss after one GD step on m points, over
    theta_0 ~ N(0, init_scale^2 I): init_scale^2 / 2 x the D - m smallest eigenvalues of H."""
    eigenvalues = np.sort(np.linalg.eigvalsh(np.asarray(problem.hessian, np.float64)))
    return 0.5 * init_scale**2 * float(eigenvalues[: max(0, len(eigenvalues) - m)].sum())


def train_one_step(learned: Learned, targets: jax.Array, init_params: jax.Array) -> jax.Array:
    """theta_1 for each theta_0 (n, D) after the GD step on (d (1, M, D), t (1, M), eta)."""
    return jax.vmap(lambda theta0: inner_train(
        apply_linear, theta0, learned.images, targets, learned.step_sizes, 1, loss_fn=squared_error
    ))(init_params)


def distill_points(
    key: jax.Array, problem: LinearProblem, train_inits: jax.Array, m: int, config
) -> tuple[Learned, jax.Array, jax.Array]:
    """Learns m distilled points by `config.iterations` outer steps, step i on the theta_0 batch
    train_inits[i] (iterations, n_nets, D). -> (Learned: images d (1, m, D), one raw step size;
    targets t (1, m); meta-loss per iteration (iterations,)). d ~ N(0, 1), t = 0 at the start."""
    targets = jnp.zeros((1, m), jnp.float32)
    learned = init_learned(key, targets, problem.x.shape[1:], 1, config.step_size_init)
    optimizer = make_optimizer(config, 1)
    loss_and_grads = jax.value_and_grad(meta_loss, argnums=(0, 1))

    @jax.jit
    def train(trainable, train_inits, real_x, real_y):
        def step(carry, init_params):
            trainable, opt_state = carry
            loss, grads = loss_and_grads(*trainable, init_params, real_x, real_y,
                                         apply_fn=apply_linear, epochs=1, loss_fn=squared_error)
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), opt_state), loss

        (trainable, _), losses = jax.lax.scan(
            step, (trainable, optimizer.init(trainable)), train_inits
        )
        return trainable, losses

    (learned, targets), losses = train((learned, targets), train_inits, problem.x, problem.y)
    return learned, targets, losses


def evaluate_points(
    learned: Learned, targets: jax.Array, problem: LinearProblem, eval_inits: jax.Array
) -> dict[str, np.ndarray]:
    """Per held-out theta_0 (n, D): 'distance' ||theta_1 - theta*|| and 'excess_loss'."""
    theta1 = train_one_step(learned, targets, eval_inits)
    return {
        "distance": np.asarray(jnp.linalg.norm(theta1 - problem.theta_star, axis=-1)),
        "excess_loss": np.asarray(excess_loss(theta1, problem)),
    }


def sweep_row(m: int, learned: Learned, targets: jax.Array, losses: jax.Array,
              problem: LinearProblem, eval_inits: jax.Array, config, seconds: float) -> dict:
    """One results row: the figures of the m-point distilled set on the held-out inits."""
    figures = evaluate_points(learned, targets, problem, eval_inits)
    excess, distance = figures["excess_loss"], figures["distance"]
    d = np.asarray(learned.images[0], np.float64)
    return {
        "method": f"M={m}",
        "points": m,
        "test_acc": float(excess.mean()),  # the convention's figure slot: here the excess loss
        "test_acc_std": float(excess.std()),
        "excess_loss": float(excess.mean()),
        "excess_loss_std": float(excess.std()),
        "excess_loss_p10": float(np.percentile(excess, 10)),
        "excess_loss_p90": float(np.percentile(excess, 90)),
        "excess_loss_bound": excess_loss_bound(problem, m, config.init_scale),
        "distance": float(distance.mean()),
        "distance_std": float(distance.std()),
        "rank": int(np.linalg.matrix_rank(d)),
        "step_size": float(learned.step_sizes[0]),
        "meta_loss_final": float(losses[-1]),
        "eval_nets": int(len(excess)),
        "seconds": seconds,
    }


def plot_sweep(path: str | Path, rows: list[dict], dim: int) -> None:
    """PNG: excess loss (log scale; mean, 10-90% band) vs M, the M < D bound, a line at M = D."""
    m = np.array([r["points"] for r in rows])
    with saved_figure(path, dpi=120, figsize=(6, 4)) as (_, ax):
        ax.fill_between(m, [r["excess_loss_p10"] for r in rows], [r["excess_loss_p90"] for r in rows],
                        alpha=0.2, color="C0", label="10-90% of held-out inits")
        ax.plot(m, [r["excess_loss"] for r in rows], "o-", color="C0",
                label="learned distilled data, mean over held-out inits")
        below = m < dim
        ax.plot(m[below], [r["excess_loss_bound"] for r, b in zip(rows, below) if b], "k--",
                label="lower bound on the mean for M < D")
        ax.axvline(dim, color="C3", linestyle=":", label=f"M = D = {dim}")
        ax.set_yscale("log")
        ax.set_xlabel("M, distilled points")
        ax.set_ylabel("excess loss over the optimum")
        ax.set_title("One GD step on M distilled points, linear regression")
        ax.set_xticks(m)
        ax.legend(fontsize=8)


def run_linear(config, workdir: str | Path, *, name: str = "", resume: bool = False,
               progress: bool = True) -> dict:
    """The sweep M = 1..max_points into `workdir` (config.json, results.json, the plot);
    returns what results.json holds."""
    refuse_resume(config, resume)
    workdir = Path(workdir)
    validate_linear_config(config)
    machine = start_run(config, workdir, name)

    key = jax.random.PRNGKey(config.seed)
    problem = make_problem(jax.random.fold_in(key, DATA_STREAM), config.dim,
                           config.train_points, config.noise)
    regime = make_regime("random", key, linear_model(config.init_scale), problem.x[:1],
                         n_nets=config.n_nets, dist="model")
    train_inits = jax.jit(jax.vmap(regime.train_inits))(jnp.arange(config.iterations))
    eval_inits = regime.eval_inits(config.n_eval_nets)
    rows = []
    for m in tqdm(range(1, config.max_points + 1), disable=not progress, desc="linear", unit="M"):
        t0 = time.perf_counter()
        learned, targets, losses = distill_points(
            jax.random.fold_in(jax.random.fold_in(key, IMAGES_STREAM), m), problem, train_inits, m,
            config,
        )
        if not np.isfinite(float(losses[-1])):
            raise DivergedError(f"meta-loss became {float(losses[-1])} for M={m}; lower "
                                f"--outer_lr (now {config.outer_lr}) or --step_size_init "
                                f"(now {config.step_size_init}) and start again")
        rows.append(sweep_row(m, learned, targets, losses, problem, eval_inits, config,
                              time.perf_counter() - t0))
    plot_sweep(workdir / PLOT, rows, config.dim)

    headline = rows[config.dim - 1]  # M = D: the fewest points that can reach theta*
    untrained = np.asarray(excess_loss(eval_inits, problem))
    results = {
        "experiment": name,
        "dataset": f"synthetic linear regression (D={config.dim}, N={config.train_points})",
        "init_regime": "random",
        "metric": "excess_loss",  # test_acc / test_acc_std hold the excess loss, lower is better
        "images": headline["points"],
        "test_acc": headline["excess_loss"],
        "test_acc_std": headline["excess_loss_std"],
        "eval_nets": headline["eval_nets"],
        "untrained_excess_loss": float(untrained.mean()),
        "distill_seconds": sum(r["seconds"] for r in rows),
        "rows": rows,
        "plot": PLOT,
        "summary": (
            f"D={config.dim}; mean excess loss over the optimum on {config.n_eval_nets} unseen "
            f"inits (untrained {untrained.mean():.3g}): "
            + ", ".join(f"M={r['points']} {r['excess_loss']:.3g}"
                        for r in rows if r["points"] in (1, config.dim - 1, config.dim,
                                                         config.max_points))
        ),
        "machine": machine,
    }
    write_json(workdir / RESULTS, results)
    return results
