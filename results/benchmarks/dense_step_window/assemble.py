"""speed.jsonl from a window's files: per config and version, the round with the median
median_s (every before_R.txt / after_R.txt), labelled before / after, then the authors'
algorithm's JSON lines (glibc's malloc where torch_NAME.txt was run, tcmalloc).

    python results/benchmarks/dense_step_window/assemble.py WINDOW_DIR results/benchmarks/speed.jsonl
"""
import json
import sys
from pathlib import Path

CONFIGS = ("mnist_fixed_init_paper", "mnist_fixed_init_100", "mnist_random_init")


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def main(window: Path, out: Path) -> None:
    lines = []
    for label in ("before", "after"):
        rounds = {}
        for path in sorted(window.glob(f"{label}_*.txt")):
            for d in json_lines(path):
                rounds.setdefault(d["experiment"], []).append(d)
        for experiment, runs in rounds.items():
            median = dict(sorted(runs, key=lambda d: d["median_s"])[len(runs) // 2], label=label)
            print(label, experiment, [round(d["median_s"], 4) for d in runs], "->",
                  round(median["median_s"], 4))
            lines.append(median)
    for experiment in CONFIGS:
        for name in (f"torch_{experiment}.txt", f"torch_tcmalloc_{experiment}.txt"):
            for d in json_lines(window / name) if (window / name).exists() else []:
                print(experiment, "authors'", round(d["median_s"], 4), d["machine"].get("malloc"))
                lines.append(d)
    out.write_text("".join(json.dumps(d) + "\n" for d in lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
