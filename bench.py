"""
How fast Flow-OPD's hot loops run on the SD3.5-Medium shape, measured the same way every time
(nanoGPT's bench.py beside the training scripts). Random bf16 weights from the configs in
../shared/docs/SD35.md, random text embeddings (77 CLIP + 128 T5 tokens): no download.

  python bench.py --all --out $OUT/bench.md   # the GPU session's one command (~4-6 min on an H100/H200)
  python bench.py --check                     # only: every CUDA kernel against its PyTorch twin
  python bench.py --tiny                      # the same code on a tiny config on the CPU (CI, seconds)
  python bench.py --sections=flops            # FLOP counts of the real shape (meta device: no GPU needed)
  python bench.py --sections=rollout,grpo --rollout_batches=[16]   # any config key below as --key=value

Sections (CUDA events around each repeat after warm-up; medians over repeats):
  check    every kernel of kernels.py against its twin (forward and input gradients), then the whole
           transformer with the kernels against model.py's; an op that fails is switched off
  peak     the card's bf16 matmul rate (one 8192^3 product, random data): the MFU denominator
  flops    FLOPs counted per module (count_forward / count_backward below) and the same steps under
           torch.utils.flop_counter.FlopCounterMode, which must agree
  rollout  model.rollout at 512 px: 10 SDE steps, CFG 4.5, the LoRA on; batch 8 and 16; images/s
           without, and with the VAE decode (diffusers' AutoencoderKL of the SD3.5 VAE shape, fp32 as the
           scripts decode; timed on its own, added to the rollout's time)
  grpo     one trained timestep of train_teacher.py: policy forward+backward with CFG, the reference
           forward (adapter off), the loss; then its optimizer step (clip, AdamW); also with
           gradient checkpointing
  opd      one supervised state of distill.py (objective pg): the routed teachers' forward and the
           anchor's (the labels), the student's forward+backward, the loss; then the optimizer step
  distill  distill.py's configuration on one GPU: 3 teachers + anchor + student as adapters on one
           base, its per-GPU batch (4): sampling, labels for every state, training; does it fit 80 GB
  profile  torch.profiler over one CFG forward: where the time goes (GEMM, attention, the rest)
Each timed section runs per variant: 'model.py' (model.py with the kernels off, its default: the
PyTorch twins) and 'kernels' (the same code with kernels.py's CUDA kernels on, as FLOWOPD_KERNELS=1
turns them on); bench.py turns them on for this variant and the check whatever FLOWOPD_KERNELS says.

TFLOP/s and MFU come from FLOPs counted per module: each stream's linear layers see only that
stream's tokens, adaLN and embedding weights one vector per sample, attention 4 B H Lq Lk d, LoRA its
own matmuls; training = forward + the backward autograd runs (input gradients where they lead to a
LoRA weight, the LoRA weights' gradients) + the frozen forwards. Attention's backward counts as 2
forwards (SD35.md's convention; the fused kernels also recompute the scores, which FlopCounterMode
counts as 2.5 and which MFU leaves out). Never 2 x params x tokens (2.5x too many for this model).
"""
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels as K
import model as M

# -- config: the SD3.5-M shape and the scripts' recipe; --tiny shrinks it to a CPU ----------------------
preset = "sd35"
sections = "all"              # comma-separated, or all: check,peak,flops,rollout,grpo,opd,distill,profile
out = ""                      # write the markdown report here (and .json beside it); "" = print only
arch = "sd35"                 # transformer/VAE configs: sd35 (SD35.md) or tiny
device = ""                   # default: cuda if there is one, else cpu
dtype = "bfloat16"
resolution = 512
clip_tokens = 77
t5_length = 128               # 77 + 128 = 205 text tokens, as Flow-GRPO / Flow-OPD encode
num_steps = 10
guidance = 4.5
teacher_guidance = 4.5
noise_level = 0.7
shift = 3.0                   # SD3.5's scheduler shift
rollout_batches = [8, 16]
train_batch = 8               # images per GRPO / OPD step (train_teacher.py's reference: 8-9)
distill_batch = 4             # distill.py's per-GPU batch_size
num_teachers = 3
task_weights = [3.0, 1.0, 1.0]  # distill.py's task mixture: the routing of the teachers' forwards
lora_rank = 32
lora_alpha = 64.0
kl_beta = 0.04                # train_teacher.py
opd_kl_beta = 0.0             # distill.py's pg preset: no reference forward (a GRPO-Mix-like run sets it)
beta_mar = 0.02
clip_range = 1e-4
lr = 1e-4
grpo_checkpointing = True     # also time the GRPO step with gradient checkpointing
variants = ["model.py", "kernels"]       # see variant()
warmup = 1                    # rollouts (each is 10 steps: long)
repeats = 3
train_warmup = 2
train_repeats = 5
peak_size = 8192
peak_repeats = 20
vae = True
vae_dtype = "float32"         # the scripts decode in fp32 (SD3.5's force_upcast)
memory_limit_gib = 74.5       # "fits 80 GB": 80e9 bytes, what an 80 GB card offers
seed = 0
CONFIG_KEYS = [k for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, list))]

SD35_TRANSFORMER = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
                    "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"}
SD35_VAE = {"latent_channels": 16, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
            "scaling_factor": 1.5305, "shift_factor": 0.0609, "force_upcast": True, "mid_block_add_attention": True,
            "use_quant_conv": False, "use_post_quant_conv": False}
TINY_TRANSFORMER = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 3,
                    "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 48,
                    "caption_projection_dim": 32, "pooled_projection_dim": 24, "pos_embed_max_size": 8,
                    "dual_attention_layers": [0, 1], "qk_norm": "rms_norm"}
TINY_VAE = {"latent_channels": 4, "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "scaling_factor": 1.5305, "shift_factor": 0.0609, "force_upcast": True, "mid_block_add_attention": True,
            "use_quant_conv": False, "use_post_quant_conv": False}
ARCHS = {"sd35": (SD35_TRANSFORMER, SD35_VAE), "tiny": (TINY_TRANSFORMER, TINY_VAE)}
ALL_SECTIONS = ["check", "peak", "flops", "rollout", "grpo", "opd", "distill", "profile"]

PRESETS = {
    "sd35": dict(),
    "tiny": dict(arch="tiny", device="cpu", dtype="float32", resolution=16, clip_tokens=4, t5_length=4, num_steps=3,
                 rollout_batches=[2, 4], train_batch=2, distill_batch=2, lora_rank=4, lora_alpha=4.0, warmup=1, repeats=2,
                 train_warmup=1, train_repeats=2, peak_size=256, peak_repeats=5),
}


