"""
What a toy base model has learned, stage by stage of the noise: the measurements behind the base-model
section of docs/toy_results.md.

  python benchmarks/toy_base_probe.py                    # toy/base
  python benchmarks/toy_base_probe.py runs/toy/pretrain/step_012000/pipeline free   # phase 1, on its own scenes

On clean held-out renders (64 per task, in the given layout, default "grid"; the toy's own reader and GenEval rule):
  1. denoising: x_s = (1 - s) x_0 + s eps, one velocity call, x_0 estimate = x_s - s v, read back;
     with the right prompt, another prompt of the task (a wrong one) and the empty prompt: the gap
     between them is how much the model takes from the caption rather than from the image.
  2. SDEdit: x_s as above, then the Euler ODE from s to 0 (10 steps, CFG 4.5): from which noise level the
     model still finishes a scene it did not start.
  3. sampling from pure noise (the evaluation sampler: 10 steps, shift 3, CFG 4.5).
Scores are text accuracy (character level, 1 = exact) and GenEval's rule (composition), in [0, 1].
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import toyworld as T  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
path = sys.argv[1] if len(sys.argv) > 1 else "toy/base"
layout = sys.argv[2] if len(sys.argv) > 2 else "grid"
pipe = M.load_pipeline(path, "cpu", torch.float32, t5_length=12)
transformer = pipe.transformer.eval()
empty = pipe.text.encode([""])
rng = np.random.default_rng(0)
print(f"{path}: scores in [0, 1] on 64 clean held-out renders per task, {layout} layout")
for task in ("text", "composition"):
    metas = [T.sample_prompt(task, rng, split="test")[1] for _ in range(64)]
    prompts = [m["prompt"] for m in metas]
    x0 = pipe.codec.encode(torch.from_numpy(np.stack([T.render(m, rng, layout=layout) for m in metas])).permute(0, 3, 1, 2).float() / 255)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    n = len(prompts)
    neg = (empty[0].expand(n, -1, -1), empty[1].expand(n, -1))

    def read(x):
        images = M.to_uint8(pipe.codec.decode(x)).permute(0, 2, 3, 1).numpy()
        if task == "text":
            return T.text_accuracy(images, prompts).mean()
        return T.score(task, images, prompts, metas, strict=True).mean()

    conditions = {"right": pipe.text.encode(prompts), "wrong": pipe.text.encode(prompts[1:] + prompts[:1]),
                  "empty": neg}
    rows = []
    with torch.no_grad():
        for s in (0.6, 0.7, 0.8, 0.9):
            xs = (1 - s) * x0 + s * eps
            cells = [f"{name} {read(xs - s * M.predict_velocity(transformer, xs, s, *c)):.2f}" for name, c in conditions.items()]
            sigmas = torch.linspace(s, 0, 11)
            x = xs
            for j in range(10):
                v = M.predict_velocity(transformer, x, sigmas[j], *conditions["right"], *neg, 4.5)
                x = M.ode_step(x, v, sigmas[j], sigmas[j + 1])
            rows.append(f"  s={s}: noisy input {read(xs):.2f} | one-step x0 estimate: " + ", ".join(cells)
                        + f" | SDEdit from s: {read(x):.2f}")
        roll = M.rollout(transformer, *conditions["right"], *neg, pipe.latent_shape(32), [M.sample_seed(7, i) for i in range(n)],
                         10, pipe.shift, 4.5, 0.0, sde=False, keep=False)
    print(f"{task}: clean renders {read(x0):.2f}, sampled from pure noise {read(roll.latents[:, -1]):.2f}")
    print("\n".join(rows), flush=True)
