"""The memory allocator under XLA:CPU's buffers: tcmalloc where it is installed.

XLA:CPU allocates an execution's buffers afresh each call. glibc's malloc serves the large
ones with ``mmap`` and unmaps them on free, so every outer iteration faults its tens of MB of
buffers (the inner loop's per-step parameters, the real batch's activations) back in, page by
page. tcmalloc keeps freed memory for the next call. A process cannot change its allocator
once started: `reexec_with_tcmalloc` restarts the command line it runs with tcmalloc in
``LD_PRELOAD``. The command-line entry points call it through `command_line_args`;
``DD_JAX_MALLOC=system`` keeps glibc's malloc. Measured effect: ``results/benchmarks/allocator.md``.
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping

# tcmalloc's names, most specific first (Debian/Ubuntu: libtcmalloc-minimal4, libgoogle-perftools4).
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
# tcmalloc reports each allocation over 1 GiB on stderr unless told a higher threshold.
QUIET_LARGE_ALLOCATIONS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_tcmalloc() -> str | None:
    """The file name of an installed tcmalloc library (as the dynamic loader finds it), or None."""
    for name in TCMALLOC_LIBRARIES:
        if found := ctypes.util.find_library(name):
            return found
    return None


def allocator_in_use(env: Mapping[str, str] = os.environ) -> str:
    """'tcmalloc' where it is preloaded, else 'system'."""
    return "tcmalloc" if "tcmalloc" in env.get("LD_PRELOAD", "") else "system"


def tcmalloc_env(env: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to restart with: `env` with `library` first in LD_PRELOAD. None where
    there is nothing to do: no library, not Linux, tcmalloc already preloaded (the restarted
    process), or DD_JAX_MALLOC=system."""
    preload = env.get("LD_PRELOAD", "")
    if (library is None or not sys.platform.startswith("linux") or allocator_in_use(env) == "tcmalloc"
            or env.get("DD_JAX_MALLOC", "") == "system"):
        return None
    return {**QUIET_LARGE_ALLOCATIONS, **env,
            "LD_PRELOAD": f"{library}:{preload}" if preload else library}


def reexec_with_tcmalloc() -> None:
    """Replaces this process by the same command line (``sys.orig_argv``) run with tcmalloc
    preloaded; returns without doing anything where `tcmalloc_env` says there is nothing to do.
    Call it first thing in a command-line entry point, before any work worth keeping."""
    env = tcmalloc_env(os.environ, find_tcmalloc())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)


def command_line_args(argv: list[str] | None) -> list[str]:
    """An entry point's arguments: `argv` as given (a call from Python, left as it is), or for
    None the command line's, after restarting it with tcmalloc where it is installed."""
    if argv is not None:
        return argv
    reexec_with_tcmalloc()
    return sys.argv[1:]