def _argv(args):
    """nanoGPT-style --key=value, plus the flags --tiny, --check, --all and `--out PATH`."""
    flags = {"--tiny": "--preset=tiny", "--check": "--sections=check", "--all": "--sections=all"}
    result, args = [], list(args)
    while args:
        a = args.pop(0)
        if a in flags:
            result.append(flags[a])
        elif a.startswith("--") and "=" not in a and args and not args[0].startswith("--"):
            result.append(f"{a}={args.pop(0)}")
        else:
            result.append(a)
    return result


# -----------------------------------------------------------------------------------------------
# FLOPs, counted per module from the model itself (no 2 x params x tokens).


def _tokens_of(name, n_img, n_txt):
    """How many tokens a Linear sees per sample: its stream's, or one vector (adaLN, the t/pooled embedders)."""
    if name.startswith(("time_text_embed.", "norm_out.")) or ".norm1." in name or ".norm1_context." in name:
        return 1
    if name == "context_embedder" or ".attn.add_qkv" in name or ".attn.to_add_out" in name or ".ff_context." in name:
        return n_txt
    return n_img  # pos_embed.proj, attn.to_qkv / to_out, attn2.*, ff.*, proj_out


def _lora_numel(m, adapter):
    if adapter is not None and isinstance(m, M.Linear) and adapter in m.lora_A:
        return m.lora_A[adapter].numel(), m.lora_B[adapter].numel()
    return 0, 0


def _attention_flops(att, n_img, n_txt):
    """4 H Lq Lk d: joint attention over image + text keys (image queries only in the last block,
    whose text stream is not updated); SD3.5's attn2 over the image tokens alone."""
    if hasattr(att, "add_qkv"):
        keys = n_img + n_txt
        return 4 * att.heads * (n_img if att.context_pre_only else keys) * keys * att.head_dim
    return 4 * att.heads * n_img * n_img * att.head_dim


def count_forward(model, n_img, n_txt, adapter=None):
    """FLOPs of one sample's forward with `adapter` active (None: the base), by module."""
    flops = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            a, b = _lora_numel(m, adapter)
            flops[name] = 2 * _tokens_of(name, n_img, n_txt) * (m.in_features * m.out_features + a + b)
        elif isinstance(m, nn.Conv2d):  # the patch embedding, applied as a matmul over patches
            flops[name] = 2 * n_img * m.weight.numel()
        elif isinstance(m, M.Attention):
            flops[name + ".sdpa"] = _attention_flops(m, n_img, n_txt)
    return flops


def count_backward(model, n_img, n_txt, adapter, attn_backward=2.0):
    """FLOPs of one sample's backward when only `adapter`'s LoRA weights train. Autograd computes a
    gradient only where it leads to a LoRA weight: a layer's input gradient when its input depends on
    an adapter upstream, and each LoRA's dA, dB and inner dh. So the streams carry no gradient before
    the first adapter (block 0's qkv inputs, its attn2), and the adaLN / embedding layers none at all.
    attn_backward: attention's backward in forward units (2: dq, dk, dv; 2.5: FlopCounterMode's count
    for the fused flash / efficient / cuDNN kernels, which also recompute the scores)."""
    for name, m in model.named_modules():
        if _lora_numel(m, adapter)[0] and (not name.startswith("transformer_blocks.") or ".norm1" in name):
            raise NotImplementedError(f"count_backward: an adapter on {name} (outside the blocks' attention and "
                                      f"feed-forward layers) is not counted")

    def linear(m, n, grad_in):  # backward FLOPs of one Linear (base weight frozen); does its output carry a gradient
        a, b = _lora_numel(m, adapter)
        f = 2 * n * (m.in_features * m.out_features + a) if grad_in else 0  # dx through W and through A
        if a:
            f += 2 * n * (a + 2 * b)  # dA, dB and the inner dh
        return f, grad_in or a > 0

    total, gx, gc = 0, False, False
    for blk in model.transformer_blocks:
        att = blk.attn
        f1, qx = linear(att.to_qkv, n_img, gx)
        f2, qc = linear(att.add_qkv, n_txt, gc)
        total += f1 + f2 + (attn_backward * _attention_flops(att, n_img, n_txt) if qx or qc else 0)
        f, ox = linear(att.to_out[0], n_img, qx or qc)
        total += f
        new_gx, new_gc = gx or ox, gc
        if att.to_add_out is not None:
            f, oc = linear(att.to_add_out, n_txt, qx or qc)
            total += f
            new_gc = gc or oc
        if blk.attn2 is not None:  # its input is the block input's LayerNorm: a gradient only if that has one
            f, q2 = linear(blk.attn2.to_qkv, n_img, gx)
            total += f + (attn_backward * _attention_flops(blk.attn2, n_img, n_txt) if q2 else 0)
            f, o2 = linear(blk.attn2.to_out[0], n_img, q2)
            total += f
            new_gx = new_gx or o2
        f, h = linear(blk.ff.net[0].proj, n_img, new_gx)
        total += f
        f, o = linear(blk.ff.net[2], n_img, h)
        total += f
        new_gx = new_gx or o
        if blk.ff_context is not None:
            f, h = linear(blk.ff_context.net[0].proj, n_txt, new_gc)
            total += f
            f, o = linear(blk.ff_context.net[2], n_txt, h)
            total += f
            new_gc = new_gc or o
        gx, gc = new_gx, new_gc
    f, _ = linear(model.proj_out, n_img, gx)
    return int(total + f)


def step_flops(model, n_img, n_txt, adapter, teacher=None, anchor=None, kl=True, attn_backward=2.0, cfg=True):
    """FLOPs per image of one training timestep: the policy's forward + backward, the reference's forward
    (kl), one routed teacher's forward and the anchor's (OPD; each state goes through one teacher).
    cfg: every forward runs on the doubled batch (unconditional + conditional branch)."""
    total = sum(count_forward(model, n_img, n_txt, adapter).values()) + count_backward(model, n_img, n_txt, adapter, attn_backward)
    if kl:
        total += sum(count_forward(model, n_img, n_txt, None).values())
    for other in (teacher, anchor):
        if other is not None:
            total += sum(count_forward(model, n_img, n_txt, other).values())
    return (2 if cfg else 1) * total


