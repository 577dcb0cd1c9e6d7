"""
Stage 1 of Flow-OPD: a single-reward teacher, by Flow-GRPO (the default) or DiffusionNFT (--objective=nft).

Flow-GRPO (../shared/docs/METHOD.md section 3). Per iteration: sample groups of images per prompt with the SDE
sampler (keeping every step's latents and log-probs), score them with ONE reward, turn rewards into per-prompt
advantages, then train the LoRA on every kept step with the clipped ratio objective plus a KL penalty to the base.

DiffusionNFT (METHOD 3b). Per iteration: the sampling policy (a second LoRA, "old", a slow moving average of the
trained one) draws the groups with any sampler (the ODE by default), the same reward and advantages give each
clean image an optimality probability r, and the LoRA learns from the images by a reward-weighted flow-matching
loss on freshly noised copies: no log-probs, so the starting noise and every step are credited.

  python train_teacher.py                                   # toy world: the composition teacher, CPU, minutes
  python train_teacher.py --preset=toy_nft                  # the same teacher by DiffusionNFT
  python train_teacher.py --reward=toy_text --prompts=toy/prompts/text_train.txt --out_dir=runs/toy/teacher_text
  torchrun --nproc_per_node=8 train_teacher.py --preset=sd35_geneval
  torchrun --nproc_per_node=8 train_teacher.py --preset=sd35_nft_geneval
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train_teacher.py --preset=sd35_ocr
"""
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

import model as M
import rewards

# -- config: the official SD3.5-M recipe (REWARDS.md 7.2); the default preset "toy" shrinks it to a CPU ----
preset = "toy"
model = "stabilityai/stable-diffusion-3.5-medium"
objective = "grpo"            # grpo: Flow-GRPO (METHOD 3); nft: DiffusionNFT, forward-process RL (METHOD 3b)
prompts = "data/geneval_train.jsonl"   # .txt (one prompt per line) or GenEval-style .jsonl (metadata -> reward)
reward = "geneval"
reward_kwargs = {}
out_dir = "runs/teacher"
resolution = 512
num_steps = 10                # T: SDE rollout steps (the last one is the deterministic ODE step)
noise_level = 0.7             # a in std(s) = a sqrt(s / (1 - s))
guidance = 4.5                # CFG of the sampler (GRPO: also of the trained policy, whose log-probs it defines)
t5_length = 128
group_size = 24               # G images per prompt (16 in the reference's 8-GPU configs)
groups_per_iter = 48          # prompts per iteration, over all ranks
batch_size = 9                # images per rank per forward: the sampling batch is the training batch
optimizer_steps_per_iter = 2  # the reference accumulates half an iteration's batches per step
timestep_fraction = 0.99      # train on int(T * fraction) steps: 9 of 10
shared_init_noise = False     # True: one starting noise per group (DanceGRPO); only the SDE noise differs inside it
sde_window = False            # True: the steps after the trained ones by the ODE (Flow-GRPO-Fast), a cleaner reward
steps_per_iter = 0            # > 0: only k of those, drawn at random each iteration (cheaper, still unbiased)
lr = 3e-4
weight_decay = 1e-4
clip_range = 1e-4
adv_clip = 5.0
kl_beta = 0.04                # 0.01 for PickScore; nft: the weight of the velocity penalty ||v_theta - v_base||^2
kl_convention = "reference"   # reference: the published betas' convention (|dt| KL); exact: the true KL
global_std = True
grad_clip = 1.0
# DiffusionNFT only (objective="nft"); group_size, adv_clip, global_std and kl_beta above are shared with GRPO
nft_beta = 1.0                # beta: the implicit policies v+- = v_old +- beta (v_theta - v_old); the code: 1 (0.1 for OCR)
nft_weighting = "adaptive"    # adaptive: x0-prediction error over its detached mean |error| (the code); velocity: METHOD 3b as written
nft_levels = 0                # noise levels each image is trained at per iteration; 0: int(num_steps * timestep_fraction)
nft_level_density = "schedule"  # schedule: distinct levels of the sampling grid, shuffled per image (the code); uniform: U(0, 1)
nft_sampler = "ode"           # how the sampling policy draws the images: ode (the code, with DPM-Solver-2; here Euler) or sde
train_guidance = 1.0          # CFG of the velocities in the NFT loss; 1: the conditional velocity alone (CFG-free, the paper)
old_decay = [0, 0.001, 0.5]   # the sampling policy's soft update theta_old <- eta theta_old + (1 - eta) theta once per
                              # iteration, eta = min(uprate * (step - flat), uphold) after `flat` optimizer steps, else 0:
                              # [flat, uprate, uphold] (the code's default; OCR [75, 0.0075, 0.999])
