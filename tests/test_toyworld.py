import copy
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

import toyworld as tw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _score(task, images, metas, strict):
    return tw.score(task, np.stack(images), [m["prompt"] for m in metas], metas, strict=strict)


def _metas(task, n, seed, tag=None):
    """n prompts of a task (groups drawn evenly: GenEval tags, text lengths), or of one GenEval tag."""
    rng = np.random.default_rng(seed)
    if tag is None:
        return [tw.sample_prompt(task, rng, "all")[1] for _ in range(n)]
    pool = [m for m in tw.prompt_list(task, "all") if m["tag"] == tag]
    return [copy.deepcopy(pool[i]) for i in rng.integers(len(pool), size=n)]


# ----- prompts ---------------------------------------------------------------------------------

def test_vocabulary_covers_every_prompt():
    assert 40 <= len(tw.VOCAB_WORDS) <= 120 and len(set(tw.VOCAB_WORDS)) == len(tw.VOCAB_WORDS)
    vocab = set(tw.VOCAB_WORDS)
    for task in tw.TASKS:
        for meta in tw.prompt_list(task, "all"):
            assert set(tw.prompt_words(meta["prompt"])) <= vocab, meta["prompt"]
    assert tw.prompt_words('a sign that says "4A"') == ["a", "sign", "that", "says", '"', "4", "A", '"']


def test_splits_are_disjoint_and_cover_every_group():
    for task, groups in tw._splits().items():
        train, test = set(), set()
        for group, split in groups.items():
            assert split["train"] and split["test"], (task, group)
            train |= {m["prompt"] for m in split["train"]}
            test |= {m["prompt"] for m in split["test"]}
        assert not train & test
        assert len(test) / (len(train) + len(test)) == pytest.approx(tw.TEST_FRACTION, abs=0.02)


def test_metadata_follows_geneval_format():
    metas = tw.prompt_list("composition", "all")
    assert {m["tag"] for m in metas} == set(tw.TAGS)
    for m in metas:
        assert set(m) <= {"tag", "prompt", "include", "exclude"}
        assert tw.parse_prompt(m["prompt"]) == m
        if m["tag"] == "counting":
            n = m["include"][0]["count"]
            assert n in (2, 3, 4) and m["exclude"] == [{"class": m["include"][0]["class"], "count": n + 1}]
        if m["tag"] == "position":  # include[0] is the reference, include[1] points at it
            assert m["include"][1]["position"][1] == 0 and m["include"][1]["position"][0] in tw.RELATIONS
    assert tw.parse_prompt("a photo of an orange square")["include"] == [{"class": "square", "count": 1, "color": "orange"}]
    assert tw.parse_prompt('a sign that says "7A"')["text"] == "7A"


def test_prompt_files_are_deterministic_and_respect_the_split(tmp_path):
    for task, ext in [("composition", "jsonl"), ("text", "txt"), ("quality", "txt")]:
        a, b, c = (tmp_path / f"{task}_{i}.{ext}" for i in range(3))
        tw.make_prompt_file(task, 50, 3, a, split="test")
        tw.make_prompt_file(task, 50, 3, b, split="test")
        tw.make_prompt_file(task, 50, 4, c, split="test")
        assert a.read_text() == b.read_text() != c.read_text()
        lines = a.read_text().splitlines()
        prompts = [json.loads(line)["prompt"] for line in lines] if ext == "jsonl" else lines
        assert len(prompts) == 50 and set(prompts) <= {m["prompt"] for m in tw.prompt_list(task, "test")}
    # group_weights: groups drawn in proportion (a zero weight never drawn), prompts still of the split
    rng = np.random.default_rng(0)
    tags = [tw.sample_prompt("composition", rng, "train", {"color_attr": 3, "position": 1})[1]["tag"] for _ in range(800)]
    assert set(tags) == {"color_attr", "position"} and tags.count("color_attr") / 800 == pytest.approx(0.75, abs=0.05)
    p1, m1 = tw.sample_prompt("composition", 7)
    p2, m2 = tw.sample_prompt("composition", np.random.default_rng(7))
    assert p1 == p2 and m1 == m2


