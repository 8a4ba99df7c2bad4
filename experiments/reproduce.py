"""The paper's table at the paper's protocol, one resumable command.

    python -m experiments.reproduce [--only NAME,...] [--out DIR] [--list] [--progress]
                                    [--field=value ...]

Runs every MNIST / scikit-learn-digits experiment of the paper (`ROWS`, in order) into
DIR/<row>/ (default results/paper): the full schedule (400 passes, or as many real images),
200 held-out initialisations for the random regimes, pools of 200 pretrained networks, the
full test set. Killed at any point and started again, it skips the finished rows and
continues the running one from its checkpoint. After every finished row it rewrites
DIR/TABLE.md and its twin DIR/TABLE.json, so the table on disk is always true of what ran.

Rows whose data is not prepared here (CIFAR-10, USPS, SVHN) are listed with the command
that prepares it and run once it is there. --field=value flags apply to every selected row
whose config has that field (for short trial runs; a full table takes none).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from dd_jax.allocator import command_line_args
from dd_jax.errors import ConfigError, DDJaxError, did_you_mean
from dd_jax.outputs import markdown_table, write_json
from dd_jax.runs import CONFIG, RESULTS, git_state
from experiments import run as cli
from experiments.paper import paper_result

USAGE = ("usage: python -m experiments.reproduce [--only NAME,...] [--out DIR] [--list] "
         "[--progress] [--field=value ...]")
DEFAULT_OUT = "results/paper"
PAPER_PASSES = 400  # passes over the training images of the authors' schedule
PAPER_EVAL_NETS = 200  # held-out initialisations of the paper's random-regime figures
PAPER_POOL = 200  # the paper's smallest pool of pretrained networks


@dataclasses.dataclass(frozen=True)
class Row:
    """One experiment of the table: `experiment` (a name in experiments/configs.py) run with
    `flags` (``{out}`` is the table's directory) into DIR/`name`.

    `paper` is the key of its figure in experiments/paper.py; `needs_data` a dataset
    (`dd_jax.load_dataset` name) that is not carried and must be prepared before it runs.
    """

    name: str
    experiment: str
    setting: str
    flags: tuple[str, ...] = ()
    paper: str = ""
    needs_data: str = ""

    def args(self, out: Path) -> list[str]:
        return [self.experiment, *(f.format(out=out) for f in self.flags)]

    @property
    def needs_rows(self) -> list[str]:
        """The rows whose outputs this row reads (named as ``{out}/<row>/`` in its flags)."""
        return [r.name for r in ROWS if any(f"{{out}}/{r.name}/" in f for f in self.flags)]

    @property
    def files_read(self) -> list[str]:
        """This row's output files that other rows read (``{out}/<this row>/<file>`` in their
        flags), e.g. a pool's pool.npz."""
        prefix = f"{{out}}/{self.name}/"
        return sorted({f.split(prefix, 1)[1] for r in ROWS for f in r.flags if prefix in f})


_RANDOM = (f"--n_eval_nets={PAPER_EVAL_NETS}",)
_POOL = (f"--pool_size={PAPER_POOL}",)


def _adapt(source: str, target: str, regime: str) -> Row:
    """Adaptation `source` -> `target` from the row `<source>_pool`'s 200 networks: random
    pretrained trains on 100 of them and tests on the other 100; fixed pretrained uses one."""
    held_out = PAPER_POOL // 2
    flags = [f"--pool_path={{out}}/{source}_pool/pool.npz", f"--init_regime={regime}_pretrained"]
    if regime == "random":
        flags += [f"--pool_eval_nets={held_out}", f"--n_eval_nets={held_out}"]
    else:
        flags += ["--n_nets=1"]
    return Row(f"{source}_to_{target}_{regime}", f"{source}_to_{target}",
               f"{source} -> {target}, {regime} pretrained, 100 images", tuple(flags),
               paper=f"{source}_to_{target}_{regime}_pretrained",
               needs_data=next((d for d in (source, target) if d in ("usps", "svhn")), ""))


