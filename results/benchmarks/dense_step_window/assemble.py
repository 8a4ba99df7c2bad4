"""speed.jsonl from the window: per config and version, the round with the median median_s,
labelled before/after, then the authors' algorithm's JSON lines (glibc, tcmalloc)."""
import json, statistics, sys
from pathlib import Path
W = Path(sys.argv[1]); out = Path(sys.argv[2])
lines = []
for label in ("before", "after"):
    rounds = {}
    for r in range(1, 4):
        for l in (W / f"{label}_{r}.txt").read_text().splitlines():
            if l.startswith("{"):
                d = json.loads(l); rounds.setdefault(d["experiment"], []).append(d)
    for exp, ds in rounds.items():
        ds = sorted(ds, key=lambda d: d["median_s"])
        d = dict(ds[len(ds) // 2]); d["label"] = label
        print(label, exp, [round(x["median_s"], 4) for x in rounds[exp]], "->", round(d["median_s"], 4))
        lines.append(d)
for e in ("mnist_fixed_init_paper", "mnist_fixed_init_100", "mnist_random_init"):
    for f in (f"torch_tcmalloc_{e}.txt",):
        for l in (W / f).read_text().splitlines():
            if l.startswith("{"):
                d = json.loads(l); lines.append(d); print(f, round(d["median_s"], 4), d["machine"].get("malloc"))
out.write_text("".join(json.dumps(d) + "\n" for d in lines))