lora_rank = 32
lora_alpha = 64.0
lora_targets = list(M.DEFAULT_LORA_TARGETS)
init_adapter = ""             # start from an existing adapter (peft or diffusers format)
ema = True
ema_decay = 0.9
ema_every = 8
iterations = 1000
save_every = 20
keep = 3
grid_every = 20
seed = 0
dtype = "bfloat16"
device = ""
resume = False
gradient_checkpointing = False

PRESETS = {
    "toy": dict(model="toy/base", prompts="toy/prompts/composition_train.jsonl", reward="toy_composition",
                out_dir="runs/toy/teacher_composition", resolution=32, t5_length=12, group_size=8, groups_per_iter=8,
                batch_size=64, optimizer_steps_per_iter=1, noise_level=0.3, shared_init_noise=True, timestep_fraction=0.5,
                sde_window=True, lr=3e-3, lora_rank=8, lora_alpha=8.0, kl_beta=0.02, iterations=30, save_every=10,
                grid_every=10, dtype="float32", ema=False),  # why these: docs/toy_results.md, "calibration"
    "sd35_geneval": dict(prompts="data/geneval_train.jsonl", reward="geneval", out_dir="runs/teacher_geneval"),
    "sd35_ocr": dict(prompts="data/ocr_train.txt", reward="ocr", out_dir="runs/teacher_ocr"),
    "sd35_pickscore": dict(prompts="data/pickscore_train.txt", reward="pickscore", out_dir="runs/teacher_pickscore", kl_beta=0.01),
}
# DiffusionNFT on SD3.5-M: the code's config/nft.py (NVlabs/DiffusionNFT) where it says: lr 3e-4, groups of 24, 48 per
# iteration, 9 images per GPU batch, 10 sampling steps CFG-free, 9 training levels per image, adv clip 5, global std,
# velocity penalty 1e-4, evaluation EMA 0.9 every step, LoRA r 32 / alpha 64 on the same 8 projections. Not published
# there: the number of iterations (its README names a GenEval checkpoint at step 1018) and an lr schedule (none: constant).
_SD35_NFT = dict(objective="nft", guidance=1.0, train_guidance=1.0, kl_beta=1e-4, ema_every=1, optimizer_steps_per_iter=1)
PRESETS.update({
    "sd35_nft_geneval": dict(_SD35_NFT, prompts="data/geneval_train.jsonl", reward="geneval", out_dir="runs/teacher_nft_geneval"),
    "sd35_nft_ocr": dict(_SD35_NFT, prompts="data/ocr_train.txt", reward="ocr", out_dir="runs/teacher_nft_ocr", nft_beta=0.1,
                         old_decay=[75, 0.0075, 0.999], optimizer_steps_per_iter=2),
    "sd35_nft_pickscore": dict(_SD35_NFT, prompts="data/pickscore_train.txt", reward="pickscore", out_dir="runs/teacher_nft_pickscore"),
    # the toy teacher by DiffusionNFT: the same prompts, reward, groups and samples per update as "toy"; why these
    # settings: docs/toy_results.md, "The room RL has, and DiffusionNFT teachers beside Flow-GRPO"
    # the loss in the code's form (adaptive weighting, 9 levels of the grid, adv clip 5, the old policy's default
    # schedule): on quality +0.23 strict held-out where the plain velocity form at 4 uniform levels fell
    "toy_nft": dict(PRESETS["toy"], objective="nft", out_dir="runs/toy/teacher_nft_composition", shared_init_noise=False,
                    sde_window=False, timestep_fraction=0.99, batch_size=32, optimizer_steps_per_iter=2, lr=1e-3, kl_beta=0.0,
                    iterations=40, save_every=10),
})
config = M.configure(globals(), PRESETS)
for key, value, allowed in [("objective", objective, ("grpo", "nft")), ("nft_weighting", nft_weighting, ("adaptive", "velocity")),
                            ("nft_level_density", nft_level_density, ("schedule", "uniform")), ("nft_sampler", nft_sampler, ("ode", "sde"))]:
    if value not in allowed:
        raise M.UserError(f"--{key} must be one of {', '.join(allowed)}, got {value!r}")
