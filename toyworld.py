"""
The toy world: every stage of Flow-OPD runs on a laptop CPU in minutes, with no downloads.

Images are small (32x32 RGB by default) and drawn by code, so every reward can read them back
exactly, with no learned model. Three tasks mirror the paper's:

- composition (the GenEval analogue): coloured circles, squares and triangles on a plain background.
  Prompts come from GenEval's six templates (single_object, two_object, counting, colors, position,
  color_attr), with metadata in GenEval's format, and the strict metric applies GenEval's official
  rules (docs/reward_spec.md 1.4, 1.6) to objects found by colour segmentation, connected
  components and shape template matching.
- text (the OCR analogue): a 1-3 character string in a built-in 3x5 bitmap font, prompt
  `a sign that says "47"`; the target is the first double-quoted span, exactly as the OCR reward reads it.
- quality (the task-agnostic preference signal, the MAR anchor): "a clean picture of ..." prompts,
  scored for a flat background, crisp edges, exact palette colours and no noise, blur or speckle.

Why two scores per task. `score(..., strict=True)` is the evaluation metric (0/1). The training reward
(`strict=False`) is dense and prompt-aware: in the prototype, Flow-GRPO with 64 samples per iteration
made no progress on a 0/1 count or position reward in 170 iterations (a group of all-zero rewards has
no advantage), while a dense pixel-coverage reward climbed in 20 iterations. So each dense reward is a
sum of partial credits (colour coverage that saturates at a plausible object area, soft shape and count
terms, a continuous position term) that is ~1 on a clean render of the prompt, lower on renders of
other prompts, and low on blank images, noise and flat textures.

`make_pretraining_set` writes rendered image-caption pairs with controlled imperfection (the caption is
that of the intended scene, the image is sometimes wrong), so the base model starts moderate on each
task and RL has room to improve.

Layout. A lone object and every string are centred; several objects take distinct cells of a 3x3 grid.
With objects and strings anywhere on the canvas (layout="free"), the 6-layer base model learned to
denoise them almost perfectly from noise level 0.7 down but could not start one from pure noise: its
samples superpose glyphs and shapes at several places, and no text was ever read back. A 3x3 grid
leaves the model the discrete choices GenEval's prompts are about (which cell, which colour, how many).
"""

import copy
import hashlib
import json
import math
import os
import re
import textwrap
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

# -----------------------------------------------------------------------------
# The world: palette, shapes, font

BACKGROUND = (235, 235, 235)
# Seven colours far apart in RGB (closest pair: orange-yellow, 75) and far from the background, so that
# nearest-colour segmentation is exact on clean renders. No pink or grey: a red or black edge blurred
# into the light background would land on them.
PALETTE = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (235, 215, 25), "green": (30, 160, 60),
    "blue": (30, 80, 220), "purple": (140, 50, 180), "black": (25, 25, 25),
}
COLORS = list(PALETTE)
TEXT_COLOR = "black"
SHAPES = ["circle", "square", "triangle"]
NUMBERS = {2: "two", 3: "three", 4: "four"}  # GenEval's counting draws N from {2, 3, 4}
RELATIONS = ["left of", "right of", "above", "below"]
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
TASKS = ["composition", "text", "quality"]

# 3x5 glyphs, rows top to bottom. Every glyph touches all four sides of its 3x5 cell, so a string's ink
# box is exactly its layout box and the reader can recover the scale from the ink height alone.
# Letters that a 3x5 cell cannot tell apart from a digit (B/8, D/0, O/0, S/5, I/1, Z/2) are left out.
GLYPHS = {
    "0": "111 101 101 101 111", "1": "010 110 010 010 111", "2": "111 001 111 100 111",
    "3": "111 001 111 001 111", "4": "101 101 111 001 001", "5": "111 100 111 001 111",
    "6": "111 100 111 101 111", "7": "111 001 001 001 001", "8": "111 101 111 101 111",
    "9": "111 101 111 001 111", "A": "010 101 111 101 101", "C": "111 100 100 100 111",
    "F": "111 100 110 100 100", "H": "101 101 111 101 101", "L": "100 100 100 100 111",
    "P": "111 101 111 100 100", "T": "111 010 010 010 010", "X": "101 101 010 101 101",
    "Y": "101 101 010 010 010",
}
CHARS = "".join(GLYPHS)
GLYPH_BITMAPS = np.array([[[c == "1" for c in row] for row in GLYPHS[ch].split()] for ch in CHARS])  # (19, 5, 3)


