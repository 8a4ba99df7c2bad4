"""Gather finished runs into one markdown table, with the paper's numbers beside ours.

    python -m experiments.report [RUN_OR_RESULTS_DIR ...] [--out=FILE]

Every results.json found (recursively) under the given directories - by default runs/ and
results/ - is one finished run. A run's results.json gives one table line; one with "rows"
(e.g. a baselines run) gives one line per row. The paper's numbers come from experiments/paper.py.
After the table: markdown links to every distilled.png found, for the README.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dd_jax.errors import ConfigError, DDJaxError
from dd_jax.outputs import markdown_table
from experiments.paper import paper_result

DEFAULT_DIRS = ("runs", "results")
RESULTS = "results.json"
HEADER = ("experiment", "method", "dataset", "init", "images", "ours (%)", "eval nets",
          "paper (%)", "k-NN ours (%)", "k-NN paper (%)", "wall time", "run")
USAGE = "usage: python -m experiments.report [RUN_OR_RESULTS_DIR ...] [--out=FILE]"


def find_results(dirs: list[Path]) -> list[Path]:
    """Every results.json under `dirs` (a directory may itself be a run), sorted, no repeats."""
    found = set()
    for d in dirs:
        found.update(p.resolve() for p in d.rglob(RESULTS))
    return sorted(found)


def percent(acc: float | None, std: float | None = None, nets: int = 1) -> str:
    """0.9266 -> '92.66'; with several networks '75.26 ± 1.66'."""
    if acc is None:
        return ""
    text = f"{100 * acc:.2f}"
    return text + (f" ± {100 * std:.2f}" if nets > 1 and std is not None else "")


def table_lines(results: dict, run: str) -> list[tuple[str, ...]]:
    """One run's table lines: one per row of "rows", else one for the run itself."""
    experiment = results["experiment"]
    method = results.get("method", "distilled")
    if "selected" in results:  # --val_size: which iterate the run returned
        chosen = results["selected"]
        method += f" (iteration {chosen['iteration']}, best on {chosen['val_size']} held out)"
    rows = results.get("rows") or [{
        "method": method, "test_acc": results["test_acc"],
        "test_acc_std": results.get("test_acc_std"), "eval_nets": results.get("eval_nets", 1),
        "seconds": results.get("distill_seconds"), "knn_acc": results.get("knn_acc"),
    }]
    lines = []
    for row in rows:
        paper = paper_result(experiment, None if "rows" not in results else row["method"])
        nets = row.get("eval_nets", 1)
        seconds = row.get("seconds")
        if results.get("metric") == "excess_loss":  # not an accuracy: the value as it is
            ours = f"excess loss {row['test_acc']:.3g} ± {row['test_acc_std']:.2g}"
        else:
            ours = percent(row["test_acc"], row.get("test_acc_std"), nets)
        if "attack_success" in row:  # poisoning: what the attack achieved
            ours += (f"; class {results['poison_class']} as {results['poison_target']}: "
                     f"{percent(row['attack_success'], row.get('attack_success_std'), nets)}, "
                     f"other classes: {percent(row['other_class_acc'], row.get('other_class_acc_std'), nets)}")
        lines.append((
            experiment, row["method"], results.get("dataset", ""), results.get("init_regime", ""),
            str(results.get("images", "")), ours,
            str(nets), paper.text() if paper else "", percent(row.get("knn_acc")),
            paper.knn_text() if paper else "", f"{seconds:.0f} s" if seconds is not None else "",
            run,
        ))
    return lines


def relative(path: Path, base: Path) -> str:
    return os.path.relpath(path, base.resolve())


def report(dirs: list[Path], out: Path | None = None, warn=print) -> str:
    """The markdown report of every finished run under `dirs` (paths relative to out's folder)."""
    base = (out.parent if out is not None else Path.cwd())
    lines, images = [], []
    for path in find_results(dirs):
        try:
            results = json.loads(path.read_text())
            run_lines = table_lines(results, relative(path.parent, base))
        except (OSError, ValueError, KeyError, TypeError) as e:
            warn(f"warning: skipping {path}: {type(e).__name__}: {e}")
            continue
        lines.extend(run_lines)
        if (path.parent / "distilled.png").exists():
            images.append((f"{results['experiment']} ({path.parent.name})",
                           relative(path.parent / "distilled.png", base)))
    if not lines:
        where = ", ".join(map(str, dirs or DEFAULT_DIRS))
        raise ConfigError(f"no finished run (results.json) under {where}; "
                          "run an experiment first, or name run directories")
    lines.sort(key=lambda cells: (cells[0], cells[-1]))  # stable: a run's rows keep their order
    text = markdown_table(HEADER, lines)
    if images:
        text += "\n\nDistilled images:\n\n" + "\n".join(
            f"![{name}]({png})" for name, png in sorted(images))
    return text + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        dirs, out = [], None
        for arg in argv:
            if arg in ("-h", "--help"):
                print(__doc__)
                return 0
            if arg.startswith("--out="):
                out = Path(arg[len("--out="):])
            elif arg.startswith("-"):
                raise ConfigError(f"unknown flag {arg!r}; {USAGE}")
            elif not Path(arg).is_dir():
                raise ConfigError(f"{arg} is not a directory; {USAGE}")
            else:
                dirs.append(Path(arg))
        dirs = dirs or [Path(d) for d in DEFAULT_DIRS if Path(d).is_dir()]
        text = report(dirs, out, warn=lambda m: print(m, file=sys.stderr))
    except DDJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    if out is not None:
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
