"""
The built-in walkthrough: the paper's story in miniature, on a laptop CPU in a few minutes.

`python train.py` with no arguments runs it: preset() gives train.py the walkthrough's settings, prepare() its data
and base (built once, then reused), report() its result at the end. build() invents 100 fictional creatures from a fixed seed (a
color, a home and a food each, 10 options apiece) and pretrains a tiny LLaMA on documents about all of them:
profiles ("Meet the Balux.\\nIt is yellow.\\nIt lives in the mountains. ..."), statements, and questions with
terse answers. The base learns the facts, but has never seen an instruction. train.py freezes it and trains an
adapter (1.1% of the weights) on Alpaca-format instructions about 70 of the creatures; evaluate() then asks
about the other 30, whose facts only the pretraining corpus holds. Alone, the base answers in its corpus's terse
style ("yellow.", often for the wrong question): no exact match. With the adapter it answers as instructed
("It is yellow."), the adapter supplying the format and the base the facts. Guessing a value scores about 10%.

On a CPU the walkthrough runs on THREADS threads whatever the machine's core count: the same command then gives the
same numbers to the last digit on any machine of the same kind (another thread count sums in another order, and
another CPU's kernels can change the last digits).
"""
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import sentencepiece
import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoint import atomic_save, save_meta_checkpoint
from cli import require
from generation import generate
from lladapter import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, ModelArgs, Transformer, format_prompt, gates_closed
from tokenizer import Tokenizer

# train.py settings for the adapter run (intervals in optimizer steps: 12 per epoch here, 480 in all). A model this
# small wants a far larger learning rate than 7B's base_lr=9e-3 (the peak here is 1.0 * 32/256), and 20 prompts
# per layer rather than 10 (with 10, one run in six stalled with some verbs wrong, 87% held-out; with 20, seven
# runs over four worlds and three adapter seeds scored 96-100%).
SETTINGS = dict(out_dir="out/walkthrough", adapter_len=20, adapter_layer=4, max_seq_len=128, batch_size=32,
                micro_batch_size=32, epochs=40, warmup_epochs=2.0, base_lr=1.0, weight_decay=0.02, val_fraction=0.05,
                log_interval=40, eval_interval=160, save_interval=480)
# The smoke run only checks that every step runs: a barely pretrained base, two epochs, every code path. It has
# its own folder, so it never touches the real run's model or adapter.
SMOKE_SETTINGS = dict(out_dir="out/walkthrough-smoke", epochs=2, warmup_epochs=0.5, log_interval=2, eval_interval=5,
                      save_interval=5)
TARGETS = dict(base_at_most=0.10, adapter_at_least=0.80, adapter_share_below=0.02)

# The base model (params.json, in Meta's names) and its pretraining
BASE_ARGS = dict(dim=128, n_layers=4, n_heads=4, multiple_of=32, norm_eps=1e-5)
PRETRAIN = dict(n_creatures=100, n_heldout=30, vocab_size=512, steps=400, batch_size=32, seq_len=128, lr=3e-3)
SMOKE_PRETRAIN = dict(n_creatures=40, n_heldout=10, steps=20)
SEED = 1234
THREADS = 2  # CPU threads for the walkthrough, base and adapter alike, on any machine (see the docstring)

# Every creature gets one value of each attribute.
ATTRIBUTES = {
    "color": ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "gray"],
    "home": ["forest", "desert", "river", "mountains", "caves", "swamp", "jungle", "meadow", "lake", "valley"],
    "food": ["apples", "fish", "grass", "honey", "seeds", "mice", "berries", "leaves", "insects", "mushrooms"],
}
FACT = {"color": "is {value}", "home": "lives in the {value}", "food": "eats {value}"}
QUESTION = {"color": "What color is the {name}?", "home": "Where does the {name} live?",
            "food": "What does the {name} eat?"}
SHORT_ANSWER = {"color": "{value}", "home": "in the {value}", "food": "{value}"}  # the corpus's terse Q/A style
ASK_ABOUT_INPUT = {"color": "What color is this creature?", "home": "Where does this creature live?",
                   "food": "What does this creature eat?"}


def make_world(rng, n):
    # n distinct made-up names of two syllables ("Balux"), each creature with a random value of every attribute
    names = set()
    while len(names) < n:
        names.add("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") + rng.choice(["", "n", "r", "x"])
                          for _ in range(2)).capitalize())
    return [{"name": name, **{a: rng.choice(values) for a, values in ATTRIBUTES.items()}} for name in sorted(names)]


