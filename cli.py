"""
The scripts' command line and the user files they read. Each script keeps its settings as module globals, one per
line with a comment; this module turns them into overrides (--key=value or --key value, type-checked against the
default), --help (each setting with its default and its comment, read from the script itself) and one-line errors,
and reads the text, JSON records and image features a user points the scripts at.
"""
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from lladapter import InputError


def settings_of(namespace: dict) -> dict:
    """The settings among a script's globals: every public int, float, bool, str or list."""
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, list))}


def comments(script) -> dict:
    """{name: comment} for the lines `name = default  # comment` of a script."""
    found = {}
    for line in Path(script).read_text().splitlines():
        match = re.match(r"(\w+) = .*?  # (.*)$", line)
        if match:
            found.setdefault(match.group(1), match.group(2))
    return found


def help_text(settings, doc, script) -> str:
    notes = comments(script)
    width = max(len(f"--{k}={v!r}") for k, v in settings.items())
    lines = [(f"--{k}={v!r}".ljust(width) + f"  {notes.get(k, '')}").rstrip() for k, v in settings.items()]
    return (f"{doc.strip()}\n\nsettings (--key=value or --key value; a bare --flag turns a flag on; a list setting "
            f"takes the key again for each item):\n  " + "\n  ".join(lines))


def parse_overrides(settings: dict, argv, doc="", script=None) -> dict:
    """--key=value or --key value arguments, each parsed as the type of its default in `settings`.

    A bare --key sets a bool. A list default collects repeated keys. --help (or -h) prints help_text and exits.
    Unknown keys, missing values and values of the wrong type raise InputError.
    """
    out, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--help", "-h"):
            print(help_text(settings, doc, script or sys.argv[0]))
            sys.exit(0)
        key, has_value, value = arg[2:].partition("=")
        if not arg.startswith("--") or key not in settings:
            raise InputError(f"unknown argument {arg!r}; settings are --key=value with key one of: {', '.join(settings)}"
                             f" (--help lists them)")
        default = settings[key]
        if not has_value and not isinstance(default, bool):  # --key value
            if not args or args[0].startswith("--"):
                raise InputError(f"--{key} needs a value, like --{key}={default!r}")
            value = args.pop(0)
        try:
            if isinstance(default, bool):
                value = {"true": True, "1": True, "false": False, "0": False}[value.lower()] if has_value else True
            elif isinstance(default, list):
                value = out.get(key, []) + [value]
            else:
                value = type(default)(value)
        except (KeyError, ValueError):
            raise InputError(f"--{key}={value}: expected a {type(default).__name__} like the default {default!r}") from None
        out[key] = value
    return out


def require(condition, message):
    """An InputError with `message` unless `condition`: for settings checks that read as a list of rules."""
    if not condition:
        raise InputError(message)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_of(name: str, device) -> torch.dtype:
    """The frozen base's dtype for --dtype: "auto" is bf16 on a GPU that has it, fp16 on one that doesn't (V100,
    T4: train.py then scales the loss), fp32 on a CPU. The adapter is fp32 whatever this says."""
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise InputError(f"--dtype={name}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def read_text(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def parse_json(text, where):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e})") from None


def read_records(path) -> list:
    """The records of a JSON list, or of JSON Lines (one record per line) for a .jsonl file: each a JSON object."""
    path = Path(path)
    text = read_text(path)
    if path.suffix == ".jsonl":
        records = [parse_json(line, f"{path}: line {n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        records = parse_json(text, path)
    if not isinstance(records, list) or not records:
        raise InputError(f"{path}: expected a non-empty list of records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise InputError(f"{path}: record {i} is not an object")
    return records


def load_image_feature(image, base_dir, image_dim, where):
    """A record's "image": a .npy file of one feature vector (a path relative to base_dir), or the vector inline."""
    try:
        vector = np.load(Path(base_dir) / image) if isinstance(image, str) else np.asarray(image, np.float32)
    except (OSError, ValueError) as e:
        raise InputError(f"{where}: image feature {image!r}: {e}") from None
    if vector.shape != (image_dim,):
        raise InputError(f"{where}: image feature {str(image)[:60]!r} has shape {list(vector.shape)}, expected [{image_dim}]")
    return torch.from_numpy(vector.astype(np.float32))



def exit_on_input_error():
    """Make the scripts print an InputError as one line and exit with status 1, without a traceback."""
    def hook(kind, error, traceback):
        if issubclass(kind, InputError):
            print(f"error: {error}", file=sys.stderr)
        else:
            sys.__excepthook__(kind, error, traceback)
    sys.excepthook = hook
