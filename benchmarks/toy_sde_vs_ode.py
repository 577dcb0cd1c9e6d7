"""
Does a toy teacher improve the samples it was trained on (the SDE's) and the ones it is judged on (the ODE's)?
(docs/toy_results.md, "Recalibrating the teachers")

  python benchmarks/toy_sde_vs_ode.py runs/toy/cal2/t_chars --prompts=runs/toy/cal2/text_chars.txt --reward=toy_text

For the base and each adapter, K images per prompt from the same seeds, twice: by the teachers' training
sampler (train_teacher.py's toy preset: SDE at noise level 0.3 on the first 5 of 10 steps, each sample's
own starting noise) and by evaluate.py's (ODE, 10 steps); CFG 4.5 for both. Printed: each model's mean
reward under both samplers and its paired difference to the base (same seeds) +- the 95% CI half-width.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import rewards  # noqa: E402
from eval_paired import paired  # noqa: E402  (this folder)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("adapters", nargs="+")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--images_per_prompt", type=int, default=16)
    parser.add_argument("--noise_level", type=float, default=0.3)
    parser.add_argument("--window", type=int, default=5)
    args = parser.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    pipe = M.load_pipeline("toy/base", "cpu", torch.float32, t5_length=12)
    transformer = pipe.transformer.eval()
    prompts, metadata = rewards.load_prompts(args.prompts)
    reward_fn = rewards.get_reward(args.reward)
    k = args.images_per_prompt
    batch = [p for p in prompts for _ in range(k)]
    meta = [m for m in metadata for _ in range(k)]
    seeds = [M.sample_seed(7, i) for i in range(len(batch))]
    cond = pipe.text.encode(batch)
    empty = pipe.text.encode([""])
    neg = (empty[0].expand(len(batch), -1, -1), empty[1].expand(len(batch), -1))
    names = ["base"] + [os.path.normpath(a) for a in args.adapters]
    for i, path in enumerate(args.adapters):
        M.load_adapter(transformer, f"a{i}", path)
    results = {}
    with torch.no_grad():
        for i, name in enumerate(names):
            with transformer.adapter(None if i == 0 else f"a{i - 1}"):
                for sampler, sde in (("SDE", True), ("ODE", False)):
                    scores = []
                    for s in range(0, len(batch), 64):
                        part = slice(s, s + 64)
                        c = (cond[0][part], cond[1][part])
                        n = (neg[0][part], neg[1][part])
                        roll = M.rollout(transformer, *c, *n, pipe.latent_shape(32), seeds[part], 10, pipe.shift, 4.5,
                                         args.noise_level, sde=sde, keep=False, sde_steps=args.window)
                        images = M.to_uint8(pipe.codec.decode(roll.latents[:, -1]))
                        scores.append(reward_fn(images, batch[part], meta[part])[0].double())
                    results[name, sampler] = torch.cat(scores)
    print(f"| model | {args.reward}, SDE (training sampler) | − base | ODE (evaluation) | − base |\n|---|---|---|---|---|")
    for name in names:
        row = [name]
        for sampler in ("SDE", "ODE"):
            mean, _, diff, ci, _ = paired(dict(enumerate(results["base", sampler].tolist())),
                                          dict(enumerate(results[name, sampler].tolist())))
            row += [f"{mean:.3f}", f"{diff:+.3f} ± {ci:.3f}" if name != "base" else ""]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