ROWS: tuple[Row, ...] = (
    Row("linear_analysis", "linear_analysis", "Sec. 3.3, linear model, M = 1..20 points"),
    Row("mnist_fixed_init", "mnist_fixed_init",
        "10 images, fixed init (this project's recipe: batch 256, holdout-selected)"),
    Row("mnist_fixed_init_paper", "mnist_fixed_init_paper",
        "10 images, fixed init (the authors' hyperparameters)", paper="mnist_fixed_init"),
    Row("mnist_fixed_init_100", "mnist_fixed_init_100", "100 images, fixed init"),
    Row("mnist_random_init", "mnist_random_init", "100 images, random init", _RANDOM),
    Row("mnist_baselines", "mnist_baselines", "Table 1 baselines, fixed init",
        ("--distilled={out}/mnist_fixed_init_100/distilled.npz",)),
    Row("mnist_baselines_random", "mnist_baselines_random", "Table 1 baselines, random init",
        (*_RANDOM, "--distilled={out}/mnist_random_init/distilled.npz")),
    Row("mnist_pool", "mnist_pool", "200 LeNets trained on MNIST (adaptation, poisoning)", _POOL),
    Row("digits_pool", "digits_pool", "200 LeNets trained on digits (adaptation)", _POOL),
    _adapt("digits", "mnist", "random"),
    _adapt("digits", "mnist", "fixed"),
    _adapt("mnist", "digits", "random"),
    _adapt("mnist", "digits", "fixed"),
    Row("mnist_poison", "mnist_poison", "poisoning, 10 images, class 0 -> 1",
        ("--pool_path={out}/mnist_pool/pool.npz", f"--pool_eval_nets={PAPER_POOL // 2}",
         f"--n_eval_nets={PAPER_POOL // 2}")),
    Row("usps_pool", "usps_pool", "200 LeNets trained on USPS", _POOL, needs_data="usps"),
    _adapt("usps", "mnist", "random"),
    _adapt("usps", "mnist", "fixed"),
    _adapt("mnist", "usps", "fixed"),
    Row("svhn_pool", "svhn_pool", "200 LeNets trained on SVHN", _POOL, needs_data="svhn"),
    _adapt("svhn", "mnist", "fixed"),
    Row("cifar10_fixed_init", "cifar10_fixed_init", "CIFAR-10, 100 images, fixed init",
        paper="cifar10_fixed_init_100", needs_data="cifar10"),
    Row("cifar10_random_init", "cifar10_random_init", "CIFAR-10, 100 images, random init",
        _RANDOM, needs_data="cifar10"),
)


def missing_data(name: str) -> str:
    """'' if the dataset `name` ('' for none) loads here, else why not and how to fix it."""
    if not name:
        return ""
    from dd_jax.data import load_dataset

    try:
        load_dataset(name)
    except DDJaxError as e:
        return str(e)
    return ""


def git_commit() -> str | None:
    """The short commit the rows ran from (`dd_jax.runs.git_state`), with '+' if the
    checkout had uncommitted changes; None outside git."""
    commit, dirty = git_state()
    return commit[:7] + ("+" if dirty else "") if commit else None


def row_state(row: Row, out: Path) -> str:
    """'done' (its results and every file other rows read from it), 'started' (a run directory
    without them) or 'new'."""
    workdir = out / row.name
    if all((workdir / f).exists() for f in (RESULTS, *row.files_read)):
        return "done"
    return "started" if (workdir / CONFIG).exists() else "new"


def run_row(row: Row, out: Path, overrides: list[str], progress: bool) -> None:
    """Runs (or continues from its checkpoint) one row as `python -m experiments.run` would."""
    from dd_jax.experiment import run

    workdir = out / row.name
    _, flags, _ = cli.parse_args([*row.args(out), *overrides, f"--output_dir={workdir}"])
    # only distillations keep a checkpoint; the other kinds start again in an emptied directory
    started = row_state(row, out) == "started"
    resume = started and cli.named_config(row.experiment).get("kind", "distill") == "distill"
    if started and not resume:
        shutil.rmtree(workdir)
    config, workdir = cli.resolve_config(row.experiment, flags, resume)
    results = run(config, workdir, name=row.experiment, resume=resume, progress=progress)
    print(cli.summary(row.experiment, results, workdir), flush=True)


