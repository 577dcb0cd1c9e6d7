"""
Where the toy base model's reward spread inside a GRPO group comes from (docs/toy_results.md, "calibration").

  python benchmarks/toy_rl_noise.py        # about 2 minutes on 2 CPU cores

For each reward, 16 training prompts x 8 samples from toy/base with the teachers' sampler (10 steps, CFG 4.5),
SDE at noise level a on the first `window` steps (the rest by the ODE): the mean reward, the mean within-group
standard deviation and the mean best-of-8, once with every sample's own starting noise and once with one
starting noise per group (`--shared_init_noise`). GRPO's advantages are within-group differences, and the
log-probs credit only the SDE noise: with shared starting noise all of the within-group spread is creditable.
"""
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import rewards  # noqa: E402

REWARDS = {"toy_quality": "toy/prompts/quality_train.txt", "toy_composition": "toy/prompts/composition_train.jsonl",
           "brightness": "toy/prompts/quality_train.txt"}
SETTINGS = [(0.3, None), (0.3, 5), (0.7, None)]  # (noise level, SDE window: steps by the SDE; None = all 9)
GROUPS, G = 16, 8


def training_groups(pipe, path, empty):
    """GROUPS prompts of a training set (the same pick every time) x G each: the prompts, their metadata,
    their conditioning (embeds, pooled) and the empty prompt's, expanded to the batch."""
    prompts, metadata = rewards.load_prompts(path)
    pick = [int(i) for i in np.random.default_rng(1).choice(len(prompts), GROUPS, replace=False)]
    batch = [prompts[i] for i in pick for _ in range(G)]
    meta = [metadata[i] for i in pick for _ in range(G)]
    neg = (empty[0].expand(len(batch), -1, -1), empty[1].expand(len(batch), -1))
    return batch, meta, pipe.text.encode(batch), neg


if __name__ == "__main__":
    os.chdir(ROOT)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    pipe = M.load_pipeline("toy/base", "cpu", torch.float32, t5_length=12)
    transformer = pipe.transformer.eval()
    shape = pipe.latent_shape(32)
    empty = pipe.text.encode([""])
    print("| reward | noise level | SDE steps | starting noise | mean | within-group std | best of 8 |")
    print("|---|---|---|---|---|---|---|")
    for name, path in REWARDS.items():
        reward = rewards.get_reward(name)
        batch, meta, (embeds, pooled), neg = training_groups(pipe, path, empty)
        for noise_level, window in SETTINGS:
            for shared in (False, True):
                roll = M.rollout(transformer, embeds, pooled, *neg, shape, list(range(len(batch))), 10, pipe.shift, 4.5,
                                 noise_level, keep=False, sde_steps=window,
                                 init_seeds=[10 ** 6 + i // G for i in range(len(batch))] if shared else None)
                scores = reward(M.to_uint8(pipe.codec.decode(roll.latents[:, -1])), batch, meta)[0].view(GROUPS, G).double()
                print(f"| {name} | {noise_level} | {window or 9} | {'one per group' if shared else 'own'} | "
                      f"{scores.mean():.3f} | {scores.std(1).mean():.3f} | {scores.max(1).values.mean():.3f} |", flush=True)
