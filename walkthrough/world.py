"""
The built-in walkthrough: the paper's story in miniature, on a laptop CPU in a few minutes.

`python train.py` with no arguments runs it: preset() gives train.py the walkthrough's settings (and refuses, before
any work, those the walkthrough's base can't take), prepare() its data and base, report() its result at the end.
build() invents 100 fictional creatures from a fixed seed (a color, a home and a food each, 10 options apiece) and
pretrains a tiny LLaMA on documents about all of them: profiles ("Meet the Balux.\\nIt is yellow.\\nIt lives in the
mountains. ..."), statements, and questions with terse answers. The base learns the facts, but has never seen an
instruction. train.py freezes it and trains an adapter (1.1% of the weights) on Alpaca-format instructions about 70
of the creatures; evaluate() then asks about the other 30, whose facts only the pretraining corpus holds. Alone, the
base answers in its corpus's terse style ("yellow.", often for the wrong question): no exact match. With the adapter
it answers as instructed ("It is yellow."), the adapter supplying the format and the base the facts. Guessing a
value scores about 10%.

One base for every run: the base, its tokenizer and its data are made once into a folder beside the run's out_dir,
named from a short hash of what they are made from (the world's and the pretraining's settings: base_dir()), and
found there again by every walkthrough run with those settings, whatever its adapter settings; the smoke run's other
pretraining gets a folder of its own. A run that changes the adapter's recipe (RECIPE: K, L, epochs, ...) is a
variant: it reports beside the default run's result (the folder named as SETTINGS' out_dir, beside its own) instead
of judging TARGETS, and writes to a folder of its own (out/walkthrough-L2) unless --out_dir names one.

On a CPU the walkthrough runs on THREADS threads whatever the machine's core count: the same command then gives the
same numbers to the last digit on any machine of the same kind (another thread count sums in another order, and
another CPU's kernels can change the last digits).
"""
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import shutil
import time
import uuid
from pathlib import Path

import sentencepiece
import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoint import atomic_save, save_meta_checkpoint
from cli import read_json, require
from generation import generate
from lladapter import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, ModelArgs, Transformer, format_prompt, gates_closed
from tokenizer import SentencePieceTokenizer

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
# The train.py settings that make a walkthrough run another experiment, a variant: reported beside the default run's
# result, not judged against TARGETS (which are the default recipe's). The others change how the same run is computed
# or kept (--dtype, --quantize, --device, --compile, micro-batches, intervals, --out_dir), and are judged as it is.
RECIPE = ("mode", "variant", "template", "adapter_len", "adapter_layer", "image_dim", "max_seq_len", "val_fraction",
          "batch_size", "epochs", "warmup_epochs", "base_lr", "weight_decay", "beta1", "beta2", "seed")
# A variant's folder, when no --out_dir is given: the default's, then each change (out/walkthrough-L2, -no_gate)
SHORT_NAMES = {"adapter_len": "K", "adapter_layer": "L", "mode": "", "variant": ""}

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
    """A BPE SentencePiece model with LLaMA's special ids (unk 0, BOS 1, EOS 2, no pad): model_prefix.model; with
    model_prefix None, the model's bytes, returned (a file written by SentencePiece keeps its own path inside)."""
    writer = io.BytesIO() if model_prefix is None else None
    where = {"model_writer": writer} if writer else {"model_prefix": str(model_prefix)}
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_type="bpe", vocab_size=vocab_size,
                                             unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, **where, **options)
    return writer.getvalue() if writer else None


# The walkthrough's tokenizer, set up as LLaMA's: text kept as is, newline a piece of its own, so a word at a line
# start (or right after "### Response:") has no leading-space mark.
TOKENIZER_OPTIONS = dict(character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
                         user_defined_symbols=["\n"])


def pretraining(smoke: bool) -> dict:
    return {**PRETRAIN, **(SMOKE_PRETRAIN if smoke else {})}


