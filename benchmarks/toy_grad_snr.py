"""
How much signal one GRPO update of a toy teacher carries (docs/toy_results.md, "calibration").

  python benchmarks/toy_grad_snr.py                 # about 6 minutes on 2 CPU cores
  python benchmarks/toy_grad_snr.py --reward=toy_text --noise=0.3,0.5 --window=5,9 --replicas=4

For each setting (reward, noise level, SDE window, starting noise), R independent batches of the same 8
training prompts x 8 samples from toy/base, each turned into the teachers' first gradient (the GRPO
surrogate at ratio 1, i.e. -A log p summed over the trained steps, on a fresh LoRA as train_teacher.py's
toy preset makes it). Printed: the mean cosine between the R gradients (0 for pure noise, 1 for a
noise-free update) and the signal-to-noise ratio |mean g|^2 / (mean |g - mean g|^2 / R) corrected for the
noise in |mean g|^2: how many such batches the gradient's direction needs before it stands out.
"""
import argparse
import itertools
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import rewards  # noqa: E402

PROMPTS = {"toy_text": "toy/prompts/text_train.txt", "toy_composition": "toy/prompts/composition_train.jsonl",
           "toy_quality": "toy/prompts/quality_train.txt", "brightness": "toy/prompts/quality_train.txt"}


def gradient(pipe, transformer, params, reward_fn, prompts, metadata, cond, neg, noise_level, window, shared, seed, group_size):
    shape, shift, guidance, steps = pipe.latent_shape(32), pipe.shift, 4.5, 10
    n = len(prompts)
    embeds, pooled = cond
    seeds = [M.sample_seed(seed, i) for i in range(n)]
    init = [M.sample_seed(seed, 10 ** 7 + i // group_size) for i in range(n)] if shared else None
    transformer.eval()
    with torch.no_grad():
        roll = M.rollout(transformer, embeds, pooled, *neg, shape, seeds, steps, shift, guidance, noise_level,
                         sde_steps=window, init_seeds=init)
    scores = reward_fn(M.to_uint8(pipe.codec.decode(roll.latents[:, -1])), prompts, metadata)[0]
    adv, _ = M.group_advantages(scores, [i // group_size for i in range(n)])
    sigmas = M.sigma_schedule(steps, shift)
    transformer.train()
    for p in params:
        p.grad = None
    trained = range(min(window or steps - 1, steps - 1))
    for j in trained:
        mean, std, _ = M.step_distribution(transformer, roll.latents[:, j], sigmas[j], sigmas[j + 1], sigmas[1],
                                           noise_level, (embeds, pooled), neg, guidance)
        log_prob = M.gaussian_log_prob(roll.latents[:, j + 1], mean, std)
        (-(adv * log_prob).mean() / len(trained)).backward()
    return torch.cat([p.grad.flatten() for p in params]).double(), scores.double()


def agreement(G):
    """R independent gradient estimates (R, D) -> (mean pairwise cosine, SNR of one estimate): the noise
    variance of one estimate v = sum_d var_d (unbiased, over the R), the signal |E g|^2 = |mean g|^2 - v / R
    (unbiased), SNR = signal / v."""
    R = len(G)
    unit = G / G.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T)[~torch.eye(R, dtype=torch.bool)].mean().item()
    mean = G.mean(0)
    noise = ((G - mean) ** 2).sum().item() / (R - 1)
    return cos, (mean.pow(2).sum().item() - noise / R) / noise


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reward", default="toy_text,toy_composition,toy_quality,brightness")
    parser.add_argument("--noise", default="0.3")
    parser.add_argument("--window", default="5,9")
    parser.add_argument("--shared", default="1", help="1: one starting noise per group, 0: each sample's own; 0,1: both")
    parser.add_argument("--prompts", default="", help="another prompt file for every reward (default: its training prompts)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group_size", type=int, default=8)
    args = parser.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    pipe = M.load_pipeline("toy/base", "cpu", torch.float32, t5_length=12)
    transformer = pipe.transformer
    M.add_adapter(transformer, "policy", args.rank, float(args.rank), M.DEFAULT_LORA_TARGETS, seed=0)
    params = [p for p in transformer.parameters() if p.requires_grad]
    empty = pipe.text.encode([""])
    print("| reward | noise level | SDE steps (trained) | starting noise | reward mean | within-group std | "
          "gradient cosine | SNR of one batch |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.reward.split(","):
        prompts, metadata = rewards.load_prompts(args.prompts or PROMPTS[name])
        reward_fn = rewards.get_reward(name)
        pick = [int(i) for i in np.random.default_rng(1).choice(len(prompts), args.groups, replace=False)]
        batch = [prompts[i] for i in pick for _ in range(args.group_size)]
        meta = [metadata[i] for i in pick for _ in range(args.group_size)]
        cond = pipe.text.encode(batch)  # the same batch for every setting and replica: encoded once
        neg = (empty[0].expand(len(batch), -1, -1), empty[1].expand(len(batch), -1))
        for noise, window, shared in itertools.product(args.noise.split(","), args.window.split(","), args.shared.split(",")):
            grads, scores = [], []
            with transformer.adapter("policy"):
                for r in range(args.replicas):
                    g, s = gradient(pipe, transformer, params, reward_fn, batch, meta, cond, neg, float(noise), int(window),
                                    shared == "1", 1000 + r, args.group_size)
                    grads.append(g)
                    scores.append(s)
            cos, snr = agreement(torch.stack(grads))
            S = torch.stack(scores).view(args.replicas, args.groups, args.group_size)
            print(f"| {name} | {noise} | {window} | {'one per group' if shared == '1' else 'own'} | {S.mean():.3f} | "
                  f"{S.std(2).mean():.3f} | {cos:+.3f} | {snr:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
