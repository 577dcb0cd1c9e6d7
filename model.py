"""
Everything the Flow-OPD stages share, in one file to read top to bottom:

 1. config: plain module-level defaults in each script, overridden by --preset / --config / --key=value
 2. the MMDiT of Stable Diffusion 3 / 3.5, written out in full, with hand-written LoRA adapters
 3. loading and saving official diffusers-layout weights (strict, by official parameter name)
 4. text conditioning (CLIP-L + CLIP-G + T5, exactly as SD3 does it) and the codecs (VAE or pixels)
 5. pipeline loading (a local folder or a hub id) and tiny random pipelines for tests and the toy world
 6. samplers: the shifted schedule, CFG, the ODE step and Flow-GRPO's SDE step with its log-prob
 7. the losses the stages share: per-step Gaussian KL, GRPO advantages and the clipped surrogate
 8. adapter files in both public formats (peft and diffusers), checkpoints, distributed setup

Formulas cite docs/method.md ("METHOD 2" = its section 2). Notation: noise level s in [0, 1]
(diffusers' sigma), x_s = (1 - s) x0 + s e, the network predicts the velocity v ~ e - x0.
"""

import ast
import glob
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

import kernels as K  # fused CUDA ops with plain PyTorch twins; off unless FLOWOPD_KERNELS=1
from safetensors.torch import save_file


class UserError(RuntimeError):
    """A problem with the user's input (a path, a file, a flag): printed as one line, no traceback."""


def _excepthook(kind, value, tb):
    if issubclass(kind, UserError):
        print(f"error: {value}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


sys.excepthook = _excepthook


# Every file a run reads goes through one of these: a missing, truncated, corrupt or mismatched file is a
# UserError "PATH: what is wrong; what to do", printed as one line, never a traceback from deep inside a parser.


def _first_line(err):
    text = str(err).strip().splitlines()
    text = text[0] if text else type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def read_text(path, what="file", fix="save it as UTF-8 text"):
    """A text file's contents; a file that is not UTF-8 is an error naming its line and column."""
    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise UserError(f"{path}: cannot read this {what} ({e.strerror or _first_line(e)})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at column {column}); {fix}") from None


def _parse_json(text, path, fix):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); {fix}") from None


def read_json(path, what="file", fix="re-create or re-download it"):
    """A JSON file, parsed; missing, non-UTF-8 or malformed: a one-line error naming the file and line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} not found; {fix}")
    return _parse_json(read_text(path, what, fix), path, fix)


def read_safetensors(path, fix="re-create or re-download it", metadata=False):
    """All tensors of a .safetensors file (and its header metadata if metadata=True); a truncated or garbage
    file is a one-line error naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; {fix}")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error type (header, truncation), OSError, MemoryError on a huge header
        raise UserError(f"{path}: not a readable .safetensors file, truncated or corrupt ({_first_line(e)}); {fix}") from None
    return (tensors, header) if metadata else tensors


def read_torch(path, fix="re-create it"):
    """torch.load(path, weights_only=True): tensors and plain containers only, never arbitrary pickled code; a
    truncated or foreign file is a one-line error naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip ("failed finding central directory"), an unpickling error, ...
        raise UserError(f"{path}: not a readable torch file, truncated or corrupt ({_first_line(e)}); {fix}") from None


def torch_dtype(name):
    """--dtype=NAME as a torch dtype; anything else is a one-line error listing the choices."""
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UserError(f"--dtype={name!r} is not a floating-point torch dtype; use float32, bfloat16 or float16")
    return value

# -----------------------------------------------------------------------------------------------
# 1. Config: nanoGPT's configurator, with presets.
# A script keeps its defaults as plain globals; configure(globals(), PRESETS) applies, in order,
# the preset (--preset=name, else the script's `preset` default), a config file (--config=file:
# JSON, or lines of `key = python literal`), then --key=value flags. Types follow the defaults.


def configure(scope, presets, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    keys = [k for k, v in scope.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, list, tuple, dict, type(None)))]
    if any(a in ("-h", "--help", "-help", "help") for a in argv):
        print(_help(scope, presets, keys, argv))
        raise SystemExit(0)
    args = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"arguments look like --key=value, got {arg!r} (--help lists the settings)")
        key, value = arg[2:].split("=", 1)
        args[key.replace("-", "_")] = value
    preset = args.pop("preset", scope.get("preset"))
    if preset is not None:
        if preset not in presets:
            raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
        scope["preset"] = preset
        scope.update(presets[preset])
    if "config" in args:
        path = args.pop("config")
        if not os.path.isfile(path):
            raise UserError(f"config file {path} not found")
        text = read_text(path, "a --config file")
        if path.endswith(".json"):
            from_file = _parse_json(text, path, "fix the file")
            if not isinstance(from_file, dict):
                raise UserError(f"{path}: a JSON config file holds one object {{key: value}}")
        else:
            from_file = {}
            for n, line in enumerate(text.splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if line:
                    if "=" not in line:
                        raise UserError(f"{path}:{n}: expected `key = value`, got {line!r}")
                    k, v = line.split("=", 1)
                    from_file[k.strip()] = _literal(v.strip())
        for k, v in from_file.items():
            _set(scope, keys, k, v, path)
    for k, v in args.items():
        _set(scope, keys, k, _literal(v), "--" + k)
    return {k: scope[k] for k in keys if k in scope}


def _setting_comments(path):
    """{key: its comment} from a script's `key = value  # comment` lines at the top level (and the comment lines
    right under one, indented): what --help prints beside each setting."""
    import io
    import tokenize
    comments, key, line_of_key = {}, None, -1
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(open(path, encoding="utf-8").read()).readline))
    except (OSError, tokenize.TokenError, SyntaxError, UnicodeDecodeError):
        return comments
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.NAME and tok.start[1] == 0 and i + 1 < len(tokens) and tokens[i + 1].string == "=":
            key, line_of_key = tok.string, tok.start[0]
        elif tok.type == tokenize.COMMENT and key is not None:
            if tok.start[0] == line_of_key or (tok.start[1] > 0 and tok.line[:tok.start[1]].strip() == "" and
                                               tok.start[0] == line_of_key + 1 + comments.get(key, "").count("\n")):
                text = tok.string.lstrip("#").strip()
                comments[key] = f"{comments[key]}\n{text}" if key in comments else text
        elif tok.type == tokenize.NAME and tok.start[1] == 0:
            key = None
    return comments


def _help(scope, presets, keys, argv):
    """The script's docstring, then every setting with its default and comment, and what the chosen preset changes."""
    chosen = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), scope.get("preset"))
    changes = presets.get(chosen, {}) if chosen in presets else {}
    comments = _setting_comments(scope.get("__file__", "")) if scope.get("__file__") else {}
    short = lambda v: (lambda r: r if len(r) <= 70 else r[:67] + "...")(repr(v))
    lines = [(scope.get("__doc__") or "").strip(), "",
             "settings: --key=value (Python literals; bare words are strings), --config=FILE (JSON, or `key = value` lines),",
             f"--preset=NAME (one of: {', '.join(presets) or 'none'}). Default, then [what preset {chosen!r} sets]:", ""]
    for k in keys:
        if k == "preset" or k.isupper():  # constants (PRESETS, TOY_TASKS, ...) are settable but not settings
            continue
        row = f"  --{k}={short(scope[k])}"
        if k in changes and changes[k] != scope[k]:
            row += f"   [{chosen}: {short(changes[k])}]"
        comment = comments.get(k, "")
        if comment:
            first, *rest = comment.split("\n")
            row = f"{row:<52} # {first}" if len(row) < 52 else f"{row}\n{'':52} # {first}"
            row += "".join(f"\n{'':52} # {r}" for r in rest)
        lines.append(row)
    return "\n".join(lines)


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string, e.g. --reward=ocr


def _set(scope, keys, key, value, where):
    if key not in keys:
        raise UserError(f"{where}: unknown config key {key!r}")
    old = scope[key]
    if old is not None and value is not None:
        if isinstance(old, bool) and not isinstance(value, bool):
            raise UserError(f"{where}: {key} must be True or False, got {value!r}")
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, (list, tuple)) and isinstance(value, (list, tuple)):
            value = type(old)(value)
        if type(value) is not type(old) and not (isinstance(old, str) and value is None):
            raise UserError(f"{where}: {key} must be a {type(old).__name__}, got {value!r}")
    scope[key] = value


# -----------------------------------------------------------------------------------------------
# 2. The MMDiT (Esser et al. 2024), written to load diffusers' SD3Transformer2DModel weights by name.
# Two token streams, image x and text c, each with its own weights, meet in one joint attention.
# Every block is modulated by adaLN-Zero from temb = embed(timestep) + embed(pooled text).
# SD3.5 adds a second, image-only attention (attn2) in its first 13 blocks and RMSNorm on q and k.
# Module names follow diffusers' so official weights load by name; the one difference is that each
# stream's q, k and v projections are fused into one matrix (to_qkv, add_qkv), see FUSED below.