def made_from(smoke: bool) -> dict:
    """What the base and its data are made from: the world's settings and the pretraining's (kept beside them as
    settings.json). The code that makes them is not in it: after an edit to that, delete the base's folder."""
    return {"world": dict(seed=SEED, attributes=ATTRIBUTES, fact=FACT, question=QUESTION, short_answer=SHORT_ANSWER,
                          ask_about_input=ASK_ABOUT_INPUT, templates=[PROMPT_WITH_INPUT, PROMPT_NO_INPUT]),
            "tokenizer": TOKENIZER_OPTIONS, "base": BASE_ARGS, "pretraining": pretraining(smoke), "threads": THREADS}


def base_dir(out_dir, smoke: bool) -> Path:
    """The folder of the base, its tokenizer and its data for a walkthrough run in out_dir: beside out_dir, named
    from a short hash of made_from(smoke), so that every run of one world and pretraining finds the same one."""
    digest = hashlib.sha256(json.dumps(made_from(smoke), sort_keys=True).encode()).hexdigest()
    return Path(out_dir).parent / f"walkthrough-base-{digest[:8]}"


def paths(out_dir, smoke=False) -> dict:
    """Where a walkthrough run in out_dir finds its base model and data (in base_dir) and writes its adapter."""
    base = base_dir(out_dir, smoke)
    return {"base_dir": str(base), "ckpt_dir": str(base / "base"), "data_path": str(base / "alpaca_train.json"),
            "heldout_path": str(base / "heldout.json"), "sample_path": str(base / "heldout_sample.json"),
            "adapter_path": str(Path(out_dir) / "adapter.pth")}


# What build() writes into base_dir: all of them or (a folder renamed into place whole) none
BASE_FILES = ("base/consolidated.00.pth", "base/params.json", "base/tokenizer.model", "alpaca_train.json",
              "heldout.json", "heldout_sample.json", "settings.json")


def draw(cfg) -> tuple:
    """The world and its texts, from SEED: (the creatures, pretraining documents about all of them, instructions
    about all but the first n_heldout, held-out instructions about those), the instructions shuffled."""
    rng = random.Random(SEED)
    world = make_world(rng, cfg["n_creatures"])
    heldout, seen = world[:cfg["n_heldout"]], world[cfg["n_heldout"]:]
    train_records, heldout_records = instructions(seen), instructions(heldout)
    rng.shuffle(train_records)
    rng.shuffle(heldout_records)
    return world, corpus_docs(world), train_records, heldout_records


def tokenizer_model(docs, cfg) -> bytes:
    # It learns from the corpus and the two templates (standing in for the English a real tokenizer knows), not from
    # the instructions: those would give the names of the adapter's creatures pieces of their own. In memory: its
    # bytes are then the same wherever they are saved, and a check can read them without writing a file.
    templates = [PROMPT_WITH_INPUT.format(instruction="", input=""), PROMPT_NO_INPUT.format(instruction="")]
    return train_tokenizer(docs + templates * 100, None, cfg["vocab_size"], **TOKENIZER_OPTIONS)


def walkthrough_defaults(args) -> dict:
    """train.py's settings of the default walkthrough run (the smoke run's, with --smoke): SETTINGS over its own."""
    return {**{f.name: f.default for f in dataclasses.fields(args)}, **SETTINGS,
            **(SMOKE_SETTINGS if args.smoke else {})}


def recipe_changes(args) -> dict:
    """{name: value} of the RECIPE settings in which this run differs from the default walkthrough run."""
    defaults = walkthrough_defaults(args)
    return {k: getattr(args, k) for k in RECIPE if getattr(args, k) != defaults[k]}


def default_run_dir(args) -> Path:
    """The default run's folder, which a variant's result is compared with: the default's name, beside out_dir."""
    return Path(args.out_dir).parent / Path(walkthrough_defaults(args)["out_dir"]).name


def flags(changes) -> str:
    return " ".join(f"--{k}={v}" for k, v in changes.items())