# -----------------------------------------------------------------------------------------------
# The variants: model.py calls kernels.py itself; a variant only turns the kernels on or off.


VARIANT_NAMES = ("model.py", "kernels")


@contextmanager
def variant(name):
    """'model.py': model.py with the kernels off (the PyTorch twins, today's default). 'kernels': the
    same code with them on, as FLOWOPD_KERNELS=1 turns them on (ops a failed check switched off stay off)."""
    if name not in VARIANT_NAMES:
        raise M.UserError(f"unknown variant {name!r}: {' or '.join(VARIANT_NAMES)}")
    with K.switched(name == "kernels"):
        yield


def kernels_available():
    """Whether the kernels can run here (builds them on first use, printed), whatever FLOWOPD_KERNELS says."""
    with K.switched(True):
        return K.enabled()


# -----------------------------------------------------------------------------------------------
# Building the models: random weights on the device, no download.


def build_transformer(config, device, torch_dtype, seed=0):
    """model.SD3Transformer(config) with random weights drawn on the device (a 2.2B model in a second):
    matrices ~ N(0, 1/fan_in), adaLN matrices 10x smaller (small gates, as trained models have),
    biases N(0, 0.02^2), norm weights 1 + N(0, 0.1^2); the fp32 position table as load_transformer keeps it."""
    with torch.device("meta"):
        transformer = M.SD3Transformer(config)
    transformer = transformer.to(dtype=torch_dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, (0.1 if ".norm1" in name or "norm_out" in name else 1.0) / math.sqrt(p[0].numel()), generator=g)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.normal_(1.0, 0.1, generator=g)
        with torch.device(device):
            table = M.sincos_pos_table(transformer.pos_embed.proj.out_channels, transformer.pos_embed.max_size,
                                       config["sample_size"] // config["patch_size"])
        transformer.pos_embed.pos_embed = table[None].float()
    return transformer.eval().requires_grad_(False)


def add_random_adapter(transformer, name, trainable, seed):
    """model.add_adapter, then B drawn small instead of zero (nothing is timed on zeros)."""
    M.add_adapter(transformer, name, lora_rank, lora_alpha, seed=seed, trainable=trainable)
    g = torch.Generator(device="cpu").manual_seed(seed + 1000)
    with torch.no_grad():
        for layer in transformer.lora_layers().values():
            if name in layer.lora_B:
                B = layer.lora_B[name]
                mask = torch.tensor(layer.lora_has_part[name], dtype=B.dtype)[:, None, None]
                B.copy_((torch.randn(B.shape, generator=g) * 1e-3 * mask).to(B.device))


def build_vae(config, device, torch_dtype):
    from diffusers import AutoencoderKL
    n = len(config["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, **config)
    return M.VAECodec(vae.to(device=device, dtype=torch_dtype))


# -----------------------------------------------------------------------------------------------
# Timing and memory.


def sync():
    if torch.cuda.is_available() and DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n_warmup, n_repeats):
    """Median seconds of fn() over n_repeats after n_warmup calls: CUDA events on a GPU, the host clock on a CPU."""
    for _ in range(n_warmup):
        fn()
    sync()
    times = []
    for _ in range(n_repeats):
        if DEVICE.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def fresh_memory():
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE.type == "cuda" else None


def reserved_gib():
    return torch.cuda.max_memory_reserved() / 2 ** 30 if DEVICE.type == "cuda" else None


def measure_peak_matmul():
    """The card's bf16 matmul rate: one n^3 product of random data, median of repeats (fp32 on a CPU)."""
    n = peak_size
    mm_dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=DEVICE, dtype=mm_dtype) for _ in range(2))
    seconds, _ = timed(lambda: a @ b, 3, peak_repeats)
    return 2 * n ** 3 / seconds


# -----------------------------------------------------------------------------------------------
# The workloads, written as the scripts write them (train_teacher.py, distill.py).


class Inputs:
    """Random text conditioning for B images: prompts (B, L, joint_dim), pooled (B, P), and the empty
    negative prompt's embedding expanded over the batch, as the scripts pass it."""

    def __init__(self, B, g):
        cfg = TRANSFORMER_CONFIG
        L = clip_tokens + t5_length
        self.embeds = torch.randn(B, L, cfg["joint_attention_dim"], generator=g).to(DEVICE, DTYPE)
        self.pooled = torch.randn(B, cfg["pooled_projection_dim"], generator=g).to(DEVICE, DTYPE)
        neg_e = torch.randn(1, L, cfg["joint_attention_dim"], generator=g).to(DEVICE, DTYPE)
        neg_p = torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(DEVICE, DTYPE)
        self.cond = (self.embeds, self.pooled)
        self.neg = (neg_e.expand(B, -1, -1), neg_p.expand(B, -1))
        self.seeds = [M.sample_seed(seed, 0, i) for i in range(B)]


def run_rollout(transformer, inputs, adapter="student", keep=True):
    with transformer.adapter(adapter):
        return M.rollout(transformer, *inputs.cond, *inputs.neg, LATENT_SHAPE, inputs.seeds, num_steps, shift, guidance,
                         noise_level, keep=keep)


def grpo_timestep(transformer, inputs, roll, advantages, j, optimizer, params):
    """train_teacher.py's training step at timestep j, then an optimizer step."""
    x, x_next = roll.latents[:, j], roll.latents[:, j + 1]
    with transformer.adapter("student"):
        mean, step_std, _ = M.step_distribution(transformer, x, SIGMAS[j], SIGMAS[j + 1], SIGMAS[1], noise_level,
                                                inputs.cond, inputs.neg, guidance)
        log_prob = M.gaussian_log_prob(x_next, mean, step_std)
        with torch.no_grad(), transformer.adapter(None):  # the reference: the base, adapter off
            ref_mean, _, _ = M.step_distribution(transformer, x, SIGMAS[j], SIGMAS[j + 1], SIGMAS[1], noise_level,
                                                 inputs.cond, inputs.neg, guidance)
        policy_loss, _ = M.clipped_surrogate(log_prob, roll.log_probs[:, j], advantages, clip_range)
        kl = M.transition_kl(mean, ref_mean, step_std, SIGMAS[j + 1] - SIGMAS[j], "reference").mean()
        (policy_loss + kl_beta * kl).backward()
    M.optimizer_update(optimizer, params, 1.0, None, 0)  # the scripts' update


