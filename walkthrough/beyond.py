"""
Zero-initialized attention beyond LLaMA, in miniature: the paper's last experiments (arXiv 2303.16199 v3,
"zero-initialized attention for other large models") on three small encoders pretrained here, on 2 CPU cores.

    python -m walkthrough.beyond                 # the whole study (about 50 min, estimated), cached in out/beyond, resumable
    python -m walkthrough.beyond --only=vision   # one miniature: vision, text or clip
    python -m walkthrough.beyond --quick         # a smoke run of every code path, well under 2 minutes: numbers meaningless

1. vision: a ViT pretrained to name the shapes and colours in drawn images (ImageNet-21k's part), adapted with
   1,000 examples per task to a VTAB-like suite: which shape on a cluttered background (natural), the fill texture
   (specialized: a few pixels' detail), and which way an asymmetric shape points (structured).
2. text: a BERT-like encoder pretrained by masked-language modelling on the walkthrough's creature corpus
   (walkthrough/world.py), adapted to extractive question answering (SQuAD's kind: exact match and F1) and to
   tagging the words that name a creature, a food or a place (CoNLL's kind: entity F1).
3. clip: an image encoder and a text encoder pretrained contrastively on drawn images and their captions, adapted
   on half of the shape classes (base) and scored on those and on the other half (novel), and their harmonic mean.

Every task compares, at the same K prompts in the same top L layers and the same training budget: a linear probe
(the frozen encoder's final features), full fine-tuning, ungated prompts (VPT-deep, P-tuning v2: the prompts' keys
and values in one softmax with the tokens', no gate) and zero-init gated prompts (paper Eq. 7: a softmax of their
own, times tanh(gate), the gate per head starting at 0). One task per miniature also runs the gate variants the
paper leaves open: a random-init gate, a gate fixed at 1, and the gate itself in place of tanh(gate) (also 0 at
0). Each method's learning rate is chosen from LRS on the validation split with seed 0, then seeds 1 .. seeds-1
run at that rate; tables show the test mean and range over seeds and in how many seeds zero-init does better.

The frozen layers below the prompts build no graph: their output for each data set is computed once and reused by
every run of the task (full fine-tuning alone starts from the input). Each pretrained encoder and each run's result
are saved in out_dir (atomically): a stopped command continues where it stopped; delete out_dir to measure afresh.
Writes out_dir/beyond.md (the tables), beyond.json (every run) and beyond-llama.svg (the gates per layer and head);
docs/beyond-llama.md explains the miniatures and what their numbers show.
"""
import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import sentencepiece
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
from checkpoint import atomic_save
from walkthrough import beyond_data as data
from walkthrough import world as wt
from walkthrough.beyond_models import GATE_VARIANTS, MAIN_METHODS, Encoder, Run, gates_of, mlm_batch, pretrain
from walkthrough.beyond_report import fmt, gate_panels, miniature_table, svg_figure


@dataclass
class Settings:
    out_dir: str = ""  # empty: out/beyond (out/beyond-quick with --quick)
    only: Literal["all", "vision", "text", "clip"] = "all"  # one miniature, or all three
    quick: bool = False  # a smoke run: tiny data, models and budgets, every code path; the numbers mean nothing
    seeds: int = 3  # seeds per method at its chosen learning rate (seed 0 is the learning-rate search's run)


# ----------------------------------------------------------------------------------------------------------
# Sizes, chosen with pilot runs before the study (see docs/beyond-llama.md). K prompts in each of the top L layers.

ENCODER = dict(dim=64, n_layers=4, n_heads=4)
CONFIG = {
    "vision": dict(ENCODER, K=8, L=2, pretrain_images=12000, pretrain_steps=1500, pretrain_lr=3e-3,
                   pretrain_batch=64, tasks=["object", "texture", "orientation"], variant_task="orientation",
                   train=1000, val=500, test=2000, batch_size=32, steps=200),
    "text": dict(ENCODER, K=8, L=3, vocab_size=400, n_creatures=100, pretrain_steps=1500, pretrain_lr=2e-3,
                 pretrain_batch=64, tasks=["qa", "tagging"], variant_task="qa", train=1000, val=500, test=2000,
                 batch_size=32, steps=200),
    "clip": dict(ENCODER, K=8, L=2, text_layers=2, embed_dim=64, pretrain_images=12000, pretrain_steps=1500,
                 pretrain_lr=3e-3, pretrain_batch=64, tasks=["base_to_novel"], variant_task="base_to_novel",
                 shots=32, val=250, test=1000, batch_size=32, steps=120),
}
QUICK = dict(dim=32, n_layers=2, n_heads=2, K=2, L=1, pretrain_images=256, pretrain_steps=8, vocab_size=200,
             n_creatures=30, train=96, val=48, test=96, shots=8, steps=4, text_layers=1, embed_dim=32)
