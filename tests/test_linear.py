"""Section 3.3's linear analysis: the squared-loss meta-gradient, the M >= D fact, the CLI run."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import assert_one_line_error, call_main, run_ok

from conftest import assert_matches_finite_difference, finite_difference_check
from dd_jax.inner import cross_entropy, gd_step
from dd_jax.linear import LinearProblem, apply_linear, excess_loss, excess_loss_bound, squared_error, train_one_step
from dd_jax.meta import Learned, meta_loss

D = 4
H_FD = 1e-6
RTOL = 1e-6


def _problem(rng: np.random.Generator, n: int = 50, noise: float = 0.3) -> LinearProblem:
    """Float64 regression data with an anisotropic Hessian (call inside jax.enable_x64)."""
    x = rng.normal(size=(n, D)) * np.array([2.0, 1.0, 0.7, 0.4])
    y = x @ rng.normal(size=D) + noise * rng.normal(size=n)
    return LinearProblem(jnp.asarray(x), jnp.asarray(y), jnp.asarray(np.linalg.lstsq(x, y)[0]))


def _points(rng, m: int, eta: float = 0.5) -> tuple[Learned, jax.Array]:
    """Random distilled points d (1, m, D), targets t (1, m), step size eta."""
    raw = np.log(np.expm1(eta))
    return (Learned(jnp.asarray(rng.normal(size=(1, m, D))), jnp.asarray([raw])),
            jnp.asarray(rng.normal(size=(1, m))))


def _designed_points(basis: np.ndarray, theta_star, eta: float) -> tuple[Learned, jax.Array]:
    """d = sqrt(M/eta) basis^T, t = sqrt(M/eta) basis^T theta*, for basis (D, M) with
    orthonormal columns or rows: eta/M d^T d = basis basis^T and eta/M d^T t = that times theta*."""
    scale = np.sqrt(basis.shape[1] / eta)
    return (Learned(jnp.asarray(scale * basis.T)[None], jnp.asarray([np.log(np.expm1(eta))])),
            jnp.asarray(scale * basis.T @ np.asarray(theta_star))[None])


def test_gd_step_takes_the_loss_keyword():
    """Cross-entropy stays the default; with squared_error one step is the paper's
    theta_1 = theta_0 - eta/M d^T (d theta_0 - t)."""
    rng = np.random.default_rng(0)
    with jax.enable_x64():
        d, t, theta0 = rng.normal(size=(5, D)), rng.normal(size=5), rng.normal(size=D)
        step = gd_step(apply_linear, jnp.asarray(theta0), d, t, 0.3, loss_fn=squared_error)
        np.testing.assert_allclose(step, theta0 - 0.3 / 5 * d.T @ (d @ theta0 - t), rtol=1e-12)

        w = jnp.asarray(rng.normal(size=(D, 3)))
        labels = jnp.asarray([0, 2, 1, 1, 0])
        default = gd_step(apply_linear, w, d, labels, 0.3)
        explicit = gd_step(apply_linear, w, d, labels, 0.3, cross_entropy)
        np.testing.assert_array_equal(default, explicit)
        assert float(jnp.abs(default - w).max()) > 1e-3


@pytest.mark.parametrize("m", [2, 6])
def test_linear_meta_gradient_matches_finite_differences(m):
    """d meta_loss / d(d, t, raw eta) with the squared loss, 3 vmapped inits, float64."""
    rng = np.random.default_rng(m)
    with jax.enable_x64():
        problem = _problem(rng)
        learned, targets = _points(rng, m)
        inits = jnp.asarray(rng.normal(size=(3, D)))
        f = functools.partial(meta_loss, init_params=inits, real_x=problem.x, real_y=problem.y,
                              apply_fn=apply_linear, epochs=1, loss_fn=squared_error)

        check = finite_difference_check(lambda p: f(*p), H_FD)

        trainable = (learned, targets)
        zeros = jax.tree.map(jnp.zeros_like, trainable)
        directions = [jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), trainable)
                      for _ in range(3)]
        for leaf in range(3):  # each of d, raw eta, t alone, and one coordinate of each
            leaves, treedef = jax.tree.flatten(zeros)
            unit = np.zeros(leaves[leaf].shape)
            unit.flat[rng.integers(unit.size)] = 1.0
            directions.append(jax.tree.unflatten(
                treedef, [jnp.asarray(unit) if i == leaf else a for i, a in enumerate(leaves)]))
            leaves[leaf] = jnp.asarray(rng.normal(size=leaves[leaf].shape))
            directions.append(jax.tree.unflatten(treedef, leaves))
        for v in directions:
            _, analytic, numeric = check(trainable, v)
            assert_matches_finite_difference(analytic, numeric, RTOL)


@pytest.mark.parametrize("m", [D, D + 3])
def test_m_at_least_d_points_reach_the_optimum_from_any_init(m):
    """With U (D, M), U U^T = I: eta/M d^T d = I, and one GD step lands on theta* from every
    theta_0."""
    rng = np.random.default_rng(10 + m)
    with jax.enable_x64():
        problem = _problem(rng)
        u = np.linalg.qr(rng.normal(size=(m, D)))[0].T  # (D, m), orthonormal rows
        learned, targets = _designed_points(u, problem.theta_star, eta=0.7)
        inits = jnp.asarray(rng.normal(size=(7, D)) * 5.0)
        theta1 = train_one_step(learned, targets, inits)
        np.testing.assert_allclose(theta1, np.broadcast_to(problem.theta_star, (7, D)), atol=1e-10)
        assert float(excess_loss(theta1, problem).max()) < 1e-18
        assert float(excess_loss(inits, problem).min()) > 1.0  # the inits were far from it


@pytest.mark.parametrize("m", [1, D - 1])
def test_fewer_than_d_points_leave_the_null_space_of_theta_0(m):
    """With M < D the GD step moves theta only within span(d): the component of theta_0 in the
    null space of d survives, so theta_1 misses theta* by at least that component's share."""
    rng = np.random.default_rng(20 + m)
    with jax.enable_x64():
        problem = _problem(rng)
        learned, targets = _points(rng, m)
        d = np.asarray(learned.images[0])
        null = np.eye(D) - np.linalg.pinv(d) @ d  # projector onto the null space of d
        assert np.linalg.matrix_rank(null) == D - m
        inits = jnp.asarray(rng.normal(size=(9, D)))
        theta1 = np.asarray(train_one_step(learned, targets, inits))
        np.testing.assert_allclose(theta1 @ null, np.asarray(inits) @ null, atol=1e-12)
        assert float(np.abs(theta1 - inits).max()) > 1e-2  # the step did move theta
        gap = np.linalg.norm((np.asarray(inits) - np.asarray(problem.theta_star)) @ null, axis=1)
        distance = np.linalg.norm(theta1 - np.asarray(problem.theta_star), axis=1)
        assert np.all(distance >= gap - 1e-12) and gap.min() > 1e-3


