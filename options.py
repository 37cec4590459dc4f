"""Script options: plain globals at the head of each script, overridden by --name=value or --config=FILE.json.

Also the scripts' error contract: a DataError (bad input or options) is printed as one line with exit status 1.
Imports nothing heavy, so `--help` and option errors answer before torch is loaded.
"""
from __future__ import annotations

import ast
import difflib
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
        if low == "all":  # e.g. --subjects=all: every subject in data_dir
            return type(default)(["all"])
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


OPTIONS_MARKER = "# ---- OPTIONS"   # at the start of a line: the line that opens a script's OPTIONS block
_END_MARKER = "# ----"


def apply_options(script_globals: dict, argv: list[str] | None = None, defaults_from: str | None = None) -> dict:
    """Override a script's option globals from --config=FILE.json and --name=value; return the options.

    Call it right after the OPTIONS block, before any other import. The options are the plain-valued globals
    (bool/int/float/str/list/tuple/None) not starting with '_'. defaults_from: another script (beside this one)
    whose options this one takes too, unless it sets them itself or replaces them by a plural (a sweep takes its
    training script's options; its `rois` replaces `roi`).
    Unknown names are an error suggesting the closest valid ones; --help prints every option with its comment.
    """
    sys.excepthook = _one_line_excepthook
    argv = sys.argv[1:] if argv is None else argv
    own = [k for k, v in script_globals.items() if not k.startswith("_") and isinstance(v, _OPTION_TYPES)]
    script = Path(script_globals.get("__file__") or sys.argv[0])
    inherited = {}
    if defaults_from:
        inherited = {k: v for k, v in script_defaults(script.with_name(defaults_from)).items()
                     if k not in own and k + "s" not in own}  # a sweep's hemispheres replaces hemisphere
        script_globals.update(inherited)
    names = own + list(inherited)
    defaults = {k: script_globals[k] for k in names}
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text(script, defaults_from))
        raise SystemExit(0)
    overrides: dict = {}
    for arg in argv:
        match = re.fullmatch(r"--([A-Za-z_][A-Za-z0-9_]*)=(.*)", arg, flags=re.S)
        if not match:
            raise OptionsError(f"argument {arg!r} is not of the form --name=value (--help lists the options)")
        key, text = match.groups()
        if key == "config":
            for ck, cv in read_config(text, script.name, defaults).items():
                overrides[ck] = _coerce(cv, defaults[ck], ck)
            continue
        if key not in defaults:
            raise OptionsError(f"unknown option --{key}{_did_you_mean(key, names)}; --help lists the options")
        overrides[key] = _parse_value(text, defaults[key], key)
    script_globals.update(overrides)
    return {k: script_globals[k] for k in names}


def _did_you_mean(name: str, names) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join('--' + c for c in close)}?)" if close else ""


def command_line_value(value) -> str:
    """An option's value as it is written on the command line: lh,rh; true; none."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(command_line_value(v) for v in value) if value else "[]"
    return str(value)


def option_comments(script) -> dict:
    """{option: its comment} from a script's OPTIONS block; a comment continued on following '#' lines joins it."""
    comments, last = {}, None
    in_block = False
    for line in Path(script).read_text().splitlines():
        if line.startswith(OPTIONS_MARKER):
            in_block = True
            continue
        if not in_block:
            continue
        if line.startswith(_END_MARKER):
            break
        match = re.match(r"([A-Za-z_][A-Za-z0-9_]*)\s*=.*?#\s?(.*)$", line)
        if match and not line.startswith("#"):
            last = match.group(1)
            comments[last] = match.group(2).strip()
        elif line.strip().startswith("#") and last is not None and line.startswith(" "):
            comments[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    return comments


def help_text(script, defaults_from: str | None = None) -> str:
    """Every option of a script with its default in command-line syntax and its comment (choices: 'a | b')."""
    script = Path(script)
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    lines = [f"{script.name}: {doc.splitlines()[0] if doc else ''}", "",
             "options (override with --name=value, lists as a,b, booleans as true/false, or --config=FILE.json):"]
    sources = [(script, script_defaults(script, own_only=True))]
    if defaults_from:
        own = sources[0][1]
        sources.append((script.with_name(defaults_from), {k: v for k, v in script_defaults(
            script.with_name(defaults_from)).items() if k + "s" not in own}))
    shown: set = set()
    for path, defaults in sources:
        if path != script:
            lines += ["", f"options taken from {path.name} (set them here the same way):"]
        comments = option_comments(path)
        width = max((len(k) + len(command_line_value(v)) for k, v in defaults.items()), default=0) + 4
        for name, value in defaults.items():
            if name in shown:
                continue
            shown.add(name)
            lines.append(f"  --{name}={command_line_value(value)}".ljust(width + 4) + f"  {comments.get(name, '')}")
    return "\n".join(lines)


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


def is_script(path) -> bool:
    """A pipeline script: its OPTIONS block opens with the marker at the start of a line."""
    return any(line.startswith(OPTIONS_MARKER) for line in Path(path).read_text().splitlines())


def script_defaults(script, own_only: bool = False) -> dict:
    """The options of a script, not run: its OPTIONS block (plain top-level assignments before the first import),
    plus those of the script its apply_options call names in defaults_from= (unless own_only)."""
    script = Path(script)
    if not is_script(script):
        return {}  # a module, not a script
    tree = ast.parse(script.read_text())
    defaults, parent = {}, None
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            defaults[node.targets[0].id] = ast.literal_eval(node.value)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "apply_options":
            parent = next((k.value.value for k in node.keywords if k.arg == "defaults_from"), None)
    if parent and not own_only:
        defaults.update({k: v for k, v in script_defaults(script.with_name(parent)).items()
                         if k not in defaults and k + "s" not in defaults})
    return defaults