def row_entries(row: Row, out: Path) -> list[dict]:
    """The table entries of one row: one per method of a finished run (its results.json,
    whether or not the files other rows read are still there: a clone has no pool.npz), or
    one saying why there is no figure yet."""
    workdir = out / row.name
    base = {"row": row.name, "experiment": row.experiment, "setting": row.setting}
    paper = paper_result(row.paper or row.experiment)
    if not (workdir / RESULTS).exists():
        missing = missing_data(row.needs_data)
        status = (f"needs data: {missing}" if missing else
                  "running or interrupted (rerun to continue)" if row_state(row, out) == "started"
                  else "not run yet")
        return [{**base, "method": "", "paper": paper.text() if paper else "", "status": status}]
    results = json.loads((workdir / RESULTS).read_text())
    stamp = json.loads((workdir / STAMP).read_text()) if (workdir / STAMP).exists() else {}
    machine = results.get("machine", {})
    common = {**base, "status": "done", "wall_s": results.get("distill_seconds"),
              "schedule": schedule_text(workdir), "commit": stamp.get("commit"),
              "machine": f"{machine.get('platform', '')}, {', '.join(machine.get('devices', []))}"}
    if "summary" in results:  # linear_analysis: no test accuracy
        return [{**common, "method": "", "paper": "M >= D", "measured": results["summary"]}]
    rows = results.get("rows") or [{"method": "distilled", **results}]
    entries = []
    for r in rows:
        method = r.get("method", "distilled")
        key = row.paper or row.experiment
        paper = paper_result(key, method) or (
            paper_result(key) if method in ("distilled", "after") else None)
        entries.append({**common, "method": method, "paper": paper.text() if paper else "",
                        "measured": measured_text(r), "acc": r.get("test_acc"),
                        "std": r.get("test_acc_std"), "nets": r.get("eval_nets")})
    return entries


def measured_text(r: dict) -> str:
    """'92.66' or '75.26 ± 1.66 (200 inits)', plus attack figures for a poisoning row."""
    if r.get("test_acc") is None:
        return ""
    text = f"{100 * r['test_acc']:.2f}"
    if r.get("eval_nets", 1) > 1:
        text += f" ± {100 * r['test_acc_std']:.2f} ({r['eval_nets']} inits)"
    if r.get("attack_success") is not None:
        text += f"; class attacked: {100 * r['attack_success']:.2f}% as target"
    return text


def schedule_text(workdir: Path) -> str:
    """Outer iterations done and the passes over the row's own training images they made, as a
    share of the authors' 400 passes."""
    config = json.loads((workdir / CONFIG).read_text())
    metrics = workdir / "metrics.jsonl"
    if not metrics.exists() or "real_batch_size" not in config:
        return ""
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    done = max((line.get("iteration", 0) for line in lines), default=0)
    passes = max((line.get("pass", 0) for line in lines), default=0)
    return (f"{done:,} x {config['real_batch_size']} ({100 * passes / PAPER_PASSES:.0f}% of the "
            f"paper's {PAPER_PASSES} passes)")


STAMP = "reproduce.json"  # per finished row: the commit that finished it


def write_table(out: Path) -> list[dict]:
    """Rewrites out/TABLE.md and out/TABLE.json, every row of ROWS as it stands on disk (whichever
    rows this invocation runs); returns the entries."""
    entries = [e for row in ROWS for e in row_entries(row, out)]
    write_json(out / "TABLE.json", {"rows": entries})
    lines = [[e["row"], e["setting"] + (f" - {e['method']}" if e["method"] else ""), e["paper"],
              e.get("measured", e["status"]), e.get("schedule", ""),
              f"{e['wall_s']:.0f} s" if e.get("wall_s") is not None else "",
              f"{e.get('machine', '')} {e.get('commit') or ''}".strip()] for e in entries]
    table = markdown_table(["row", "setting", "paper (%)", "measured (%)",
                            "iterations x real batch", "wall time", "machine, commit"], lines)
    (out / "TABLE.md").write_text(
        "# The paper's table, reproduced (`python -m experiments.reproduce`)\n\n" + table + "\n")
    return entries


