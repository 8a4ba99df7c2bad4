"""speed.jsonl from this window: per config and version, the round with the median median_s,
labelled before / after, then the authors' algorithm's JSON lines (tcmalloc).

    python results/benchmarks/dense_step_window/assemble.py results/benchmarks/dense_step_window \
        results/benchmarks/speed.jsonl
"""
import json
import sys
from pathlib import Path

ROUNDS = 3
CONFIGS = ("mnist_fixed_init_paper", "mnist_fixed_init_100", "mnist_random_init")


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def main(window: Path, out: Path) -> None:
    lines = []
    for label in ("before", "after"):
        rounds = {}
        for r in range(1, ROUNDS + 1):
            for d in json_lines(window / f"{label}_{r}.txt"):
                rounds.setdefault(d["experiment"], []).append(d)
        for experiment, runs in rounds.items():
            median = dict(sorted(runs, key=lambda d: d["median_s"])[len(runs) // 2], label=label)
            print(label, experiment, [round(d["median_s"], 4) for d in runs], "->",
                  round(median["median_s"], 4))
            lines.append(median)
    for experiment in CONFIGS:
        for d in json_lines(window / f"torch_tcmalloc_{experiment}.txt"):
            print(experiment, "authors'", round(d["median_s"], 4), d["machine"].get("malloc"))
            lines.append(d)
    out.write_text("".join(json.dumps(d) + "\n" for d in lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