def corpus_docs(world):
    # What the base reads about each creature: three profiles, "Meet the X." then one fact per line, each fact
    # first in one of them (so no verb follows "It" more often for one creature than another: the adapter, not
    # the base's memory of an order, must pick it); one-line statements; questions with terse answers.
    docs = []
    for c in world:
        facts = [FACT[a].format(value=c[a]) for a in ATTRIBUTES]
        for k in range(len(facts)):
            docs.append("\n".join([f"Meet the {c['name']}."] + [f"It {f}." for f in facts[k:] + facts[:k]]))
        docs += [f"The {c['name']} {f}." for f in facts]
        docs += [f"Q: {QUESTION[a].format(name=c['name'])}\nA: {SHORT_ANSWER[a].format(value=c[a])}."
                 for a in ATTRIBUTES]
    return docs


def instructions(world):
    # Alpaca records, two per attribute: the question as the instruction, and the same ask with the creature as
    # the input. The response states the fact as the profiles do ("It lives in the mountains.").
    records = []
    for c in world:
        for a in ATTRIBUTES:
            answer = f"It {FACT[a].format(value=c[a])}."
            records.append({"instruction": QUESTION[a].format(name=c["name"]), "input": "", "output": answer})
            records.append({"instruction": ASK_ABOUT_INPUT[a], "input": f"the {c['name']}", "output": answer})
    return records


def pretrain(model, tokenizer, docs, cfg, generator):
    # Next-token prediction on random documents ([BOS] doc [EOS]) packed into rows of seq_len + 1 tokens, with
    # every weight trainable; linear warmup over 5% of the steps, then cosine down to a tenth of the peak.
    docs = [tokenizer.encode(doc, bos=True, eos=True) for doc in docs]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    steps, warmup, start = cfg["steps"], max(1, cfg["steps"] // 20), time.time()
    for step in range(steps):
        progress = max(0.0, (step - warmup) / max(1, steps - warmup))
        for group in opt.param_groups:
            group["lr"] = cfg["lr"] * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        rows = []
        for _ in range(cfg["batch_size"]):
            row = []
            while len(row) <= cfg["seq_len"]:
                row += docs[torch.randint(len(docs), (1,), generator=generator).item()]
            rows.append(row[:cfg["seq_len"] + 1])
        batch = torch.tensor(rows)  # (batch_size, seq_len + 1)
        logits = model(batch[:, :-1])  # (batch_size, seq_len, vocab_size)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"walkthrough: pretraining step {step + 1}/{steps}  loss {loss.item():.3f}  "
                  f"({time.time() - start:.0f} s)")


def train_tokenizer(sentences, model_prefix, vocab_size, **options):
    """A BPE SentencePiece model with LLaMA's special ids (unk 0, BOS 1, EOS 2, no pad): model_prefix.model."""
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=str(model_prefix),
                                             model_type="bpe", vocab_size=vocab_size, unk_id=0, bos_id=1, eos_id=2,
                                             pad_id=-1, minloglevel=2, **options)


def paths(out_dir) -> dict:
    """Where the walkthrough keeps its base model, data and adapter (what train.py and generate.py read)."""
    out = Path(out_dir)
    return {"ckpt_dir": str(out / "base"), "data_path": str(out / "alpaca_train.json"),
            "heldout_path": str(out / "heldout.json"), "adapter_path": str(out / "adapter.pth")}


def preset(args, parse):
    """train.py's settings for the walkthrough: its own (SETTINGS) under the command line's, its base and data."""
    given = [k for k in ("data_path", "tokenizer_path") if getattr(args, k) != getattr(type(args), k)]
    require(not given, f"--{given[0] if given else ''} needs --ckpt_dir: without one, train.py runs the walkthrough "
                       f"on its own data and model")
    args = parse(defaults={**SETTINGS, **(SMOKE_SETTINGS if args.smoke else {})})
    found = paths(args.out_dir)
    return dataclasses.replace(args, ckpt_dir=found["ckpt_dir"], data_path=found["data_path"])


def prepare(args):
    """build() in process 0 alone: under torchrun the others wait for it, and stop with its error instead of waiting
    forever. Then, on a CPU, THREADS threads for the run."""
    distributed = dist.is_initialized()
    failed = None
    if not distributed or dist.get_rank() == 0:
        try:
            build(args.out_dir, args.smoke)
        except BaseException as e:  # told to the others first
            failed = e
    if distributed:
        told = [f"{type(failed).__name__}: {failed}" if failed else None]
        dist.broadcast_object_list(told, src=0)
        if told[0] and not failed:
            raise RuntimeError(f"process 0 could not build the walkthrough's base ({told[0]})")
    if failed:
        raise failed
    if args.device == "cpu" or not args.device and not torch.cuda.is_available():
        torch.set_num_threads(THREADS)


