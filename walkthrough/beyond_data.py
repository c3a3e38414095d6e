"""
The data of walkthrough/beyond.py, all made procedurally from fixed seeds: drawn images (shapes in colours, sizes,
positions, orientations, fill textures and counts) with their labels and captions, and the creature world's text
tasks (extractive question answering, entity tagging) with a SentencePiece tokenizer trained on its corpus.

Nothing here trains; every function is a pure function of its seed, so the same call gives the same data on any
machine (numpy's PCG64 and plain float arithmetic).
"""
import math
import random
import re

import numpy as np
import torch

from walkthrough import world as wt

# ----------------------------------------------------------------------------------------------------------
# Drawn images. An object is a shape in its own frame (u, v in about [-1, 1]), placed by a centre, a radius in
# pixels and an angle; its fill is a colour times a texture pattern. Images are SIZE x SIZE RGB in [0, 1], drawn at
# SUPERSAMPLE times the resolution and averaged down, so that edges and stripes are antialiased.

SIZE, SUPERSAMPLE = 24, 2


def _polygon(*points):
    return np.array(points, dtype=np.float64)


def _star(n, inner):  # n points, inner radius `inner` of the outer 1
    angles = np.arange(2 * n) * math.pi / n - math.pi / 2
    radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


def _regular(n):
    angles = np.arange(n) * 2 * math.pi / n - math.pi / 2
    return np.stack([np.cos(angles), np.sin(angles)], 1)


# Polygons in the object frame (v points down, as image rows do); circle-like shapes are tests on (u, v) instead.
POLYGONS = {
    "square": _polygon((-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)),
    "triangle": _regular(3),
    "plus": _polygon((-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
                     (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)),
    "star": _star(5, 0.45),
    "arrow": _polygon((0, -1), (0.75, -0.1), (0.3, -0.1), (0.3, 1), (-0.3, 1), (-0.3, -0.1), (-0.75, -0.1)),
    "lshape": _polygon((-0.7, -1), (-0.1, -1), (-0.1, 0.4), (0.8, 0.4), (0.8, 1), (-0.7, 1)),
    "hexagon": _regular(6),
}
ROUND = {
    "circle": lambda u, v: u * u + v * v <= 1,
    "ring": lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.5 ** 2),
    "semicircle": lambda u, v: (u * u + (v + 0.4) ** 2 <= 1) & (v >= -0.4),
}
SHAPES = ["circle", "square", "triangle", "plus", "star", "ring", "semicircle", "arrow", "lshape", "hexagon"]
ASYMMETRIC = ["arrow", "lshape", "semicircle", "triangle"]  # no two orientations 45 degrees apart look alike
COLORS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1),
          "purple": (0.6, 0.2, 0.8), "orange": (1.0, 0.55, 0.05), "cyan": (0.1, 0.85, 0.9), "white": (0.95, 0.95, 0.95)}
TEXTURES = ["plain", "striped", "dotted", "checked", "hollow"]