def _expected_excess(learned, targets, problem, scale):
    """E over theta_0 ~ N(0, scale^2 I) of the excess loss: theta_1 = B theta_0 + c (affine)."""
    b = jax.jacobian(lambda th: train_one_step(learned, targets, th[None])[0])(jnp.zeros(D))
    from_zero = train_one_step(learned, targets, jnp.zeros((1, D)))[0]
    spread = 0.5 * scale**2 * float(jnp.trace(b.T @ problem.hessian @ b))
    return spread + float(excess_loss(from_zero, problem))


@pytest.mark.parametrize("m", [1, 2, D - 1])
def test_excess_loss_bound_holds_and_is_tight(m):
    rng = np.random.default_rng(30 + m)
    scale = 1.5
    with jax.enable_x64():
        problem = _problem(rng)
        bound = excess_loss_bound(problem, m, scale)
        assert bound > 0
        for _ in range(5):
            points = _points(rng, m, eta=rng.uniform(0.1, 2.0))
            assert _expected_excess(*points, problem, scale) >= bound
        # d along the top-m eigenvectors of H, eta/M d^T d their projector: the theta_0 term of
        # the expectation equals the bound
        top = np.linalg.eigh(np.asarray(problem.hessian))[1][:, ::-1][:, :m]
        learned, targets = _designed_points(top, problem.theta_star, eta=0.5)
        offset = float(excess_loss(train_one_step(learned, targets, jnp.zeros((1, D)))[0], problem))
        spread = _expected_excess(learned, targets, problem, scale) - offset
        assert spread == pytest.approx(bound, rel=1e-10)
        assert excess_loss_bound(problem, D, scale) == 0.0


