"""Slow tier: many adapters on one base, in one batch (generation.AdapterBank, generate.py --adapter repeated and
--compare), adapters trained with PEFT, answers for AlpacaEval, and prompts as long as the model's context."""
import ast
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

import checkpoint
import generation
import lladapter
import tokenizer as tokenizers
from cli import InputError
from tests.conftest import run_generate
from tests.fixtures import (ROOT, as_adapter, base_copy, llama3_model, safetensors_layout, tiny_model, tokens,
                            write_hf_checkpoint, write_raw_safetensors)
from test_lladapter import three_adapters


def test_a_mixed_batch_decoded_by_the_compiled_step_gives_the_eager_tokens():
    models = three_adapters()
    base = base_copy(models["L2"])
    bank = generation.AdapterBank(base, {name: as_adapter(m) for name, m in models.items()})
    prompts, rows = [[1, 5, 9, 14], [1, 7], [1, 30, 31, 32, 33, 34], [1, 3, 4]], [0, 1, 2, 3]
    eager = generation.generate(base, prompts, 8, temperature=0, bank=bank, rows=rows)
    assert generation.generate(base, prompts, 8, temperature=0, bank=bank, rows=rows, compile=True) == eager
    assert generation.generate(base, prompts, 8, temperature=0, bank=bank, rows=rows[::-1], compile=True) == \
        generation.generate(base, prompts, 8, temperature=0, bank=bank, rows=rows[::-1])  # other rows, the same graph


def write_peft_adapter(model, folder, gates, per_head=False, bin_file=False):
    """`model`'s prompts as PEFT's adaption_prompt saves them, with these raw gates (one per adapted layer, or one
    per head): [1, K, dim] prompt and gate tensors under PEFT's names, and its adapter_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    a, tensors = model.args, {}
    prompts = model.adapter_query.weight.detach().view(a.adapter_layer, a.adapter_len, a.dim)
    for l, i in enumerate(range(model.first_adapted, a.n_layers)):
        name = f"base_model.model.model.layers.{i}.self_attn.adaption_"
        tensors[name + "prompt"] = prompts[l][None].clone()
        tensors[name + "gate"] = torch.tensor(gates[l] if per_head else [gates[l]], dtype=torch.float32)
    if bin_file:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        write_raw_safetensors(folder / "adapter_model.safetensors", *safetensors_layout(tensors, {"format": "pt"}))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "ADAPTION_PROMPT", "adapter_len": a.adapter_len, "adapter_layers": a.adapter_layer,
         "target_modules": "self_attn", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny"}))


@pytest.mark.parametrize("per_head, bin_file", [(False, False), (True, True)])
def test_a_peft_adapter_gives_the_logits_of_the_same_adapter_expressed_natively(tmp_path, spm_tokenizer, per_head,
                                                                                 bin_file):
    model = tiny_model(seed=4)  # the prompts; the gates: known values in (-1, 1), applied raw by PEFT
    gates = [[0.3, -0.6, 0.9, 0.05], [-0.8, 0.2, 0.0, 0.99]] if per_head else [0.45, -0.9]
    write_hf_checkpoint(model, tmp_path / "hf", spm_tokenizer)  # PEFT adapts Hugging Face models
    write_peft_adapter(model, tmp_path / "peft", gates, per_head, bin_file)
    with torch.no_grad():  # the same adapter in this code's form: tanh(gate) = g, in every head where PEFT has one
        for l, layer in enumerate(model.layers[model.first_adapted:]):
            layer.attention.gate.copy_(torch.atanh(torch.tensor(gates[l])).expand(model.args.n_heads).view(1, -1, 1, 1))
    loaded, _ = checkpoint.load_llama(tmp_path / "hf", adapter_path=tmp_path / "peft", device="cpu", max_seq_len=64)
    assert (loaded.args.adapter_layer, loaded.args.adapter_len) == (2, 3)
    x = tokens()
    with torch.no_grad():
        expected, logits = model(x), loaded(x)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        with lladapter.gates_closed(loaded):
            assert not torch.allclose(loaded(x), expected, atol=1e-3)  # the adapter matters here


def test_a_peft_gate_of_1_or_more_is_refused_in_one_line_naming_the_layer_and_the_value(tmp_path, spm_tokenizer):
    model = tiny_model(seed=4)
    write_hf_checkpoint(model, tmp_path / "hf", spm_tokenizer)
    write_peft_adapter(model, tmp_path / "peft", [0.5, -1.25])
    with pytest.raises(InputError) as error:
        checkpoint.load_llama(tmp_path / "hf", adapter_path=tmp_path / "peft", device="cpu", max_seq_len=64)
    assert "\n" not in str(error.value) and "layer 3: gate 1.25" in str(error.value), str(error.value)


@pytest.fixture(scope="module")
def two_adapters(task, tmp_path_factory):
    """Two adapters for the task's base, of other K and L, their prompts and gates drawn apart."""
    d = tmp_path_factory.mktemp("adapters")
    for name, (L, K, seed) in {"owls": (2, 3, 1), "deep": (4, 2, 2)}.items():
        model = tiny_model(max_seq_len=512, adapter_layer=L, adapter_len=K)  # the task's base: seed 0's weights
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lladapter.adapter_tensors(model).values():
                p.copy_(torch.randn(p.shape, generator=generator) * (3 if p.dim() == 2 else 1))
        checkpoint.save_adapter(model, d / f"{name}.pth")
    return d


PROMPTS = ["Which colour is the owl?", "Which colour is the yak, and the emu and the cat?", "pink pink"]


def answers_of(stdout):
    return [line[len("### Response: "):] for line in stdout.splitlines() if line.startswith("### Response: ")]