if objective == "nft" and (nft_beta <= 0 or len(old_decay) != 3 or not 0 <= old_decay[2] < 1):
    raise M.UserError(f"DiffusionNFT needs --nft_beta > 0 (got {nft_beta}) and --old_decay=[flat, uprate, uphold] with "
                      f"0 <= uphold < 1 (got {old_decay})")
if objective == "nft" and nft_sampler == "ode" and shared_init_noise:
    raise M.UserError("--objective=nft samples by the ODE: with --shared_init_noise=True every image of a group would be the "
                      "same; pass --shared_init_noise=False (the toy_nft preset does) or --nft_sampler=sde")
if objective == "nft" and nft_level_density == "schedule" and nft_levels > num_steps:
    raise M.UserError(f"--nft_levels={nft_levels}: the sampling grid has only num_steps = {num_steps} distinct levels")

# -- setup: processes, data, reward, model ------------------------------------------------------------------
dist = M.setup_distributed(device or None)
samples_per_iter = group_size * groups_per_iter
num_batches = M.batches_per_rank(group_size, groups_per_iter, batch_size, dist.world, optimizer_steps_per_iter)
try:
    prompt_list, metadata_list = rewards.load_prompts(prompts)
    reward_fn = rewards.get_reward(reward, device=dist.device, **reward_kwargs)
except (ValueError, OSError) as e:
    raise M.UserError(str(e)) from None
torch_dtype = M.torch_dtype(dtype)
run = M.resume_run(out_dir, resume, config, ("model", "objective", "lora_rank", "lora_alpha", "lora_targets", "init_adapter", "ema"),
                   "iteration", dist.master)  # before the model loads: where the run starts; settings it cannot change
M.seed_everything(seed)
pipe = M.load_pipeline(model, dist.device, torch_dtype, t5_length=t5_length)
transformer = pipe.transformer
latent_shape = pipe.latent_shape(resolution)
sigmas = M.sigma_schedule(num_steps, pipe.shift).to(dist.device)
trained_steps = list(range(min(num_steps - 1, int(num_steps * timestep_fraction))))  # SDE steps only

# the policy: one LoRA named "policy"; with it switched off the same network is the KL reference
start_iter, state, ckpt = run.start, run.state, run.folder
if ckpt:
    M.load_adapter(transformer, "policy", os.path.join(ckpt, "adapter"), trainable=True)
elif init_adapter:
    M.load_adapter(transformer, "policy", init_adapter, trainable=True)
else:
    M.add_adapter(transformer, "policy", lora_rank, lora_alpha, lora_targets, seed=seed)
if objective == "nft":  # DiffusionNFT's sampling policy: a second, frozen LoRA on the same base (METHOD 3b.5)
    old_state = M.read_adapter(os.path.join(ckpt, "old"))[0] if ckpt else M.adapter_state(transformer, "policy")
    M.set_adapter_state(transformer, "old", old_state)