# Learning rates searched per method (seed 0, validation split); the gate variants share zero_init's grid.
LRS = {"linear_probe": [3e-2, 1e-1, 3e-1], "full_finetune": [3e-4, 1e-3, 3e-3], "prompts": [3e-2, 1e-1, 3e-1]}
QUICK_LRS = {"linear_probe": [1e-2, 3e-2], "full_finetune": [1e-3, 3e-3], "prompts": [1e-2, 3e-2]}
# One CPU thread, a fixed count, so that the same command gives the same numbers (another count sums in another
# order). Not the walkthrough's 2: these models are small, and on the shared 2-core machine two threads ran the
# text encoder's training step 16x slower than one (1.05 s against 0.063 s, side by side, load 2.9).
THREADS = 1
SEED = 31  # the data's and the pretraining's; the runs' seeds are 0 .. seeds-1


def log(message):
    print(message, flush=True)


def save_json(obj, path):
    atomic_save(json.dumps(obj, indent=1).encode(), path)


# ----------------------------------------------------------------------------------------------------------
# Tasks: the data of one adaptation problem, its head, loss and score (what beyond_models.Run calls).


def batched(features, n, batch_size=256):
    """features(idx) for every example, in batches: a list of (idx, output)."""
    return [(idx, features(idx)) for idx in torch.arange(n).split(batch_size)]


class ClassifyTask:
    metrics, select = ["accuracy"], "accuracy"

    def __init__(self, name, group, n_classes, splits):
        self.name, self.group, self.n_classes = name, group, n_classes
        self.train, self.val, self.test = splits

    def head(self, dim, method):
        return nn.Linear(dim, self.n_classes)

    def loss(self, h, batch, head):  # h: (bsz, n, dim); the [CLS] position's features classify
        return F.cross_entropy(head(h[:, 0]), batch["y"])

    def score(self, features, n, head, split):
        y = getattr(self, split)["y"]
        right = sum((head(h[:, 0]).argmax(-1) == y[idx]).sum().item() for idx, h in batched(features, n))
        return {"accuracy": right / n}


class SpanTask:
    """Extractive QA: a start and an end logit per piece, over the context's pieces only."""
    metrics, select = ["EM", "F1"], "F1"
    group = "qa"

    def __init__(self, name, splits):
        self.name = name
        self.train, self.val, self.test = splits

    def head(self, dim, method):
        return nn.Linear(dim, 2)

    def logits(self, h, allowed, head):  # -> start, end logits: (bsz, n) each, -inf outside the context
        start, end = head(h).unbind(-1)
        return start.masked_fill(~allowed, -1e9), end.masked_fill(~allowed, -1e9)

    def loss(self, h, batch, head):
        start, end = self.logits(h, batch["allowed"], head)
        return (F.cross_entropy(start, batch["start"]) + F.cross_entropy(end, batch["end"])) / 2

    def score(self, features, n, head, split):
        d = getattr(self, split)
        predicted = []
        for idx, h in batched(features, n):
            start, end = self.logits(h, d["allowed"][idx], head)
            # the best span of at most 8 pieces: score[i, j] = start[i] + end[j] for i <= j < i + 8
            pair = start[:, :, None] + end[:, None, :]  # (bsz, n, n)
            n_pos = pair.shape[-1]
            ok = torch.ones(n_pos, n_pos, dtype=torch.bool).triu().tril(7)
            best = pair.masked_fill(~ok, -1e18).flatten(1).argmax(-1)  # (bsz,)
            for i, b in zip(idx.tolist(), best.tolist()):
                s, e = divmod(b, n_pos)
                owner = d["owner"][i]  # piece -> context word (-1: not context)
                first, last = owner[s] if s < len(owner) else -1, owner[e] if e < len(owner) else -1
                predicted.append(d["context"][i][first:last + 1] if 0 <= first <= last else [])
        em, f1 = data.span_scores(predicted, d["answer"])
        return {"EM": em, "F1": f1}


