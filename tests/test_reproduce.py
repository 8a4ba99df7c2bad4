"""experiments.reproduce: the table's rows run in order, killed and restarted it ends with
the same table, and bad input is one line."""
from __future__ import annotations

import json

import pytest

from conftest import interrupt_meta_step
from experiments import reproduce

ROWS = "linear_analysis,mnist_fixed_init_paper"
TINY = ["--dataset=digits", "--test_subset=100", "--iterations=4", "--real_batch_size=32",
        "--eval_every=2", "--checkpoint_every=2", "--dim=2", "--max_points=3"]
MEASURED = ("row", "method", "paper", "measured", "acc", "std", "nets", "schedule", "status")


def table(out) -> list[dict]:
    """TABLE.json's entries, without what differs between two runs of the same rows."""
    rows = json.loads((out / "TABLE.json").read_text())["rows"]
    return [{k: r.get(k) for k in MEASURED} for r in rows if r["row"] in ROWS.split(",")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert reproduce.main([f"--only={ROWS}", f"--out={out}", *TINY]) == 0
    return out


def test_every_row_measured(uninterrupted):
    rows = table(uninterrupted)
    assert [r["row"] for r in rows] == ROWS.split(",")
    assert all(r["status"] == "done" for r in rows)
    distilled = rows[1]
    assert distilled["paper"] == "93.76" and distilled["measured"] == f"{100 * distilled['acc']:.2f}"
    # the share counts passes over the row's own training images (digits here, not MNIST)
    assert distilled["schedule"].startswith("4 x 32 (") and distilled["schedule"].endswith(
        "% of the paper's 400 passes)")
    assert "| mnist_fixed_init_paper |" in (uninterrupted / "TABLE.md").read_text()


def test_killed_and_restarted_gives_the_same_table(uninterrupted, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:  # killed in iteration 3 of the second row, after a checkpoint
        interrupt_meta_step(m, after_calls=2)
        assert reproduce.main([f"--only={ROWS}", f"--out={tmp_path}", *TINY]) == 130
    partial = table(tmp_path)
    assert partial[0] == table(uninterrupted)[0]  # the finished row is in the table already
    assert partial[1]["status"].startswith("running or interrupted")
    assert "rerun the same command" in capsys.readouterr().err

    stamp = (tmp_path / "linear_analysis" / "results.json").stat().st_mtime_ns
    assert reproduce.main([f"--only={ROWS}", f"--out={tmp_path}", *TINY]) == 0
    assert (tmp_path / "linear_analysis" / "results.json").stat().st_mtime_ns == stamp  # skipped
    assert "reproduce: linear_analysis" not in capsys.readouterr().out
    assert table(tmp_path) == table(uninterrupted)


@pytest.mark.parametrize("args, fragment", [
    (["--only=mnist_fixed_init_10"], "unknown row 'mnist_fixed_init_10'"),
    (["--itrations=3"], "did you mean --iterations"),
    (["--only=mnist_baselines"], "reads the outputs of row mnist_fixed_init_100"),
    (["extra"], "unexpected argument 'extra'"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, fragment):
    assert reproduce.main([*args, f"--out={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err and "\n" not in err


def test_list_names_every_row(capsys):
    assert reproduce.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(row.name in out for row in reproduce.ROWS)
    assert "[needs cifar10]" in out


def test_pool_without_its_file_runs_again(tmp_path, capsys):
    """A pool row whose results survived but whose pool.npz (read by other rows) did not is
    not done: it runs again, from an emptied directory."""
    pool = tmp_path / "digits_pool"
    args = ["--only=digits_pool", f"--out={tmp_path}", "--pool_size=2", "--pool_epochs=1",
            "--test_subset=100"]
    assert reproduce.main(args) == 0
    assert (pool / "pool.npz").exists()
    assert reproduce.main(args) == 0  # done: skipped
    assert capsys.readouterr().out.count("reproduce: digits_pool") == 1

    (pool / "pool.npz").unlink()
    row = next(r for r in reproduce.ROWS if r.name == "digits_pool")
    assert row.files_read == ["pool.npz"] and reproduce.row_state(row, tmp_path) == "started"
    # the table keeps the measured figure (a clone of the results has no pool.npz)
    measured = next(e for e in reproduce.write_table(tmp_path) if e["row"] == "digits_pool")
    assert measured["status"] == "done" and measured["measured"]
    assert reproduce.main(args) == 0
    assert (pool / "pool.npz").exists() and "reproduce: digits_pool" in capsys.readouterr().out