def _inside_polygon(u, v, poly):
    # Even-odd rule, vectorised over pixels: count the polygon's edges that a ray from (u, v) towards +u crosses.
    inside = np.zeros(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _shape_mask(shape, u, v):
    return ROUND[shape](u, v) if shape in ROUND else _inside_polygon(u, v, POLYGONS[shape])


def _grid():
    n = SIZE * SUPERSAMPLE
    centres = (np.arange(n) + 0.5) / SUPERSAMPLE  # pixel coordinates of the fine grid's centres
    return np.meshgrid(centres, centres)  # x (columns), y (rows): (n, n) each


def draw(objects, background, rng, noise=0.03, clutter=0):
    """An image (SIZE, SIZE, 3) in [0, 1]. objects: dicts of shape, color (RGB), texture, x, y (centre, pixels),
    radius (pixels), angle (radians); background: RGB; clutter: thin random lines under the objects."""
    x, y = _grid()
    fine = np.ones(x.shape + (3,)) * np.asarray(background)
    for _ in range(clutter):  # a line of random colour and direction, about a pixel wide
        x0, y0, angle = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(0, math.pi)
        distance = np.abs((x - x0) * math.sin(angle) - (y - y0) * math.cos(angle))
        fine[distance < 0.5] = rng.uniform(0.2, 0.9, 3)
    for o in objects:
        dx, dy = x - o["x"], y - o["y"]
        c, s = math.cos(o["angle"]), math.sin(o["angle"])
        u, v = (dx * c + dy * s) / o["radius"], (-dx * s + dy * c) / o["radius"]  # the object's own frame
        mask = _shape_mask(o["shape"], u, v)
        px, py = u * o["radius"], v * o["radius"]  # pixels along the object's axes: textures turn with it
        pattern = {"plain": np.ones_like(u, dtype=bool),
                   "striped": np.floor(px / 1.5) % 2 == 0,
                   "dotted": (np.abs((px % 3) - 1.5) < 0.8) & (np.abs((py % 3) - 1.5) < 0.8),
                   "checked": (np.floor(px / 1.5) + np.floor(py / 1.5)) % 2 == 0,
                   "hollow": ~_shape_mask(o["shape"], u * 1.6, v * 1.6)}[o["texture"]]
        # the shape's silhouette stays visible: where the pattern is off, a dark shade of the colour
        colour = np.where(pattern[..., None], np.asarray(o["color"]), 0.3 * np.asarray(o["color"]))
        fine[mask] = colour[mask]
    image = fine.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean((1, 3))
    return np.clip(image + rng.normal(0, noise, image.shape), 0, 1)


TILT = 0.3  # radians: objects stand about upright, as in photographs, unless a task turns them


def random_object(rng, shape=None, radius=(4.0, 7.0), texture=None, place=None, angle=None):
    """One object with its attributes drawn at random unless given; place: (x, y), else anywhere it fits. Nine in
    ten are plain: a patterned fill hides a small shape's outline, and a ViT this small learnt shapes far too slowly
    on a CPU otherwise (pilots, shape loss after 400 steps: 2.2 with every fill equally likely, 1.1 all plain)."""
    r = rng.uniform(*radius)
    x, y = place if place is not None else rng.uniform(r, SIZE - r, 2)
    color = rng.choice(list(COLORS))
    if texture is None:
        texture = "plain" if rng.random() < 0.9 else TEXTURES[1 + rng.integers(len(TEXTURES) - 1)]
    return {"shape": shape or SHAPES[rng.integers(len(SHAPES))], "color_name": color,
            "color": np.clip(np.asarray(COLORS[color]) + rng.normal(0, 0.05, 3), 0, 1),
            "texture": texture, "x": float(x), "y": float(y), "radius": float(r),
            "angle": float(rng.uniform(-TILT, TILT) if angle is None else angle)}


def _background(rng, busy):
    # pretraining: a plain grey; the downstream tasks' "natural" images: any dim colour, noisier, with clutter
    return rng.uniform(0.0, 0.35, 3) if busy else np.full(3, rng.uniform(0.1, 0.3))


def _spread_out(rng, n, radius):
    """n objects' centres at least 2 * radius apart (rejection sampling; a fixed seed gives fixed draws)."""
    while True:
        points = rng.uniform(radius + 0.5, SIZE - radius - 0.5, (n, 2))
        gaps = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(n) * SIZE
        if gaps.min() >= 2 * radius:
            return points


def pretrain_scene(rng):
    """The vision pretraining images (ImageNet's part): one object on a plain background, labelled with its shape
    and its colour; size, place, tilt and fill vary and are never named. Returns (image, (shape, colour))."""
    o = random_object(rng, radius=(3.5, 7.0))
    return draw([o], _background(rng, False), rng), (SHAPES.index(o["shape"]), list(COLORS).index(o["color_name"]))


# The VTAB-like tasks: (group, number of classes, scene maker returning (image, label)).
def _object_task(rng):  # natural: which shape, on a busy, cluttered background
    o = random_object(rng, radius=(3.5, 6.0))
    return draw([o], _background(rng, True), rng, noise=0.08, clutter=3), SHAPES.index(o["shape"])


def _texture_task(rng):  # specialized: the fill pattern, a property of a few pixels
    o = random_object(rng, radius=(4.0, 7.0), texture=TEXTURES[rng.integers(len(TEXTURES))])
    return draw([o], _background(rng, False), rng, noise=0.05), TEXTURES.index(o["texture"])


def _orientation_task(rng):  # structured: which way an asymmetric shape points, 8 bins of 45 degrees (dSprites)
    label = int(rng.integers(8))
    angle = (label + rng.uniform(-0.3, 0.3)) * math.pi / 4
    o = random_object(rng, shape=ASYMMETRIC[rng.integers(len(ASYMMETRIC))], radius=(5.0, 8.0), angle=angle)
    return draw([o], _background(rng, False), rng), label


# Count (1 to 6 small objects), distance (two objects, 4 bins) and position (a 3 x 3 grid) were tried as structured
# tasks and dropped: on each, a linear probe on a randomly initialised encoder did about as well as on the pretrained
# one, or better (count 36.0% against 33.3%, distance 28.8 against 29.4 with chance 25, position 26.0 against 23.0;
# see docs/beyond-llama.md).
# name: (VTAB's group, classes, scene maker, the data's seed offset: 2 was count's)
VISION_TASKS = {"object": ("natural", len(SHAPES), _object_task, 0),
                "texture": ("specialized", len(TEXTURES), _texture_task, 1),
                "orientation": ("structured", 8, _orientation_task, 3)}


def to_tensor(images):
    """(N, SIZE, SIZE, 3) floats in [0, 1] -> uint8 (N, 3, SIZE, SIZE): a quarter of the memory, exact enough."""
    return torch.from_numpy(np.round(np.stack(images) * 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


def vision_set(maker, n, seed):
    """n (image, label) pairs from one task's scene maker: (uint8 images, int64 labels)."""
    rng = np.random.default_rng(seed)
    images, labels = zip(*(maker(rng) for _ in range(n)))
    return to_tensor(images), torch.tensor(labels)


def pretrain_set(n, seed):
    rng = np.random.default_rng(seed)
    images, labels = zip(*(pretrain_scene(rng) for _ in range(n)))
    return to_tensor(images), torch.tensor(labels)  # (n, 3, SIZE, SIZE) uint8, (n, 2): shape, colour


# ----------------------------------------------------------------------------------------------------------
# The CLIP-style pair's images and captions. A caption names some of the object's attributes, the shape always:
# "a small striped red star at the top left", "a ring". The classes are the shapes; the class prompt "a {shape}".

SIZES = {"small": (3.0, 4.5), "large": (5.5, 7.5)}
PLACES = {"top left": (6, 6), "top right": (18, 6), "bottom left": (6, 18), "bottom right": (18, 18), "middle": (12, 12)}
CAPTION_WORDS = (["a", "at", "the"] + list(SIZES) + list(COLORS) + TEXTURES + SHAPES +
                 sorted({w for p in PLACES for w in p.split()}))


def caption_scene(rng):
    """One pretraining pair for the CLIP-style model: an object on a plain background and a caption that names its
    shape and, each at random, its size, texture, colour and place."""
    size = list(SIZES)[rng.integers(2)]
    place = list(PLACES)[rng.integers(len(PLACES))] if rng.random() < 0.5 else None
    where = np.asarray(PLACES[place]) + rng.uniform(-2, 2, 2) if place else None
    o = random_object(rng, radius=SIZES[size], place=where)
    if where is None:
        o["x"], o["y"] = rng.uniform(o["radius"], SIZE - o["radius"], 2)
    words = ["a"] + [w for w, keep in [(size, 0.5), (o["texture"], 0.5), (o["color_name"], 0.7)]
                     if rng.random() < keep] + [o["shape"]] + (f"at the {place}".split() if place else [])
    return draw([o], _background(rng, False), rng), " ".join(words)


def clip_pretrain_set(n, seed):
    rng = np.random.default_rng(seed)
    images, captions = zip(*(caption_scene(rng) for _ in range(n)))
    return to_tensor(images), list(captions)


def clip_class_set(classes, n, seed):
    """n images of the given shape classes for adaptation and scoring, twice as noisy as pretraining's (a pilot with
    pretraining's captions' domain shifted further, busy backgrounds crossed by a line, left zero-shot at 33% on
    either half, chance 20%, too near chance to show what adaptation keeps). Labels index `classes`."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % len(classes)  # balanced
        o = random_object(rng, shape=classes[label], radius=(3.5, 6.5))
        images.append(draw([o], _background(rng, False), rng, noise=0.06))
        labels.append(label)
    return to_tensor(images), torch.tensor(labels)


def caption_ids(captions, length):
    """Word ids of captions, [CLS] first, padded: (N, length) int64, and the mask of real tokens (N, length)."""
    vocab = {w: i + 2 for i, w in enumerate(CAPTION_WORDS)}  # 0: padding, 1: [CLS]
    rows = [[1] + [vocab[w] for w in c.split()] for c in captions]
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row[:length])
    return ids, ids != 0


# ----------------------------------------------------------------------------------------------------------
# The creature world's text: a SentencePiece tokenizer on its corpus, masked-language-model data, and two tasks.
# Text is split into words first (letters, or one punctuation mark); a word's pieces are SentencePiece's for it
# alone, so every piece belongs to exactly one word and spans and tags map back to words.

SPECIAL = ["[CLS]", "[SEP]", "[MASK]", "[PAD]"]


# Sentences the tokenizer learns from besides the corpus (the English a real tokenizer knows): the words of the
# tagging sentences, slots left out, as a first draft of them had it (kept as they were: the tokenizer and the
# pretrained encoder in out/ were made with them).
TOKENIZER_EXTRA = [
    "The c eats f in the p.", "Near the p, the c and the c2 share f.", "c is k and likes f.", "Every c in the p is k.",
    "The k c left the p for f.", "Yesterday c found f by the p.", "Is the c from the p or the p2?",
    "c and c2 never eat f.", "The p is k with f.", "Some say the c hides f under the p.", "f and f2 grow in the p.",
    "A k c met c2 at the p.",
]


def words_of(text):
    return re.findall(r"[A-Za-z]+|[.,?]", text)


def train_text_tokenizer(sentences, prefix, vocab_size):
    """A BPE SentencePiece model on the word-split sentences, with the encoder's special tokens as pieces:
    prefix.model (and prefix.vocab)."""
    wt.train_tokenizer([" ".join(words_of(s)) for s in sentences], prefix, vocab_size, user_defined_symbols=SPECIAL,
                       character_coverage=1.0)


class Pieces:
    """Words to piece ids through a SentencePiece model, with the special ids."""

    def __init__(self, sp):
        self.sp = sp
        self.cls, self.sep, self.mask, self.pad = (sp.piece_to_id(s) for s in SPECIAL)
        self.vocab_size = sp.get_piece_size()
        self._cache = {}

    def word(self, w):
        if w not in self._cache:
            self._cache[w] = self.sp.encode(w)
        return self._cache[w]

    def encode(self, words):
        """(piece ids, the index of each piece's word)."""
        ids, owner = [], []
        for i, w in enumerate(words):
            pieces = self.word(w)
            ids += pieces
            owner += [i] * len(pieces)
        return ids, owner


def pad_rows(rows, length, value):
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row[:length], dtype=torch.long)
    return out


def text_world(n_creatures, seed):
    """The walkthrough's world (make_world with its SEED), and as many creatures of a second draw whose names it never
    mentions: tagging's made-up words."""
    creatures = wt.make_world(random.Random(seed), n_creatures)
    known = {c["name"] for c in creatures}
    novel = [c for c in wt.make_world(random.Random(seed + 1), 3 * n_creatures) if c["name"] not in known]
    return creatures, novel[:n_creatures]


def mlm_rows(pieces, docs, length):
    """The pretraining corpus as [CLS] doc [SEP] piece rows, padded: (N, length)."""
    rows = [[pieces.cls] + pieces.encode(words_of(d))[0] + [pieces.sep] for d in docs]
    return pad_rows(rows, length, pieces.pad)


def qa_example(rng, creatures):
    """Extractive QA (SQuAD's kind): two creatures' profiles in the corpus's own form, facts in a random order,
    and a question about one fact of one of them. Returns (question words, context words, answer word span)."""
    a, b = rng.sample(creatures, 2)
    asked, attribute = rng.choice([a, b]), rng.choice(list(wt.ATTRIBUTES))
    context, span = [], None
    for c in rng.sample([a, b], 2):
        context += words_of(f"Meet the {c['name']}.")
        for attr in rng.sample(list(wt.ATTRIBUTES), len(wt.ATTRIBUTES)):
            fact = words_of(f"It {wt.FACT[attr].format(value=c[attr])}.")
            if c is asked and attr == attribute:  # the answer: the corpus's terse answer ("in the lake"), in place
                answer = words_of(wt.SHORT_ANSWER[attr].format(value=c[attr]))
                start = len(context) + len(fact) - 1 - len(answer)  # just before the full stop
                span = (start, start + len(answer) - 1)
            context += fact
    question = words_of(wt.QUESTION[attribute].format(name=asked["name"]))
    return question, context, span


def qa_set(pieces, creatures, n, seed, length):
    """QA rows: [CLS] question [SEP] context [SEP] as pieces; the answer's first and last piece; which pieces may
    start or end an answer (the context's); and, per example, the words and each piece's word, to score spans as
    words. Returns a dict of tensors and lists."""
    rng = random.Random(seed)
    rows, starts, ends, allowed, owners, contexts, answers = [], [], [], [], [], [], []
    for _ in range(n):
        question, context, (s, e) = qa_example(rng, creatures)
        q_ids, _ = pieces.encode(question)
        c_ids, c_owner = pieces.encode(context)
        offset = 2 + len(q_ids)  # [CLS] question [SEP]
        row = [pieces.cls] + q_ids + [pieces.sep] + c_ids + [pieces.sep]
        owner = [-1] * offset + c_owner + [-1]
        assert len(row) <= length, f"a QA example of {len(row)} pieces, longer than {length}"
        rows.append(row)
        starts.append(owner.index(s))
        ends.append(len(owner) - 1 - owner[::-1].index(e))
        allowed.append([o >= 0 for o in owner])
        owners.append(owner)
        contexts.append(context)
        answers.append(context[s:e + 1])
    return {"ids": pad_rows(rows, length, pieces.pad), "start": torch.tensor(starts), "end": torch.tensor(ends),
            "allowed": pad_rows([[int(a) for a in al] for al in allowed], length, 0).bool(),
            "owner": owners, "context": contexts, "answer": answers}


def span_scores(predicted, answers):
    """SQuAD's exact match and token F1, words compared as they are (no article stripping: answers here are
    the corpus's own words). predicted, answers: lists of word lists."""
    exact = f1 = 0.0
    for p, a in zip(predicted, answers):
        exact += p == a
        common = sum(min(p.count(w), a.count(w)) for w in set(p))
        if common:
            precision, recall = common / len(p), common / len(a)
            f1 += 2 * precision * recall / (precision + recall)
    return exact / len(answers), f1 / len(answers)


# Tagging (CoNLL's kind): which words name a creature, a food, a place. New sentences, unlike the corpus's. A third of
# the slots hold a word of the corpus (a creature's name, a food, a home, a colour), the rest a made-up word never
# read (made as the names are, in lower case in every slot), so that mostly only the sentence tells a word's type:
# "The berso is dunrix." (a creature; a colour's place, not an entity), "The duxnar is orange with gurpon." (a
# place, a food), as CoNLL's unseen names are told by their context. Pilots: with only the corpus's words the task
# was a look-up (entity F1 of a linear probe on a randomly initialised encoder 97.0, on the pretrained one 93.9);
# with half the slots made up and names capitalised, still 83.6 against 78.6.
# Tags per word: O, or the entity's type (every entity here is one word, so B- alone would do; entity F1 is computed
# on spans all the same).
TAGS = ["O", "CREATURE", "FOOD", "PLACE"]
TEMPLATES = [
    "The {c} eats {f} in the {p}.", "Near the {p}, the {c} and the {c2} share {f}.", "The {c} is {k} and likes {f}.",
    "Every {c} in the {p} is {k}.", "The {k} {c} left the {p} for {f}.", "Yesterday the {c} found {f} by the {p}.",
    "Is the {c} from the {p} or the {p2}?", "The {c} and the {c2} never eat {f}.", "The {p} is {k} with {f}.",
    "Some say the {c} hides {f} under the {p}.", "The {f} and the {f2} grow in the {p}.", "A {k} {c} met the {c2} "
    "at the {p}.", "It lives in the {p} and eats {f}.", "The {c} is {k}.",
]


def tagging_example(rng, creatures, novel):
    template = rng.choice(TEMPLATES)
    made_up = [c["name"].lower() for c in novel]  # made-up words, read nowhere in the corpus

    def word(real):  # a third of the slots a word of the corpus, the rest a made-up one, in lower case in any slot
        return rng.choice(real) if rng.random() < 1 / 3 else rng.choice(made_up)
    names = [c["name"] for c in rng.sample(creatures, 2)]
    values = dict(c=word(names[:1]), c2=word(names[1:]), k=word(wt.ATTRIBUTES["color"]),
                  f=word(wt.ATTRIBUTES["food"]), f2=word(wt.ATTRIBUTES["food"]), p=word(wt.ATTRIBUTES["home"]),
                  p2=word(wt.ATTRIBUTES["home"]))
    kinds = {"c": "CREATURE", "c2": "CREATURE", "f": "FOOD", "f2": "FOOD", "p": "PLACE", "p2": "PLACE"}
    words, tags = [], []
    for part in re.split(r"(\{\w+\})", template):
        if part.startswith("{"):
            new = words_of(values[part[1:-1]])
            tags += [kinds.get(part[1:-1], "O")] * len(new)
        else:
            new = words_of(part)
            tags += ["O"] * len(new)
        words += new
    return words, tags


def tagging_set(pieces, creatures, novel, n, seed, length):
    """Tagging rows: [CLS] sentence [SEP] as pieces, each word's tag on its first piece (-100 elsewhere: not
    scored), and per example the words and tags."""
    rng = random.Random(seed)
    rows, labels, firsts, all_tags = [], [], [], []
    for _ in range(n):
        words, tags = tagging_example(rng, creatures, novel)
        ids, owner = pieces.encode(words)
        first = [i + 1 for i, o in enumerate(owner) if i == 0 or owner[i - 1] != o]  # +1: [CLS]
        label = [-100] * (len(ids) + 2)
        for position, tag in zip(first, tags):
            label[position] = TAGS.index(tag)
        rows.append([pieces.cls] + ids + [pieces.sep])
        assert len(rows[-1]) <= length, f"a tagging sentence of {len(rows[-1])} pieces, longer than {length}"
        labels.append(label)
        firsts.append(first)
        all_tags.append(tags)
    return {"ids": pad_rows(rows, length, pieces.pad), "labels": pad_rows(labels, length, -100), "first": firsts,
            "tags": all_tags}


def entities(tags):
    """Spans (type, first word, last word) of a word tag sequence: a run of one type is one entity."""
    spans, i = set(), 0
    while i < len(tags):
        if tags[i] == "O":
            i += 1
            continue
        j = i
        while j + 1 < len(tags) and tags[j + 1] == tags[i]:
            j += 1
        spans.add((tags[i], i, j))
        i = j + 1
    return spans


def entity_f1(predicted, gold):
    """Micro-averaged entity F1 (CoNLL's): an entity counts only with its type and both ends right."""
    p = [entities(t) for t in predicted]
    g = [entities(t) for t in gold]
    hit = sum(len(a & b) for a, b in zip(p, g))
    n_p, n_g = sum(map(len, p)), sum(map(len, g))
    return 2 * hit / (n_p + n_g) if n_p + n_g else 1.0