def text_scale(size):
    return max(1, size // 16)  # 32 px -> 6x10 px glyphs; a 3-character string is 22 px wide


# -----------------------------------------------------------------------------
# Prompts: GenEval's templates over the toy vocabulary, every prompt enumerated once

TEXT_TEMPLATE = 'a sign that says "{}"'
QUALITY_TEMPLATE = "a clean picture of {}"
TEST_FRACTION = 0.25
TEXT_TEST_SIZE = 256

VOCAB_WORDS = list(dict.fromkeys(
    ["a", "an", "photo", "of", "and", "left", "right", "above", "below", *NUMBERS.values(), *SHAPES,
     *[s + "s" for s in SHAPES], *COLORS, "sign", "that", "says", '"', *CHARS, "clean", "picture"]))


def prompt_words(prompt):
    """The prompt as VOCAB_WORDS: whitespace words, and the quoted span one character at a time."""
    words = []
    for part in re.split(r'("[^"]*")', prompt):
        words += ['"', *part[1:-1], '"'] if part.startswith('"') else part.split()
    return words


def _noun_phrase(shape, color=None, count=1):
    if count > 1:  # GenEval's plural rule: "es" after an s, else "s"
        return f"{NUMBERS[count]} {color + ' ' if color else ''}{shape}{'es' if shape.endswith('s') else 's'}"
    words = f"{color} {shape}" if color else shape
    return ("an " if words[0] in "aeiou" else "a ") + words  # GenEval's article rule


def _clause(shape, count=1, color=None, position=None):
    clause = {"class": shape, "count": count}
    if color:
        clause["color"] = color
    if position:
        clause["position"] = list(position)
    return clause


def _meta(tag, prompt, include, exclude=None):
    return {"tag": tag, "prompt": prompt, "include": include, **({"exclude": exclude} if exclude else {})}


@lru_cache(maxsize=None)
def _prompt_table():
    """{task: {group: [metadata, ...]}} for every prompt the grammar can produce (~8k, built in ms)."""
    comp = {tag: [] for tag in TAGS}
    quality = {"one": [], "many": [], "pair": []}
    photo, clean = "a photo of {}".format, QUALITY_TEMPLATE.format
    for a in SHAPES:
        comp["single_object"].append(_meta("single_object", photo(_noun_phrase(a)), [_clause(a)]))
        for n in NUMBERS:
            comp["counting"].append(_meta("counting", photo(_noun_phrase(a, count=n)),
                                          [_clause(a, n)], [_clause(a, n + 1)]))
        for c in COLORS:
            comp["colors"].append(_meta("colors", photo(_noun_phrase(a, c)), [_clause(a, color=c)]))
            quality["one"].append(_meta("quality", clean(_noun_phrase(a, c)), [_clause(a, color=c)]))
            for n in NUMBERS:
                quality["many"].append(_meta("quality", clean(_noun_phrase(a, c, n)), [_clause(a, n, c)]))
        for b in (b for b in SHAPES if b != a):
            both = f"{_noun_phrase(a)} and {_noun_phrase(b)}"
            comp["two_object"].append(_meta("two_object", photo(both), [_clause(a), _clause(b)]))
            for rel in RELATIONS:  # include[0] is the reference B; A carries [rel, 0] (reward_spec.md 1.1)
                comp["position"].append(_meta("position", photo(f"{_noun_phrase(a)} {rel} {_noun_phrase(b)}"),
                                              [_clause(b), _clause(a, position=(rel, 0))]))
            for ca, cb in ((ca, cb) for ca in COLORS for cb in COLORS if ca != cb):
                both = f"{_noun_phrase(a, ca)} and {_noun_phrase(b, cb)}"
                include = [_clause(a, color=ca), _clause(b, color=cb)]
                comp["color_attr"].append(_meta("color_attr", photo(both), include))
                quality["pair"].append(_meta("quality", clean(both), copy.deepcopy(include)))
    text = {}
    for length in (1, 2, 3):
        strings = [""]
        for _ in range(length):
            strings = [s + ch for s in strings for ch in CHARS]
        text[length] = [{"tag": "text", "prompt": TEXT_TEMPLATE.format(s), "text": s} for s in strings]
    return {"composition": comp, "text": text, "quality": quality}


@lru_cache(maxsize=None)
def _splits():
    """{task: {group: {"train": [...], "test": [...]}}}: disjoint by prompt, every group in both."""
    out = {}
    for task, groups in _prompt_table().items():
        out[task] = {}
        for group, metas in groups.items():
            # Rank by a hash of the prompt (stable across runs and machines) and hold out the first quarter,
            # at least one per group, so even the 3-prompt single_object tag is tested on an unseen prompt.
            ranked = sorted(metas, key=lambda m: hashlib.sha1(m["prompt"].encode()).hexdigest())
            n_test = max(1, math.ceil(TEST_FRACTION * len(ranked)))
            out[task][group] = {"test": ranked[:n_test], "train": ranked[n_test:], "all": metas}
    return out


@lru_cache(maxsize=None)
def _lookup():
    return {m["prompt"]: m for groups in _prompt_table().values() for metas in groups.values() for m in metas}


def quoted_text(prompt):
    """The first double-quoted span, the OCR reward's target ("" if none)."""
    match = re.search(r'"([^"]*)"', prompt)
    return match.group(1) if match else ""


def parse_prompt(prompt):
    """Metadata of a grammar prompt; any prompt with a quoted span parses as a text prompt."""
    if prompt in _lookup():
        return copy.deepcopy(_lookup()[prompt])
    if '"' in prompt:
        return {"tag": "text", "prompt": prompt, "text": quoted_text(prompt)}
    raise ValueError(f"not a toy-world prompt: {prompt!r}")


def prompt_list(task, split="test"):
    """Every prompt of a split, as metadata (a full evaluation set, like GenEval's 553 prompts)."""
    return [copy.deepcopy(m) for group in _splits()[task].values() for m in group[split]]


def sample_prompt(task, rng, split="train", group_weights=None):
    """(prompt, metadata) from split "train", "test" or "all": a group (GenEval tag / text length /
    quality kind) uniformly, or in proportion to group_weights {group: weight}, then a prompt of it uniformly."""
    rng = np.random.default_rng(rng)
    groups = _splits()[task]
    if group_weights is None:
        pool = groups[list(groups)[rng.integers(len(groups))]][split]
    else:
        w = np.array([float(group_weights.get(g, 0.0)) for g in groups])
        pool = groups[list(groups)[rng.choice(len(groups), p=w / w.sum())]][split]
    meta = copy.deepcopy(pool[rng.integers(len(pool))])
    return meta["prompt"], meta


def make_prompt_file(task, n, seed, path, split="train", group_weights=None):
    """n prompts: GenEval-style metadata rows (.jsonl) for composition, one prompt per line otherwise."""
    rng = np.random.default_rng(seed)
    metas = [sample_prompt(task, rng, split, group_weights)[1] for _ in range(n)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for meta in metas:
            f.write((json.dumps(meta) if task == "composition" else meta["prompt"]) + "\n")
    return path


# -----------------------------------------------------------------------------
# Rendering, with controlled imperfection

# Semantic flaws change what is drawn but not the caption; visual flaws degrade the pixels.
FLAWS = ["count", "color", "shape", "relation", "glyph", "blur", "noise", "background", "speckle"]
DEFAULT_IMPERFECTION = {"count": 0.2, "color": 0.2, "shape": 0.2, "relation": 0.25, "glyph": 0.3,
                        "blur": 0.1, "noise": 0.1, "background": 0.1, "speckle": 0.1}
DEFAULT_TASK_MIX = {"composition": 0.5, "text": 0.3, "quality": 0.2}
# Object side as a fraction of the image side, by number of objects in the scene.
SIDE_RANGE = {1: (0.30, 0.45), 2: (0.25, 0.38), 3: (0.22, 0.30), 4: (0.22, 0.28), 5: (0.19, 0.25)}
GAP = 2            # empty pixels between objects, so each object is its own connected component
RENDER_MARGIN = 0.75  # clean position scenes satisfy the relation with this normalised offset (GenEval needs 0.5)


@lru_cache(maxsize=None)
def shape_mask(shape, h, w):
    """The shape filling an h x w box, sampled at pixel centres; touches all four sides of the box."""
    y = (np.arange(h) + 0.5)[:, None]
    x = (np.arange(w) + 0.5)[None, :]
    if shape == "square":
        mask = np.ones((h, w), bool)
    elif shape == "circle":
        mask = ((x - w / 2) / (w / 2)) ** 2 + ((y - h / 2) / (h / 2)) ** 2 <= 1
    elif shape == "triangle":  # apex up; each row uses its lower edge so the apex row is never empty
        mask = np.abs(x - w / 2) <= (y + 0.5) / h * (w / 2)
    else:
        raise ValueError(shape)
    mask.setflags(write=False)
    return mask


@lru_cache(maxsize=None)
def text_mask(text, scale):
    """The string in the built-in font: glyphs 3 wide with a 1-column gap, scaled by nearest neighbour."""
    cells = []
    for ch in text:
        cells += [GLYPH_BITMAPS[CHARS.index(ch)], np.zeros((5, 1), bool)]
    mask = np.kron(np.concatenate(cells[:-1], axis=1), np.ones((scale, scale), bool)).astype(bool)
    mask.setflags(write=False)
    return mask


def _flaw_probs(imperfection):
    if imperfection is None:
        return dict.fromkeys(FLAWS, 0.0)
    if isinstance(imperfection, (int, float)):
        return dict.fromkeys(FLAWS, float(imperfection))
    unknown = set(imperfection) - set(FLAWS)
    if unknown:
        raise ValueError(f"unknown flaws {unknown}; known: {FLAWS}")
    return {f: float(imperfection.get(f, 0.0)) for f in FLAWS}


def _applies(flaw, meta):
    if meta["tag"] == "text":
        return flaw not in ("count", "color", "shape", "relation")
    return {"glyph": False,
            "color": any("color" in c for c in meta["include"]),
            "relation": any("position" in c for c in meta["include"])}.get(flaw, True)


def _too_close(a, b):
    return not (a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1])


def _free_layout(n, size, rng, pair=None):
    """n square boxes (x1, y1, x2, y2) anywhere, of random sides, apart by GAP, 1 px from the border;
    pair = (ia, ib, rel) to satisfy."""
    lo, hi = SIDE_RANGE[min(n, 5)]
    for _ in range(200):
        sides = rng.integers(round(lo * size), round(hi * size) + 1, n)
        boxes = []
        for j in range(n):
            for _ in range(100):
                x, y = rng.integers(1, size - sides[j], 2)
                box = (int(x), int(y), int(x + sides[j]), int(y + sides[j]))
                if any(_too_close(box, b) for b in boxes):
                    continue
                if pair and j == max(pair[0], pair[1]):
                    a_box, b_box = (box, boxes[pair[1]]) if j == pair[0] else (boxes[pair[0]], box)
                    if relation_strength(a_box, b_box, pair[2]) < RENDER_MARGIN:
                        continue
                break
            else:
                break
            boxes.append(box)
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {n} objects in {size}x{size}")


def _grid_layout(n, size, rng, pair=None):
    """The toy world's layout: one object centred (random side), several in distinct cells of a 3x3 grid
    (one side, GAP apart); pair = (ia, ib, rel) to satisfy."""
    if n == 1:
        lo, hi = SIDE_RANGE[1]
        side = int(rng.integers(round(lo * size), round(hi * size) + 1))
        x = (size - side) // 2
        return [(x, x, x + side, x + side)]
    cell = (size - 2) // 3
    side = cell - GAP
    corners = [(1 + cell * i + GAP // 2, 1 + cell * j + GAP // 2) for j in range(3) for i in range(3)]
    for _ in range(500):
        boxes = [(x, y, x + side, y + side) for x, y in (corners[k] for k in rng.choice(9, n, replace=False))]
        if not pair or relation_strength(boxes[pair[0]], boxes[pair[1]], pair[2]) >= RENDER_MARGIN:
            return boxes
    raise RuntimeError(f"could not place {n} objects in {size}x{size}")


LAYOUTS = {"grid": _grid_layout, "free": _free_layout}


def _draw_scene(image, meta, rng, flaws, layout):
    objects = []  # [shape, colour, clause index]
    for i, clause in enumerate(meta["include"]):
        for _ in range(clause["count"]):
            objects.append([clause["class"], clause.get("color") or COLORS[rng.integers(len(COLORS))], i])
    if "count" in flaws:
        i = int(rng.integers(len(meta["include"])))
        clause, members = meta["include"][i], [j for j, o in enumerate(objects) if o[2] == i]
        if (len(members) > 1 or len(meta["include"]) > 1) and rng.random() < 0.5:
            del objects[members[-1]]
        else:
            objects.append([clause["class"], clause.get("color") or COLORS[rng.integers(len(COLORS))], i])
    if "color" in flaws:
        j = rng.choice([j for j, o in enumerate(objects) if "color" in meta["include"][o[2]]])
        objects[j][1] = rng.choice([c for c in COLORS if c != objects[j][1]])
    if "shape" in flaws:
        j = rng.integers(len(objects))
        objects[j][0] = rng.choice([s for s in SHAPES if s != objects[j][0]])
    pair = None
    for i, clause in enumerate(meta["include"]):
        if "position" in clause:
            rel, ref = clause["position"]
            rel = OPPOSITE[rel] if "relation" in flaws else rel
            ia = next((j for j, o in enumerate(objects) if o[2] == i), None)
            ib = next((j for j, o in enumerate(objects) if o[2] == ref), None)
            pair = (ia, ib, rel) if ia is not None and ib is not None else None
    for (shape, color, _), (x1, y1, x2, y2) in zip(objects, LAYOUTS[layout](len(objects), image.shape[0], rng, pair)):
        image[y1:y2, x1:x2][shape_mask(str(shape), y2 - y1, x2 - x1)] = PALETTE[str(color)]


def _draw_text(image, text, rng, wrong_glyph, layout):
    if wrong_glyph:
        i = int(rng.integers(len(text)))
        text = text[:i] + str(rng.choice([c for c in CHARS if c != text[i]])) + text[i + 1:]
    mask = text_mask(text, text_scale(image.shape[0]))
    h, w = mask.shape
    if layout == "free":
        x, y = rng.integers(2, image.shape[1] - 1 - w), rng.integers(2, image.shape[0] - 1 - h)
    else:
        x, y = (image.shape[1] - w) // 2, (image.shape[0] - h) // 2
    image[y:y + h, x:x + w][mask] = PALETTE[TEXT_COLOR]


def _blur(image):
    kernel = np.array([0.25, 0.5, 0.25])
    for axis in (0, 1):
        padded = np.pad(image, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
        image = sum(k * np.take(padded, np.arange(i, i + image.shape[axis]), axis=axis) for i, k in enumerate(kernel))
    return image


def render(metadata_or_prompt, rng, size=32, imperfection=None, return_flaws=False, layout="grid"):
    """A uint8 (size, size, 3) scene for the prompt. imperfection: None (clean), a probability for every
    flaw, or {flaw: probability}. With return_flaws, also the list of flaws actually applied.
    layout: "grid" (the toy world's scenes: objects in a 3x3 grid, a lone object and text centred) or
    "free" (anywhere, any size: the first pre-training phase's data, see build_base)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {list(LAYOUTS)}")
    meta = parse_prompt(metadata_or_prompt) if isinstance(metadata_or_prompt, str) else metadata_or_prompt
    rng = np.random.default_rng(rng)
    probs = _flaw_probs(imperfection)
    draws = rng.random(len(FLAWS))  # always drawn, so the rest of the stream does not depend on the probabilities
    flaws = [f for f, u in zip(FLAWS, draws) if u < probs[f] and _applies(f, meta)]
    background = np.array(BACKGROUND, np.float64)
    if "background" in flaws:
        background = np.clip(background + rng.choice([-1.0, 1.0], 3) * rng.uniform(8, 25, 3), 0, 255)
    image = np.empty((size, size, 3))
    image[:] = background
    if meta["tag"] == "text":
        _draw_text(image, meta.get("text", quoted_text(meta["prompt"])), rng, "glyph" in flaws, layout)
    else:
        _draw_scene(image, meta, rng, flaws, layout)
    if "speckle" in flaws:
        k = max(3, int(rng.integers(6, 16) * size * size / 1024))
        ys, xs = rng.integers(0, size, k), rng.integers(0, size, k)
        image[ys, xs] = np.array(list(PALETTE.values()))[rng.integers(len(COLORS), size=k)]
    if "blur" in flaws:
        image = image + rng.uniform(0.6, 1.0) * (_blur(image) - image)
    if "noise" in flaws:
        image = image + rng.normal(0.0, rng.uniform(8, 24), image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return (image, flaws) if return_flaws else image


def make_pretraining_set(folder, n, seed, imperfection=DEFAULT_IMPERFECTION, task_mix=None, size=32, split="all",
                         layout="grid", group_weights=None):
    """folder/images/000000.png ... and folder/captions.jsonl, one {"file", "prompt", "task", "metadata",
    "flaws"} per line: the plain image-caption format cold_start.py pre-trains from. The caption is that
    of the intended scene; the flaws say how the image departs from it. split="all" by default: the base
    model has seen the grammar's whole prompt space, as SD3.5 saw GenEval-like captions; the train/test
    split only separates RL prompts from evaluation prompts. group_weights {task: {group: weight}}: a task's
    groups (GenEval tag, text length, quality kind) in these proportions instead of uniformly."""
    task_mix = task_mix or DEFAULT_TASK_MIX
    names = list(task_mix)
    weights = np.array([task_mix[t] for t in names], np.float64)
    tasks = np.random.default_rng(seed).choice(names, size=n, p=weights / weights.sum())
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        for i, task in enumerate(tasks):
            rng = np.random.default_rng([seed, i])  # one stream per index: any row is reproducible alone
            prompt, meta = sample_prompt(str(task), rng, split, (group_weights or {}).get(str(task)))
            image, flaws = render(meta, rng, size, imperfection, return_flaws=True, layout=layout)
            file = f"images/{i:06d}.png"
            Image.fromarray(image).save(os.path.join(folder, file))
            row = {"file": file, "prompt": prompt, "task": str(task), "metadata": meta, "flaws": flaws}
            f.write(json.dumps(row) + "\n")
    return os.path.join(folder, "captions.jsonl")


# -----------------------------------------------------------------------------
# Readers: segmentation, objects, positions, text

MATCH_DIST = 60.0    # RGB distance within which a pixel takes a palette colour (closest pair is 75 apart)
MIN_AREA = 10 / 1024  # smaller components (fraction of the image) are speckle, not objects; clean objects: 31+ px
DET_IOU, COUNT_IOU = 0.6, 0.7  # detection thresholds on the confidence (GenEval: score 0.3, counting 0.9)
SHAPE_TEMPERATURE = 0.03  # softmax over template IoUs: a clean 9 px circle is 0.85 IoU to the square, p = 0.99
POSITION_THRESHOLD = 0.1  # GenEval's margin: 10% of the summed sizes (reward_spec.md 1.6)
SIDE_OK = (0.10, 0.18, 0.50, 0.70)  # plausible object side (fraction of the image), as a _ramp
GLYPH_CONTRAST, GLYPH_REJECT = 0.4, 0.12  # a clean glyph cell spans 0..1 and matches at 0
_PALETTE_RGB = np.array(list(PALETTE.values()), np.float64)
_BACKGROUND_RGB = np.array(BACKGROUND, np.float64)
_STACK_8 = np.zeros((3, 3, 3), bool)
_STACK_8[1] = True  # 8-connectivity inside each plane of a stack, no connection across planes


def _as_batch(images):
    images = np.asarray(images)
    if images.dtype != np.uint8:  # float images are taken to be in [0, 1]
        images = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    return images[None] if images.ndim == 3 else images


def _distance(x, color):
    return np.sqrt(((x - color) ** 2).sum(-1))


def segment(images):
    """Per pixel: palette index 0..K-1, K for background, -1 for neither. The background is the median of
    the border pixels (generated images need not hit BACKGROUND exactly). Returns labels (B, H, W),
    background (B, 3), and each pixel's distance to the nearest palette colour (B, H, W)."""
    x = _as_batch(images).astype(np.float64)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    background = np.median(border, axis=1)
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one matmul for all palette colours
    squared = (x ** 2).sum(-1, keepdims=True) - 2 * x @ _PALETTE_RGB.T + (_PALETTE_RGB ** 2).sum(-1)
    d_palette = np.sqrt(np.maximum(squared, 0))
    d_background = _distance(x, background[:, None, None])
    labels = d_palette.argmin(-1)
    nearest_palette = d_palette.min(-1)
    labels[d_background <= nearest_palette] = len(COLORS)  # ties go to the background (a flat image is empty)
    labels[np.minimum(d_background, nearest_palette) > MATCH_DIST] = -1
    return labels, background, nearest_palette


def _ramp(v, a, b, c, d):
    """0 below a, rising to 1 at b, 1 until c, falling to 0 at d."""
    return float(np.clip(min((v - a) / (b - a), (d - v) / (d - c)), 0.0, 1.0))


def _size_ok(box, side):
    return _ramp(max(box[2] - box[0], box[3] - box[1]) / side, *SIDE_OK)


def detect_objects(images, labels=None):
    """Objects per image: connected components of one palette colour, at least MIN_AREA, each with its
    box (x1, y1, x2 exclusive, y2 exclusive), area, IoU against each shape template drawn in its box,
    the shape softmax, the best shape, and a confidence (best IoU x size plausibility), the analogue
    of the detector's score. Also the speckle pixel count per image."""
    if labels is None:
        labels = segment(images)[0]
    B, H, W = labels.shape
    K = len(COLORS)
    planes = (labels[:, None] == np.arange(K)[None, :, None, None]).reshape(B * K, H, W)
    components, _ = ndimage.label(planes, structure=_STACK_8)
    areas = np.bincount(components.ravel())
    min_area = max(4, round(MIN_AREA * H * W))
    small = (areas < min_area)[components] & (components > 0)
    speckle = small.reshape(B, K, H * W).sum(axis=(1, 2))
    objects = [[] for _ in range(B)]
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None or areas[index] < min_area:
            continue
        b, k = divmod(box[0].start, K)
        mask = components[box][0] == index
        h, w = mask.shape
        iou = np.array([(mask & shape_mask(s, h, w)).sum() / (mask | shape_mask(s, h, w)).sum() for s in SHAPES])
        probs = np.exp((iou - iou.max()) / SHAPE_TEMPERATURE)
        xy_box = (box[2].start, box[1].start, box[2].stop, box[1].stop)
        size_ok = _size_ok(xy_box, W)
        objects[b].append({"color": COLORS[k], "shape": SHAPES[int(iou.argmax())], "box": xy_box,
                           "confidence": float(iou.max()) * size_ok, "iou": iou, "shape_probs": probs / probs.sum(),
                           "size_ok": size_ok, "area": int(areas[index])})
    for objs in objects:  # most confident first, as GenEval's detections are
        objs.sort(key=lambda o: (-o["confidence"], -o["area"], o["box"]))
    return objects, speckle


def _offset(box_a, box_b, threshold=POSITION_THRESHOLD):
    """GenEval's revised centre offset of A from B (shrunk by threshold x summed sizes) and the raw norm."""
    a, b = np.asarray(box_a, np.float64), np.asarray(box_b, np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    sizes = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    revised = np.sign(offset) * np.maximum(np.abs(offset) - threshold * sizes, 0)
    return revised, float(np.linalg.norm(offset))


def relative_position(box_a, box_b, threshold=POSITION_THRESHOLD):
    """The set of relations of A with respect to B, GenEval's rule (reward_spec.md 1.6); image y grows down."""
    revised, norm = _offset(box_a, box_b, threshold)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / norm
    holds = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {rel for rel, h in holds.items() if h}


def relation_strength(box_a, box_b, rel):
    """The normalised offset along rel's direction in [-1, 1]; GenEval's rule holds when it exceeds 0.5."""
    revised, norm = _offset(box_a, box_b)
    if norm == 0:
        return 0.0
    dx, dy = revised / norm
    return float({"left of": -dx, "right of": dx, "above": -dy, "below": dy}[rel])


def geneval_correct(meta, objects):
    """GenEval's official per-image rule (reward_spec.md 1.4) on the read-back objects."""
    threshold = COUNT_IOU if meta["tag"] == "counting" else DET_IOU
    detections = {s: [o for o in objects if o["shape"] == s and o["confidence"] >= threshold] for s in SHAPES}
    matched = []
    for clause in meta["include"]:
        found = detections[clause["class"]][:clause["count"]]
        if len(found) < clause["count"]:
            return False
        if "color" in clause and sum(o["color"] == clause["color"] for o in found) < clause["count"]:
            return False
        if "position" in clause:
            rel, ref = clause["position"]
            if not all(rel in relative_position(a["box"], b["box"]) for a in found for b in matched[ref]):
                return False
        matched.append(found)
    return all(len(detections[c["class"]]) < c["count"] for c in meta.get("exclude", []))


def _ink(images, background):
    """Continuous ink map in [0, 1]: distance from the background in units of the text colour's distance."""
    full = _distance(np.array(PALETTE[TEXT_COLOR], np.float64), _BACKGROUND_RGB)
    return np.clip(_distance(images.astype(np.float64), background[:, None, None]) / full, 0, 1)


def read_text(images, background=None):
    """The string in each image: ink box -> scale from its height (glyphs are 5 cells tall) -> number of
    characters from its width -> the layout grid centred on the box -> each 3x5 cell block-averaged,
    contrast-stretched and matched to the nearest glyph; "?" for a cell like no glyph, so that noise
    does not read as text. Centring and stretching keep soft (blurred) glyphs readable."""
    images = _as_batch(images)
    ink = _ink(images, segment(images)[1] if background is None else background)
    out = []
    for page in ink:
        components, _ = ndimage.label(page > 0.35, structure=np.ones((3, 3)))
        # Drop specks of 1-2 pixels (every glyph is one 8-connected piece of 5+ pixels).
        solid = (np.bincount(components.ravel()) >= 3)[components] & (components > 0)
        rows, cols = np.flatnonzero(solid.any(1)), np.flatnonzero(solid.any(0))
        if rows.size == 0:
            out.append("")
            continue
        s = max(1, round((rows[-1] + 1 - rows[0]) / 5))
        n = min(6, max(1, round((cols[-1] + 1 - cols[0] + s) / (4 * s))))
        pad = 4 * s * n
        padded = np.pad(page, pad)
        y0 = pad + round((rows[0] + rows[-1] + 1 - 5 * s) / 2)
        x0 = pad + round((cols[0] + cols[-1] + 1 - (4 * n - 1) * s) / 2)
        text = ""
        for i in range(n):
            x = x0 + 4 * s * i
            cell = padded[y0:y0 + 5 * s, x:x + 3 * s].reshape(5, s, 3, s).mean(axis=(1, 3))
            lo, hi = cell.min(), cell.max()  # every glyph has both ink and empty cells
            errors = ((GLYPH_BITMAPS - (cell - lo) / max(hi - lo, 1e-6)) ** 2).mean(axis=(1, 2))
            readable = hi - lo >= GLYPH_CONTRAST and errors.min() <= GLYPH_REJECT
            text += CHARS[int(errors.argmin())] if readable else "?"
        out.append(text)
    return out


def edit_distance(a, b):
    """Levenshtein distance (insertions, deletions, substitutions, each cost 1)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def text_accuracy(images, prompts, read=None):
    """The OCR reward's analogue (reward_spec.md 3): 1 - min(edit distance, len) / len of the read string vs
    the quoted target, spaces removed and lowercased; 1 when the target is a substring of the read text."""
    read = read_text(images) if read is None else read
    scores = []
    for text, prompt in zip(read, prompts):
        text, target = text.replace(" ", "").lower(), quoted_text(prompt).replace(" ", "").lower()
        if not target:
            scores.append(float(text == ""))
            continue
        errors = 0 if target in text else min(edit_distance(text, target), len(target))
        scores.append(1.0 - errors / len(target))
    return np.array(scores, np.float64)


# -----------------------------------------------------------------------------
# Scores: strict (evaluation, 0/1) and dense (training reward, [0, 1])

AREA_RANGE = (0.015, 0.25)   # plausible area of one object, fraction of the image: coverage saturates inside
CONTENT_RANGE = (0.005, 0.02, 0.35, 0.5)  # ink fraction for the quality score, same ramp shape
QUALITY_THRESHOLD = 0.8


def _coverage(area, n, pixels):
    lo, hi = n * AREA_RANGE[0] * pixels, n * AREA_RANGE[1] * pixels
    return min(1.0, area / lo) * min(1.0, hi / area) if area > 0 else 0.0


def _cleanliness(images, nearest_palette, speckle):
    """Task-agnostic quality in [0, 1]: exact palette or background colours around the content (noise,
    blur and a tinted background all move pixels off them), a plausible amount of ink, no speckle."""
    d_background = _distance(images.astype(np.float64), _BACKGROUND_RGB)
    exact = np.clip((40.0 - np.minimum(d_background, nearest_palette)) / 30.0, 0, 1)
    near = d_background > 12.0
    near = near | np.roll(near, 1, 1) | np.roll(near, -1, 1) | np.roll(near, 1, 2) | np.roll(near, -1, 2)
    counted = near.sum(axis=(1, 2))
    palette = np.where(counted > 0, (exact * near).sum(axis=(1, 2)) / np.maximum(counted, 1), 1.0)
    content = np.array([_ramp(f, *CONTENT_RANGE) for f in (d_background > 40.0).mean(axis=(1, 2))])
    no_speckle = np.clip(1.0 - speckle / (0.01 * near[0].size), 0, 1)
    return palette ** 2 * content * no_speckle


def _composition_dense(meta, objects, pixels):
    """Partial credit, Flow-GRPO style (a weighted mean of terms), made dense: coverage of each caption
    colour (or of all ink) saturating at a plausible area, per clause the soft presence of the n best
    matching objects times a soft count penalty, a continuous position term, all times a penalty for ink
    that no clause explains (wrong colours, extra objects)."""
    clauses = meta["include"]
    terms, weights = [], []
    explained = np.zeros(len(objects), bool)
    best = []
    for clause in clauses:
        q = np.array([o["shape_probs"][SHAPES.index(clause["class"])] * o["size_ok"]
                      * (clause.get("color", o["color"]) == o["color"]) for o in objects])
        n = clause["count"]
        presence = np.sort(q)[::-1][:n].sum() / n if q.size else 0.0
        terms.append(presence * math.exp(-abs(q.sum() - n)))
        weights.append(1.0)
        explained |= q >= 0.5
        best.append((objects[int(q.argmax())], float(q.max())) if q.size and q.max() > 0 else (None, 0.0))
        if "color" in clause:
            area = sum(o["area"] for o in objects if o["color"] == clause["color"])
            terms.append(_coverage(area, n, pixels))
            weights.append(0.5)
    if not any("color" in c for c in clauses):
        terms.append(_coverage(sum(o["area"] for o in objects), sum(c["count"] for c in clauses), pixels))
        weights.append(0.5)
    for clause, (a, qa) in zip(clauses, best):
        if "position" in clause:
            rel, ref = clause["position"]
            b, qb = best[ref]
            # Linear in the normalised offset from -0.3 to 0.7: some credit for moving the right way
            # even while GenEval's 0.5 rule still fails.
            strength = relation_strength(a["box"], b["box"], rel) if a is not None and b is not None else -1.0
            terms.append(float(np.clip(strength + 0.3, 0, 1)) * min(qa, qb))
            weights.append(2.0)
    ink = sum(o["area"] for o in objects)
    unexplained = 1.0 - sum(o["area"] for o, e in zip(objects, explained) if e) / ink if ink else 0.0
    return float(np.dot(terms, weights) / sum(weights)) * (1.0 - 0.5 * unexplained)


def _soft_glyph_match(ink, text, scale):
    """Best normalised cross-correlation of the ink map with the target string drawn at the font's scale,
    over all placements, computed on the whole canvas so that ink outside the string lowers it."""
    if not text or not set(text) <= set(CHARS):
        return 0.0
    template = text_mask(text, scale).astype(np.float32)
    if template.shape[0] > ink.shape[0] or template.shape[1] > ink.shape[1]:
        return 0.0
    n, ink_mean = ink.size, ink.mean()
    ink_norm = np.sqrt(((ink - ink_mean) ** 2).sum())
    template_mean = template.sum() / n
    template_norm = np.sqrt((template ** 2).sum() - n * template_mean ** 2)
    if ink_norm < 1e-6:
        return 0.0
    correlation = np.einsum("ijkl,kl->ij", np.lib.stride_tricks.sliding_window_view(ink, template.shape), template)
    return float(((correlation - n * ink_mean * template_mean) / (ink_norm * template_norm)).max())


def _form_and_align(meta, objects):
    """Two light prompt terms of the quality score, for prompts that name objects (1 otherwise):
    form, the ink-weighted detector confidence (ink drawn as well-formed shapes of a plausible size, so
    that stripes or tiles are not "clean pictures"); align, the share of ink in the caption's colours
    (PickScore is prompt-aware too, but mostly about the picture itself)."""
    if "include" not in meta:
        return 1.0, 1.0
    ink = sum(o["area"] for o in objects)
    if not ink:
        return 0.0, 0.0
    colors = {c["color"] for c in meta["include"] if "color" in c}
    form = sum(o["area"] * o["confidence"] for o in objects) / ink
    align = sum(o["area"] for o in objects if o["color"] in colors) / ink if colors else 1.0
    return form, align


def score(task, images, prompts, metadata=None, strict=False):
    """Scores (B,) float64 of uint8 images (B, H, W, 3); metadata is parsed from the prompts if not given.
    strict=True: the 0/1 evaluation metric (composition: GenEval's official rule; text: exact read;
    quality: cleanliness >= QUALITY_THRESHOLD and well-formed objects).
    strict=False: the dense training reward in [0, 1]."""
    images = _as_batch(images)
    metadata = metadata if metadata is not None else [parse_prompt(p) for p in prompts]
    labels, background, nearest_palette = segment(images)
    objects, speckle = detect_objects(images, labels)
    clean = _cleanliness(images, nearest_palette, speckle)
    pixels, side = images.shape[1] * images.shape[2], images.shape[1]
    # Every task's dense reward carries a little of the quality score, so noisy renders of the right
    # content score below clean ones (the strict metrics ignore it, as GenEval and OCR do).
    quality_factor = 0.75 + 0.25 * clean
    if task == "composition":
        if strict:
            return np.array([float(geneval_correct(m, objs)) for m, objs in zip(metadata, objects)])
        return np.array([_composition_dense(m, objs, pixels) for m, objs in zip(metadata, objects)]) * quality_factor
    if task == "text":
        read = read_text(images, background)
        if strict:
            return np.array([float(text == quoted_text(p)) for text, p in zip(read, prompts)])
        ink = _ink(images, background)
        scale = text_scale(side)
        match = np.array([max(0.0, _soft_glyph_match(page, quoted_text(p), scale)) for page, p in zip(ink, prompts)])
        # Cubed because 3x5 glyphs share most strokes (8 and 0 differ by one cell, correlation 0.93): one
        # wrong character out of three then costs about a third of the credit, as it does in the OCR term.
        return (0.5 * match ** 3 + 0.5 * text_accuracy(images, prompts, read)) * quality_factor
    if task == "quality":
        form, align = np.array([_form_and_align(m, objs) for m, objs in zip(metadata, objects)]).T
        if strict:
            return ((clean >= QUALITY_THRESHOLD) & (form >= 0.5)).astype(np.float64)
        return clean * (0.4 + 0.3 * form + 0.3 * align)
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


# -----------------------------------------------------------------------------
# Human-viewable grids

def grid(images, captions=None, cols=8, scale=4):
    """Images upscaled by nearest neighbour, each with its caption wrapped underneath."""
    images = _as_batch(images)
    h, w = images.shape[1] * scale, images.shape[2] * scale
    font = ImageFont.load_default()
    wrapped = [textwrap.wrap(c, width=max(8, w // 6)) for c in (captions or [""] * len(images))]
    line = 11
    cell_h = h + 4 + line * max([len(t) for t in wrapped] + [0])
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (min(cols, len(images)) * (w + 4), rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % cols) * (w + 4), (i // cols) * cell_h
        sheet.paste(Image.fromarray(image).resize((w, h), Image.NEAREST), (x, y))
        for j, text in enumerate(lines):
            draw.text((x, y + h + 2 + j * line), text, fill="black", font=font)
    return sheet


# -----------------------------------------------------------------------------
# Building the toy world's files: prompt sets and the base model

BASE_IMPERFECTION = {k: v / 2 for k, v in DEFAULT_IMPERFECTION.items()}  # the committed base model's data
# The third pre-training phase's data (build_third_phase): the groups where the two-phase base leaves RL too little
# room or the test set has most of its prompts (three-character strings: pass@8 0.03; color_attr: 78% of the
# composition test images), oversampled.
FOCUS_TASK_MIX = {"composition": 0.4, "text": 0.45, "quality": 0.15}
FOCUS_GROUPS = {"text": {1: 0.05, 2: 0.35, 3: 0.6},
                "composition": {"single_object": 0.05, "two_object": 0.1, "counting": 0.1, "colors": 0.05,
                                "position": 0.15, "color_attr": 0.55}}
BASE_PIPELINE = dict(num_layers=6, heads=4, head_dim=32, dual_attention_layers=(0, 1), qk_norm="rms_norm", sample_size=16,
                     patch_size=2, codec="pixel", pixel_factor=2, clip_length=16, clip_dims=(32, 48), joint_dim=64, seed=0,
                     pixel_scaling=2.25, pixel_shift=0.7)  # shift/scaling: mean 0.70, std 0.44 of the pixels in [-1, 1]


def write_prompt_files(folder="toy/prompts"):
    """The toy tasks' prompt files. Train: 2000 draws, tag-balanced like GenEval's training mix (for text: a
    third each of 1-, 2- and 3-character strings), and (composition, text) 2000 in the test set's mix of groups
    (_testmix). Test: every held-out composition and quality prompt, and 256
    held-out strings: all 96 of 1 and 2 characters, 160 of 3 (a random sample of 256 held-out strings would be
    240 of 3 characters, the length the base reads least: docs/toy_results.md, "the room RL has")."""
    for task, ext in (("composition", "jsonl"), ("text", "txt"), ("quality", "txt")):
        make_prompt_file(task, 2000, 0, os.path.join(folder, f"{task}_train.{ext}"), split="train")
        metas = prompt_list(task, "test")
        if task == "text":  # every held-out 1- and 2-character string (5 + 91), then 3-character ones up to 256
            short, long = [m for m in metas if len(m["text"]) < 3], [m for m in metas if len(m["text"]) == 3]
            pick = np.random.default_rng(0).choice(len(long), TEXT_TEST_SIZE - len(short), replace=False)
            metas = short + [long[i] for i in sorted(pick)]
        with open(os.path.join(folder, f"{task}_test.{ext}"), "w") as f:
            f.writelines((json.dumps(m) if task == "composition" else m["prompt"]) + "\n" for m in metas)
        # the test set's mix: 2000 train prompts whose groups come in the test file's proportions (composition:
        # 78% color_attr, where the held-out room is; text: 2% / 36% / 62% of 1, 2, 3 characters)
        if task == "quality":  # its teacher clears the bar on the tag-balanced file
            continue
        tested = {m["prompt"] for m in metas}
        mix = {g: sum(m["prompt"] in tested for m in split["test"]) for g, split in _splits()[task].items()}
        make_prompt_file(task, 2000, 0, os.path.join(folder, f"{task}_train_testmix.{ext}"), split="train", group_weights=mix)


def build_base(out="toy/base", work="runs/toy", n_images=100000):
    """The toy base model, from scratch, in three phases of cold_start.py pre-training (about 2 h 15 min on
    2 cores). Phase 1 (preset toy_pretrain, 12000 steps): scenes anywhere on the canvas, SD3's timestep
    density. Phase 2 (toy_pretrain_grid, 2400 steps from phase 1's weights): the toy world's own grid
    layout, more steps at high noise. Phase 1 alone denoises well but does not start a scene from pure
    noise (its text is never legible). Phase 3 (build_third_phase, order-aware): the T5 made order-aware,
    1200 steps of toy_pretrain_focus. docs/toy_results.md, "The base model" and "What limits the teachers",
    has the measurements."""
    import shutil
    import subprocess
    import sys
    import model
    make_pretraining_set(os.path.join(work, "pretrain_data"), n_images, seed=0, imperfection=BASE_IMPERFECTION, layout="free")
    model.build_tiny_pipeline(os.path.join(work, "skeleton"), words=VOCAB_WORDS, **BASE_PIPELINE)
    subprocess.run([sys.executable, "cold_start.py", "--preset=toy_pretrain"], check=True)
    make_pretraining_set(os.path.join(work, "pretrain_data_grid"), n_images, seed=1, imperfection=BASE_IMPERFECTION, layout="grid")
    phase1 = os.path.join(model.latest_checkpoint(os.path.join(work, "pretrain")), "pipeline")
    subprocess.run([sys.executable, "cold_start.py", "--preset=toy_pretrain_grid", f"--model={phase1}"], check=True)
    phase2 = os.path.join(model.latest_checkpoint(os.path.join(work, "pretrain_grid")), "pipeline")
    build_third_phase(phase2, out, work, order_aware=True)


def order_aware_t5(folder, strength=8.0):
    """Rewrite a toy pipeline's T5 (folder/text_encoder_3) so that its tokens carry their neighbours: the shared
    relative-position bias of its two heads set to attend to the previous (head 0) and the next token (head 1)
    with logit `strength`, every other bucket 0. A random T5 attends almost uniformly, so its outputs are a bag of
    words: "a red circle and a blue square" and "a blue circle and a red square" give nearly the same set of token
    vectors (the MMDiT has no text positions: it sees a set), where SD3.5's pretrained T5 tells them apart."""
    from transformers import T5EncoderModel
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention
    path = os.path.join(folder, "text_encoder_3")
    t5 = T5EncoderModel.from_pretrained(path)
    bias = t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # (buckets, heads)
    if bias.shape[1] != 2:
        raise ValueError(f"{path}: order_aware_t5 expects the toy T5's 2 heads, found {bias.shape[1]}")
    buckets = T5Attention._relative_position_bucket(torch.tensor([-1, 1]), bidirectional=True, num_buckets=bias.shape[0],
                                                    max_distance=t5.config.relative_attention_max_distance).tolist()
    with torch.no_grad():
        bias.zero_()
        bias[buckets[0], 0] = strength  # relative position key - query = -1: the previous token
        bias[buckets[1], 1] = strength  # +1: the next token
    t5.save_pretrained(path)
    return path


def build_third_phase(base, out, work="runs/toy", order_aware=True):
    """The third pre-training phase (about 17 min on 2 cores) from the two-phase base `base` (the toy/base of
    commit 6e5cc7d), copied to `out`: 1200 steps of toy_pretrain_focus on 60k grid scenes with three-character
    strings and colour binding oversampled (FOCUS_GROUPS). order_aware=True (the committed base): first the
    T5 of a copy of `base` (work/base_t5) is rewritten by order_aware_t5, text accuracy 0.32 -> 0.67;
    False: the same phase on the bag-of-words T5, which reads more strings but on which the teachers did no
    better (docs/toy_results.md, "A third pre-training phase" and "What limits the teachers")."""
    import shutil
    import subprocess
    import sys
    import model
    make_pretraining_set(os.path.join(work, "pretrain_data_focus"), 60000, seed=2, imperfection=BASE_IMPERFECTION,
                         task_mix=FOCUS_TASK_MIX, layout="grid", group_weights=FOCUS_GROUPS)
    run_dir = os.path.join(work, "pretrain_t5" if order_aware else "pretrain_focus")
    if order_aware:
        start = os.path.join(work, "base_t5")
        shutil.rmtree(start, ignore_errors=True)
        shutil.copytree(base, start)
        order_aware_t5(start)
        base = start
    subprocess.run([sys.executable, "cold_start.py", "--preset=toy_pretrain_focus", f"--model={base}",
                    f"--images={os.path.join(work, 'pretrain_data_focus')}", f"--data_dir={os.path.join(work, 'pretrain_latents_focus')}",
                    f"--out_dir={run_dir}"], check=True)
    final = os.path.join(model.latest_checkpoint(run_dir), "pipeline")
    shutil.rmtree(out + ".new", ignore_errors=True)
    shutil.copytree(final, out + ".new")
    shutil.rmtree(out, ignore_errors=True)  # the old base goes only once its replacement is complete
    os.rename(out + ".new", out)
    print("wrote", out)


if __name__ == "__main__":
    # python toyworld.py samples [out.png] | prompts [folder] | base | third_phase PHASE2_BASE [OUT] [--bag_of_words]
    import sys
    command = sys.argv[1] if len(sys.argv) > 1 else "samples"
    if command == "prompts":
        write_prompt_files(*sys.argv[2:3])
        raise SystemExit(0)
    if command == "base":
        build_base()
        raise SystemExit(0)
    if command == "third_phase":  # the committed base from the two-phase one: see build_third_phase
        positional = [a for a in sys.argv[2:] if not a.startswith("--")]
        if not positional or not os.path.isfile(os.path.join(positional[0], "model_index.json")):
            raise SystemExit("error: python toyworld.py third_phase PHASE2_BASE [OUT]: PHASE2_BASE must be a pipeline folder, "
                             "e.g. the two-phase base of commit 6e5cc7d: mkdir -p runs/toy/phase2 && "
                             "git archive 6e5cc7d toy/base | tar -x -C runs/toy/phase2 --strip-components=2")
        build_third_phase(positional[0], positional[1] if len(positional) > 1 else "toy/base",
                          order_aware="--bag_of_words" not in sys.argv)
        raise SystemExit(0)
    # samples: a grid of clean and imperfect samples per task, and their scores.
    rows_images, rows_captions = [], []
    for task in TASKS:
        for imperfection in (None, DEFAULT_IMPERFECTION):
            rng = np.random.default_rng(0)
            metas = [sample_prompt(task, rng)[1] for _ in range(8)]
            images = np.stack([render(m, rng, imperfection=imperfection) for m in metas])
            prompts = [m["prompt"] for m in metas]
            dense, strict = score(task, images, prompts, metas), score(task, images, prompts, metas, strict=True)
            kind = "clean" if imperfection is None else "imperfect"
            print(f"{task:12s} {kind:9s} dense {dense.mean():.3f} strict {strict.mean():.3f}")
            rows_images.append(images)
            rows_captions += [f"{p} [{d:.2f}/{s:.0f}]" for p, d, s in zip(prompts, dense, strict)]
    out = sys.argv[2] if len(sys.argv) > 2 else "out/toyworld_samples.png"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    grid(np.concatenate(rows_images), rows_captions, cols=8).save(out)
    print("wrote", out)