def test_committed_testmix_files_are_train_prompts_in_the_test_sets_mix():
    """toy/prompts/*_train_testmix.*: train-split prompts only, groups in the test file's proportions."""
    test = {m["prompt"] for m in tw.prompt_list("composition", "test")}
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "toy/prompts/composition_train_testmix.jsonl"))]
    assert len(rows) == 2000 and not {r["prompt"] for r in rows} & test
    assert all(tw.parse_prompt(r["prompt"]) == r for r in rows)
    share = sum(r["tag"] == "color_attr" for r in rows) / len(rows)
    assert share == pytest.approx(63 / 81, abs=0.03)  # 63 of the 81 held-out prompts are color_attr
    texts = [tw.quoted_text(line) for line in open(os.path.join(ROOT, "toy/prompts/text_train_testmix.txt"))]
    held_out = {tw.quoted_text(line) for line in open(os.path.join(ROOT, "toy/prompts/text_test.txt"))}
    assert len(texts) == 2000 and not set(texts) & held_out
    for length, count in ((1, 5), (2, 91), (3, 160)):  # the test file: 5, 91 and 160 strings of 1, 2, 3 characters
        assert sum(len(t) == length for t in texts) / 2000 == pytest.approx(count / 256, abs=0.03)


# ----- round trips: clean renders pass, wrong renders fail ------------------------------------

@pytest.mark.parametrize("layout", list(tw.LAYOUTS))
@pytest.mark.parametrize("tag", tw.TAGS)
def test_clean_composition_renders_pass(tag, layout):
    metas = _metas("composition", 40, seed=tw.TAGS.index(tag), tag=tag)
    images = [tw.render(m, np.random.default_rng(i), layout=layout) for i, m in enumerate(metas)]
    assert _score("composition", images, metas, strict=True).min() == 1.0
    assert _score("composition", images, metas, strict=False).min() >= 0.9


@pytest.mark.parametrize("layout", list(tw.LAYOUTS))
@pytest.mark.parametrize("task", ["text", "quality"])
def test_clean_text_and_quality_renders_pass(task, layout):
    metas = _metas(task, 60, seed=1)
    images = [tw.render(m, np.random.default_rng(i), layout=layout) for i, m in enumerate(metas)]
    assert _score(task, images, metas, strict=True).min() == 1.0
    assert _score(task, images, metas, strict=False).min() >= 0.9


def _wrong(meta, rng):
    """The metadata of a scene that contradicts the prompt in one way."""
    m = copy.deepcopy(meta)
    inc = m["include"]
    if m["tag"] in ("single_object", "two_object"):
        inc[-1]["class"] = next(s for s in tw.SHAPES if s not in [c["class"] for c in inc])
    elif m["tag"] == "counting":
        inc[0]["count"] += 1 if rng.random() < 0.5 or inc[0]["count"] == 2 else -1
        m.pop("exclude")
    elif m["tag"] in ("colors", "color_attr"):
        inc[-1]["color"] = next(c for c in tw.COLORS if c not in [x.get("color") for x in inc])
    elif m["tag"] == "position":
        inc[1]["position"][0] = tw.OPPOSITE[inc[1]["position"][0]]
    return m


@pytest.mark.parametrize("tag", tw.TAGS)
def test_renders_of_a_contradicting_prompt_fail(tag):
    rng = np.random.default_rng(10)
    metas = _metas("composition", 30, seed=20 + tw.TAGS.index(tag), tag=tag)
    clean = [tw.render(m, rng) for m in metas]
    wrong = [tw.render(_wrong(m, rng), rng) for m in metas]
    assert _score("composition", wrong, metas, strict=True).max() == 0.0
    dense_clean = _score("composition", clean, metas, strict=False)
    dense_wrong = _score("composition", wrong, metas, strict=False)
    assert dense_wrong.max() <= 0.8 and dense_wrong.mean() <= dense_clean.mean() - 0.3, dense_wrong


