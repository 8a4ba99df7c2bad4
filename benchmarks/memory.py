"""Peak memory of one outer meta-step vs the unroll length T, with and without remat.

    python -m benchmarks.memory [--T=30,100,300] [--max_run_gb=3] [--field=value ...]

The configuration is one where the inner loop's activations dominate: 100 distilled images per
step (images_per_class=10), steps=10 x epochs=T/10 (so the learned data stays the same size and
only the unroll grows), a small real batch (64), one fixed initialisation. Each (T, remat) runs
in a fresh process and reports two figures:

- XLA's compiled memory analysis of the jitted meta-step (temporary buffers; arguments and
  outputs, which do not depend on T);
- the process's peak resident memory during the meta-step's first execution, minus its
  resident memory just before (after imports, data loading, compilation and malloc_trim): the
  kernel's high-water mark (VmHWM) reset through /proc/self/clear_refs (Linux). Steps whose
  compiled temporary memory exceeds --max_run_gb are compiled but not executed.
  (ru_maxrss, the whole process's peak including compilation, is reported too.)
- on an accelerator (GPU), the device allocator's peak bytes in use after the step minus its
  bytes in use just before (`Device.memory_stats`). That peak cannot be reset, so it counts only
  if the step raised it above the peak before it (compilation's autotuning can set a higher one);
  otherwise the table gives "<= " the earlier peak above the bytes in use before the step.

Prints one JSON line per (T, remat), a markdown table, and the ratios T=max / T=min.

One named experiment's meta-step instead (its own T; --remat and --field=value still apply),
one JSON line: python -m benchmarks.memory --child=1 --experiment=NAME [--field=value ...]
"""
from __future__ import annotations

import ctypes
import gc
import json
import resource
import subprocess
import sys
from pathlib import Path

import jax

from benchmarks.common import experiment_config, machine_info, machine_line, number_list, parse_flags, run_main
from dd_jax.config import default_config
from dd_jax.outer_step import build_outer_loop
from dd_jax.outputs import markdown_table
from dd_jax.runs import load_data_and_model
from experiments.run import apply_overrides

MB = 2**20


def memory_config(T: int, remat: bool, overrides: dict[str, str] | None = None):
    """100 images per step, S=10 x E=T/10, real batch 64, fixed init; --field=value overrides."""
    c = default_config()
    c.update(dict(images_per_class=10, steps=10, epochs=max(1, T // 10), real_batch_size=64,
                  train_subset=4096, test_subset=100, remat=remat))
    return apply_overrides(c, overrides or {})


def _proc_status_kb(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's resident high-water mark (Linux); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Python garbage, then glibc's free heap pages (compilation's leftovers) back to the OS, so
    that the step's buffers cannot hide in memory that is already resident."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _device_memory() -> dict | None:
    """The default device's allocator statistics (bytes), or None where it keeps none (CPU)."""
    return jax.local_devices()[0].memory_stats()


def measure(dataset, model_fn, config, max_run_bytes: float = float("inf")) -> dict:
    """Compiles one outer meta-step of (dataset, model_fn, config) and reads XLA's memory
    analysis; then, if its temporary memory is at most `max_run_bytes`, runs it once (its first
    execution, so no buffer of an earlier one is reused) and measures the peak resident memory
    above the resident memory just before. Sizes in MiB."""
    loop = build_outer_loop(dataset, model_fn, config)
    args = loop.step_args(loop.state, 0)
    compiled = loop.compiled_step()
    analysis = compiled.memory_analysis()
    row = {
        "T": config.steps * config.epochs, "remat": bool(config.remat),
        "xla_temp_mb": analysis.temp_size_in_bytes / MB,
        "xla_argument_mb": analysis.argument_size_in_bytes / MB,
        "xla_output_mb": analysis.output_size_in_bytes / MB,
        "xla_alias_mb": analysis.alias_size_in_bytes / MB,
    }
    if analysis.temp_size_in_bytes > max_run_bytes:
        return {**row, "executed": False, "rss_peak_delta_mb": None}
    _release_free_heap()
    device_before = _device_memory()
    before_kb = _proc_status_kb("VmRSS")
    reset = _reset_peak_rss()
    state, loss = compiled(*args)
    jax.block_until_ready((state, loss))
    peak_kb = _proc_status_kb("VmHWM")
    if device_before is not None:
        peak = _device_memory()["peak_bytes_in_use"]
        row.update({
            "device_in_use_before_mb": device_before["bytes_in_use"] / MB,
            "device_peak_before_mb": device_before["peak_bytes_in_use"] / MB,
            "device_peak_delta_mb": (peak - device_before["bytes_in_use"]) / MB,
            "device_peak_raised": peak > device_before["peak_bytes_in_use"],
        })
    return {
        **row, "executed": True,
        "rss_before_mb": None if before_kb is None else before_kb / 1024,
        "rss_peak_delta_mb": (peak_kb - before_kb) / 1024 if reset and peak_kb and before_kb else None,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "meta_loss": float(loss),
    }


def _child(argv: list[str]) -> None:
    _, flags, overrides = parse_flags(
        argv, {"child": True, "T": 30, "remat": False, "max_run_gb": 3.0, "experiment": ""})
    if flags["experiment"]:
        config = experiment_config(flags["experiment"], {**overrides, "remat": str(flags["remat"])})
    else:
        config = memory_config(flags["T"], flags["remat"], overrides)
    print(json.dumps(measure(*load_data_and_model(config), config, flags["max_run_gb"] * 2**30)))


def main(argv: list[str]) -> None:
    if "--child=1" in argv:
        return _child(argv)
    _, flags, overrides = parse_flags(argv, {"T": "30,100,300", "max_run_gb": 3.0}, max_names=0)
    machine = machine_info()
    extra = [f"--{k}={v}" for k, v in overrides.items()]
    rows = []
    for T in number_list("T", flags["T"]):
        for remat in (False, True):
            cmd = [sys.executable, "-m", "benchmarks.memory", "--child=1", f"--T={T}",
                   f"--remat={remat}", f"--max_run_gb={flags['max_run_gb']}", *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"T={T} remat={remat} failed:\n{proc.stderr[-3000:]}")
            row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "machine": machine}
            print(json.dumps(row), flush=True)
            rows.append(row)
    fmt = lambda v: "not run" if v is None else f"{v:.1f}"
    device = any("device_peak_delta_mb" in r for r in rows)
    device_peak = lambda r: ("not run" if "device_peak_delta_mb" not in r else
                             ("" if r["device_peak_raised"] else "<= ") + fmt(r["device_peak_delta_mb"]))
    print()
    print(markdown_table(
        ["T", "remat", "XLA temp MiB", "XLA args MiB", "peak RSS above start MiB"]
        + (["device peak above start MiB"] if device else []),
        [[r["T"], r["remat"], fmt(r["xla_temp_mb"]), fmt(r["xla_argument_mb"]),
          fmt(r["rss_peak_delta_mb"])] + ([device_peak(r)] if device else []) for r in rows]))
    for remat in (False, True):
        same = [r for r in rows if r["remat"] == remat]
        lo, hi = same[0], same[-1]
        ratio = lambda k: (f"{hi[k] / lo[k]:.2f}x" if hi.get(k) and lo.get(k) else "n/a")
        print(f"remat={remat}: T={hi['T']} / T={lo['T']}: XLA temp {ratio('xla_temp_mb')}, "
              f"peak RSS {ratio('rss_peak_delta_mb')}")
    print(machine_line(machine))


if __name__ == "__main__":
    sys.exit(run_main(main, __doc__))
