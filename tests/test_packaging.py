"""Packaging: one version, the entry point, the licences and the citation shipped as declared."""
from __future__ import annotations

import configparser
import fnmatch
import importlib
import subprocess

import pytest
import yaml

import dd_jax
from conftest import ROOT
from dd_jax.runs import git_state, machine_info
from experiments import run as cli


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def test_one_version():
    assert setup_cfg()["metadata"]["version"] == "attr: dd_jax.__version__"
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["version"] == dd_jax.__version__


def test_python_requires_matches_the_pinned_wheels():
    # jax, jaxlib, numpy 2.x, flax, scikit-learn and matplotlib of requirements.txt need 3.11
    options = setup_cfg()["options"]
    assert options["python_requires"] == ">=3.11"
    assert "numpy>=2.0" in options["install_requires"].split()


def test_console_script_is_the_cli():
    [line] = [l for l in setup_cfg()["options.entry_points"]["console_scripts"].splitlines()
              if l.strip()]
    name, target = (part.strip() for part in line.split("="))
    module, function = target.split(":")
    assert name == "dd-jax"
    assert getattr(importlib.import_module(module), function) is cli.main


def test_licences_ship():
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert "dd-jax developers" in (ROOT / "LICENSE").read_text()
    notice = ROOT / "dd_jax" / "_data" / "mnist" / "LICENSE"
    text = notice.read_text()
    assert "CC BY-SA 3.0" in text and "Yann LeCun" in text and "Corinna Cortes" in text
    globs = [g.strip() for g in setup_cfg()["options.package_data"]["dd_jax"].split(",")]
    assert any(fnmatch.fnmatch("_data/mnist/LICENSE", g) for g in globs)
    assert "dd_jax/_data/mnist/LICENSE" in setup_cfg()["metadata"]["license_files"].split()


def test_citation_names_the_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    [paper] = cff["references"]
    assert paper["title"] == "Dataset Distillation" and paper["year"] == 2018
    assert [a["family-names"] for a in paper["authors"]] == ["Wang", "Zhu", "Torralba", "Efros"]
    assert "arXiv:1811.10959" in [i["value"] for i in paper["identifiers"]]


def test_results_record_version_and_commit():
    machine = machine_info()
    assert machine["dd_jax"] == dd_jax.__version__
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    expected = head.stdout.strip() if head.returncode == 0 else None
    assert machine["git_commit"] == expected == git_state()[0]
    assert machine["git_dirty"] in ((True, False) if expected else (None,))


def test_no_commit_outside_a_checkout(monkeypatch, tmp_path):
    (tmp_path / "dd_jax").mkdir()
    monkeypatch.setattr(dd_jax, "__file__", str(tmp_path / "dd_jax" / "__init__.py"))
    assert git_state() == (None, None)


def test_commit_is_the_one_a_run_started_from(monkeypatch, tmp_path):
    """results.json names the commit when the run started, even if the checkout moves on."""
    from dd_jax import runs
    from dd_jax.config import default_config

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    expected = head.stdout.strip() if head.returncode == 0 else None
    runs._git_state.cache_clear()
    machine = runs.start_run(default_config(), tmp_path / "run", "mnist_fixed_init")
    assert machine["git_commit"] == expected
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("git asked again"))
    assert machine_info()["git_commit"] == expected