def test_renders_of_a_different_string_fail():
    rng = np.random.default_rng(11)
    metas = _metas("text", 60, seed=12)
    wrong = []
    for m in metas:  # one character changed
        i = rng.integers(len(m["text"]))
        other = m["text"][:i] + str(rng.choice([c for c in tw.CHARS if c != m["text"][i]])) + m["text"][i + 1:]
        wrong.append(tw.render(tw.TEXT_TEMPLATE.format(other), rng))
    assert _score("text", wrong, metas, strict=True).max() == 0.0
    dense = _score("text", wrong, metas, strict=False)  # partial credit: 2 of 3 characters right is ~0.7
    assert dense.max() <= 0.85 and dense.mean() <= 0.6


def test_quality_prefers_the_caption_colours_and_clean_pixels():
    metas = _metas("quality", 40, seed=13)
    rng = np.random.default_rng(13)
    clean = _score("quality", [tw.render(m, rng) for m in metas], metas, strict=False)
    recoloured = []
    for m in metas:
        r = copy.deepcopy(m)
        for clause in r["include"]:
            clause["color"] = next(c for c in tw.COLORS if c not in [x["color"] for x in m["include"]])
        recoloured.append(tw.render(r, rng))
    assert _score("quality", recoloured, metas, strict=False).max() <= 0.75 < clean.min()
    for flaw in ("noise", "blur", "background", "speckle"):
        flawed = [tw.render(m, rng, imperfection={flaw: 1.0}) for m in metas]
        assert _score("quality", flawed, metas, strict=True).max() == 0.0, flaw
        assert _score("quality", flawed, metas, strict=False).mean() <= 0.5, flaw


@pytest.mark.parametrize("task", tw.TASKS)
def test_blank_noise_and_trivial_textures_score_low(task):
    metas = _metas(task, 40, seed=14)
    rng = np.random.default_rng(14)
    blank = np.full((40, 32, 32, 3), 235, np.uint8)
    noise = rng.integers(0, 256, (40, 32, 32, 3)).astype(np.uint8)
    # A flat image, and a big block, in the caption's first colour (black for text prompts).
    colors = [np.array(tw.PALETTE[next((c["color"] for c in m.get("include", []) if "color" in c), "black")], np.uint8) for m in metas]
    flat = np.stack([np.broadcast_to(c, (32, 32, 3)) for c in colors])
    block = blank.copy()
    block[:, 3:29, 3:29] = np.stack(colors)[:, None, None]
    for images in (blank, noise, flat, block):
        assert _score(task, images, metas, strict=True).max() == 0.0
        assert _score(task, images, metas, strict=False).max() <= 0.3


@pytest.mark.parametrize("task", tw.TASKS)
def test_visual_flaws_lower_the_dense_reward(task):
    metas = _metas(task, 30, seed=15)
    rng = np.random.default_rng(15)
    clean = _score(task, [tw.render(m, rng) for m in metas], metas, strict=False).mean()
    for flaw in ("noise", "blur", "background", "speckle"):
        flawed = _score(task, [tw.render(m, rng, imperfection={flaw: 1.0}) for m in metas], metas, strict=False)
        assert flawed.mean() <= clean - 0.1, flaw


def test_semantic_flaws_break_the_strict_metric():
    rng = np.random.default_rng(16)
    cases = [("shape", tw.TAGS), ("relation", ["position"]), ("color", ["colors", "color_attr"])]
    for flaw, tags in cases:
        metas = [m for tag in tags for m in _metas("composition", 10, seed=16, tag=tag)]
        images = [tw.render(m, rng, imperfection={flaw: 1.0}) for m in metas]
        assert _score("composition", images, metas, strict=True).max() == 0.0, flaw
    metas = _metas("text", 30, seed=16)
    images = [tw.render(m, rng, imperfection={"glyph": 1.0}) for m in metas]
    assert _score("text", images, metas, strict=True).max() == 0.0


# ----- readers ----------------------------------------------------------------------------------

