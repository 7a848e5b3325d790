"""Settings for the three scripts: defaults, --key=value flags, config files, value checks, --help.

One grammar everywhere. A script hands `parse` its defaults (name -> value), a help line per
key and a table of checks; `parse` starts from the defaults, runs each config file in order
(train.py only), then applies each --key=value flag, and checks every value before any work
starts. A mistake stops with one line naming the flag or file:line, the value and what is
valid, raised as UserError, which the scripts print without a traceback:

    settings = flags.parse(sys.argv[1:], DEFAULTS, HELP, CHECKS, program="sample.py")

Flag values are read by the type of the default: text for strings; true/false (also 1/0,
yes/no) for booleans, and a bare --key for true; 1e6, 1_000_000 or 1000000 for integers; any number for floats;
comma-separated items for tuples.
"""
import ast
import builtins
import difflib
import math
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a value): printed as one line, no traceback."""


# ----------------------------------------------------------------------------- checks
# A check takes a value and returns None when it is valid, else what a valid value is.

def at_least(low):
    return lambda value: None if value >= low else f"at least {low}"


def above(low):
    return lambda value: None if value > low else f"greater than {low}"


def below(high):
    return lambda value: None if value < high else f"below {high}"


def between(low, high):
    """low <= value <= high."""
    return lambda value: None if low <= value <= high else f"between {low} and {high}"


def fraction(value):
    """Strictly between 0 and 1."""
    return None if 0 < value < 1 else "a fraction strictly between 0 and 1"


def one_of(*choices):
    return lambda value: None if value in choices else f"one of {', '.join(map(str, choices))}"


def matches(pattern, what):
    return lambda value: None if re.fullmatch(pattern, value) else what


def finite(value):
    return None if math.isfinite(value) else "a finite number"


def all_of(*checks):
    def check(value):
        return next((problem for problem in (c(value) for c in checks) if problem), None)
    return check


# ----------------------------------------------------------------------------- parsing
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def closest(key, known):
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def flag_value(key, text, default):
    """A flag's text read as the type of the key's default."""
    kind = type(default)
    if kind is str:
        return text
    if kind is tuple:
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        if not items:
            raise UserError(f"--{key}={text}: expected a comma-separated list")
        return items
    if kind is bool:
        if text.lower() not in BOOLEANS:
            raise UserError(f"--{key}={text}: expected true or false")
        return BOOLEANS[text.lower()]
    try:
        number = float(text)  # 1e6, 1_000_000, 3, 0.5
    except ValueError:
        number = None
    if number is None or (kind is int and not number.is_integer()):
        raise UserError(f"--{key}={text}: expected {'an integer' if kind is int else 'a number'}, "
                        f"like the default {default!r}")
    return int(number) if kind is int else number


def typed_value(key, value, default, source):
    """A value from a config file, checked against the type of the key's default."""
    if type(default) is float and type(value) is int:
        return float(value)
    if type(default) is tuple and type(value) is list:
        return tuple(value)
    if type(value) is not type(default):
        raise UserError(f"{source}: {key} expects {type(default).__name__}, "
                        f"got {type(value).__name__} {value!r}")
    return value


def run_config_file(path, settings):
    """Run a config file with the current settings in scope; return the keys it assigned.
    A file that is missing or fails to run is reported as file:line and the error."""
    assigned = {}
    for key, value in config_file_values(path, settings).items():
        if key not in settings:
            raise UserError(f"{path}: unknown key {key!r}{closest(key, settings)}")
        if value is not settings[key]:
            assigned[key] = typed_value(key, value, settings[key], path)
    return assigned