def task_routing(B):
    """Each image's task drawn in distill.py's proportions (deterministic), as one-hot routing weights."""
    w = torch.tensor(task_weights[:num_teachers], dtype=torch.float64)
    quota = (torch.arange(B, dtype=torch.float64)[:, None] + 0.5) / B
    task = torch.searchsorted(torch.cumsum(w / w.sum(), 0), quota.flatten()).clamp(max=num_teachers - 1)
    return F.one_hot(task, num_teachers).to(DEVICE, torch.float64)


def opd_labels(transformer, inputs, roll, j, alpha):
    """distill.py's labels for the states at steps j: the routed teachers' mean, the anchor's mean, the pg reward."""
    B = len(j)
    x = roll.latents[torch.arange(B, device=j.device), j]
    with torch.no_grad():
        target = M.routed_mean(transformer, TEACHERS, alpha, x, SIGMAS[j], SIGMAS[j + 1], SIGMAS[1], noise_level,
                               inputs.cond, inputs.neg, teacher_guidance)
        with transformer.adapter("anchor"):
            anchor_mean, step_std, _ = M.step_distribution(transformer, x, SIGMAS[j], SIGMAS[j + 1], SIGMAS[1], noise_level,
                                                           inputs.cond, inputs.neg, teacher_guidance)
        old_mean = roll.means[torch.arange(B, device=j.device), j]
        kl = M.step_divergence(old_mean, target, step_std, SIGMAS[j], SIGMAS[j + 1], STDS[j], "exact", "reference")
    return target, anchor_mean, M.kl_advantages(kl[:, None], j[:, None], -1.0, "none", 5.0)[:, 0]


def opd_train(transformer, inputs, roll, j, target, anchor_mean, advantages):
    """distill.py's training on the states at steps j (objective pg, MAR; + KL to the base if opd_kl_beta)."""
    B, rows = len(j), torch.arange(len(j), device=j.device)
    x, x_next = roll.latents[rows, j], roll.latents[rows, j + 1]
    with transformer.adapter("student"):
        mean, step_std, _ = M.step_distribution(transformer, x, SIGMAS[j], SIGMAS[j + 1], SIGMAS[1], noise_level,
                                                inputs.cond, inputs.neg, guidance)
        log_prob = M.gaussian_log_prob(x_next, mean, step_std)
        loss, _ = M.clipped_surrogate(log_prob, roll.log_probs[rows, j], advantages, clip_range)
        to_teacher = M.step_divergence(mean, target, step_std, SIGMAS[j], SIGMAS[j + 1], STDS[j], "exact", "reference")
        to_anchor = M.step_divergence(mean, anchor_mean, step_std, SIGMAS[j], SIGMAS[j + 1], STDS[j], "exact", "reference")
        loss = loss + beta_mar * to_anchor.mean()  # pg: the teacher enters through the advantages
        logged = {"kl_teacher": to_teacher.mean().detach(), "kl_anchor": to_anchor.mean().detach()}  # as distill.py logs
        if opd_kl_beta > 0:
            with torch.no_grad(), transformer.adapter(None):
                ref_mean, _, _ = M.step_distribution(transformer, x, SIGMAS[j], SIGMAS[j + 1], SIGMAS[1], noise_level,
                                                     inputs.cond, inputs.neg, guidance)
            loss = loss + opd_kl_beta * M.transition_kl(mean, ref_mean, step_std, SIGMAS[j + 1] - SIGMAS[j], "reference").mean()
        loss.backward()
    return logged


def opd_state(transformer, inputs, roll, j, alpha, optimizer, params):
    """One supervised state per image of distill.py: labels, training, then an optimizer step."""
    target, anchor_mean, advantages = opd_labels(transformer, inputs, roll, j, alpha)
    opd_train(transformer, inputs, roll, j, target, anchor_mean, advantages)
    M.optimizer_update(optimizer, params, 1.0, None, 0)  # the scripts' update


# -----------------------------------------------------------------------------------------------
# The report: markdown sections, rewritten to `out` after each one (a run cut short keeps its numbers).

REPORT, RESULTS, RAW = [], [], {}


def publish(title=None, text=None):
    if title is not None:
        REPORT.append((title, text))
        print(f"\n## {title}\n{text}", flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        sections_md = [f"## {t}\n{x}" for t, x in REPORT]
        sections_md.insert(min(1, len(sections_md)), f"## Results\n{results_table()}")
        with open(out, "w") as f:
            f.write("# bench.py results\n\n" + "\n\n".join(sections_md) + "\n")
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump({"results": RESULTS, **RAW}, f, indent=1, default=str)


def add_result(**row):
    RESULTS.append(row)
    cells = [str(row.get(k, "")) for k in ("section", "variant", "batch", "time", "throughput", "tflops", "mfu", "peak", "note")]
    print("  " + " | ".join(cells), flush=True)
    publish()


def results_table():
    head = "| what | variant | batch | time | throughput | TFLOP/s | MFU | peak GiB | note |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    return head + "".join(f"\n| {r['section']} | {r['variant']} | {r['batch']} | {r['time']} | {r['throughput']} | {r['tflops']} "
                          f"| {r['mfu']} | {r['peak']} | {r['note']} |" for r in RESULTS)


def fmt_time(seconds):
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def fmt_flops(flops):
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale or unit == "MFLOP":
            return f"{flops / scale:.4f} {unit}"


def fmt_rate(flops_per_s):
    return f"{flops_per_s / 1e12:.1f}" if flops_per_s >= 1e11 else f"{flops_per_s / 1e12:.4f}"


def row_numbers(flops, seconds):
    rate = flops / seconds
    return dict(tflops=fmt_rate(rate), mfu=f"{100 * rate / PEAK:.1f}%" if PEAK else "-")


def guarded(section, what, var, batch, fn):
    """Run one measurement; an out-of-memory or any failure becomes a row that says so."""
    fresh_memory()
    try:
        fn()
    except Exception as e:  # the rest of the run still happens
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        add_result(section=what, variant=var, batch=batch, time="-", throughput="-", tflops="-", mfu="-",
                   peak=f"{peak_gib():.1f}" if DEVICE.type == "cuda" else "-",
                   note="out of memory" if oom else f"failed: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}")
        if not oom:
            import traceback
            traceback.print_exc()
    finally:
        fresh_memory()


# -----------------------------------------------------------------------------------------------
# The sections.


