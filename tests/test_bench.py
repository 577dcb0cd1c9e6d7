"""bench.py and kernels.py on a CPU: the twins are model.py's arithmetic, the CUDA kernels (compiled as
C++ against csrc/cuda_emu.h and run on CPU threads) match their twins, the per-module FLOP counter
matches FlopCounterMode and SD35.md, bench.py --tiny runs, and the CUDA source compiles with nvcc."""
import copy
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import kernels as K
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU = os.path.join(ROOT, "csrc", "flowopd_kernels.cu")


def tiny_config(dual=(0, 1), qk_norm="rms_norm", layers=3, heads=2, head_dim=16):
    return {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": layers,
            "attention_head_dim": head_dim, "num_attention_heads": heads, "joint_attention_dim": 48,
            "caption_projection_dim": heads * head_dim, "pooled_projection_dim": 24, "pos_embed_max_size": 8,
            "dual_attention_layers": list(dual), "qk_norm": qk_norm}


def random_model(config, dtype=torch.float64, seed=0, adapters=("p",), targets=M.DEFAULT_LORA_TARGETS):
    torch.manual_seed(seed)
    model = bench.build_transformer(config, torch.device("cpu"), dtype, seed)
    for k, name in enumerate(adapters):
        M.add_adapter(model, name, rank=4, alpha=8.0, targets=targets, seed=seed + k, trainable=(k == 0))
        with torch.no_grad():
            for p in model.adapter_parameters(name):
                if p.ndim == 3:
                    p.normal_(0, 0.05)
    return model


