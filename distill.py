"""
Stage 3 of Flow-OPD: multi-teacher on-policy distillation (docs/method.md sections 5-6).

Per iteration: the student samples groups of SDE trajectories on prompts drawn from a mixture of tasks;
every stored state is labelled by its task's teacher (task routing; all teachers are LoRA adapters on
ONE frozen base); the student is trained on the per-step KL between its Gaussian transition and the
teacher's, either as a dense reward in the clipped surrogate (pg, the paper) or directly (gkd), plus
Manifold Anchor Regularization: beta_mar * KL(student || anchor) on every sample of every task.

  python distill.py                                          # toy world: 3 toy teachers -> one student, CPU
  python distill.py --objective=gkd --supervise=low_noise --step_weight=uniform   # DanceOPD's variant
  python distill.py --objective=grpo_mix                     # the GRPO-Mix baseline, same sampling and logs
  python distill.py --objective=nft_mix --shared_init_noise=False   # NFT-Mix: DiffusionNFT on the task rewards
  torchrun --nproc_per_node=8 distill.py --preset=sd35
"""
import contextlib
import json
import os
import time

import torch
from tqdm import tqdm

import model as M
import rewards

# -- config: the paper's recipe on SD3.5-M; the default preset "toy" shrinks it to a CPU ------------------
preset = "toy"
model = "stabilityai/stable-diffusion-3.5-medium"
# each task: its prompt file, its teacher (adapter path or hub id), its sampling weight, and a reward that
# is monitored in pg/gkd and trained on in grpo_mix (a name, or {name: weight} for a weighted sum)
tasks = [
    {"name": "geneval", "prompts": "data/geneval_train.jsonl", "teacher": "jieliu/SD3.5M-FlowGRPO-GenEval", "weight": 3.0, "reward": "geneval"},
    {"name": "ocr", "prompts": "data/ocr_train.txt", "teacher": "jieliu/SD3.5M-FlowGRPO-Text", "weight": 1.0, "reward": "ocr"},
    {"name": "pickscore", "prompts": "data/pickscore_train.txt", "teacher": "jieliu/SD3.5M-FlowGRPO-PickScore", "weight": 1.0, "reward": "pickscore"},
]
prompts = ""                 # optional: one mixed .jsonl whose rows carry a "task" field, instead of per-task files
routing = {}                 # soft routing {task: {teacher task: weight}}; {} = one-hot, each task to its own teacher
anchor = ""                  # the MAR anchor adapter (a task-agnostic quality teacher); "" = the base model
student_init = ""            # the student's initial adapter (cold_start.py: SFT or merge); "" = a fresh LoRA
objective = "pg"             # pg (the paper) | gkd (minimise the KL directly) | grpo_mix | nft_mix (task-reward baselines:
                             # Flow-GRPO, or DiffusionNFT as train_teacher.py --objective=nft, on each task's reward)
beta_mar = 0.02              # MAR weight (paper appendix 0.02; reference config 0.04)
kl_beta = 0.0                # KL to the reference (the base, adapter off); the GRPO-Mix preset uses 0.04
kl_convention = "reference"  # reference: |dt| KL, the published betas' convention; exact: the true KL
step_weight = "exact"        # exact: the KL's w(t); uniform: plain velocity MSE (DanceOPD)
supervise = "all"            # all SDE steps | random_k | low_noise (one state per rollout in noise_range)
supervise_k = 1
noise_range = [0.0, 0.5]     # low_noise: the noise levels s a supervised state may have
kl_scale = -1.0              # pg: reward r_j = kl_scale * KL_j
kl_norm = "none"             # pg: none | global | per_sample | per_timestep
pg_reward = "closed_form"    # pg: closed_form = -KL_j (METHOD 5.4; a function of x_j alone, so its own step's
                             # score-function gradient has zero mean) | sampled = -(log p(x_j+1) - log p_T(x_j+1))
                             # at the step taken (mean -KL_j; docs/toy_results.md)