def section_check(transformer):
    if not kernels_available():
        why = K._state["error"] or "no CUDA device"
        publish("Kernel check", f"kernels unavailable ({why}): the PyTorch twins run; nothing to check.")
        return True
    with variant("kernels"):
        rows = K.check(device=K._state["device"], small=DEVICE.type != "cuda" or arch == "tiny", verbose=False)
    failed = sorted({r["op"] for r in rows if not r["ok"]})
    for op in failed:
        K.disable(op)
    RAW["check"] = rows
    text = K.format_check(rows)
    whole_ok, whole = whole_model_check(transformer)
    text += "\n\n" + whole
    if failed:
        text += f"\n\n**Failed, switched off for the timings: {', '.join(failed)}.**"
    publish("Kernel check", text)
    return not failed and whole_ok


def whole_model_check(transformer):
    """The whole transformer with the kernels on against model.py's default (kernels off): forward and
    LoRA gradients at batch 2, each against a float32 copy of the same weights; the kernels must be no
    further from it than model.py's own bf16 arithmetic is."""
    inputs = Inputs(2, torch.Generator().manual_seed(seed + 7))
    x = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(seed + 8)).to(DEVICE, DTYPE)
    t = torch.full((2,), 700.0, device=DEVICE)

    def run(model, name, cast):
        with variant(name), model.adapter("student"):
            out = model(x.to(cast), t, *(c.to(cast) for c in inputs.cond)).float()
            out.square().mean().backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.adapter_parameters("student")])
        for p in model.adapter_parameters("student"):
            p.grad = None
        return out.detach(), grads

    reference = copy.deepcopy(transformer)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if ".lora_" not in name:
                p.data = p.data.float()
        reference.pos_embed.pos_embed = reference.pos_embed.pos_embed.float()
    ref = run(reference, "model.py", torch.float32)
    del reference
    fresh_memory()
    today = run(transformer, "model.py", DTYPE)
    K.launch_counts()
    fused = run(transformer, "kernels", DTYPE)
    launches = ", ".join(f"{name.replace('flowopd_', '')} {n}" for name, n in sorted(K.launch_counts().items()))
    rel = [[((a[i] - ref[i]).norm() / ref[i].norm()).item() for i in (0, 1)] for a in (today, fused)]
    ok = all(math.isfinite(r) for pair in rel for r in pair) and all(rel[1][i] <= 1.5 * rel[0][i] + 1e-3 for i in (0, 1))
    RAW["whole_model_check"] = dict(model_py=rel[0], kernels=rel[1], ok=ok)
    text = (f"Whole transformer ({arch}, {len(transformer.transformer_blocks)} blocks, {DTYPE}, batch 2) against a float32 copy: "
            f"forward {rel[1][0]:.2e} with the kernels, {rel[0][0]:.2e} with model.py; LoRA gradients {rel[1][1]:.2e} with the "
            f"kernels, {rel[0][1]:.2e} with model.py ({'ok' if ok else 'TOO FAR: the kernels lose more than model.py'}). "
            f"Kernel launches in that forward + backward: {launches or 'none (the twins ran)'}.")
    return ok, text


def section_flops(transformer):
    """The counts per image, and FlopCounterMode on the same steps."""
    from torch.utils.flop_counter import FlopCounterMode
    n_img, n_txt = LATENT_TOKENS, clip_tokens + t5_length
    fwd = sum(count_forward(transformer, n_img, n_txt, "student").values())
    fwd_base = sum(count_forward(transformer, n_img, n_txt, None).values())
    bwd = count_backward(transformer, n_img, n_txt, "student")
    grpo = step_flops(transformer, n_img, n_txt, "student")
    opd = step_flops(transformer, n_img, n_txt, "student", teacher="student", anchor="student", kl=opd_kl_beta > 0)  # same shapes
    params = sum(p.numel() for n, p in transformer.named_parameters() if ".lora_" not in n)
    naive = 2 * params * (n_img + n_txt)
    FLOPS.update(forward=fwd, rollout=num_steps * 2 * fwd, grpo=grpo, opd=opd)
    lines = [f"Per image at {resolution} px ({n_img} image + {n_txt} text tokens), LoRA r {lora_rank} on "
             f"{len(M.DEFAULT_LORA_TARGETS)} attention projections; CFG = 2 branches per forward.", "",
             "| quantity | FLOPs |", "| --- | --- |",
             f"| transformer forward, LoRA on (one branch) | {fmt_flops(fwd)} |",
             f"| transformer forward, adapter off | {fmt_flops(fwd_base)} |",
             f"| backward of a LoRA training step (one branch; attention backward = 2 forwards) | {fmt_flops(bwd)} |",
             f"| GRPO training timestep, one branch (policy fwd + bwd + reference fwd) | {fmt_flops(grpo / 2)} |",
             f"| GRPO training timestep per image (CFG) | {fmt_flops(grpo)} |",
             f"| OPD supervised state per image (CFG: student fwd + bwd, teacher fwd, anchor fwd"
             f"{', reference fwd' if opd_kl_beta > 0 else ''}) | {fmt_flops(opd)} |",
             f"| rollout per image ({num_steps} steps, CFG) | {fmt_flops(num_steps * 2 * fwd)} |",
             f"| naive 2 x params x tokens (not used) | {fmt_flops(naive)} ({naive / fwd:.2f}x the forward) |"]
    # FlopCounterMode on the same model: the math SDPA on a CPU (counted as bmm), the fused kernels on a GPU
    attn_ctx = nullcontext()
    expect_bwd = 2.0
    if transformer.pos_embed.proj.weight.device.type != "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        attn_ctx = sdpa_kernel(SDPBackend.MATH)
    meta = transformer.pos_embed.proj.weight.device.type == "meta"
    g = torch.Generator().manual_seed(seed + 3)
    B = 1
    dev = transformer.pos_embed.proj.weight.device
    x = torch.randn(B, *LATENT_SHAPE, generator=g).to(dev, DTYPE)
    t = torch.full((B,), 500.0, device=dev)
    e = torch.randn(B, n_txt, TRANSFORMER_CONFIG["joint_attention_dim"], generator=g).to(dev, DTYPE)
    p = torch.randn(B, TRANSFORMER_CONFIG["pooled_projection_dim"], generator=g).to(dev, DTYPE)
    checks = []
    with variant("model.py"), attn_ctx:
        with FlopCounterMode(display=False) as counter, torch.no_grad(), transformer.adapter("student"):
            transformer(x, t, e, p)
        checks.append(("forward, batch 1, LoRA on", counter.get_total_flops(), B * fwd, None))
        with FlopCounterMode(display=False) as counter:
            with transformer.adapter("student"):
                transformer(x, t, e, p).float().square().mean().backward()
            with torch.no_grad(), transformer.adapter(None):
                transformer(x, t, e, p)
        counted = counter.get_total_flops()
        ops = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
        fused_attn = any("flash" in k or "efficient" in k or "cudnn" in k for k in ops)
        expect_bwd = 2.5 if fused_attn else 2.0
        expected = B * step_flops(transformer, n_img, n_txt, "student", attn_backward=expect_bwd, cfg=False)
        checks.append((f"training step (policy fwd + bwd + reference fwd), batch 1, attention backward counted as {expect_bwd}",
                       counted, expected, ops))
        for prm in transformer.adapter_parameters("student"):
            prm.grad = None
    lines += ["", f"Cross-check with torch.utils.flop_counter.FlopCounterMode ({'meta device' if meta else dev.type}):", "",
              "| step | FlopCounterMode | counted per module | agree |", "| --- | --- | --- | --- |"]
    ok = True
    for what, counted, expected, ops in checks:
        agree = abs(counted - expected) <= 1e-3 * expected
        ok &= agree
        lines.append(f"| {what} | {counted:,} | {expected:,.0f} | {'yes' if agree else 'NO'} |")
        if not agree and ops:
            lines.append(f"| (FlopCounterMode by op: {', '.join(f'{k}={v:,}' for k, v in ops.items())}) | | | |")
    RAW["flops"] = dict(FLOPS, naive=naive, forward_base=fwd_base, backward=bwd, checks=[c[:3] for c in checks])
    publish("FLOPs", "\n".join(lines))
    return ok


