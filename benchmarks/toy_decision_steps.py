"""
At which sampling step the toy base model decides what each reward reads (docs/toy_results.md).

  python benchmarks/toy_decision_steps.py        # about 6 minutes on 2 CPU cores

For each reward, 16 training prompts x 8 samples from toy/base with the teachers' sampler (10 steps, CFG 4.5,
one starting noise per group), and SDE noise (level 0.3) at ONE step k only, every other step by the ODE.
The within-group standard deviation of the reward then measures how much the noise injected at step k can
still change the outcome: what GRPO can credit to that step. The teachers' preset trains steps 0-4.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import kernels as K  # noqa: E402
import model as M  # noqa: E402
import rewards  # noqa: E402
from toy_rl_noise import GROUPS, G, training_groups  # noqa: E402

REWARDS = {"toy_text": "toy/prompts/text_train.txt", "toy_composition": "toy/prompts/composition_train.jsonl",
           "toy_quality": "toy/prompts/quality_train.txt", "brightness": "toy/prompts/quality_train.txt"}
STEPS, NOISE = 10, 0.3


@torch.no_grad()
def sample(transformer, cond, neg, shape, seeds, init_seeds, sde_step_index, shift):
    sigmas = M.sigma_schedule(STEPS, shift)
    x = M.sample_noise(shape, init_seeds, "cpu")[0]
    gens = M.sample_noise(shape, seeds, "cpu")[1]
    for j in range(STEPS):
        v = M.predict_velocity(transformer, x, sigmas[j], *cond, *neg, 4.5)
        if j == sde_step_index:
            noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
            x = K.sde_step(x, v, sigmas[j], sigmas[j + 1], sigmas[1], NOISE, noise)[0]
        else:
            x = M.ode_step(x, v, sigmas[j], sigmas[j + 1])
    return x


if __name__ == "__main__":
    os.chdir(ROOT)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    pipe = M.load_pipeline("toy/base", "cpu", torch.float32, t5_length=12)
    transformer = pipe.transformer.eval()
    shape = pipe.latent_shape(32)
    empty = pipe.text.encode([""])
    sigmas = M.sigma_schedule(STEPS, pipe.shift)
    print("Within-group std of the reward with SDE noise at one step only (sigma at that step in the header):\n")
    print("| reward | " + " | ".join(f"step {k} (σ {sigmas[k]:.2f})" for k in range(STEPS - 1)) + " |")
    print("|---|" + "---|" * (STEPS - 1))
    for name, path in REWARDS.items():
        reward = rewards.get_reward(name)
        batch, meta, cond, neg = training_groups(pipe, path, empty)
        init = [10 ** 6 + i // G for i in range(len(batch))]
        row = []
        for k in range(STEPS - 1):
            x = sample(transformer, cond, neg, shape, list(range(len(batch))), init, k, pipe.shift)
            scores = reward(M.to_uint8(pipe.codec.decode(x)), batch, meta)[0].view(GROUPS, G).double()
            row.append(f"{scores.std(1).mean():.3f}")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)