monitor_rewards = True       # pg/gkd: also score the samples with each task's reward (logging only)
teacher_guidance = 4.5       # CFG of the teachers' and the anchor's velocities
resolution = 512
num_steps = 10
noise_level = 0.7
guidance = 4.5
t5_length = 128
group_size = 16
groups_per_iter = 16
batch_size = 4               # per rank; the sampling batch is the training batch
optimizer_steps_per_iter = 2
timestep_fraction = 0.99
shared_init_noise = False    # True: one starting noise per group (credit goes to the SDE noise; train_teacher.py's flag)
sde_window = False           # True: the steps after the candidate ones by the ODE (Flow-GRPO-Fast; train_teacher.py's flag)
lr = 1e-4
weight_decay = 1e-4
clip_range = 1e-4
adv_clip = 5.0
global_std = True            # grpo_mix / nft_mix advantages
# nft_mix only: train_teacher.py's DiffusionNFT settings (docs/method.md 3b)
nft_beta = 1.0
nft_weighting = "adaptive"
nft_levels = 0               # 0: int(num_steps * timestep_fraction)
nft_level_density = "schedule"
train_guidance = 1.0
old_decay = [0, 0.001, 0.5]
grad_clip = 1.0
lora_rank = 32
lora_alpha = 64.0
ema = True
ema_decay = 0.9
ema_every = 8
iterations = 500
save_every = 20
keep = 3
grid_every = 20
out_dir = "runs/distill"
seed = 0
dtype = "bfloat16"
device = ""
resume = False
gradient_checkpointing = False
eval_images = 0              # > 0: at the start and the end, ODE samples of each task's eval_prompts scored by its
eval_steps = 40              # eval_reward, for the base, its teacher and the student (a quick check; evaluate.py
                             # runs the full protocol)

TOY_TASKS = [
    {"name": "composition", "prompts": "toy/prompts/composition_train_testmix.jsonl", "teacher": "toy/teachers/composition", "weight": 3.0,
     "reward": "toy_composition", "eval_prompts": "toy/prompts/composition_test.jsonl", "eval_reward": "toy_composition_strict"},
    {"name": "text", "prompts": "toy/prompts/text_train.txt", "teacher": "toy/teachers/text", "weight": 1.0,
     "reward": "toy_text", "eval_prompts": "toy/prompts/text_test.txt", "eval_reward": "toy_text_accuracy"},
    {"name": "quality", "prompts": "toy/prompts/quality_train.txt", "teacher": "toy/teachers/quality", "weight": 1.0,
     "reward": "toy_quality", "eval_prompts": "toy/prompts/quality_test.txt", "eval_reward": "toy_quality_strict"},
]
PRESETS = {
    "toy": dict(model="toy/base", tasks=TOY_TASKS, anchor="toy/teachers/quality", out_dir="runs/toy/distill", resolution=32,
                t5_length=12, group_size=8, groups_per_iter=8, batch_size=64, optimizer_steps_per_iter=1, supervise="random_k", supervise_k=4, noise_level=0.3,
                lr=1e-3, lora_rank=8, lora_alpha=8.0, iterations=20, save_every=10, grid_every=10, dtype="float32", ema=False,
                eval_images=256, eval_steps=10),  # 256 images per task: CIs below the teachers' gains
    "sd35": dict(),
    "sd35_grpo_mix": dict(objective="grpo_mix", kl_beta=0.04, out_dir="runs/grpo_mix",
                          tasks=[{**t, "reward": {t["reward"]: 0.8, "aesthetic": 0.2}} for t in tasks]),
    # NFT-Mix: train_teacher.py's sd35_nft_* settings (CFG-free ODE sampling, velocity penalty 1e-4) on the same mixture
    "sd35_nft_mix": dict(objective="nft_mix", guidance=1.0, kl_beta=1e-4, lr=3e-4, ema_every=1, out_dir="runs/nft_mix",
                         tasks=[{**t, "reward": {t["reward"]: 0.8, "aesthetic": 0.2}} for t in tasks]),
}
config = M.configure(globals(), PRESETS)

# -- checks that need no model: a bad task list fails before any compute --------------------------------
if objective not in ("pg", "gkd", "grpo_mix", "nft_mix"):
    raise M.UserError(f"objective must be pg, gkd, grpo_mix or nft_mix, got {objective!r}")
