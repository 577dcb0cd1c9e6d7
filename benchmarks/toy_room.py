"""
The room RL has: how often a toy model gets a held-out prompt right in one try, and in k tries.

  python benchmarks/toy_room.py                                  # the base model, every task, both samplers
  python benchmarks/toy_room.py --adapter=runs/toy/teacher_text --name=teacher_text --tasks=text --report=room.md
  python benchmarks/toy_room.py --model=runs/toy/pretrain_focus/latest/pipeline --name=focus --samplers=ode --n=8 --k=8

For the base 'toy/base' (or it with --adapter: an adapter or run folder), n images per held-out prompt
(evaluate.py's toy files: composition_test.jsonl, text_test.txt, quality_test.txt) from each sampler: `ode`,
evaluate.py's (10 steps, CFG 4.5, 32 px, t5_length 12) and `sde`, the toy teachers' training sampler
(train_teacher.py's toy preset: noise level 0.3 on the first 5 of the 10 steps, the rest by the ODE; here each
image has its own starting noise). Image j of prompt p starts from seed model.sample_seed(0, p, j) (evaluate.py's
seeds), whatever the model, sampler or batch: two models see the same noise (paired). Per task, and for
composition per GenEval tag with overall = the unweighted mean of the tags (GenEval's, as evaluate.py):
- pass@1 and pass@k: the mean over prompts of the unbiased estimator from n >= k samples (pass_at_k below) of
  the chance that at least one of k images is correct, by evaluate.py's headline metric: toy_composition_strict,
  toy_text_accuracy (not 0/1: 1 - edit distance / length; "correct" = 1.0, the target read exactly or inside
  the read text), toy_quality_strict. pass@k - pass@1 is what best-of-k, or RL sharpening, could reach;
- the mean over prompts of the within-prompt std (n - 1 denominator) of the dense training reward (toy_composition,
  toy_text, toy_quality) and of the 0/1 correct: the spread that GRPO's group advantages have to work with.
Rows are printed as markdown (and appended to --report). Wall time, an estimate: ~10 images/s measured with
OMP_NUM_THREADS=1 at batch 64 (sampling and rewards) on the idle 2-core dev machine, so the default run, 2 samplers
x 422 prompts x 32 = 27,008 images, takes ~45 min on one core; both cores (OMP_NUM_THREADS=2) at best halve it.
"""
import argparse
import math
import os
import sys
import time
from fractions import Fraction

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import rewards  # noqa: E402
import toyworld  # noqa: E402

TASKS = {  # held-out prompts, evaluate.py's headline metric, the dense training reward
    "composition": ("toy/prompts/composition_test.jsonl", "toy_composition_strict", "toy_composition"),
    "text": ("toy/prompts/text_test.txt", "toy_text_accuracy", "toy_text"),
    "quality": ("toy/prompts/quality_test.txt", "toy_quality_strict", "toy_quality"),
}
SAMPLERS = {"ode": dict(sde=False), "sde": dict(sde=True, noise_level=0.3, sde_steps=5)}


def pass_at_k(n, c, k):
    """P(at least one of k images drawn without replacement from n, c of them correct, is correct) =
    1 - C(n - c, k) / C(n, k), the unbiased pass@k of Chen et al. 2021; exact in integers, then one rounding."""
    if not (0 <= c <= n and 1 <= k):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least k samples per prompt, got n={n}")
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def sample_scores(pipe, prompts, metadata, n, sampler, batch, reward_fns):
    """(P, n, len(reward_fns)) float64: each reward of image j of prompt p."""
    cond = [pipe.text.encode([p]) for p in prompts]  # each prompt alone, as evaluate.py encodes them
    empty = pipe.text.encode([""])
    index = [(p, j) for p in range(len(prompts)) for j in range(n)]
    out = []
    for s in range(0, len(index), batch):
        part = index[s:s + batch]
        embeds, pooled = (torch.cat([cond[p][i] for p, _ in part]) for i in (0, 1))
        roll = M.rollout(pipe.transformer, embeds, pooled, empty[0].expand(len(part), -1, -1), empty[1].expand(len(part), -1),
                         pipe.latent_shape(32), [M.sample_seed(0, p, j) for p, j in part], 10, pipe.shift, 4.5,
                         keep=False, **SAMPLERS[sampler])
        images = M.to_uint8(pipe.codec.decode(roll.latents[:, -1]))
        texts, metas = [prompts[p] for p, _ in part], [metadata[p] for p, _ in part]
        out.append(torch.stack([f(images, texts, metas)[0].double() for f in reward_fns], 1))
    return torch.cat(out).view(len(prompts), n, len(reward_fns)).numpy()


