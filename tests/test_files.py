"""Slow tier: damaged, lying and foreign files are refused in one line naming the file and the tensor or record; what
the formats cannot detect loads unchanged values."""
import io
import json
import pickle
import random
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import checkpoint
import lladapter
from cli import InputError

from tests.fixtures import safetensors_layout, write_raw_safetensors, DEVICE, tiny_model, tokens, write_meta_checkpoint, hf_state_dict, write_hf_checkpoint, base_logits

def test_corrupted_checkpoint_shape_is_refused_naming_the_tensor(tmp_path, spm_tokenizer):
    write_meta_checkpoint(tiny_model(), tmp_path)
    shard = torch.load(tmp_path / "consolidated.00.pth")
    shard["layers.1.feed_forward.w3.weight"] = shard["layers.1.feed_forward.w3.weight"][:-1]
    torch.save(shard, tmp_path / "consolidated.00.pth")
    with pytest.raises(InputError, match=r"layers\.1\.feed_forward\.w3\.weight has shape \[191, 64\].*\[192, 64\]"):
        checkpoint.load_llama(tmp_path, tokenizer_path=spm_tokenizer, device="cpu", adapter_layer=2, adapter_len=3)


def test_missing_checkpoint_files_are_named(tmp_path, spm_tokenizer):
    with pytest.raises(InputError, match="neither Meta's layout .params.json"):
        checkpoint.load_llama(tmp_path, tokenizer_path=spm_tokenizer)
    write_meta_checkpoint(tiny_model(), tmp_path)
    (tmp_path / "consolidated.00.pth").unlink()
    with pytest.raises(InputError, match="no consolidated"):
        checkpoint.load_llama(tmp_path, tokenizer_path=spm_tokenizer)
    with pytest.raises(InputError, match="nothere.model: no such tokenizer"):
        checkpoint.load_llama(tmp_path, tokenizer_path=tmp_path / "nothere.model")


def test_adapter_in_the_original_layout_with_zero_gates_everywhere_loads(tmp_path):
    model = tiny_model(open_gates=True)
    state = lladapter.adapter_state_dict(model)
    for i in range(model.first_adapted):  # the original's extra, zero gates for the layers it did not adapt
        state[f"layers.{i}.attention.gate"] = torch.zeros_like(state["layers.3.attention.gate"], dtype=torch.float16)
    torch.save(state, tmp_path / "original.pth")
    fresh = tiny_model()
    checkpoint.load_adapter(fresh, tmp_path / "original.pth")
    with torch.no_grad():
        assert torch.equal(fresh(tokens()), model(tokens()))
    state["layers.0.attention.gate"].view(-1)[0] = 0.1  # a gate this model does not have is not silently dropped
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(InputError, match=r"unexpected \['layers.0.attention.gate'\]"):
        checkpoint.load_adapter(fresh, tmp_path / "bad.pth")


def test_full_checkpoint_and_adapter_file_are_not_mistaken_for_each_other(tmp_path, spm_tokenizer):
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "full.pth")
    with pytest.raises(InputError, match="a full checkpoint"):
        checkpoint.load_adapter(model, tmp_path / "full.pth")
    ckpt = tmp_path / "ckpt"
    write_meta_checkpoint(model, ckpt)
    torch.save(lladapter.adapter_state_dict(model), ckpt / "consolidated.00.pth")
    with pytest.raises(InputError, match="an adapter file, not a base checkpoint"):
        checkpoint.load_llama(ckpt, tokenizer_path=spm_tokenizer, adapter_layer=2, adapter_len=3)


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the pickle ran code"))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, spm_tokenizer):
    marker = tmp_path / "pwned"
    evil = {"adapter_query.weight": torch.zeros(6, 64), "x": RunsCodeWhenUnpickled(str(marker))}
    torch.save(evil, tmp_path / "adapter.pth")
    with pytest.raises(InputError, match="refused to unpickle"):
        checkpoint.load_adapter(tiny_model(), tmp_path / "adapter.pth")
    ckpt = tmp_path / "ckpt"
    write_meta_checkpoint(tiny_model(), ckpt)
    torch.save(evil, ckpt / "consolidated.00.pth")
    with pytest.raises(InputError, match="refused to unpickle"):
        checkpoint.load_llama(ckpt, tokenizer_path=spm_tokenizer, adapter_layer=2, adapter_len=3)
    assert not marker.exists()
    pickle.loads(pickle.dumps(RunsCodeWhenUnpickled(str(marker))))  # the payload is real: plain pickle runs it
    assert marker.exists()






