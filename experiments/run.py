"""Run a named experiment of the paper: `python -m experiments.run NAME [flags]`, or `dd-jax`.

Every config field is a flag (`--help` lists them with their defaults and meanings). Results go
to runs/NAME/ unless --output_dir is given.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dd_jax.allocator import command_line_args
from dd_jax.config import SECTIONS, Sections, check_known, default_config
from dd_jax.errors import ConfigError, DDJaxError, did_you_mean
from dd_jax.linear import LINEAR_SECTIONS
from experiments.configs import EXPERIMENTS

# Fields that shape the checkpointed state or its random streams: fixed for a run's lifetime.
RUN_IDENTITY = ("dataset", "data_dir", "train_subset", "model", "init_regime", "init_dist",
                "init_gain", "steps", "epochs", "images_per_class", "n_nets", "real_batch_size",
                "seed", "step_size_init", "image_init_scale", "pool_path", "pool_source",
                "pool_eval_nets", "val_size", "learn_labels", "images_per_step", "inner_lr", "window")
USAGE = ("usage: python -m experiments.run (or dd-jax) NAME [--FIELD VALUE | --FIELD=VALUE | --FLAG | "
         "--no-FLAG ...] [--resume] [--quiet] [--distributed] | --list | [NAME] --help")
SWITCHES = {
    "list": "the named experiments, each with its whole description",
    "resume": "continue the run in the output directory from its last checkpoint, with the "
              "run's saved config (flags given with it override)",
    "quiet": "no progress bar",
    "distributed": "join a multi-host run (jax.distributed.initialize; see "
                   "dd_jax.sharding.init_distributed); never needed on one host",
    "help": "this text (-h); after NAME, with NAME's values as the defaults",
}
# True/false fields: set by a bare --FLAG or --no-FLAG (or --FLAG=VALUE), never by a separate VALUE.
BOOLEANS = frozenset(f.name for sections in (SECTIONS, LINEAR_SECTIONS)
                     for fields in sections.values() for f in fields if isinstance(f.default, bool))


def parse_value(field: str, text: str | None, default):
    """The flag text converted to the type of the field's default (None: a flag given no value)."""
    if text is None:
        raise ConfigError(f"flag --{field} needs a value: --{field}=VALUE")
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


def apply_overrides(config, overrides: dict[str, str | None]):
    """Sets each --field=value on `config`; unknown fields are an error naming near matches."""
    check_known(config, overrides, as_flags=True)
    for field, text in overrides.items():
        config[field] = parse_value(field, text, config[field])
    return config


def parse_args(argv: list[str]) -> tuple[str, dict[str, str | None], set[str]]:
    """argv -> (experiment name, {field: text, or None if given no value}, switches such as
    'resume'). `--field value`, `--field=value`, and for BOOLEANS `--field` and `--no-field`."""
    name, overrides, switches = None, {}, set()
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "-h" or (arg.startswith("--") and arg[2:] in SWITCHES):
            switches.add("help" if arg == "-h" else arg[2:])
        elif arg.startswith("--no-") and arg[5:] in BOOLEANS:
            overrides[arg[5:]] = "false"
        elif arg.startswith("--"):
            field, eq, text = arg[2:].partition("=")
            if eq:
                overrides[field] = text
            elif field in BOOLEANS:
                overrides[field] = "true"
            else:
                overrides[field] = rest.pop(0) if rest and not rest[0].startswith("--") else None
        elif name is None:
            name = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}; {USAGE}")
    return name, overrides, switches


def named_config(name: str):
    """A fresh copy of the named experiment's ConfigDict; ConfigError with the near matches
    and the names if there is none."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}{did_you_mean(name, EXPERIMENTS)}; "
                          f"valid names: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]()


def resolve_config(name: str, overrides: dict[str, str | None], resume: bool):
    """The experiment's config with overrides; on --resume, the saved run's config instead."""
    config = apply_overrides(named_config(name), overrides)
    workdir = Path(config.output_dir or f"runs/{name}")
    saved = workdir / "config.json"
    if resume and saved.exists():
        stored = json.loads(saved.read_text())
        stored.pop("experiment", None)
        for field in RUN_IDENTITY:
            if field in overrides and config[field] != stored.get(field, config[field]):
                raise ConfigError(
                    f"--{field} cannot change on --resume (the run in {workdir} has "
                    f"{field}={stored.get(field)!r}); drop the flag, or start a new run with "
                    "--output_dir=DIR"
                )
        config = named_config(name)
        config.update(stored)
        config = apply_overrides(config, overrides)
    return config, Path(config.output_dir or workdir)


def sections_of(config) -> Sections:
    """The documented fields of `config`'s kind."""
    return LINEAR_SECTIONS if config.get("kind") == "linear" else SECTIONS


def flag_text(name: str, value) -> str:
    """'--name=value' as it would be typed, with '' for an empty value."""
    text = str(value).lower() if isinstance(value, bool) else str(value) or "''"
    return f"--{name}={text}"


def help_text(name: str | None) -> str:
    """Usage, switches and every config flag with its default and meaning: default_config()'s,
    or with `name` the experiment's description and its values."""
    config = named_config(name) if name else default_config()
    intro = (" ".join(EXPERIMENTS[name].__doc__.split()) if name else
             "Runs a named experiment (--list names them) into runs/NAME/.")
    lines = [USAGE, "", intro, "", "switches:"]
    lines += [f"  --{s:<12} {doc}" for s, doc in SWITCHES.items()]
    lines += ["", f"config fields, as --FIELD=DEFAULT{f' for {name}' if name else ''} (any of "
              "them --FIELD VALUE; true/false fields also --FIELD, --no-FIELD):"]
    for title, fields in sections_of(config).items():
        lines += ["", f"{title}:"]
        lines += [f"  {flag_text(f.name, config[f.name]):<32} {f.doc}" for f in fields
                  if f.name in config]
    return "\n".join(lines)


def list_text() -> str:
    """One line per named experiment: its name and whole description."""
    return "\n".join(f"{n:28s} {' '.join(fn.__doc__.split())}" for n, fn in EXPERIMENTS.items())


def main(argv: list[str] | None = None) -> int:
    argv = command_line_args(argv)
    try:
        name, overrides, switches = parse_args(argv)
        if "help" in switches:
            print(help_text(name))
            return 0
        if "list" in switches:
            print(list_text())
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
    except BrokenPipeError:  # stdout piped into a reader that stopped early, e.g. `| head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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
