"""The README's figures, generated from the committed results (never typed).

    python -m experiments.readme [--check]

Rewrites each block of README.md between ``<!-- generated:NAME -->`` and
``<!-- end:NAME -->`` from the results it names (`BLOCKS`); --check only says whether the
README is up to date (exit 1 if not), as the tests do.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

from dd_jax.outputs import markdown_table

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HEADLINE = "mnist_fixed_init"


def committed_runs(results: Path, name: str, archived: str = "*") -> list[tuple[Path, dict]]:
    """(folder, config.json) of `name`'s canonical run and of its archived runs in folders
    `name`_`archived`, each holding results.json and made by experiment `name`."""
    runs = []
    for d in [results / name, *sorted((results / "archive").glob(f"{name}_{archived}"))]:
        if (d / "results.json").exists() and (d / "config.json").exists():
            config = json.loads((d / "config.json").read_text())
            if config.get("experiment") == name:
                runs.append((d, config))
    return runs


def headline_runs(results: Path) -> list[tuple[int, dict]]:
    """(seed, results.json) of the headline's canonical run and its archived seeds, by seed."""
    runs = {config["seed"]: json.loads((d / "results.json").read_text())
            for d, config in committed_runs(results, HEADLINE, "seed*")}
    return sorted(runs.items())


def headline_block(results: Path) -> str:
    """The headline command's figure on every seed run, and their mean."""
    runs = headline_runs(results)
    if not runs:
        return "No committed run of `mnist_fixed_init` yet.\n"
    rows = [[seed, f"{100 * r['test_acc']:.2f}%", f"{100 * r['untrained_acc']:.2f}%",
             f"{r['selected']['iteration']:,}" if "selected" in r else "last",
             f"{100 * r['selected']['val_acc']:.2f}%" if "selected" in r else "",
             f"{r['distill_seconds']:.0f} s"] for seed, r in runs]
    accs = [100 * r["test_acc"] for _, r in runs]
    mean = (f"Mean over seeds {', '.join(str(s) for s, _ in runs)}: **{statistics.mean(accs):.2f}%**"
            + (f" (std {statistics.stdev(accs):.2f})" if len(accs) > 1 else "")
            + "; the paper: 93.76%.")
    table = markdown_table(["seed", "test accuracy (10,000 images)", "untrained",
                            "iteration returned", "its holdout accuracy", "distilling"], rows)
    return f"{table}\n\n{mean}\n"


def paper_block(results: Path) -> str:
    """The reproduced table's rows: the paper's figure beside the measured one."""
    path = results / "paper" / "TABLE.json"
    if not path.exists():
        return "No committed run of `python -m experiments.reproduce` yet.\n"
    entries = json.loads(path.read_text())["rows"]
    rows = [[f"`{e['row']}`" + (f" ({e['method']})" if e["method"] else ""), e["paper"],
             e.get("measured") or e["status"], e.get("schedule", "")] for e in entries]
    return markdown_table(["row", "paper (%)", "measured (%)", "iterations x real batch"], rows) + "\n"


def speed_block(results: Path) -> str:
    """Seconds per outer iteration, dd-jax (its lines labelled 'after', and 'before': the commit
    before the last speed change) beside the authors' algorithm measured in the same window
    (`results/benchmarks/speed.jsonl`: `benchmarks.outer_step` and
    `benchmarks/torch_reference.py` JSON lines, the latter with glibc's malloc and with
    tcmalloc preloaded), and the floor: the counted FLOPs at the measured matmul peak."""
    lines = [json.loads(line) for line in (results / "benchmarks" / "speed.jsonl").read_text().splitlines()
             if line.strip()]
    authors = {(r["experiment"], r["machine"].get("malloc", "system")): r["median_s"]
               for r in lines if "implementation" in r}
    before = {r["experiment"]: r for r in lines if r.get("label") == "before"}
    seconds = lambda s: "" if s is None else f"{s:.3f}"

    def row(r: dict) -> list:
        theirs = [authors.get((r["experiment"], malloc)) for malloc in ("system", "tcmalloc")]
        fastest = min((t for t in theirs if t is not None), default=None)
        old = before.get(r["experiment"], {}).get("median_s")
        return [f"`{r['experiment']}`", r["T"], r["n_nets"], *map(seconds, theirs),
                seconds(old), f"{r['median_s']:.3f}",
                "" if fastest is None else f"{fastest / r['median_s']:.1f}x",
                f"{r['gflop_per_iteration'] / r['matmul_peak_gflops']:.3f}",
                f"{100 * r['share_of_peak']:.0f}%"]

    rows = [row(r) for r in lines if r.get("label", "after") == "after" and "implementation" not in r]
    commit = next((r["machine"]["git_commit"][:7] for r in before.values()), None)
    return markdown_table(["config", "T", "nets", "authors' algorithm (PyTorch), s",
                           "the same with tcmalloc, s",
                           f"dd-jax before ({commit}), s" if commit else "dd-jax before, s",
                           "dd-jax, s", "dd-jax ahead of the faster by", "floor, s",
                           "dd-jax, share of the matmul peak"], rows) + "\n"


