"""Configuration: one typed dataclass per script, a config file, then command-line flags.

    python train.py configs/shakespeare.py --batch_size=32 --compile false

A config file is plain Python assignments, run on its own and read as a namespace (never
exec'd into a script's globals). Flags `--key=value` or `--key value` override it, wherever
they stand (nanoGPT's configurator let a file override the flags before it), coerced
to the field's type; a bool flag alone (`--compile`) means true. A `list[str]` field takes
a list in a config file, or the flag repeated (`--stop=A --stop=B`), which replaces the file's. Unknown keys, values of
the wrong type and settings the script's `problems()` rejects are all reported at once, in
one line, with the closest valid key. `--help` lists every key, its default and the comment
written beside it in the dataclass: a script's own keys first, then those it inherits.
"""
import dataclasses
import difflib
import inspect
import math
import os
import re
import runpy
import sys
import types
import typing
from pathlib import Path

from errors import UserError, quoted

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _field_types(cls) -> dict[str, type]:
    """Field name -> its plain type; `X | None` unwraps to X (None is then a valid value)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional(tp) -> tuple[type, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def coerce(key: str, value, tp):
    """Turn a string (from the command line) or a Python value (from a config file) into tp."""
    tp, nullable = _optional(tp)
    if typing.get_origin(tp) is list:  # a list from a config file, or the values of a repeated flag
        items = value if isinstance(value, (list, tuple)) else [value]
        return [coerce(key, item, typing.get_args(tp)[0]) for item in items]
    if value is None or (nullable and isinstance(value, str) and value.lower() in ("none", "null")):
        if nullable:
            return None
        raise ValueError(f"--{key} cannot be None")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"--{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"--{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())  # exact at any length: a float would round a 19-digit seed
            except ValueError:
                pass  # "5e3": below
        try:
            number = float(value)  # accepts "5e3", 5000.0
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"--{key} must be an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"--{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"--{key} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"--{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # our bug, not the user's


# nanoGPT's names that are spelled otherwise here, and its config files' counterparts
NANOGPT_KEYS = {"start": "prompt"}
NANOGPT_CONFIGS = {"train_shakespeare_char.py": "shakespeare.py"}


def _closest(key: str, names) -> str:
    if NANOGPT_KEYS.get(key) in names:
        return f" (nanoGPT's --{key} is --{NANOGPT_KEYS[key]} here)"
    match = difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)
    return f" (did you mean --{match[0]}?)" if match else ""


def _dataclass_mro(cls) -> list[type]:
    return [c for c in cls.__mro__ if dataclasses.is_dataclass(c)]


def field_comments(cls) -> dict[str, str]:
    """The `# comment` written after each field in the dataclass source, for --help. A subclass
    inherits its bases' comments (train.py's TrainConfig those of model.ModelOptions, bench.py's
    BenchConfig those of TrainConfig) and may write its own beside a field it redeclares."""
    comments = {}
    for klass in reversed(_dataclass_mro(cls)):
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2).strip()
    return comments


def help_order(cls) -> list[dataclasses.Field]:
    """cls's fields, the ones it adds first, then those of each base in turn: a script's own
    settings before the ones it shares (train.py's before the model's options)."""
    first_declared = {}  # field name -> the base-most class that declares it
    for klass in reversed(_dataclass_mro(cls)):
        for name in inspect.get_annotations(klass):
            first_declared.setdefault(name, klass)
    rank = {klass: i for i, klass in enumerate(_dataclass_mro(cls))}
    fields = dataclasses.fields(cls)
    return sorted(fields, key=lambda f: rank[first_declared[f.name]])  # stable: in order within a class


def help_text(cls, prog: str) -> str:
    comments = field_comments(cls)
    lines = [f"usage: python {prog} [config.py] [--key=value ...]", "", inspect.cleandoc(cls.__doc__ or ""), ""]
    for f in help_order(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        lines.append(f"  --{f.name}={default!r}".ljust(40) + f"  {comments.get(f.name, '')}")
    return "\n".join(lines)


def read_config_file(path: str) -> dict:
    """Run a config file on its own and return its plain assignments (no modules, functions, _names)."""
    p = Path(path)
    if not p.is_file():
        shipped = Path(__file__).resolve().parent / "configs"
        there = shipped / NANOGPT_CONFIGS.get(p.name, p.name)
        hint = (f"; did you mean {there}?" if there.is_file() and there.resolve() != p.resolve()
                else f"; the shipped ones are in {shipped}")
        raise UserError(f"config file {path} not found{hint}")
    try:
        namespace = runpy.run_path(str(p))
    except Exception as e:  # a typo in the user's file: show where, not our traceback
        where = f" line {e.lineno}" if isinstance(e, SyntaxError) else ""
        hint = ("; a Windows path in a Python string reads \\U, \\N, \\x... as escapes: write it with "
                "forward slashes ('C:/Users/me/runs') or as a raw string (r'C:\\Users\\me\\runs')"
                if isinstance(e, SyntaxError) and "unicode error" in str(e) else "")
        raise UserError(f"config file {path}{where} could not be read: {type(e).__name__}: {e}{hint}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


# settings that name a file or folder: a leading ~ is the home folder, as a shell would have it
PATH_SETTINGS = {"out_dir", "data_dir", "init_from", "input", "per_line", "dest", "models_dir", "output"}


def parse_config(cls, argv: list[str] | None = None, prog: str | None = None, check: bool = True):
    """Build cls from [config.py] [--key=value | --key value | --flag ...].

    Returns (config, explicit): explicit is the set of keys set by the file or the flags,
    so a script can tell a default from a choice (e.g. to refuse a conflicting resume).
    check=False leaves problems() to the caller, for settings that are completed later
    (a resumed run takes the rest of its settings from the checkpoint).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or Path(sys.argv[0]).name
    types_ = _field_types(cls)
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, prog))
        sys.exit(0)

    files: dict[str, object] = {}  # key -> value from config files, in their order
    file_of: dict[str, str] = {}  # key -> the config file that set it
    raw: dict[str, object] = {}  # key -> value from flags: they win over any file, wherever it stands
    repeated: dict[str, list] = {}  # list fields: the values of their flags so far
    errors: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if arg.endswith(".py"):
                settings = read_config_file(arg)
                foreign = [k for k in settings if k not in types_]
                if len(foreign) >= 3 and len(foreign) * 2 >= len(settings):  # most of it: another script's
                    hint = (f"; to use the model it trains, pass --out_dir={quoted(settings['out_dir'])} instead of the file"
                            if isinstance(settings.get("out_dir"), str) and "out_dir" in types_ else "")
                    raise UserError(f"{arg} is a config for another script: {len(foreign)} of its settings "
                                    f"({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}) are not "
                                    f"{prog}'s{hint}")
                files.update(settings)
                file_of.update(dict.fromkeys(settings, arg))
            elif Path(arg).suffix.lower() in (".yaml", ".yml", ".json", ".toml", ".cfg", ".ini"):
                errors.append(f"config files are Python files of `key = value` lines (configs/*.py), not "
                              f"{Path(arg).suffix[1:].upper()}: write {Path(arg).with_suffix('.py')} and pass that")
            else:
                errors.append(f"unexpected argument {arg!r}: settings are passed as --key=value")
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key == "config" and key not in types_:
            errors.append(f"a config file is passed without a flag, before the others: {prog} "
                          f"{value or 'configs/NAME.py'} --key=value ...")
            i += 1 if eq or i + 1 >= len(argv) or argv[i + 1].startswith("--") else 2
            continue
        if not eq:
            is_bool = key in types_ and _optional(types_[key])[0] is bool
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--") and not (is_bool and nxt.lower() not in _TRUE | _FALSE):
                value, i = nxt, i + 1
            elif is_bool:
                value = "true"
            else:
                errors.append(f"--{key} needs a value, e.g. --{key}=...")
                i += 1
                continue
        if key in types_ and typing.get_origin(_optional(types_[key])[0]) is list:
            value = repeated[key] = [*repeated.get(key, []), value]
        raw[key] = value
        i += 1

    values = {}
    for key, value in {**files, **raw}.items():
        if key not in types_:
            moved = getattr(cls, "MOVED", {}).get(key)  # a setting a script had and no longer has
            where = f" in {file_of[key]}" if key not in raw and key in file_of else ""
            errors.append(f"--{key} is gone: {moved}" if moved else
                          f"unknown setting {key!r}{where}{_closest(key, types_)}; see --help")
            continue
        try:
            values[key] = coerce(key, value, types_[key])
        except ValueError as e:
            errors.append(f"{e} (set in {file_of[key]})" if key not in raw and key in file_of else str(e))
    for key in PATH_SETTINGS & values.keys():  # --out_dir=~/runs: no shell expands a ~ after "=" (or in a file)
        if isinstance(values[key], str) and values[key].startswith("~"):
            values[key] = os.path.expanduser(values[key])
        if isinstance(values[key], str) and any(c < " " for c in values[key]):  # 'runs\new' in a config file
            errors.append(f"--{key}={values[key]!r} holds a control character (in a Python string, a "
                          f"Windows path's \\n, \\t or \\r is one): write the path with forward slashes or as a "
                          f"raw string, r'...'")
    config = cls(**values)  # keys that failed keep their defaults, so problems() still runs
    if check and hasattr(config, "problems"):
        errors.extend(config.problems())
    if errors:
        raise UserError("; ".join(errors))
    return config, Explicit(values, files=[k for k in files if k not in raw])


class Explicit(set):
    """The keys a config file or a flag set (parse_config); .from_file: those a config file set
    and no flag changed, so a message can say where a refused value came from."""

    def __init__(self, keys=(), files=()):
        super().__init__(keys)
        self.from_file = set(files) & self
