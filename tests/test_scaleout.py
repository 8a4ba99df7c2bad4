"""Scale-out: 4 simulated devices give the 1-device results; the `devices` flag's errors; the
sqrt-checkpointed inner loop (equal gradients, memory that does not grow with T)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import assert_one_line_error, call_main

from conftest import ROOT, make_tiny_convnet, make_tiny_mlp
from dd_jax.checkpoint import checkpoint_meta
from dd_jax.errors import ConfigError
from dd_jax.inner import checkpointed_scan, inner_train
from dd_jax.meta import Learned, meta_loss
from dd_jax.models import as_model
from dd_jax.sharding import make_mesh, select_devices

# --------------------------------------------------------------------------- several devices


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory) -> dict:
    """tests/multidevice_check.py's report (4 simulated CPU devices need their own process)."""
    out = tmp_path_factory.mktemp("multidevice")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multidevice_check.py"), str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("layout, mesh", [("nets", {"nets": 4, "batch": 1}),
                                          ("nets_and_batch", {"nets": 2, "batch": 2}),
                                          ("native_nets_and_batch", {"nets": 2, "batch": 2}),
                                          ("fused_nets_and_batch", {"nets": 2, "batch": 2})])
def test_sharded_meta_gradient_equals_one_device(four_devices, layout, mesh):
    assert four_devices["device_count"] == 4
    one, four = (four_devices["gradients"][layout][k] for k in ("one", "four"))
    assert one["mesh"] is None and four["mesh"] == mesh
    np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-6)
    for name in ("grad_images", "grad_raw_step_sizes"):
        expected = np.asarray(one[name])
        assert np.max(np.abs(expected)) > 1e-4  # a real gradient
        np.testing.assert_allclose(four[name], expected, rtol=1e-4,
                                   atol=1e-6 * np.max(np.abs(expected)))


@pytest.mark.slow
def test_sharded_run_resume_and_evaluation_equal_one_device(four_devices):
    one, all_ = four_devices["runs"]["one"], four_devices["runs"]["all"]
    assert len(one["losses"]) == len(all_["losses"]) == 3  # 2 iterations, then 1 after --resume
    np.testing.assert_allclose(all_["losses"], one["losses"], rtol=1e-5)
    # Adam's first steps move every pixel by about lr = 0.01, whatever the gradient's size
    np.testing.assert_allclose(all_["images"], one["images"], atol=1e-4)
    assert np.max(np.abs(np.asarray(all_["images"]))) > 1
    np.testing.assert_allclose(all_["step_sizes"], one["step_sizes"], rtol=1e-5)
    # test-set accuracies are counts: the same on 4 devices (8 test images each, 2 padding)
    assert all_["test_accs"] == one["test_accs"] and len(one["test_accs"]) == 3
    assert all_["untrained_accs"] == one["untrained_accs"]


def test_devices_flag_errors(tmp_path):
    n = jax.device_count()
    for value in (n + 1, -1):
        rc, _, err = call_main(["mnist_fixed_init", "--dataset=digits", "--val_size=0", f"--devices={value}",
                                f"--output_dir={tmp_path}"])
        assert_one_line_error(rc, err, f"devices={value}", f"{n} cpu device(s) are available",
                              "--devices=0")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    assert select_devices(0) == jax.devices() and select_devices(1) == jax.devices()[:1]


def test_mesh_needs_a_divisible_real_batch():
    three = [jax.devices()[0]] * 3  # only the count matters before the mesh is built
    with pytest.raises(ConfigError, match="real batch of 1000, which is not divisible by 3"):
        make_mesh(three, n_nets=4, batch_size=1000)
    with pytest.raises(ConfigError, match="not divisible by 2"):
        make_mesh(three[:2], n_nets=1, batch_size=7)