mix = objective in ("grpo_mix", "nft_mix")  # the task-reward baselines: no teachers, no MAR
if objective == "nft_mix" and shared_init_noise:
    raise M.UserError("--objective=nft_mix samples by the ODE: with --shared_init_noise=True every image of a group would be "
                      "the same; pass --shared_init_noise=False")
if pg_reward not in ("closed_form", "sampled") or (pg_reward == "sampled" and step_weight != "exact"):
    raise M.UserError(f"pg_reward must be closed_form or sampled (the latter with step_weight=exact), got {pg_reward!r}")
if supervise not in ("all", "random_k", "low_noise"):
    raise M.UserError(f"supervise must be all, random_k or low_noise, got {supervise!r}")
names = [t["name"] for t in tasks]
if len(set(names)) != len(names) or not names:
    raise M.UserError(f"task names must be unique and non-empty, got {names}")
weights = [float(t.get("weight", 1.0)) for t in tasks]
if min(weights) < 0 or sum(weights) <= 0:
    raise M.UserError(f"task weights {weights} must be non-negative and sum to a positive number")
route = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)  # route[task, teacher] = alpha_k(c)
for i, name in enumerate(names):
    row = routing.get(name, {name: 1.0})
    for teacher, w in row.items():
        if teacher not in names:
            raise M.UserError(f"routing for task {name!r} names an unknown teacher task {teacher!r}; tasks: {names}")
        route[i, names.index(teacher)] = float(w)
    if route[i].sum() <= 0 or route[i].min() < 0:
        raise M.UserError(f"routing weights of task {name!r} must be non-negative and sum to a positive number")
for name in routing:
    if name not in names:
        raise M.UserError(f"the routing table names an unknown task {name!r}; tasks: {names}")
route /= route.sum(1, keepdim=True)
try:  # every task's prompts (and metadata, for its reward)
    if prompts:
        rows = list(zip(*rewards.load_prompts(prompts)))
        for n, (_, meta) in enumerate(rows, 1):
            if meta.get("task") not in names:
                raise M.UserError(f"{prompts}: row {n} has no 'task' field naming one of {names}")
        task_prompts = [[(p, m) for p, m in rows if m["task"] == name] for name in names]
    else:
        task_prompts = [list(zip(*rewards.load_prompts(t["prompts"]))) for t in tasks]
except (ValueError, OSError) as e:
    raise M.UserError(str(e)) from None
for name, rows in zip(names, task_prompts):
    if not rows:
        raise M.UserError(f"task {name!r} has no prompts")
eval_sets = {}
if eval_images > 0:
    for t in tasks:
        if t.get("eval_prompts"):
            try:
                rows = list(zip(*rewards.load_prompts(t["eval_prompts"])))
                eval_sets[t["name"]] = ([rows[i % len(rows)] for i in range(eval_images)], rewards.get_reward(t.get("eval_reward") or t["reward"]))
            except ValueError as e:
                raise M.UserError(str(e)) from None

# -- setup ---------------------------------------------------------------------------------------------------
dist = M.setup_distributed(device or None)
samples_per_iter = group_size * groups_per_iter
num_batches = M.batches_per_rank(group_size, groups_per_iter, batch_size, dist.world, optimizer_steps_per_iter)
torch_dtype = M.torch_dtype(dtype)
run = M.resume_run(out_dir, resume, config, ("model", "lora_rank", "lora_alpha", "student_init", "ema"), "iteration",
                   dist.master)  # before the model loads: where the run starts; settings it cannot change
M.seed_everything(seed)
pipe = M.load_pipeline(model, dist.device, torch_dtype, t5_length=t5_length)
transformer = pipe.transformer
latent_shape = pipe.latent_shape(resolution)
per_sample = torch.arange(batch_size, device=dist.device)  # x[per_sample, j]: each sample's state at its own step j
sigmas = M.sigma_schedule(num_steps, pipe.shift).to(dist.device)
stds = M.sde_std(sigmas[:-1], sigmas[1], noise_level).to(dist.device)  # std(s_j) of every step
trained = list(range(min(num_steps - 1, int(num_steps * timestep_fraction))))  # candidate (SDE) steps
if supervise == "low_noise":  # any SDE step whose noise level is in range, whatever timestep_fraction says
    trained = [j for j in range(num_steps - 1) if noise_range[0] <= sigmas[j].item() <= noise_range[1]]
    if not trained:
        raise M.UserError(f"no SDE step has a noise level in {noise_range}; levels: {[round(s, 3) for s in sigmas[:-2].tolist()]}")