def test_compare_answers_each_prompt_with_the_base_and_each_adapter_as_each_alone_would(task, two_adapters):
    greedy = ["--temperature=0", "--max_gen_len=8", *(f"--prompt={p}" for p in PROMPTS)]
    alone = {name: answers_of(run_generate(task, *greedy, *([f"--adapter={two_adapters / f'{name}.pth'}"] if name != "base"
                                                             else []))[1]) for name in ("base", "owls", "deep")}
    code, stdout, stderr = run_generate(task, *greedy, f"--adapter={two_adapters / 'owls.pth'}",
                                        f"--adapter=deep={two_adapters / 'deep.pth'}", "--compare")
    assert code == 0, stderr
    side_by_side = [line.strip().split(": ", 1) for line in stdout.splitlines() if line.startswith("    ")]
    assert [name for name, _ in side_by_side] == ["base", "owls", "deep"] * len(PROMPTS)
    for k, (name, text) in enumerate(side_by_side):
        assert ast.literal_eval(text) == alone[name][k // 3], (name, PROMPTS[k // 3])
    assert len({tuple(answers) for answers in alone.values()}) == 3, "the three answer differently, or this shows nothing"
    # the status line counts the adapters given, not the base's row: two, and their keys and values twice one's
    status = re.search(r"\[(\d+) adapters beside the base model, in one batch: the prompts' keys and values "
                       r"([\d.]+) MiB, ([\d.]+) MiB each\]", stderr)
    assert status and status[1] == "2" and abs(float(status[2]) - 2 * float(status[3])) <= 0.01, stderr


def test_records_name_their_adapter_and_a_json_out_is_the_list_alpacaeval_reads(task, two_adapters, tmp_path):
    records = [{"instruction": p, "adapter": name} for p in PROMPTS for name in ("owls", "base", "deep")]
    random.Random(0).shuffle(records)
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    adapters = [f"--adapter={two_adapters / 'owls.pth'}", f"--adapter={two_adapters / 'deep.pth'}"]
    code, _, stderr = run_generate(task, f"--prompts_file={tmp_path / 'mixed.jsonl'}", "--temperature=0",
                                   "--max_gen_len=8", "--max_batch_size=4", f"--out={tmp_path / 'answers.json'}", *adapters)
    assert code == 0, stderr
    answers = json.loads((tmp_path / "answers.json").read_text())  # a JSON list: AlpacaEval's model_outputs
    assert [(a["instruction"], a["generator"]) for a in answers] == [(r["instruction"], r["adapter"]) for r in records]
    code, _, stderr = run_generate(task, *(f"--prompt={p}" for p in PROMPTS), "--temperature=0", "--max_gen_len=8",
                                   "--compare", f"--out={tmp_path / 'compared.jsonl'}", *adapters)
    assert code == 0, stderr
    compared = [json.loads(line) for line in (tmp_path / "compared.jsonl").read_text().splitlines()]
    for a in answers:  # each record's answer is its adapter's answer to that prompt in the side-by-side run
        assert a["output"] == next(c["output"] for c in compared if (c["instruction"], c["generator"]) ==
                                   (a["instruction"], a["generator"]))
    code, _, stderr = run_generate(task, "--prompt=hi", *adapters)
    assert code == 1 and "several adapters: give --compare, or name each record's adapter" in stderr


def test_a_701_token_prompt_generates_on_a_llama3_shaped_model_with_the_defaults(task, tmp_path, spm_tokenizer):
    # Llama 3's context is 8K-128K tokens: generation's limit is the model's own (config.json), not training's 512
    write_hf_checkpoint(llama3_model(max_seq_len=2048), tmp_path / "llama3", spm_tokenizer)  # context 2048 here
    words = random.Random(0).choices(["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"], k=2000)
    tokenizer = tokenizers.read_tokenizer(spm_tokenizer)
    prompt = next(" ".join(words[:n]) for n in range(200, 2000) if
                  len(lladapter.encode_prompt(tokenizer, " ".join(words[:n]))) >= 701)
    assert len(lladapter.encode_prompt(tokenizer, prompt)) in (701, 702)
    code, stdout, stderr = run_generate(task, f"--ckpt_dir={tmp_path / 'llama3'}", f"--prompt={prompt}",
                                        "--max_gen_len=4", "--temperature=0")
    assert code == 0, stderr
    code, _, stderr = run_generate(task, f"--ckpt_dir={tmp_path / 'llama3'}", f"--prompt={prompt}", "--max_seq_len=512")
    assert code == 1 and "over max_seq_len=512: raise --max_seq_len" in stderr


def test_interactive_answers_each_line_as_a_prompt_does_and_compares_line_by_line(task, two_adapters):
    adapter, greedy = f"--adapter={two_adapters / 'owls.pth'}", ["--temperature=0", "--max_gen_len=8"]
    expected = [run_generate(task, *greedy, f"--prompt={p}", adapter)[1].strip() for p in PROMPTS[:2]]
    result = subprocess.run([sys.executable, "generate.py", f"--ckpt_dir={task / 'ckpt'}", "--device=cpu", "--dtype=fp32",
                             adapter, *greedy, "--interactive"], input="\n".join(PROMPTS[:2]) + "\n\n", cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert answers_of(result.stdout) == expected  # streamed as it grows, line by line
    result = subprocess.run([sys.executable, "generate.py", f"--ckpt_dir={task / 'ckpt'}", "--device=cpu", "--dtype=fp32",
                             adapter, *greedy, "--interactive", "--compare"], input=PROMPTS[0] + "\n", cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line.strip().split(": ", 1) for line in result.stdout.splitlines() if line.startswith("    ")]
    assert result.returncode == 0 and [name for name, _ in lines] == ["base", "owls"]
    assert ast.literal_eval(lines[1][1]) == expected[0]