class Linear(nn.Linear):
    """nn.Linear (possibly `parts` equal projections fused along the output) plus named LoRA adapters.

    Adapter `name` adds scale * B @ A @ x, with A: (parts*r, in) = [A_1; ...; A_parts] and
    B: (parts, out/parts, r), i.e. a separate rank-r update for each fused projection. At most one
    adapter is active at a time (`active`, set by set_adapter on the whole model), or none.
    """

    def __init__(self, in_features, out_features, bias=True, parts=1):
        super().__init__(in_features, out_features, bias=bias)
        self.parts = parts
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_scale = {}
        self.lora_has_part = {}  # adapter -> tuple of bools: which fused projections it targets
        self.active = None

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        name = self.active
        if name is None or name not in self.lora_A:
            return y
        # in the activations' dtype (bf16 on GPUs), as FSDP's mixed precision casts them: the same numerics
        # on one device and under FSDP; the fp32 weights stay the optimizer's master copy
        A, B = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype)
        h = F.linear(x, A)  # (..., parts * r)
        if self.parts == 1:
            delta = F.linear(h, B[0])
        else:  # block-diagonal B: part i of the output sees only part i of h
            lead = h.shape[:-1]
            h = h.reshape(-1, self.parts, B.shape[-1]).transpose(0, 1)  # (parts, N, r)
            delta = torch.bmm(h, B.transpose(1, 2)).transpose(0, 1).reshape(*lead, -1)
        return y + self.lora_scale[name] * delta


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return K.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Joint attention over [image tokens; text tokens] (with_context), or image-only (SD3.5's attn2).

    In the last block the text stream is not updated (context_pre_only): only image queries are needed.
    """

    def __init__(self, dim, heads, head_dim, qk_norm, with_context, context_pre_only=False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.context_pre_only = context_pre_only
        self.to_qkv = Linear(dim, 3 * inner, parts=3)
        self.to_out = nn.ModuleList([Linear(inner, dim)])  # "to_out.0", as diffusers names it
        self.norm_q = RMSNorm(head_dim) if qk_norm else None
        self.norm_k = RMSNorm(head_dim) if qk_norm else None
        if with_context:
            self.add_qkv = Linear(dim, 3 * inner, parts=3)
            self.norm_added_q = RMSNorm(head_dim) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim) if qk_norm else None
            self.to_add_out = None if context_pre_only else Linear(inner, dim)

    def _heads(self, qkv, norm_q, norm_k):
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D)
        if norm_q is not None:
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def forward(self, x, c=None):
        B, N, _ = x.shape
        q, k, v = self._heads(self.to_qkv(x), self.norm_q, self.norm_k)
        if c is None:
            out = F.scaled_dot_product_attention(q, k, v)
            return self.to_out[0](out.transpose(1, 2).reshape(B, N, -1))
        cq, ck, cv = self._heads(self.add_qkv(c), self.norm_added_q, self.norm_added_k)
        k, v = torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        if self.context_pre_only:
            out = F.scaled_dot_product_attention(q, k, v)
            return self.to_out[0](out.transpose(1, 2).reshape(B, N, -1)), None
        out = F.scaled_dot_product_attention(torch.cat([q, cq], dim=2), k, v)
        out = out.transpose(1, 2).reshape(B, out.shape[2], -1)
        return self.to_out[0](out[:, :N]), self.to_add_out(out[:, N:])


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear, named net.0.proj / net.2 as in diffusers."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), Linear(dim * mult, dim)])
        self.net[0].proj = Linear(dim, dim * mult)

    def forward(self, x):
        return self.net[2](K.gelu_tanh(self.net[0].proj(x)))


class AdaLN(nn.Module):
    """The modulation vectors of adaLN-Zero: n chunks of a linear map of silu(temb) (named norm*.linear)."""

    def __init__(self, dim, n):
        super().__init__()
        self.n = n
        self.linear = Linear(dim, n * dim)

    def forward(self, temb_silu):
        return self.linear(temb_silu)[:, None].chunk(self.n, dim=-1)  # each (B, 1, dim)


def _layer_norm(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class JointBlock(nn.Module):
    def __init__(self, dim, heads, head_dim, qk_norm, dual_attention, last):
        super().__init__()
        self.dual_attention, self.last = dual_attention, last
        self.norm1 = AdaLN(dim, 9 if dual_attention else 6)  # SD3.5's AdaLayerNormZeroX has 3 more for attn2
        self.norm1_context = AdaLN(dim, 2 if last else 6)  # the last block: AdaLayerNormContinuous (scale, shift)
        self.attn = Attention(dim, heads, head_dim, qk_norm, with_context=True, context_pre_only=last)
        self.attn2 = Attention(dim, heads, head_dim, qk_norm, with_context=False) if dual_attention else None
        self.ff = FeedForward(dim)
        self.ff_context = None if last else FeedForward(dim)

    def forward(self, x, c, temb_silu):
        if self.dual_attention:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = self.norm1(temb_silu)
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb_silu)
        # K.modulate(x, scale, shift) = LayerNorm(x) * (1 + scale) + shift; K.gated_residual(x, g, y) = x + g * y
        if self.last:
            c_scale, c_shift = self.norm1_context(temb_silu)  # note: scale first in AdaLayerNormContinuous
            c_mod = K.modulate(c, c_scale, c_shift)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb_silu)
            c_mod = K.modulate(c, c_scale_msa, c_shift_msa)
        x_attn, c_attn = self.attn(K.modulate(x, scale_msa, shift_msa), c_mod)
        x_in, x = x, K.gated_residual(x, gate_msa, x_attn)
        if self.dual_attention:  # SD3.5's attn2 sees the block's input, modulated by its own shift and scale
            x = K.gated_residual(x, gate_msa2, self.attn2(K.modulate(x_in, scale_msa2, shift_msa2)))
        x = K.gated_residual(x, gate_mlp, self.ff(K.modulate(x, scale_mlp, shift_mlp)))
        if self.last:
            return x, None
        c = K.gated_residual(c, c_gate_msa, c_attn)
        c = K.gated_residual(c, c_gate_mlp, self.ff_context(K.modulate(c, c_scale_mlp, c_shift_mlp)))
        return x, c


def sincos_pos_table(dim, grid, base_size):
    """SD3's 2-D sin-cos position table (grid x grid, dim), computed in float64 like diffusers."""
    pos = torch.arange(grid, dtype=torch.float64) / (grid / base_size)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    def embed_1d(p):  # (M,) -> (M, dim/2): [sin, cos]
        out = torch.outer(p, omega)
        return torch.cat([out.sin(), out.cos()], dim=1)
    gy, gx = torch.meshgrid(pos, pos, indexing="ij")  # row index = height
    return torch.cat([embed_1d(gx.reshape(-1)), embed_1d(gy.reshape(-1))], dim=1).float()


def timestep_embedding(t, dim=256):
    """Sinusoidal embedding of timestep = 1000 s, [cos, sin] order (flip_sin_to_cos, no frequency shift)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class PatchEmbed(nn.Module):
    def __init__(self, in_channels, dim, patch_size, max_size, base_size):
        super().__init__()
        self.patch_size, self.max_size = patch_size, max_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)  # applied as a matmul below
        self.register_buffer("pos_embed", sincos_pos_table(dim, max_size, base_size)[None])

    def forward(self, latents):
        B, C, H, W = latents.shape
        p = self.patch_size
        h, w = H // p, W // p
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"latent of {h}x{w} patches exceeds pos_embed_max_size={self.max_size}")
        patches = latents.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
        x = F.linear(patches, self.proj.weight.reshape(self.proj.weight.shape[0], -1), self.proj.bias)
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2  # the centre crop of the table
        pos = self.pos_embed.view(self.max_size, self.max_size, -1)[top:top + h, left:left + w].reshape(1, h * w, -1)
        return (x.float() + pos).to(x.dtype)


class Embedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    def __init__(self, dim, pooled_dim):
        super().__init__()
        self.timestep_embedder = Embedder(256, dim)
        self.text_embedder = Embedder(pooled_dim, dim)

    def forward(self, timestep, pooled):
        return self.timestep_embedder(timestep_embedding(timestep).to(pooled.dtype)) + self.text_embedder(pooled)


class SD3Transformer(nn.Module):
    """The MMDiT. `config` is diffusers' transformer/config.json (SD3: no dual attention, no qk norm)."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = dict(config)
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        if cfg.get("qk_norm") not in (None, "rms_norm"):
            raise ValueError(f"qk_norm={cfg['qk_norm']!r} is not an SD3/SD3.5 setting (None or 'rms_norm')")
        self.patch_size = cfg["patch_size"]
        self.out_channels = cfg.get("out_channels") or cfg["in_channels"]
        self.pos_embed = PatchEmbed(cfg["in_channels"], dim, cfg["patch_size"], cfg["pos_embed_max_size"],
                                    base_size=cfg["sample_size"] // cfg["patch_size"])
        self.time_text_embed = TimeTextEmbed(dim, cfg["pooled_projection_dim"])
        self.context_embedder = Linear(cfg["joint_attention_dim"], cfg["caption_projection_dim"])
        dual = set(cfg.get("dual_attention_layers") or ())
        n = cfg["num_layers"]
        self.transformer_blocks = nn.ModuleList([
            JointBlock(dim, cfg["num_attention_heads"], cfg["attention_head_dim"], cfg.get("qk_norm"), i in dual, i == n - 1)
            for i in range(n)])
        self.norm_out = AdaLN(dim, 2)
        self.proj_out = Linear(dim, self.patch_size ** 2 * self.out_channels)
        self.gradient_checkpointing = False

    def forward(self, latents, timestep, encoder_hidden_states, pooled_projections):
        """latents (B, C, H, W), timestep (B,) = 1000 s, text (B, L, joint_dim), pooled (B, P) -> velocity (B, C, H, W)."""
        B, _, H, W = latents.shape
        x = self.pos_embed(latents)
        temb_silu = F.silu(self.time_text_embed(timestep, pooled_projections))  # every adaLN starts with SiLU
        c = self.context_embedder(encoder_hidden_states)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, c = torch.utils.checkpoint.checkpoint(block, x, c, temb_silu, use_reentrant=False)
            else:
                x, c = block(x, c, temb_silu)
        scale, shift = self.norm_out(temb_silu)
        x = self.proj_out(K.modulate(x, scale, shift))
        p, h, w = self.patch_size, H // self.patch_size, W // self.patch_size
        x = x.reshape(B, h, w, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)  # unpatchify
        return x.reshape(B, self.out_channels, H, W)

    # -- adapters ---------------------------------------------------------------------------------
    def lora_layers(self):
        return {name: m for name, m in self.named_modules() if isinstance(m, Linear)}

    def set_adapter(self, name):
        """Make adapter `name` active in every layer that has it (None = the base model alone)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.active = name

    @contextmanager
    def adapter(self, name):
        previous = getattr(self, "_active", None)
        self._active = name
        self.set_adapter(name)
        try:
            yield
        finally:
            self._active = previous
            self.set_adapter(previous)

    def adapter_names(self):
        return sorted({n for m in self.lora_layers().values() for n in m.lora_A})

    def adapter_parameters(self, name):
        return [p for m in self.lora_layers().values() if name in m.lora_A for p in (m.lora_A[name], m.lora_B[name])]


# Official (diffusers) names of the projections fused in each of our modules.
FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "add_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
# Flow-GRPO's LoRA targets: the 8 projections of the joint attention of both streams (not attn2).
DEFAULT_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


def official_modules(model):
    """{official module name: (our Linear, part index)} for every Linear, fused or not."""
    out = {}
    for name, m in model.lora_layers().items():
        prefix, _, last = name.rpartition(".")
        if last in FUSED:
            for i, official in enumerate(FUSED[last]):
                out[f"{prefix}.{official}"] = (m, i)
        else:
            out[name] = (m, 0)
    return out


def to_official_state_dict(model):
    """Our base weights under diffusers' names (fused projections split again); adapters excluded."""
    out = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        prefix, module, kind = name.rsplit(".", 2) if name.count(".") >= 2 else ("", *name.split("."))
        if module in FUSED:
            for official, part in zip(FUSED[module], tensor.chunk(3, dim=0)):
                out[f"{prefix}.{official}.{kind}"] = part.contiguous()
        else:
            out[name] = tensor
    return out


def load_official_state_dict(model, state_dict):
    """Strict load of diffusers-named weights: a missing or unexpected key is an error naming it."""
    expected = to_official_state_dict(model)
    missing = [k for k in expected if k not in state_dict and k != "pos_embed.pos_embed"]  # the table is recomputable
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        what = (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} " if missing else "") + \
               (f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "")
        raise UserError(f"transformer weights do not match its config: {what.strip()}")
    for k, v in state_dict.items():
        if v.shape != expected[k].shape:
            raise UserError(f"transformer weight {k} has shape {tuple(v.shape)}, the config expects {tuple(expected[k].shape)}")
    ours = {}
    for name in model.state_dict():
        if ".lora_" in name:
            continue
        prefix, module, kind = name.rsplit(".", 2) if name.count(".") >= 2 else ("", *name.split("."))
        if module in FUSED:
            ours[name] = torch.cat([state_dict[f"{prefix}.{o}.{kind}"] for o in FUSED[module]], dim=0)
        elif name in state_dict:
            ours[name] = state_dict[name]
    model.load_state_dict(ours, strict=False)


def read_safetensors_folder(folder, stem="diffusion_pytorch_model"):
    """All tensors of `folder/stem.safetensors`, or of the shards listed in `stem.safetensors.index.json`."""
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index, "shard index", "re-download the model").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no 'weight_map' {{tensor: shard file}} in this index; re-download the model")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, f"{stem}.safetensors")):
        files = [f"{stem}.safetensors"]
    else:
        raise UserError(f"no {stem}.safetensors (or its .index.json) in {folder}")
    state = {}
    for f in files:
        path = os.path.join(folder, f)
        if not os.path.isfile(path):
            raise UserError(f"shard {path} listed in the index is missing; re-download the model")
        state.update(read_safetensors(path, "re-download the model (or re-save the weights)"))
    return state


def load_transformer(folder, device="cpu", dtype=torch.float32):
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"no transformer config at {config_path}")
    config = read_json(config_path, "transformer config", "re-download the model")
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: a transformer config is a JSON object; re-download the model")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            model = SD3Transformer(config)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{config_path}: not an SD3 transformer config ({type(e).__name__}: {_first_line(e)}); "
                        f"re-download the model") from None
    model = model.to_empty(device="cpu")
    model.pos_embed.pos_embed.copy_(sincos_pos_table(model.pos_embed.proj.out_channels, model.pos_embed.max_size,
                                                     config["sample_size"] // config["patch_size"])[None])
    load_official_state_dict(model, read_safetensors_folder(folder))
    table = model.pos_embed.pos_embed.float().clone()
    model = model.to(device=device, dtype=dtype)
    model.pos_embed.pos_embed = table.to(device)  # the position table stays fp32 (added in fp32, then cast)
    return model.eval().requires_grad_(False)


def save_transformer(model, folder):
    """Diffusers' layout: config.json + diffusion_pytorch_model.safetensors, official names (fp32 table)."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in to_official_state_dict(model).items()}
    _atomic(lambda p: save_file(state, p, metadata={"format": "pt"}), os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    config = {"_class_name": "SD3Transformer2DModel", **model.config}
    _atomic(lambda p: json.dump(config, open(p, "w"), indent=2), os.path.join(folder, "config.json"))


def init_weights_for_training_from_scratch(model, seed=0):
    """DiT-style init for pre-training: small random weights, zero adaLN modulation and output layer,
    so every block starts as the identity (adaLN-Zero) and the first velocity is 0."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.data.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(fan_in)))
        elif name.endswith(".bias"):
            p.data.zero_()
    for m in model.modules():
        if isinstance(m, AdaLN):
            m.linear.weight.data.zero_()
            m.linear.bias.data.zero_()
    model.proj_out.weight.data.zero_()
    model.proj_out.bias.data.zero_()


# -----------------------------------------------------------------------------------------------
# 3. LoRA adapters: create, read and write them in both public formats.
# peft:      adapter_model.safetensors (keys base_model.model.<module>.lora_A.weight) + adapter_config.json
# diffusers: pytorch_lora_weights.safetensors (keys transformer.<module>.lora_A.weight); diffusers takes
#            r / lora_alpha / target_modules only from the header metadata and assumes scale 1 without it.
# <module> is always the official diffusers name (to_q, not our fused to_qkv).


def _matches(module_name, targets):
    return any(module_name == t or module_name.endswith("." + t) for t in targets)  # peft's rule


def _target_patterns(module_names):
    """Compact peft target_modules for a set of module names: the name without 'transformer_blocks.N.'."""
    pats = set()
    for n in module_names:
        parts = n.split(".")
        pats.add(".".join(parts[2:]) if parts[0] == "transformer_blocks" else n)
    return sorted(pats)


def add_adapter(model, name, rank=32, alpha=64.0, targets=DEFAULT_LORA_TARGETS, seed=0, trainable=True):
    """A fresh LoRA: A ~ N(0, 1/r^2) (peft's "gaussian" init), B = 0, so the model's output is unchanged."""
    if not name.isidentifier():
        raise ValueError(f"adapter name must be an identifier, got {name!r}")
    g = torch.Generator().manual_seed(seed)
    per_layer = {}
    for official, (layer, part) in official_modules(model).items():
        if _matches(official, targets):
            per_layer.setdefault(layer, set()).add(part)
    if not per_layer:
        raise UserError(f"LoRA targets {targets} match no layer of the transformer")
    for layer, parts in per_layer.items():
        A = torch.randn(layer.parts * rank, layer.in_features, generator=g) / rank
        for p in set(range(layer.parts)) - parts:
            A[p * rank:(p + 1) * rank] = 0
        B = torch.zeros(layer.parts, layer.out_features // layer.parts, rank)
        _attach(layer, name, A, B, alpha / rank, parts, trainable)
    return sum(_lora_numel(layer, name) for layer in per_layer)


def _attach(layer, name, A, B, scale, parts, trainable):
    device = layer.weight.device
    layer.lora_A[name] = nn.Parameter(A.float().to(device), requires_grad=trainable)
    layer.lora_B[name] = nn.Parameter(B.float().to(device), requires_grad=trainable)
    layer.lora_scale[name] = float(scale)
    layer.lora_has_part[name] = tuple(p in parts for p in range(layer.parts))
    if trainable and len(parts) < layer.parts:  # keep untargeted fused projections at exactly zero
        r = B.shape[-1]
        mask_A = torch.tensor([p in parts for p in range(layer.parts)], device=device).repeat_interleave(r)[:, None]
        mask_B = torch.tensor([p in parts for p in range(layer.parts)], device=device)[:, None, None]
        layer.lora_A[name].register_hook(lambda g: g * mask_A)
        layer.lora_B[name].register_hook(lambda g: g * mask_B)


def _lora_numel(layer, name):
    r = layer.lora_B[name].shape[-1]
    return sum(r * (layer.in_features + layer.out_features // layer.parts) for has in layer.lora_has_part[name] if has)


def remove_adapter(model, name):
    for layer in model.lora_layers().values():
        if name in layer.lora_A:
            del layer.lora_A[name], layer.lora_B[name]
            layer.lora_scale.pop(name), layer.lora_has_part.pop(name)
            if layer.active == name:
                layer.active = None


def _full(t):
    """The whole tensor of a parameter, also when FSDP2 holds only this rank's shard (a DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adapter_state(model, name):
    """{official module: (A (r, in), B (out, r), scale)} for adapter `name` (collective under FSDP). A copy:
    on the CPU .float().cpu() would be a view of the live parameter, and a snapshot taken with the EMA
    swapped in would turn back into the trained weights when the swap is undone."""
    out = {}
    for official, (layer, part) in official_modules(model).items():
        if name in layer.lora_A and layer.lora_has_part[name][part]:
            A, B = _full(layer.lora_A[name].detach()), _full(layer.lora_B[name].detach())
            r = B.shape[-1]
            out[official] = (A[part * r:(part + 1) * r].to("cpu", torch.float32, copy=True),
                             B[part].to("cpu", torch.float32, copy=True), layer.lora_scale[name])
    if not out:
        raise ValueError(f"no adapter named {name!r} on the model")
    return out


def set_adapter_state(model, name, state, trainable=False):
    """Attach adapter `name` from {official module: (A, B, scale)}; errors name the first key that does not fit."""
    modules = official_modules(model)
    per_layer = {}
    for official, (A, B, scale) in state.items():
        if official not in modules:
            raise UserError(f"adapter key {official!r} names no layer of this transformer (an adapter for another model?)")
        layer, part = modules[official]
        in_f, out_f = layer.in_features, layer.out_features // layer.parts
        if A.shape[1] != in_f or B.shape[0] != out_f or A.shape[0] != B.shape[1]:
            raise UserError(f"adapter {official}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a "
                            f"{in_f}->{out_f} layer (an adapter for another model?)")
        per_layer.setdefault(layer, {})[part] = (A, B, scale)
    remove_adapter(model, name)
    for layer, parts in per_layer.items():
        ranks = {A.shape[0] for A, _, _ in parts.values()}
        scales = {s for _, _, s in parts.values()}
        r = max(ranks)
        uniform = len(ranks) == 1 and len(scales) == 1
        A_all = torch.zeros(layer.parts * r, layer.in_features)
        B_all = torch.zeros(layer.parts, layer.out_features // layer.parts, r)
        for p, (A, B, s) in parts.items():  # ranks or scales that differ between fused parts: fold s into B
            A_all[p * r:p * r + A.shape[0]] = A.float()
            B_all[p, :, :A.shape[0]] = B.float() * (1.0 if uniform else s)
        _attach(layer, name, A_all, B_all, next(iter(scales)) if uniform else 1.0, set(parts), trainable)


def save_adapter(model, name, folder, format="peft", base_model="", state=None):
    """Write adapter `name` (or a given state) as peft or diffusers files. Rank 0 writes; all ranks must call."""
    state = adapter_state(model, name) if state is None else state
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    write_adapter(state, folder, format, base_model)


def write_adapter(state, folder, format="peft", base_model=""):
    ranks = {A.shape[0] for A, _, _ in state.values()}
    scales = {s for _, _, s in state.values()}
    r = max(ranks)
    if len(scales) != 1:  # the formats hold one scale per rank: fold differing per-layer scales into B
        state = {k: (A, B * s, 1.0) for k, (A, B, s) in state.items()}
    scale = next(iter(state.values()))[2]
    alpha = scale * r
    rank_pattern = {k: A.shape[0] for k, (A, _, _) in state.items() if A.shape[0] != r}
    alpha_pattern = {k: scale * A.shape[0] for k, (A, _, _) in state.items() if A.shape[0] != r}
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": _target_patterns(state),
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "lora_dropout": 0.0, "bias": "none",
              "init_lora_weights": "gaussian", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
              "inference_mode": True, "modules_to_save": None, "task_type": None, "base_model_name_or_path": base_model}
    os.makedirs(folder, exist_ok=True)
    if format == "peft":
        tensors = {f"base_model.model.{k}.lora_{ab}.weight": t.contiguous()
                   for k, (A, B, _) in state.items() for ab, t in (("A", A), ("B", B))}
        _atomic(lambda p: save_file(tensors, p, metadata={"format": "pt"}), os.path.join(folder, "adapter_model.safetensors"))
        _atomic(lambda p: json.dump(config, open(p, "w"), indent=2), os.path.join(folder, "adapter_config.json"))
    elif format == "diffusers":
        tensors = {f"transformer.{k}.lora_{ab}.weight": t.contiguous()
                   for k, (A, B, _) in state.items() for ab, t in (("A", A), ("B", B))}
        meta = {f"transformer.{k}": v for k, v in config.items() if k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "lora_dropout", "bias", "use_dora", "use_rslora")}
        header = {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True), "base_model": base_model}
        _atomic(lambda p: save_file(tensors, p, metadata=header), os.path.join(folder, "pytorch_lora_weights.safetensors"))
    else:
        raise ValueError(f"adapter format must be 'peft' or 'diffusers', got {format!r}")


def read_adapter(path):
    """Read an adapter folder or file in either public format (or a hub id) -> ({module: (A, B, scale)}, info)."""
    path = resolve_path(path, what="adapter", allow_patterns=["*.safetensors", "*.json"])
    if os.path.isdir(path) and not os.path.isdir(os.path.join(path, "adapter")) and latest_checkpoint(path):
        path = latest_checkpoint(path)  # a run's folder: its newest checkpoint
    if os.path.isdir(os.path.join(path, "adapter")):  # a checkpoint folder: its adapter
        path = os.path.join(path, "adapter")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    files = [path] if os.path.isfile(path) else \
        [os.path.join(folder, f) for f in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors") if os.path.isfile(os.path.join(folder, f))]
    if not files:
        raise UserError(f"{path}: no adapter_model.safetensors (peft) or pytorch_lora_weights.safetensors (diffusers) there")
    file = files[0]
    fix = "re-create the adapter (or re-download it)"
    tensors, header = read_safetensors(file, fix, metadata=True)
    config, where = {}, file
    peft_config = os.path.join(os.path.dirname(file), "adapter_config.json")
    if os.path.isfile(peft_config) and os.path.basename(file) == "adapter_model.safetensors":
        config = read_json(peft_config, "adapter config", fix)
        where = peft_config
    elif "lora_adapter_metadata" in header:
        meta = _parse_json(header["lora_adapter_metadata"], f"{file} (header lora_adapter_metadata)", fix)
        config = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith("transformer.")} if isinstance(meta, dict) else None
        where = f"{file} (header lora_adapter_metadata)"
    if not isinstance(config, dict) or not all(isinstance(config.get(k, {}), dict) for k in ("alpha_pattern", "rank_pattern")) \
            or not all(isinstance(config.get(k, 1), (int, float)) and not isinstance(config.get(k, 1), bool) and config.get(k, 1) > 0
                       for k in ("r", "lora_alpha")):
        raise UserError(f"{where}: not a LoRA config (r and lora_alpha positive numbers, rank_pattern and alpha_pattern "
                        f"objects); {fix}")
    if config.get("use_dora"):
        raise UserError(f"{path}: DoRA adapters are not supported")
    pairs = {}
    for key, t in tensors.items():
        k = key.replace(".default.", ".")
        for prefix in ("base_model.model.", "transformer."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"):
            pairs.setdefault(k[:-len(".lora_A.weight")], {})[k[-8]] = t
        elif not k.endswith(".alpha"):
            raise UserError(f"{path}: unexpected key {key!r} (not a LoRA of an SD3 transformer)")
    state = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"{path}: {module} has lora_{'B' if 'A' in ab else 'A'} missing")
        if ab["A"].ndim != 2 or ab["B"].ndim != 2 or ab["A"].shape[0] != ab["B"].shape[1] or not ab["A"].is_floating_point() \
                or not ab["B"].is_floating_point():
            raise UserError(f"{file}: {module} has lora_A {tuple(ab['A'].shape)} {ab['A'].dtype} and lora_B {tuple(ab['B'].shape)} "
                            f"{ab['B'].dtype}, not a LoRA pair (floating point, (r, in) and (out, r)); {fix}")
        r = ab["A"].shape[0]
        alpha = config.get("alpha_pattern", {}).get(module, config.get("lora_alpha", r))  # no metadata: scale 1, as diffusers
        r_cfg = config.get("rank_pattern", {}).get(module, r)
        try:
            scale = alpha / math.sqrt(r_cfg) if config.get("use_rslora") else alpha / r_cfg
        except (TypeError, ValueError, ZeroDivisionError):
            raise UserError(f"{where}: the rank or alpha of {module} ({r_cfg!r}, {alpha!r}) is not a positive number; {fix}") from None
        state[module] = (ab["A"].float(), ab["B"].float(), float(scale))
    info = {"base_model": config.get("base_model_name_or_path", header.get("base_model", "")), "file": file}
    return state, info


def merge_adapters(states, weights, rank=0, naive=False):
    """Combine K adapters into one (METHOD 4, merge). The default is exact: dW = sum_k w_k s_k B_k A_k is
    the rank-(sum r_k) adapter B = [w_1 s_1 B_1, ..., w_K s_K B_K], A = [A_1; ...; A_K] (scale 1).
    rank > 0: the best rank-r approximation of that dW per layer (truncated SVD, Eckart-Young).
    naive: the reference code's average of A and B separately (scale of the first), for comparison only.
    Returns (merged state, {module: relative Frobenius error of the merged dW against the exact one})."""
    keys = set(states[0])
    for k, s in enumerate(states[1:], 1):
        if set(s) != keys:
            diff = sorted(keys.symmetric_difference(s))
            raise UserError(f"adapters 0 and {k} target different layers (first difference: {diff[0]})")
        for m in keys:
            if s[m][0].shape[1] != states[0][m][0].shape[1] or s[m][1].shape[0] != states[0][m][1].shape[0]:
                raise UserError(f"adapters 0 and {k} differ in the shape of {m} (adapters of different base models?)")
    merged, errors = {}, {}
    for m in sorted(keys):
        exact = sum(w * s[m][2] * s[m][1].double() @ s[m][0].double() for w, s in zip(weights, states))
        if naive:
            if len({s[m][0].shape[0] for s in states}) != 1:
                raise UserError(f"naive merge needs equal ranks; {m} differs")
            A = sum(w * s[m][0].double() for w, s in zip(weights, states)) / sum(weights)
            B = sum(w * s[m][1].double() for w, s in zip(weights, states))
            merged[m] = (A.float(), B.float(), states[0][m][2])
        elif rank:
            U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
            r = min(rank, len(S))
            merged[m] = ((Vh[:r]).float(), (U[:, :r] * S[:r]).float(), 1.0)
        else:
            A = torch.cat([s[m][0].double() for s in states])
            B = torch.cat([w * s[m][2] * s[m][1].double() for w, s in zip(weights, states)], dim=1)
            merged[m] = (A.float(), B.float(), 1.0)
        A, B, sc = merged[m]
        errors[m] = ((sc * B.double() @ A.double() - exact).norm() / exact.norm().clamp_min(1e-30)).item()
    return merged, errors


def load_adapter(model, name, path, trainable=False):
    state, info = read_adapter(path)
    set_adapter_state(model, name, state, trainable=trainable)
    return info


def adapter_delta(state):
    """The dense weight update of each module, scale * B @ A, in float64 (for merges and tests)."""
    return {k: s * B.double() @ A.double() for k, (A, B, s) in state.items()}


# -----------------------------------------------------------------------------------------------
# 4. Text conditioning and codecs.


class TextEncoders:
    """SD3's text conditioning (SD35.md "Text layout"): CLIP-L and CLIP-G penultimate hidden states,
    concatenated on features (768 + 1280) and zero-padded to the T5 width (4096), then concatenated on
    the sequence with T5's tokens; pooled = CLIP-L pooled ++ CLIP-G pooled (the projected text_embeds).
    Frozen, eval mode; a cache keyed by prompt (groups repeat prompts; the empty negative prompt is
    encoded once); offload() moves the encoders to the CPU once all prompts are encoded. Each prompt is
    encoded alone: batched, an embedding's last bits would depend on the prompts that shared its batch, so
    on what the cache held, and a resumed run (whose cache starts empty) would not be bitwise the uninterrupted one."""

    def __init__(self, clip_l, clip_g, t5, tokenizers, t5_length, joint_dim, device, cache_budget=1 << 30):
        self.encoders = [clip_l.eval().requires_grad_(False), clip_g.eval().requires_grad_(False),
                         t5.eval().requires_grad_(False) if t5 is not None else None]
        self.tokenizers = tokenizers
        self.t5_length, self.joint_dim, self.device = t5_length, joint_dim, torch.device(device)
        self.cache, self.cache_bytes, self.cache_budget = {}, 0, cache_budget  # 1 GiB: ~600 SD3.5 prompts
        self.dtype = clip_l.dtype

    @torch.no_grad()
    def _encode(self, prompts):
        hidden, pooled = [], []
        for enc, tok in zip(self.encoders[:2], self.tokenizers[:2]):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            out = enc(ids.to(enc.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, self.joint_dim - clip.shape[-1]))
        if self.encoders[2] is not None:
            ids = self.tokenizers[2](prompts, padding="max_length", max_length=self.t5_length, truncation=True,
                                     add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.encoders[2](ids.to(self.encoders[2].device))[0].to(clip.dtype)
        else:  # SD3 without T5: zeros in its place
            t5 = clip.new_zeros(len(prompts), self.t5_length, self.joint_dim)
        return torch.cat([clip, t5.to(clip.device)], dim=1).to(self.device), torch.cat(pooled, dim=-1).to(self.device)

    def encode(self, prompts):
        """list of prompts -> (embeds (B, L, joint_dim), pooled (B, P)) on self.device. Every prompt is encoded
        alone (a batch of one), so its embedding is the same whatever else is encoded with it or cached."""
        todo = sorted({p for p in prompts if p not in self.cache})
        fresh = {}
        for p in todo:
            embeds, pooled = self._encode([p])
            fresh[p] = (embeds[0], pooled[0])
        found = [fresh[p] if p in fresh else self.cache[p] for p in prompts]
        for p, value in fresh.items():  # then remember the new ones, forgetting the oldest beyond the budget
            self.cache[p] = value
            self.cache_bytes += sum(t.numel() * t.element_size() for t in value)
            while self.cache_bytes > self.cache_budget and len(self.cache) > 1:
                self.cache_bytes -= sum(t.numel() * t.element_size() for t in self.cache.pop(next(iter(self.cache))))
        return torch.stack([e for e, _ in found]), torch.stack([q for _, q in found])

    def clear(self):
        """Forget the cached embeddings (to free memory; an encoding never depends on the cache)."""
        self.cache, self.cache_bytes = {}, 0

    def offload(self):
        for enc in self.encoders:
            if enc is not None:
                enc.to("cpu")

    def to(self, device):
        for enc in self.encoders:
            if enc is not None:
                enc.to(device)
        return self


class VAECodec:
    """diffusers' AutoencoderKL: latent = (z - shift_factor) * scaling_factor (METHOD 1)."""

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        self.scaling, self.shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
        self.channels = vae.config.latent_channels
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def decode(self, latents):
        """latents -> images in [0, 1], (B, 3, H, W) float32."""
        z = latents.to(self.vae.dtype) / self.scaling + self.shift
        return (self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images):
        """images in [0, 1] -> latents (the posterior mean: deterministic)."""
        z = self.vae.encode(images.to(self.vae.dtype) * 2 - 1).latent_dist.mode()
        return ((z - self.shift) * self.scaling).float()

    def to(self, device):
        self.vae.to(device)
        return self


class PixelCodec:
    """The toy world's codec: pixels in [-1, 1] rearranged by space-to-depth (factor f: 3 f^2 channels).
    Lossless, so the transformer sees the image itself; it stands where SD3's VAE stands."""

    def __init__(self, factor=2, scaling_factor=1.0, shift_factor=0.0):
        self.factor, self.scaling, self.shift = factor, scaling_factor, shift_factor
        self.channels = 3 * factor ** 2

    def decode(self, latents):
        return ((F.pixel_shuffle(latents.float() / self.scaling + self.shift, self.factor) + 1) / 2).clamp(0, 1)

    def encode(self, images):
        return (F.pixel_unshuffle(images.float() * 2 - 1, self.factor) - self.shift) * self.scaling

    def to(self, device):
        return self

    def config(self):
        return {"_class_name": "PixelShuffleCodec", "factor": self.factor, "scaling_factor": self.scaling, "shift_factor": self.shift}


def to_uint8(images):
    """[0, 1] float images (B, 3, H, W) -> uint8 (B, 3, H, W), rounded as the reward code expects."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


# -----------------------------------------------------------------------------------------------
# 5. Pipelines: a local diffusers-layout folder or a hub id; tiny random ones for tests and the toy world.


def resolve_path(path, what="model", allow_patterns=None):
    """A local file/folder as is; otherwise a hub id, fetched (or found in the local cache) with huggingface_hub."""
    if os.path.exists(path):
        return path
    if path.count("/") != 1 or path.startswith((".", "/")):
        raise UserError(f"{what} {path!r} not found: no such local path (and it is not a hub id like owner/name)")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=allow_patterns, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
    except Exception as e:
        raise UserError(f"{what} {path!r} is not a local path and could not be fetched from the hub "
                        f"({type(e).__name__}). Pre-download it on a machine with access "
                        f"(`hf download {path} --local-dir DIR`, accepting its license on the hub first if gated) "
                        f"and pass DIR instead") from None


@dataclass
class Pipeline:
    transformer: SD3Transformer
    text: TextEncoders
    codec: object
    shift: float  # the schedule's shift (3.0 for SD3.5-M)
    path: str

    def latent_shape(self, resolution):
        return (self.codec.channels, resolution // self.codec.factor, resolution // self.codec.factor)


def _from_pretrained(what, folder, load):
    """A diffusers / transformers from_pretrained call whose failure on a missing or corrupt file is one line."""
    try:
        return load()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{folder}: cannot load the {what} ({type(e).__name__}: {_first_line(e)}); "
                        f"re-download the model or repair this folder") from None


def load_codec(folder, device="cpu", dtype=torch.float32):
    cfg = read_json(os.path.join(folder, "config.json"), "codec config", "re-download the model")
    if isinstance(cfg, dict) and cfg.get("_class_name") == "PixelShuffleCodec":
        return _from_pretrained("pixel codec", folder, lambda: PixelCodec(cfg["factor"], cfg.get("scaling_factor", 1.0), cfg.get("shift_factor", 0.0)))
    from diffusers import AutoencoderKL
    return VAECodec(_from_pretrained("VAE", folder, lambda: AutoencoderKL.from_pretrained(folder, torch_dtype=dtype).to(device)))


def load_text_encoders(path, device="cpu", dtype=torch.float32, t5_length=128):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    index = read_json(os.path.join(path, "model_index.json"), "pipeline index", "re-download the model")
    sub = lambda name: os.path.join(path, name)
    load = lambda cls, name: _from_pretrained(name.replace("_", " "), sub(name), lambda: cls.from_pretrained(sub(name), dtype=dtype).to(device))
    clip_l = load(CLIPTextModelWithProjection, "text_encoder")
    clip_g = load(CLIPTextModelWithProjection, "text_encoder_2")
    has_t5 = (index.get("text_encoder_3") or [None])[0] is not None and os.path.isdir(sub("text_encoder_3"))
    t5 = load(T5EncoderModel, "text_encoder_3") if has_t5 else None
    tokenizers = [_from_pretrained(name, sub(name), lambda name=name: AutoTokenizer.from_pretrained(sub(name)))
                  for name in ("tokenizer", "tokenizer_2", "tokenizer_3")[:3 if has_t5 else 2]] + ([] if has_t5 else [None])
    joint_dim = read_json(sub(os.path.join("transformer", "config.json")), "transformer config", "re-download the model")["joint_attention_dim"]
    return TextEncoders(clip_l, clip_g, t5, tokenizers, t5_length, joint_dim, device)


def load_pipeline(path, device="cpu", dtype=torch.float32, text_dtype=None, vae_dtype=torch.float32, t5_length=128,
                  text_encoders=True):
    """Load an SD3 / SD3.5 pipeline folder in diffusers' layout (or a hub id) onto one device."""
    path = resolve_path(path, "model", allow_patterns=["*.json", "*.txt", "*.model", "transformer/*.safetensors",
                                                       "text_encoder*/*.safetensors", "vae/*.safetensors", "tokenizer*/*"])
    for sub in ("transformer", "vae", "scheduler"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise UserError(f"{path} is not an SD3 pipeline folder: {sub}/ is missing (expected diffusers' layout)")
    transformer = load_transformer(os.path.join(path, "transformer"), device, dtype)
    text = load_text_encoders(path, device, text_dtype or dtype, t5_length) if text_encoders else None
    codec = load_codec(os.path.join(path, "vae"), device, vae_dtype)
    sched = read_json(os.path.join(path, "scheduler", "scheduler_config.json"), "scheduler config", "re-download the model")
    return Pipeline(transformer, text, codec, float(sched.get("shift", 1.0)), path)


def tiny_tokenizers(words=(), clip_length=77):
    """Offline tokenizers of the official classes. CLIP: byte-level BPE vocab (the 256 byte symbols, each
    also with </w>) plus, for every word in `words`, the merges that make it one token; T5: a unigram
    vocab of the printable characters plus the given words (so toy captions are a few tokens long)."""
    import string
    from transformers import CLIPTokenizer, T5Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    specials = {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    merges = []
    for w in sorted(set(words), key=lambda w: (len(w), w)):
        # BPE applies the lowest-ranked merge first, so earlier merges may split the word differently
        # than letter by letter: tokenize it with the merges so far, then join those pieces left to right.
        tok = CLIPTokenizer(vocab={**vocab, **{k: len(vocab) + i for i, k in enumerate(specials)}}, merges=merges)
        pieces = tok.tokenize(w)
        cur = pieces[0]
        for s in pieces[1:]:
            merges.append((cur, s))
            vocab.setdefault(cur + s, len(vocab))
            cur = cur + s
    vocab.update({k: len(vocab) + i for i, k in enumerate(specials)})
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=clip_length)
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + \
               [(c, -5.0) for c in string.printable if not c.isspace()] + [("\u2581" + w, -1.0) for w in sorted(set(words))]
    t5 = T5Tokenizer(vocab=t5_vocab, extra_ids=0)
    return clip, t5


def build_tiny_pipeline(folder, *, num_layers=2, heads=2, head_dim=8, dual_attention_layers=(0,), qk_norm="rms_norm",
                        sample_size=8, patch_size=2, latent_channels=4, codec="vae", pixel_factor=2, words=(),
                        clip_length=77, clip_dims=(16, 24), joint_dim=48, seed=0, shard_size=None, pixel_scaling=1.0, pixel_shift=0.0):
    """Random components of the official classes, written in diffusers' layout so tests (and the toy world)
    load them back through load_pipeline, and diffusers' StableDiffusion3Pipeline can load them too."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    import diffusers
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    in_channels = latent_channels if codec == "vae" else 3 * pixel_factor ** 2
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=patch_size, in_channels=in_channels, out_channels=in_channels,
        num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=clip_dims[0] // 2 + clip_dims[1] // 2,
        pos_embed_max_size=sample_size // patch_size * 2, dual_attention_layers=tuple(dual_attention_layers), qk_norm=qk_norm)
    transformer.save_pretrained(os.path.join(folder, "transformer"), max_shard_size=shard_size or "10GB")
    clip_tok, t5_tok = tiny_tokenizers(words, clip_length)
    eos = clip_tok.convert_tokens_to_ids("<|endoftext|>")
    bos = clip_tok.convert_tokens_to_ids("<|startoftext|>")
    for i, (sub, width) in enumerate((("text_encoder", clip_dims[0]), ("text_encoder_2", clip_dims[1]))):
        cfg = CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=clip_length, projection_dim=width // 2,
                             eos_token_id=eos, bos_token_id=bos, pad_token_id=eos)
        CLIPTextModelWithProjection(cfg).save_pretrained(os.path.join(folder, sub))
        clip_tok.save_pretrained(os.path.join(folder, "tokenizer" if i == 0 else "tokenizer_2"))
    t5_cfg = T5Config(vocab_size=len(t5_tok), d_model=joint_dim, d_kv=8, d_ff=2 * joint_dim, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5EncoderModel(t5_cfg).save_pretrained(os.path.join(folder, "text_encoder_3"))
    t5_tok.save_pretrained(os.path.join(folder, "tokenizer_3"))
    if codec == "vae":
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=latent_channels, norm_num_groups=4, sample_size=sample_size * 2,
                            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
                            mid_block_add_attention=True)
        vae.save_pretrained(os.path.join(folder, "vae"))
    else:
        os.makedirs(os.path.join(folder, "vae"), exist_ok=True)
        json.dump(PixelCodec(pixel_factor, pixel_scaling, pixel_shift).config(), open(os.path.join(folder, "vae", "config.json"), "w"), indent=2)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(os.path.join(folder, "scheduler"))
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", "SD3Transformer2DModel"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "vae": ["diffusers", "AutoencoderKL"] if codec == "vae" else ["model", "PixelShuffleCodec"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5Tokenizer"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    json.dump(index, open(os.path.join(folder, "model_index.json"), "w"), indent=2)
    return folder


# -----------------------------------------------------------------------------------------------
# 6. Samplers (METHOD 1-2). All SDE arithmetic is float32, whatever the network's dtype.


def sigma_schedule(num_steps, shift=3.0):
    """T shifted noise levels from 1 downwards, then the terminal 0 (T + 1 values), exactly as diffusers'
    FlowMatchEulerDiscreteScheduler.set_timesteps(T): the unshifted grid runs from 1 to the scheduler's
    sigma_min (1/1000 shifted), and each u maps to s = shift u / (1 + (shift - 1) u)."""
    u_min = float(np.float32(shift * 1e-3) / np.float32(1 + (shift - 1) * 1e-3))
    u = np.linspace(1.0, u_min, num_steps)
    s = shift * u / (1 + (shift - 1) * u)
    return torch.cat([torch.from_numpy(s).float(), torch.zeros(1)])


def compute_dtype(transformer):
    return getattr(transformer, "compute_dtype", None) or next(transformer.parameters()).dtype


def predict_velocity(transformer, latents, sigma, embeds, pooled, neg_embeds=None, neg_pooled=None, guidance=1.0):
    """The (guided) velocity in float32: v = v_u + g (v_c - v_u), both branches in one doubled batch.
    Under CFG the policy is the guided velocity (METHOD 1); gradients flow through both branches."""
    B = latents.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).expand(B)
    dtype = compute_dtype(transformer)
    if guidance == 1.0 or neg_embeds is None:
        return transformer(latents.to(dtype), 1000 * sigma, embeds.to(dtype), pooled.to(dtype)).float()
    v = transformer(torch.cat([latents, latents]).to(dtype), torch.cat([1000 * sigma, 1000 * sigma]),
                    torch.cat([neg_embeds, embeds]).to(dtype), torch.cat([neg_pooled, pooled]).to(dtype)).float()
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


def _f32(t):
    """At least float32 (bf16/fp16 network outputs are upcast; float64 stays, for the reference tests)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _per_sample(value, like):
    return torch.as_tensor(value, device=like.device).to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def sde_std(sigma, sigma_max, noise_level):
    """std(s) = a sqrt(s / (1 - s)), with s_max (the schedule's second value) in the denominator at s = 1."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.as_tensor(sigma_max, dtype=torch.float32), sigma)))


def sde_mean(latents, velocity, sigma, sigma_next, std):
    """METHOD 2: mean = x + [v + std^2 / (2 s) (x + (1 - s) v)] dt, dt = s_next - s < 0."""
    x, v = _f32(latents), _f32(velocity)
    s, s_next, std = _per_sample(sigma, x), _per_sample(sigma_next, x), _per_sample(std, x)
    return x + (v + std ** 2 / (2 * s) * (x + (1 - s) * v)) * (s_next - s)


def gaussian_log_prob(x, mean, std):
    """log N(x; mean, std^2 I) per element, reduced by the MEAN over latent elements (the reference's
    convention, which its PPO clip range 1e-4 was tuned for). std broadcasts per sample."""
    x = _f32(x)
    std = _per_sample(std, x)
    lp = -((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def sde_step(latents, velocity, sigma, sigma_next, sigma_max, noise_level, noise=None, next_latents=None):
    """One Flow-GRPO SDE step: x_next ~ N(mean, std^2 |dt| I). Returns (x_next, log_prob, mean, step_std)
    where step_std = std sqrt(|dt|); pass next_latents to score a stored transition instead of sampling."""
    std = sde_std(sigma, sigma_max, noise_level).to(latents.device)
    mean = sde_mean(latents, velocity, sigma, sigma_next, std)
    step_std = std * torch.sqrt(torch.as_tensor(sigma, device=latents.device) - torch.as_tensor(sigma_next, device=latents.device))
    if next_latents is None:
        next_latents = mean + _per_sample(step_std, mean) * noise
    return next_latents, gaussian_log_prob(next_latents, mean, step_std), mean, step_std


def ode_step(latents, velocity, sigma, sigma_next):
    """Euler: x_next = x + (s_next - s) v."""
    x = _f32(latents)
    return x + (_per_sample(sigma_next, x) - _per_sample(sigma, x)) * _f32(velocity)


def sample_noise(shape, seeds, device):
    """One N(0, I) draw per sample from its own seeded generator: a sample is reproducible whatever
    batch or rank it lands in."""
    gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens]), gens


@dataclass
class Rollout:
    latents: torch.Tensor    # (B, T + 1, C, H, W) float32: pure noise x_0, ..., the final sample x_T
    log_probs: torch.Tensor  # (B, T) log-prob of each stored transition under the sampling policy (0 where ODE)
    sigmas: torch.Tensor     # (T + 1,) noise levels; step j goes from sigmas[j] to sigmas[j + 1]
    sde_steps: int           # steps 0 .. sde_steps - 1 were stochastic (the last step is always the ODE step)
    means: torch.Tensor = None  # (B, T, C, H, W) the sampling policy's transition means (keep=True)


@torch.no_grad()
def rollout(transformer, embeds, pooled, neg_embeds, neg_pooled, latent_shape, seeds, num_steps, shift, guidance,
            noise_level=0.7, sde=True, keep=True, sde_steps=None, init_seeds=None):
    """Sample a batch (METHOD 2): SDE steps with their log-probs (sde=True), the final step and sde=False
    (evaluation) by the ODE. sde_steps=k: only the first k steps by the SDE, the rest by the ODE (an SDE
    window as in Flow-GRPO-Fast: steps that are not trained add no noise to the reward); default T - 1.
    init_seeds: the starting noise from these seeds instead (one per group: the group's samples then
    differ only by their SDE noise, the part of the randomness the log-probs credit, as in DanceGRPO).
    keep=False keeps only the final latents (in .latents[:, -1])."""
    device = embeds.device
    sigmas = sigma_schedule(num_steps, shift).to(device)
    x, gens = sample_noise(latent_shape, seeds, device)
    if init_seeds is not None:
        x = sample_noise(latent_shape, init_seeds, device)[0]
    latents, log_probs, means = [x], [], []
    window = num_steps - 1 if sde_steps is None else min(sde_steps, num_steps - 1)
    sde_steps = window if sde and noise_level > 0 else 0
    for j in range(num_steps):
        v = predict_velocity(transformer, x, sigmas[j], embeds, pooled, neg_embeds, neg_pooled, guidance)
        if j < sde_steps:
            noise = torch.stack([torch.randn(latent_shape, generator=g, device=device) for g in gens])
            x, lp, mean, _ = K.sde_step(x, v, sigmas[j], sigmas[j + 1], sigmas[1], noise_level, noise)  # sde_step's twin
        else:
            x = mean = ode_step(x, v, sigmas[j], sigmas[j + 1])
            lp = torch.zeros(len(x), device=device)
        log_probs.append(lp)
        if keep:
            latents.append(x)
            means.append(mean)
    if not keep:
        return Rollout(x[:, None], torch.stack(log_probs, 1), sigmas, sde_steps)
    return Rollout(torch.stack(latents, 1), torch.stack(log_probs, 1), sigmas, sde_steps, torch.stack(means, 1))


def step_distribution(transformer, latents, sigma, sigma_next, sigma_max, noise_level, cond, neg, guidance):
    """The policy's Gaussian transition at a stored state, with gradient: (mean, step_std, velocity)."""
    v = predict_velocity(transformer, latents, sigma, *cond, *(neg or (None, None)), guidance)
    std = sde_std(sigma, sigma_max, noise_level).to(latents.device)
    mean = sde_mean(latents, v, sigma, sigma_next, std)
    dt = torch.as_tensor(sigma, device=latents.device) - torch.as_tensor(sigma_next, device=latents.device)
    return mean, std * torch.sqrt(dt), v


def routed_mean(transformer, adapters, alpha, latents, sigma, sigma_next, sigma_max, noise_level, cond, neg, guidance,
                collective=False):
    """Task routing (METHOD 5.2): the target transition mean sum_k alpha[:, k] mean_k(x), where adapter k
    runs ONE batched forward on just the states routed to it (alpha[:, k] > 0). The SDE mean is affine in
    v and the weights sum to 1, so blending means is blending velocities. collective=True (FSDP, where
    forwards are collective): every adapter runs on every rank, on one state and dropped if none is routed."""
    target = torch.zeros(latents.shape, dtype=torch.float32, device=latents.device)
    sigma, sigma_next = (torch.as_tensor(s, device=latents.device).float().expand(len(latents)) for s in (sigma, sigma_next))
    for k, name in enumerate(adapters):
        rows = (alpha[:, k] > 0).nonzero().flatten()
        if len(rows) == 0 and not collective:
            continue
        take = rows if len(rows) else torch.zeros(1, dtype=torch.long, device=latents.device)
        with torch.no_grad(), transformer.adapter(name):
            mean_k, _, _ = step_distribution(transformer, latents[take], sigma[take], sigma_next[take], sigma_max, noise_level,
                                             (cond[0][take], cond[1][take]), (neg[0][take], neg[1][take]), guidance)
        if len(rows):
            target[rows] += alpha[rows, k].view(-1, *([1] * (latents.ndim - 1))).float() * mean_k
    return target


# -----------------------------------------------------------------------------------------------
# 7. Losses shared by the stages.


def transition_kl(mean_a, mean_b, step_std, dt, convention="exact"):
    """KL between two Gaussian transitions sharing the variance step_std^2 = std^2 |dt| (METHOD 3/5):
    exact: ||mean_a - mean_b||^2 / (2 std^2 |dt|);  reference: the reference code's ||.||^2 / (2 std^2),
    i.e. |dt| times the exact KL. Mean over latent elements, one value per sample."""
    sq = ((mean_a - mean_b) ** 2).flatten(1).mean(1)
    var = _per_sample(step_std, mean_a).flatten() ** 2
    return _in_convention(sq / (2 * var), dt, convention)


def _in_convention(kl, dt, convention):
    """A per-sample transition KL in the chosen convention: exact, or the reference code's |dt| KL."""
    if convention == "exact":
        return kl
    if convention == "reference":
        return kl * torch.as_tensor(dt, device=kl.device).abs().reshape(-1)
    raise ValueError(f"kl convention must be 'exact' or 'reference', got {convention!r}")


def sampled_kl(x_next, mean_a, mean_b, step_std, dt=1.0, convention="exact"):
    """The one-sample estimate of KL(N(mean_a) || N(mean_b)) at the transition actually taken,
    log N(x_next; mean_a) - log N(x_next; mean_b) with x_next ~ N(mean_a, step_std^2): its mean over x_next is
    transition_kl (same convention), and unlike it it depends on x_next, so a policy gradient credited to that
    step has a non-zero mean (the pg reward -KL_j in closed form is a function of x_j only). Mean over elements."""
    return _in_convention(gaussian_log_prob(x_next, mean_a, step_std) - gaussian_log_prob(x_next, mean_b, step_std),
                          dt, convention)


def velocity_mse_from_means(mean_a, mean_b, sigma, sigma_next, std):
    """||v_a - v_b||^2 (mean over elements) of two transitions from the same state: the SDE mean is affine
    in v with slope (1 + std^2 (1 - s) / (2 s)) dt, so the velocities' distance follows from the means'."""
    s, dt, std = (_per_sample(t, mean_a).flatten() for t in (sigma, torch.as_tensor(sigma_next) - torch.as_tensor(sigma), std))
    slope = (1 + std ** 2 * (1 - s) / (2 * s)) * dt
    return ((mean_a - mean_b) ** 2).flatten(1).mean(1) / slope ** 2


def step_divergence(mean_a, mean_b, step_std, sigma, sigma_next, std, weight="exact", convention="exact"):
    """The per-step distance OPD minimises (METHOD 5.3, 5b): the transitions' KL (weight "exact": the
    w(t) of the KL's velocity form, in the exact or the reference convention) or the plain velocity MSE
    (weight "uniform", as DanceOPD)."""
    if weight == "exact":
        return transition_kl(mean_a, mean_b, step_std, torch.as_tensor(sigma_next) - torch.as_tensor(sigma), convention)
    if weight == "uniform":
        return velocity_mse_from_means(mean_a, mean_b, sigma, sigma_next, std)
    raise ValueError(f"step weight must be 'exact' or 'uniform', got {weight!r}")


def kl_advantages(kl, steps, kl_scale=-1.0, norm="none", clip=5.0, eps=1e-4):
    """The pg mode's dense reward as advantages (METHOD 5.4): r = kl_scale * KL per (sample, supervised
    step), kl_scale = -1 in the reference; optionally normalised (r - mean) / (std + 1e-4) over the whole
    batch (global), per sample, or per timestep (entries of the same step index); clipped to [-clip, clip].
    kl, steps: (N, S) over the gathered batch."""
    r = (kl_scale * kl).double()
    if norm == "none":
        return r.clamp(-clip, clip).float()
    groups = {"global": torch.zeros_like(steps), "per_sample": torch.arange(len(r), device=r.device)[:, None].expand_as(steps),
              "per_timestep": steps}.get(norm)
    if groups is None:
        raise UserError(f"kl_norm must be none, global, per_sample or per_timestep, got {norm!r}")
    uniq, inv = torch.unique(groups.flatten(), return_inverse=True)
    flat = r.flatten()
    count = torch.zeros(len(uniq), dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(flat))
    mean = torch.zeros_like(count).index_add_(0, inv, flat) / count
    std = (torch.zeros_like(count).index_add_(0, inv, (flat - mean[inv]) ** 2) / count).sqrt()
    return ((flat - mean[inv]) / (std[inv] + eps)).clamp(-clip, clip).view_as(r).float()


def group_advantages(rewards, group_ids, global_std=True, clip=5.0, eps=1e-4):
    """METHOD 3.3: A = (r - mean of its prompt group) / (std + 1e-4), std over the whole gathered batch
    (global_std) or within the group (population std, as the reference), clipped to [-clip, clip].
    Returns (advantages, fraction of groups whose rewards are all equal)."""
    rewards = rewards.double()
    ids = torch.as_tensor(group_ids, device=rewards.device)
    uniq, inv = torch.unique(ids, return_inverse=True)
    count = torch.zeros(len(uniq), dtype=rewards.dtype, device=rewards.device).index_add_(0, inv, torch.ones_like(rewards))
    mean = torch.zeros_like(count).index_add_(0, inv, rewards) / count
    sq = torch.zeros_like(count).index_add_(0, inv, (rewards - mean[inv]) ** 2)
    group_std = (sq / count).sqrt()
    std = rewards.std(unbiased=False) if global_std else group_std[inv]
    adv = ((rewards - mean[inv]) / (std + eps)).clamp(-clip, clip)
    return adv.float(), (group_std == 0).double().mean().item()


def sample_timesteps(n, generator, density="logit_normal", mean=0.0, std=1.0, shift=1.0, device="cpu"):
    """Noise levels for flow-matching training: SD3's logit-normal density (s = sigmoid(N(mean, std)))
    or uniform; shift != 1 maps them through the sampling schedule's shift s -> shift s / (1 + (shift-1) s)."""
    if density == "logit_normal":
        s = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    elif density == "uniform":
        s = torch.rand(n, generator=generator)
    else:
        raise UserError(f"timestep_density must be logit_normal or uniform, got {density!r}")
    return (shift * s / (1 + (shift - 1) * s)).to(device)


def flow_matching_loss(velocity, latents, noise, sigma):
    """METHOD 1: E || v_theta(x_s, s, c) - (e - x0) ||^2 with x_s = (1 - s) x0 + s e (the caller built x_s
    from the same latents, noise and sigma); mean over elements and the batch. At least float32, like the
    velocity: the target is not rounded to float32 when the inputs are float64 (the reference tests)."""
    return ((_f32(velocity) - (_f32(noise) - _f32(latents))) ** 2).mean()


def clipped_surrogate(log_prob, old_log_prob, advantages, clip_range):
    """PPO's clipped objective as a loss: mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))."""
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    stats = {"ratio_mean": ratio.mean().detach(), "ratio_max": ratio.max().detach(), "ratio_min": ratio.min().detach(),
             "clipfrac": ((ratio - 1).abs() > clip_range).float().mean().detach(),
             "approx_kl": (0.5 * (log_prob - old_log_prob) ** 2).mean().detach()}
    return loss, stats


def nft_optimality(advantages, clip):
    """DiffusionNFT's optimality probability (METHOD 3b.2): r = clip(A, -c, c) / (2c) + 1/2, in [0, 1]."""
    return (advantages.clamp(-clip, clip) / (2 * clip) + 0.5).clamp(0, 1)


def nft_loss(v_theta, v_old, latents, noise, sigma, r, beta, weighting="adaptive"):
    """DiffusionNFT's loss (METHOD 3b.3), per sample (B,): with u = e - x0 the data velocity at
    x_s = (1 - s) x0 + s e, the implicit positive and negative policies
        v+ = (1 - beta) v_old + beta v_theta,    v- = (1 + beta) v_old - beta v_theta,
    and L = [r ||v+ - u||^2 + (1 - r) ||v- - u||^2] / beta. weighting="velocity": the squared norms as
    written (mean over elements). "adaptive" (the paper's code): each branch as an x0-prediction,
    x0_hat = x_s - s v, its squared error divided by its own detached mean absolute error (per sample,
    floored at 1e-5); since x0_hat - x0 = -s (v - u) that is s ||v - u||^2 / mean|v - u|. v_old is detached."""
    x0, e, v_theta, v_old = _f32(latents), _f32(noise), _f32(v_theta), _f32(v_old).detach()
    u = e - x0
    branches = [(1 - beta) * v_old + beta * v_theta, (1 + beta) * v_old - beta * v_theta]
    if weighting == "velocity":
        pos, neg = [((v - u) ** 2).flatten(1).mean(1) for v in branches]
    elif weighting == "adaptive":
        s = _per_sample(sigma, x0)
        x_s = (1 - s) * x0 + s * e
        errors = [(x_s - s * v) - x0 for v in branches]
        pos, neg = [(d ** 2).flatten(1).mean(1) / d.detach().abs().flatten(1).mean(1).clamp_min(1e-5) for d in errors]
    else:
        raise UserError(f"nft_weighting must be adaptive or velocity, got {weighting!r}")
    r = r.to(pos.dtype)
    return (r * pos + (1 - r) * neg) / beta


def nft_velocities(transformer, trained, x0, noise, sigma, cond, neg, guidance, reference=False):
    """DiffusionNFT's velocities at x_s = (1 - s) x0 + s e (METHOD 3b.3): the `trained` adapter's with gradient,
    the sampling policy "old"'s without, and (reference=True) the base's without, for the velocity penalty.
    Returns (v_theta, v_old, v_ref or None). Shared by train_teacher.py (NFT teachers) and distill.py (NFT-Mix)."""
    s = _per_sample(sigma, x0)
    x_s = (1 - s) * x0 + s * noise
    with transformer.adapter(trained):
        v_theta = predict_velocity(transformer, x_s, sigma, *cond, *neg, guidance)
    with torch.no_grad():
        with transformer.adapter("old"):
            v_old = predict_velocity(transformer, x_s, sigma, *cond, *neg, guidance)
        v_ref = None
        if reference:
            with transformer.adapter(None):
                v_ref = predict_velocity(transformer, x_s, sigma, *cond, *neg, guidance)
    return v_theta, v_old, v_ref


def nft_noise_levels(seeds, grid, levels, density="schedule"):
    """(B, levels) noise levels for DiffusionNFT's loss, one seeded generator per image (METHOD 3b.3):
    `levels` distinct points of the sampling grid (sigmas[0 .. T-1]: s = 1 included, 0 not) in a random order,
    as the code's shuffled timesteps, or U(0, 1) draws."""
    grid = torch.as_tensor(grid, dtype=torch.float32).cpu()
    if density == "schedule" and levels > len(grid):
        raise UserError(f"nft_levels={levels}: the sampling grid has only {len(grid)} distinct levels")
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        out.append(grid[torch.randperm(len(grid), generator=g)[:levels]] if density == "schedule" else torch.rand(levels, generator=g))
    return torch.stack(out)


def nft_decay(step, flat=0, uprate=0.001, uphold=0.5):
    """The sampling policy's soft-update decay after `step` optimizer steps (DiffusionNFT's schedule):
    0 for the first `flat` steps (the sampling policy is the trained one), then rising by `uprate` per step
    up to `uphold`."""
    return 0.0 if step < flat else min((step - flat) * uprate, uphold)


@torch.no_grad()
def blend_adapter(model, target, source, decay):
    """target <- decay * target + (1 - decay) * source, layer by layer (METHOD 3b.5: theta_old <- eta theta_old
    + (1 - eta) theta). Both adapters must have the same layers and ranks; works on FSDP2 shards alike."""
    pairs = list(zip(model.adapter_parameters(target), model.adapter_parameters(source)))
    if not pairs or any(a.shape != b.shape for a, b in pairs):
        raise ValueError(f"adapters {target!r} and {source!r} do not have the same layers and ranks")
    for a, b in pairs:
        a.lerp_(b.detach(), 1 - decay)


# -----------------------------------------------------------------------------------------------
# 8. Distributed setup, checkpoints, EMA, logs and image grids.


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    master: bool


def setup_distributed(device=None):
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group (nccl on
    CUDA, gloo on CPU). Plain `python script.py` runs on one device with no process group."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
        dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=dev if cuda else None)
    else:
        rank, world, local = 0, 1, 0
        dev = torch.device(device or ("cuda" if cuda else "cpu"))
    return Dist(rank, world, local, dev, rank == 0)


def shard_transformer(transformer, param_dtype, reduce_dtype=torch.float32):
    """FSDP2: fully_shard each block, then the root, with mixed precision as a policy (torchtitan's recipe).
    Frozen bf16 base weights and fp32 LoRA weights are sharded alike; only trainable ones get gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    device_type = "cuda" if torch.cuda.is_available() and next(transformer.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in transformer.transformer_blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(transformer, mesh=mesh, mp_policy=policy)
    transformer.compute_dtype = param_dtype
    return transformer


def all_gather(tensor):
    """Concatenate a tensor (equal shapes on every rank) over ranks, in rank order."""
    if not dist.is_initialized():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def all_reduce_mean(tensor):
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def clip_grad_norm(params, max_norm):
    """torch's clip_grad_norm_, also over FSDP2's sharded (DTensor) gradients: returns the total norm."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    return _full(norm) if hasattr(norm, "full_tensor") else norm


def optimizer_update(optimizer, params, max_norm, ema, step):
    """One update: clip the gradients, step, then the EMA (`step` = optimizer steps taken before this one); a
    non-finite gradient norm skips the step. Gradients are zeroed either way. Returns (norm, whether it stepped)."""
    grad_norm = clip_grad_norm(params, max_norm)
    stepped = bool(torch.isfinite(grad_norm))
    if stepped:
        optimizer.step()
        if ema is not None:
            ema.update(step)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def sample_seed(*parts):
    """A 63-bit seed from integers (base seed, iteration, sample index, ...), stable across runs and ranks."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def mean_ci(values):
    """Mean and the 95% CI half-width of the normal approximation, 1.96 s / sqrt(n) (s: sample std), and var / n.
    For a paired comparison pass the per-image differences (same prompt, same starting noise)."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0  # one value: no spread to estimate
    return mean, 1.96 * math.sqrt(var / n), var / n


def tag_mean_ci(values, tags):
    """GenEval's overall number (docs/reward_spec.md 1.7) with its 95% CI: the per-tag means of `values`, then
    their unweighted mean over the T tags, var = sum_t var(mean_t) / T^2 (tags are independent samples). For a
    paired comparison pass the per-image differences. Returns (overall, ci95 half-width, {tag: mean_ci of the tag})."""
    by_tag = {}
    for v, t in zip(values, tags, strict=True):
        by_tag.setdefault(t, []).append(v)
    per_tag = {t: mean_ci(v) for t, v in by_tag.items()}
    overall = sum(m for m, _, _ in per_tag.values()) / len(per_tag)
    return overall, 1.96 * math.sqrt(sum(var for _, _, var in per_tag.values())) / len(per_tag), per_tag


def group_init_seeds(seed, iteration, index, group_size):
    """The starting-noise seeds of --shared_init_noise: global sample i belongs to group i // group_size, and
    every sample of a group gets that group's seed (disjoint from the per-sample seeds sample_seed(seed, iteration, i))."""
    return [sample_seed(seed, iteration, 10 ** 7 + i // group_size) for i in index]


def batches_per_rank(group_size, groups_per_iter, batch_size, world, optimizer_steps_per_iter):
    """Sampling (= training) batches per rank and iteration, after checking that groups tile them: a
    sampling step of world x batch_size images holds whole groups or a group fills whole steps (the
    reference sampler's rule), and each optimizer step sees whole groups, whose advantages are centred."""
    images = group_size * groups_per_iter
    if images % (world * batch_size):
        raise UserError(f"{groups_per_iter} groups x {group_size} images = {images} per iteration is not a multiple of "
                        f"{world} ranks x batch_size {batch_size}; change batch_size or groups_per_iter")
    num_batches = images // (world * batch_size)
    if num_batches % optimizer_steps_per_iter:
        raise UserError(f"{num_batches} batches per rank cannot be split into {optimizer_steps_per_iter} optimizer steps")
    step_images = world * batch_size
    if step_images % group_size and group_size % step_images:
        raise UserError(f"group_size {group_size} does not divide the sampling batch of {world} ranks x batch_size "
                        f"{batch_size} = {step_images} images (nor is a multiple of it); change batch_size or group_size")
    if (images // optimizer_steps_per_iter) % group_size:
        raise UserError(f"optimizer_steps_per_iter {optimizer_steps_per_iter} splits the iteration's groups of {group_size}; "
                        f"each optimizer step must see whole groups")
    return num_batches


def draw_groups(num_prompts, weights, num_groups, seed, iteration):
    """The prompts of one iteration as (task, prompt index) pairs, one per group. The task of each group
    is drawn by `weights` (one task: all the same), the prompt without replacement within its task.
    Seeded by (seed, iteration) only, so every rank draws the same list."""
    g = torch.Generator().manual_seed(sample_seed(seed, iteration))
    w = torch.tensor(weights, dtype=torch.float64)
    tasks = torch.multinomial(w / w.sum(), num_groups, replacement=True, generator=g).tolist() if len(weights) > 1 else [0] * num_groups
    out, perms, used = [], {}, {}
    for t in tasks:
        if t not in perms or used[t] == num_prompts[t]:
            perms[t], used[t] = torch.randperm(num_prompts[t], generator=g).tolist(), 0
        out.append((t, perms[t][used[t]]))
        used[t] += 1
    return out


class EMA:
    """Exponential moving average of the trainable weights (Flow-GRPO: decay min((1+n)/(10+n), 0.9),
    updated every `every` optimizer steps). Shadows keep the parameters' sharding under FSDP2."""

    def __init__(self, named_params, decay=0.9, every=8):
        self.params = dict(named_params)
        self.shadow = {k: p.detach().clone() for k, p in self.params.items()}
        self.decay, self.every = decay, every

    @torch.no_grad()
    def update(self, step):
        if (step + 1) % self.every:
            return
        d = min((1 + step) / (10 + step), self.decay)
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach(), 1 - d)

    @contextmanager
    def swapped(self):
        """Temporarily put the EMA weights into the model (to save or evaluate them)."""
        backup = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(backup[k])

    def state_dict(self):
        return {k: _full(v).cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state):
        with torch.no_grad():
            for k, v in self.shadow.items():
                if hasattr(v, "full_tensor"):
                    from torch.distributed.tensor import distribute_tensor
                    v.copy_(distribute_tensor(state[k].to(v.dtype), v.device_mesh, v.placements))
                else:
                    v.copy_(state[k])


def _atomic(write, path):
    """Write through a temporary file and rename, so a killed run never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(out_dir, step, write, keep=3):
    """Write checkpoint `step` with write(folder) into a temporary folder, rename it to step_NNNNNN and then
    point `latest` at it. A run killed mid-save leaves the previous checkpoint and `latest` intact."""
    final = os.path.join(out_dir, f"step_{step:06d}")
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    _atomic(lambda p: open(p, "w").write(os.path.basename(final)), os.path.join(out_dir, "latest"))
    done = [f for _, f in _step_folders(out_dir)]
    for old in done[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_temporaries(out_dir)
    return final


def _step_folders(out_dir):
    """[(step, folder)] of the finished checkpoints step_NNNNNN in out_dir, oldest first. A save renames its
    temporary folder to step_NNNNNN only once everything is written in it, so each of these is complete."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), os.path.join(out_dir, d)) for d in os.listdir(out_dir)
             for m in [re.fullmatch(r"step_(\d+)", d)] if m and os.path.isdir(os.path.join(out_dir, d))]
    return sorted(found)


def remove_stale_temporaries(out_dir):
    """Remove what saves killed midway left in out_dir: step_N.tmpPID/ folders and NAME.tmpPID files of other
    processes (one run writes to an out_dir at a time). Returns their names."""
    stale = []
    for d in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = re.fullmatch(r".+\.tmp(\d+)", d)
        if m and int(m.group(1)) != os.getpid():
            path = os.path.join(out_dir, d)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            stale.append(d)
    return stale


def save_lora_checkpoint(out_dir, step, transformer, adapter, optimizer, ema, counters, config, base_model, keep=3,
                         extra_adapters=()):
    """A LoRA run's checkpoint (train_teacher.py, distill.py): the adapter and its EMA as peft folders,
    trainer_state.pt (optimizer, EMA shadows, the run's counters) and config.json; each of `extra_adapters`
    (e.g. DiffusionNFT's sampling policy "old") as a peft folder of its name. Under FSDP every rank
    must call it (the gathers are collective); rank 0 writes, atomically (save_checkpoint)."""
    pieces = {"adapter": adapter_state(transformer, adapter), **{n: adapter_state(transformer, n) for n in extra_adapters}}
    if ema is not None:
        with ema.swapped():
            pieces["ema"] = adapter_state(transformer, adapter)
    trainer = {**counters, "optimizer": optimizer_state(transformer, optimizer),
               "ema": ema.state_dict() if ema is not None else None, "rng": rng_state()}
    if dist.is_initialized() and dist.get_rank() != 0:
        return

    def write(folder):
        for name, state in pieces.items():
            write_adapter(state, os.path.join(folder, name), "peft", base_model=base_model)
        torch.save(trainer, os.path.join(folder, "trainer_state.pt"))
        json.dump(config, open(os.path.join(folder, "config.json"), "w"), indent=2)
    save_checkpoint(out_dir, step, write, keep)


def latest_checkpoint(out_dir):
    """The newest finished checkpoint folder in out_dir, or None. Whatever `latest` says: it is written after
    the rename, so a run killed in between (or a `latest` edited or lost) must not hide the newest checkpoint."""
    folders = _step_folders(out_dir)
    return folders[-1][1] if folders else None


@dataclass
class Resume:
    """Where a run starts (resume_run): from checkpoint `folder` (None: from the beginning) at `start`."""
    folder: str = None    # the checkpoint resumed from
    state: dict = None    # its trainer_state.pt
    start: int = 0        # the iteration (or step) the run goes on from
    changed: dict = None  # {setting: [its value at the checkpoint, now]}: applied from `start` on
    record: dict = None   # the log record that says so (None when nothing changed)


def _plain(value):
    return json.loads(json.dumps(value))  # as config.json holds it: tuples are lists


def _run_files(out_dir):
    if not os.path.isdir(out_dir):
        return []
    return sorted(d for d in os.listdir(out_dir) if d in ("log.jsonl", "latest") or re.fullmatch(r"step_\d+", d))


def resume_run(out_dir, resume, config, fixed=(), key="iteration", master=True):
    """Decide where a training run starts, before any model loads; every refusal is a one-line UserError.

    resume=False: out_dir must not hold a run already (log.jsonl, latest, step_*/): a new run never overwrites
    or deletes another's log and checkpoints. resume=True: the newest finished checkpoint (whatever `latest`
    says; said so when it differs), or, with none, a fresh start (said so). Settings in `fixed` (names, or
    (name, f) to compare f(value), e.g. ("ema_decay", bool): on or off) are what the checkpoint embodies (the
    model, the adapter's rank and targets, ...): a changed one is refused. Every other changed setting is
    applied from the checkpoint on (the caller sets the optimizer's lr and weight decay through
    load_optimizer_state) and listed in Resume.changed / .record. Leftovers of saves killed midway are removed."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: --out_dir is an existing file, not a folder; choose another --out_dir")
    parent = out_dir
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent or ".", os.W_OK):
        raise UserError(f"{out_dir}: cannot write there ({parent or '.'} is not writable); choose another --out_dir")
    held = _run_files(out_dir)
    if not resume:
        if held:
            raise UserError(f"{out_dir}: already holds a run ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}); pass "
                            f"--resume=True to continue it, or give another --out_dir (or delete that folder) for a new run")
        return Resume(changed={})
    if master:
        stale = remove_stale_temporaries(out_dir)
        if stale:
            print(f"resume: removed {', '.join(stale)}: left by a save that was killed midway")
    folders = _step_folders(out_dir)
    if not folders:
        if master:
            why = "does not exist" if not os.path.isdir(out_dir) else "holds no checkpoint"
            log_note = " (the lines of its log.jsonl, from before any checkpoint, are replaced)" \
                if os.path.isfile(os.path.join(out_dir, "log.jsonl")) else ""
            print(f"resume: {out_dir} {why}: starting fresh at {key} 0{log_note}")
        return Resume(changed={})
    start, folder = folders[-1]
    before = f"delete {folder} to resume from {folders[-2][1]}" if len(folders) > 1 else f"delete {folder} to start over"
    state = read_torch(os.path.join(folder, "trainer_state.pt"), fix=f"this checkpoint is damaged: {before}")
    if not isinstance(state, dict) or not isinstance(state.get(key), int):
        raise UserError(f"{os.path.join(folder, 'trainer_state.pt')}: not a trainer state of this script (no {key!r} counter); "
                        f"{before}, or resume with the script that wrote it")
    start = state[key]
    config_path = os.path.join(folder, "config.json")
    saved = read_json(config_path, "checkpoint config", f"this checkpoint is damaged: {before}") if os.path.exists(config_path) else {}
    if not isinstance(saved, dict):
        raise UserError(f"{config_path}: not a config (a JSON object); this checkpoint is damaged: {before}")
    for item in fixed:
        name, same = item if isinstance(item, tuple) else (item, lambda v: v)
        if name in saved and name in config and same(_plain(saved[name])) != same(_plain(config[name])):
            raise UserError(f"{config_path}: {name} was {saved[name]!r} in this run and is {config[name]!r} now; {name} cannot "
                            f"change on resume (the checkpoint holds what it made): leave it at {saved[name]!r} to resume, "
                            f"or start a new run in another --out_dir")
    changed = {k: [saved[k], v] for k, v in config.items()  # where the run lives and how it was started are not settings
               if k in saved and k not in ("resume", "out_dir") and _plain(saved[k]) != _plain(v)}
    if master:
        latest = os.path.join(out_dir, "latest")
        named = open(latest, errors="replace").read().strip() if os.path.isfile(latest) else None
        note = "" if named == os.path.basename(folder) else \
            f" (the newest finished checkpoint; {out_dir}/latest {'names ' + repr(named) if named else 'is missing'})"
        print(f"resume: from {folder} at {key} {start}{note}")
        if changed:
            print("resume: settings changed since that checkpoint, applied from here on: " +
                  ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    record = {key: start, "resumed_from": os.path.basename(folder), "changed": changed} if changed else None
    return Resume(folder, state, start, changed, record)


def optimizer_state(model, optimizer):
    """The optimizer state keyed by parameter name, whole tensors (gathered under FSDP2) on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state, **settings):
    """strict=False: AdamW creates a parameter's state at its first gradient, and some trainable parameters
    never get one (the last block's norm_added_q: its text queries are unused), so a saved state lacks them.
    Loaded without state, they stay as they were: untouched. `settings` (lr=, weight_decay=) then replace the
    saved ones in every parameter group: the run's current settings, not the checkpoint's, are what it uses."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))
    for group in optimizer.param_groups:
        group.update(settings)


def rng_state():
    """The global generators' states as tensors (loadable with torch.load(weights_only=True)). Sampling and
    training draw from explicitly seeded generators, so resuming does not depend on these."""
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}


class JsonlLog:
    """One JSON object per line; only the master process writes. It never deletes another run's log: a new
    run (resume=False) finding a non-empty log is an error. A run resumed from the checkpoint at `resume_at`
    (the value of `key` in its records) cuts only the lines after it: the killed run logged steps past its
    last checkpoint (the last one perhaps half-written), and the resumed run logs them again. resume_at=0
    (resumed, but no checkpoint yet): the run starts over and logs everything again, its setup lines too."""

    def __init__(self, path, enabled=True, resume=False, resume_at=None, key="step"):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            if os.path.isfile(path) and os.path.getsize(path) and not resume:
                raise UserError(f"{path}: another run's log is there; pass --resume=True to continue that run, or give "
                                f"another --out_dir")
            if resume and os.path.isfile(path):
                lines, kept = open(path, "rb").read().decode("utf-8", "replace").splitlines(keepends=True), []
                for line in lines if resume_at != 0 else []:
                    try:
                        if not line.endswith("\n") or (resume_at is not None and json.loads(line).get(key, 0) > resume_at):
                            break
                    except (json.JSONDecodeError, AttributeError, TypeError):
                        break
                    kept.append(line)
                if len(kept) < len(lines):
                    _atomic(lambda p: open(p, "w").writelines(kept), path)

    def write(self, record):
        if self.enabled:
            clean = {k: (v.item() if torch.is_tensor(v) else v) for k, v in record.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(clean) + "\n")


def save_grid(images, captions, path, cols=None, cell=None):
    """A grid of images with a caption under each, as a PNG a person can look at. Small images are
    upscaled (nearest) to at least 128 px so toy-world samples are visible; captions wrap."""
    import textwrap
    from PIL import Image, ImageDraw, ImageFont
    imgs = to_uint8(images.float()) if images.dtype != torch.uint8 else images
    imgs = imgs.permute(0, 2, 3, 1).cpu().numpy()
    n = len(imgs)
    cols = cols or min(n, 8)
    rows = math.ceil(n / cols)
    h, w = imgs.shape[1:3]
    cell = cell or max(128, w)
    scale = max(1, cell // w)
    W, H = w * scale, h * scale
    font = ImageFont.load_default()
    wrap = max(10, W // 6)
    lines = [textwrap.wrap(c, wrap)[:4] for c in captions]
    text_h = 12 * max(1, max(len(l) for l in lines))
    grid = Image.new("RGB", (cols * (W + 4) + 4, rows * (H + text_h + 8) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, lns) in enumerate(zip(imgs, lines)):
        x, y = 4 + (i % cols) * (W + 4), 4 + (i // cols) * (H + text_h + 8)
        grid.paste(Image.fromarray(img).resize((W, H), Image.NEAREST if scale > 1 else Image.BICUBIC), (x, y))
        for k, line in enumerate(lns):
            draw.text((x, y + H + 2 + 12 * k), line, fill="black", font=font)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _atomic(lambda p: grid.save(p, format="PNG"), path)
    return grid