def room(scores, ks):
    """scores (P, n, 2): headline metric, dense reward -> [pass@1, pass@k..., std dense, std correct]."""
    correct, n = scores[..., 0] >= 1.0, scores.shape[1]
    passes = [np.mean([pass_at_k(n, int(c), k) for c in correct.sum(1)]) for k in [1] + ks]
    return passes + [scores[..., 1].std(1, ddof=1).mean(), correct.astype(np.float64).std(1, ddof=1).mean()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default="", help="the base pipeline folder (default: the committed toy/base)")
    parser.add_argument("--adapter", default="", help="an adapter or run folder (default: the base model)")
    parser.add_argument("--name", default="", help="the row label (default: the adapter folder's name, or base)")
    parser.add_argument("--n", type=int, default=32, help="images per prompt")
    parser.add_argument("--k", default="8,32")
    parser.add_argument("--tasks", default="composition,text,quality")
    parser.add_argument("--samplers", default="ode,sde")
    parser.add_argument("--max_prompts", type=int, default=0, help="0: all; else the first N of each file")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--report", default="", help="append the rows to this markdown file")
    args = parser.parse_args()
    ks, tasks, samplers = [int(k) for k in args.k.split(",")], args.tasks.split(","), args.samplers.split(",")
    if max(ks) > args.n or min(ks) < 1 or not set(tasks) <= set(TASKS) or not set(samplers) <= set(SAMPLERS):
        parser.error(f"need 1 <= k <= n, tasks among {list(TASKS)}, samplers among {list(SAMPLERS)}")
    ks = sorted(set(ks) - {1})  # pass@1 is always reported
    args.report = os.path.abspath(args.report) if args.report else ""
    args.adapter = os.path.abspath(args.adapter) if os.path.exists(args.adapter) else args.adapter  # or a hub id
    args.model = os.path.abspath(args.model) if args.model else os.path.join(ROOT, "toy", "base")
    os.chdir(ROOT)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    pipe = M.load_pipeline(args.model, "cpu", torch.float32, t5_length=12)
    pipe.transformer.eval()
    if args.adapter:
        M.load_adapter(pipe.transformer, "room", args.adapter)
    name = args.name or (os.path.basename(os.path.normpath(args.adapter)) if args.adapter else "base")
    header = ("| model | sampler | task | tag | prompts | n per prompt | pass@1 | " + " | ".join(f"pass@{k}" for k in ks)
              + " | within-prompt std (dense) | within-prompt std (strict) |\n|" + "---|" * (9 + len(ks)))
    print(header, flush=True)
    lines = []
    with torch.no_grad(), pipe.transformer.adapter("room" if args.adapter else None):
        for sampler in samplers:
            for task in tasks:
                path, metric, dense = TASKS[task]
                prompts, metadata = rewards.load_prompts(path)
                if args.max_prompts:
                    prompts, metadata = prompts[:args.max_prompts], metadata[:args.max_prompts]
                t0, fns = time.time(), [rewards.get_reward(metric), rewards.get_reward(dense)]
                scores = sample_scores(pipe, prompts, metadata, args.n, sampler, args.batch, fns)
                images = scores.shape[0] * scores.shape[1]
                print(f"# {sampler} {task}: {images} images, {images / (time.time() - t0):.1f} images/s", file=sys.stderr)
                # composition by GenEval tag, text by string length, quality as one group
                tags = [f"{len(toyworld.quoted_text(p))} chars" if task == "text" else m.get("tag", "all")
                        for p, m in zip(prompts, metadata)]
                order = sorted(set(tags), key=lambda t: ((rewards.GENEVAL_TAGS + [t]).index(t), t))  # GenEval's order
                rows = {t: (tags.count(t), room(scores[[x == t for x in tags]], ks)) for t in order}
                if task == "text" and len(rows) > 1:
                    rows["all"] = (len(prompts), room(scores, ks))
                if task == "composition":  # GenEval's overall: the unweighted mean of the tags
                    rows["overall"] = (len(prompts), list(np.mean([r for _, r in rows.values()], 0)))
                for tag, (count, values) in rows.items():
                    lines.append(f"| {name} | {sampler} | {task} | {tag} | {count} | {args.n} | "
                                 + " | ".join(f"{v:.3f}" for v in values) + " |")
                    print(lines[-1], flush=True)
    if args.report:
        new = not os.path.isfile(args.report) or os.path.getsize(args.report) == 0
        with open(args.report, "a") as f:
            f.write((header + "\n" if new else "") + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