def config_file_values(path, settings=None):
    """Every name a config file leaves set, run with settings in scope (none by default: how
    bench.py reads the rates of its recipes from config/ without train.py's defaults), less
    __builtins__, imported modules and helper functions."""
    if not Path(path).is_file():
        raise UserError(f"config file {path!r} not found (flags are written --key=value)")
    namespace = {**(settings or {}), "__file__": str(path)}  # a config may run a sibling: config/chat_demo.py
    try:
        # builtins.compile: train.py has a key named `compile`
        exec(builtins.compile(Path(path).read_text(), path, "exec"), namespace)
    except SyntaxError as error:
        raise UserError(f"{path}:{error.lineno}: syntax error: {error.msg}") from None
    except Exception as error:
        frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == path]
        line = frames[-1].lineno if frames else "?"
        raise UserError(f"{path}:{line}: {type(error).__name__}: {error}") from None
    return {key: value for key, value in namespace.items()
            if not (key.startswith("_") or isinstance(value, ModuleType) or callable(value))}


def check_values(settings, checks, source):
    """Every checked key's value is valid, or a UserError names where it was set (a flag or a
    config file), the key, the value and what is valid."""
    for key, check in checks.items():
        problem = check(settings[key])
        if problem:
            value = settings[key]
            shown = ",".join(value) if isinstance(value, tuple) else value
            where = source.get(key, "flag")
            named = f"--{key}={shown}" if where == "flag" else f"{where}: {key}={value!r}"
            raise UserError(f"{named}: expected {problem}")


def parse(argv, defaults, helps, checks, *, program, config_files=False, relations=(), given=None):
    """Settings from argv (see the module docstring). `relations` are functions of the whole
    settings dict that return a message when keys disagree (n_embd and n_head, say). given, a
    set, receives the keys a config file or a flag set (train.py leaves some to the data)."""
    settings, source = dict(defaults), {}
    for argument in argv:
        if argument in ("-h", "--help"):
            print(help_text(program, defaults, helps, config_files))
            raise SystemExit(0)
        if argument.startswith("--"):
            key, equals, text = argument[2:].partition("=")
            if key not in defaults:
                raise UserError(f"unknown flag --{key}{closest(key, defaults)} (see --help)")
            if not equals and type(defaults[key]) is not bool:
                raise UserError(f"{argument}: flags are written --key=value (see --help)")
            settings[key], source[key] = flag_value(key, text, defaults[key]) if equals else True, "flag"
        elif config_files:
            assigned = run_config_file(argument, settings)
            settings.update(assigned)
            source.update(dict.fromkeys(assigned, argument))
        else:
            raise UserError(f"expected --key=value, got {argument!r} (see --help)")
    check_values(settings, checks, source)
    if given is not None:
        given.update(source)
    for relation in relations:
        problem = relation(settings)
        if problem:
            raise UserError(problem)
    return settings


def run_script(work, argv, defaults, helps, checks, *, program):
    """A script's main: work(the settings parse reads from argv). A UserError is printed as one
    line on stderr and gives exit status 1; else 0."""
    try:
        work(parse(argv, defaults, helps, checks, program=program))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def help_text(program, defaults, helps, config_files):
    config = " [config/file.py ...]" if config_files else ""
    lines = [f"usage: python {program}{config} [--key=value ...]"]
    if config_files:
        lines.append("Config files run first, in order, then the flags.")
    lines += ["", "Keys, defaults and what they do:"]
    for key, default in defaults.items():
        shown = ",".join(default) if isinstance(default, tuple) else default
        lines += [f"  --{key}={shown}", f"      {helps[key]}"]
    return "\n".join(lines)


def comments_of(path):
    """The comment beside each `name = value  # comment` line of a file: the help of
    scripts whose defaults are module globals."""
    return dict(re.findall(r"^(\w+) = .*?  # (.*)$", Path(path).read_text(), re.MULTILINE))


def defaults_of(path):
    """The defaults of a script whose defaults are module globals assigned literals (train.py's),
    read from its text without running it, as comments_of reads their help (no script imports
    another): name -> value."""
    tree = ast.parse(Path(path).read_text())
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:  # not a literal: computed, so not a default
                pass
    return {name: value for name, value in defaults.items() if name.islower() and not name.startswith("_")}
