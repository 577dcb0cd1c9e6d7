"""
A diagnostic, not the method: the toy teacher's GRPO with the SDE's exploration noise confined to low spatial
frequencies (docs/toy_results.md, "calibration").

  python benchmarks/toy_lowfreq_grpo.py --out_dir=runs/toy/cal2/lowfreq_c      # ~5 min on 2 CPU cores
  python evaluate.py --select=toy_composition --models="{'lowfreq_c': 'runs/toy/cal2/lowfreq_c'}" --out_dir=runs/toy/cal2/eval_lowfreq_c

The toy codec is lossless space-to-depth, so the SDE's noise lands on all 3072 pixel values of a 32x32 image
per step, while the rewards read coarse structure (which colour where, how many, which glyph). SD3.5's VAE
latent is 48x smaller than its image. Here the noise is projected onto P: 4x4 pixel-block means (P is an
orthogonal projection of rank 3 x 8 x 8 = 192), x' = mean + std_step P eps, and the log-probability and KL
are those of the projected Gaussian (P x' vs P mean): exploration and credit only where the rewards can
see it. Everything else is train_teacher.py's toy preset: 8 prompts x 8 samples, one starting noise per
group, the SDE on the first 5 of 10 steps and all 5 trained, CFG 4.5, lr 3e-3, KL beta 0.02 (|dt|
convention), LoRA r 8, one optimizer step per iteration (on-policy: the clipped ratio is 1, so the loss is
-A log p). If this teacher improves where train_teacher.py's does not, the toy world's blocker is the
codec's dimension, not the recipe.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import rewards  # noqa: E402

PROMPTS = {"toy_composition": "toy/prompts/composition_train.jsonl", "toy_text": "toy/prompts/text_train.txt",
           "toy_quality": "toy/prompts/quality_train.txt"}


def low_pass(latents, factor, pool):
    """P: the latents' image (space-to-depth undone), averaged over pool x pool blocks, back to latents.
    Block averaging is an orthogonal projection, and so is P (the codec's rearrangement is a permutation)."""
    image = F.pixel_shuffle(latents, factor)
    image = F.interpolate(F.avg_pool2d(image, pool), scale_factor=pool, mode="nearest")
    return F.pixel_unshuffle(image, factor)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reward", default="toy_composition")
    parser.add_argument("--out_dir", default="runs/toy/cal2/lowfreq")
    parser.add_argument("--pool", type=int, default=4, help="block size of P in pixels (1: no projection, the method)")
    parser.add_argument("--noise_level", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--kl_beta", type=float, default=0.02)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    groups, group_size, steps, guidance = 8, 8, 10, 4.5
    pipe = M.load_pipeline("toy/base", "cpu", torch.float32, t5_length=12)
    transformer, shape, factor = pipe.transformer, pipe.latent_shape(32), pipe.codec.factor
    P = lambda x: low_pass(x, factor, args.pool) if args.pool > 1 else x
    prompts, metadata = rewards.load_prompts(PROMPTS[args.reward])
    reward_fn = rewards.get_reward(args.reward)
    M.seed_everything(args.seed)
    M.add_adapter(transformer, "policy", 8, 8.0, M.DEFAULT_LORA_TARGETS, seed=args.seed)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sigmas = M.sigma_schedule(steps, pipe.shift)
    empty = pipe.text.encode([""])
    os.makedirs(args.out_dir, exist_ok=True)
    log = open(os.path.join(args.out_dir, "log.jsonl"), "w")
    for iteration in range(args.iterations):
        t0 = time.time()
        pick = [i for _, i in M.draw_groups([len(prompts)], [1.0], groups, args.seed, iteration)]
        batch = [prompts[i] for i in pick for _ in range(group_size)]
        meta = [metadata[i] for i in pick for _ in range(group_size)]
        n = len(batch)
        cond = pipe.text.encode(batch)
        neg = (empty[0].expand(n, -1, -1), empty[1].expand(n, -1))
        x = M.sample_noise(shape, M.group_init_seeds(args.seed, iteration, range(n), group_size), "cpu")[0]
        # each sample's own generator, past its own starting noise: the SDE noise M.rollout would draw
        gens = M.sample_noise(shape, [M.sample_seed(args.seed, iteration, i) for i in range(n)], "cpu")[1]
        latents = [x]
        transformer.eval()
        with torch.no_grad(), transformer.adapter("policy"):
            for j in range(steps):
                v = M.predict_velocity(transformer, x, sigmas[j], *cond, *neg, guidance)
                if j < args.window:
                    std = M.sde_std(sigmas[j], sigmas[1], args.noise_level)
                    mean = M.sde_mean(x, v, sigmas[j], sigmas[j + 1], std)
                    eps = torch.stack([torch.randn(shape, generator=g) for g in gens])
                    x = mean + std * torch.sqrt(sigmas[j] - sigmas[j + 1]) * P(eps)
                else:
                    x = M.ode_step(x, v, sigmas[j], sigmas[j + 1])
                latents.append(x)
        scores = reward_fn(M.to_uint8(pipe.codec.decode(x)), batch, meta)[0]
        adv, _ = M.group_advantages(scores, [i // group_size for i in range(n)])
        transformer.train()
        kls = []
        with transformer.adapter("policy"):
            for j in range(args.window):
                mean, step_std, _ = M.step_distribution(transformer, latents[j], sigmas[j], sigmas[j + 1], sigmas[1],
                                                        args.noise_level, cond, neg, guidance)
                log_prob = M.gaussian_log_prob(P(latents[j + 1]), P(mean), step_std)
                with torch.no_grad(), transformer.adapter(None):
                    ref, _, _ = M.step_distribution(transformer, latents[j], sigmas[j], sigmas[j + 1], sigmas[1],
                                                    args.noise_level, cond, neg, guidance)
                kl = M.transition_kl(P(mean), P(ref), step_std, sigmas[j + 1] - sigmas[j], "reference").mean()
                ((-(adv * log_prob).mean() + args.kl_beta * kl) / args.window).backward()
                kls.append(kl.item())
        M.clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"iteration": iteration + 1, "reward_mean": scores.mean().item(), "kl": sum(kls) / len(kls),
                  "seconds": time.time() - t0}
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(f"iter {iteration + 1}: reward {record['reward_mean']:.3f} kl {record['kl']:.2e} {record['seconds']:.1f} s", flush=True)
    M.save_adapter(transformer, "policy", os.path.join(args.out_dir, "adapter"), base_model="toy/base")
    print(f"done: {args.out_dir}/adapter")


if __name__ == "__main__":
    main()
