"""Slow tier: an int8 base loaded from every checkpoint layout, quantized while it is read (peak memory measured in
a process of its own), and an adapter trained on it that works on the full-precision base."""
import json
import subprocess
import sys

import pytest
import torch

import checkpoint
import generation
import lladapter
import quantize
from tests.fixtures import (ROOT, base_copy, tiny_model, tokens, write_hf_checkpoint,
                            write_meta_checkpoint)


@pytest.mark.parametrize("layout", ["meta", "meta, two shards", "model.safetensors", "two shards"])
def test_int8_load_from_every_layout_gives_the_int8_of_the_full_precision_weights(tmp_path, spm_tokenizer, layout):
    model = tiny_model(seed=3, n_kv_heads=2)
    if layout.startswith("meta"):
        write_meta_checkpoint(model, tmp_path, n_shards=2 if "two" in layout else 1)
    else:  # Hugging Face's row order for wq and wk, undone as the rows are read
        write_hf_checkpoint(model, tmp_path, spm_tokenizer, layout)
    loaded, _ = checkpoint.load_llama(tmp_path, tokenizer_path=spm_tokenizer, device="cpu", quantize="int8",
                                      adapter_layer=0)
    expected = quantize.int8_linears(base_copy(model), quantize_from_weights=True)  # from the whole fp32 weights
    int8 = {n: p for n, p in loaded.named_parameters() if p.dtype == torch.int8}
    assert len(int8) == 7 * model.args.n_layers + 1 and loaded.tok_embeddings.weight.dtype == torch.float32
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected(x))


LOAD_PEAK = """
import sys, threading, time, json
sys.path.insert(0, {root!r})
import torch, checkpoint

def anon_mib():  # resident memory that is not a file's pages (the memory-mapped checkpoint is a file's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024

start, peak, done = anon_mib(), [0.0], threading.Event()
def sample():  # every millisecond while loading: the most held at once
    while not done.is_set():
        peak[0] = max(peak[0], anon_mib())
        time.sleep(0.001)
sampler = threading.Thread(target=sample)
sampler.start()
model, _ = checkpoint.load_llama({ckpt!r}, device="cpu", quantize={quantize!r}, adapter_layer=0)
done.set()
sampler.join()
peak[0] = max(peak[0], anon_mib())
print(json.dumps({{"peak_above_start_mib": peak[0] - start}}))
"""


def load_peak_mib(ckpt, quantize_to):
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}  # freed blocks go back to the system
    done = subprocess.run([sys.executable, "-c", LOAD_PEAK.format(root=str(ROOT), ckpt=str(ckpt), quantize=quantize_to)],
                          capture_output=True, text=True, timeout=300, env={**env, "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)["peak_above_start_mib"]


def test_an_int8_load_never_holds_the_full_precision_model(tmp_path, spm_tokenizer):
    # A mid-size base (dim 512, 8 layers, LLaMA's vocabulary: ~240 MB in fp32) in Meta's layout, fp16 as Meta's files
    model = tiny_model(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256, adapter_layer=0)
    fp32_mib = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    write_meta_checkpoint(model.half(), tmp_path / "ckpt", n_shards=2)
    (tmp_path / "ckpt" / "tokenizer.model").write_bytes(spm_tokenizer.read_bytes())
    params = json.loads((tmp_path / "ckpt" / "params.json").read_text())
    (tmp_path / "ckpt" / "params.json").write_text(json.dumps({**params, "vocab_size": 32000}))
    del model
    int8_peak, fp32_peak = load_peak_mib(tmp_path / "ckpt", "int8"), load_peak_mib(tmp_path / "ckpt", "")
    assert fp32_peak > 0.9 * fp32_mib, "the measurement sees a model being built (the fp32 load holds it all)"
    # the int8 model is ~105 MiB here (int8 matrices, fp32 embeddings); on top: one fp16 tensor joined from its two
    # shards, a block of rows being quantized, and what torch allocates on first use
    assert int8_peak < fp32_mib, f"an int8 load peaked at {int8_peak:.0f} MiB, the fp32 model is {fp32_mib:.0f}"
    print(f"load peak above start: int8 {int8_peak:.0f} MiB, fp32 {fp32_peak:.0f} MiB; the fp32 model {fp32_mib:.0f} MiB")


def test_an_adapter_trained_on_an_int8_base_loads_and_works_on_the_full_precision_base(tmp_path, spm_tokenizer):
    model = tiny_model(seed=5)
    write_meta_checkpoint(model, tmp_path / "ckpt")
    x = tokens(bsz=4, seqlen=16)
    labels = x.clone()
    labels[:, :6] = lladapter.IGNORE_INDEX
    torch.manual_seed(0)  # the adapter's initial values, whatever ran before
    int8, _ = checkpoint.load_llama(tmp_path / "ckpt", tokenizer_path=spm_tokenizer, device="cpu", quantize="int8",
                                    adapter_layer=2, adapter_len=3)
    lladapter.mark_only_adapter_trainable(int8)
    optimizer = torch.optim.AdamW([p for p in int8.parameters() if p.requires_grad], lr=0.3)
    for _ in range(30):
        optimizer.zero_grad()
        lladapter.response_loss(int8, x, labels).backward()
        optimizer.step()
    checkpoint.save_adapter(int8, tmp_path / "adapter.pth")
    full, _ = checkpoint.load_llama(tmp_path / "ckpt", tokenizer_path=spm_tokenizer, adapter_path=tmp_path / "adapter.pth",
                                    device="cpu")
    assert full.layers[0].attention.wq.weight.dtype == torch.float32
    with torch.no_grad():
        trained = lladapter.response_loss(full, x, labels)
        with lladapter.gates_closed(full):
            before = lladapter.response_loss(full, x, labels)
        on_int8 = lladapter.response_loss(int8, x, labels)
    assert trained < 0.8 * before, "the adapter learnt on the int8 base lowers the loss on the fp32 base too"
    torch.testing.assert_close(trained, on_int8, rtol=0.05, atol=0.0)  # the two bases differ only by rounding


def test_compiled_decoding_on_an_int8_base_gives_the_tokens_of_eager_decoding():
    model = quantize.int8_linears(tiny_model(open_gates=True).eval(), quantize_from_weights=True)
    prompts = tokens(bsz=2, seqlen=6).tolist()
    eager = generation.generate(model, prompts, 8, temperature=0)
    assert generation.generate(model, prompts, 8, temperature=0, compile=True) == eager