def section_peak():
    global PEAK
    PEAK = measure_peak_matmul()
    RAW["peak_flops"] = PEAK
    what = f"bf16 {peak_size}^3 matmul" if DEVICE.type == "cuda" else f"fp32 {peak_size}^3 matmul (CPU: MFU is only a smoke test)"
    publish("Peak", f"{what}: {PEAK / 1e12:.1f} TFLOP/s (median of {peak_repeats}), the MFU denominator.")


def section_rollout(transformer, codec):
    vae_seconds, vae_flops = {}, None
    if codec is not None:  # the VAE decode, timed on its own per batch size (the kernels do not touch it)
        from torch.utils.flop_counter import FlopCounterMode
        z = torch.randn(1, *LATENT_SHAPE, device=DEVICE)
        with FlopCounterMode(display=False) as counter:
            codec.decode(z)
        vae_flops = counter.get_total_flops()
        for B in rollout_batches:
            z = torch.randn(B, *LATENT_SHAPE, device=DEVICE)
            vae_seconds[B], _ = timed(lambda: codec.decode(z), 1, max(3, repeats))
            fresh_memory()
        RAW["vae"] = dict(flops_per_image=vae_flops, seconds=vae_seconds)
    for var in VARIANTS:
        for B in rollout_batches:
            def measure():
                inputs = Inputs(B, torch.Generator().manual_seed(seed + B))
                with variant(var):
                    seconds, all_times = timed(lambda: run_rollout(transformer, inputs), warmup, repeats)
                flops = B * FLOPS["rollout"]
                add_result(section="rollout", variant=var, batch=B, time=fmt_time(seconds), throughput=f"{B / seconds:.2f} img/s",
                           **row_numbers(flops, seconds), peak=fmt_peak(), note=f"{num_steps} steps, CFG; repeats {fmt_spread(all_times)}")
                if B in vae_seconds:
                    total = seconds + vae_seconds[B]
                    add_result(section="rollout + VAE decode", variant=var, batch=B, time=fmt_time(total),
                               throughput=f"{B / total:.2f} img/s", **row_numbers(flops + B * vae_flops, total), peak="-",
                               note=f"decode {fmt_time(vae_seconds[B])} ({vae_dtype}), timed apart")
            guarded("rollout", "rollout", var, B, measure)


def fmt_peak():
    return f"{peak_gib():.1f}" if DEVICE.type == "cuda" else "-"


def fmt_spread(times):
    return f"{fmt_time(min(times))}..{fmt_time(max(times))}"


def training_state(transformer, B):
    """A real rollout (keep=True) to train on, as the scripts do; the same one for every variant."""
    inputs = Inputs(B, torch.Generator().manual_seed(seed + 100 + B))
    with variant("model.py"):
        roll = run_rollout(transformer, inputs)
    advantages = torch.randn(B, generator=torch.Generator().manual_seed(seed + 5)).to(DEVICE).clamp(-5, 5)
    return inputs, roll, advantages


def section_grpo(transformer, optimizer, params):
    B = train_batch
    inputs, roll, advantages = training_state(transformer, B)
    trained = list(range(min(num_steps - 1, int(num_steps * 0.99))))
    transformer.train()
    runs = [(var, False) for var in VARIANTS] + ([(VARIANTS[-1], True)] if grpo_checkpointing else [])
    for var, ckpt in runs:
        def measure():
            transformer.gradient_checkpointing = ckpt
            step = iter(range(10 ** 9))
            with variant(var):
                seconds, all_times = timed(lambda: grpo_timestep(transformer, inputs, roll, advantages, trained[next(step) % len(trained)],
                                                                 optimizer, params), train_warmup, train_repeats)
            GRPO_SECONDS[(var, ckpt)] = seconds
            add_result(section="GRPO step" + (" (checkpointing)" if ckpt else ""), variant=var, batch=B, time=fmt_time(seconds),
                       throughput=f"{B / seconds:.2f} img-steps/s", **row_numbers(B * FLOPS["grpo"], seconds), peak=fmt_peak(),
                       note=f"1 timestep + optimizer step; repeats {fmt_spread(all_times)}")
        guarded("grpo", "GRPO step", var, B, measure)
    transformer.gradient_checkpointing = False
    transformer.eval()


def attach_teachers(transformer):
    for k, name in enumerate(TEACHERS):
        if name not in transformer.adapter_names():
            add_random_adapter(transformer, name, trainable=False, seed=seed + 10 + k)
    if "anchor" not in transformer.adapter_names():
        add_random_adapter(transformer, "anchor", trainable=False, seed=seed + 20)