def preset(args, parse):
    """train.py's settings for the walkthrough: its own (SETTINGS) under the command line's, its base and data. A
    variant given no --out_dir gets a folder named from its changes (out/walkthrough-L2)."""
    given = [k for k in ("data_path", "tokenizer_path") if getattr(args, k) != getattr(type(args), k)]
    require(not given, f"--{given[0] if given else ''} needs --ckpt_dir: without one, train.py runs the walkthrough "
                       f"on its own data and model")
    args = parse(defaults={**SETTINGS, **(SMOKE_SETTINGS if args.smoke else {}), "out_dir": ""})  # "": not given
    changes, default_out = recipe_changes(args), walkthrough_defaults(args)["out_dir"]
    own = default_out + "".join(f"-{SHORT_NAMES.get(k, k)}{str(v).rpartition(':')[2]}" for k, v in changes.items())
    args = dataclasses.replace(args, out_dir=args.out_dir or own)
    require(not changes or Path(args.out_dir).name != Path(default_out).name,
            f"{flags(changes)} --out_dir={args.out_dir}: that folder is the default run's, which variants are "
            f"compared with: leave --out_dir out (this variant then writes to {own}) or name another")
    check(args)
    found = paths(args.out_dir, args.smoke)
    return dataclasses.replace(args, ckpt_dir=found["ckpt_dir"], data_path=found["data_path"])


def check(args):
    """Refuse, before anything is built, the settings that the walkthrough's base or data would refuse only after
    pretraining. The prompts' lengths come from the walkthrough's tokenizer, trained here in memory (milliseconds)."""
    n_layers = BASE_ARGS["n_layers"]
    require(args.adapter_layer <= n_layers, f"--adapter_layer={args.adapter_layer}: the walkthrough's base has "
                                            f"{n_layers} layers: adapt 1 to {n_layers} of them, or -1 for all but two")
    require(not args.image_dim, f"--image_dim={args.image_dim}: the walkthrough's instructions have no images")
    require(args.template == "alpaca", f"--template={args.template} needs a Llama 3 tokenizer; the walkthrough's is "
                                       f"SentencePiece (--template=alpaca)")
    cfg = pretraining(args.smoke)
    _, docs, train_records, heldout_records = draw(cfg)
    processor = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_model(docs, cfg))
    longest = 1 + max(len(processor.encode(format_prompt(r["instruction"], r["input"])))  # 1: BOS
                      for r in train_records + heldout_records)
    require(args.max_seq_len > longest, f"--max_seq_len={args.max_seq_len}: the walkthrough's prompts take up to "
                                        f"{longest} tokens, each with an answer to come: give more than {longest}")
    n_val = min(len(train_records) - 1, math.ceil(args.val_fraction * len(train_records)))  # train.py's split
    n_train = len(train_records) - n_val
    require(args.batch_size <= n_train, f"--batch_size={args.batch_size}: the walkthrough has {n_train} training "
                                        f"instructions (--val_fraction={args.val_fraction} held out): fewer than that")


def prepare(args):
    """build() in process 0 alone: under torchrun the others wait for it, and stop with its error instead of waiting
    forever. Then, on a CPU, THREADS threads for the run."""
    distributed = dist.is_initialized()
    master = not distributed or dist.get_rank() == 0
    changes, failed = recipe_changes(args), None
    if changes and master:
        print(f"walkthrough: a variant ({flags(changes)}): its adapter and result go to {args.out_dir}, and its "
              f"result is shown beside the default run's ({default_run_dir(args)})")
    if master:
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
    """The base and its data for a walkthrough run in out_dir (make()), or the ones already there; returns
    paths(out_dir, smoke). Made in a folder of their own and renamed into base_dir whole: a run stopped half-way
    leaves nothing there, and of two runs that build at once (two commands started together; under torchrun process
    0 alone builds) the first to finish renames, the other finds that folder there and uses it (on one machine, the
    same bytes as its own: the same seed and threads)."""
    found = paths(out_dir, smoke)
    folder = Path(found["base_dir"])
    if all((folder / f).is_file() for f in BASE_FILES):
        print(f"walkthrough: reusing the base model and its data in {folder} (made once for this world and "
              f"pretraining; delete the folder to make them again)")
        return found
    require(not folder.exists(), f"{folder} lacks some of {', '.join(BASE_FILES)}: delete it to make it again")
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = folder.with_name(f"{folder.name}.building-{uuid.uuid4().hex[:8]}")  # this run's alone
    work.mkdir()
    try:
        make(work, smoke)
        try:
            os.rename(work, folder)  # fails where the folder exists, on every OS (it is never empty)
            print(f"walkthrough: saved the base model and its data to {folder}, for every walkthrough run with "
                  f"these world and pretraining settings")
        except OSError:
            if not all((folder / f).is_file() for f in BASE_FILES):
                raise
            shutil.rmtree(work)
            print(f"walkthrough: another run saved the same base model to {folder} first; using that one")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return found