slots = {"all": len(trained), "random_k": min(supervise_k, len(trained)), "low_noise": 1}[supervise]

# teachers and the anchor: adapters on the one frozen base (METHOD 6); a wrong adapter fails here
if not mix:
    for t in tasks:
        if route[:, names.index(t["name"])].any():
            M.load_adapter(transformer, "teacher_" + t["name"], t["teacher"])
    if anchor:
        M.load_adapter(transformer, "anchor", anchor)
reward_fns = {}
for t in tasks:
    if t.get("reward") and (mix or monitor_rewards):
        spec = t["reward"]
        try:
            reward_fns[t["name"]] = rewards.MultiReward(spec, device=dist.device) if isinstance(spec, dict) else rewards.get_reward(spec, device=dist.device)
        except ValueError as e:
            raise M.UserError(str(e)) from None
if mix and len(reward_fns) != len(tasks):
    raise M.UserError(f"{objective} needs a reward for every task")

start_iter, state, ckpt = run.start, run.state, run.folder
if ckpt:
    M.load_adapter(transformer, "student", os.path.join(ckpt, "adapter"), trainable=True)
elif student_init:
    M.load_adapter(transformer, "student", student_init, trainable=True)
else:
    M.add_adapter(transformer, "student", lora_rank, lora_alpha, seed=seed)
if objective == "nft_mix":  # DiffusionNFT's sampling policy, a second frozen LoRA (train_teacher.py, METHOD 3b.5)
    M.set_adapter_state(transformer, "old", M.read_adapter(os.path.join(ckpt, "old"))[0] if ckpt else M.adapter_state(transformer, "student"))
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
# one base copy (METHOD 6): the teachers, the anchor and the student add only their LoRA parameters
sizes = {"base": sum(p.numel() for n, p in transformer.named_parameters() if ".lora_" not in n),  # global sizes, also of DTensors
         **{a: sum(p.numel() for p in transformer.adapter_parameters(a)) for a in transformer.adapter_names()}}
if not ckpt:
    log.write({"iteration": 0, "parameters": sizes})


def transition(adapter, x, j, cond, neg, cfg, grad=False):
    """(mean, step_std, velocity) of `adapter`'s transition at states x, steps j (one per sample)."""
    with torch.set_grad_enabled(grad), transformer.adapter(adapter):
        return M.step_distribution(transformer, x, sigmas[j], sigmas[j + 1], sigmas[1], noise_level, cond, neg, cfg)


def divergence(mean_a, mean_b, step_std, j):
    return M.step_divergence(mean_a, mean_b, step_std, sigmas[j], sigmas[j + 1], stds[j], step_weight, kl_convention)


def optimizer_update(iteration):
    """M.optimizer_update, counting the steps taken and skipped. Returns the gradient norm."""
    global optimizer_step, skipped
    grad_norm, stepped = M.optimizer_update(optimizer, params, grad_clip, ema_weights, optimizer_step)
    optimizer_step += stepped
    if not stepped:
        skipped += 1
        print(f"warning: non-finite gradient norm at iteration {iteration + 1}; update skipped")
    return grad_norm


def quick_eval(adapter, only=None):
    """Per-image eval rewards per task of `adapter`'s ODE samples (fixed seeds: image i of a task starts from the
    same noise for every model, so differences are paired). Every rank evaluates everything: FSDP forwards are
    collective, and this is small."""
    out = {}
    for name, (rows, reward_fn) in eval_sets.items():
        if only is not None and name not in only:
            continue
        scores = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            cond = pipe.text.encode([p for p, _ in chunk])
            neg = (negative[0].expand(len(chunk), -1, -1), negative[1].expand(len(chunk), -1))
            with transformer.adapter(adapter):
                roll = M.rollout(transformer, *cond, *neg, latent_shape, [M.sample_seed(seed, 99, i + k) for k in range(len(chunk))],
                                 eval_steps, pipe.shift, guidance, sde=False, keep=False)
            images = M.to_uint8(pipe.codec.decode(roll.latents[:, -1])).cpu()
            scores.append(reward_fn(images, [p for p, _ in chunk], [m for _, m in chunk])[0])
        out[name] = torch.cat(scores).double().cpu().tolist()
    return out


