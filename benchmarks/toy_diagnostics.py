"""
Settled questions about the toy base model, kept runnable: what it learned stage by stage of the noise, how much
word order its text encoders pass to the MMDiT, and why its composition images fail (docs/toy_results.md).

  python benchmarks/toy_diagnostics.py probe                                      # toy/base
  python benchmarks/toy_diagnostics.py probe runs/toy/pretrain/step_012000/pipeline free   # phase 1, on its own scenes
  python benchmarks/toy_diagnostics.py text_order                                 # the committed base's encoders
  python benchmarks/toy_diagnostics.py text_order --model=runs/toy/s6/base_t5     # after toyworld.order_aware_t5
  python benchmarks/toy_diagnostics.py failures runs/toy/eval/base/toy_composition [--tag=color_attr]

probe [PIPELINE] [LAYOUT] (default toy/base, grid): where a base model fails on the way from noise to a scene, the
measurements behind the base-model section of docs/toy_results.md. On clean held-out renders: the one-step x_0
estimate from each noise level with the right, a wrong and the empty prompt (how much the model takes from the
caption rather than from the image), SDEdit from that level (from where it still finishes a scene it did not start)
and sampling from pure noise.

text_order [--model=toy/base] [--t5_length=12]: how much word order reaches the MMDiT, which sees the text tokens as a
set: the set distance between a prompt's context tokens and those of the same prompt with two words swapped, against
one word changed, for the CLIP and the T5 parts. A swap that moves the set much less than a changed word is order the
model can hardly use (docs/toy_results.md, "What limits the teachers").

failures FOLDER [--tag=TAG|all]: why composition images fail: each image of an evaluate.py toy_composition folder that
the strict rule rejects, sorted by the first thing toyworld's detector finds wrong (object count, colour, shape,
binding; docs/toy_results.md, "What limits the teachers").
"""
import argparse
import json
import os
import sys
from collections import Counter

import numpy as np
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import toyworld as T  # noqa: E402


def probe(path="toy/base", layout="grid"):
    """What a toy base model has learned, stage by stage of the noise: the measurements behind the base-model
    section of docs/toy_results.md.
    On clean held-out renders (64 per task, in the given layout, default "grid"; the toy's own reader and GenEval rule):
      1. denoising: x_s = (1 - s) x_0 + s eps, one velocity call, x_0 estimate = x_s - s v, read back;
         with the right prompt, another prompt of the task (a wrong one) and the empty prompt: the gap
         between them is how much the model takes from the caption rather than from the image.
      2. SDEdit: x_s as above, then the Euler ODE from s to 0 (10 steps, CFG 4.5): from which noise level the
         model still finishes a scene it did not start.
      3. sampling from pure noise (the evaluation sampler: 10 steps, shift 3, CFG 4.5).
    Scores are text accuracy (character level, 1 = exact) and GenEval's rule (composition), in [0, 1].
    """
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    pipe = M.load_pipeline(path, "cpu", torch.float32, t5_length=12)
    transformer = pipe.transformer.eval()
    empty = pipe.text.encode([""])
    rng = np.random.default_rng(0)
    print(f"{path}: scores in [0, 1] on 64 clean held-out renders per task, {layout} layout")
    for task in ("text", "composition"):
        metas = [T.sample_prompt(task, rng, split="test")[1] for _ in range(64)]
        prompts = [m["prompt"] for m in metas]
        x0 = pipe.codec.encode(torch.from_numpy(np.stack([T.render(m, rng, layout=layout) for m in metas])).permute(0, 3, 1, 2).float() / 255)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        n = len(prompts)
        neg = (empty[0].expand(n, -1, -1), empty[1].expand(n, -1))

        def read(x):
            images = M.to_uint8(pipe.codec.decode(x)).permute(0, 2, 3, 1).numpy()
            if task == "text":
                return T.text_accuracy(images, prompts).mean()
            return T.score(task, images, prompts, metas, strict=True).mean()

        conditions = {"right": pipe.text.encode(prompts), "wrong": pipe.text.encode(prompts[1:] + prompts[:1]),
                      "empty": neg}
        rows = []
        with torch.no_grad():
            for s in (0.6, 0.7, 0.8, 0.9):
                xs = (1 - s) * x0 + s * eps
                cells = [f"{name} {read(xs - s * M.predict_velocity(transformer, xs, s, *c)):.2f}" for name, c in conditions.items()]
                sigmas = torch.linspace(s, 0, 11)
                x = xs
                for j in range(10):
                    v = M.predict_velocity(transformer, x, sigmas[j], *conditions["right"], *neg, 4.5)
                    x = M.ode_step(x, v, sigmas[j], sigmas[j + 1])
                rows.append(f"  s={s}: noisy input {read(xs):.2f} | one-step x0 estimate: " + ", ".join(cells)
                            + f" | SDEdit from s: {read(x):.2f}")
            roll = M.rollout(transformer, *conditions["right"], *neg, pipe.latent_shape(32), [M.sample_seed(7, i) for i in range(n)],
                             10, pipe.shift, 4.5, 0.0, sde=False, keep=False)
        print(f"{task}: clean renders {read(x0):.2f}, sampled from pure noise {read(roll.latents[:, -1]):.2f}")
        print("\n".join(rows), flush=True)


CASES = [  # (prompt, the order swapped, one word changed)
    ("a photo of a red circle and a blue square", "a photo of a blue circle and a red square", "a photo of a green circle and a blue square"),
    ("a photo of a yellow triangle and a green circle", "a photo of a green triangle and a yellow circle",
     "a photo of a red triangle and a green circle"),
    ('a sign that says "k7"', 'a sign that says "7k"', 'a sign that says "k8"'),
    ('a sign that says "ab3"', 'a sign that says "3ba"', 'a sign that says "ab4"'),
    ("a photo of a circle left of a square", "a photo of a square left of a circle", "a photo of a circle left of a triangle"),
]


