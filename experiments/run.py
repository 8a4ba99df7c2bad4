"""Run a named experiment of the paper.

    python -m experiments.run --list
    python -m experiments.run mnist_fixed_init [--field=value ...] [--resume] [--quiet]
                                               [--distributed]

Any config field (see experiments/configs.py) can be overridden with --field=value.
Results go to runs/<name>/ unless --output_dir is given. --distributed joins a multi-host run
(jax.distributed.initialize; see dd_jax.sharding.init_distributed) - never needed on one host.
"""
from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

from dd_jax.errors import ConfigError, DDJaxError
from experiments.configs import EXPERIMENTS

# Fields that shape the checkpointed state or its random streams: fixed for a run's lifetime.
RUN_IDENTITY = ("dataset", "data_dir", "train_subset", "model", "init_regime", "init_dist",
                "init_gain", "steps", "epochs", "images_per_class", "n_nets", "real_batch_size",
                "seed", "step_size_init", "pool_path", "pool_source", "pool_eval_nets", "val_size",
                "learn_labels", "images_per_step", "inner_lr", "window")
USAGE = ("usage: python -m experiments.run NAME [--field=value ...] [--resume] [--quiet] "
         "[--distributed] | --list")


def parse_value(field: str, text: str, default):
    """The flag text converted to the type of the field's default."""
    try:
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return type(default)(text)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(default), "text")
        raise ConfigError(f"--{field}={text!r}: expected {kind} (default {default!r})") from None


def apply_overrides(config, overrides: dict[str, str]):
    """Sets each --field=value on `config`; unknown fields are an error naming near matches."""
    for field, text in overrides.items():
        if field not in config:
            near = difflib.get_close_matches(field, list(config.keys()), n=3)
            hint = f" (did you mean {', '.join('--' + n for n in near)}?)" if near else ""
            raise ConfigError(
                f"unknown flag --{field}{hint}; valid flags: "
                + ", ".join(f"--{k}" for k in config.keys())
            )
        config[field] = parse_value(field, text, config[field])
    return config


def parse_args(argv: list[str]) -> tuple[str, dict[str, str], set[str]]:
    """argv -> (experiment name, {field: text}, switches such as 'resume')."""
    name, overrides, switches = None, {}, set()
    for arg in argv:
        if arg in ("--list", "--resume", "--quiet", "--distributed", "--help", "-h"):
            switches.add(arg.lstrip("-"))
        elif arg.startswith("--"):
            field, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"flag {arg!r} needs a value: --{field}=VALUE")
            overrides[field] = text
        elif name is None:
            name = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}; {USAGE}")
    return name, overrides, switches


def named_config(name: str):
    """A fresh copy of the named experiment's ConfigDict; ConfigError listing the names if
    there is none."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; valid names: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]()


def resolve_config(name: str, overrides: dict[str, str], resume: bool):
    """The experiment's config with overrides; on --resume, the saved run's config instead."""
    config = named_config(name)
    workdir = Path(overrides.get("output_dir") or config.output_dir or f"runs/{name}")
    saved = workdir / "config.json"
    if resume and saved.exists():
        stored = json.loads(saved.read_text())
        stored.pop("experiment", None)
        config.update(stored)
        for field in RUN_IDENTITY:
            if field in overrides and parse_value(field, overrides[field], config[field]) != config[field]:
                raise ConfigError(
                    f"--{field} cannot change on --resume (the run in {workdir} has "
                    f"{field}={stored.get(field)!r}); drop the flag, or start a new run with "
                    "--output_dir=DIR"
                )
    config = apply_overrides(config, overrides)
    return config, Path(config.output_dir or workdir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        name, overrides, switches = parse_args(argv)
        if "help" in switches:
            print(__doc__)
            return 0
        if "list" in switches:
            for n, fn in EXPERIMENTS.items():
                print(f"{n:28s} {fn.__doc__.splitlines()[0]}")
            return 0
        if name is None:
            raise ConfigError(f"no experiment named; {USAGE}; valid names: {', '.join(EXPERIMENTS)}")
        config, workdir = resolve_config(name, overrides, "resume" in switches)
        if "distributed" in switches:
            from dd_jax.sharding import init_distributed

            init_distributed()
        from dd_jax.experiment import run

        results = run(config, workdir, name=name, resume="resume" in switches,
                      progress="quiet" not in switches)
    except DDJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command with --resume to continue from the last "
              "checkpoint", file=sys.stderr)
        return 130
    print(summary(name, results, workdir))
    return 0


def accuracy_text(r: dict) -> str:
    """'92.66%', or '75.26% +- 1.66 over 20 held-out inits' for several networks."""
    acc = f"{100 * r['test_acc']:.2f}%"
    if r["eval_nets"] > 1:
        acc += f" +- {100 * r['test_acc_std']:.2f} over {r['eval_nets']} held-out inits"
    return acc


def summary(name: str, results: dict, workdir: Path) -> str:
    """What the CLI prints after a run: one line, plus one per row of a run with "rows"."""
    if "summary" in results:  # runs whose figure is not a test accuracy (linear_analysis)
        return f"{name}: {results['summary']}; outputs in {workdir}/"
    if results.get("kind") == "pretrain_pool":
        return (f"{name}: {results['pool_size']} networks trained on {results['dataset']}, test "
                f"accuracy {accuracy_text(results)} ({results['test_examples']} test images, "
                f"{results['distill_seconds']:.0f} s training); pool in {results['pool_path']}")
    if "rows" not in results:
        return (f"{name}: test accuracy {100 * results['untrained_acc']:.2f}% -> "
                f"{accuracy_text(results)} ({results['test_examples']} test images, "
                f"{results['distill_seconds']:.0f} s distilling); outputs in {workdir}/")
    lines = [f"{name}: {len(results['rows'])} rows ({results.get('test_examples', '?')} test images, "
             f"{results['distill_seconds']:.0f} s); outputs in {workdir}/"]
    for r in results["rows"]:
        line = f"  {r['method']}: test accuracy {accuracy_text(r)}"
        if r.get("knn_acc") is not None:
            line += f", k-NN {100 * r['knn_acc']:.2f}%"
        if r.get("step_size") is not None:
            line += f", step size {r['step_size']:.4g}"
        lines.append(line)
    if "poison_class" in results:
        before, after = results["rows"][0], results["rows"][1]
        lines.append(
            f"poisoning: class {results['poison_class']} predicted as {results['poison_target']} "
            f"{100 * before['attack_success']:.2f}% -> {100 * after['attack_success']:.2f}%, "
            f"other classes' accuracy {100 * before['other_class_acc']:.2f}% -> "
            f"{100 * after['other_class_acc']:.2f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
