"""
Why composition images fail: each image of an evaluate.py toy_composition folder that the strict rule rejects,
sorted by the first thing toyworld's detector finds wrong (docs/toy_results.md, "What limits the teachers").

  python benchmarks/toy_failures.py runs/toy/eval/base/toy_composition [--tag=color_attr]

The classes, in this order: correct; a wrong number of objects; a colour the caption does not name; a shape
it does not name; the caption's colours and shapes but bound to the wrong shapes (color_attr); other (sizes,
positions, counts inside a clause).
"""
import argparse
import json
import os
import sys
from collections import Counter

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toyworld as T  # noqa: E402


def classify(meta, objects, correct):
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("folder", help="an evaluate.py OUT_DIR/MODEL/BENCHMARK folder of toy_composition images")
    parser.add_argument("--tag", default="color_attr", help="a GenEval tag, or 'all'")
    args = parser.parse_args()
    path = os.path.join(args.folder, "scores.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no {path}: give an evaluate.py folder such as runs/toy/eval/base/toy_composition")
    rows = [r for r in map(json.loads, open(path)) if args.tag in ("all", r.get("tag"))]
    metas = [T.parse_prompt(r["prompt"]) for r in rows]
    images = np.stack([np.asarray(Image.open(os.path.join(args.folder, r["file"])).convert("RGB")) for r in rows])
    objects, _ = T.detect_objects(images)
    counts = Counter(classify(m, o, T.geneval_correct(m, o)) for m, o in zip(metas, objects))
    print(f"| {args.tag} images of {args.folder} | n | share |\n|---|---|---|")
    for name, n in counts.most_common():
        print(f"| {name} | {n} | {n / len(rows):.2f} |")
    sizes = Counter(len(o) for o in objects)
    print("\nobjects detected per image: " + ", ".join(f"{k}: {sizes[k] / len(rows):.2f}" for k in sorted(sizes)))


if __name__ == "__main__":
    main()
