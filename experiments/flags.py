"""The command-line form of the small scripts (experiments.evaluate, experiments.cross_arch):
``--flag=VALUE`` or ``--flag VALUE`` over typed defaults, bare ``--switch``es, positionals."""
from __future__ import annotations

from dd_jax.errors import ConfigError


def parse_flags(argv: list[str], flags: dict[str, tuple], usage: str, switches: tuple[str, ...] = (),
                positionals: int = 0) -> tuple[list[str], dict, set[str]]:
    """argv -> (positionals, {flag: value}, switches given).

    flags: name -> (default, type); a value is converted with its type. switches: the bare
    flags allowed (``--augment``). positionals: how many plain arguments may come. Anything
    else is a ConfigError of one line naming it, with `usage`.
    """
    values = {name: default for name, (default, _) in flags.items()}
    plain, given, args = [], set(), list(argv)
    while args:
        arg = args.pop(0)
        name, eq, text = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if arg in ("-h", "--help") or (name in switches and not eq):
            given.add("help" if arg == "-h" else name)
        elif name in flags:
            if not eq:
                if not args:
                    raise ConfigError(f"flag --{name} needs a value: --{name}=VALUE")
                text = args.pop(0)
            kind = flags[name][1]
            try:
                values[name] = kind(text)
            except ValueError:
                raise ConfigError(f"--{name}={text!r}: expected {'an integer' if kind is int else kind.__name__}") from None
        elif name:
            raise ConfigError(f"unknown flag --{name}; {usage}")
        elif len(plain) < positionals:
            plain.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}; {usage}")
    return plain, values, given