def test_safetensors_data_need_not_be_aligned_to_the_element_size(tmp_path, spm_tokenizer):
    # The format packs tensors back to back: after a 6-byte tensor (here the rope table old Hugging Face files carry,
    # which is not a weight) every F32 tensor starts 2 bytes off a multiple of 4, and still loads.
    model = tiny_model(seed=3)
    hf = tmp_path / "hf"
    write_hf_checkpoint(model, hf, spm_tokenizer)
    state = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(3, dtype=torch.float16),
             **hf_state_dict(model)}
    write_raw_safetensors(hf / "model.safetensors", *safetensors_layout(state))
    x = tokens()
    write_meta_checkpoint(model, tmp_path / "meta")
    torch.testing.assert_close(base_logits(hf, x), base_logits(tmp_path / "meta", x, tokenizer_path=spm_tokenizer),
                               rtol=1e-5, atol=1e-5)


def one_line_error(call, *names):
    """The message of the InputError that call() raises: one line, naming each of `names`."""
    with pytest.raises(InputError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(str(name) in message for name in names), message
    return message


def test_safetensors_header_that_lies_is_refused_in_one_line_naming_the_file_and_tensor(tmp_path, spm_tokenizer):
    model = tiny_model()
    hf = tmp_path / "hf"
    write_hf_checkpoint(model, hf, spm_tokenizer)
    file, q = hf / "model.safetensors", "model.layers.1.self_attn.q_proj.weight"
    header, data = safetensors_layout(hf_state_dict(model))
    begin, end = header[q]["data_offsets"]
    lies = {  # q_proj's entry changed: what it then says, and the message that must name it
        "past the end": (dict(data_offsets=[len(data) - 8, len(data) - 8 + end - begin]),
                         f"data offsets [{len(data) - 8}, {len(data) - 8 + end - begin}] lie outside the file's "
                         f"{len(data)} data bytes"),
        "too few bytes": (dict(data_offsets=[begin, end - 4]),
                          "shape [64, 64] in F32 needs 16384 bytes, its offsets hold 16380"),
        "overlapping": (dict(data_offsets=[begin - 256, end - 256]), f"its data starts at byte {begin - 256}"),
        "not a float": (dict(dtype="I32"), "its values are torch.int32"),  # "F32" with one byte flipped
    }
    for lie, (entry, message) in lies.items():
        write_raw_safetensors(file, {**header, q: {**header[q], **entry}}, data)
        assert message in one_line_error(lambda: checkpoint.load_llama(hf, adapter_layer=0), file, q), lie
    state = hf_state_dict(model)  # a true header, but a q_proj one row short of what config.json implies
    write_raw_safetensors(file, *safetensors_layout({**state, q: state[q][:-1]}))
    one_line_error(lambda: checkpoint.load_llama(hf, adapter_layer=0), file, q,
                   "layers.1.attention.wq.weight has shape [63, 64], config.json implies [64, 64]")
    file.write_bytes((len(data) + 100).to_bytes(8, "little") + b"{}" + data)  # a header longer than the file
    one_line_error(lambda: checkpoint.load_llama(hf, adapter_layer=0), file, "header")
    write_raw_safetensors(file, None, data, header_bytes=json.dumps(header).encode()[:-20])  # cut short: not JSON
    one_line_error(lambda: checkpoint.load_llama(hf, adapter_layer=0), file, "not JSON")


def original_export(model, gates_open=True):
    """`model`'s adapter as the original code exported it: a gate for every layer (zero where it did not adapt), the
    prompts of all adapted layers in one [L*K, dim] tensor, and no description of itself."""
    state = lladapter.adapter_state_dict(model)
    for i in range(model.first_adapted):
        state[f"layers.{i}.attention.gate"] = torch.zeros(1, model.args.n_heads, 1, 1)
    if not gates_open:
        state = {k: torch.zeros_like(v) if k.endswith(".gate") else v for k, v in state.items()}
    return state


def test_original_layout_adapter_tells_its_K_and_L_by_its_nonzero_gates(tmp_path, spm_tokenizer):
    source = tiny_model(open_gates=True, adapter_layer=3, adapter_len=2)
    write_meta_checkpoint(source, tmp_path / "ckpt")
    path = tmp_path / "original.pth"
    torch.save(original_export(source), path)
    assert checkpoint.read_adapter(path, {"dim": 64, "n_layers": 4, "n_heads": 4}).settings() == \
        {"adapter_len": 2, "adapter_layer": 3, "image_dim": 0}
    model, _ = checkpoint.load_llama(tmp_path / "ckpt", spm_tokenizer, adapter_path=path, device=DEVICE)
    assert (model.args.adapter_layer, model.args.adapter_len) == (3, 2)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=1e-5, atol=1e-5)
    # With every gate zero (an untrained export) nothing tells which layers it adapts: the user is asked, and then
    # the prompts load into those layers.
    torch.save(original_export(source, gates_open=False), path)
    one_line_error(lambda: checkpoint.load_llama(tmp_path / "ckpt", spm_tokenizer, adapter_path=path), path,
                   "every gate is zero", "give --adapter_layer and --adapter_len")
    model, _ = checkpoint.load_llama(tmp_path / "ckpt", spm_tokenizer, adapter_path=path, adapter_layer=3,
                                     adapter_len=2)
    assert torch.equal(model.adapter_query.weight, source.adapter_query.weight)