def make(folder, smoke: bool):
    """The data, the tokenizer and the pretrained base, written into `folder` (BASE_FILES)."""
    cfg = pretraining(smoke)
    # The data: facts about every creature in the corpus; instructions about some, held-out ones about the rest.
    world, docs, train_records, heldout_records = draw(cfg)
    print(f"walkthrough: made {len(world)} fictional creatures, {len(docs)} pretraining documents about all of them, "
          f"{len(train_records)} instructions about {len(world) - cfg['n_heldout']}, {len(heldout_records)} held-out "
          f"ones about the other {cfg['n_heldout']}")
    base = folder / "base"
    base.mkdir()
    (folder / "alpaca_train.json").write_text(json.dumps(train_records, indent=1))
    (folder / "heldout.json").write_text(json.dumps(heldout_records, indent=1))
    # generate.py's sample: the first 8 held-out records (the file is shuffled: they mix attributes and templates)
    (folder / "heldout_sample.json").write_text(json.dumps(heldout_records[:8], indent=1))
    (base / "tokenizer.model").write_bytes(tokenizer_model(docs, cfg))
    tokenizer = SentencePieceTokenizer(base / "tokenizer.model")

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
    save_meta_checkpoint(model, base)  # beside the tokenizer.model written above
    (folder / "settings.json").write_text(json.dumps(made_from(smoke), indent=1))


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
    """The walkthrough's last lines: base alone against base + adapter on held-out instructions, and the sizes, judged
    against TARGETS; a variant's beside the default run's instead. Also written to out_dir/walkthrough.json. Every
    process takes part under --fsdp (a sharded model generates only so); under DDP process 0 alone."""
    master = not dist.is_initialized() or dist.get_rank() == 0
    if not master and not args.fsdp:
        return None
    found = paths(args.out_dir, args.smoke)
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
    changes, default_dir = recipe_changes(args), default_run_dir(args)
    default_file = default_dir / "walkthrough.json"
    default = json.loads(default_file.read_text()) if changes and default_file.is_file() else None
    make_default = "python train.py" + " --smoke" * args.smoke + (
        f" --out_dir={default_dir}" if default_dir != Path(walkthrough_defaults(args)["out_dir"]) else "")

    def verdict(ok):
        return "(smoke run: not judged)" if args.smoke else ("met" if ok else "MISSED")

    print(f"walkthrough: {n_heldout} held-out instructions about creatures the adapter never saw")
    if changes:
        print(f"  a variant ({flags(changes)}): " + (
            f"beside the default run's result in {default_file}, not judged against the targets" if default else
            f"the default run's result is not there yet ({default_file}): `{make_default}` makes it, on this base"))
    base_text = f"{100 * base_alone[0]:5.1f}% exact match (names the right value in {100 * base_alone[1]:.0f}%)"
    adapter_text = f"{100 * with_adapter[0]:5.1f}% exact match (names the right value in {100 * with_adapter[1]:.0f}%)"
    share_text = f"{n_adapter:,} of {n_total:,} parameters ({100 * n_adapter / n_total:.2f}%)"
    if default:
        print(f"  base model alone: {base_text}  the default run: {100 * default['base_exact_match']:.1f}% "
              f"({100 * default['base_names_value']:.0f}%)")
        print(f"  base + adapter:   {adapter_text}  the default run: {100 * default['adapter_exact_match']:.1f}% "
              f"({100 * default['adapter_names_value']:.0f}%)")
        print(f"  trainable: {share_text}  the default run: {default['trainable']:,}")
    elif changes:
        print(f"  base model alone: {base_text}\n  base + adapter:   {adapter_text}\n  trainable: {share_text}")
    else:
        print(f"  base model alone: {base_text}  target <= {100 * TARGETS['base_at_most']:.0f}%: "
              f"{verdict(met['base'])}")
        print(f"  base + adapter:   {adapter_text}  target >= {100 * TARGETS['adapter_at_least']:.0f}%: "
              f"{verdict(met['adapter'])}")
        print(f"  trainable: {share_text}  target < {100 * TARGETS['adapter_share_below']:.0f}%: "
              f"{verdict(met['share'])}")
    print(f"  adapter file {adapter_mib:.3f} MiB against the base checkpoint's {base_mib:.2f} MiB "
          f"({base_mib / adapter_mib:.0f}x smaller)")
    if Path(args.out_dir) == Path(SETTINGS["out_dir"]):
        print("next: python generate.py  (held-out answers from the base and from the adapter; or --show_gates)")
    else:
        print(f"next: python generate.py --adapter={found['adapter_path']}  (held-out answers from the base and from "
              f"this adapter; or --show_gates)")
    if default:
        print(f"      python generate.py --adapter={default_dir / 'adapter.pth'} --adapter={found['adapter_path']} "
              f"--compare  (beside the default run's adapter)")
    result = {"heldout": n_heldout, "base_exact_match": base_alone[0], "base_names_value": base_alone[1],
              "adapter_exact_match": with_adapter[0], "adapter_names_value": with_adapter[1], "trainable": n_adapter,
              "parameters": n_total, "targets_met": met, "changes": changes, "smoke": args.smoke,
              "base": Path(found["base_dir"]).name}
    atomic_save(json.dumps(result, indent=1).encode(), Path(args.out_dir) / "walkthrough.json")
    return result


