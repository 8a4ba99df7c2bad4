"""README.md's figures are generated from the committed results, not typed."""
from __future__ import annotations

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
