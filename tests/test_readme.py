"""README.md's figures are generated from the committed results, not typed."""
from __future__ import annotations

import json

from experiments import readme


def test_readme_blocks_are_generated_from_the_committed_results():
    assert readme.main(["--check"]) == 0, "run python -m experiments.readme"


def test_every_block_is_in_the_readme():
    text = readme.README.read_text()
    for name in readme.BLOCKS:
        assert f"<!-- generated:{name} -->" in text and f"<!-- end:{name} -->" in text


def test_render_replaces_a_stale_block(tmp_path):
    stale = "x\n<!-- generated:headline -->\n| typed by hand |\n<!-- end:headline -->\ny\n"
    rendered = readme.render(stale, tmp_path)  # no results there
    assert "typed by hand" not in rendered and "No committed run" in rendered
    assert rendered.startswith("x\n") and rendered.endswith("y\n")


def _run(folder, experiment, iterations=0, passes=400, acc=0.5, standard=None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"experiment": experiment, "iterations": iterations, "passes": passes, "real_batch_size": 1000,
         "model": "lenet"}))
    (folder / "results.json").write_text(json.dumps(
        {"test_acc": acc, "test_acc_std": 0.01, "eval_nets": 20}))
    if standard is not None:
        (folder / "evaluate_standard_lenet.json").write_text(json.dumps(
            {"test_acc": standard, "test_acc_std": 0.0, "eval_nets": 1}))


def test_beyond_block_takes_the_canonical_run_else_the_longest_archived(tmp_path):
    """An archived run that saw more real images beats a shorter one, the canonical run beats
    both; another experiment's folder with a matching prefix is not taken; the standard
    protocol's figure is read from beside the chosen run."""
    archive = tmp_path / "archive"
    _run(archive / "mnist_truncated_i300", "mnist_truncated", iterations=300, acc=0.40)
    _run(archive / "mnist_truncated_i6000", "mnist_truncated", iterations=6000, acc=0.80,
         standard=0.82)
    _run(archive / "mnist_truncated_10_i9000", "mnist_truncated_10", iterations=9000, acc=0.90)
    [row] = [line for line in readme.beyond_block(tmp_path).splitlines()
             if line.startswith("| `mnist_truncated` ")]
    assert "80.00 ± 1.00 (20)" in row and "82.00" in row and "6,000 iterations" in row
    assert "archive/mnist_truncated_i6000" in row
    _run(tmp_path / "mnist_truncated", "mnist_truncated", acc=0.85)
    [row] = [line for line in readme.beyond_block(tmp_path).splitlines()
             if line.startswith("| `mnist_truncated` ")]
    assert "85.00" in row and "full (400 passes)" in row and "not run" in row
    (tmp_path / "mnist_truncated" / "evaluate_paper_lenet.json").write_text(json.dumps(
        {"test_acc": 0.86, "test_acc_std": 0.02, "eval_nets": 200}))
    [row] = [line for line in readme.beyond_block(tmp_path).splitlines()
             if line.startswith("| `mnist_truncated` ")]
    assert "86.00 ± 2.00 (200)" in row and "85.00" not in row
