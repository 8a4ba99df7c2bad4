"""dd_jax.allocator: when the command-line entry points restart with tcmalloc, and that the
restarted process has it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dd_jax.allocator import QUIET_LARGE_ALLOCATIONS, allocator_in_use, command_line_args, find_tcmalloc, tcmalloc_env

LIB = "libtcmalloc_minimal.so.4"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_tcmalloc_env_prepends_the_library_and_quiets_large_allocations():
    env = tcmalloc_env({"PATH": "/bin"}, LIB)
    assert env["LD_PRELOAD"] == LIB and env["PATH"] == "/bin"
    assert env.items() >= QUIET_LARGE_ALLOCATIONS.items()
    assert tcmalloc_env({"LD_PRELOAD": "libfoo.so"}, LIB)["LD_PRELOAD"] == f"{LIB}:libfoo.so"
    threshold = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "1000"}  # the user's own value wins
    assert tcmalloc_env(threshold, LIB).items() >= threshold.items()
    assert allocator_in_use(env) == "tcmalloc"


def test_tcmalloc_env_leaves_the_process_alone():
    assert tcmalloc_env({}, None) is None  # not installed
    assert tcmalloc_env({"LD_PRELOAD": f"/usr/lib/{LIB}"}, LIB) is None  # already restarted
    assert tcmalloc_env({"DD_JAX_MALLOC": "system"}, LIB) is None  # the user's choice
    assert allocator_in_use({}) == "system"
    assert command_line_args(["--flag=1"]) == ["--flag=1"]  # a call from Python: no restart


@pytest.mark.skipif(find_tcmalloc() is None or not sys.platform.startswith("linux"),
                    reason="tcmalloc is not installed (apt install libtcmalloc-minimal4)")
@pytest.mark.parametrize("choice, expected", [("", "tcmalloc"), ("system", "system")])
def test_the_restarted_command_runs_with_tcmalloc(monkeypatch, choice, expected):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("DD_JAX_MALLOC", choice)
    code = ("import sys; print('start', flush=True); from dd_jax.allocator import *; "
            "args = command_line_args(None); print(allocator_in_use(), args)")
    out = subprocess.run([sys.executable, "-c", code, "--flag=1"], capture_output=True,
                         text=True, check=True).stdout.split("\n")
    # Restarted: the command ran twice, the second time with the same arguments.
    assert out[-2] == f"{expected} ['--flag=1']"
    assert out.count("start") == (2 if expected == "tcmalloc" else 1)