def test_position_rule_on_hand_made_boxes():
    a = (0, 0, 10, 10)
    assert tw.relative_position(a, (20, 0, 30, 10)) == {"left of"}
    assert tw.relative_position((20, 0, 30, 10), a) == {"right of"}
    assert tw.relative_position(a, (0, 20, 10, 30)) == {"above"}
    assert tw.relative_position((0, 20, 10, 30), a) == {"below"}
    assert tw.relative_position(a, (20, 20, 30, 30)) == {"left of", "above"}  # (-18, -18) / 28.3 on both axes
    assert tw.relative_position(a, (1, 0, 11, 10)) == set()  # offset 1 is inside the margin 0.1 * (10 + 10)
    assert tw.relative_position(a, (4, 0, 14, 10)) == set()  # (4 - 2) / 4 = 0.5 is not > 0.5
    assert tw.relative_position(a, (5, 0, 15, 10)) == {"left of"}  # (5 - 2) / 5 = 0.6
    # The margin scales with the summed sizes: the same offset -9 holds for a small reference (margin 2)
    # and not for a wide one (margin 5).
    assert tw.relative_position(a, (9, 0, 19, 10)) == {"left of"}  # (9 - 2) / 9 = 0.78
    assert tw.relative_position(a, (-6, 0, 34, 10)) == set()  # (9 - 5) / 9 = 0.44
    assert tw.relation_strength(a, (20, 0, 30, 10), "left of") == pytest.approx(0.9)


def test_glyph_reader_reads_every_glyph_at_every_scale():
    for size in (16, 32, 64):
        strings = list(tw.CHARS) + ["".join(c) for c in zip(tw.CHARS, tw.CHARS[5:] + tw.CHARS[:5], tw.CHARS[11:] + tw.CHARS[:11])]
        images = [tw.render(tw.TEXT_TEMPLATE.format(s), np.random.default_rng(i), size=size) for i, s in enumerate(strings)]
        assert tw.read_text(np.stack(images)) == strings, size
    assert tw.read_text(np.full((1, 32, 32, 3), 235, np.uint8)) == [""]
    # The glyphs are pairwise different, so one misplaced cell cannot read as another glyph exactly.
    flat = tw.GLYPH_BITMAPS.reshape(len(tw.CHARS), -1)
    assert (flat[:, None] != flat[None]).sum(-1)[~np.eye(len(tw.CHARS), dtype=bool)].min() >= 1


def _brute_force_edit_distance(a, b):
    """Breadth-first search over strings: the fewest single-character edits that turn a into b."""
    alphabet, bound = set(a + b), max(len(a), len(b))
    frontier, seen, steps = {a}, {a}, 0
    while b not in frontier:
        nxt = set()
        for s in frontier:
            for i in range(len(s) + 1):
                nxt.add(s[:i] + s[i + 1:])
                for c in alphabet:
                    nxt.add(s[:i] + c + s[i + 1:])
                    nxt.add(s[:i] + c + s[i:])
        frontier = {s for s in nxt if len(s) <= bound} - seen
        seen |= frontier
        steps += 1
    return steps


def test_edit_distance_matches_brute_force():
    rng = np.random.default_rng(17)
    for _ in range(150):
        a, b = ("".join(rng.choice(list("AB1"), size=rng.integers(0, 5))) for _ in range(2))
        assert tw.edit_distance(a, b) == _brute_force_edit_distance(a, b), (a, b)


def test_text_accuracy():
    shown = ("47", "4", "A7C", "A7C", "8")
    targets = ("47", "47", "A7", "AC", "0")  # a substring counts as read, as in the OCR reward
    images = np.stack([tw.render(tw.TEXT_TEMPLATE.format(s), 0) for s in shown])
    prompts = [tw.TEXT_TEMPLATE.format(t) for t in targets]
    assert tw.text_accuracy(images, prompts) == pytest.approx([1.0, 0.5, 1.0, 0.5, 0.0])
    assert tw.text_accuracy(None, ['a sign that says "ab"'], read=["AB"]) == pytest.approx([1.0])