transformer.gradient_checkpointing = gradient_checkpointing
if dist.world > 1:
    M.shard_transformer(transformer, torch_dtype)  # replaces the parameters: collect them afterwards
named = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
params = list(named.values())
optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8)
ema_weights = M.EMA(named.items(), ema_decay, ema_every) if ema else None
if state is not None:
    M.load_optimizer_state(transformer, optimizer, state["optimizer"], lr=lr, weight_decay=weight_decay)  # today's settings
    if ema_weights is not None:
        ema_weights.load_state_dict(state["ema"])
skipped = state["skipped"] if state else 0
optimizer_step = state["optimizer_step"] if state else 0
negative = pipe.text.encode([""])
log = M.JsonlLog(os.path.join(out_dir, "log.jsonl"), dist.master, resume=resume, resume_at=start_iter, key="iteration")
if run.record:  # the settings changed on resume, as such
    log.write(run.record)
reward_thread = ThreadPoolExecutor(1)  # scores batch b while batch b + 1 samples


def save(iteration):
    M.save_lora_checkpoint(out_dir, iteration, transformer, "policy", optimizer, ema_weights,
                           {"iteration": iteration, "skipped": skipped, "optimizer_step": optimizer_step}, config, model, keep,
                           extra_adapters=("old",) if objective == "nft" else ())


def save_due(iteration):
    return (iteration + 1) % save_every == 0 or iteration + 1 == iterations


def optimizer_update(iteration):
    """M.optimizer_update, counting the steps taken and skipped. Returns the gradient norm."""
    global optimizer_step, skipped
    grad_norm, stepped = M.optimizer_update(optimizer, params, grad_clip, ema_weights, optimizer_step)
    optimizer_step += stepped
    if not stepped:
        skipped += 1
        print(f"warning: non-finite gradient norm at iteration {iteration + 1}; update skipped", file=sys.stderr)
    return grad_norm