# The experiments beyond the paper and what each is measured against.
BEYOND = (
    ("mnist_soft_labels", "over 96 (Sucholutsky & Schonlau); target >= 96.5"),
    ("mnist_soft_labels_5", "almost 92 (Sucholutsky & Schonlau); target >= 92.5"),
    ("mnist_random_init_soft", "target >= 90 (the paper's hard labels: 79.5 ± 8.1)"),
    ("mnist_truncated", "DC, 1 image per class: 91.7 (standard protocol)"),
    ("mnist_truncated_10", "DC, 10 images per class: 97.4 (standard protocol)"),
)
FULL_PASSES = 400
MNIST_TRAIN = 60_000  # the real images one pass over MNIST sees (the beyond experiments are MNIST)


def schedule_of(config: dict) -> str:
    """A run's length as its config gives it: 'full (400 passes)', 'N passes' or 'N iterations'."""
    if config["iterations"]:
        return f"{config['iterations']:,} iterations"
    return "full (400 passes)" if config["passes"] == FULL_PASSES else f"{config['passes']} passes"


def longest_run(results: Path, name: str) -> tuple[Path, dict, dict] | None:
    """(folder, config, results) of `name`'s canonical run, else of its archived run that saw
    the most real images; None if neither exists."""
    def rank(run: tuple[Path, dict]) -> tuple[bool, int]:
        d, config = run
        seen = (config["iterations"] * config["real_batch_size"] if config["iterations"]
                else config["passes"] * MNIST_TRAIN)
        return d == results / name, seen

    runs = committed_runs(results, name)
    if not runs:
        return None
    d, config = max(runs, key=rank)
    return d, config, json.loads((d / "results.json").read_text())


def accuracy(r: dict) -> str:
    """A results.json's or evaluation's test accuracy (%), with its spread over several nets
    and how many diverged."""
    acc = f"{100 * r['test_acc']:.2f}"
    if r["eval_nets"] > 1:
        acc += f" ± {100 * r['test_acc_std']:.2f} ({r['eval_nets']})"
    return acc + (f", {d} of {r['eval_nets']} diverged" if (d := r.get("diverged")) else "")


STANDARD_MODELS = ("lenet", "convnet")  # the standard-protocol columns of the beyond block


def beyond_block(results: Path) -> str:
    """Learned labels and truncated unrolls: each experiment's canonical run, else its longest
    archived one, beside what it is measured against; its paper-protocol accuracy (results.json,
    or evaluate_paper_<model>.json beside it where that evaluated more networks) and the
    standard-protocol ones evaluated beside it (evaluate_standard_*.json)."""
    rows = []
    for name, against in BEYOND:
        run = longest_run(results, name)
        if run is None:
            rows.append([f"`{name}`", against, "not run yet", "", "", "", ""])
            continue
        d, config, r = run
        standard = [d / f"evaluate_standard_{m}.json" for m in STANDARD_MODELS]
        paper = d / f"evaluate_paper_{config['model']}.json"
        if paper.exists():
            r = max(r, json.loads(paper.read_text()), key=lambda e: e["eval_nets"])
        rows.append([f"`{name}`", against, accuracy(r),
                     *(accuracy(json.loads(f.read_text())) if f.exists() else "not run"
                       for f in standard),
                     schedule_of(config), f"`{d.relative_to(results.parent)}`"])
    return markdown_table(["experiment", "measured against (%)", "paper protocol (%)",
                           "standard, LeNet (%)", "standard, ConvNet-3 (%)", "schedule", "run"],
                          rows) + "\n"


BLOCKS = {"headline": headline_block, "paper": paper_block, "speed": speed_block,
          "beyond": beyond_block}


def render(text: str, results: Path) -> str:
    """`text` with every generated block rewritten from `results`."""
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- end:{name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + make(results) + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = README.read_text()
    new = render(text, ROOT / "results")
    if "--check" in argv:
        if new != text:
            print("error: README.md's generated blocks are out of date; run "
                  "python -m experiments.readme", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
