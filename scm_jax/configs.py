"""The shape of an experiment config and its one loader (its checks: `config_checks.py`).

An experiment (`experiments/<dataset>.py`) defines `get_config(arg)` returning

    config.stage            a training stage's name | 'eval' | 'all' (config.pipeline in order)
    config.pipeline         the stages 'all' runs
    config.pipeline_workers optional (default 1): training stages 'all' may run side by side
    config.seed, .dry_run
    config.data / .model / .mesh / .eval
    config.<stage>          one section per training stage; its `objective` names a class of
                            `scm_jax.objectives`, which owns the section's schema and checks
                            (`objectives.section('scm', tangent='teacher', ...)`)

`load('experiments/digits.py:variant=tiny', ['scd.steps=10'])` is the one loader: the command
line, the tests, the benchmarks and the notebook all use it. `config_checks.validate(config)`
runs every check, of every stage the run will reach, before anything touches a workdir, and
raises ConfigError naming the key, the bad value and what was expected.
"""
import ast
import difflib
import importlib.util
import os

import ml_collections

from scm_jax.errors import ConfigError, MissingInputError

EVAL = "eval"
ALL = "all"
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


# --- Parsing values ----------------------------------------------------------------------------
def parse_value(text: str, current, key: str):
    """`text` as a value of the type of `current` (the entry's default): booleans accept
    true/false/1/0/yes/no/on/off, sequences a Python literal or comma-separated items."""
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config.{key} is a section, not a value: set one of its entries "
                          f"({', '.join(sorted(current.keys()))})")
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ConfigError(f"config.{key} = {text!r} is invalid: expected a boolean (true/false)")
    try:
        if isinstance(current, int):
            number = float(text)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"config.{key} = {text!r} is invalid: expected "
                          f"{'an integer' if isinstance(current, int) else 'a number'}") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = tuple(_literal_or_str(item) for item in text.split(",") if item.strip())
        return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return _literal_or_str(text)


def _literal_or_str(text: str):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_arg(arg: str | None, defaults: dict) -> ml_collections.ConfigDict:
    """Parses a config file's argument 'key=value,key=value' (e.g. 'variant=tiny,stage=scd')
    against known keys, each value typed like its default."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ConfigError(f"config argument {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if key not in defaults:
            raise ConfigError(f"unknown config argument {key!r}; expected one of "
                              f"{sorted(defaults)}")
        out[key] = value if defaults[key] is None else parse_value(value, defaults[key], key)
    return ml_collections.ConfigDict(out)


# --- Loading -----------------------------------------------------------------------------------
def load_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config(arg)` of 'path/to/experiment.py[:arg]' (a path relative to the current
    directory, as on the command line)."""
    file, _, arg = spec.partition(":")
    if not os.path.isfile(file):
        raise MissingInputError(f"no config file {file!r} (from --config={spec}); expected a "
                                f"path like experiments/digits.py")
    module_spec = importlib.util.spec_from_file_location(
        f"scm_experiment_{os.path.splitext(os.path.basename(file))[0]}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file} defines no get_config(arg)")
    return module.get_config(arg or None)


def _lookup(config, key: str):
    """(parent ConfigDict, leaf name) of the dotted `key`; ConfigError with a suggestion."""
    *path, leaf = key.split(".")
    node, where = config, "config"
    for part in path + [leaf]:
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key {key!r}: {where} is a value, not a section")
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = f"; did you mean {where}.{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}: {where} has no entry {part!r}{hint} "
                              f"(its entries: {', '.join(sorted(node.keys()))})")
        parent, node, where = node, node[part], f"{where}.{part}"
    return parent, leaf


def override(config, item: str) -> None:
    """Applies one 'a.b.c=value' override, the value typed like the entry it replaces."""
    key, sep, text = item.partition("=")
    if not sep:
        raise ConfigError(f"config override {item!r} is not of the form key=value")
    parent, leaf = _lookup(config, key.strip())
    with parent.unlocked():
        parent[leaf] = parse_value(text, parent[leaf], key.strip())


def split_overrides(argv) -> tuple:
    """(['key=value', ...], the other arguments) of a command line: every --config.<key>=<value>
    is a config override (--config.<key> alone means true)."""
    overrides, rest = [], []
    for arg in argv:
        if arg.startswith("--config."):
            key, sep, value = arg[len("--config."):].partition("=")
            overrides.append(f"{key}={value if sep else 'true'}")
        else:
            rest.append(arg)
    return overrides, rest


def load(spec: str, overrides=()) -> ml_collections.ConfigDict:
    """The config of 'experiments/<name>.py[:arg]' with 'key=value' overrides applied, locked
    against new keys (a misspelled key is an error, not a new entry)."""
    config = load_file(spec)
    for item in overrides:
        override(config, item)
    config.lock()
    return config


# --- Structure ---------------------------------------------------------------------------------
def training_stages(config) -> tuple:
    """Names of the config's training stages: the sections with an `objective` key."""
    return tuple(name for name, value in config.items()
                 if isinstance(value, ml_collections.ConfigDict) and "objective" in value)


def pipeline(config) -> tuple:
    """The stages config.stage runs, in order ('all': config.pipeline)."""
    return tuple(config.pipeline) if config.stage == ALL else (config.stage,)