def select_rows(only: str) -> list[Row]:
    """The rows named by --only (comma-separated), in table order; all rows for ''."""
    if not only:
        return list(ROWS)
    names = [n for n in only.split(",") if n]
    known = {r.name for r in ROWS}
    for n in names:
        if n not in known:
            raise ConfigError(f"--only: unknown row {n!r}{did_you_mean(n, known)}; --list names them")
    return [r for r in ROWS if r.name in names]


def row_overrides(row: Row, flags: dict[str, str]) -> list[str]:
    """The --field=value flags that apply to `row` (those its config has)."""
    config, _ = cli.resolve_config(row.experiment, {}, False)
    return [f"--{k}={v}" for k, v in flags.items() if k in config]


def parse(argv: list[str]) -> tuple[dict, dict[str, str]]:
    """argv -> ({'only', 'out', 'list', 'progress'}, {field: value} for the rows)."""
    options = {"only": "", "out": DEFAULT_OUT, "list": False, "progress": False}
    flags: dict[str, str] = {}
    args = iter(argv)
    for arg in args:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; {USAGE}")
        key, eq, value = arg[2:].partition("=")
        if key in ("list", "progress"):
            options[key] = True
        elif key in ("only", "out"):
            options[key] = value if eq else next(args, "")
            if not options[key]:
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
        elif eq:
            flags[key] = value
        else:
            raise ConfigError(f"flag {arg!r} needs a value: --{key}=VALUE")
    return options, flags


def check_flags(rows: list[Row], flags: dict[str, str]) -> None:
    """Every --field=value must be a field of some selected row's config."""
    fields = set()
    for row in rows:
        fields |= set(cli.resolve_config(row.experiment, {}, False)[0].keys())
    for key in flags:
        if key not in fields:
            raise ConfigError(f"unknown flag --{key}{did_you_mean(key, fields, '--')}; {USAGE}")


def reproduce(rows: list[Row], out: Path, flags: dict[str, str], progress: bool = False) -> list[dict]:
    """Runs the rows not yet done, in order, rewriting the table after each; returns the
    table's entries."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        run_rows(rows, out, flags, progress)
    finally:  # interrupted too: the table says which row was running
        entries = write_table(out)
    return entries


def run_rows(rows: list[Row], out: Path, flags: dict[str, str], progress: bool) -> None:
    """`reproduce`'s loop: each row not done, in order, and the table after each."""
    write_table(out)
    for row in rows:
        if row_state(row, out) == "done" or missing_data(row.needs_data):
            continue
        for need in row.needs_rows:
            if row_state(next(r for r in ROWS if r.name == need), out) != "done":
                raise ConfigError(f"row {row.name} reads the outputs of row {need}, which has not "
                                  f"finished in {out}; run it first (add it to --only)")
        print(f"reproduce: {row.name} ({row.setting})", flush=True)
        t0 = time.perf_counter()
        run_row(row, out, row_overrides(row, flags), progress)
        write_json(out / row.name / STAMP, {"commit": git_commit(),
                                             "last_session_s": time.perf_counter() - t0})
        write_table(out)


def main(argv: list[str] | None = None) -> int:
    argv = command_line_args(argv)
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        return 0
    try:
        options, flags = parse(argv)
        rows = select_rows(options["only"])
        if options["list"]:
            for row in rows:
                need = f" [needs {row.needs_data}]" if row.needs_data else ""
                print(f"{row.name:28s} {row.setting}{need}")
            return 0
        check_flags(rows, flags)
        out = Path(options["out"])
        reproduce(rows, out, flags, options["progress"])
    except DDJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue (finished rows are kept, the "
              "running one continues from its checkpoint)", file=sys.stderr)
        return 130
    print(f"table: {out / 'TABLE.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
