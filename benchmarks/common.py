"""What the benchmarks share: the machine and versions, timing of repeated steps, flags,
markdown tables."""
from __future__ import annotations

import math
import os
import platform
import sys
import time
from typing import Any, Callable

import jax
import jaxlib
import numpy as np

from dd_jax.allocator import command_line_args
from dd_jax.errors import ConfigError, DDJaxError
from dd_jax.runs import machine_info as run_machine_info
from experiments.run import apply_overrides, named_config, parse_args, parse_value


def run_main(main: Callable[[list[str]], Any], usage: str, argv: list[str] | None = None) -> int:
    """A benchmark's command line: ``main(argv)``, or `usage` on --help / -h; bad input (a
    `DDJaxError`: an unknown experiment or flag, a value of the wrong type) is printed as one
    line on stderr with exit status 2 instead of a traceback. Returns the exit status."""
    argv = command_line_args(argv)
    if "--help" in argv or "-h" in argv:
        print(usage)
        return 0
    try:
        main(argv)
    except DDJaxError as e:
        print(f"error: {e}\n(--help shows the benchmark's flags)", file=sys.stderr)
        return 2
    return 0


def machine_info() -> dict:
    """A run's `dd_jax.runs.machine_info` (platform, devices, jax) plus the Python and
    jaxlib versions, CPU count and load average."""
    return {**run_machine_info(), "python": platform.python_version(),
            "jaxlib": jaxlib.__version__, "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def time_steps(step: Callable[[Any, int], tuple[Any, Any]], carry: Any, iterations: int,
               warmup: int = 3, budget_s: float = math.inf) -> dict:
    """Wall seconds of ``carry, out = step(carry, it)`` (waiting for `out`), after `warmup`
    untimed calls (compilation): median and quartiles over `iterations` calls, or over those
    that fit in `budget_s` seconds (at least one). Also returns the final carry ('carry')."""
    times: list[float] = []
    for it in range(warmup + iterations):
        t = time.perf_counter()
        carry, out = step(carry, it)
        jax.block_until_ready(out)
        if it >= warmup:
            times.append(time.perf_counter() - t)
            if sum(times) >= budget_s:
                break
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return {"median_s": float(med), "q1_s": float(q1), "q3_s": float(q3),
            "iterations": len(times), "carry": carry}


def parse_flags(
    argv: list[str], own: dict[str, Any], max_names: int | None = None,
) -> tuple[list[str], dict[str, Any], dict[str, str]]:
    """argv -> (experiment names, the benchmark's `own` flags converted to their defaults'
    types, the remaining --field=value overrides for the experiment configs); ConfigError
    for more than `max_names` names (None: any number)."""
    names = [a for a in argv if not a.startswith("--")]
    if max_names is not None and len(names) > max_names:
        takes = f"at most {max_names} name" if max_names else "only --flag=value arguments"
        raise ConfigError(f"unexpected argument {names[max_names]!r}: this benchmark takes "
                          f"{takes}")
    _, overrides, switches = parse_args([a for a in argv if a.startswith("--")])
    if switches:
        raise ConfigError(f"--{sorted(switches)[0]} is an experiments.run switch, not a "
                          "benchmark flag; drop it")
    flags = {k: parse_value(k, overrides.pop(k), v) if k in overrides else v for k, v in own.items()}
    return names, flags, overrides


def number_list(flag: str, text: str, kind: type = int) -> list:
    """'30,100,300' -> [30, 100, 300]: a comma-separated flag value as numbers of `kind`."""
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--{flag}={text!r}: expected a comma-separated list of "
                          f"{kind.__name__}s") from None


def experiment_config(name: str, overrides: dict[str, str]):
    """The named experiment's config with --field=value overrides."""
    return apply_overrides(named_config(name), overrides)


def machine_line(machine: dict) -> str:
    """One line naming the machine and versions, to print under a table."""
    return (f"machine: {machine['platform']}, {machine['cpu_count']} CPUs "
            f"(load {machine['load_avg_1m']}), devices {', '.join(machine['devices'])}; "
            f"python {machine['python']}, jax {machine['jax']}, jaxlib {machine['jaxlib']}, "
            f"malloc {machine.get('malloc', 'system')}")
