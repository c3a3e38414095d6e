"""Slow tier: the reference's layout as the README promises it. The lab (walkthrough/, tools/, tests/) imports the
reference, never the other way round, but for the walkthrough's preset in train.py and generate.py; the model file
does no I/O; nothing in the reference needs a POSIX-only module or /proc, so it runs on macOS and Windows."""
import ast

import pytest

from tests.fixtures import ROOT

REFERENCE = ["lladapter.py", "generation.py", "tokenizer.py", "checkpoint.py", "quantize.py", "cli.py", "train.py",
             "generate.py"]
LAB = {"walkthrough", "tools", "tests"}


def imports(file):
    """(module, names, line, whether at the module's top level) of every import statement in `file`."""
    tree = ast.parse((ROOT / file).read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module, [(a.name, a.asname) for a in node.names], node.lineno, id(node) in top))
    return found


@pytest.mark.parametrize("file", REFERENCE)
def test_the_reference_never_imports_the_lab_but_for_the_walkthroughs_preset(file):
    for module, names, line, at_top in imports(file):
        if module.split(".")[0] in LAB:
            assert file in ("train.py", "generate.py") and not at_top, f"{file}:{line} imports {module}"
            assert (module, names) == ("walkthrough", [("world", "walkthrough")]), \
                f"{file}:{line}: the walkthrough's preset is the one import of the lab, `from walkthrough import world`"


def test_the_model_file_does_no_io():
    allowed = {"itertools", "math", "contextlib", "dataclasses", "typing", "torch", "torch.nn", "torch.nn.functional",
               "torch.nn.utils.rnn", "torch.utils.checkpoint"}
    found = {module for module, _, _, _ in imports("lladapter.py")}
    assert found <= allowed, f"lladapter.py imports {sorted(found - allowed)}"
    source = (ROOT / "lladapter.py").read_text(encoding="utf-8")
    for call in ("open(", "Path(", "print(", "torch.load(", "torch.save("):
        assert call not in source, f"lladapter.py calls {call}...)"


@pytest.mark.parametrize("file", REFERENCE)
def test_the_reference_imports_no_posix_only_module_at_import_time_and_reads_no_proc(file):
    for module, _, line, at_top in imports(file):
        assert not (at_top and module in ("resource", "fcntl", "termios", "pwd", "grp")), f"{file}:{line}: {module}"
    assert "/proc" not in (ROOT / file).read_text(encoding="utf-8"), file
