"""Slow tier: the fast tier catches a broken LLaMA. Each one-line break of the model or the loss below (RMSNorm, RoPE,
SwiGLU, the residuals, the norms, the loss) is applied to a copy of the reference, and README.md's fast-tier command,
run on the copy, must fail: a reader who edits the model learns from the fast tier that it broke. (The README's
exercises, edits of the adapter itself, are held to the exact tests they fail by tests/test_readme.py.)"""
import shutil
import subprocess
import sys

import pytest

from tests.fixtures import ROOT

BREAKS = {  # name: (file, the line's code, the broken code)
    "RMSNorm adds its weight": ("lladapter.py", ".type_as(x) * self.weight", ".type_as(x) + self.weight"),
    "RMSNorm's eps is 1": ("lladapter.py", "eps=self.eps)", "eps=1.0)"),
    "RMSNorm forgets the mean": ("lladapter.py", "F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)", "x.float()"),
    "SiLU is GELU": ("lladapter.py", "F.silu(self.w1(x))", "F.gelu(self.w1(x))"),
    "w1 and w3 swapped": ("lladapter.py", "F.silu(self.w1(x)) * self.w3(x)", "F.silu(self.w3(x)) * self.w1(x)"),
    "no pre-norm before attention": ("lladapter.py", "self.attention(self.attention_norm(x),", "self.attention(x,"),
    "no pre-norm before the feed-forward": ("lladapter.py", "self.feed_forward(self.ffn_norm(h))", "self.feed_forward(h)"),
    "no residual around attention": ("lladapter.py", "h = x + self.attention(", "h = self.attention("),
    "no residual around the feed-forward": ("lladapter.py", "return h + self.feed_forward(", "return self.feed_forward("),
    "no final norm": ("lladapter.py", "self.output(self.norm(h))", "self.output(h)"),
    "RoPE rotates the other way": ("lladapter.py", "x0 * cos - x1 * sin, x0 * sin + x1 * cos",
                                   "x0 * cos + x1 * sin, -x0 * sin + x1 * cos"),
    "RoPE ignores theta": ("lladapter.py", "freqs = 1.0 / theta ** (", "freqs = 1.0 / 10000.0 ** ("),
    "RoPE's Llama 3 scaling divides every frequency": ("lladapter.py", "freqs = (1 - sigma) * freqs / factor + sigma * freqs",
                                                      "freqs = freqs / factor"),
    "attention is not causal": ("lladapter.py", "is_causal=mask is None and seqlen > 1", "is_causal=False"),
    "the loss scores the current token": ("lladapter.py", "targets = labels[:, 1:]", "targets = labels[:, :-1]"),
    "the loss is a mean": ("lladapter.py", 'return F.cross_entropy(logits, targets, reduction="sum")',
                           'return F.cross_entropy(logits, targets, reduction="mean")'),
}


def fast_tier_copy(folder):
    """The reference, the fast tier and what it reads (tests/fixtures.py, tests/reference/, the walkthrough's tokenizer
    trainer) in `folder`."""
    for file in ROOT.glob("*.py"):
        shutil.copy(file, folder / file.name)
    for sub in ("tests", "walkthrough"):
        shutil.copytree(ROOT / sub, folder / sub, ignore=shutil.ignore_patterns("__pycache__", "test_*.py"))


@pytest.mark.parametrize("name", BREAKS)
def test_the_fast_tier_fails_on_a_one_line_break_of_llama_or_its_loss(tmp_path, name):
    file, line, broken = BREAKS[name]
    fast_tier_copy(tmp_path)
    source = (tmp_path / file).read_text(encoding="utf-8")
    assert source.count(line) == 1, f"{name}: `{line}` should occur exactly once in {file}"
    (tmp_path / file).write_text(source.replace(line, broken), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_lladapter.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 1 and " failed" in summary, f"{name}: the fast tier did not fail ({summary})"