def test_adapter_for_another_base_is_refused_naming_both_shapes(tmp_path, spm_tokenizer):
    write_meta_checkpoint(tiny_model(), tmp_path / "ckpt")
    adapter = tmp_path / "adapter.pth"
    checkpoint.save_adapter(tiny_model(dim=32, n_heads=2), adapter)
    one_line_error(lambda: checkpoint.load_llama(tmp_path / "ckpt", spm_tokenizer, adapter_path=adapter), adapter,
                   "trained on dim=32, n_layers=4, n_heads=2", "this base has dim=64, n_layers=4, n_heads=4")


def test_adapter_in_our_older_layout_without_its_config_still_loads(tmp_path, spm_tokenizer):
    source = tiny_model(open_gates=True)  # L=2, K=3: only the adapted layers' gates, as we saved before the config
    write_meta_checkpoint(source, tmp_path / "ckpt")
    torch.save(lladapter.adapter_state_dict(source), tmp_path / "older.pth")
    model, _ = checkpoint.load_llama(tmp_path / "ckpt", spm_tokenizer, adapter_path=tmp_path / "older.pth", device=DEVICE)
    assert (model.args.adapter_layer, model.args.adapter_len) == (2, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), source(tokens()), rtol=1e-5, atol=1e-5)


# ---- damaged files and bad settings -----------------------------------------------------------------------

def record_spans(data: bytes) -> dict:
    """{record name: (first byte, end)} of the data each record of a zip (a torch file) holds."""
    spans = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for r in archive.infolist():
            name_len, extra_len = struct.unpack_from("<HH", data, r.header_offset + 26)  # from the record's own header
            start = r.header_offset + 30 + name_len + extra_len
            spans[r.filename] = (start, start + r.compress_size)
    return spans


def flipped(data: bytes, positions, seed=0):
    """(position, data with that byte changed), for each position: XOR-ed with a seeded random nonzero byte."""
    rng = random.Random(seed)
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= rng.randrange(1, 256)
        yield position, bytes(damaged)


def truncations(data: bytes):
    return [0, 1, 7, 8, 30, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 22, len(data) - 1]


def test_damaged_adapter_file_is_refused_in_one_line_and_never_loads_other_values(tmp_path):
    source, model = tiny_model(open_gates=True), tiny_model()
    good, bad = tmp_path / "adapter.pth", tmp_path / "damaged.pth"
    checkpoint.save_adapter(source, good)
    data = good.read_bytes()
    for n in truncations(data):
        bad.write_bytes(data[:n])
        one_line_error(lambda: checkpoint.load_adapter(model, bad), bad)
    # torch.load checks no CRC32; load_adapter does (torch_load with verify), so a flip in any record is refused:
    # the tensors' bytes, the pickle, the format's own records. A flip elsewhere lands in the zip's structure, and
    # is refused too, except in the few bytes no reader uses (alignment padding, a record's attributes or time):
    # then the file must load exactly the adapter that was saved.
    records = list(record_spans(data).values())
    in_records = 0
    for position, damaged in flipped(data, random.Random(1).sample(range(len(data)), 400)):
        bad.write_bytes(damaged)
        in_records += any(start <= position < end for start, end in records)
        model.reset_adapter()
        try:
            checkpoint.load_adapter(model, bad)
        except InputError as e:
            assert "\n" not in str(e) and str(bad) in str(e), str(e)
            continue
        assert not any(start <= position < end for start, end in records), position
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in lladapter.adapter_state_dict(model).items())
    assert in_records > 150  # the sample did reach the records: most of the file (all but 0.13% of a 7B adapter)


