"""Slow tier: the GPU paths, proven on a CPU. Each test shows what a CPU can of a bug that would hit users on a GPU:
a T4 given bf16, an int8 base overflowing in fp16, compiled decoding that captures its graph again at every call,
masked attention that no fused kernel takes, processes that start from different adapters, a resume in another
dtype, a compiled training step that compiles again for every length."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import cli
import generation
import lladapter
import quantize
from tests.conftest import log_of, run_generate, train
from tests.fixtures import (DEVICE, ROOT, VOCAB, SDPACalls, adapter_file_tensors, as_adapter, base_copy, cached_logits,
                            tiny_model, tokens)
from test_lladapter import three_adapters


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_auto_dtype_is_bf16_from_compute_capability_8_and_fp16_below(monkeypatch, capability, dtype):
    # A V100 (7.0) or a T4 (7.5) can make bf16 tensors, so torch.cuda.is_bf16_supported() says yes by default; their
    # bf16 is emulated, slow, and kept from the fused attention kernels. --dtype=auto must give them fp16.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert cli.dtype_of("auto", "cuda:1") == dtype
    assert cli.dtype_of("auto", "cpu") == torch.float32 and cli.dtype_of("fp16", "cpu") == torch.float16


def test_an_int8_base_in_fp16_stays_finite_with_activations_in_the_thousands():
    # LLaMA's early layers carry activations of a few thousand in a few channels. x @ int8^T before the scale is the
    # output times 127 / max|row|, past fp16's 65504; scaling the weight copy first keeps every product in range.
    torch.manual_seed(0)
    q = quantize.Int8Linear(64, 96)
    q.quantize_((torch.randn(96, 64) * 0.02).__getitem__)
    x = torch.randn(5, 64)
    x[:, 3] = 3000.0
    w = quantize.dequantized(q.weight, q.scales, torch.float32)  # (96, 64): the int8 weight's own values
    x16 = x.half().requires_grad_()
    y = q(x16)
    assert y.dtype == torch.float16 and torch.isfinite(y).all(), "an fp16 forward overflowed"
    torch.testing.assert_close(y.float(), x @ w.t(), rtol=2e-3, atol=0.05)  # fp16's rounding of values up to ~250
    grad = torch.randn(5, 96).half()
    (gx,) = torch.autograd.grad(y, x16, grad)
    assert torch.isfinite(gx).all()
    torch.testing.assert_close(gx.float(), grad.float() @ w, rtol=2e-3, atol=2e-3)


def test_compiled_decoding_reuses_its_cache_memory_and_compiles_once_per_batch_size():
    # A CUDA graph replays on the memory it was recorded on: the cache and the prompts' keys and values must keep
    # their addresses from one generate() call to the next of the same batch size, or each call records anew.
    model = tiny_model(open_gates=True, n_kv_heads=2)
    prompts = [[1, 5, 9, 14], [1, 7], [1, 30, 31, 32, 33, 34]]
    first = generation.generate(model, prompts, 10, temperature=0, compile=True)
    memory = lambda: [(a.cache_k.data_ptr(), a.cache_v.data_ptr(), *(t.data_ptr() for t in a.prompt_kv or () if t is not None))  # noqa
                      for a in (layer.attention for layer in model.layers)]
    kept, graphs = memory(), counters["stats"]["unique_graphs"]
    others = [[1, 40, 41], [1, 8, 9, 10, 11], [1, 2]]
    second = generation.generate(model, others, 10, temperature=0, compile=True)
    assert memory() == kept, "a second call of the same batch size must reuse the cache's memory"
    assert counters["stats"]["unique_graphs"] == graphs, "and must not compile again"
    assert second == generation.generate(model, others, 10, temperature=0)  # the eager tokens
    assert generation.generate(model, prompts, 10, temperature=0, compile=True) == first  # stale entries never read
    for prompt in ([1, 5, 9], [1, 2, 3, 4, 5, 6, 7]):  # batch 1, prompts of two lengths: one graph too
        generation.generate(model, [prompt], 10, temperature=0, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs + 1, "a step's input must keep its strides"
    model.clear_cache()
    assert all(layer.attention.cache_k is None for layer in model.layers)


def test_a_prompts_file_whose_last_batch_is_smaller_compiles_the_decoding_step_once(task, open_adapter, tmp_path):
    (tmp_path / "prompts.txt").write_text("".join(f"Which colour is the {a}?\n" for a in ("owl", "cat", "dog", "elk",
                                                                                          "yak")))
    args = [f"--prompts_file={tmp_path / 'prompts.txt'}", "--temperature=0", "--max_gen_len=6", "--max_batch_size=2"]
    result = subprocess.run([sys.executable, "generate.py", f"--ckpt_dir={task / 'ckpt'}", f"--adapter={open_adapter}",
                             "--device=cpu", "--dtype=fp32", "--compile", f"--out={tmp_path / 'compiled.jsonl'}", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_LOGS": "recompiles"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Recompiling" not in result.stderr, result.stderr[-3000:]  # batches of 2, 2 and (padded) 2: one graph
    code, _, stderr = run_generate(task, *args, f"--out={tmp_path / 'eager.jsonl'}", adapter=open_adapter)
    assert code == 0, stderr
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    assert read("compiled.jsonl") == read("eager.jsonl") and len(read("eager.jsonl")) == 5  # the padding dropped


def masked_logits(model, x, prefill):
    """Logits of `x` decoded as compiled_step decodes (a tensor position, the whole cache, a mask), but eagerly."""
    model.setup_cache(x.shape[0], x.shape[1])
    with torch.no_grad():
        out = [model(x[:, :prefill], torch.tensor([0]))]
        out += [model(x[:, p:p + 1], torch.tensor([p])) for p in range(prefill, x.shape[1])]
    model.clear_cache()
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_decoding_with_no_mask_gives_the_tokens_of_the_masked_path_also_with_grouped_query_attention(n_kv_heads):
    # A prefill attends to its own keys (is_causal) and a step to the cache up to its position: no mask tensor, so
    # flash attention takes them on a GPU, GQA included, where a mask sends every call to the math kernel.
    model = tiny_model(open_gates=True, n_kv_heads=n_kv_heads)
    x = tokens(seqlen=20)
    with SDPACalls() as calls:
        unmasked = cached_logits(model, x, [6] + [1] * 14)
        generation.generate(model, [[1, 5, 9, 14], [1, 7]], 6, temperature=0)
    assert calls.calls and all(mask is None for *_, mask in calls.calls), "eager decoding passes attention a mask"
    masked = masked_logits(model, x, 6)
    assert torch.equal(unmasked.argmax(-1), masked.argmax(-1))
    torch.testing.assert_close(unmasked, masked, rtol=1e-5, atol=1e-5)


def test_the_batch_that_fits_counts_the_math_kernels_fp32_scores_where_no_fused_kernel_takes_the_prefill():
    # On a CPU no fused kernel runs (as for GQA on some GPUs): torch's math kernel holds n_heads x length^2 fp32
    # scores and as many weights per sequence, which at a long max_seq_len dwarf its KV cache.
    model, length = tiny_model(n_kv_heads=2), 64
    a, hidden = model.layers[0].attention, model.layers[0].feed_forward.w1.weight.shape[0]
    cache = 2 * model.args.n_layers * length * a.n_kv_heads * a.head_dim * 4
    prefill = length * (3 * hidden + 4 * model.args.dim) * 4 + 4 * VOCAB
    attention = 2 * a.n_heads * length ** 2 * 4
    assert attention > cache  # what counting only the cache would miss
    free = 10 * (cache + prefill + attention) + 1
    assert generation.batch_that_fits(model, length, free) == 10
    assert generation.batch_that_fits(model, length, free, most=4) == 4
    assert generation.batch_that_fits(model, length, cache + prefill) == 0


def prompts_of_this_process(model):
    """train.py --variant: every process's prompts its own (process 0's unchanged), as GPUs of two kinds can draw."""
    with torch.no_grad():
        model.adapter_query.weight.add_(torch.distributed.get_rank())


def test_fsdp_processes_that_drew_different_adapters_train_process_0s(task, parallel_runs, tmp_path):
    d, _ = parallel_runs
    train(task, tmp_path, "--stop_after=8", "--base_lr=1.0", "--save_interval=3", "--fsdp",
          "--variant=tests.test_gpu_paths:prompts_of_this_process", nproc=2)
    one, fsdp = adapter_file_tensors(d / "one" / "adapter.pth"), adapter_file_tensors(tmp_path / "adapter.pth")
    for key in one:
        torch.testing.assert_close(fsdp[key], one[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_bf16_run_resumed_in_fp16_is_refused_in_one_line_and_nothing_is_overwritten(task, tmp_path):
    train(task, tmp_path, "--dtype=bf16", "--stop_after=2", "--save_interval=1")
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, output = train(task, tmp_path, "--dtype=fp16", "--resume", check=False)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in output, output
    assert "trained with the base in bf16" in errors[0] and "--dtype=bf16" in errors[0]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_compiled_training_compiles_no_graph_per_sequence_length(task, tmp_path):
    # Micro-batches of every padded length and validation (another grad mode, other lengths) share a few dynamic
    # graphs per block: a graph per length would soon pass dynamo's recompile limit and run eagerly, silently.
    code, output = train(task, tmp_path, "--compile", "--stop_after=3", "--eval_interval=1", "--base_lr=1.0",
                         env={"TORCH_LOGS": "recompiles"})
    reasons = [line for line in output.splitlines() if "guard failure" in line or "mismatch" in line]
    assert not [r for r in reasons if "size mismatch" in r], reasons
    assert "recompile_limit" not in output and "cache_size_limit" not in output
    assert [r["step"] for r in log_of(tmp_path)] == [1, 2, 3] and all("val_loss" in r for r in log_of(tmp_path))


# ---- issue 29: a GPU run that starts, and stays fast --------------------------------------------------------------

PRETEND_CUDA = '''
import os, torch, torch._utils
torch.cuda.is_available = lambda: True  # CUDA pretended on this CPU: what a GPU machine's torch answers


def set_device(device):  # torch's own check of its argument (torch/cuda/__init__.py), then stop: nothing here runs CUDA
    index = torch._utils._get_device_index(device, optional=False)
    print(f"set_device(cuda:{index})", flush=True)
    os._exit(0)


torch.cuda.set_device = set_device
'''


@pytest.mark.parametrize("script", ["train.py", "generate.py"])
def test_a_gpu_run_started_as_a_user_types_it_sets_an_indexed_device(tmp_path, script):
    # `python train.py` and `python generate.py`, no flags, on a machine with CUDA: torch.cuda.set_device("cuda")
    # raises "Expected a torch.device with a specified index", which once ended every default GPU run at its start.
    # Nothing may start CUDA before set_device either (here any other CUDA call fails: torch has no CUDA).
    (tmp_path / "sitecustomize.py").write_text(PRETEND_CUDA)
    result = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "set_device(cuda:0)" in result.stdout, result.stdout + result.stderr[-3000:]


def test_compiled_decoding_sizes_its_cache_by_the_call_not_by_the_models_context():
    # Every compiled step attends over the whole static cache: a default of the model's context (2,048 here,
    # 131,072 for Llama 3.1) made a short answer read all of it at every step.
    model = tiny_model(open_gates=True, n_kv_heads=2, max_seq_len=2048)
    prompt = [1, 5, 9, 14, 3, 4, 7, 8]
    compiled = generation.generate(model, [prompt], 32, temperature=0, compile=True)
    assert model.layers[0].attention.cache_k.shape[1] == 64, "8 + 32 tokens: a cache of 64, the smallest bucket"
    assert compiled == generation.generate(model, [prompt], 32, temperature=0)
    graphs = counters["stats"]["unique_graphs"]
    generation.generate(model, [prompt[:5]], 30, temperature=0, compile=True)  # 35 tokens: the same bucket, no compile
    assert counters["stats"]["unique_graphs"] == graphs
    assert [generation.static_cache_len(n, 2048) for n in (1, 64, 65, 1000, 2048)] == [64, 64, 128, 1024, 2048]
    assert generation.static_cache_len(100_000, 131_072) == 131_072
    model.clear_cache()


def test_compiled_decoding_past_dynamos_graph_limit_still_runs_compiled():
    # One graph per model configuration, batch size, cache length and prompt state, all counted against one limit
    # of dynamo's per process; past it decoding would fail (fullgraph) or run eagerly.
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    # shapes of their own (dim 48), so that every one is a new graph: past the limit, fullgraph fails the call
    models = [tiny_model(open_gates=True, dim=48, n_heads=3), tiny_model(open_gates=True, dim=48, n_heads=3, n_kv_heads=1)]
    with config.patch(**{limit: 2}):
        for model, bsz in [(models[0], 1), (models[1], 1), (models[0], 2), (models[1], 3)]:
            prompts = [[1, 5, 9]] * bsz
            compiled = generation.generate(model, prompts, 4, temperature=0, compile=True)
            assert compiled == generation.generate(model, prompts, 4, temperature=0), "compiled and eager must agree"
        # the limit counts the steps of every model of the process, not of one model
        many = [tiny_model(n_layers=1, adapter_layer=1) for _ in range(12)]
        for model in many:
            generation.compiled_step(model, 1, 64)
        assert getattr(config, limit) >= 12 + 4
    for model in models:
        model.clear_cache()


def test_grouped_query_decoding_never_passes_a_mask_with_grouped_heads_and_folds_exactly():
    # A mask together with enable_gqa goes to torch's math kernel on most cards, which copies K and V per query head
    # in fp32 (8x the layer's bf16 cache at Llama-3-8B). The compiled step (a tensor position, the whole cache under
    # a mask) and the bank's padding mask fold each group of query heads into the query axis instead.
    models = three_adapters(n_kv_heads=2)
    base = base_copy(models["L2"])
    bank = generation.AdapterBank(base, {name: as_adapter(m) for name, m in models.items()})
    model, x = models["L4"], tokens(seqlen=12)
    model.setup_cache(x.shape[0], 16)
    with SDPACalls() as sdpa, torch.no_grad():
        model(x[:, :5], 0)  # the prefill, then the compiled step's code (a tensor position), run eagerly
        for p in range(5, 12):
            model(x[:, p:p + 1], torch.tensor([p]))
        generation.generate(base, [[1, 5, 9, 14], [1, 7], [1, 3]], 6, temperature=0, bank=bank, rows=[1, 2, 3])
    model.clear_cache()
    masked = [(q.shape[1], k.shape[1]) for q, k, _, mask in sdpa.calls if mask is not None]
    assert masked, "the test must see masked calls"
    assert all(q_heads == k_heads for q_heads, k_heads in masked), "a mask passed with grouped-query heads"
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):  # the fold against SDPA's own GQA
        q, k, v = (torch.randn(3, heads, n, 16, generator=torch.Generator().manual_seed(heads)).to(dtype)
                   for heads, n in ((8, 1), (2, 40), (2, 40)))
        mask = torch.rand(3, 1, 1, 40, generator=torch.Generator().manual_seed(9)) > 0.3
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(lladapter.attention(q, k, v, mask), expected, rtol=tolerance, atol=tolerance)


def test_an_adapter_bank_keeps_no_autograd_graph():
    # generate.py builds its bank from a base whose parameters require gradients (load_llama freezes nothing): every
    # projection would keep its input for a backward that never comes (2.3 GiB per 1,000 Llama-3-8B adapters).
    models = three_adapters()
    base = base_copy(models["L2"])
    assert all(p.requires_grad for p in base.parameters())
    bank = generation.AdapterBank(base, {name: as_adapter(m) for name, m in models.items()})
    held = [t for state in bank.layers.values() for t in state if t is not None]
    assert held and not [t for t in held if t.requires_grad or t.grad_fn is not None]


def test_int8s_one_kernel_on_a_gpu_gives_the_bits_of_the_copy_scaled_in_place():
    # On a GPU dequantized() writes the 16-bit matrix in one kernel (torch.mul into an empty 16-bit tensor); on a CPU
    # it scales a 16-bit copy in place, as torch's CPU kernels would make fp32 copies for the one call. The two forms
    # must give the same bits, or a model would answer differently on the two.
    weight = torch.randint(-127, 128, (96, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    scales = torch.rand(96, generator=torch.Generator().manual_seed(1)) / 100
    weight, scales = weight.to(DEVICE), scales.to(DEVICE)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        one_kernel = torch.mul(weight, scales[:, None], out=torch.empty(weight.shape, dtype=dtype, device=DEVICE))
        in_place = weight.to(dtype).mul_(scales[:, None])
        assert torch.equal(one_kernel, in_place), dtype
        assert torch.equal(quantize.dequantized(weight, scales, dtype), one_kernel), dtype


def test_tokens_per_second_counts_no_filler_row(task, open_adapter, tmp_path):
    # Compiled, a short last batch is filled up with copies of its last prompt; their tokens are not answers, so the
    # count must be the eager run's, which fills nothing.
    (tmp_path / "prompts.txt").write_text("Which colour is the owl?\nWhich colour is the cat?\nWhich colour is the yak?\n")
    counts = []
    for compiled in ([], ["--compile"]):
        code, _, stderr = run_generate(task, f"--prompts_file={tmp_path / 'prompts.txt'}", "--temperature=0",
                                       "--max_gen_len=5", "--max_batch_size=2", f"--out={tmp_path / 'answers.jsonl'}",
                                       *compiled, adapter=open_adapter)
        assert code == 0, stderr
        counts.append(int(re.search(r"\[(\d+) tokens in", stderr)[1]))
    answers = [json.loads(line)["output"] for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert answers[-1], "the filled batch's prompt must answer something, or the test shows nothing"
    assert counts[1] == counts[0], counts