def test_grid_layout_centres_a_lone_object_and_text_and_uses_distinct_cells():
    rng = np.random.default_rng(0)
    for n in range(1, 6):
        for _ in range(20):
            boxes = tw._grid_layout(n, 32, rng)
            assert len(boxes) == n
            if n == 1:
                (x1, y1, x2, y2), = boxes
                assert x1 == y1 and x2 == y2 and abs((x1 + x2) - 32) <= 1  # centred, square
                continue
            assert len(set(boxes)) == n and len({x2 - x1 for x1, _, x2, _ in boxes}) == 1
            assert all(1 <= x1 and 1 <= y1 and x2 <= 31 and y2 <= 31 for x1, y1, x2, y2 in boxes)
            assert not any(tw._too_close(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    # a relation to satisfy: GenEval's rule holds with the render margin
    for rel in tw.RELATIONS:
        a, b = tw._grid_layout(2, 32, rng, pair=(0, 1, rel))
        assert tw.relation_strength(a, b, rel) >= tw.RENDER_MARGIN
    # text: the same string lands on the same pixels whatever the seed; with layout="free" it moves
    prompt = tw.TEXT_TEMPLATE.format("7A")
    assert np.array_equal(tw.render(prompt, 0), tw.render(prompt, 1))
    assert not np.array_equal(tw.render(prompt, 0, layout="free"), tw.render(prompt, 1, layout="free"))
    with pytest.raises(ValueError, match="layout"):
        tw.render(prompt, 0, layout="anywhere")


def test_detected_objects_match_the_scene():
    meta = tw.parse_prompt("a photo of a red circle and a blue square")
    objects, speckle = tw.detect_objects(tw.render(meta, 0))
    assert speckle.tolist() == [0]
    assert sorted((o["color"], o["shape"], o["confidence"]) for o in objects[0]) == [("blue", "square", 1.0), ("red", "circle", 1.0)]


# ----- pre-training data, determinism, speed, grid -------------------------------------------

def test_pretraining_set(tmp_path):
    requested = {"count": 0.3, "noise": 0.3}
    captions = tw.make_pretraining_set(tmp_path / "a", 300, seed=5, imperfection=requested)
    rows = [json.loads(line) for line in open(captions)]
    assert len(rows) == 300 and {r["task"] for r in rows} == set(tw.TASKS)
    images = np.stack([np.asarray(Image.open(tmp_path / "a" / r["file"])) for r in rows])
    assert images.shape == (300, 32, 32, 3) and images.dtype == np.uint8
    for r in rows:
        assert r["metadata"]["prompt"] == r["prompt"] and set(r["flaws"]) <= set(requested)
    # Flaw rates as requested, among the rows a flaw applies to.
    assert np.mean(["noise" in r["flaws"] for r in rows]) == pytest.approx(0.3, abs=0.08)
    scenes = [r for r in rows if r["task"] != "text"]
    assert np.mean(["count" in r["flaws"] for r in scenes]) == pytest.approx(0.3, abs=0.1)
    # Unflawed rows show exactly their caption; the caption always describes the intended scene.
    for task in tw.TASKS:
        idx = [i for i, r in enumerate(rows) if r["task"] == task and not r["flaws"]]
        metas = [rows[i]["metadata"] for i in idx]
        assert _score(task, list(images[idx]), metas, strict=True).min() == 1.0
    # Deterministic in the seed, down to the bytes of every image.
    again = tw.make_pretraining_set(tmp_path / "b", 300, seed=5, imperfection=requested)
    assert open(captions).read() == open(again).read()
    assert all((tmp_path / "a" / r["file"]).read_bytes() == (tmp_path / "b" / r["file"]).read_bytes() for r in rows[:50])


def test_pretraining_set_group_weights(tmp_path):
    # The base's third phase oversamples groups: only three-character strings and color_attr here, in the
    # task mix asked for; the other tasks keep their uniform groups.
    weights = {"text": {3: 1.0}, "composition": {"color_attr": 1.0}}
    mix = {"composition": 0.5, "text": 0.3, "quality": 0.2}
    captions = tw.make_pretraining_set(tmp_path / "w", 200, seed=3, imperfection=None, task_mix=mix, group_weights=weights)
    rows = [json.loads(line) for line in open(captions)]
    assert {len(r["metadata"]["text"]) for r in rows if r["task"] == "text"} == {3}
    assert {r["metadata"]["tag"] for r in rows if r["task"] == "composition"} == {"color_attr"}
    assert len({r["prompt"] for r in rows if r["task"] == "quality"}) > 20
    # The committed phase-3 groups are real groups of their tasks (a misspelt one would silently get no weight).
    for task, groups in tw.FOCUS_GROUPS.items():
        assert set(groups) == set(tw._splits()[task])
    # Without weights the stream is the uniform one, byte for byte (the committed base's phase-2 data).
    plain = tw.make_pretraining_set(tmp_path / "p", 50, seed=3, imperfection=None, task_mix=mix)
    again = tw.make_pretraining_set(tmp_path / "q", 50, seed=3, imperfection=None, task_mix=mix, group_weights={})
    assert open(plain).read() == open(again).read()



def test_order_aware_t5_attends_to_the_neighbours(tmp_path):
    """toyworld.order_aware_t5: in the rewritten T5 head 0 attends to the previous token and head 1 to the next
    one (at a large strength, exactly: the attention weights are one-hot there), the rest of the encoder is
    unchanged, and a swap of two words then changes the set of token vectors the MMDiT sees."""
    import torch
    from transformers import T5EncoderModel
    import model as M
    folder = M.build_tiny_pipeline(str(tmp_path / "p"), words=tw.VOCAB_WORDS, joint_dim=64)
    before = T5EncoderModel.from_pretrained(str(tmp_path / "p" / "text_encoder_3"))
    tw.order_aware_t5(folder, strength=1e4)
    after = T5EncoderModel.from_pretrained(str(tmp_path / "p" / "text_encoder_3")).eval()
    changed = [n for (n, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()) if not torch.equal(a, b)]
    assert changed == ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    ids = torch.arange(2, 12)[None]
    attention = after(ids, output_attentions=True).attentions  # per layer (1, heads, query, key); the bias is shared
    for layer in attention:
        assert torch.allclose(layer[0, 0, 1:].diagonal(offset=0, dim1=0, dim2=1), torch.ones(9), atol=1e-6)  # query i -> key i - 1
        assert torch.allclose(layer[0, 1, :-1].diagonal(offset=1, dim1=0, dim2=1), torch.ones(9), atol=1e-6)  # query i -> key i + 1
    def distances():  # set distance of the T5 tokens to a swapped binding, and to a changed word
        pipe = M.load_pipeline(folder, "cpu", torch.float32, t5_length=12)
        t5_part = lambda p: pipe.text.encode([p])[0][0, -12:]
        a, swapped, other = (t5_part(f"a photo of a {c1} circle and a {c2} square") for c1, c2 in (("red", "blue"), ("blue", "red"), ("green", "blue")))
        set_distance = lambda x, y: torch.cdist(x, y).min(1).values.sum().item()  # greedy matching shows the gap
        return set_distance(a, swapped), set_distance(a, other)
    tw.order_aware_t5(folder, strength=0.0)  # every bucket 0: the random T5's near-uniform attention, a bag of words
    swap, word = distances()
    assert swap < 0.2 * word
    tw.order_aware_t5(folder)  # the default strength: a swap moves the token set as much as a changed word
    swap, word = distances()
    assert swap > 0.5 * word

def test_render_is_deterministic_and_seed_dependent():
    meta = tw.parse_prompt("a photo of three triangles")
    a = tw.render(meta, 3, imperfection=0.5)
    assert np.array_equal(a, tw.render(meta, np.random.default_rng(3), imperfection=0.5))
    assert not np.array_equal(a, tw.render(meta, 4, imperfection=0.5))
    assert tw.render(meta, 3, size=48).shape == (48, 48, 3)


def test_scoring_64_images_is_fast():
    for task in tw.TASKS:
        metas = _metas(task, 64, seed=18)
        images = np.stack([tw.render(m, i) for i, m in enumerate(metas)])
        prompts = [m["prompt"] for m in metas]
        tw.score(task, images, prompts, metas)
        start = time.perf_counter()
        tw.score(task, images, prompts, metas)
        tw.score(task, images, prompts, metas, strict=True)
        assert (time.perf_counter() - start) / 2 < 0.25, task  # ~20-30 ms on the dev machine


def test_grid():
    images = np.stack([tw.render(m, 0) for m in _metas("composition", 10, seed=19)])
    sheet = tw.grid(images, ["a caption long enough to wrap onto a second line"] * 10, cols=4)
    assert sheet.size[0] == 4 * (32 * 4 + 4) and sheet.size[1] > 3 * 32 * 4
