"""`python -m experiments.report`: finished runs -> one markdown table with the paper's numbers."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import pytest

from conftest import ROOT
from dd_jax.outputs import markdown_table
from experiments import report
from experiments.paper import PAPER, paper_result


def call_report(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = report.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def test_markdown_table_prints_cells_under_columns():
    assert markdown_table(["a", "b"], [[1, 2], ("x", 0.5)]).splitlines() == [
        "| a | b |", "|---|---|", "| 1 | 2 |", "| x | 0.5 |"]


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


@pytest.mark.slow
def test_report_of_two_tiny_runs(tiny_runs, tmp_path):
    distill, baselines = tiny_runs["distill"], tiny_runs["baselines_random"]
    out = tmp_path / "report.md"
    rc, stdout, stderr = call_report([distill, baselines, f"--out={out}"])
    assert rc == 0 and stderr == ""
    assert out.read_text() == stdout

    d = json.loads((distill / "results.json").read_text())
    b = json.loads((baselines / "results.json").read_text())
    rel = lambda p: os.path.relpath(p.resolve(), tmp_path.resolve())  # links are relative to --out
    expected = [
        f"| mnist_baselines_random | random_real | digits | random | 20 | "
        f"{pct(b['rows'][0]['test_acc'])} ± {pct(b['rows'][0]['test_acc_std'])} | 2 | "
        f"68.6 ± 9.8 (unconfirmed) | {pct(b['rows'][0]['knn_acc'])} | 71.5 ± 2.1 (unconfirmed) | "
        f"{b['rows'][0]['seconds']:.0f} s | {rel(baselines)} |",
        f"| mnist_baselines_random | mean | digits | random | 20 | "
        f"{pct(b['rows'][1]['test_acc'])} ± {pct(b['rows'][1]['test_acc_std'])} | 2 | "
        f"77.1 ± 2.7 (unconfirmed) | {pct(b['rows'][1]['knn_acc'])} |  | "
        f"{b['rows'][1]['seconds']:.0f} s | {rel(baselines)} |",
        f"| mnist_fixed_init | distilled | digits | fixed | 10 | {pct(d['test_acc'])} | 1 | 93.76 |  |  | "
        f"{d['distill_seconds']:.0f} s | {rel(distill)} |",
    ]
    lines = stdout.splitlines()
    assert lines[0].startswith("| experiment | method | dataset | init | images | ours (%) | eval nets")
    assert lines[2:5] == expected
    assert f"![mnist_fixed_init (distill)]({rel(distill / 'distilled.png')})" in lines
    assert "baselines_random/distilled.png" not in stdout  # a baselines run has no distilled.png


def test_report_reads_the_single_row_format_of_committed_results(tmp_path):
    run = tmp_path / "mnist_random_init_p20"
    shutil.copytree(ROOT / "results" / "archive" / "mnist_random_init_p20", run)
    results = json.loads((run / "results.json").read_text())
    text = report.report([tmp_path], out=tmp_path / "r.md")
    line = text.splitlines()[2]
    assert line.startswith(
        f"| mnist_random_init | distilled | mnist | random | 100 | {pct(results['test_acc'])} ± "
        f"{pct(results['test_acc_std'])} | 20 | 79.5 ± 8.1 |")
    assert "![mnist_random_init (mnist_random_init_p20)](mnist_random_init_p20/distilled.png)" in text


def test_broken_results_are_skipped_and_no_runs_is_an_error(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    rc, stdout, stderr = call_report([tmp_path])
    assert rc == 2 and stdout == ""
    lines = stderr.splitlines()
    assert lines[0].startswith("warning: skipping") and "broken" in lines[0]
    assert lines[1].startswith("error: no finished run") and len(lines) == 2
    rc, _, stderr = call_report([tmp_path / "missing"])
    assert rc == 2 and stderr.startswith("error: ") and "not a directory" in stderr


def test_paper_numbers_are_keyed_and_marked():
    assert paper_result("mnist_fixed_init").text() == "93.76"
    assert paper_result("mnist_random_init").text() == "79.5 ± 8.1"
    assert paper_result("mnist_fixed_init_100").text() == "96.6 (unconfirmed)"
    assert paper_result("mnist_baselines_random", "kmeans").knn_text() == "92.2 ± 0.1 (unconfirmed)"
    assert paper_result("mnist_baselines", "kmeans") is None
    assert all(p.status in ("confirmed", "unconfirmed") for p in PAPER.values())


def test_report_names_the_iterate_a_holdout_chose(tmp_path):
    run = tmp_path / "mnist_random_init_p20"
    shutil.copytree(ROOT / "results" / "archive" / "mnist_random_init_p20", run)
    results = json.loads((run / "results.json").read_text())
    results["selected"] = {"iteration": 1500, "val_acc": 0.9, "val_size": 5000}
    (run / "results.json").write_text(json.dumps(results))
    line = report.report([tmp_path]).splitlines()[2]
    assert line.startswith(
        "| mnist_random_init | distilled (iteration 1500, best on 5000 held out) | mnist | random |")