def generate_preset(args, parse):
    """generate.py's settings for the walkthrough, under the command line's: its base, the adapters given (or the
    default run's) and the first 8 held-out records (with the answers expected), each answered by the base and by
    every adapter, greedily. The base is the one the adapters' runs name in their walkthrough.json (a smoke run's,
    or one beside another folder); the default run's where none does."""
    default = paths(SETTINGS["out_dir"])
    require(args.adapter or Path(default["adapter_path"]).is_file(),
            f"no walkthrough adapter at {default['adapter_path']}: run `python train.py` first")
    bases = set()  # the folders that the given adapters' runs name
    for spec in args.adapter or (default["adapter_path"],):
        run = Path(spec.rpartition("=")[2]).parent  # NAME=PATH or PATH; train.py's adapter.pth is in its out_dir
        if (run / "walkthrough.json").is_file():
            result = read_json(run / "walkthrough.json")
            bases |= {str(run.parent / result["base"])} if "base" in result else set()
    require(len(bases) <= 1, f"these adapters were trained on different walkthrough bases ({', '.join(sorted(bases))})"
                             f": compare adapters of one base")
    base = Path(bases.pop() if bases else default["base_dir"])
    require(all((base / f).is_file() for f in BASE_FILES), f"no walkthrough base in {base}: `python train.py` makes it")
    own = args.prompt or args.prompts_file or args.interactive  # the user's questions instead of the sample's
    return parse(defaults=dict(ckpt_dir=str(base / "base"), adapter=(default["adapter_path"],), temperature=0.0,
                               max_seq_len=SETTINGS["max_seq_len"], **({} if own else dict(
                                   prompts_file=str(base / "heldout_sample.json"), compare=True))))