def set_distance(a, b):
    """Sum of the distances of the best one-to-one matching of a's rows to b's (float64)."""
    cost = torch.cdist(a.double(), b.double()).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].sum())


def text_order(model="toy/base", t5_length=12):
    """How much word order reaches the MMDiT: the toy pipeline's context tokens for a prompt, against the same prompt
    with two words swapped (a colour binding, a string's characters, a relation's objects) and with one word changed.
    SD3's MMDiT adds no positions to the text tokens, so it sees their set: the distance printed is the sum over
    tokens of the distance between the two prompts' context vectors, matched as sets (Hungarian, scipy), separately
    for the CLIP part (the first clip_length tokens) and the T5 part (the last t5_length).
    """
    pipe = M.load_pipeline(model, "cpu", torch.float32, t5_length=t5_length)
    encode = lambda p: pipe.text.encode([p])[0][0]
    clip_tokens = encode("a").shape[0] - t5_length
    parts = {"T5": slice(clip_tokens, None), "CLIP": slice(0, clip_tokens)}
    print(f"model {model}: per token, norm of the T5 part {encode(CASES[0][0])[parts['T5']].norm(dim=-1).mean():.2f}, "
          f"of the CLIP part {encode(CASES[0][0])[parts['CLIP']].norm(dim=-1).mean():.2f}\n")
    print("| prompt | part | order swapped | one word changed | ratio |\n|---|---|---|---|---|")
    for prompt, swapped, changed in CASES:
        a, s, c = encode(prompt), encode(swapped), encode(changed)
        for name, part in parts.items():
            d_swap, d_word = set_distance(a[part], s[part]), set_distance(a[part], c[part])
            print(f"| {prompt} vs {swapped.split(' ', 4)[-1]!r} / {changed.split(' ', 4)[-1]!r} | {name} | {d_swap:.1f} | {d_word:.1f} | "
                  f"{d_swap / d_word:.2f} |")


def classify(meta, objects, correct):
    """The first thing wrong with an image, in this order: correct; a wrong number of objects; a colour the caption
    does not name; a shape it does not name; the caption's colours and shapes but bound to the wrong shapes
    (color_attr); other (sizes, positions, counts inside a clause)."""
    if correct:
        return "correct"
    want = [(c["class"], c.get("color")) for c in meta["include"] for _ in range(c["count"])]
    got = [(T.SHAPES[int(np.argmax(o["shape_probs"]))], o["color"]) for o in objects]
    if len(got) != len(want):
        return "wrong number of objects"
    if {c for _, c in want if c} and not {c for _, c in got} <= {c for _, c in want}:
        return "a colour the caption does not name"
    if not {s for s, _ in got} <= {s for s, _ in want}:
        return "a shape the caption does not name"
    if all(c for _, c in want) and sorted(got) != sorted(want):
        return "colours bound to the wrong shapes"
    return "other"


def failures(folder, tag="color_attr"):
    """Why composition images fail: each image of an evaluate.py toy_composition folder that the strict rule rejects,
    sorted by the first thing toyworld's detector finds wrong (classify); a markdown table of the classes' counts and
    shares, then the share of images per number of objects detected.
    """
    path = os.path.join(folder, "scores.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no {path}: give an evaluate.py folder such as runs/toy/eval/base/toy_composition")
    rows = [r for r in map(json.loads, open(path)) if tag in ("all", r.get("tag"))]
    metas = [T.parse_prompt(r["prompt"]) for r in rows]
    images = np.stack([np.asarray(Image.open(os.path.join(folder, r["file"])).convert("RGB")) for r in rows])
    objects, _ = T.detect_objects(images)
    counts = Counter(classify(m, o, T.geneval_correct(m, o)) for m, o in zip(metas, objects))
    print(f"| {tag} images of {folder} | n | share |\n|---|---|---|")
    for name, n in counts.most_common():
        print(f"| {name} | {n} | {n / len(rows):.2f} |")
    sizes = Counter(len(o) for o in objects)
    print("\nobjects detected per image: " + ", ".join(f"{k}: {sizes[k] / len(rows):.2f}" for k in sorted(sizes)))


def main():
    summary = lambda f: f.__doc__.strip().splitlines()[0]
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{probe,text_order,failures}")
    p = commands.add_parser("probe", help=summary(probe), description=summary(probe))
    p.add_argument("path", nargs="?", default="toy/base", metavar="PIPELINE", help="a pipeline folder (default toy/base)")
    p.add_argument("layout", nargs="?", default="grid", metavar="LAYOUT", help="the renders' layout (default grid)")
    p = commands.add_parser("text_order", help=summary(text_order), description=summary(text_order))
    p.add_argument("--model", default="toy/base")
    p.add_argument("--t5_length", type=int, default=12)
    p = commands.add_parser("failures", help=summary(failures), description=summary(failures))
    p.add_argument("folder", help="an evaluate.py OUT_DIR/MODEL/BENCHMARK folder of toy_composition images")
    p.add_argument("--tag", default="color_attr", help="a GenEval tag, or 'all'")
    args = parser.parse_args()
    if args.command == "probe":
        probe(args.path, args.layout)
    elif args.command == "text_order":
        text_order(args.model, args.t5_length)
    else:
        failures(args.folder, args.tag)


if __name__ == "__main__":
    main()