def section_opd(transformer, optimizer, params):
    B = train_batch
    attach_teachers(transformer)
    inputs, roll, _ = training_state(transformer, B)
    alpha = task_routing(B)
    trained = list(range(min(num_steps - 1, int(num_steps * 0.99))))
    transformer.train()
    for var in VARIANTS:
        def measure():
            step = iter(range(10 ** 9))

            def one():
                j = torch.full((B,), trained[next(step) % len(trained)], device=DEVICE)
                opd_state(transformer, inputs, roll, j, alpha, optimizer, params)
            with variant(var):
                seconds, all_times = timed(one, train_warmup, train_repeats)
            ratio = seconds / GRPO_SECONDS[(var, False)] if (var, False) in GRPO_SECONDS else None
            add_result(section="OPD step", variant=var, batch=B, time=fmt_time(seconds), throughput=f"{B / seconds:.2f} img-steps/s",
                       **row_numbers(B * FLOPS["opd"], seconds), peak=fmt_peak(),
                       note=(f"{ratio:.2f}x the GRPO step; " if ratio else "") + f"{num_teachers} teachers routed "
                            f"{'/'.join(str(int(c)) for c in alpha.sum(0).tolist())}, anchor; repeats {fmt_spread(all_times)}")
        guarded("opd", "OPD step", var, B, measure)
    transformer.eval()


def section_distill(transformer, optimizer, params):
    """distill.py on one GPU at its per-GPU batch: every adapter on one base, sampling, labels, training."""
    B = distill_batch
    attach_teachers(transformer)
    trained = list(range(min(num_steps - 1, int(num_steps * 0.99))))
    sizes = {a: sum(p.numel() for p in transformer.adapter_parameters(a)) for a in transformer.adapter_names()}
    for var in VARIANTS:
        def measure():
            inputs = Inputs(B, torch.Generator().manual_seed(seed + 200))
            alpha = task_routing(B)
            t0 = time.perf_counter()
            with variant(var):
                transformer.eval()
                roll = run_rollout(transformer, inputs)
                labels = []
                for j in trained:  # distill.py labels every supervised state before training
                    jj = torch.full((B,), j, device=DEVICE)
                    labels.append((jj, *opd_labels(transformer, inputs, roll, jj, alpha)))
                transformer.train()
                for jj, target, anchor_mean, advantages in labels[:2]:
                    opd_train(transformer, inputs, roll, jj, target, anchor_mean, advantages)
                M.optimizer_update(optimizer, params, 1.0, None, 0)  # the scripts' update
                transformer.eval()
            sync()
            seconds = time.perf_counter() - t0
            reserved = reserved_gib()
            fits = f"fits 80 GB: {'yes' if reserved <= memory_limit_gib else 'NO'} (reserved {reserved:.1f} GiB); " if reserved is not None else ""
            add_result(section="distill config", variant=var, batch=B, time=fmt_time(seconds), throughput="-", tflops="-", mfu="-",
                       peak=fmt_peak(), note=fits + f"{num_teachers} teachers + anchor + student ({len(sizes)} adapters, "
                       f"{sum(sizes.values()):,} LoRA params) on one base; rollout, {len(trained)} labelled states, 2 trained")
        guarded("distill", "distill config", var, B, measure)
    transformer.eval()


def section_profile(transformer):
    """Where one CFG forward's time goes, per variant: GEMMs, attention, everything else."""
    from torch.profiler import ProfilerActivity, profile
    B = train_batch
    inputs = Inputs(B, torch.Generator().manual_seed(seed + 300))
    x = torch.randn(B, *LATENT_SHAPE, generator=torch.Generator().manual_seed(seed + 301)).to(DEVICE)
    cuda = DEVICE.type == "cuda"
    lines, tables = ["| variant | device time | GEMM | attention | the rest (norms, elementwise, copies) | kernels launched |",
                     "| --- | --- | --- | --- | --- | --- |"], []
    for var in VARIANTS:
        def forward():
            with torch.no_grad(), transformer.adapter("student"):
                M.predict_velocity(transformer, x, SIGMAS[3], *inputs.cond, *inputs.neg, guidance)
        with variant(var):
            forward()
            sync()
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                forward()
                sync()
        events = [e for e in prof.events() if (cuda and str(e.device_type).endswith("CUDA")) or (not cuda and e.cpu_parent is None)]
        share = {"gemm": 0.0, "attention": 0.0, "rest": 0.0}
        for e in events:
            t = getattr(e, "device_time_total", None) if cuda else e.cpu_time_total
            if t is None:
                t = getattr(e, "cuda_time_total", 0.0)
            name = e.name.lower()
            kind = "attention" if any(k in name for k in ("flash", "fmha", "attention", "sdpa", "softmax")) else \
                "gemm" if any(k in name for k in ("gemm", "matmul", "nvjet", "cutlass", "xmma", "addmm", "aten::mm", "bmm", "linear")) else "rest"
            share[kind] += t
        total = sum(share.values()) or 1.0
        lines.append(f"| {var} | {total / 1e3:.1f} ms | {100 * share['gemm'] / total:.0f}% | {100 * share['attention'] / total:.0f}% | "
                     f"{100 * share['rest'] / total:.0f}% | {len(events)} |")
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        try:
            table = prof.key_averages().table(sort_by=sort, row_limit=30)
        except Exception:
            table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else sort, row_limit=30)
        tables.append(f"== {var}: one CFG forward, batch {B} ==\n{table}")
    text = f"One CFG forward (batch {B}, {2 * B} branches), by kernel kind:\n\n" + "\n".join(lines)
    if out:
        path = os.path.join(os.path.dirname(os.path.abspath(out)), "profile.txt")
        with open(path, "w") as f:
            f.write("\n\n".join(tables))
        text += f"\n\nThe top ops of each: {os.path.basename(path)} beside this file."
    publish("Profile", text)


# -----------------------------------------------------------------------------------------------
# main

