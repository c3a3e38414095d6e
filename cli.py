"""
The scripts' command line and the user's own files, with one-line errors: every problem a user can cause (a bad
setting, a missing or malformed file) is an InputError, which the scripts print as `error: ...` and exit 1.

A script's settings are one dataclass, each field with its default and a comment; parse() builds an argparse
parser from it, the comment as the field's help, so that block is the single source of defaults and help.
"""
import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
import typing
from pathlib import Path

import numpy as np
import torch


class InputError(ValueError):
    """A problem with the user's files or settings. The scripts print it as one line, with no traceback."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own complaints (an unknown setting, a malformed value) are InputErrors too
        raise InputError(message)


def parse(settings, doc, argv=None, defaults=None):
    """An instance of the dataclass `settings` from the command line (--name=value or --name value): a bool is
    --name or --no-name, a tuple takes --name once per item, a Literal one of its values. Hyphens are read as
    underscores (--adapter-len is --adapter_len), and an unknown setting is answered with the nearest known one.
    defaults: a preset's own values, under the command line's."""
    source = Path(sys.modules[settings.__module__].__file__).read_text(encoding="utf-8")
    comments = dict(re.findall(r"^    (\w+): .*?  # (.*)$", source, re.M))  # `    name: type = default  # comment`
    parser = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    values = {f.name: (defaults or {}).get(f.name, f.default) for f in dataclasses.fields(settings)}
    for field in dataclasses.fields(settings):
        kind, default = field.type, values[field.name]
        options = dict(default=default, help=f"{comments.get(field.name, '')} (default: {default!r})")
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:  # repeated: its items replace the default's
            options.update(action="append", default=None, metavar="VALUE")
        elif typing.get_origin(kind) is typing.Literal:
            options.update(choices=typing.get_args(kind), metavar="{" + ",".join(map(str, typing.get_args(kind))) + "}")
        else:
            options.update(type=kind, metavar=kind.__name__.upper())
        parser.add_argument(f"--{field.name}", **options)
    known = ["--help", *(f"--{prefix}{f.name}" for f in dataclasses.fields(settings)
                         for prefix in (("", "no-") if f.type is bool else ("",)))]
    argv = [underscored(a, known) for a in (sys.argv[1:] if argv is None else argv)]
    given, unknown = parser.parse_known_args(argv)
    if unknown:
        names = [a.split("=")[0] for a in unknown if a.startswith("--")]
        near = difflib.get_close_matches(names[0], known, n=1) if names else []
        raise InputError(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {near[0]}?)" if near else ""))
    given = vars(given)
    return settings(**{k: tuple(v) if isinstance(v, list) else values[k] if v is None else v for k, v in given.items()})


def underscored(arg, known):
    """--adapter-len=5 as --adapter_len=5 (and --no-show-gates as --no-show_gates) where that is a setting."""
    if not arg.startswith("--"):
        return arg
    name, equals, value = arg.partition("=")
    no = "--no-" if name.startswith(("--no-", "--no_")) else "--"
    spelled = no + name[len(no):].replace("-", "_")
    return spelled + equals + value if spelled in known and name not in known else arg


def exit_on_input_error(stopped=lambda: "nothing was written"):
    """Make a script end without a traceback where the user caused it: an InputError as one line `error: ...` (exit
    status 1), and Ctrl-C as one line `stopped: ...` giving stopped(), what is kept and the command that continues
    (printed by process 0 alone under torchrun, whose processes all get the signal)."""
    def hook(kind, error, traceback):
        if issubclass(kind, InputError):
            print(f"error: {error}", file=sys.stderr)
        elif issubclass(kind, KeyboardInterrupt):
            if os.environ.get("RANK", "0") == "0":
                print(f"stopped: {stopped()}", file=sys.stderr, flush=True)
        else:
            sys.__excepthook__(kind, error, traceback)
    sys.excepthook = hook


def require(condition, message):
    """An InputError with `message` unless `condition`: for settings checks that read as a list of rules."""
    if not condition:
        raise InputError(message)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def device_of(name) -> torch.device:
    """--device as a device: the one named, or CUDA where there is a GPU, else the CPU. CUDA always with its index, as
    torch.cuda.set_device refuses a bare "cuda": the current device's where this process uses CUDA already, else 0
    (asking torch would start CUDA here, and each torchrun process would make a context on GPU 0 before its own)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise InputError(f"--device={name}: {e}") from None
    require(device.type != "cuda" or torch.cuda.is_available(), f"--device={name}: no CUDA device here")
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)


def dtype_of(name: str, device) -> torch.dtype:
    """The frozen base's dtype for --dtype: "auto" is bf16 on a GPU of compute capability 8.0 or more (A100, H100,
    RTX 30xx on), fp16 below it (V100, T4: train.py then scales the loss), fp32 on a CPU. Not
    torch.cuda.is_bf16_supported(): it counts bf16 that older cards only emulate, slowly. The adapter is fp32."""
    device = torch.device(device)
    if name == "auto" and device.type != "cuda":
        return torch.float32
    if name == "auto":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
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


def read_json(path):
    return parse_json(read_text(path), path)


def record_at(path, i) -> str:
    """How errors name record i of a data file: by its index in the list, counted from 0 as JSON tools (jq) and
    Python do; JSON Lines errors name lines, counted from 1 as editors do."""
    return f"{path}: record {i} (counting from 0)"


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
            raise InputError(f"{record_at(path, i)} is not an object")
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
