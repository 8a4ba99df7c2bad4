"""One process of a run through `python -m experiments.run`, recording what it writes; run by
tests/test_scaleout.py, two at a time, as the processes of a multi-host run on this machine.

    python tests/multihost_check.py WRITES_JSON EXPERIMENT [--field=value ...] [--distributed]

Runs experiments.run.main(EXPERIMENT ...) in this process and writes to WRITES_JSON (which must
lie outside the run's --output_dir) {"rc": its exit status, "process_index": jax's process
index, "writes": [...]}: the names, relative to the output directory, of every file that this
process opened for writing or renamed into that directory (Python's audit events 'open' and
'os.rename'). With --distributed the process joins the run that JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID describe.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _output_dir(argv: list[str]) -> str:
    for arg in argv:
        if arg.startswith("--output_dir="):
            return os.path.realpath(arg.split("=", 1)[1])
    raise SystemExit("multihost_check.py needs --output_dir=DIR")


def main(writes_json: str, argv: list[str]) -> int:
    out_dir = _output_dir(argv)
    writes: list[str] = []

    def inside(path) -> str | None:
        if isinstance(path, int):  # a file descriptor
            return None
        full = os.path.realpath(os.fsdecode(path))
        return os.path.relpath(full, out_dir) if full.startswith(out_dir + os.sep) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                       else bool((flags or 0) & WRITE_FLAGS))
            name = inside(path) if writing else None
        elif event == "os.rename":  # os.rename and os.replace
            name = inside(args[1])
        else:
            return
        if name is not None:
            writes.append(name)

    sys.addaudithook(hook)

    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # the test session's cache
        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    from experiments import run as cli

    result = {"rc": None, "process_index": None, "writes": writes}
    try:
        result["rc"] = cli.main(argv)
        result["process_index"] = jax.process_index()
    finally:  # also when the run raised: what it wrote until then
        with open(writes_json, "w") as f:  # outside out_dir: not recorded
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1], sys.argv[2:]))
