"""`python -m experiments.run`: outputs, kill-and-resume, and bad input handled as one-line errors."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

import dd_jax
from conftest import MNIST_GZ, ROOT, Killed, corrupt_mnist_file, interrupt_meta_step, make_tiny_convnet
from dd_jax import data
from dd_jax.checkpoint import checkpoint_meta, has_checkpoint
from dd_jax.config import SECTIONS, default_config
from dd_jax.models import get_model
from dd_jax.outputs import save_curves
from experiments import run as cli
from experiments.configs import EXPERIMENTS

N = 6  # iterations of the reference run
TINY = ["mnist_fixed_init", "--dataset=digits", f"--iterations={N}", "--eval_every=3",
        "--checkpoint_every=2", "--log_every=1", "--real_batch_size=64", "--n_eval_nets=2", "--val_size=0",
        "--quiet"]
OUTPUTS = {"config.json", "metrics.jsonl", "checkpoint", "distilled.npz", "distilled.png",
           "curves.png", "results.json"}


def call_main(args) -> tuple[int, str, str]:
    """main(args) -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def run_ok(args) -> str:
    """main(args) must succeed (exit 0; else the test fails showing stderr) -> its stdout."""
    rc, stdout, stderr = call_main(args)
    assert rc == 0, stderr
    return stdout


def assert_one_line_error(rc: int, err: str, *fragments: str) -> str:
    assert rc == 2  # README: "ends with one `error: ...` line ... and exit status 2"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """{path relative to `directory`: bytes} of every file in it, subdirectories included."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def part(files: dict[str, bytes], name: str) -> dict[str, bytes]:
    """The files of a `snapshot` that are `name` or lie under it."""
    return {k: v for k, v in files.items() if k == name or k.startswith(name + "/")}