# -- the loop --------------------------------------------------------------------------------------------
for iteration in tqdm(range(start_iter, iterations), desc="iterations", disable=not dist.master, initial=start_iter, total=iterations):
    times = {}
    t0 = time.time()
    # 1. rollouts (METHOD 3.1): the iteration's prompts, each repeated G times; this rank takes its slices
    groups = [i for _, i in M.draw_groups([len(prompt_list)], [1.0], groups_per_iter, seed, iteration)]
    order = [g for g in groups for _ in range(group_size)]  # global sample index -> prompt index
    batches, futures = [], []
    transformer.eval()
    with transformer.adapter("policy" if objective == "grpo" else "old"):  # NFT: the sampling policy, theta_old
        for b in range(num_batches):
            first = (b * dist.world + dist.rank) * batch_size
            index = list(range(first, first + batch_size))  # global sample indices of this batch
            batch_prompts = [prompt_list[order[i]] for i in index]
            embeds, pooled = pipe.text.encode(batch_prompts)
            neg = (negative[0].expand(len(index), -1, -1), negative[1].expand(len(index), -1))
            roll = M.rollout(transformer, embeds, pooled, *neg, latent_shape, [M.sample_seed(seed, iteration, i) for i in index],
                             num_steps, pipe.shift, guidance, noise_level, sde=objective == "grpo" or nft_sampler == "sde",
                             keep=objective == "grpo", sde_steps=len(trained_steps) if sde_window else None,
                             init_seeds=M.group_init_seeds(seed, iteration, index, group_size) if shared_init_noise else None)
            images = M.to_uint8(pipe.codec.decode(roll.latents[:, -1])).cpu()
            futures.append(reward_thread.submit(reward_fn, images, batch_prompts, [metadata_list[order[i]] for i in index]))
            batches.append(dict(index=index, prompts=batch_prompts, cond=(embeds, pooled), neg=neg, roll=roll, images=images))
    times["sampling"] = time.time() - t0
    t1 = time.time()
    # 2. rewards -> advantages (METHOD 3.3): gathered over ranks, grouped by prompt, clipped
    try:
        local = torch.stack([f.result()[0] for f in futures]).to(dist.device)  # (num_batches, batch_size)
    except FloatingPointError as e:  # the reward model's own check: NaN on this rank, so every rank skips
        local = torch.full((num_batches, batch_size), float("nan"), device=dist.device)
        print(f"warning: rank {dist.rank}: {e}", file=sys.stderr)
    gathered = M.all_gather(local[None]).cpu()  # (world, num_batches, batch_size)
    times["reward"] = time.time() - t1
    if not torch.isfinite(gathered).all():  # never step on NaN: skip the iteration, checkpoints stay on schedule
        skipped += 1
        if dist.master:
            print(f"warning: non-finite rewards in iteration {iteration + 1}; skipped it ({skipped} so far), no update",
                  file=sys.stderr)
        log.write({"iteration": iteration + 1, "skipped": skipped, "optimizer_step": optimizer_step})
        if save_due(iteration):
            save(iteration + 1)
        continue
    all_rewards = gathered.permute(1, 0, 2).reshape(-1)  # back in global sample order
    advantages, zero_std = M.group_advantages(all_rewards, order, global_std, adv_clip)
    advantages = advantages.view(num_batches, dist.world, batch_size)[:, dist.rank].to(dist.device)
    # 3. training, on the same batches: Flow-GRPO (METHOD 3.4) or DiffusionNFT (METHOD 3b.3)
    t2 = time.time()
    transformer.train()
    stats = []
    if objective == "grpo":  # recompute each kept step's log-prob; the clipped ratio and the KL to the base
        steps = trained_steps
        if steps_per_iter:  # the same k steps for every batch of the iteration, the same on every rank
            g = torch.Generator().manual_seed(M.sample_seed(seed, iteration, 11))
            steps = sorted(trained_steps[i] for i in torch.randperm(len(trained_steps), generator=g)[:steps_per_iter].tolist())
        per_step = len(steps) * (num_batches // optimizer_steps_per_iter)
        with transformer.adapter("policy"):
            for b, batch in enumerate(batches):
                roll = batch["roll"]
                for j in steps:
                    x, x_next = roll.latents[:, j], roll.latents[:, j + 1]
                    mean, step_std, _ = M.step_distribution(transformer, x, sigmas[j], sigmas[j + 1], sigmas[1], noise_level,
                                                            batch["cond"], batch["neg"], guidance)
                    log_prob = M.gaussian_log_prob(x_next, mean, step_std)
                    with torch.no_grad(), transformer.adapter(None):  # the reference: the base, adapter off
                        ref_mean, _, _ = M.step_distribution(transformer, x, sigmas[j], sigmas[j + 1], sigmas[1], noise_level,
                                                             batch["cond"], batch["neg"], guidance)
                    policy_loss, s = M.clipped_surrogate(log_prob, roll.log_probs[:, j], advantages[b], clip_range)
                    kl = M.transition_kl(mean, ref_mean, step_std, sigmas[j + 1] - sigmas[j], kl_convention).mean()
                    ((policy_loss + kl_beta * kl) / per_step).backward()
                    stats.append({**s, "policy_loss": policy_loss.detach(), "kl": kl.detach()})
                if (b + 1) % (num_batches // optimizer_steps_per_iter) == 0:
                    grad_norm = optimizer_update(iteration)
    else:  # DiffusionNFT: each clean image x0, freshly noised at a few levels s, trained by the reward-weighted loss
        r = M.nft_optimality(advantages, adv_clip)  # optimality probability of each image, from its clipped advantage
        levels = nft_levels or int(num_steps * timestep_fraction)
        per_step = levels * (num_batches // optimizer_steps_per_iter)
        with transformer.adapter("policy"):
            for b, batch in enumerate(batches):
                x0 = batch["roll"].latents[:, -1]
                level_of = M.nft_noise_levels([M.sample_seed(seed, iteration, i, 30) for i in batch["index"]], sigmas[:num_steps],
                                              levels, nft_level_density).to(dist.device)  # (B, levels), seeded per image
                for k in range(levels):
                    s = level_of[:, k]
                    e = M.sample_noise(latent_shape, [M.sample_seed(seed, iteration, i, 20 + k) for i in batch["index"]], dist.device)[0]
                    v_theta, v_old, v_ref = M.nft_velocities(transformer, "policy", x0, e, s, batch["cond"], batch["neg"],
                                                             train_guidance, reference=kl_beta > 0)
                    # the code scales its loss by adv_clip (so its penalty weight 1e-4 is relative to that)
                    policy_loss = adv_clip * M.nft_loss(v_theta, v_old, x0, e, s, r[b], nft_beta, nft_weighting).mean()
                    kl = ((v_theta - v_ref) ** 2).flatten(1).mean(1).mean() if kl_beta else torch.zeros((), device=dist.device)
                    ((policy_loss + kl_beta * kl) / per_step).backward()
                    stats.append({"policy_loss": policy_loss.detach(), "kl": kl.detach(), "r_mean": r[b].mean()})
                if (b + 1) % (num_batches // optimizer_steps_per_iter) == 0:
                    grad_norm = optimizer_update(iteration)
        decay = M.nft_decay(optimizer_step, *old_decay)  # then the sampling policy follows: theta_old <- eta theta_old + ...
        M.blend_adapter(transformer, "old", "policy", decay)
        stats[-1]["old_decay"] = torch.tensor(decay)
    times["training"] = time.time() - t2
    # 4. log, checkpoint, grid
    mean_stat = {k: M.all_reduce_mean(torch.stack([s[k] for s in stats]).mean()).item() for k in stats[0] if k != "old_decay"}
    record = {"iteration": iteration + 1, "reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
              "reward_min": all_rewards.min().item(), "reward_max": all_rewards.max().item(), "zero_std_groups": zero_std,
              **({"first_ratio_mean": stats[0]["ratio_mean"].item(), "first_ratio_max": stats[0]["ratio_max"].item()}
                 if objective == "grpo" else {"old_decay": float(stats[-1]["old_decay"]), "nft_weighting": nft_weighting}),
              **mean_stat, "grad_norm": float(grad_norm), "lr": lr, "skipped": skipped, "optimizer_step": optimizer_step,
              "images_per_s": samples_per_iter / (time.time() - t0), **{f"seconds_{k}": v for k, v in times.items()}}
    log.write(record)
    if dist.master:
        detail = (f"clipfrac {record['clipfrac']:.2f} ratio[0] {record['first_ratio_mean']:.6f}" if objective == "grpo"
                  else f"loss {record['policy_loss']:.4f} eta {record['old_decay']:.3f}")
        tqdm.write(f"iter {iteration + 1}: reward {record['reward_mean']:.3f} kl {record['kl']:.2e} {detail} "
                   f"{record['images_per_s']:.1f} img/s")
    if save_due(iteration):
        save(iteration + 1)
    if dist.master and ((iteration + 1) % grid_every == 0 or iteration + 1 == iterations):
        shown = list(range(0, batch_size, max(1, batch_size // 16)))[:16]
        scores = local[0].tolist()
        M.save_grid(batches[0]["images"][shown], [f"{batches[0]['prompts'][i]} | r={scores[i]:.2f}" for i in shown],
                    os.path.join(out_dir, f"grid_{iteration + 1:06d}.png"))
reward_thread.shutdown()
if dist.master:
    print(f"done: {out_dir}/latest -> {M.latest_checkpoint(out_dir)}")
if torch.distributed.is_initialized():
    torch.distributed.barrier()  # every rank done before any tears down (a rank leaving early can abort at exit)
    torch.distributed.destroy_process_group()