class TagTask:
    """Tagging: a tag per word, read at its first piece; scored as CoNLL's entity F1."""
    metrics, select = ["F1"], "F1"
    group = "tagging"

    def __init__(self, name, splits):
        self.name = name
        self.train, self.val, self.test = splits

    def head(self, dim, method):
        return nn.Linear(dim, len(data.TAGS))

    def loss(self, h, batch, head):
        return F.cross_entropy(head(h).flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    def score(self, features, n, head, split):
        d = getattr(self, split)
        predicted = []
        for idx, h in batched(features, n):
            tags = head(h).argmax(-1)  # (bsz, n)
            predicted += [[data.TAGS[t] for t in tags[j, d["first"][i]].tolist()] for j, i in enumerate(idx.tolist())]
        return {"F1": data.entity_f1(predicted, d["tags"])}


class ClipTask:
    """Base-to-novel: classify an image by its embedding's cosine with each class prompt's text embedding (the text
    side frozen: its class embeddings computed once). Adapted and validated on base classes; the test set holds
    both, base images scored among the base classes, novel among the novel (CoOp's protocol)."""
    metrics, select = ["base", "novel", "HM"], "base"
    group = "clip"

    def __init__(self, name, splits, projection, classes, logit_scale):
        self.name = name
        self.train, self.val, self.test = splits
        self.projection, self.logit_scale = projection, logit_scale
        self.classes = classes  # {"base": (n_base, embed_dim), "novel": (n_novel, embed_dim)}, unit vectors

    def head(self, dim, method):
        if method == "linear_probe":  # base classes only: a new head has no weights for the novel ones
            return nn.Linear(dim, len(self.classes["base"]))
        head = copy.deepcopy(self.projection)  # the pretrained projection, trained only in full FT
        head.requires_grad_(method == "full_finetune")
        return head

    def logits(self, h, head, which):
        if not hasattr(head, "clip"):  # the linear probe's own head, base classes only
            return head(h[:, 0])
        return self.logit_scale * F.normalize(head(h[:, 0]), dim=-1) @ self.classes[which].T

    def loss(self, h, batch, head):
        return F.cross_entropy(self.logits(h, head, "base"), batch["y"])

    def score(self, features, n, head, split):
        d = getattr(self, split)
        right = {"base": 0, "novel": 0}
        seen = {"base": 0, "novel": 0}
        probe = not hasattr(head, "clip")
        for idx, h in batched(features, n):
            for which in ("base", "novel"):
                rows = idx[d["novel"][idx] == (which == "novel")]
                if not len(rows) or (probe and which == "novel"):
                    continue
                keep = d["novel"][idx] == (which == "novel")
                right[which] += (self.logits(h[keep], head, which).argmax(-1) == d["y"][rows]).sum().item()
                seen[which] += len(rows)
        base = right["base"] / seen["base"]
        if probe:
            return {"base": base, "novel": None, "HM": None}
        novel = right["novel"] / seen["novel"] if seen["novel"] else None
        hm = 2 * base * novel / (base + novel) if novel else None
        return {"base": base, "novel": novel, "HM": hm}


# ----------------------------------------------------------------------------------------------------------
# Pretraining, once per miniature; the result kept in out_dir/<miniature>/


def load_or_build(path, build):
    """The saved object at path, or build() saved there first (atomically: a stopped build leaves no file)."""
    if path.is_file():
        return torch.load(path, weights_only=False)
    obj = build()
    atomic_save(obj, path)
    return obj


def vision_encoder(cfg):
    return Encoder("image", cfg["dim"], cfg["n_layers"], cfg["n_heads"], positions=1 + (data.SIZE // 4) ** 2)


def pretrain_vision(cfg, out):
    def build():
        t = time.time()
        images, labels = data.pretrain_set(cfg["pretrain_images"], SEED)
        torch.manual_seed(SEED)
        encoder = vision_encoder(cfg)
        head = nn.Linear(cfg["dim"], len(data.SHAPES) + len(data.COLORS))
        generator = torch.Generator().manual_seed(SEED)
        log(f"vision: pretraining a {count(encoder) / 1e3:.0f}K-parameter ViT to name the shapes and colours in "
            f"{len(images):,} drawn images")

        def loss(step):
            idx = torch.randint(len(images), (cfg["pretrain_batch"],), generator=generator)
            logits = head(encoder(images[idx])[:, 0])  # (bsz, shapes + colours): two classifications
            n = len(data.SHAPES)
            return F.cross_entropy(logits[:, :n], labels[idx, 0]) + F.cross_entropy(logits[:, n:], labels[idx, 1])
        pretrain(list(encoder.parameters()) + list(head.parameters()), loss, cfg["pretrain_steps"],
                 cfg["pretrain_lr"], log, "vision")
        return {"encoder": encoder.state_dict(), "seconds": time.time() - t}
    saved = load_or_build(out / "vision" / "encoder.pt", build)
    encoder = vision_encoder(cfg)
    encoder.load_state_dict(saved["encoder"])
    return encoder, saved["seconds"]


def text_parts(cfg, out):
    """The world, its tokenizer (trained once, kept beside the encoder) and the pieces helper."""
    creatures, novel = data.text_world(cfg["n_creatures"], wt.SEED)
    docs = wt.corpus_docs(creatures)
    model = out / "text" / "tokenizer.model"
    if not model.is_file():  # trained under another name, then renamed: a stopped run leaves no half-written model
        model.parent.mkdir(parents=True, exist_ok=True)
        data.train_text_tokenizer(docs + data.TOKENIZER_EXTRA * 20, model.parent / "tokenizer-new", cfg["vocab_size"])
        (model.parent / "tokenizer-new.vocab").unlink()
        os.replace(model.parent / "tokenizer-new.model", model)
    return creatures, novel, docs, data.Pieces(sentencepiece.SentencePieceProcessor(model_file=str(model)))


def text_length(cfg):
    """The text encoder's positions, and the length QA rows are padded to: the longest QA example has 51 pieces with
    the study's 400-piece vocabulary, more with --quick's 200 (a smaller vocabulary cuts the words finer)."""
    return 56 if cfg["vocab_size"] >= 400 else 96


def text_encoder(cfg, pieces):
    return Encoder("text", cfg["dim"], cfg["n_layers"], cfg["n_heads"], positions=text_length(cfg),
                   vocab_size=pieces.vocab_size, pad_id=pieces.pad)


def pretrain_text(cfg, out):
    creatures, novel, docs, pieces = text_parts(cfg, out)

    def build():
        t = time.time()
        rows = data.mlm_rows(pieces, docs, 28)
        torch.manual_seed(SEED)
        encoder = text_encoder(cfg, pieces)
        head = nn.Linear(cfg["dim"], pieces.vocab_size)
        generator = torch.Generator().manual_seed(SEED)
        log(f"text: pretraining a {count(encoder) / 1e3:.0f}K-parameter encoder by masked-language modelling on "
            f"the walkthrough's corpus ({len(docs)} documents about {len(creatures)} creatures)")

        def loss(step):
            idx = torch.randint(len(rows), (cfg["pretrain_batch"],), generator=generator)
            inputs, targets = mlm_batch(rows[idx], pieces, generator)
            return F.cross_entropy(head(encoder(inputs)).flatten(0, 1), targets.flatten(), ignore_index=-100)
        pretrain(list(encoder.parameters()) + list(head.parameters()), loss, cfg["pretrain_steps"],
                 cfg["pretrain_lr"], log, "text")
        return {"encoder": encoder.state_dict(), "seconds": time.time() - t}
    saved = load_or_build(out / "text" / "encoder.pt", build)
    encoder = text_encoder(cfg, pieces)
    encoder.load_state_dict(saved["encoder"])
    return encoder, saved["seconds"], (creatures, novel, pieces)


CAPTION_LENGTH = 12


def clip_models(cfg):
    image = vision_encoder(cfg)
    text = Encoder("text", cfg["dim"], cfg["text_layers"], cfg["n_heads"], positions=CAPTION_LENGTH,
                   vocab_size=len(data.CAPTION_WORDS) + 2, pad_id=0)
    image_proj = nn.Linear(cfg["dim"], cfg["embed_dim"], bias=False)
    text_proj = nn.Linear(cfg["dim"], cfg["embed_dim"], bias=False)
    return image, text, image_proj, text_proj


def pretrain_clip(cfg, out):
    def build():
        t = time.time()
        images, captions = data.clip_pretrain_set(cfg["pretrain_images"], SEED + 1)
        ids, _ = data.caption_ids(captions, CAPTION_LENGTH)
        torch.manual_seed(SEED + 1)
        image, text, image_proj, text_proj = clip_models(cfg)
        log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's temperature, learnt
        generator = torch.Generator().manual_seed(SEED + 1)
        log(f"clip: pretraining an image and a text encoder ({count(image) / 1e3:.0f}K and {count(text) / 1e3:.0f}K "
            f"parameters) contrastively on {len(images):,} drawn images and their captions")

        def loss(step):
            idx = torch.randint(len(images), (cfg["pretrain_batch"],), generator=generator)
            a = F.normalize(image_proj(image(images[idx])[:, 0]), dim=-1)  # (bsz, embed_dim)
            b = F.normalize(text_proj(text(ids[idx])[:, 0]), dim=-1)
            logits = log_scale.clamp(max=math.log(100)).exp() * a @ b.T  # (bsz, bsz): image i's caption is i
            # a caption drawn twice in a batch is a right answer twice: its columns share the target
            same = (ids[idx][:, None] == ids[idx][None]).all(-1).float()
            target = same / same.sum(1, keepdim=True)
            return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        params = [p for m in (image, text, image_proj, text_proj) for p in m.parameters()] + [log_scale]
        pretrain(params, loss, cfg["pretrain_steps"], cfg["pretrain_lr"], log, "clip")
        return {"image": image.state_dict(), "text": text.state_dict(), "image_proj": image_proj.state_dict(),
                "text_proj": text_proj.state_dict(), "logit_scale": log_scale.clamp(max=math.log(100)).exp().item(),
                "seconds": time.time() - t}
    saved = load_or_build(out / "clip" / "pair.pt", build)
    image, text, image_proj, text_proj = clip_models(cfg)
    for module, key in ((image, "image"), (text, "text"), (image_proj, "image_proj"), (text_proj, "text_proj")):
        module.load_state_dict(saved[key])
    return image, saved["seconds"], (text, image_proj, text_proj, saved["logit_scale"])


def count(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------
# The tasks' data, made from fixed seeds (each split its own seed: no image or sentence is shared by chance)


def vision_tasks(cfg):
    tasks = []
    for name in cfg["tasks"]:
        group, n_classes, maker, i = data.VISION_TASKS[name]
        splits = [dict(zip(("x", "y"), data.vision_set(maker, cfg[split], SEED + 100 * i + j)))
                  for j, split in enumerate(("train", "val", "test"))]
        tasks.append(ClassifyTask(name, group, n_classes, splits))
    return tasks


def text_tasks(cfg, creatures, novel, pieces):
    qa = [data.qa_set(pieces, creatures, cfg[split], SEED + j, text_length(cfg))
          for j, split in enumerate(("train", "val", "test"))]
    tag = [data.tagging_set(pieces, creatures, novel, cfg[split], SEED + 10 + j, 40)
           for j, split in enumerate(("train", "val", "test"))]
    for split in qa + tag:
        split["x"] = split["ids"]
    return [t for t in (SpanTask("qa", qa), TagTask("tagging", tag)) if t.name in cfg["tasks"]]


def clip_task(cfg, image_encoder, parts):
    text, image_proj, text_proj, logit_scale = parts
    shapes = list(data.SHAPES)
    random.Random(SEED).shuffle(shapes)
    classes = {"base": shapes[:len(shapes) // 2], "novel": shapes[len(shapes) // 2:]}
    with torch.no_grad():  # the class prompts' embeddings, "a {shape}", by the frozen text encoder, once
        embed = {k: F.normalize(text_proj(text(data.caption_ids([f"a {s}" for s in v], CAPTION_LENGTH)[0])[:, 0]),
                                dim=-1) for k, v in classes.items()}
    train = dict(zip(("x", "y"), data.clip_class_set(classes["base"], cfg["shots"] * len(classes["base"]), SEED + 201)))
    val = dict(zip(("x", "y"), data.clip_class_set(classes["base"], cfg["val"], SEED + 202)))
    base = data.clip_class_set(classes["base"], cfg["test"] // 2, SEED + 203)
    novel = data.clip_class_set(classes["novel"], cfg["test"] // 2, SEED + 204)
    test = {"x": torch.cat([base[0], novel[0]]), "y": torch.cat([base[1], novel[1]]),
            "novel": torch.cat([torch.zeros(len(base[1]), dtype=torch.bool), torch.ones(len(novel[1]), dtype=torch.bool)])}
    for split in (train, val):
        split["novel"] = torch.zeros(len(split["y"]), dtype=torch.bool)
    image_proj.clip = True  # marks the projection head (the linear probe's head has no such mark)
    task = ClipTask("base_to_novel", (train, val, test), image_proj, embed, logit_scale)
    task.class_names = classes
    return task


# ----------------------------------------------------------------------------------------------------------
# The study: per task, each method's learning rate on the validation split (seed 0), then its other seeds


def run_path(out, miniature, task, method, lr, seed):
    return out / "runs" / miniature / task / method / f"lr{lr:g}-seed{seed}.json"


def one_run(task, encoder, method, lr, seed, cfg, cache, path, job):
    """A run's result, from its file if a run of the same job finished before, else trained now and saved."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if {k: v for k, v in saved["job"].items() if k != "variant_task"} == job:  # which task runs the variants
            return saved  # does not change a run
    run = Run(task, encoder, method, lr, seed, cfg, cache)
    if method != "zero_shot":
        losses = run.train()
    else:
        losses, run.seconds = [], 0.0
    result = {"job": job, "method": method, "lr": lr, "seed": seed, "val": run.score("val"), "test": run.score("test"),
              "trainable": run.n_trainable if method != "zero_shot" else 0, "seconds": run.seconds,
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
              "gates": gates_of(run.encoder)}
    save_json(result, path)
    return result


def study_task(miniature, task, encoder, cfg, lrs, methods, s, out, random_encoder=None):
    """Every method on one task: {method: {"lr": chosen, "search": {lr: val}, "runs": [result per seed]}}."""
    cache = {}
    found = {}
    job = {k: v for k, v in cfg.items() if k not in ("tasks", "variant_task")}  # what decides a run's numbers
    for method in methods:
        grid = [0.0] if method == "zero_shot" else lrs["prompts" if method in GATE_VARIANTS + ["ungated"] else method]
        search = {}
        for lr in grid:
            r = one_run(task, encoder, method, lr, 0, cfg, cache, run_path(out, miniature, task.name, method, lr, 0),
                        {**job, "method": method})
            search[lr] = r
        best = max(grid, key=lambda lr: search[lr]["val"][task.select])  # the first of equals: the smallest
        runs = [search[best]] + [one_run(task, encoder, method, best, seed, cfg, cache,
                                         run_path(out, miniature, task.name, method, best, seed),
                                         {**job, "method": method}) for seed in range(1, 1 if method == "zero_shot" else s["seeds"])]
        found[method] = {"lr": best, "search": {f"{lr:g}": search[lr]["val"][task.select] for lr in grid}, "runs": runs,
                         "seconds": sum(r["seconds"] for r in list(search.values()) + runs[1:])}
        m = task.metrics
        log(f"  {miniature}/{task.name} {method:>14}: lr {best:g} (val {task.select} " +
            ", ".join(f"{lr:g}: {100 * v:.1f}" for lr, v in zip(grid, (search[lr]["val"][task.select] for lr in grid))) +
            ")  test " + "  ".join(f"{k} " + " ".join(fmt(r["test"][k]) for r in runs) for k in m) +
            f"  ({sum(r['seconds'] for r in runs):.0f} s)")
    if random_encoder is not None:  # the check that pretraining matters: a linear probe on random features
        cache = {}
        grid = lrs["linear_probe"]
        search = {lr: one_run(task, random_encoder, "linear_probe", lr, 0, cfg, cache,
                              run_path(out, miniature, task.name, "random_probe", lr, 0),
                              {**job, "method": "random_probe"}) for lr in grid}
        best = max(grid, key=lambda lr: search[lr]["val"][task.select])
        found["random_probe"] = {"lr": best, "runs": [search[best]], "seconds": sum(r["seconds"] for r in search.values())}
    return found


# ----------------------------------------------------------------------------------------------------------


def main():
    cli.exit_on_input_error()
    s = vars(cli.parse(Settings, __doc__))
    if s["quick"]:
        s = vars(cli.parse(Settings, __doc__, defaults=dict(seeds=2)))
    cli.require(s["seeds"] >= 1, "--seeds must be at least 1")
    t_start = time.time()
    torch.set_num_threads(THREADS)
    out = Path(s["out_dir"] or ("out/beyond-quick" if s["quick"] else "out/beyond"))
    lrs = QUICK_LRS if s["quick"] else LRS
    if s["quick"]:
        log("beyond: --quick, a smoke run of every code path on tiny data and models: ITS NUMBERS MEAN NOTHING")
    miniatures = ["vision", "text", "clip"] if s["only"] == "all" else [s["only"]]
    report, everything, panels = [], {}, []
    for miniature in miniatures:
        t0 = time.time()
        cfg = {**CONFIG[miniature], **(QUICK if s["quick"] else {})}
        if s["quick"]:
            cfg["tasks"] = CONFIG[miniature]["tasks"][:2]
            cfg["variant_task"] = cfg["tasks"][-1] if CONFIG[miniature]["variant_task"] not in cfg["tasks"] else \
                CONFIG[miniature]["variant_task"]
        torch.manual_seed(SEED)
        if miniature == "vision":
            encoder, pretrain_seconds = pretrain_vision(cfg, out)
            tasks = vision_tasks(cfg)
            torch.manual_seed(SEED + 99)
            random_encoder = vision_encoder(cfg)
        elif miniature == "text":
            encoder, pretrain_seconds, (creatures, novel, pieces) = pretrain_text(cfg, out)
            tasks = text_tasks(cfg, creatures, novel, pieces)
            torch.manual_seed(SEED + 99)
            random_encoder = text_encoder(cfg, pieces)
        else:
            encoder, pretrain_seconds, parts = pretrain_clip(cfg, out)
            tasks = [clip_task(cfg, encoder, parts)]
            torch.manual_seed(SEED + 99)
            random_encoder = vision_encoder(cfg)
        log(f"{miniature}: pretrained in {pretrain_seconds:.0f} s; adapting to " + ", ".join(t.name for t in tasks))
        results = {}
        for t in tasks:
            methods = (["zero_shot"] if miniature == "clip" else []) + MAIN_METHODS
            if t.name == cfg["variant_task"]:
                methods += GATE_VARIANTS[1:]
            results[t.name] = study_task(miniature, t, encoder, cfg, lrs, methods, s, out, random_encoder)
        seconds = sum(r["seconds"] for res in results.values() for m in res.values() for r in m["runs"])
        all_seconds = sum(m["seconds"] for res in results.values() for m in res.values())  # searches included
        lines = miniature_table(miniature, tasks, results, cfg, s)
        title = {"vision": "Vision: a ViT on a VTAB-like suite", "text": "Language: a bidirectional text encoder",
                 "clip": "Vision and language: a CLIP-style pair, base-to-novel"}[miniature]
        timing = (f"Run times: pretraining {pretrain_seconds:.0f} s; the adaptation runs {all_seconds:.0f} s of "
                  f"training in all ({seconds:.0f} s in the runs shown); this command {time.time() - t0:.0f} s for "
                  f"this miniature (runs found in {out} are reused, not timed again).")
        text = [f"## {title}" + (" (--quick: numbers meaningless)" if s["quick"] else ""), ""] + lines + ["", timing]
        log("\n" + "\n".join(text) + "\n")
        report += text + [""]
        everything[miniature] = {t.name: {m: {k: v for k, v in r.items()} for m, r in results[t.name].items()}
                                 for t in tasks}
        everything[miniature]["pretrain_seconds"] = pretrain_seconds
        panels.append(gate_panels(miniature, tasks, results, cfg))
    title = "The gates after adaptation, per adapted layer and head: zero-init on every task, the variants on one" + (
        " (--quick: numbers meaningless)" if s["quick"] else "")
    out.mkdir(parents=True, exist_ok=True)
    (out / "beyond-llama.svg").write_text(svg_figure(panels, title))
    (out / "beyond.md").write_text("\n".join(report))
    save_json({"settings": s, "results": everything}, out / "beyond.json")
    log(f"wrote {out / 'beyond.md'}, {out / 'beyond.json'} and {out / 'beyond-llama.svg'}")
    if s["quick"]:
        log("beyond: --quick: a smoke run; these numbers mean nothing")
    log(f"wall time: {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