def test_excess_loss_is_the_loss_above_the_least_squares_optimum():
    rng = np.random.default_rng(40)
    with jax.enable_x64():
        problem = _problem(rng)
        loss = lambda th: squared_error(apply_linear(th, problem.x), problem.y)
        np.testing.assert_allclose(jax.grad(loss)(problem.theta_star), 0.0, atol=1e-12)
        thetas = jnp.asarray(rng.normal(size=(4, D)))
        np.testing.assert_allclose(excess_loss(thetas, problem),
                                   jax.vmap(loss)(thetas) - loss(problem.theta_star), rtol=1e-9)


# --------------------------------------------------------------------------- the experiment

TINY = ["linear_analysis", "--dim=3", "--max_points=5", "--train_points=200", "--iterations=400",
        "--decay_passes=200", "--n_eval_nets=20", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("linear") / "run"
    return out, run_ok([*TINY, f"--output_dir={out}"])


@pytest.mark.slow
def test_cli_run_writes_table_and_plot(tiny_run):
    out, stdout = tiny_run
    assert {p.name for p in out.iterdir()} == {"config.json", "results.json", "linear_analysis.png"}
    assert stdout.startswith("linear_analysis: D=3;") and str(out) in stdout
    assert json.loads((out / "config.json").read_text())["kind"] == "linear"
    results = json.loads((out / "results.json").read_text())
    for key in ("experiment", "dataset", "init_regime", "images", "test_acc", "test_acc_std",
                "eval_nets", "distill_seconds"):
        assert key in results, key
    assert results["metric"] == "excess_loss" and results["images"] == 3
    rows = results["rows"]
    assert [r["method"] for r in rows] == [f"M={m}" for m in range(1, 6)]
    for r in rows:
        assert r["test_acc"] == r["excess_loss"] and r["eval_nets"] == 20 and r["seconds"] > 0
        assert r["rank"] == min(r["points"], 3) and r["step_size"] > 0
        assert r["excess_loss_p10"] <= r["excess_loss_p90"]
    assert results["test_acc"] == rows[2]["excess_loss"]

    import matplotlib.image

    img = matplotlib.image.imread(out / "linear_analysis.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300


@pytest.mark.slow
def test_cli_run_m_at_least_d_reaches_a_much_lower_excess_loss(tiny_run):
    rows = json.loads((tiny_run[0] / "results.json").read_text())["rows"]
    below = [r for r in rows if r["points"] < 3]
    at_least = [r for r in rows if r["points"] >= 3]
    assert max(r["excess_loss"] for r in at_least) < 1e-2 * min(r["excess_loss"] for r in below)
    for r in below:  # M < D cannot beat the bound (held-out mean, with some sampling slack)
        assert r["excess_loss"] > 0.5 * r["excess_loss_bound"] > 0
    assert max(r["distance"] for r in at_least) < 0.1 * min(r["distance"] for r in below)


@pytest.mark.parametrize("flags, fragments", [
    (["--max_points=2"], ["max_points (2) must be >= dim (3)"]),
    (["--noise=-1"], ["noise must be >= 0"]),
    (["--resume"], ["nothing can be resumed"]),
])
def test_cli_bad_input_is_one_line(tmp_path, flags, fragments):
    rc, _, err = call_main([*TINY, *flags, f"--output_dir={tmp_path / 'x'}"])
    assert_one_line_error(rc, err, *fragments)


@pytest.mark.slow
def test_cli_refuses_to_overwrite(tiny_run):
    rc, _, err = call_main([*TINY, f"--output_dir={tiny_run[0]}"])
    assert_one_line_error(rc, err, "already holds a run")
