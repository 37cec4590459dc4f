"""Script options: plain globals at the head of each script, overridden by --name=value or --config=FILE.json.

Also the scripts' error contract: a DataError (bad input or options) is printed as one line with exit status 1.
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path



class DataError(Exception):
    """Bad or missing input data or options; scripts print the message as one line and exit 1."""


class OptionsError(DataError):
    """Unknown or unparsable command-line option."""


def _one_line_excepthook(exc_type, exc, tb):
    if issubclass(exc_type, DataError):
        print(f"error: {exc}", file=sys.stderr)
        return
    sys.__excepthook__(exc_type, exc, tb)



_OPTION_TYPES = (bool, int, float, str, list, tuple, type(None))


def _parse_value(text: str, default, name: str):
    """Parse a command-line string into the type of the option's default."""
    low = text.strip().lower()
    if isinstance(default, bool):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise OptionsError(f"--{name}={text}: expected true or false")
    if isinstance(default, (list, tuple)):
        if low in ("", "none", "[]"):
            return type(default)()
        if text.strip().startswith("["):
            try:
                items = ast.literal_eval(text)
            except (ValueError, SyntaxError) as err:
                raise OptionsError(f"--{name}={text}: not a valid list ({err})") from None
        else:
            items = [t.strip() for t in text.split(",") if t.strip()]
        if default:
            proto = default[0]
            items = [_parse_value(str(t), proto, name) if isinstance(t, str) else t for t in items]
        else:
            items = [_literal_or_str(t) if isinstance(t, str) else t for t in items]
        return type(default)(items)
    if default is None:
        return None if low == "none" else _literal_or_str(text)
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise OptionsError(f"--{name}={text}: expected {type(default).__name__}") from None
    return text


def _literal_or_str(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(value, default, name: str):
    """Coerce a config-file value (JSON) to the option's type."""
    if isinstance(value, str) and not isinstance(default, str):
        return _parse_value(value, default, name)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise OptionsError(f"{name}={value!r}: expected true or false")
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    return value


def apply_options(script_globals: dict, argv: list[str] | None = None) -> dict:
    """Override a script's option globals from --config=FILE.json and --name=value; return the options.

    The options are the script's plain-valued globals (bool/int/float/str/list/tuple/None) not
    starting with '_'. Unknown names are an error that lists the valid ones.
    """
    sys.excepthook = _one_line_excepthook
    argv = sys.argv[1:] if argv is None else argv
    names = [k for k, v in script_globals.items()
             if not k.startswith("_") and isinstance(v, _OPTION_TYPES)]
    defaults = {k: script_globals[k] for k in names}
    overrides: dict = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print("options (override with --name=value or --config=FILE.json):")
            for k in names:
                print(f"  --{k}={defaults[k]!r}")
            raise SystemExit(0)
        match = re.fullmatch(r"--([A-Za-z_][A-Za-z0-9_]*)=(.*)", arg, flags=re.S)
        if not match:
            raise OptionsError(f"argument {arg!r} is not of the form --name=value; valid names: "
                               + ", ".join(names))
        key, text = match.groups()
        if key == "config":
            for ck, cv in read_config(text, script_name(script_globals), defaults).items():
                overrides[ck] = _coerce(cv, defaults[ck], ck)
            continue
        if key not in defaults:
            raise OptionsError(f"unknown option --{key}; valid options: " + ", ".join(names))
        overrides[key] = _parse_value(text, defaults[key], key)
    script_globals.update(overrides)
    return {k: script_globals[k] for k in names}


def script_name(script_globals: dict) -> str:
    """The running script's file name (e.g. 'generate_results.py')."""
    return Path(script_globals.get("__file__") or sys.argv[0] or "").name


def read_config(path, script: str, defaults: dict) -> dict:
    """The option values a --config JSON file sets for `script`.

    A flat file {option: value} is for one script: every key must be one of its options. A file of sections
    {"all": {...}, "<script>.py": {...}} serves the whole pipeline: 'all' keys apply to every script that has
    such an option (each must be an option of some script here), a script's own section must hold only its options.
    """
    path = Path(path)
    if not path.is_file():
        raise OptionsError(f"--config={path}: file not found")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise OptionsError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise OptionsError(f"{path}: expected a JSON object of option names to values")
    sectioned = any(k == "all" or k.endswith(".py") for k in cfg)
    if not sectioned:
        unknown = [k for k in cfg if k not in defaults]
        if unknown:
            raise OptionsError(f"{path}: unknown option {unknown[0]!r}; valid options: " + ", ".join(defaults))
        return cfg
    here = Path(__file__).resolve().parent
    every_option = set()
    for section, values in cfg.items():
        if not isinstance(values, dict) or not (section == "all" or section.endswith(".py")):
            raise OptionsError(f"{path}: section {section!r} must be 'all' or a script name mapping options to values")
        if section.endswith(".py"):
            if not (here / section).is_file():
                raise OptionsError(f"{path}: section {section!r} names no script in {here}")
            known = defaults if section == script else script_defaults(here / section)
            unknown = [k for k in values if k not in known]
            if unknown:
                raise OptionsError(f"{path}: {section} has no option {unknown[0]!r}; valid: " + ", ".join(known))
    if cfg.get("all"):
        for script_file in here.glob("*.py"):
            every_option |= set(script_defaults(script_file))
        unknown = [k for k in cfg["all"] if k not in every_option]
        if unknown:
            raise OptionsError(f"{path}: 'all' sets {unknown[0]!r}, an option of no script here")
    chosen = {k: v for k, v in cfg.get("all", {}).items() if k in defaults}
    chosen.update(cfg.get(script, {}))
    return chosen


def script_defaults(script) -> dict:
    """The OPTIONS block of a script (its plain top-level assignments before the first import), not run."""
    tree = ast.parse(Path(script).read_text())
    defaults = {}
    if "# ---- OPTIONS" not in Path(script).read_text():
        return defaults  # a module, not a script
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            defaults[node.targets[0].id] = ast.literal_eval(node.value)
    return defaults