def with_base_dtype(model, dtype):
    """A copy whose base weights are cast to dtype; LoRA weights fp32 and the position table fp32,
    as the scripts hold them (load_pipeline casts the base, add_adapter makes fp32 adapters)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = p.data.to(torch.float32 if ".lora_" in name else dtype)
    model.pos_embed.pos_embed = model.pos_embed.pos_embed.float()
    return model


def inputs(config, B, dtype=torch.float64, n_txt=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, config["in_channels"], 8, 8, generator=g).to(dtype)
    t = torch.rand(B, generator=g) * 1000
    e = torch.randn(B, n_txt, config["joint_attention_dim"], generator=g).to(dtype)
    p = torch.randn(B, config["pooled_projection_dim"], generator=g).to(dtype)
    return x, t, e, p


# -----------------------------------------------------------------------------------------------
# The twins are exactly model.py's computations (bitwise, in float32 and float64).


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_twins_equal_model_py(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 32, generator=g).to(dtype)
    ada = torch.randn(3, 9 * 32, generator=g).to(dtype)[:, None]
    scale, shift, gate = ada[..., :32], ada[..., 32:64], ada[..., 64:96]
    y = torch.randn(3, 7, 32, generator=g).to(dtype)
    assert torch.equal(K.modulate_twin(x, scale, shift), M._layer_norm(x) * (1 + scale) + shift)
    assert torch.equal(K.gated_residual_twin(x, gate, y), x + gate * y)
    assert torch.equal(K.gelu_tanh_twin(3 * x), F.gelu(3 * x, approximate="tanh"))
    norm = M.RMSNorm(16).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2, generator=g)
    q = torch.randn(2, 5, 3, 4, 16, generator=g).to(dtype).permute(2, 0, 3, 1, 4)[0]  # a strided view, as in Attention
    assert torch.equal(K.rms_norm_twin(q, norm.weight, norm.eps), norm(q))
    # and the public ops fall back to the twins on a CPU (no kernels loaded)
    assert torch.equal(K.modulate(x, scale, shift), K.modulate_twin(x, scale, shift))
    assert torch.equal(K.rms_norm(q, norm.weight, norm.eps), norm(q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sde_twin_equals_model_py(dtype):
    g = torch.Generator().manual_seed(0)
    sigmas = M.sigma_schedule(10, 3.0)
    x, v, noise = (torch.randn(4, 4, 8, 8, generator=g).to(dtype) for _ in range(3))
    for j in (0, 3, 8):  # one noise level for the batch (sampling), incl. s = 1
        a = K.sde_step_twin(x, v, sigmas[j], sigmas[j + 1], sigmas[1], 0.7, noise)
        b = M.sde_step(x, v, sigmas[j], sigmas[j + 1], sigmas[1], 0.7, noise)
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    j = torch.tensor([0, 2, 5, 8])  # per-sample levels, scoring stored transitions (training)
    nxt = x + 0.1 * noise
    a = K.sde_step_twin(x, v, sigmas[j], sigmas[j + 1], sigmas[1], 0.7, next_latents=nxt)
    b = M.sde_step(x, v, sigmas[j], sigmas[j + 1], sigmas[1], 0.7, next_latents=nxt)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_switches_and_variants():
    """The kernels are opt-in (FLOWOPD_KERNELS=1); bench.py's variants turn them on and off for a block
    and put the switch back; on a CPU without the emulated build, 'on' still runs the twins."""
    saved = K._state["on"]
    assert saved == (os.environ.get("FLOWOPD_KERNELS", "0") == "1")
    with bench.variant("model.py"):
        assert not K._state["on"] and not K.enabled()
    with bench.variant("kernels"):
        assert K._state["on"]
        if K._state["lib"] is None:  # no CUDA device here: the reason is recorded, the twins run
            assert not K.enabled() and K._state["error"]
    assert K._state["on"] == saved
    with pytest.raises(M.UserError):
        with bench.variant("kernels+lora-bf16"):  # obsolete: model.Linear computes the LoRA in the activations' dtype
            pass
    with pytest.raises(ValueError):
        K.disable("layer_norm")


def test_rows_layout_addresses_every_row():
    """rms_norm's strided addressing (three leading size/stride pairs) reaches exactly the rows of the
    view, in row-major order: q and k of a fused qkv, a contiguous tensor, a 2-d and a 1-d one."""
    qkv = torch.arange(2 * 5 * 3 * 4 * 16).reshape(2, 5, 3 * 4 * 16)
    views = [qkv.view(2, 5, 3, 4, 16).permute(2, 0, 3, 1, 4)[1], qkv.view(2, 5, 12, 16), qkv.view(-1, 16)[3:7],
             qkv.view(-1, 16)[2], qkv.view(2, 5, 3, 4, 16).permute(2, 0, 3, 1, 4)[0][:, :, 1:4]]
    for v in views:
        rows, n1, n2, s0, s1, s2 = K._rows_layout(v)
        starts = [(r // (n1 * n2)) * s0 + (r % (n1 * n2) // n2) * s1 + (r % n2) * s2 for r in range(rows)]
        assert rows == v.numel() // 16
        assert torch.equal(v.reshape(rows, 16)[:, 0] - qkv.view(-1)[v.storage_offset()], torch.tensor(starts))
    assert K._rows_layout(qkv.view(-1, 16)[:, 1:9]) is None  # rows at an odd offset: not 16-byte aligned
    assert K._rows_layout(qkv.view(2, 5, 3, 4, 16).transpose(-1, -2)) is None  # D not contiguous


# -----------------------------------------------------------------------------------------------
# The CUDA kernels, compiled as C++ (csrc/cuda_emu.h: CPU threads stand in for CUDA threads).


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++ to build the emulated kernels")
    src = open(CU, "rb").read() + open(os.path.join(ROOT, "csrc", "cuda_emu.h"), "rb").read()
    lib = tmp_path_factory.mktemp("emu") / f"flowopd_emu_{hashlib.sha1(src).hexdigest()[:12]}.so"
    cmd = [gxx, "-std=c++20", "-O2", "-x", "c++", "-DFLOWOPD_EMULATE", "-I", os.path.join(ROOT, "csrc"), "-fPIC", "-shared",
           "-pthread", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas", CU, "-o", str(lib)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode and "barrier" in result.stderr:
        pytest.skip("this g++ has no C++20 <barrier>")
    assert result.returncode == 0, result.stderr
    K.load_emulated(str(lib))
    yield str(lib)
    K.unload()


def test_kernels_match_twins(emulated):
    """kernels.check (what bench.py --check runs on a GPU): forward and input gradients of every kernel
    against its twin, on fresh random inputs, NaN-poisoned outputs, within bf16 rounding; the SDE
    step's mean and sample to the bit."""
    rows = K.check(device="cpu", small=True, verbose=False)
    assert {r["op"] for r in rows} == set(K.OPS)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, K.format_check(bad)
    assert all("bitwise" in r["what"] for r in rows if r["op"] == "sde_step" and r["what"].split()[0] in ("mean", "next"))


