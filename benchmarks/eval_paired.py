"""
Paired differences between models that evaluate.py sampled from the same noise (docs/toy_results.md).

  python benchmarks/eval_paired.py --base=runs/toy/bench/eval/base --benchmark=toy_text --metric=toy_text_accuracy \
      runs/toy/cal2/eval_t_lr1/t_lr1 runs/toy/bench/eval/teacher_text

evaluate.py seeds every image by (prompt, image index) only, so image k of prompt p is the same starting
noise for every model: the per-image difference to the base removes the prompt-to-prompt and noise-to-noise
spread that the unpaired 95% CIs of results.md carry, and resolves a gain several times smaller. Each
argument is a model's folder in an evaluate.py out_dir (OUT_DIR/MODEL); printed per model: the mean of the
metric, the base's, and the mean per-image difference +- its 95% CI half-width (1.96 s / sqrt(n)).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import mean_ci  # noqa: E402  (the repository root is not on the path of a script in benchmarks/)


def load(folder, benchmark, metric):
    path = os.path.join(folder, benchmark, "scores.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no {path}: run evaluate.py with --select={benchmark} for that model first")
    scores = {}
    for line in open(path):
        row = json.loads(line)
        scores[(row["prompt_index"], row["image_index"], row["seed"])] = row[metric]
    return scores


def paired(base, other):
    """Mean of other, mean of base and the mean difference with its 95% CI half-width, on the shared images."""
    keys = sorted(set(base) & set(other))
    if len(keys) < 2:
        raise SystemExit("error: fewer than two images in common: were both models evaluated with the same settings?")
    mean, ci, _ = mean_ci([other[k] - base[k] for k in keys])
    return sum(other[k] for k in keys) / len(keys), sum(base[k] for k in keys) / len(keys), mean, ci, len(keys)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders inside evaluate.py out_dirs")
    parser.add_argument("--base", required=True, help="the reference model's folder")
    parser.add_argument("--benchmark", required=True)
    parser.add_argument("--metric", required=True)
    args = parser.parse_args()
    base = load(args.base, args.benchmark, args.metric)
    print(f"| model | {args.metric} | base | difference (paired, 95% CI) | n |\n|---|---|---|---|---|")
    for folder in args.models:
        m, b, d, ci, n = paired(base, load(folder, args.benchmark, args.metric))
        print(f"| {os.path.basename(os.path.normpath(folder))} | {m:.3f} | {b:.3f} | {d:+.3f} ± {ci:.3f} | {n} |")


if __name__ == "__main__":
    main()