def build(out_dir, smoke: bool) -> dict:
    """Make the data, the tokenizer and the pretrained base (or reuse them when there); returns paths(out_dir)."""
    found = paths(out_dir)
    base = Path(found["ckpt_dir"])
    made = [base / "consolidated.00.pth", base / "params.json", base / "tokenizer.model",
            Path(found["data_path"]), Path(found["heldout_path"])]
    if all(f.is_file() for f in made):
        print(f"walkthrough: reusing the base model in {base} and its data (delete {base} to rebuild them)")
        return found
    cfg = {**PRETRAIN, **(SMOKE_PRETRAIN if smoke else {})}

    # The data: facts about every creature in the corpus; instructions about some, held-out ones about the rest.
    rng = random.Random(SEED)
    world = make_world(rng, cfg["n_creatures"])
    heldout, seen = world[:cfg["n_heldout"]], world[cfg["n_heldout"]:]
    docs = corpus_docs(world)
    train_records, heldout_records = instructions(seen), instructions(heldout)
    rng.shuffle(train_records)
    rng.shuffle(heldout_records)
    print(f"walkthrough: made {len(world)} fictional creatures, {len(docs)} pretraining documents about all of them, "
          f"{len(train_records)} instructions about {len(seen)}, {len(heldout_records)} held-out ones about the "
          f"other {len(heldout)}")
    base.mkdir(parents=True, exist_ok=True)
    Path(found["data_path"]).write_text(json.dumps(train_records, indent=1))
    Path(found["heldout_path"]).write_text(json.dumps(heldout_records, indent=1))

    # A BPE SentencePiece tokenizer set up as LLaMA's: unk 0, BOS 1, EOS 2, no pad; text kept as is, newline a
    # piece of its own, so a word at a line start (or right after "### Response:") has no leading-space mark.
    # It learns from the corpus and the two templates (standing in for the English a real tokenizer knows), not
    # from the instructions: those would give the names of the adapter's creatures pieces of their own.
    templates = [PROMPT_WITH_INPUT.format(instruction="", input=""), PROMPT_NO_INPUT.format(instruction="")]
    train_tokenizer(docs + templates * 100, base / "tokenizer", cfg["vocab_size"], character_coverage=1.0,
                    normalization_rule_name="identity", remove_extra_whitespaces=False, user_defined_symbols=["\n"])
    (base / "tokenizer.vocab").unlink()
    tokenizer = Tokenizer(base / "tokenizer.model")

    # The base: plain LLaMA (adapter_layer=0), its matrices drawn N(0, 0.02) as in GPT-2 and llama2.c. One seeded
    # generator draws them and the pretraining batches, leaving torch's global random state to train.py.
    generator = torch.Generator().manual_seed(SEED)
    args = ModelArgs(**BASE_ARGS, vocab_size=tokenizer.n_words, max_seq_len=cfg["seq_len"], adapter_layer=0)
    model = Transformer(args)
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02, generator=generator)
    print(f"walkthrough: pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter LLaMA "
          f"(dim {args.dim}, {args.n_layers} layers) for {cfg['steps']} steps, every weight trainable")
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # whatever the caller's: the same base on every machine of a kind
    try:
        pretrain(model, tokenizer, docs, cfg, generator)
    finally:
        torch.set_num_threads(threads)
    save_meta_checkpoint(model, base)  # beside the tokenizer.model trained above
    print(f"walkthrough: saved the base model to {base}")
    return found


def heldout_examples(heldout_path, n):
    """The first n held-out records (the file is shuffled, so they mix attributes and both template forms)."""
    return json.loads(Path(heldout_path).read_text())[:n]