def test_kernels_in_the_transformer(emulated):
    """model.py with the kernels on (bench.py's 'kernels' variant): a bf16 forward and its LoRA gradients
    stay within bf16 rounding of the twins'; the fp32 rollout (the SDE kernel) gives the twins' samples."""
    config = tiny_config()
    model64 = random_model(config, torch.float64)
    model = with_base_dtype(model64, torch.bfloat16)
    x, t, e, p = inputs(config, 2, torch.float64)

    def run(m, dtype):
        with m.adapter("p"):
            out = m(x.to(dtype), t, e.to(dtype), p.to(dtype)).float()
        out.square().mean().backward()
        grads = torch.cat([q.grad.flatten().float() for q in m.adapter_parameters("p")])
        for q in m.adapter_parameters("p"):
            q.grad = None
        return out.detach(), grads

    ref_out, ref_grads = run(model64, torch.float64)
    with bench.variant("model.py"):
        twin_out, twin_grads = run(model, torch.bfloat16)
    launches = []
    launch = K._launch
    K._launch = lambda name, *a, **kw: (launches.append(name), launch(name, *a, **kw))[1]
    try:
        with bench.variant("kernels"):
            out, grads = run(model, torch.bfloat16)
    finally:
        K._launch = launch
    assert {"flowopd_modulate_fwd", "flowopd_modulate_bwd", "flowopd_gated", "flowopd_gelu_fwd", "flowopd_gelu_bwd",
            "flowopd_rms_fwd", "flowopd_rms_bwd"} <= set(launches)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    assert rel(out, ref_out) <= max(1.5 * rel(twin_out, ref_out), 1e-2)
    assert rel(grads, ref_grads) <= max(1.5 * rel(twin_grads, ref_grads), 2e-2)
    # sampling: the SDE kernel inside model.rollout, fp32 (the transformer's ops then take the twins)
    model32 = with_base_dtype(model64, torch.float32)
    args = (model32, e.float(), p.float(), e.float().flip(0), p.float().flip(0), (4, 8, 8), [1, 2], 4, 3.0, 4.5)
    with model32.adapter("p"):
        with bench.variant("model.py"):
            a = M.rollout(*args)
        with bench.variant("kernels"):
            b = M.rollout(*args)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.means, b.means)
    assert torch.allclose(a.log_probs, b.log_probs, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------------------------
# FLOPs: the per-module count against torch's FlopCounterMode and SD35.md.


CASES = {
    "sd35-like": (tiny_config(dual=(0, 1)), M.DEFAULT_LORA_TARGETS),
    "sd3 (no attn2, no qk norm)": (tiny_config(dual=(), qk_norm=None), M.DEFAULT_LORA_TARGETS),
    "LoRA on ff, attn2 and part of a fused qkv": (tiny_config(dual=(1,), layers=4),
                                                  ["attn.to_k", "attn.to_out.0", "ff.net.2", "attn2.to_v", "ff_context.net.0.proj"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flop_counter_matches_flopcountermode(case):
    """Exactly equal (the math SDPA, whose backward FlopCounterMode counts as 2 forwards): one
    forward with the LoRA on and off, a GRPO timestep (CFG policy forward + backward + the
    reference forward) and an OPD state (routed teachers + anchor + the student's forward + backward)."""
    config, targets = CASES[case]
    model = random_model(config, torch.float32, adapters=("p", "t0", "t1", "anchor"), targets=targets)
    B, n_txt = 3, 6
    x, t, e, p = inputs(config, B, torch.float32, n_txt)
    n_img = (8 // config["patch_size"]) ** 2
    sigmas = M.sigma_schedule(4, 3.0)
    for adapter in ("p", None):
        with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH), model.adapter(adapter):
            model(x, t, e, p)
        assert counter.get_total_flops() == B * sum(bench.count_forward(model, n_img, n_txt, adapter).values())
    cond, neg = (e, p), (e.flip(0), p.flip(0))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        with model.adapter("p"):
            mean, step_std, _ = M.step_distribution(model, x, sigmas[1], sigmas[2], sigmas[1], 0.7, cond, neg, 4.5)
            with torch.no_grad(), model.adapter(None):
                ref, _, _ = M.step_distribution(model, x, sigmas[1], sigmas[2], sigmas[1], 0.7, cond, neg, 4.5)
            M.transition_kl(mean, ref, step_std, sigmas[2] - sigmas[1]).mean().backward()
    assert counter.get_total_flops() == B * bench.step_flops(model, n_img, n_txt, "p")
    alpha = F.one_hot(torch.tensor([0, 1, 0]), 2).double()
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        target = M.routed_mean(model, ["t0", "t1"], alpha, x, sigmas[1], sigmas[2], sigmas[1], 0.7, cond, neg, 4.5)
        with torch.no_grad(), model.adapter("anchor"):
            anchor, _, _ = M.step_distribution(model, x, sigmas[1], sigmas[2], sigmas[1], 0.7, cond, neg, 4.5)
        with model.adapter("p"):
            mean, step_std, _ = M.step_distribution(model, x, sigmas[1], sigmas[2], sigmas[1], 0.7, cond, neg, 4.5)
            (M.transition_kl(mean, target, step_std, 1.0) + M.transition_kl(mean, anchor, step_std, 1.0)).mean().backward()
    assert counter.get_total_flops() == B * bench.step_flops(model, n_img, n_txt, "p", teacher="t0", anchor="anchor", kl=False)


def meta_model(config):
    with torch.device("meta"):
        model = M.SD3Transformer(config).to(torch.bfloat16)
    model.requires_grad_(False)
    M.add_adapter(model, "student", 32, 64.0)
    return model


def test_flop_counter_gives_sd35_md_numbers():
    """SD35.md: 2.25 TFLOP per image forward at 512 px with 205 text tokens (LoRA on), 6.99 TFLOP per
    GRPO training timestep (per CFG branch); within 1%. And FlopCounterMode agrees on the real widths
    (a 3-block model on the meta device)."""
    model = meta_model(bench.SD35_TRANSFORMER)
    assert sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n) == 2_243_171_520  # SD35.md
    assert sum(p.numel() for p in model.adapter_parameters("student")) == 18_776_064
    fwd = sum(bench.count_forward(model, 1024, 205, "student").values())
    assert abs(fwd / 2.25e12 - 1) < 0.01
    assert abs(bench.step_flops(model, 1024, 205, "student", cfg=False) / 6.99e12 - 1) < 0.01
    assert abs(sum(bench.count_forward(model, 1024, 333, "student").values()) / 2.47e12 - 1) < 0.01
    assert abs(bench.step_flops(model, 1024, 333, "student", cfg=False) / 7.70e12 - 1) < 0.01
    small = meta_model({**bench.SD35_TRANSFORMER, "num_layers": 3, "dual_attention_layers": [0, 1]})
    x = torch.empty(1, 16, 64, 64, device="meta", dtype=torch.bfloat16)
    args = (x, torch.ones(1, device="meta"), torch.empty(1, 205, 4096, device="meta", dtype=torch.bfloat16),
            torch.empty(1, 2048, device="meta", dtype=torch.bfloat16))
    with FlopCounterMode(display=False) as counter:
        with small.adapter("student"):
            small(*args).float().sum().backward()
        with torch.no_grad(), small.adapter(None):
            small(*args)
    assert counter.get_total_flops() == bench.step_flops(small, 1024, 205, "student", cfg=False)


# -----------------------------------------------------------------------------------------------
# bench.py itself, and the CUDA source.


def test_bench_tiny_runs_and_prints_a_table(tmp_path):
    out = tmp_path / "bench.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("FLOWOPD_KERNELS_EMULATED", None)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--tiny", "--out", str(out)], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout
    table = text[text.index("## Results"):]
    for row in ("| rollout | model.py | 2 |", "| rollout + VAE decode | model.py | 4 |", "| GRPO step | model.py | 2 |",
                "| OPD step | model.py | 2 |", "| distill config | model.py | 2 |"):
        assert row in table, table
    assert "failed" not in table and "| NO |" not in text
    assert re.search(r"\| training step .* \| yes \|", text)
    report = out.read_text()
    assert "- card: CPU" in report and "- torch " in report and "- command: `python bench.py --tiny --out" in report
    assert (tmp_path / "bench.json").exists() and (tmp_path / "profile.txt").exists()


def test_cuda_source_compiles_with_nvcc(tmp_path):
    """nvcc -c with torch.utils.cpp_extension's flags, for Hopper (sm_90), with no register spills; and
    kernels.py's plain-nvcc build of the shared library."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    cmd = [nvcc, "-c", *COMMON_NVCC_FLAGS, "-O3", "-lineinfo", "-std=c++17", "-gencode=arch=compute_90,code=sm_90",
           "-Xcompiler", "-fPIC", "-Xptxas", "-v", CU, "-o", str(tmp_path / "k.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower()
    spills = re.findall(r"(\d+) bytes spill stores", result.stderr)
    assert spills and all(s == "0" for s in spills), result.stderr
    # kernels.py's fallback build (plain nvcc, the runtime linked statically): a loadable library that
    # exports every launcher kernels.py declares
    lib = str(tmp_path / "flowopd_kernels.so")
    result = subprocess.run(K.nvcc_command(lib, "90"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loaded = ctypes.CDLL(lib)
    assert all(hasattr(loaded, name) for name in [*K._SIGNATURES, "flowopd_error_string"])