def test_damaged_base_checkpoint_is_refused_on_load_in_its_pickle_and_by_tools_verify_anywhere(tmp_path, spm_tokenizer):
    from tools import verify
    model = tiny_model(n_layers=1, adapter_layer=1)  # few tensors: torch.load's unpickler is slow
    ckpt = tmp_path / "ckpt"
    write_meta_checkpoint(model, ckpt)
    file = ckpt / "consolidated.00.pth"
    data = file.read_bytes()
    for n in truncations(data):
        file.write_bytes(data[:n])
        one_line_error(lambda: checkpoint.load_llama(ckpt, spm_tokenizer, adapter_layer=0), file)
        assert verify.problem_of(file), n
    # A base checkpoint is memory-mapped and only its pickle is checked on load (the rest would be a 13 GB read): a
    # flip there is always refused. `python -m tools.verify` checks the whole file: a flip anywhere in a record
    # (tensor bytes included) or in the zip's structure is found, or lands where no reader looks and the file loads
    # exactly its values.
    file.write_bytes(data)
    expected = checkpoint.torch_load(file)
    spans = record_spans(data)
    pickle = range(*next(span for name, span in spans.items() if name.endswith("/data.pkl")))
    for position, damaged in flipped(data, random.Random(2).sample(pickle, 60)):
        file.write_bytes(damaged)
        one_line_error(lambda: checkpoint.torch_load(file, mmap=True), file)  # as load_llama reads it
        assert verify.problem_of(file), position
    in_records = 0
    for position, damaged in flipped(data, random.Random(3).sample(range(len(data)), 300)):
        file.write_bytes(damaged)
        in_records += any(start <= position < end for start, end in spans.values())
        if verify.problem_of(file):
            continue
        assert not any(start <= position < end for start, end in spans.values()), position
        state = checkpoint.torch_load(file, mmap=True)
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state), position
    assert in_records > 150  # the sample did reach the records (the tensors' bytes are most of the file)


def test_damaged_safetensors_header_is_refused_in_one_line_or_loads_unchanged(tmp_path, spm_tokenizer):
    model = tiny_model()
    hf = tmp_path / "hf"
    write_hf_checkpoint(model, hf, spm_tokenizer)
    file = hf / "model.safetensors"
    data = file.read_bytes()
    for n in truncations(data):
        file.write_bytes(data[:n])
        one_line_error(lambda: checkpoint.load_llama(hf, adapter_layer=0), file)
    # The format has no checksum: a flip among the tensors' bytes is undetectable. One in the header length or the
    # JSON header is refused, or lands where it changes nothing (a space of the padding turned into a tab, say).
    file.write_bytes(data)
    expected = {k: v.clone() for k, v in checkpoint.load_llama(hf, adapter_layer=0)[0].state_dict().items()}
    header_end = 8 + int.from_bytes(data[:8], "little")
    caught = 0
    for position, damaged in flipped(data, random.Random(3).sample(range(header_end), 150)):
        file.write_bytes(damaged)
        try:
            loaded, _ = checkpoint.load_llama(hf, adapter_layer=0)
        except InputError as e:  # naming the file, or the folder and the name a flip made up
            assert "\n" not in str(e) and (str(file) in str(e) or f"{hf}: the weights don't match" in str(e)), str(e)
            caught += 1
            continue
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items()), position
    assert caught > 100


def test_files_that_are_not_utf8_are_refused_in_one_line(tmp_path, spm_tokenizer):
    write_meta_checkpoint(tiny_model(), tmp_path / "meta")
    write_hf_checkpoint(tiny_model(), tmp_path / "hf", spm_tokenizer)
    for file in (tmp_path / "meta" / "params.json", tmp_path / "hf" / "config.json"):
        file.write_bytes(b"\xff\xfe{" + file.read_bytes())
        one_line_error(lambda: checkpoint.load_llama(file.parent, spm_tokenizer), file, "not UTF-8 text")


def test_shard_index_without_a_map_of_file_names_is_refused_in_one_line(tmp_path, spm_tokenizer):
    write_hf_checkpoint(tiny_model(), tmp_path, spm_tokenizer, "two shards")
    index = tmp_path / "model.safetensors.index.json"
    for text in ['[]', '{"metadata": {}}', '{"weight_map": {"lm_head.weight": 2}}']:
        index.write_text(text)
        one_line_error(lambda: checkpoint.load_llama(tmp_path, adapter_layer=0), index, "no 'weight_map'")


def test_a_base_read_from_hugging_face_saves_in_metas_layout_with_its_stated_swiglu_width_and_reloads(tmp_path,
                                                                                                      spm_tokenizer):
    # Hugging Face states the SwiGLU width (intermediate_size); 176 is no rounding of Meta's rule for dim 64, so it
    # travels in params.json as hidden_dim: train.py --mode=full saves the model it trained in Meta's layout so
    model = tiny_model(seed=3, hidden_dim=176)
    write_hf_checkpoint(model, tmp_path / "hf", spm_tokenizer)
    loaded, tokenizer = checkpoint.load_llama(tmp_path / "hf", device="cpu", adapter_layer=0, max_seq_len=64)
    assert loaded.args.hidden_dim == 176 and loaded.layers[0].feed_forward.w1.weight.shape == (176, 64)
    checkpoint.save_meta_checkpoint(loaded, tmp_path / "meta", tokenizer)
    assert json.loads((tmp_path / "meta" / "params.json").read_text())["hidden_dim"] == 176
    again, _ = checkpoint.load_llama(tmp_path / "meta", device="cpu", adapter_layer=0, max_seq_len=64)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(again(x), loaded(x))