def save(iteration):
    M.save_lora_checkpoint(out_dir, iteration, transformer, "student", optimizer, ema_weights,
                           {"iteration": iteration, "skipped": skipped, "optimizer_step": optimizer_step}, config, model, keep,
                           extra_adapters=("old",) if objective == "nft_mix" else ())


reference_scores = {}
if eval_sets and dist.master:
    print("evaluating the base and the teachers on the held-out prompts ...")
if eval_sets:
    transformer.eval()
    reference_scores = {"base": quick_eval(None)}
    if not mix:
        reference_scores["teacher"] = {n: quick_eval("teacher_" + n, only=[n])[n] for n in eval_sets}  # each on its task

# -- the loop ------------------------------------------------------------------------------------------------
for iteration in tqdm(range(start_iter, iterations), desc="iterations", disable=not dist.master, initial=start_iter, total=iterations):
    times, t0 = {}, time.time()
    # 1. on-policy sampling (METHOD 5.1): groups drawn from the task mixture, every sample carries its task
    groups = M.draw_groups([len(p) for p in task_prompts], weights, groups_per_iter, seed, iteration)
    order = [g for g in groups for _ in range(group_size)]  # global sample index -> (task, prompt index)
    batches = []
    transformer.eval()
    for b in range(num_batches):
        first = (b * dist.world + dist.rank) * batch_size
        index = list(range(first, first + batch_size))
        task_of = torch.tensor([order[i][0] for i in index], device=dist.device)
        rows = [task_prompts[t][p] for t, p in (order[i] for i in index)]
        cond = pipe.text.encode([p for p, _ in rows])
        neg = (negative[0].expand(batch_size, -1, -1), negative[1].expand(batch_size, -1))
        with transformer.adapter("old" if objective == "nft_mix" else "student"):  # nft_mix: the sampling policy, by the ODE
            roll = M.rollout(transformer, *cond, *neg, latent_shape, [M.sample_seed(seed, iteration, i) for i in index],
                             num_steps, pipe.shift, guidance, noise_level, sde=objective != "nft_mix",
                             sde_steps=max(trained) + 1 if sde_window else None,
                             init_seeds=M.group_init_seeds(seed, iteration, index, group_size) if shared_init_noise else None)
        # which states are supervised (METHOD 5b): all, k random ones, or one low-noise one per rollout
        g = torch.Generator().manual_seed(M.sample_seed(seed, iteration, first, 5))
        if supervise == "all":
            steps = torch.tensor(trained).expand(batch_size, -1)
        else:
            steps = torch.stack([torch.tensor(trained)[torch.randperm(len(trained), generator=g)[:slots]] for _ in index])
        images = M.to_uint8(pipe.codec.decode(roll.latents[:, -1])).cpu()
        batches.append(dict(index=index, task=task_of, rows=rows, cond=cond, neg=neg, roll=roll, steps=steps.to(dist.device), images=images))
    times["sampling"] = time.time() - t0

    # 2. labels (METHOD 5.2-5.3): routed teacher means, anchor means, and the pg rewards -KL_j
    t1 = time.time()
    local_kl, local_kl_anchor, local_pg = [], [], []
    with torch.no_grad():
        for batch in batches:
            roll, cond, neg, alpha = batch["roll"], batch["cond"], batch["neg"], route.to(dist.device)[batch["task"]]
            batch["target"], batch["anchor"], kls, kls_anchor, pg_kls = [], [], [], [], []
            for slot in range(slots):
                j = batch["steps"][:, slot]
                x = roll.latents[per_sample, j]
                if not mix:
                    target = M.routed_mean(transformer, ["teacher_" + n for n in names], alpha, x, sigmas[j], sigmas[j + 1],
                                           sigmas[1], noise_level, cond, neg, teacher_guidance, collective=dist.world > 1)
                    anchor_mean, step_std, _ = transition("anchor" if anchor else None, x, j, cond, neg, teacher_guidance)
                    batch["target"].append(target)
                    batch["anchor"].append(anchor_mean)
                    old_mean = roll.means[per_sample, j]
                    kls.append(divergence(old_mean, target, step_std, j))
                    if pg_reward == "sampled":  # the estimate at the step taken, in the same KL convention
                        pg_kls.append(M.sampled_kl(roll.latents[per_sample, j + 1], old_mean, target, step_std,
                                                   sigmas[j + 1] - sigmas[j], kl_convention))
                    kls_anchor.append(divergence(old_mean, anchor_mean, step_std, j))
            if kls:  # (batch, slots): the sampling student's divergence from its teachers and from the anchor
                local_kl.append(torch.stack(kls, 1))
                if pg_kls:
                    local_pg.append(torch.stack(pg_kls, 1))
                local_kl_anchor.append(torch.stack(kls_anchor, 1))
    times["labels"] = time.time() - t1

    # 3. rewards: the task rewards (trained on in grpo_mix, monitored otherwise), gathered over ranks
    t2 = time.time()
    task_rewards = torch.full((num_batches, batch_size), float("nan"), device=dist.device)
    for b, batch in enumerate(batches):
        for k, name in enumerate(names):
            rows = (batch["task"] == k).nonzero().flatten().cpu()
            if name in reward_fns and len(rows):
                try:
                    scores, _ = reward_fns[name](batch["images"][rows], [batch["rows"][i][0] for i in rows], [batch["rows"][i][1] for i in rows])
                    task_rewards[b, rows.to(dist.device)] = scores.to(dist.device)
                except FloatingPointError as e:
                    print(f"warning: iteration {iteration + 1}: {e}")
                    task_rewards[b, rows.to(dist.device)] = float("inf")  # marks the iteration as unusable
    all_rewards = M.all_gather(task_rewards[None]).permute(1, 0, 2).reshape(-1).cpu()  # global sample order
    all_tasks = torch.tensor([t for t, _ in order])
    times["reward"] = time.time() - t2
    if mix:
        if not torch.isfinite(all_rewards).all():
            skipped += 1
            if dist.master:
                print(f"warning: non-finite rewards in iteration {iteration + 1}; skipped it ({skipped} so far)")
            log.write({"iteration": iteration + 1, "skipped": skipped})
            continue
        adv, zero_std = M.group_advantages(all_rewards, [t * 10 ** 9 + p for t, p in order], global_std, adv_clip)
        advantages = adv.view(num_batches, dist.world, batch_size)[:, dist.rank].to(dist.device)[..., None].expand(-1, -1, slots)
        r_nft = M.nft_optimality(advantages[..., 0], adv_clip)  # nft_mix: each image's optimality probability
    else:
        kl_all = M.all_gather(torch.stack(local_kl)[None])  # (world, num_batches, batch, slots)
        pg_all = M.all_gather(torch.stack(local_pg)[None]) if pg_reward == "sampled" else kl_all
        steps_all = M.all_gather(torch.stack([b["steps"] for b in batches])[None])
        adv = M.kl_advantages(pg_all.flatten(0, 2), steps_all.flatten(0, 2), kl_scale, kl_norm, adv_clip)
        advantages = adv.view(dist.world, num_batches, batch_size, slots)[dist.rank]

    # 4. training (METHOD 5.4-5.5): pg = clipped surrogate with the dense rewards; gkd = the KL itself;
    #    both + beta_mar KL(student || anchor) [+ kl_beta KL(student || base)]
    t3 = time.time()
    transformer.train()
    stats, per_step = [], slots * (num_batches // optimizer_steps_per_iter)
    levels = nft_levels or int(num_steps * timestep_fraction)
    for b, batch in enumerate(batches if objective == "nft_mix" else []):  # NFT-Mix: train_teacher.py's NFT block
        x0, cond, neg = batch["roll"].latents[:, -1], batch["cond"], batch["neg"]
        level_of = M.nft_noise_levels([M.sample_seed(seed, iteration, i, 30) for i in batch["index"]], sigmas[:num_steps],
                                      levels, nft_level_density).to(dist.device)
        for k in range(levels):
            s = level_of[:, k]
            e = M.sample_noise(latent_shape, [M.sample_seed(seed, iteration, i, 20 + k) for i in batch["index"]], dist.device)[0]
            v_theta, v_old, v_ref = M.nft_velocities(transformer, "student", x0, e, s, cond, neg, train_guidance, kl_beta > 0)
            loss = adv_clip * M.nft_loss(v_theta, v_old, x0, e, s, r_nft[b], nft_beta, nft_weighting).mean()
            st = {"policy_loss": loss.detach()}
            if kl_beta > 0:  # the velocity penalty to the base, as train_teacher.py's
                penalty = ((v_theta - v_ref) ** 2).flatten(1).mean(1).mean()
                st["kl_ref"] = penalty.detach()
                loss = loss + kl_beta * penalty
            (loss / (levels * (num_batches // optimizer_steps_per_iter))).backward()
            stats.append({**st, "loss": loss.detach()})
        if (b + 1) % (num_batches // optimizer_steps_per_iter) == 0:
            grad_norm = optimizer_update(iteration)
    for b, batch in enumerate(batches if objective != "nft_mix" else []):
        roll, cond, neg = batch["roll"], batch["cond"], batch["neg"]
        for slot in range(slots):
            j = batch["steps"][:, slot]
            x, x_next = roll.latents[per_sample, j], roll.latents[per_sample, j + 1]
            mean, step_std, _ = transition("student", x, j, cond, neg, guidance, grad=True)
            loss, s = torch.zeros((), device=dist.device), {}
            if objective in ("pg", "grpo_mix"):
                log_prob = M.gaussian_log_prob(x_next, mean, step_std)
                policy_loss, s = M.clipped_surrogate(log_prob, roll.log_probs[per_sample, j], advantages[b, :, slot], clip_range)
                loss = loss + policy_loss
            if not mix:
                to_teacher = divergence(mean, batch["target"][slot], step_std, j)
                to_anchor = divergence(mean, batch["anchor"][slot], step_std, j)
                if objective == "gkd":
                    loss = loss + to_teacher.mean()
                loss = loss + beta_mar * to_anchor.mean()
                s = {**s, "kl_teacher": to_teacher.mean().detach(), "kl_anchor": to_anchor.mean().detach()}
            if kl_beta > 0:
                ref_mean, _, _ = transition(None, x, j, cond, neg, guidance)
                kl_ref = M.transition_kl(mean, ref_mean, step_std, sigmas[j + 1] - sigmas[j], kl_convention).mean()
                loss = loss + kl_beta * kl_ref
                s["kl_ref"] = kl_ref.detach()
            (loss / per_step).backward()
            stats.append({**s, "loss": loss.detach()})
        if (b + 1) % (num_batches // optimizer_steps_per_iter) == 0:
            grad_norm = optimizer_update(iteration)
    if objective == "nft_mix":  # the sampling policy follows (METHOD 3b.5)
        M.blend_adapter(transformer, "old", "student", M.nft_decay(optimizer_step, *old_decay))
    times["training"] = time.time() - t3

    # 5. logs (per task: divergence to its own teacher, to the anchor, its reward), checkpoint, grid
    record = {"iteration": iteration + 1, **{k: M.all_reduce_mean(torch.stack([s[k] for s in stats]).mean()).item() for k in stats[0]},
              "grad_norm": float(grad_norm), "skipped": skipped, "optimizer_step": optimizer_step}
    if not mix:
        kl_teacher = kl_all.mean(-1).permute(1, 0, 2).reshape(-1).cpu()  # sampling-time divergences, global order
        kl_anchor = M.all_gather(torch.stack(local_kl_anchor)[None]).mean(-1).permute(1, 0, 2).reshape(-1).cpu()
        for k, name in enumerate(names):
            mine = all_tasks == k
            if mine.any():
                record[f"{name}/kl_teacher"] = kl_teacher[mine].mean().item()
                record[f"{name}/kl_anchor"] = kl_anchor[mine].mean().item()
    for k, name in enumerate(names):
        mine = (all_tasks == k) & torch.isfinite(all_rewards)
        if mine.any():
            record[f"{name}/reward"] = all_rewards[mine].mean().item()
            record[f"{name}/count"] = int(mine.sum())
    record.update({"images_per_s": samples_per_iter / (time.time() - t0), **{f"seconds_{k}": v for k, v in times.items()}})
    log.write(record)
    if dist.master:
        shown = " ".join(f"{n}={record[f'{n}/reward']:.3f}" for n in names if f"{n}/reward" in record)
        tqdm.write(f"iter {iteration + 1}: loss {record['loss']:.3e} {shown} {record['images_per_s']:.1f} img/s")
    if (iteration + 1) % save_every == 0 or iteration + 1 == iterations:
        save(iteration + 1)
    if dist.master and ((iteration + 1) % grid_every == 0 or iteration + 1 == iterations):
        shown = list(range(0, batch_size, max(1, batch_size // 16)))[:16]
        first = batches[0]
        M.save_grid(first["images"][shown], [f"[{names[first['task'][i]]}] {first['rows'][i][0]}" for i in shown],
                    os.path.join(out_dir, f"grid_{iteration + 1:06d}.png"))
if eval_sets:  # the student next to its teachers, per task
    transformer.eval()
    with ema_weights.swapped() if ema_weights is not None else contextlib.nullcontext():  # the EMA is what ships
        student = quick_eval("student")
    if dist.master:
        # per task: each model's mean, and the paired differences (same prompts and noise) with their 95% CIs
        base, teacher = reference_scores["base"], reference_scores.get("teacher", {})
        # and on a GenEval-style set (a tag per prompt) a second row: GenEval's overall, the mean of the per-tag means
        rows = []
        for t in (t for t in tasks if t["name"] in eval_sets):
            n, tags = t["name"], [m.get("tag") for _, m in eval_sets[t["name"]][0]]
            for by_tag in (False, True) if None not in tags else (False,):
                stat = (lambda v: M.tag_mean_ci(v, tags)[:2]) if by_tag else (lambda v: M.mean_ci(v)[:2])
                fmt = lambda values: "{:.3f}".format(stat(values)[0])
                diff = lambda a, b: "{:+.3f} ± {:.3f}".format(*stat([x - y for x, y in zip(a, b)]))
                rows.append(f"| {n} ({t.get('eval_reward') or t['reward']}{', GenEval overall' if by_tag else ''}) | "
                            f"{len(student[n])} | {fmt(base[n])} | " + (f"{fmt(teacher[n])} | " if n in teacher else "- | ")
                            + f"{fmt(student[n])} | " + (f"{diff(teacher[n], base[n])} | " if n in teacher else "- | ")
                            + f"{diff(student[n], base[n])} | " + (f"{diff(student[n], teacher[n])} |" if n in teacher else "- |"))
        table = "\n".join(["| task (held-out prompts, eval reward) | n images | base | its teacher | student | teacher - base | "
                           "student - base | student - teacher |", "|---|---|---|---|---|---|---|---|", *rows])
        print(table)
        print(f"mean eval reward of {eval_steps}-step ODE samples; differences paired (same prompt and starting noise), "
              "± the 95% CI half-width 1.96 s / sqrt(n); GenEval overall: the unweighted mean of the per-tag means, "
              "var = Σ_t var_t / T²")
        means = lambda scores: {n: M.mean_ci(v)[0] for n, v in scores.items()}
        M._atomic(lambda p: json.dump({"base": means(base), "teacher": means(teacher) if teacher else None,
                                       "student": means(student), "per_image": {"base": base, "teacher": teacher or None,
                                                                                "student": student},
                                       "eval_images": eval_images, "eval_steps": eval_steps}, open(p, "w"), indent=2),
                  os.path.join(out_dir, "summary.json"))
if dist.master:
    print(f"done: {out_dir}/latest -> {M.latest_checkpoint(out_dir)}")
if torch.distributed.is_initialized():
    torch.distributed.barrier()  # every rank done before any tears down (a rank leaving early can abort at exit)
    torch.distributed.destroy_process_group()