def test_distributed_without_a_cluster_is_a_one_line_error(tmp_path, monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                 "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    rc, _, err = call_main(["mnist_fixed_init", "--distributed", f"--output_dir={tmp_path}"])
    assert_one_line_error(rc, err, "--distributed", "JAX_COORDINATOR_ADDRESS")


@pytest.mark.parametrize("name", ["digits_pool", "linear_analysis", "mnist_baselines"])
def test_only_a_distillation_runs_over_hosts(tmp_path, monkeypatch, name):
    """The other kinds write their files from one process: in a multi-process run they are a
    one-line error before anything is written."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    rc, _, err = call_main([name, f"--output_dir={tmp_path / name}"])
    assert_one_line_error(rc, err, "runs on one process", "without --distributed")
    assert not (tmp_path / name).exists()


# --------------------------------------------------------------------------- several hosts

MULTIHOST_RUN = ["mnist_fixed_init", "--dataset=digits", "--train_subset=256", "--test_subset=100",
                 "--iterations=3", "--real_batch_size=32", "--val_size=0", "--eval_every=2",
                 "--checkpoint_every=2", "--log_every=1", "--quiet"]
MULTIHOST_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_run(tmp: Path, out_dirs: list[Path]) -> list[dict]:
    """MULTIHOST_RUN as a two-process run on this machine (--distributed --devices=0: one CPU
    device per process, the coordinator on 127.0.0.1), process i writing into out_dirs[i]:
    each process's tests/multihost_check.py report (exit status, process index, files written)
    and its output ('log')."""
    port = _free_port()
    procs, logs = [], [tmp / f"process{i}.log" for i in range(2)]
    for i, out in enumerate(out_dirs):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(i), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}"}
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "multihost_check.py"),
                 str(tmp / f"writes{i}.json"), *MULTIHOST_RUN, "--distributed", "--devices=0",
                 f"--output_dir={out}"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + MULTIHOST_TIMEOUT_S
    try:  # one process failing leaves the other waiting for it: stop both then
        while any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs):
            if time.monotonic() > deadline:
                pytest.fail(f"the two-process run took over {MULTIHOST_TIMEOUT_S} s")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    reports = []
    for i, p in enumerate(procs):
        path = tmp / f"writes{i}.json"
        report = json.loads(path.read_text()) if path.exists() else {"rc": None, "writes": []}
        reports.append({**report, "exit": p.returncode, "log": logs[i].read_text()[-4000:]})
    return reports


def assert_ran(reports: list[dict]) -> None:
    """Both processes of a two_process_run finished the run."""
    for r in reports:
        assert r["exit"] == 0 and r["rc"] == 0, r["log"]
    assert [r["process_index"] for r in reports] == [0, 1]


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory) -> dict:
    """MULTIHOST_RUN as two processes sharing one output directory (orbax writes one checkpoint
    from all processes into a path they share), and as one process (in this one, on one
    device): the processes' reports, the shared directory and the one-process directory."""
    tmp = tmp_path_factory.mktemp("multihost")
    reports = two_process_run(tmp, [tmp / "run", tmp / "run"])
    assert_ran(reports)
    rc, _, err = call_main([*MULTIHOST_RUN, f"--output_dir={tmp / 'one'}"])
    assert rc == 0, err
    return {"reports": reports, "run": tmp / "run", "one": tmp / "one"}


def _outputs(directory: Path) -> tuple[dict, list[dict], dict]:
    """distilled.npz's arrays, metrics.jsonl's rows without their wall times, results.json."""
    with np.load(directory / "distilled.npz") as f:
        arrays = {k: f[k] for k in f.files}
    rows = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return arrays, rows, json.loads((directory / "results.json").read_text())


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(two_hosts):
    """Two processes on localhost (the real batch split over their two CPU devices) run the
    distillation one process runs: the same meta-losses, data and test accuracy."""
    a0, rows0, res0 = _outputs(two_hosts["run"])
    assert len(res0["machine"]["devices"]) == 2  # both processes' devices
    one, rows, res = _outputs(two_hosts["one"])
    assert len(res["machine"]["devices"]) == 1
    assert [r["iteration"] for r in rows0] == [r["iteration"] for r in rows] == [1, 2, 3]
    np.testing.assert_allclose([r["meta_loss"] for r in rows0], [r["meta_loss"] for r in rows],
                               rtol=1e-5)
    # Adam's first steps move every pixel by about lr = 0.01, whatever the gradient's size
    np.testing.assert_allclose(a0["images"], one["images"], atol=1e-4)
    assert np.max(np.abs(one["images"])) > 1
    np.testing.assert_allclose(a0["step_sizes"], one["step_sizes"], rtol=1e-5)
    assert set(a0) == set(one)
    for k in set(one) - {"images", "step_sizes"}:  # theta_0, labels, the format's fields
        np.testing.assert_array_equal(a0[k], one[k], err_msg=k)
    assert res0["test_accs"] == res["test_accs"] and res0["untrained_acc"] == res["untrained_acc"]
    assert checkpoint_meta(two_hosts["run"] / "checkpoint")["iteration"] == 3


@pytest.mark.slow
def test_two_processes_sharing_an_output_directory_write_each_file_once(two_hosts):
    """Process 0 writes the run's files other than the checkpoint, process 1 none of them."""
    process0, process1 = (set(r["writes"]) for r in two_hosts["reports"])
    assert {"config.json", "metrics.jsonl", "distilled.npz", "distilled.png",
            "results.json"} <= process0
    assert {name for name in process1 if not name.startswith("checkpoint")} == set()


# --------------------------------------------------------------------------- remat


@pytest.mark.parametrize("length", [0, 1, 7, 16])
def test_checkpointed_scan_equals_scan(length):
    """Blocks of ceil(sqrt(T)) steps plus a tail: the same carry and gradient as one scan."""
    xs = jnp.linspace(-1.0, 1.0, length)
    step = lambda c, x: (jnp.sin(c * x) + c * 0.9, None)
    blocked = lambda c: checkpointed_scan(step, c, xs)
    plain = lambda c: jax.lax.scan(step, c, xs)[0]
    for f in (lambda g: g, jax.grad):
        np.testing.assert_allclose(float(jax.jit(f(blocked))(0.3)), float(jax.jit(f(plain))(0.3)),
                                   rtol=1e-5)


def _meta_gradient_temp_bytes(model, steps: int, epochs: int, remat: bool) -> int:
    """XLA's temporary buffer bytes for the meta-gradient of `model` trained by T = steps x
    epochs GD steps on 64 8x8 images per step."""
    x = jnp.zeros((steps, 64, 8, 8, 1))
    labels = jnp.zeros((steps, 64), jnp.int32)
    init = jax.tree.map(lambda a: a[None], model.init(jax.random.PRNGKey(0), x[0]))

    def loss(images, raw):
        return meta_loss(Learned(images, raw), labels, init, x[0], labels[0],
                         apply_fn=model.apply, epochs=epochs, remat=remat)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return grad.lower(x, jnp.zeros((steps * epochs,))).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_remat_memory_does_not_grow_with_the_unroll():
    """T = 10 -> 250 for a conv net, whose activations outweigh its parameters (as LeNet's do):
    with remat XLA's temporary memory stays within 1.5x; without, it grows with T."""
    model = as_model(make_tiny_convnet())
    temp = {(t, r): _meta_gradient_temp_bytes(model, 10, t // 10, r)
            for t in (10, 250) for r in (False, True)}
    assert temp[250, True] <= 1.5 * temp[10, True], temp
    assert temp[250, False] >= 10 * temp[10, False], temp


def test_remat_meta_gradient_with_a_tail_equals_plain():
    """T = 7 (blocks of 3 and a 1-step tail): remat's meta-gradient is the plain one."""
    model = as_model(make_tiny_mlp(hidden=6, num_classes=4))
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(7, 8, 4, 4, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, size=(7, 8)), jnp.int32)
    theta0 = model.init(jax.random.PRNGKey(0), images[0])
    etas = jnp.asarray(rng.uniform(0.05, 0.5, size=7), jnp.float32)

    @jax.jit
    def grads(images, etas):
        out = []
        for remat in (False, True):
            f = lambda im, e: jnp.sum(jax.tree.leaves(inner_train(
                model.apply, theta0, im, labels, e, 1, remat=remat))[0] ** 2)
            out.append(jax.grad(f, argnums=(0, 1))(images, etas))
        return out

    plain, remat = grads(images, etas)
    for a, b in zip(jax.tree.leaves(remat), jax.tree.leaves(plain)):
        assert float(jnp.max(jnp.abs(b))) > 1e-4
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- benchmarks' cores


def _tiny(**fields):
    """A short config for the tiny conv net on digits."""
    from dd_jax.config import default_config

    c = default_config()
    c.update(dict(dataset="digits", real_batch_size=32, n_eval_nets_during=2, **fields))
    return c


def test_time_steps_counts_and_budget():
    from benchmarks.common import time_steps

    calls = []
    step = lambda carry, it: (calls.append(it) or carry + 1, jnp.zeros(()))
    timing = time_steps(step, 0, iterations=5, warmup=2)
    assert calls == list(range(7)) and timing["carry"] == 7 and timing["iterations"] == 5
    assert 0 <= timing["q1_s"] <= timing["median_s"] <= timing["q3_s"]
    assert time_steps(step, 0, iterations=100, warmup=0, budget_s=0.0)["iterations"] == 1


BENCHMARKS = ("kernels", "memory", "n_nets", "op_profile", "outer_step", "sensitivity",
              "time_to_accuracy")


@pytest.mark.parametrize("name", BENCHMARKS)
@pytest.mark.parametrize("argv, status, says", [
    (["--help"], 0, "python -m benchmarks."),
    (["no_such_experiment"], 2, "error: "),
    (["--quiet"], 2, "--quiet is an experiments.run switch"),
])
def test_benchmark_command_lines(name, argv, status, says, capsys, monkeypatch):
    """--help prints the usage and runs nothing; bad input is one line and exit status 2."""
    import importlib

    from benchmarks.common import run_main

    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(module, "load_data_and_model", None, raising=False)  # never reached
    assert run_main(module.main, module.__doc__, argv) == status
    out, err = capsys.readouterr()
    assert says in (out if status == 0 else err) and "Traceback" not in out + err


@pytest.mark.parametrize("flag, text, kind, expected", [
    ("T", "30,100,300", int, [30, 100, 300]), ("scales", "1e-5,0.1", float, [1e-5, 0.1]),
    ("T", "30,x", int, None), ("scales", "", float, None),
])
def test_number_list(flag, text, kind, expected):
    from benchmarks.common import number_list

    if expected is None:
        with pytest.raises(ConfigError, match=f"--{flag}="):
            number_list(flag, text, kind)
    else:
        assert number_list(flag, text, kind) == expected


@pytest.mark.slow
def test_memory_measure_smoke(digits28):
    from benchmarks.memory import measure

    row = measure(digits28, make_tiny_convnet(), _tiny())
    assert row["T"] == 3 and row["remat"] is False and row["executed"] is True
    assert row["xla_temp_mb"] > 0 and row["xla_argument_mb"] > 0 and np.isfinite(row["meta_loss"])
    if row["rss_peak_delta_mb"] is not None:  # Linux
        assert row["rss_peak_delta_mb"] >= 0 and row["ru_maxrss_mb"] >= row["rss_before_mb"]
    skipped = measure(digits28, make_tiny_convnet(), _tiny(), max_run_bytes=0)
    assert skipped["executed"] is False and skipped["rss_peak_delta_mb"] is None
    assert skipped["xla_temp_mb"] == row["xla_temp_mb"]


@pytest.mark.slow
@pytest.mark.parametrize("peak_after_mb, raised", [(80, True), (50, False)])
def test_memory_measure_reads_the_device_allocator(digits28, monkeypatch, peak_after_mb, raised):
    """Where the device keeps allocator statistics (GPU), the row has the step's peak above the
    bytes in use before it, and whether the step raised the peak (it cannot be reset)."""
    import benchmarks.memory as memory

    stats = iter([{"bytes_in_use": 10 * memory.MB, "peak_bytes_in_use": 50 * memory.MB},
                  {"bytes_in_use": 12 * memory.MB, "peak_bytes_in_use": peak_after_mb * memory.MB}])
    monkeypatch.setattr(memory, "_device_memory", lambda: next(stats))
    row = memory.measure(digits28, make_tiny_convnet(), _tiny())
    assert row["device_in_use_before_mb"] == 10 and row["device_peak_before_mb"] == 50
    assert row["device_peak_delta_mb"] == peak_after_mb - 10 and row["device_peak_raised"] is raised


@pytest.mark.slow
def test_memory_child_measures_a_named_experiment(capsys):
    """--experiment=NAME measures that experiment's own meta-step (its T, not the sweep's),
    with --remat and --field=value applied."""
    import benchmarks.memory as memory

    memory.main(["--child=1", "--experiment=mnist_fixed_init", "--dataset=digits", "--val_size=0", "--remat=True",
                 "--max_run_gb=0"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["T"] == 3 and row["remat"] is True and row["executed"] is False


def test_n_nets_python_loop_equals_vmap(digits28):
    from benchmarks.n_nets import check_same_updates

    out = check_same_updates(digits28, make_tiny_convnet(), _tiny(init_regime="random", n_nets=2))
    np.testing.assert_allclose(out["loop_losses"], out["vmap_losses"], rtol=1e-5)
    assert len(out["vmap_losses"]) == 2
    assert out["max_image_diff"] < 1e-4 and out["max_step_size_diff"] < 1e-6


def test_time_to_accuracy_smoke(digits28, tmp_path):
    from benchmarks.time_to_accuracy import plot, time_to_accuracy, time_to_target

    seen = []
    rows = time_to_accuracy(digits28, make_tiny_convnet(), _tiny(iterations=5), seconds=1e9,
                            every=2, report=seen.append)
    assert seen == rows and [r["iteration"] for r in rows] == [0, 2, 4, 5]
    assert rows[0]["seconds"] == 0 and rows[0]["meta_loss"] is None
    assert all(a["seconds"] < b["seconds"] for a, b in zip(rows, rows[1:]))
    assert all(0 <= r["test_acc"] <= 1 and r["eval_nets"] == 1 for r in rows)
    # a budget already spent stops after the first iteration
    rows0 = time_to_accuracy(digits28, make_tiny_convnet(), _tiny(iterations=5), 0.0, 2)
    assert [r["iteration"] for r in rows0] == [0, 1]
    hit = next(r for r in rows if r["test_acc"] >= rows[-1]["test_acc"])
    assert time_to_target(rows, rows[-1]["test_acc"]).startswith(
        f"{100 * rows[-1]['test_acc']:.2f}% first reached after {hit['seconds']:.0f} s "
        f"(iteration {hit['iteration']}")
    assert time_to_target(rows, 1.01).startswith("101.00% not reached in ")
    plot(rows, tmp_path / "curve.png", "smoke")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_time_to_accuracy_reports_the_holdout_choice(digits28, tmp_path):
    from benchmarks.time_to_accuracy import plot, reported_acc, time_to_accuracy, time_to_target

    rows = time_to_accuracy(digits28, make_tiny_convnet(), _tiny(iterations=8, val_size=200),
                            seconds=1e9, every=2)
    assert [r["iteration"] for r in rows] == [0, 2, 4, 6, 8]
    assert rows[0]["seconds"] > 0  # the holdout evaluation runs on the clock
    for i, r in enumerate(rows):
        so_far = [x["val_acc"] for x in rows[: i + 1]]
        chosen = rows[int(np.argmax(so_far))]  # the first best on the holdout so far
        assert r["selected_test_acc"] == chosen["test_acc"] == reported_acc(r)
    best = max(rows, key=lambda r: r["selected_test_acc"])
    assert f"best {100 * best['selected_test_acc']:.2f}%" in time_to_target(rows, 1.01)
    plot(rows, tmp_path / "curve.png", "holdout")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_sensitivity_perturbs_only_the_images(digits28, monkeypatch):
    """Every network the benchmark trains starts from theta_0 with the data's own labels and
    step sizes; the images are the data's own for scale 0, and moved by noise of that std for
    the others (a fresh draw each time)."""
    import benchmarks.sensitivity as sensitivity
    import dd_jax
    from dd_jax.evaluation import evaluation_setup

    model = as_model(make_tiny_convnet())
    rng = np.random.default_rng(0)
    init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    d = dd_jax.DistilledData(
        images=rng.normal(size=(1, 10, 28, 28, 1)).astype(np.float32),
        labels=np.arange(10, dtype=np.int32)[None], step_sizes=np.array([0.3, 0.2], np.float32),
        epochs=2, mean=digits28.mean, std=digits28.std, init_regime="fixed",
        init_dist="xavier_normal", init_gain=1.0, seed=0, init_params=init)
    calls = []

    def spied_setup(*args, **kwargs):
        evaluator, inits, trained_on = evaluation_setup(*args, **kwargs)

        def spy(inits_, images, labels, steps):
            calls.append(jax.tree.map(np.asarray, (inits_, images, labels, steps)))
            return evaluator(inits_, images, labels, steps)

        return spy, inits, trained_on

    monkeypatch.setattr(sensitivity, "evaluation_setup", spied_setup)
    accs = sensitivity.perturbed_accuracies(d, digits28, model, [0.5], draws=3)
    assert list(accs) == [0.0, 0.5] and len(accs[0.0]) == 1 and len(accs[0.5]) == 3
    assert all(0 <= a <= 1 for a in accs[0.0] + accs[0.5])
    assert len(calls) == 4
    for inits_, _, labels, steps in calls:
        for a, b in zip(jax.tree.leaves(inits_), jax.tree.leaves(init)):
            np.testing.assert_array_equal(a[0], b)
        np.testing.assert_array_equal(labels, d.labels)
        np.testing.assert_array_equal(steps, d.step_sizes)  # the step sizes did not move
    np.testing.assert_array_equal(calls[0][1], d.images)  # scale 0: the data as it is
    moves = [c[1] - d.images for c in calls[1:]]
    for move in moves:  # the images moved, by noise of std 0.5
        assert abs(float(np.std(move)) - 0.5) < 0.02 and abs(float(np.mean(move))) < 0.02
    assert not np.array_equal(moves[0], moves[1]) and not np.array_equal(moves[1], moves[2])


@pytest.mark.slow
def test_step_flops_is_the_line_through_short_unrolls():
    """The FLOP count of a T-step unroll from one- and two-step unrolls equals XLA's count of
    the same unroll compiled in full (T = 6 <= inner.UNROLL_UP_TO: unrolled in full)."""
    from benchmarks.common import experiment_config
    from benchmarks.outer_step import compiled_flops, step_flops

    config = experiment_config("mnist_fixed_init", {"steps": "2", "epochs": "3",
                                                    "real_batch_size": "16", "train_subset": "64",
                                                    "val_size": "16"})
    assert step_flops(config) == pytest.approx(compiled_flops(config), rel=0.01)


def test_op_profile_counts_each_op_once(tmp_path):
    """A loop traced around its body's ops counts as its body; markers and Python frames are
    not ops; ops on another thread at the same time are counted."""
    import gzip

    from benchmarks.op_profile import op_events

    def op(name, ts, dur, tid=1):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid}

    events = [op("while.3", 0, 100), op("ffi_call.1", 5, 40), op("copy.2", 50, 30),
              op("end: copy.2", 80, 0), op("$api.py:1 f", 0, 200), op("dot.4", 10, 60, tid=2),
              op("add.5", 120, 10)]
    (tmp_path / "plugins").mkdir()
    with gzip.open(tmp_path / "plugins" / "x.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert sorted(op_events(tmp_path)) == [("add.5", 10.0), ("copy.2", 30.0),
                                           ("dot.4", 60.0), ("ffi_call.1", 40.0)]
