"""
Paired differences between models that evaluate.py sampled from the same noise (docs/toy_results.md).

  python benchmarks/eval_paired.py --base=runs/toy/bench/eval/base --benchmark=toy_text --metric=toy_text_accuracy \
      runs/toy/cal2/eval_t_lr1/t_lr1 runs/toy/bench/eval/teacher_text

evaluate.py seeds every image by (prompt, image index) only, so image k of prompt p is the same starting
noise for every model: the per-image difference to the base removes the prompt-to-prompt and noise-to-noise
spread that the unpaired 95% CIs of results.md carry, and resolves a gain several times smaller. Each
argument is a model's folder in an evaluate.py out_dir (OUT_DIR/MODEL); printed per model: the mean of the
metric, the base's, and the mean per-image difference +- its 95% CI half-width (1.96 s / sqrt(n)). On a
GenEval-style benchmark (rows with a tag) also GenEval's overall number, the unweighted mean of the per-tag
means, and its paired difference (var = sum_t var_t / T^2), and with --per_tag every tag's paired difference.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import mean_ci, tag_mean_ci  # noqa: E402  (the repository root is not on the path of a script in benchmarks/)


def load(folder, benchmark, metric):
    """{(prompt, image, seed): (value, tag or None)} of one model's scores.jsonl."""
    path = os.path.join(folder, benchmark, "scores.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no {path}: run evaluate.py with --select={benchmark} for that model first")
    scores = {}
    for line in open(path):
        row = json.loads(line)
        if metric not in row:
            raise SystemExit(f"error: {path} has no column {metric!r}; it has: {', '.join(k for k in row if k not in ('prompt', 'file'))}")
        scores[(row["prompt_index"], row["image_index"], row["seed"])] = (row[metric], row.get("tag"))
    return scores


def paired(base, other):
    """On the shared images: {"mean", "base", "diff", "ci", "n"} per image, and where every image has a tag the
    same of GenEval's overall ("tag_mean", "tag_base", "tag_diff", "tag_ci") and the per-tag mean_ci of the
    differences ("per_tag")."""
    keys = sorted(set(base) & set(other))
    if len(keys) < 2:
        raise SystemExit("error: fewer than two images in common: were both models evaluated with the same settings?")
    a, b = [other[k][0] for k in keys], [base[k][0] for k in keys]
    diff, ci, _ = mean_ci([x - y for x, y in zip(a, b)])
    out = {"mean": sum(a) / len(a), "base": sum(b) / len(b), "diff": diff, "ci": ci, "n": len(keys)}
    tags = [base[k][1] for k in keys]
    if all(t is not None for t in tags):
        out["tag_mean"], out["tag_base"] = tag_mean_ci(a, tags)[0], tag_mean_ci(b, tags)[0]
        out["tag_diff"], out["tag_ci"], out["per_tag"] = tag_mean_ci([x - y for x, y in zip(a, b)], tags)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders inside evaluate.py out_dirs")
    parser.add_argument("--base", required=True, help="the reference model's folder")
    parser.add_argument("--benchmark", required=True)
    parser.add_argument("--metric", required=True)
    parser.add_argument("--per_tag", action="store_true", help="also each tag's paired difference (GenEval-style rows)")
    args = parser.parse_args()
    base = load(args.base, args.benchmark, args.metric)
    results = [(os.path.basename(os.path.normpath(f)), paired(base, load(f, args.benchmark, args.metric))) for f in args.models]
    tagged = all("tag_diff" in r for _, r in results)
    print(f"| model | {args.metric} | base | difference (paired, 95% CI) | n |"
          + (" GenEval overall (mean of tags) | base | difference (paired, 95% CI) |" if tagged else "")
          + "\n|---|---|---|---|---|" + ("---|---|---|" if tagged else ""))
    for name, r in results:
        print(f"| {name} | {r['mean']:.3f} | {r['base']:.3f} | {r['diff']:+.3f} ± {r['ci']:.3f} | {r['n']} |"
              + (f" {r['tag_mean']:.3f} | {r['tag_base']:.3f} | {r['tag_diff']:+.3f} ± {r['tag_ci']:.3f} |" if tagged else ""))
    if tagged and args.per_tag:
        tags = list(results[0][1]["per_tag"])
        counts = {t: sum(v[1] == t for v in base.values()) for t in tags}
        print("\nper tag, paired difference to the base (95% CI)\n\n| model | " + " | ".join(f"{t} (n={counts[t]})" for t in tags)
              + " |\n|---|" + "---|" * len(tags))
        for name, r in results:
            print(f"| {name} | " + " | ".join("{:+.3f} ± {:.3f}".format(*r["per_tag"][t][:2]) for t in tags) + " |")


if __name__ == "__main__":
    main()