if __name__ == "__main__":
    command = "python " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
    scope = {k: globals()[k] for k in CONFIG_KEYS}
    config = M.configure(scope, PRESETS, _argv(sys.argv[1:]))
    globals().update(scope)
    wanted = ALL_SECTIONS if sections == "all" else [s.strip() for s in sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in ALL_SECTIONS]
    if unknown:
        raise M.UserError(f"unknown sections {unknown}; choose from {', '.join(ALL_SECTIONS)} or all")
    if [v for v in variants if v not in VARIANT_NAMES]:
        raise M.UserError(f"unknown variants in {variants}: each is {' or '.join(VARIANT_NAMES)}")
    DEVICE = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    DTYPE = getattr(torch, dtype)
    TRANSFORMER_CONFIG, VAE_CONFIG = ARCHS[arch]
    vae_factor = 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)
    LATENT_SHAPE = (TRANSFORMER_CONFIG["in_channels"], resolution // vae_factor, resolution // vae_factor)
    LATENT_TOKENS = (LATENT_SHAPE[1] // TRANSFORMER_CONFIG["patch_size"]) * (LATENT_SHAPE[2] // TRANSFORMER_CONFIG["patch_size"])
    TEACHERS = [f"teacher_{k}" for k in range(num_teachers)]
    FLOPS, GRPO_SECONDS, PEAK = {}, {}, None
    if os.environ.get("FLOWOPD_KERNELS_EMULATED"):  # tests: the kernels' CPU build runs in place of the GPU's
        K.load_emulated(os.environ["FLOWOPD_KERNELS_EMULATED"])
    counting_only = DEVICE.type == "cpu" and arch != "tiny"
    if counting_only and wanted == ["check"]:  # no SD3.5-sized model on a CPU: the kernels alone, if any
        if not kernels_available():
            print("no CUDA device: no kernels to check here (the twins run); tests/test_bench.py checks them emulated")
            sys.exit(0)
        with variant("kernels"):
            rows = K.check(device=K._state["device"], small=True)
        sys.exit(0 if all(r["ok"] for r in rows) else 1)
    if counting_only and set(wanted) - {"flops"}:
        if sections != "all":
            raise M.UserError("the SD3.5 shape needs a GPU; on a CPU run --tiny, or --sections=flops (counts on the meta device)")
        wanted = ["flops"]
        print("no GPU: counting FLOPs of the SD3.5 shape on the meta device only (--tiny runs everything on a CPU)")
    if DEVICE.type == "cuda":
        card = torch.cuda.get_device_name(DEVICE)
        mem = torch.cuda.get_device_properties(DEVICE).total_memory / 2 ** 30
    else:
        card, mem = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)", None
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except Exception:
        commit = "unknown"
    header = [f"- card: {card}" + (f", {mem:.0f} GiB" if mem else ""),
              f"- command: `{command}`",
              f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
              f"- torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if DEVICE.type == "cuda" else "") +
              f", python {platform.python_version()}, commit {commit}",
              f"- shape: {arch} ({TRANSFORMER_CONFIG['num_layers']} layers, width "
              f"{TRANSFORMER_CONFIG['num_attention_heads'] * TRANSFORMER_CONFIG['attention_head_dim']}), {DTYPE}, "
              f"{resolution} px -> latents {'x'.join(map(str, LATENT_SHAPE))} = {LATENT_TOKENS} image tokens, "
              f"{clip_tokens} + {t5_length} text tokens; LoRA r {lora_rank}"]
    RAW["config"] = config
    RAW["environment"] = dict(card=card, command=command, torch=torch.__version__, commit=commit)
    print(f"bench.py: {card}; torch {torch.__version__}; sections {','.join(wanted)}", flush=True)
    t_start = time.time()

    # the transformer: on the meta device when only counting; the student adapter is the GRPO policy
    if counting_only:
        with torch.device("meta"):
            transformer = M.SD3Transformer(TRANSFORMER_CONFIG).to(DTYPE)
        transformer.requires_grad_(False)
        M.add_adapter(transformer, "student", lora_rank, lora_alpha, seed=seed)
    else:
        torch.manual_seed(seed)
        t0 = time.time()
        transformer = build_transformer(TRANSFORMER_CONFIG, DEVICE, DTYPE, seed)
        add_random_adapter(transformer, "student", trainable=True, seed=seed)
        n_base = sum(p.numel() for n, p in transformer.named_parameters() if ".lora_" not in n)
        header.append(f"- model built in {time.time() - t0:.1f} s: {n_base:,} parameters + "
                      f"{sum(p.numel() for p in transformer.adapter_parameters('student')):,} LoRA (student / GRPO policy)")
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8) if not counting_only else None
    SIGMAS = M.sigma_schedule(num_steps, shift).to("cpu" if counting_only else DEVICE)
    STDS = M.sde_std(SIGMAS[:-1], SIGMAS[1], noise_level).to(SIGMAS.device)

    ok = True
    available = False
    if "check" in wanted or (not counting_only and "kernels" in variants):
        t0 = time.time()
        available = kernels_available()  # compiles the kernels on first use (printed)
        if available and K._state["device"] == "cuda":
            header.append(f"- kernels: built/loaded in {time.time() - t0:.1f} s")
    VARIANTS = [v for v in variants if v != "kernels" or available]
    if "kernels" in variants and not available:
        header.append(f"- kernels unavailable ({K._state['error'] or 'no CUDA device'}): only the model.py variant runs")
    publish("Setup", "\n".join(header))

    def run_section(name, fn, *args):
        """A section that breaks (a bug, out of memory) is reported and the run goes on with the next."""
        try:
            result = fn(*args)
            return result is not False
        except Exception as e:
            import traceback
            traceback.print_exc()
            publish(f"{name}: failed", f"{type(e).__name__}: {str(e)[:500]}")
            fresh_memory()
            return False

    if "check" in wanted and not counting_only:
        ok &= run_section("Kernel check", section_check, transformer)
    if "peak" in wanted:
        ok &= run_section("Peak", section_peak)
    if any(s in wanted for s in ("flops", "rollout", "grpo", "opd")):
        ok &= run_section("FLOPs", section_flops, transformer)
    codec = None
    if vae and "rollout" in wanted:
        try:
            codec = build_vae(VAE_CONFIG, DEVICE, getattr(torch, vae_dtype))
        except Exception as e:  # diffusers missing on the GPU image: carry it (docs/bench.md)
            publish("VAE", f"skipped, the decode is not timed: {type(e).__name__}: {str(e)[:300]}")
    if "rollout" in wanted:
        ok &= run_section("Rollout", section_rollout, transformer, codec)
    del codec
    fresh_memory()
    if "grpo" in wanted:
        ok &= run_section("GRPO", section_grpo, transformer, optimizer, params)
    if "opd" in wanted:
        ok &= run_section("OPD", section_opd, transformer, optimizer, params)
    if "distill" in wanted:
        ok &= run_section("Distill", section_distill, transformer, optimizer, params)
    if "profile" in wanted:
        ok &= run_section("Profile", section_profile, transformer)
    elapsed = time.time() - t_start
    publish("Done", f"{elapsed:.0f} s in all. " + ("Every check passed." if ok else "**A check failed: see above.**"))
    print("\n## Results\n" + results_table(), flush=True)
    sys.exit(0 if ok else 1)