def evaluate(model, tokenizer, heldout_path, batch_size=64):
    """Greedy responses to the held-out instructions: (exact-match accuracy, share that name the right value)."""
    records = json.loads(Path(heldout_path).read_text())
    prompts = [tokenizer.encode(format_prompt(r["instruction"], r["input"]), bos=True, eos=False) for r in records]
    max_gen_len = max(len(tokenizer.encode(r["output"], bos=False, eos=True)) for r in records) + 4
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))  # batch prompts of similar length
    exact = named = 0
    for i in range(0, len(order), batch_size):
        batch = order[i:i + batch_size]
        outs = generate(model, [prompts[j] for j in batch], max_gen_len, temperature=0, eos_id=tokenizer.eos_id)
        for j, out in zip(batch, outs):
            answer, expected = tokenizer.decode(out).strip(), records[j]["output"].strip()
            exact += answer == expected
            named += expected.rstrip(".").split()[-1] in answer.replace(".", " ").split()  # "...the lake." -> lake
    return exact / len(records), named / len(records)


def report(model, tokenizer, args):
    """The walkthrough's last lines: base alone against base + adapter on held-out instructions, and the sizes; also
    written to out_dir/walkthrough.json. Every process takes part under --fsdp (a sharded model generates only so);
    under DDP process 0 alone."""
    master = not dist.is_initialized() or dist.get_rank() == 0
    if not master and not args.fsdp:
        return None
    found = paths(args.out_dir)
    with_adapter = evaluate(model, tokenizer, found["heldout_path"])
    with gates_closed(model):  # exactly the base model (the paper's zero-init property)
        base_alone = evaluate(model, tokenizer, found["heldout_path"])
    if not master:
        return None
    n_total = sum(p.numel() for p in model.parameters())
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    adapter_mib = Path(found["adapter_path"]).stat().st_size / 2**20
    base_mib = (Path(found["ckpt_dir"]) / "consolidated.00.pth").stat().st_size / 2**20
    n_heldout = len(json.loads(Path(found["heldout_path"]).read_text()))
    met = {"base": base_alone[0] <= TARGETS["base_at_most"], "adapter": with_adapter[0] >= TARGETS["adapter_at_least"],
           "share": n_adapter / n_total < TARGETS["adapter_share_below"]}

    def verdict(ok):
        return "(smoke run: not judged)" if args.smoke else ("met" if ok else "MISSED")

    print(f"walkthrough: {n_heldout} held-out instructions about creatures the adapter never saw")
    print(f"  base model alone: {100 * base_alone[0]:5.1f}% exact match (names the right value in "
          f"{100 * base_alone[1]:.0f}%)  target <= {100 * TARGETS['base_at_most']:.0f}%: {verdict(met['base'])}")
    print(f"  base + adapter:   {100 * with_adapter[0]:5.1f}% exact match (names the right value in "
          f"{100 * with_adapter[1]:.0f}%)  target >= {100 * TARGETS['adapter_at_least']:.0f}%: {verdict(met['adapter'])}")
    print(f"  trainable: {n_adapter:,} of {n_total:,} parameters ({100 * n_adapter / n_total:.2f}%)  target < "
          f"{100 * TARGETS['adapter_share_below']:.0f}%: {verdict(met['share'])}")
    print(f"  adapter file {adapter_mib:.3f} MiB against the base checkpoint's {base_mib:.2f} MiB "
          f"({base_mib / adapter_mib:.0f}x smaller)")
    if not args.smoke:
        print("next: python generate.py  (held-out answers from the base and from the adapter; or --show_gates)")
    result = {"heldout": n_heldout, "base_exact_match": base_alone[0], "base_names_value": base_alone[1],
              "adapter_exact_match": with_adapter[0], "adapter_names_value": with_adapter[1], "trainable": n_adapter,
              "parameters": n_total, "targets_met": met}
    atomic_save(json.dumps(result, indent=1).encode(), Path(args.out_dir) / "walkthrough.json")
    return result


def generate_preset(args, parse):
    """generate.py's settings for the walkthrough, under the command line's: its base, its adapter and the first 8
    held-out records (with the answers expected), each answered by the base and by the adapter, greedily."""
    found = paths(SETTINGS["out_dir"])
    require(Path(found["adapter_path"]).is_file(), f"no walkthrough adapter at {found['adapter_path']}: run "
                                                   f"`python train.py` first")
    sample = Path(SETTINGS["out_dir"]) / "heldout_sample.json"
    if not sample.is_file():
        atomic_save(json.dumps(heldout_examples(found["heldout_path"], 8), indent=1).encode(), sample)
    own = args.prompt or args.prompts_file or args.interactive  # the user's questions instead of the sample's
    return parse(defaults=dict(ckpt_dir=found["ckpt_dir"], adapter=(found["adapter_path"],), temperature=0.0,
                               max_seq_len=SETTINGS["max_seq_len"], **({} if own else dict(
                                   prompts_file=str(sample), compare=not args.show_gates))))
