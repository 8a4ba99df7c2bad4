"""Where an outer iteration's time goes: the XLA ops of a named experiment's meta-step, from
a profiler trace.

    python -m benchmarks.op_profile mnist_random_init [--iterations=5] [--top=25] [--field=value]

Runs the config's outer loop `iterations` times (after warm-up) under ``jax.profiler.trace``
and prints, per outer iteration: the ops' summed time by duration class (how much of it is
per-op overhead), by kind (the op's name without its number: ``slice_bitcast_fusion``,
``dot``, ...), and the `top` single ops with their shape and what the jaxpr called them
(forward, ``transpose(jvp(...))`` = backward, ``checkpoint`` = recomputed). Only ops that
hold no other op are counted (a loop's time is its body's). XLA:CPU runs independent ops on
both cores at once, so the ops' summed time can exceed the wall time.
"""
from __future__ import annotations

import collections
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax

from benchmarks.common import experiment_config, machine_info, machine_line, parse_flags, run_main
from dd_jax.outer_step import build_outer_loop
from dd_jax.outputs import markdown_table
from dd_jax.runs import load_data_and_model

# Trace events that are not XLA ops: Python frames ('$...'), the executor and thread pool, and
# the markers of asynchronous ops' ends.
NOT_OPS = ("$", "ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end: ")
DURATION_CLASSES_US = ((0, 5), (5, 20), (20, 100), (100, float("inf")))


def op_events(trace_dir: Path) -> list[tuple[str, float]]:
    """(op name, microseconds) of every XLA op in the perfetto trace under `trace_dir` that
    holds no other op: a loop or conditional whose body's ops are traced inside it (on its
    thread, within its span) is left out, so that no time is counted twice."""
    [path] = trace_dir.glob("**/*.trace.json.gz")
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops = sorted((e for e in events if e.get("ph") == "X" and not e["name"].startswith(NOT_OPS)),
                 key=lambda e: (e["pid"], e["tid"], e["ts"], -e.get("dur", 0)))
    leaves = []
    for e, after in zip(ops, [*ops[1:], None]):
        holds_next = (after is not None and (after["pid"], after["tid"]) == (e["pid"], e["tid"])
                      and after["ts"] < e["ts"] + e.get("dur", 0))
        if not holds_next:
            leaves.append((e["name"], float(e.get("dur", 0))))
    return leaves


def op_kind(name: str) -> str:
    """'slice_bitcast_fusion.98' -> 'slice_bitcast_fusion'."""
    return re.sub(r"\.\d+$", "", name)


def hlo_lines(hlo: str) -> dict[str, str]:
    """Instruction name -> (result shape, the jaxpr's op_name) in a compiled module's text."""
    lines = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\"", hlo, re.M):
        lines.setdefault(m.group(1), f"{m.group(2)} {m.group(3)}")
    return lines


def main(argv: list[str]) -> None:
    names, flags, overrides = parse_flags(argv, {"iterations": 5, "top": 25}, max_names=1)
    config = experiment_config(names[0] if names else "mnist_random_init", overrides)
    loop = build_outer_loop(*load_data_and_model(config), config)
    state = loop.state
    for it in range(3):  # compiles
        state, out = loop.step(state, it)
    jax.block_until_ready(out)
    n = flags["iterations"]
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for it in range(3, 3 + n):
                state, out = loop.step(state, it)
            jax.block_until_ready(out)
        events = op_events(Path(tmp))
    hlo = hlo_lines(loop.compiled_step(state).as_text())
    total = sum(d for _, d in events) / n / 1e3
    print(f"{config.steps * config.epochs} inner steps, {config.n_nets} nets: {len(events) // n} "
          f"ops and {total:.1f} ms of op time per outer iteration\n")
    print(markdown_table(["op duration", "ops / iteration", "ms / iteration"], [
        [f"{lo}-{hi} us", sum(lo <= d < hi for _, d in events) // n,
         f"{sum(d for _, d in events if lo <= d < hi) / n / 1e3:.1f}"]
        for lo, hi in DURATION_CLASSES_US]))
    by_kind, by_op, count = collections.Counter(), collections.Counter(), collections.Counter()
    for name, d in events:
        by_kind[op_kind(name)] += d
        by_op[name] += d
        count[name] += 1
    print()
    print(markdown_table(["op kind", "ms / iteration", "share"], [
        [k, f"{t / n / 1e3:.1f}", f"{100 * t / n / 1e3 / total:.0f}%"]
        for k, t in by_kind.most_common(flags["top"])]))
    print()
    print(markdown_table(["op", "runs / iteration", "ms / iteration", "shape and jaxpr name"], [
        [name, count[name] // n, f"{t / n / 1e3:.2f}", f"`{hlo.get(name, '')[:150]}`"]
        for name, t in by_op.most_common(flags["top"])]))
    print(machine_line(machine_info()))


if __name__ == "__main__":
    sys.exit(run_main(main, __doc__))
