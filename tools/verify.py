"""
Check a downloaded checkpoint (or any torch or safetensors file) byte for byte before training on it.

    python -m tools.verify llama/7B                 # every consolidated.*.pth, *.bin, *.pth and *.safetensors there
    python -m tools.verify out/alpaca/adapter.pth   # one file

load_llama reads a base checkpoint memory-mapped and checks only its pickle's CRC-32 (reading 13 GB to check the rest
would double every load). This reads everything: for a torch file (a zip), every record's CRC-32, and the structure
that torch's own reader trusts without checking, which a flipped byte can silently turn into other values: each
record's header must sit where the central directory says and name that record, its data must end where the data
descriptor that follows repeats its CRC-32 and sizes, and no record may be marked as a folder (torch reads such a
record as empty, leaving the tensor's memory as it was). For a safetensors file, the header against the file (what
checkpoint.read_safetensors checks on every load), then every tensor read once. Prints one line per file; exit
status 1 if any is damaged.
"""
import struct
import sys
import zipfile
from pathlib import Path

import checkpoint
import cli


def zip_problem(path) -> str:
    """What is wrong with the zip of a torch file, or ""."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            records = sorted(archive.infolist(), key=lambda r: r.header_offset)
            for r, next_start in zip(records, [r.header_offset for r in records[1:]] + [archive.start_dir]):
                if r.is_dir() or r.external_attr & 0x10:  # 0x10: MS-DOS's folder attribute, which torch's reader obeys
                    return f"record {r.filename} is marked as a folder"
                with archive.open(r) as data:  # Python's reader checks the header's signature and name
                    while data.read(1 << 24):  # and the CRC-32 at the end
                        pass
                f.seek(r.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
                data_end = r.header_offset + 30 + name_len + extra_len + r.compress_size
                f.seek(data_end)
                gap = next_start - data_end  # nothing, or a data descriptor: at most 24 bytes
                descriptor = f.read(gap).removeprefix(b"PK\x07\x08") if 0 <= gap <= 24 else None
                repeats = [struct.pack(form, r.CRC, r.compress_size, r.file_size) for form in ("<3I", "<I2Q")]
                if descriptor not in (b"", *repeats):  # sizes in 4 bytes, or in 8 (zip64)
                    return f"record {r.filename} does not end where its header says"
    except Exception as e:  # a damaged zip fails in Python's reader in many ways
        return checkpoint.first_line(e)
    return ""


def problem_of(path) -> str:
    """What is wrong with the file at `path`, or ""."""
    try:
        if path.suffix == ".safetensors":
            for tensor in checkpoint.read_safetensors(path).values():
                tensor.sum()  # every byte read once
            return ""
        if not zipfile.is_zipfile(path):
            return "not a zip: torch's format before 1.6, which has no checksum to verify"
        problem = zip_problem(path)
        if not problem:
            checkpoint.torch_load(path, mmap=True)  # and the pickle holds nothing but tensors
        return problem
    except cli.InputError as e:
        return str(e)


def main(argv):
    cli.exit_on_input_error()
    if len(argv) != 1 or argv[0].startswith("-"):
        raise cli.InputError("usage: python -m tools.verify CHECKPOINT_DIR_OR_FILE")
    target = Path(argv[0])
    files = [target] if target.is_file() else sorted(
        p for pattern in ("*.pth", "*.bin", "*.safetensors") for p in target.glob(pattern))
    cli.require(files, f"{target}: no .pth, .bin or .safetensors file there")
    damaged = 0
    for path in files:
        problem = problem_of(path)
        damaged += bool(problem)
        print(f"{path}: {'DAMAGED: ' + problem if problem else 'ok'}", flush=True)
    return damaged


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:]) else 0)
