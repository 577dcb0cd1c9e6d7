"""
How much word order reaches the MMDiT: the toy pipeline's context tokens for a prompt, against the same prompt
with two words swapped (a colour binding, a string's characters, a relation's objects) and with one word changed.

  python benchmarks/toy_text_order.py                                  # the committed base's encoders
  python benchmarks/toy_text_order.py --model=runs/toy/s6/base_t5      # after toyworld.order_aware_t5

SD3's MMDiT adds no positions to the text tokens, so it sees their set: the distance printed is the sum over
tokens of the distance between the two prompts' context vectors, matched as sets (Hungarian, scipy), separately
for the CLIP part (the first clip_length tokens) and the T5 part (the last t5_length). A swap that moves the set
much less than a changed word is order the model can hardly use (docs/toy_results.md, "What limits the teachers").
"""
import argparse
import os
import sys

import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default="toy/base")
    parser.add_argument("--t5_length", type=int, default=12)
    args = parser.parse_args()
    pipe = M.load_pipeline(args.model, "cpu", torch.float32, t5_length=args.t5_length)
    encode = lambda p: pipe.text.encode([p])[0][0]
    clip_tokens = encode("a").shape[0] - args.t5_length
    parts = {"T5": slice(clip_tokens, None), "CLIP": slice(0, clip_tokens)}
    print(f"model {args.model}: per token, norm of the T5 part {encode(CASES[0][0])[parts['T5']].norm(dim=-1).mean():.2f}, "
          f"of the CLIP part {encode(CASES[0][0])[parts['CLIP']].norm(dim=-1).mean():.2f}\n")
    print("| prompt | part | order swapped | one word changed | ratio |\n|---|---|---|---|---|")
    for prompt, swapped, changed in CASES:
        a, s, c = encode(prompt), encode(swapped), encode(changed)
        for name, part in parts.items():
            d_swap, d_word = set_distance(a[part], s[part]), set_distance(a[part], c[part])
            print(f"| {prompt} vs {swapped.split(' ', 4)[-1]!r} / {changed.split(' ', 4)[-1]!r} | {name} | {d_swap:.1f} | {d_word:.1f} | "
                  f"{d_swap / d_word:.2f} |")


if __name__ == "__main__":
    main()