def metrics(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


def distilled_arrays(directory: Path) -> dict[str, np.ndarray]:
    with np.load(directory / "distilled.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Run A: the tiny experiment, uninterrupted."""
    out = tmp_path_factory.mktemp("cli") / "A"
    return out, run_ok([*TINY, f"--output_dir={out}"])


@pytest.fixture
def reference_copy(reference, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(reference[0], dst)
    return dst


# --------------------------------------------------------------------------- a whole run


def test_run_writes_all_outputs(reference):
    out, stdout = reference
    assert {p.name for p in out.iterdir()} == OUTPUTS  # and no stray temporary files
    assert "mnist_fixed_init: test accuracy" in stdout and str(out) in stdout

    config = json.loads((out / "config.json").read_text())
    assert config["experiment"] == "mnist_fixed_init"
    assert config["dataset"] == "digits" and config["iterations"] == N
    assert config["real_batch_size"] == 64 and config["output_dir"] == str(out)
    assert set(EXPERIMENTS["mnist_fixed_init"]().keys()) <= set(config)

    rows = metrics(out)
    assert [r["iteration"] for r in rows] == list(range(1, N + 1))
    for r in rows:
        assert np.isfinite(r["meta_loss"]) and r["seconds"] > 0
        assert len(r["step_sizes"]) == 3 and all(s > 0 for s in r["step_sizes"])
    assert [r["iteration"] for r in rows if "test_acc" in r] == [3, 6]
    seconds = [r["seconds"] for r in rows]
    assert seconds == sorted(seconds)

    assert checkpoint_meta(out / "checkpoint")["iteration"] == N
    assert [p.name for p in (out / "checkpoint").iterdir()] == [str(N)]  # the newest step only

    png = (out / "distilled.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(out / "distilled.png")
    assert img.ndim == 3 and img.shape[0] > 20 and img.shape[1] > 100
    curves = matplotlib.image.imread(out / "curves.png")
    assert curves.shape[:2] == (380, 1400)


@pytest.mark.parametrize("kept", ["all", "log_rows_only", "one_eval_row", "with_validation"])
def test_curves_from_any_metrics(reference, tmp_path, kept):
    """curves.png is drawn from whichever rows a run logged: with or without evaluations,
    step sizes or a validation holdout."""
    rows = metrics(reference[0])
    if kept == "log_rows_only":
        rows = [{k: v for k, v in r.items() if not k.startswith("test")} for r in rows]
    elif kept == "one_eval_row":
        rows = [{"iteration": 3, "meta_loss": 1.5, "test_acc": 0.5}]
    elif kept == "with_validation":
        rows = [{**r, "val_acc": r["test_acc"] / 2} if "test_acc" in r else r for r in rows]
    save_curves(tmp_path / "curves.png", rows)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_reproducible_from_distilled_npz(reference):
    out, _ = reference
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "mnist_fixed_init" and results["dataset"] == "digits"
    assert results["images"] == 10 and results["steps"] == 1 and results["epochs"] == 3
    assert results["test_examples"] == 300
    assert results["eval_nets"] == 1  # fixed regime: the one theta_0
    assert 0 <= results["test_acc"] <= 1 and 0 <= results["untrained_acc"] <= 1
    assert results["distill_seconds"] > 0
    assert results["machine"]["dd_jax"] == dd_jax.__version__ and "git_commit" in results["machine"]

    d = dd_jax.load_distilled(out / "distilled.npz")
    assert d.images.shape == (1, 10, 28, 28, 1) and d.labels.shape == (1, 10)
    assert d.init_regime == "fixed" and d.init_params is not None and d.seed == 0
    np.testing.assert_allclose(d.step_sizes, results["step_sizes"], rtol=1e-6)
    rows = metrics(out)
    np.testing.assert_allclose(d.step_sizes, rows[-1]["step_sizes"], atol=1e-6)
    assert results["test_acc"] == rows[-1]["test_acc"]

    config = json.loads((out / "config.json").read_text())
    again = dd_jax.evaluate(d, dd_jax.load_dataset("digits"),
                            get_model(config["model"], 10, config["conv"]),
                            n_nets=config["n_eval_nets"])
    assert again["mean"] == results["test_acc"]
    assert again["accuracies"] == results["test_accs"]
    assert again["untrained"]["mean"] == results["untrained_acc"]


@pytest.mark.parametrize("fixed", [True, False])
def test_distilled_file_round_trip(tmp_path, fixed):
    rng = np.random.default_rng(0)
    init = {"conv1": {"kernel": rng.normal(size=(5, 5, 1, 6)).astype(np.float32),
                      "bias": np.zeros(6, np.float32)},
            "fc3": {"kernel": rng.normal(size=(84, 10)).astype(np.float32),
                    "bias": np.zeros(10, np.float32)}}
    d = dd_jax.DistilledData(
        images=rng.normal(size=(2, 10, 28, 28, 1)).astype(np.float32),
        labels=np.tile(np.arange(10, dtype=np.int32), (2, 1)),
        step_sizes=np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], np.float32), epochs=3,
        mean=(0.1307,), std=(0.3081,), init_regime="fixed" if fixed else "random",
        init_dist="kaiming_uniform", init_gain=1.5, seed=17, init_params=init if fixed else None)
    path = tmp_path / "d.npz"
    dd_jax.save_distilled(path, d, model="lenet")
    back = dd_jax.load_distilled(path)
    np.testing.assert_array_equal(back.images, d.images)
    np.testing.assert_array_equal(back.labels, d.labels)
    np.testing.assert_array_equal(back.step_sizes, d.step_sizes)
    assert (back.epochs, back.steps, back.seed) == (3, 2, 17)
    assert (back.init_regime, back.init_dist, back.init_gain) == (d.init_regime, "kaiming_uniform", 1.5)
    np.testing.assert_allclose(back.mean, d.mean)
    np.testing.assert_allclose(back.std, d.std)
    if fixed:
        assert set(back.init_params) == {"conv1", "fc3"}
        for layer in init:
            for name in init[layer]:
                np.testing.assert_array_equal(back.init_params[layer][name], init[layer][name])
    else:
        assert back.init_params is None
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]  # no temporary file left


def test_load_distilled_rejects_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", images=np.zeros(3))
    with pytest.raises(dd_jax.DataError, match="not a dd_jax distilled-data file"):
        dd_jax.load_distilled(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(dd_jax.DataError, match="cannot read"):
        dd_jax.load_distilled(tmp_path / "junk.npz")
    with pytest.raises(dd_jax.DataError):
        dd_jax.load_distilled(tmp_path / "absent.npz")


def test_list(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert name in out
    assert len([l for l in out.splitlines() if l.strip()]) == len(EXPERIMENTS)


def test_long_schedule_is_b256_with_twice_the_passes():
    long, b256 = EXPERIMENTS["mnist_fixed_init_long"](), EXPERIMENTS["mnist_fixed_init_b256"]()
    assert {k for k in long if long[k] != b256[k]} == {"passes", "decay_passes"}
    assert (long.passes, long.decay_passes) == (2 * b256.passes, 2 * b256.decay_passes)


def test_help(capsys):
    assert cli.main(["--help"]) == 0
    assert "python -m experiments.run" in capsys.readouterr().out


# --------------------------------------------------------------------------- flags and --help


def test_every_field_is_documented_once():
    for make in EXPERIMENTS.values():
        config = make()
        documented = [f.name for fields in cli.sections_of(config).values() for f in fields]
        assert len(documented) == len(set(documented))
        assert set(config) <= set(documented), set(config) - set(documented)
    assert set(dd_jax.default_config()) == {f.name for fields in SECTIONS.values() for f in fields}


@pytest.mark.parametrize("name", [None, "mnist_random_init", "linear_analysis"])
def test_help_lists_every_flag_with_default_and_meaning(capsys, name):
    assert cli.main([name, "--help"] if name else ["-h"]) == 0
    lines = capsys.readouterr().out.splitlines()
    config = EXPERIMENTS[name]() if name else dd_jax.default_config()
    for fields in cli.sections_of(config).values():
        for f in fields:
            [line] = [l for l in lines if l.strip().startswith(f"--{f.name}=")]
            assert line.split()[0] == cli.flag_text(f.name, config[f.name])
            assert line.endswith(f.doc)
    for switch in cli.SWITCHES:
        assert any(l.strip().startswith(f"--{switch} ") for l in lines)
    if name:
        assert " ".join(EXPERIMENTS[name].__doc__.split()) in lines


def test_help_shows_the_experiments_values():
    assert cli.help_text("mnist_random_init").count("--init_regime=random ") == 1
    assert "--remat=false " in cli.help_text(None)
    assert "--data_dir='' " in cli.help_text(None)


def test_list_prints_whole_descriptions(capsys):
    assert cli.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for (name, make), line in zip(EXPERIMENTS.items(), lines):
        assert line.split()[0] == name
        assert line.endswith(" ".join(make.__doc__.split()))


FORMS = [
    (["--iterations", "7"], {"iterations": 7}),
    (["--iterations=7"], {"iterations": 7}),
    (["--outer_lr", "0.5", "--seed=3"], {"outer_lr": 0.5, "seed": 3}),
    (["--poison_class", "-1", "--poison_target", "2"], {"poison_class": -1, "poison_target": 2}),
    (["--remat"], {"remat": True}),
    (["--no-remat"], {"remat": False}),
    (["--remat=true"], {"remat": True}),
    (["--remat=off"], {"remat": False}),
    (["--remat", "--no-remat"], {"remat": False}),
    (["--data_dir", ""], {"data_dir": ""}),
    (["--data_dir="], {"data_dir": ""}),
]


@pytest.mark.parametrize("flags, expected", FORMS, ids=[" ".join(f) for f, _ in FORMS])
@pytest.mark.parametrize("where", ["after", "before"])
def test_flag_forms(flags, expected, where):
    argv = ["mnist_fixed_init", *flags] if where == "after" else [*flags, "mnist_fixed_init"]
    name, overrides, switches = cli.parse_args([*argv, "--quiet"])
    assert name == "mnist_fixed_init" and switches == {"quiet"}
    config, _ = cli.resolve_config(name, overrides, resume=False)
    for field, value in expected.items():
        assert config[field] == value and type(config[field]) is type(value), field


@pytest.mark.parametrize("args, fragments", [
    (["--iterations", "--quiet"], ["flag --iterations needs a value", "--iterations=VALUE"]),
    (["--iterations"], ["flag --iterations needs a value"]),
    (["--no-steps"], ["unknown flag --no-steps", "did you mean --steps"]),
    (["--remat", "maybe"], ["unexpected argument 'maybe'"]),
    (["--iterationz", "5"], ["unknown flag --iterationz", "did you mean --iterations"]),
])
def test_flag_form_errors(capsys, tmp_path, args, fragments):
    rc = cli.main(["mnist_fixed_init", *args, f"--output_dir={tmp_path / 'never'}"])
    assert_one_line_error(rc, capsys.readouterr().err, *fragments)
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------- kill and resume


@pytest.mark.parametrize("how", ["killed", "interrupt", "sigint", "sigterm", "shorter_run"])
def test_kill_and_resume_equals_uninterrupted(reference, tmp_path, monkeypatch, request, how):
    """Stopped and resumed, the run ends as the uninterrupted one, bitwise: killed (kill -9)
    or interrupted at once in iteration 6, it resumes from the periodic checkpoint at 4; on
    Ctrl-C or SIGTERM in iteration 5 it finishes that iteration and checkpoints it first; or
    run shorter."""
    a, _ = reference
    b = tmp_path / "B"
    if how != "shorter_run":
        if how in ("sigint", "sigterm") and threading.current_thread() is not threading.main_thread():
            pytest.skip("signal handlers need the main thread")
        if how == "sigint":  # as in a terminal: Python's own Ctrl-C handler, whatever ran before
            previous = signal.signal(signal.SIGINT, signal.default_int_handler)
            if previous is not None:  # None: a handler not installed from Python
                request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
        handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        with monkeypatch.context() as m:
            signalled = how in ("sigint", "sigterm")
            interrupt_meta_step(m, after_calls=4 if signalled else 5,
                                how="kill" if how == "killed" else how)
            err = ""
            if how == "killed":
                with pytest.raises(Killed):
                    call_main([*TINY, f"--output_dir={b}"])
            else:
                rc, _, err = call_main([*TINY, f"--output_dir={b}"])
                assert rc == 130
                assert "Traceback" not in err and "--resume" in err
        assert checkpoint_meta(b / "checkpoint")["iteration"] == (5 if signalled else 4), (
            [r["iteration"] for r in metrics(b)], err, handlers)
        assert [r["iteration"] for r in metrics(b)] == [1, 2, 3, 4, 5]
        assert not (b / "results.json").exists()
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
        # resume with no flags but the directory: the saved config.json supplies the rest
        resume = ["mnist_fixed_init", f"--output_dir={b}", "--resume", "--quiet"]
    else:
        run_ok([*TINY, "--iterations=3", f"--output_dir={b}"])
        resume = [*TINY, f"--output_dir={b}", "--resume"]
    run_ok(resume)

    da, db = distilled_arrays(a), distilled_arrays(b)
    assert set(da) == set(db)
    for k in da:
        np.testing.assert_array_equal(db[k], da[k], err_msg=k)
    ra = json.loads((a / "results.json").read_text())
    rb = json.loads((b / "results.json").read_text())
    assert rb["test_acc"] == ra["test_acc"] and rb["test_accs"] == ra["test_accs"]
    assert rb["step_sizes"] == ra["step_sizes"]

    rows_a, rows_b = metrics(a), metrics(b)
    iterations = [r["iteration"] for r in rows_b]
    assert iterations == list(range(1, N + 1))  # every iteration once, none duplicated
    for x, y in zip(rows_a, rows_b):
        assert x["meta_loss"] == y["meta_loss"], x["iteration"]
        assert x["step_sizes"] == y["step_sizes"], x["iteration"]
    assert checkpoint_meta(b / "checkpoint")["iteration"] == N


def test_sigterm_in_the_last_iteration_lets_the_run_finish(reference, tmp_path, monkeypatch):
    """A stop asked for while the last iteration runs: the run ends as it would have (its
    results written, exit 0), as the uninterrupted one."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    a, _ = reference
    b = tmp_path / "B"
    with monkeypatch.context() as m:
        interrupt_meta_step(m, after_calls=N - 1, how="sigterm")
        run_ok([*TINY, f"--output_dir={b}"])
    assert json.loads((b / "results.json").read_text())["test_accs"] == \
        json.loads((a / "results.json").read_text())["test_accs"]


# learned labels (5 images for the 10 classes) kept >= 0, momentum, a random 2-step window of
# T = 4, the images' gradient clipped to twice its norms' moving average (state in the checkpoint)
BEYOND = [*TINY, "--learn_labels=true", "--images_per_step=5", "--epochs=4", "--window=2",
          "--inner_optimizer=momentum", "--grad_clip_ema=0.9", "--nonneg_labels=true"]


@pytest.fixture(scope="module")
def reference_beyond(tmp_path_factory) -> Path:
    """The BEYOND run, uninterrupted."""
    out = tmp_path_factory.mktemp("cli") / "A_beyond"
    run_ok([*BEYOND, f"--output_dir={out}"])
    return out


def checkpoint_arrays(path: Path) -> list[np.ndarray]:
    """The leaves of the newest checkpoint in `path`, restored as saved (no template)."""
    import orbax.checkpoint as ocp

    step = checkpoint_meta(path)["iteration"]
    with ocp.CheckpointManager(path.absolute()) as manager:
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


@pytest.mark.parametrize("how", ["killed", "shorter_run"])
def test_resume_with_learned_labels_and_windows_equals_uninterrupted(reference_beyond, tmp_path,
                                                                     monkeypatch, how):
    a, b = reference_beyond, tmp_path / "B"
    if how == "killed":
        with monkeypatch.context() as m:
            interrupt_meta_step(m, after_calls=5)
            rc, _, _ = call_main([*BEYOND, f"--output_dir={b}"])
        assert rc == 130 and checkpoint_meta(b / "checkpoint")["iteration"] == 4
        run_ok([BEYOND[0], f"--output_dir={b}", "--resume", "--quiet"])
    else:
        run_ok([*BEYOND, "--iterations=3", f"--output_dir={b}"])
        run_ok([*BEYOND, f"--output_dir={b}", "--resume"])
    da, db = distilled_arrays(a), distilled_arrays(b)
    assert int(da["format_version"]) == 2 and da["soft_labels"].shape == (1, 5, 10)
    assert set(da) == set(db)
    for k in da:
        np.testing.assert_array_equal(db[k], da[k], err_msg=k)
    assert [(r["meta_loss"], r["step_sizes"]) for r in metrics(b)] == \
        [(r["meta_loss"], r["step_sizes"]) for r in metrics(a)]
    ra = json.loads((a / "results.json").read_text())
    assert json.loads((b / "results.json").read_text())["test_accs"] == ra["test_accs"]


def test_random_regime_kill_and_resume_equals_uninterrupted(digits8, tmp_path, monkeypatch):
    """The random regime draws fresh initialisations every iteration, from the iteration number
    (the fixed regime's theta_0 ignores it): killed after its checkpoint at iteration 4 and
    resumed, the run draws what the uninterrupted run drew and ends in the same state, bitwise."""
    dataset = digits8.subset(200, 50)
    config = default_config()
    config.update(dict(init_regime="random", n_nets=2, steps=2, epochs=2, real_batch_size=16,
                       iterations=N, checkpoint_every=2, log_every=1, eval_every=3,
                       n_eval_nets_during=2))
    run = lambda name, rows, **kw: dd_jax.distill(dataset, make_tiny_convnet(), config,
                                                 workdir=tmp_path / name, progress=False,
                                                 log=rows.append, **kw)
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    rows_a, rows_b = [], []
    a = run("A", rows_a)
    with monkeypatch.context() as m:
        interrupt_meta_step(m, after_calls=5, how="kill")  # iterations 1-5 done, killed in 6
        with pytest.raises(Killed):
            run("B", rows_b)
    assert checkpoint_meta(tmp_path / "B" / "checkpoint")["iteration"] == 4
    rows_b = [r for r in rows_b if r["iteration"] <= 4]  # what --resume keeps of metrics.jsonl
    b = run("B", rows_b, resume=True)

    assert [r["iteration"] for r in rows_b] == [r["iteration"] for r in rows_a] == list(range(1, N + 1))
    assert [r["meta_loss"] for r in rows_b] == [r["meta_loss"] for r in rows_a]
    assert [r.get("test_acc") for r in rows_b] == [r.get("test_acc") for r in rows_a]
    np.testing.assert_array_equal(b.images, a.images)
    np.testing.assert_array_equal(b.step_sizes, a.step_sizes)
    state_a, state_b = (checkpoint_arrays(tmp_path / n / "checkpoint") for n in "AB")
    assert len(state_a) == len(state_b)  # Adam's state and the iteration too
    for x, y in zip(state_a, state_b):
        np.testing.assert_array_equal(y, x)
    assert checkpoint_meta(tmp_path / "B" / "checkpoint")["iteration"] == N


@pytest.mark.parametrize("how", ["resume", "plain"])
def test_killed_before_first_checkpoint_starts_afresh(reference, tmp_path, monkeypatch, how):
    """Killed (kill -9) before its first checkpoint, a run holds nothing worth keeping: --resume
    and the plain command both start it afresh and give the uninterrupted run."""
    out = tmp_path / "early"
    with monkeypatch.context() as m:
        interrupt_meta_step(m, after_calls=1, how="kill")  # killed in iteration 2, checkpoint_every=2
        with pytest.raises(Killed):
            call_main([*TINY, f"--output_dir={out}"])
    assert not has_checkpoint(out / "checkpoint")
    assert [r["iteration"] for r in metrics(out)] == [1]
    run_ok([*TINY, f"--output_dir={out}", *(["--resume"] if how == "resume" else [])])

    a, _ = reference
    assert [r["iteration"] for r in metrics(out)] == list(range(1, N + 1))  # row 1 once
    assert [r["meta_loss"] for r in metrics(out)] == [r["meta_loss"] for r in metrics(a)]
    da, db = distilled_arrays(a), distilled_arrays(out)
    assert set(da) == set(db)
    for k in da:
        np.testing.assert_array_equal(db[k], da[k], err_msg=k)


def test_keep_checkpoints(reference_copy):
    out = reference_copy
    run_ok([*TINY, "--iterations=10", "--keep_checkpoints=2", f"--output_dir={out}", "--resume"])
    assert sorted(int(p.name) for p in (out / "checkpoint").iterdir()) == [8, 10]
    assert checkpoint_meta(out / "checkpoint")["iteration"] == 10


# --------------------------------------------------------------------------- divergence


def test_divergence_keeps_the_last_checkpoint(reference_copy):
    """Continue the finished reference run with an absurd outer step size: the meta-loss
    becomes non-finite; the error is one line and the earlier checkpoint and outputs survive."""
    out = reference_copy
    before = snapshot(out)
    rc, _, err = call_main([*TINY, "--iterations=10", "--outer_lr=1e30", f"--output_dir={out}",
                            "--resume"])
    line = assert_one_line_error(rc, err, "meta-loss became", "iteration 6")
    assert "nan" in line or "inf" in line
    after = snapshot(out)
    for name in ("checkpoint", "distilled.npz", "distilled.png", "results.json"):
        assert part(after, name) == part(before, name) != {}, name
    assert checkpoint_meta(out / "checkpoint")["iteration"] == N
    assert set(after) == set(before)  # no temporary files left behind


@pytest.fixture
def diverged_at_start(tmp_path):
    out = tmp_path / "diverged"
    rc, _, err = call_main([*TINY, "--step_size_init=1e30", f"--output_dir={out}"])
    return out, rc, err


def test_divergence_at_first_iteration(diverged_at_start):
    out, rc, err = diverged_at_start
    line = assert_one_line_error(rc, err, "meta-loss became", "at iteration 1", "--step_size_init")
    assert "nan" in line or "inf" in line
    for name in ("checkpoint", "distilled.npz", "results.json"):
        assert not (out / name).exists()


def test_divergence_message_says_no_checkpoint_was_saved(diverged_at_start):
    out, rc, err = diverged_at_start
    line = assert_one_line_error(rc, err, "meta-loss became", "at iteration 1; no checkpoint had been saved.",
                                 "Lower --outer_lr (now 0.01) or --step_size_init (now 1e+30) and start again.")
    assert "is kept" not in line
    assert not has_checkpoint(out / "checkpoint")


# --------------------------------------------------------------------------- output directories


def test_existing_output_dir_not_overwritten(reference_copy):
    out = reference_copy
    before = snapshot(out)
    rc, _, err = call_main([*TINY, f"--output_dir={out}"])
    assert_one_line_error(rc, err, str(out), "already holds a run", "--resume")
    assert snapshot(out) == before


@pytest.mark.parametrize("exists", [True, False])
def test_resume_without_a_run(tmp_path, exists):
    out = tmp_path / "empty"
    if exists:
        out.mkdir()
    rc, _, err = call_main([*TINY, f"--output_dir={out}", "--resume"])
    assert_one_line_error(rc, err, "nothing to resume", "drop --resume")
    if exists:
        assert list(out.iterdir()) == []
    else:
        assert not out.exists()


def test_failed_resume_keeps_the_run_resumable(reference_copy):
    """A --resume with a flag that changes the checkpointed state's shape is refused, and the
    refusal leaves the run as it was: the plain --resume still works."""
    out = reference_copy
    before = snapshot(out)
    rc, _, err = call_main(["mnist_fixed_init", "--steps=2", f"--output_dir={out}", "--resume",
                            "--quiet"])
    assert_one_line_error(rc, err, "steps")
    after = snapshot(out)
    for name in ("config.json", "checkpoint", "distilled.npz", "results.json"):
        assert part(after, name) == part(before, name) != {}, name
    run_ok(["mnist_fixed_init", f"--output_dir={out}", "--resume", "--quiet"])
    assert checkpoint_meta(out / "checkpoint")["iteration"] == N


# --------------------------------------------------------------------------- bad files and directories


@pytest.mark.parametrize("argv", [TINY, ["linear_analysis", "--quiet"]], ids=["distill", "linear"])
@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_output_dir_that_cannot_be_written(capsys, tmp_path, argv, where):
    (tmp_path / "file").write_text("x")
    out = Path("/proc/dd_jax_no_such_dir/run") if where == "proc" else tmp_path / "file" / "run"
    rc = cli.main([*argv, f"--output_dir={out}"])
    assert_one_line_error(rc, capsys.readouterr().err, "cannot write the output directory",
                          str(out), "--output_dir=DIR")
    assert (tmp_path / "file").read_text() == "x"


def _corrupt(checkpoint: Path, how: str) -> None:
    """Damages the newest step of an orbax checkpoint directory."""
    [step] = [p for p in checkpoint.iterdir() if p.name.isdigit()]
    if how == "meta_garbage":
        (step / "meta" / "metadata").write_text("not json")
    elif how == "arrays_truncated":
        for f in (step / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "arrays_missing":
        shutil.rmtree(step / "state")
    else:  # the step directory left empty
        shutil.rmtree(step)
        step.mkdir()


@pytest.mark.parametrize("how", ["meta_garbage", "arrays_truncated", "arrays_missing", "empty"])
def test_corrupted_checkpoint(reference_copy, how):
    out = reference_copy
    _corrupt(out / "checkpoint", how)
    before = snapshot(out)
    rc, _, err = call_main([*TINY, "--iterations=8", f"--output_dir={out}", "--resume"])
    assert_one_line_error(rc, err, "checkpoint", "unreadable", "--output_dir=DIR")
    assert snapshot(out) == before


def test_garbage_in_orbax_metadata_still_resumes_quietly(reference_copy, caplog):
    """orbax's own _CHECKPOINT_METADATA file is informational: with garbage in it the run
    resumes from its step and goes on, and nothing is logged."""
    out = reference_copy
    [step] = [p for p in (out / "checkpoint").iterdir() if p.name.isdigit()]
    (step / "_CHECKPOINT_METADATA").write_text("garbage")
    rc, _, err = call_main([*TINY, f"--iterations={N + 2}", f"--output_dir={out}", "--resume"])
    assert rc == 0, err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert [r["iteration"] for r in metrics(out) if "meta_loss" in r][-3:] == [N, N + 1, N + 2]


def test_checkpoint_of_an_earlier_version(reference_copy):
    """A run directory with the single-file checkpoint.npz of dd-jax 0.1.0."""
    out = reference_copy
    shutil.rmtree(out / "checkpoint")
    (out / "checkpoint.npz").write_bytes(b"PK")
    before = snapshot(out)
    rc, _, err = call_main([*TINY, "--iterations=8", f"--output_dir={out}", "--resume"])
    assert_one_line_error(rc, err, "checkpoint.npz", "dd-jax 0.1.0", "--output_dir=DIR")
    assert snapshot(out) == before
    rc, _, err = call_main([*TINY, "--iterations=8", f"--output_dir={out}"])
    assert_one_line_error(rc, err, "already holds a run")


def test_checkpoint_of_an_incompatible_config(reference_copy):
    """A run directory whose config.json no longer matches its checkpoint (here: edited to
    2 distilled steps): --resume is refused and nothing in the directory changes."""
    out = reference_copy
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "steps": 2}))
    before = snapshot(out)
    rc, _, err = call_main(["mnist_fixed_init", "--iterations=8", f"--output_dir={out}",
                            "--resume", "--quiet"])
    assert_one_line_error(rc, err, "written by a different configuration")
    assert snapshot(out) == before


def _other_distilled(reference: Path, tmp_path: Path, how: str) -> Path:
    """The reference run's distilled.npz made unfit for a digits LeNet in one way."""
    d = dd_jax.load_distilled(reference / "distilled.npz")
    model = "lenet"
    if how == "model":
        model = "alexcifarnet"
    elif how == "shape":
        d = dataclasses.replace(d, images=np.zeros((1, 10, 32, 32, 3), np.float32))
    elif how == "classes":
        d = dataclasses.replace(d, labels=d.labels + 10)
    else:  # a theta_0 of other shapes, no model recorded
        model = ""
        init = {**d.init_params, "fc3": {"kernel": np.zeros((84, 5), np.float32),
                                          "bias": np.zeros(5, np.float32)}}
        d = dataclasses.replace(d, init_params=init)
    path = tmp_path / f"{how}.npz"
    dd_jax.save_distilled(path, d, model=model)
    return path


@pytest.mark.parametrize("how, fragment", [
    ("model", "was distilled for model 'alexcifarnet'"),
    ("shape", "holds images of shape (32, 32, 3)"),
    ("classes", "has labels up to 19"),
    ("theta0", "do not fit lenet"),
])
def test_distilled_of_the_wrong_model(reference, tmp_path, how, fragment):
    path = _other_distilled(reference[0], tmp_path, how)
    out = tmp_path / "never"
    rc, _, err = call_main(["mnist_baselines", *TINY[1:2], "--quiet", f"--distilled={path}",
                            f"--output_dir={out}"])
    assert_one_line_error(rc, err, str(path), fragment)
    assert not out.exists()


# --------------------------------------------------------------------------- bad input


BAD_INPUT = [
    (["nope"], ["unknown experiment 'nope'", *EXPERIMENTS]),
    (["mnist_fixd_init"], ["unknown experiment 'mnist_fixd_init' (did you mean mnist_fixed_init"]),
    ([], ["no experiment named", *EXPERIMENTS]),
    (["mnist_fixed_init", "--stepz=2"], ["--stepz", "did you mean --steps"]),
    (["mnist_fixed_init", "--steps=abc"], ["--steps='abc'", "an integer"]),
    (["mnist_fixed_init", "--outer_lr=fast"], ["--outer_lr='fast'", "a number"]),
    (["mnist_fixed_init", "--remat=maybe"], ["--remat='maybe'", "true or false"]),
    (["mnist_fixed_init", "--steps"], ["--steps", "needs a value"]),
    (["mnist_fixed_init", "extra"], ["unexpected argument 'extra'"]),
    (["mnist_fixed_init", "--n_nets=0"], ["n_nets must be >= 1, got 0"]),
    (["mnist_fixed_init", "--steps=0"], ["steps must be >= 1, got 0"]),
    (["mnist_fixed_init", "--images_per_class=0"], ["images_per_class must be >= 1, got 0"]),
    (["mnist_fixed_init", "--epochs=-1"], ["epochs must be >= 1"]),
    (["mnist_fixed_init", "--real_batch_size=0"], ["real_batch_size must be >= 1"]),
    (["mnist_fixed_init", "--outer_lr=0"], ["outer_lr must be > 0"]),
    (["mnist_fixed_init", "--outer_lr=nan"], ["outer_lr must be > 0"]),
    (["mnist_fixed_init", "--step_size_init=-0.1"], ["step_size_init must be > 0"]),
    (["mnist_truncated", "--image_init_scale=0"], ["image_init_scale must be > 0"]),
    (["mnist_fixed_init", "--iterations=-1"], ["iterations must be >= 0"]),
    (["mnist_fixed_init", "--lr_schedule=linear"], ["unknown lr_schedule 'linear'", "step, cosine"]),
    (["mnist_fixed_init", "--warmup_iterations=-5"], ["warmup_iterations must be >= 0, got -5"]),
    (["mnist_fixed_init", "--nonneg_labels=true"], ["labels are not learned", "--learn_labels=true"]),
    (["mnist_fixed_init", "--simplex_labels"], ["labels are not learned", "--simplex_labels"]),
    (["mnist_truncated", "--grad_clip_ema=1.5"], ["grad_clip_ema must be in [0, 1)"]),
    (["mnist_fixed_init", "--n_nets=2"], ["n_nets must be 1", "--init_regime=random"]),
    (["mnist_fixed_init", "--init_regime=sometimes"], ["unknown init_regime 'sometimes'"]),
    (["mnist_random_init", "--init_dist=glorot"], ["unknown init_dist 'glorot'", "xavier_normal"]),
]


@pytest.mark.parametrize("args, fragments", BAD_INPUT,
                         ids=[" ".join(a[1:] or a or ["<none>"]) for a, _ in BAD_INPUT])
def test_bad_input_is_a_one_line_error(capsys, tmp_path, args, fragments):
    out = tmp_path / "never"
    argv = [*args, "--dataset=digits", f"--output_dir={out}", "--quiet"] if args else []
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 2
    assert_one_line_error(rc, captured.err, *fragments)
    assert captured.out == ""
    assert not out.exists()  # refused before touching the output directory


@pytest.mark.parametrize("args, fragments", [
    (["--model=resnet"], ["unknown model 'resnet'", "lenet"]),
    (["--dataset=no_such_dataset_xyz"], ["'no_such_dataset_xyz'", "prepare_data"]),
], ids=["model", "tfds-name"])
def test_bad_model_or_dataset(capsys, tmp_path, args, fragments):
    rc = cli.main(["mnist_fixed_init", *args, f"--data_dir={tmp_path / 'tfds'}",
                   f"--output_dir={tmp_path / 'run'}", "--quiet"])
    assert_one_line_error(rc, capsys.readouterr().err, *fragments)


@pytest.fixture
def corrupted_packaged_mnist(mnist_copy, monkeypatch):
    """Points the packaged-MNIST location at a copy (to be damaged by the test)."""
    monkeypatch.setattr(data, "MNIST_DIR", mnist_copy)
    return mnist_copy


@pytest.mark.parametrize("how, fragment", [
    ("regzip", "corrupted"),
    ("crc", "corrupted"),
    ("truncate", "corrupted"),
    ("missing", "missing"),
    ("deflate", "corrupted"),
])
def test_corrupted_dataset(capsys, tmp_path, corrupted_packaged_mnist, how, fragment):
    corrupt_mnist_file(corrupted_packaged_mnist, how, MNIST_GZ["train_labels"])
    out = tmp_path / "run"
    rc = cli.main(["mnist_fixed_init", "--dataset=mnist", f"--output_dir={out}", "--quiet"])
    assert_one_line_error(rc, capsys.readouterr().err, fragment, MNIST_GZ["train_labels"])
    assert not out.exists()


def test_subprocess_bad_experiment():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "experiments.run", "nope"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert_one_line_error(proc.returncode, proc.stderr, "unknown experiment 'nope'")
    assert proc.stdout == ""


def read_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of the TensorBoard event files in `directory` (TFRecord framing:
    length, its CRC, an Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_scalars_are_the_metrics_rows(tmp_path):
    out = tmp_path / "tb"
    run_ok([*TINY, f"--output_dir={out}", "--tensorboard"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = read_scalars(out / "tensorboard")
    assert scalars["meta_loss"] == pytest.approx({r["iteration"]: r["meta_loss"] for r in rows})
    assert scalars["test_acc"] == pytest.approx({r["iteration"]: r["test_acc"] for r in rows
                                                 if "test_acc" in r})
    assert scalars["step_size/0"] == pytest.approx({r["iteration"]: r["step_sizes"][0] for r in rows
                                                    if "step_sizes" in r}, rel=1e-6)
