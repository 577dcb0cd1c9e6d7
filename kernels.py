"""
Hand-written CUDA kernels (csrc/flowopd_kernels.cu) for the MMDiT's memory-bound small ops and
Flow-GRPO's SDE step, each beside its plain PyTorch twin.

  modulate(x, scale, shift)        LayerNorm(x) (eps 1e-6, no affine) * (1 + scale) + shift   adaLN-Zero
  gated_residual(x, gate, y)       x + gate * y                                               adaLN-Zero's gates
  gelu_tanh(x)                     GELU, tanh approximation                                   the feed-forwards
  rms_norm(x, weight, eps)         RMSNorm over the last dim, times weight                    SD3.5's q/k norm
  sde_step(...)                    model.sde_step, same signature: (next, log_prob, mean, step_std), fp32

The twin is the reference: it computes exactly what model.py computes (the tests hold it to that),
runs on the CPU, and runs whenever the kernels are off or cannot take an input (dtype, device, shape,
strides). The kernels take bf16 in and give bf16 out with fp32 math and one rounding per output, so
they differ from the twins by bf16 rounding (the twins round after each op); sde_step is fp32 and
its mean and sample equal the twin's bit for bit.

Autograd: modulate, gated_residual, gelu_tanh and rms_norm have CUDA backward kernels for the input
gradients (x and y), the only ones LoRA training needs: every adaLN vector and norm weight is frozen.
When scale, shift, gate or weight does need a gradient (full fine-tuning) the twin runs instead and
autograd differentiates it. sde_step's kernel serves sampling and scoring without gradients; with a
gradient to propagate it is the twin.

The kernels are opt-in: FLOWOPD_KERNELS=1 turns them on (off by default until bench.py --check has
passed on a GPU, docs/bench.md); `with kernels.switched(True):` / `with kernels.disabled():` turn them
on / off for a block; kernels.disable(op) switches one op off (bench.py's --check disables any op that
fails its check). Switched on, they compile at first use on a CUDA machine through
torch.utils.cpp_extension (plain nvcc if that fails; about a minute, printed), and the build is cached
in $FLOWOPD_KERNELS_DIR or ~/.cache/flowopd_kernels/torch<version>_cuda<version>_sm<cc>. On a machine
without CUDA they are never on, except for the tests' CPU build (load_emulated). check() compares
every kernel with its twin.
"""
import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "flowopd_kernels.cu")
OPS = ("modulate", "gated_residual", "gelu_tanh", "rms_norm", "sde_step")
LN_EPS = 1e-6  # model._layer_norm's eps


def _fresh_state():
    return {"on": os.environ.get("FLOWOPD_KERNELS", "0") == "1",  # opt-in until checked on a GPU (docs/bench.md)
            "off": set(),      # ops switched off one by one (disable)
            "lib": None,       # the loaded library (ctypes.CDLL) and its launchers, by exported name
            "fns": {},
            "device": None,    # the device type the library serves: "cuda", or "cpu" for the emulated build
            "tried": False,    # a build/load was attempted (it happens once per process)
            "error": None,     # why the kernels are unavailable, if they are
            "poison": False,   # check(): fill fresh outputs with NaN, so that an element never written shows
            "launches": {}}    # launches by name since launch_counts() last read them


_state = _fresh_state()


# -----------------------------------------------------------------------------------------------
# The twins: model.py's computations before it called these ops, verbatim (_layer_norm and
# JointBlock.forward's modulation, the gated residuals, FeedForward's GELU, RMSNorm.forward), and
# model.sde_step itself.


def modulate_twin(x, scale, shift):
    return F.layer_norm(x, (x.shape[-1],), eps=LN_EPS) * (1 + scale) + shift


def gated_residual_twin(x, gate, y):
    return x + gate * y


def gelu_tanh_twin(x):
    return F.gelu(x, approximate="tanh")


def rms_norm_twin(x, weight, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def sde_step_twin(latents, velocity, sigma, sigma_next, sigma_max, noise_level, noise=None, next_latents=None):
    import model  # the twin is model.sde_step itself (model.py imports this file, hence the late import)
    return model.sde_step(latents, velocity, sigma, sigma_next, sigma_max, noise_level, noise, next_latents)


# -----------------------------------------------------------------------------------------------
# The switch: whether a kernel runs. On (FLOWOPD_KERNELS=1, switched(True), or the emulated build
# loaded), built and loaded for this machine, and the op not switched off; else its twin runs.


def enabled(op=None):
    """Whether the kernels run (for op: that one). The first call with the switch on builds or loads
    the library (printed); if that fails, the reason is in _state["error"] and the twins run."""
    if not _state["on"] or (op is not None and op in _state["off"]):
        return False
    if _state["lib"] is None and not _state["tried"]:
        _load()
    return _state["lib"] is not None


@contextmanager
def switched(on):
    """Kernels on or off for a block (bench.py's variants), whatever FLOWOPD_KERNELS says."""
    saved = _state["on"]
    _state["on"] = bool(on)
    try:
        yield
    finally:
        _state["on"] = saved


def disabled():
    """`with kernels.disabled():` the twins run in the block (check()'s side by side, bench.py's model.py variant)."""
    return switched(False)


def disable(op):
    """Switch one op off for the rest of the process (bench.py --check does so for an op that fails)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; the ops are {', '.join(OPS)}")
    _state["off"].add(op)


def launch_counts():
    """Kernel launches by exported name since the last call (which they are reset by)."""
    counts, _state["launches"] = _state["launches"], {}
    return counts


def _grad_needed(*tensors):
    """Whether autograd will want a gradient of any of these: then a kernel without that gradient must not run."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _use(op, x):
    """Whether op's kernel may take x: bf16 (the dtype first, so fp32/float64 calls never build anything),
    the kernels on for op, x on the device the library serves and, on a GPU, the current one (the
    launchers run on the CUDA runtime's current device)."""
    if x.dtype != torch.bfloat16 or not enabled(op) or x.device.type != _state["device"]:
        return False
    return x.device.type != "cuda" or x.device.index == torch.cuda.current_device()


# -----------------------------------------------------------------------------------------------
# Building and loading. The library is plain C (no torch headers), so a build is one nvcc call;
# it is named by the source's hash and the GPU's capability, so a cached build is loaded without
# invoking any compiler, and an edited source builds anew.

# csrc/flowopd_kernels.cu's extern "C" launchers, in order; each also takes the CUDA stream last
# and returns 0 or an error code (-1: a size the kernel does not take, a bug in the checks below).
_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "flowopd_modulate_fwd": [_P, _P, _P, _P, _I64, _I64, _I32, _I64, _F32],  # x, scale, shift, out, rows, tokens, D, mod_stride, eps
    "flowopd_modulate_bwd": [_P, _P, _P, _P, _I64, _I64, _I32, _I64, _F32],  # grad, x, scale, dx, rows, tokens, D, mod_stride, eps
    "flowopd_gated": [_P, _P, _P, _P, _I64, _I64, _I32, _I64],              # x (or NULL), gate, y, out, numel, sample_elems, D, gate_stride
    "flowopd_gelu_fwd": [_P, _P, _I64],                                     # x, out, numel
    "flowopd_gelu_bwd": [_P, _P, _P, _I64],                                 # grad, x, dx, numel
    "flowopd_rms_fwd": [_P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I32, _F32],      # x, w, out, rows, n1, n2, s0, s1, s2, D, eps
    "flowopd_rms_bwd": [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I32, _F32],  # grad, x, w, dx, rows, n1, n2, s0, s1, s2, D, eps
    "flowopd_sde_step": [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I32],     # x, v, other, coef, next, mean, log_prob, batch, n, sample
}


def _bind(lib, device):
    """Declare the launchers' C signatures (ctypes would otherwise pass every int as a C int) and switch to lib."""
    fns = {}
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes + [_P], ctypes.c_int
        fns[name] = fn
    fns["flowopd_error_string"] = lib.flowopd_error_string
    fns["flowopd_error_string"].argtypes, fns["flowopd_error_string"].restype = [ctypes.c_int], ctypes.c_char_p
    _state.update(lib=lib, fns=fns, device=device, tried=True, error=None)


def _load():
    """Build (first use on this machine) or find the CUDA library and load it; on failure say why once."""
    _state["tried"] = True
    if not torch.cuda.is_available():
        _state["error"] = "no CUDA device"
        return
    try:
        _bind(ctypes.CDLL(_build()), "cuda")
    except Exception as e:  # no nvcc, a compile error, an unloadable library: the twins run
        _state["error"] = f"{type(e).__name__}: {str(e).strip()[-1000:]}"
        print(f"kernels.py: the CUDA kernels are unavailable, the PyTorch twins run ({_state['error']})", flush=True)


def _build_dir(cc):
    return os.environ.get("FLOWOPD_KERNELS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "flowopd_kernels", f"torch{torch.__version__}_cuda{torch.version.cuda}_sm{cc}")


def _build():
    """The library's path for the current GPU, compiled first if no cached build matches the source."""
    major, minor = torch.cuda.get_device_capability()
    cc = f"{major}{minor}"
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:12]
    folder = _build_dir(cc)
    name = f"flowopd_kernels_sm{cc}_{digest}"
    path = os.path.join(folder, name + ".so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    print(f"kernels.py: compiling {SOURCE} for sm_{cc} into {folder} (first use here; about a minute)", flush=True)
    t0 = time.time()
    try:
        built = _build_with_torch(name, folder, major, minor)
        if os.path.abspath(built) != path:  # cpp_extension renames a rebuild within one process (name_v1)
            shutil.copyfile(built, path + ".tmp")
            os.replace(path + ".tmp", path)
    except Exception as e:  # no ninja, a toolkit that differs from torch's CUDA, ...: the same source through nvcc
        print(f"kernels.py: torch.utils.cpp_extension failed ({type(e).__name__}: {str(e).strip()[-300:]}); "
              f"building with plain nvcc", flush=True)
        _build_with_nvcc(path, cc)
    print(f"kernels.py: built in {time.time() - t0:.0f} s", flush=True)
    return path


def _build_with_torch(name, folder, major, minor):
    from torch.utils.cpp_extension import load
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # for the GPU in hand only: one arch compiles fast
    try:  # is_python_module=False: a plain shared library (cpp_extension locks the folder against other ranks)
        return load(name, [SOURCE], extra_cuda_cflags=["-O3", "-lineinfo"], build_directory=folder,
                    with_cuda=True, is_python_module=False)
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def nvcc_command(out, cc):
    """The plain nvcc build of the library (the CUDA runtime linked statically: nothing to find at load time)."""
    from torch.utils.cpp_extension import CUDA_HOME
    candidates = [os.path.join(CUDA_HOME, "bin", "nvcc")] if CUDA_HOME else []
    candidates += [shutil.which("nvcc")] + sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True)
    nvcc = next((c for c in candidates if c and os.path.exists(c)), None)
    if nvcc is None:
        raise RuntimeError("no nvcc: install the CUDA toolkit or set CUDA_HOME")
    return [nvcc, "-O3", "-lineinfo", "-std=c++17", f"-gencode=arch=compute_{cc},code=sm_{cc}", "-Xcompiler", "-fPIC",
            "-shared", SOURCE, "-o", out]


def _build_with_nvcc(path, cc):
    tmp = f"{path}.{os.getpid()}.tmp"  # then renamed: ranks building at once never load a half-written file
    result = subprocess.run(nvcc_command(tmp, cc), capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"nvcc failed: {result.stderr.strip()[-2000:]}")
    os.replace(tmp, path)


def load_emulated(path):
    """The tests' CPU build (csrc/cuda_emu.h, compiled by tests/test_bench.py or named by
    $FLOWOPD_KERNELS_EMULATED for bench.py): its kernels run on CPU tensors, and loading it switches
    the kernels on, as FLOWOPD_KERNELS=1 does on a GPU."""
    _bind(ctypes.CDLL(path), "cpu")
    _state["on"] = True


def unload():
    """Forget the loaded library and every switch (the tests' teardown): back to the state at import."""
    _state.update(_fresh_state())


# -----------------------------------------------------------------------------------------------
# Launching: raw pointers, sizes and the stream through ctypes; kernels.py checks every layout
# first (the C side trusts it).

RMS_DIMS = (8, 16, 32, 64, 128, 256)  # the head dims rms_fwd/bwd are instantiated for (D / 8 lanes per row)
MODULATE_MAX_D = 8 * 256              # modulate keeps a row in registers: up to 8 vectors of 8 per lane


def _launch(name, *args, like):
    """Call a launcher on the current CUDA stream of like's device (the emulated build takes no stream)."""
    stream = torch.cuda.current_stream(like.device).cuda_stream if like.device.type == "cuda" else None
    err = _state["fns"][name](*args, stream)
    _state["launches"][name] = _state["launches"].get(name, 0) + 1
    if err:
        why = "a size it does not take (a bug in kernels.py's checks)" if err == -1 else \
            _state["fns"]["flowopd_error_string"](err).decode()
        raise RuntimeError(f"kernels.py: {name} failed: {why} (error {err})")


def _ptr(t):
    return None if t is None else t.data_ptr()  # None is a NULL pointer for ctypes


def _kernel_out(name, tensors, sizes, like):
    """A fresh output shaped like `like`, written by launcher `name`: every launcher takes its input
    tensors (pointers; None is NULL), then the output, then the sizes."""
    out = _empty(like)
    _launch(name, *map(_ptr, tensors), _ptr(out), *sizes, like=like)
    return out


def _empty(like, shape=None):
    """A fresh output (contiguous); NaN-filled under check(), so that an element never written shows."""
    out = torch.empty(like.shape if shape is None else shape, dtype=like.dtype, device=like.device)
    return out.fill_(float("nan")) if _state["poison"] else out


def _aligned(t):
    return t.data_ptr() % 16 == 0  # the kernels move 16-byte vectors (8 bf16)


def _contiguous_aligned(t):
    """t as the kernels read it: contiguous and 16-byte aligned (a gradient may come strided, expanded
    or as a view at an odd offset)."""
    t = t.contiguous()
    return t if _aligned(t) else t.clone()


def _grad_in(grad, like):
    """An incoming gradient as a backward kernel reads it: like's dtype, contiguous, aligned."""
    return _contiguous_aligned(grad.to(like.dtype))


def _rows_ok(x):
    """modulate / gated_residual's x: (B, N, D), contiguous, aligned, D a multiple of 8, not empty."""
    return x.dim() == 3 and x.numel() > 0 and x.shape[-1] % 8 == 0 and x.is_contiguous() and _aligned(x)


def _same_layout(y, x):
    return y.shape == x.shape and y.dtype == x.dtype and y.device == x.device and y.is_contiguous() and _aligned(y)


def _sample_stride(v):
    return v.stride(0) if v.shape[0] > 1 else 0  # one vector for the whole batch: every sample reads it


def _per_sample_vector_ok(v, x):
    """scale / shift / gate: one D-vector per sample, (B, 1, D) or (1, 1, D), read in place (the adaLN
    chunks are strided views of one (B, 1, n D) output): x's dtype and device, unit stride along D and
    every sample's vector 16-byte aligned."""
    return (v.dtype == x.dtype and v.device == x.device and v.dim() == 3 and v.shape[0] in (1, x.shape[0])
            and v.shape[1] == 1 and v.shape[2] == x.shape[2] and v.stride(2) == 1 and _sample_stride(v) % 8 == 0
            and _aligned(v))


def _rows_layout(x):
    """rms_norm's x (..., D) as rows at most three strided leading dims away: (rows, n1, n2, s0, s1, s2)
    with row r at r0 s0 + r1 s1 + r2 s2 in row-major order (q or k of the fused qkv needs three:
    (B, H, N) permuted out of (B, N, 3, H)); None if it needs more or a row start is not 16-byte aligned."""
    if x.numel() == 0 or x.stride(-1) != 1 or not _aligned(x):
        return None
    dims = []
    for n, s in zip(x.shape[:-1], x.stride()[:-1]):
        if n == 1:
            continue  # any stride: never stepped
        if dims and dims[-1][1] == n * s:  # contiguous with the dim before: one dim (row order unchanged)
            dims[-1] = (dims[-1][0] * n, s)
        else:
            dims.append((n, s))
    if len(dims) > 3 or any(s % 8 for _, s in dims):
        return None
    (n0, s0), (n1, s1), (n2, s2) = [(1, 0)] * (3 - len(dims)) + dims
    return n0 * n1 * n2, n1, n2, s0, s1, s2


# -----------------------------------------------------------------------------------------------
# The public ops: the kernel where it can take the inputs and no gradient it lacks is needed,
# else the twin. The autograd Functions give the input gradients (x, y) only; the callers send
# anything that needs another gradient to the twin.


def modulate(x, scale, shift):
    """LayerNorm(x) (eps 1e-6, no affine) * (1 + scale) + shift: adaLN-Zero's modulation."""
    if (_use("modulate", x) and _rows_ok(x) and x.shape[-1] <= MODULATE_MAX_D and _per_sample_vector_ok(scale, x)
            and _per_sample_vector_ok(shift, x) and _sample_stride(scale) == _sample_stride(shift)  # one stride in the kernel
            and not _grad_needed(scale, shift)):
        return _Modulate.apply(x, scale, shift)
    return modulate_twin(x, scale, shift)


class _Modulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, shift):
        B, N, D = x.shape
        ctx.sizes = (B * N, N, D, _sample_stride(scale), LN_EPS)  # rows, tokens per sample, D, stride of scale/shift, eps
        ctx.save_for_backward(x, scale)
        return _kernel_out("flowopd_modulate_fwd", (x, scale, shift), ctx.sizes, like=x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        return _kernel_out("flowopd_modulate_bwd", (_grad_in(grad, x), x, scale), ctx.sizes, like=x), None, None


def gated_residual(x, gate, y):
    """x + gate * y: adaLN-Zero's gated residual."""
    if (_use("gated_residual", x) and _rows_ok(x) and _same_layout(y, x) and _per_sample_vector_ok(gate, x)
            and not _grad_needed(gate)):
        return _GatedResidual.apply(x, gate, y)
    return gated_residual_twin(x, gate, y)


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        _, N, D = x.shape
        ctx.sizes = (x.numel(), N * D, D, _sample_stride(gate))  # elements, per sample, D, stride of gate
        ctx.save_for_backward(gate)
        return _kernel_out("flowopd_gated", (x, gate, y), ctx.sizes, like=x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (gate,) = ctx.saved_tensors
        dy = None
        if ctx.needs_input_grad[2]:  # dy = gate * grad: the same kernel without x
            g = _grad_in(grad, gate)
            dy = _kernel_out("flowopd_gated", (None, gate, g), ctx.sizes, like=g)
        return (grad if ctx.needs_input_grad[0] else None), None, dy


def gelu_tanh(x):
    """F.gelu(x, approximate="tanh"): the feed-forwards' activation."""
    if _use("gelu_tanh", x) and x.numel() > 0 and x.numel() % 8 == 0 and x.is_contiguous() and _aligned(x):
        return _GeluTanh.apply(x)
    return gelu_tanh_twin(x)


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _kernel_out("flowopd_gelu_fwd", (x,), (x.numel(),), like=x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _kernel_out("flowopd_gelu_bwd", (_grad_in(grad, x), x), (x.numel(),), like=x)


def rms_norm(x, weight, eps=1e-6):
    """F.rms_norm over the last dim, times weight (cast to x's dtype, as model.RMSNorm does): SD3.5's
    q/k norm. x may be a strided view (q or k of the fused qkv); the output is contiguous."""
    if _use("rms_norm", x) and x.shape[-1] in RMS_DIMS and weight.numel() == x.shape[-1] and not _grad_needed(weight):
        layout = _rows_layout(x)
        if layout is not None:
            w = _contiguous_aligned(weight.detach().to(x.dtype).reshape(-1))
            return _RMSNorm.apply(x, w, float(eps), layout)
    return rms_norm_twin(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps, layout):
        ctx.sizes = (*layout, x.shape[-1], eps)  # rows, n1, n2, s0, s1, s2 (x's addressing), D, eps
        ctx.save_for_backward(x, w)
        return _kernel_out("flowopd_rms_fwd", (x, w), ctx.sizes, like=x)  # contiguous, rows in x's row-major order

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors  # dx contiguous: autograd takes a gradient in any strides
        return _kernel_out("flowopd_rms_bwd", (_grad_in(grad, x), x, w), ctx.sizes, like=x), None, None, None


# -----------------------------------------------------------------------------------------------
# The SDE step: fp32, the kernel for sampling and scoring without gradients (model.rollout).


def sde_step(latents, velocity, sigma, sigma_next, sigma_max, noise_level, noise=None, next_latents=None):
    """model.sde_step: one Flow-GRPO SDE step, x_next ~ N(mean, std^2 |dt| I), returning (x_next,
    log_prob, mean, step_std); with next_latents given, scores that transition instead of sampling.
    The kernel does the elementwise work and the per-sample log-prob in one pass (fp32)."""
    other = noise if next_latents is None else next_latents
    fused = enabled("sde_step") and other is not None and latents.device.type == _state["device"] \
        and all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == latents.shape and t.device == latents.device
                for t in (latents, velocity, other)) \
        and latents.dim() >= 2 and latents[0].numel() > 0 and not _grad_needed(latents, velocity, other)
    if not fused:
        return sde_step_twin(latents, velocity, sigma, sigma_next, sigma_max, noise_level, noise, next_latents)
    import model
    device, B = latents.device, latents.shape[0]
    std = model.sde_std(sigma, sigma_max, noise_level).to(device)
    step_std = std * torch.sqrt(torch.as_tensor(sigma, device=device) - torch.as_tensor(sigma_next, device=device))
    # per-sample coefficients with the twin's own ops, so the kernel's elementwise arithmetic matches it
    s, s_next, std_b, step_b = (model._per_sample(t, latents).reshape(-1).expand(B) for t in (sigma, sigma_next, std, step_std))
    coef = torch.stack([std_b ** 2 / (2 * s), 1 - s, s_next - s, step_b, 2 * step_b ** 2, torch.log(step_b)], 1).float().contiguous()
    mean, log_prob = _empty(latents), _empty(latents, (B,))
    out = _empty(latents) if next_latents is None else None
    _launch("flowopd_sde_step", _ptr(latents), _ptr(velocity), _ptr(other), _ptr(coef), _ptr(out), _ptr(mean), _ptr(log_prob),
            B, latents[0].numel(), int(next_latents is None), like=latents)
    return (out if next_latents is None else next_latents), log_prob, mean, step_std


# -----------------------------------------------------------------------------------------------
# check(): every kernel against its twin on fresh random inputs (METHOD: relative error against a
# float64 reference, NaN-poisoned outputs, the twin's own bf16 error beside it as the yardstick).


def _rel(a, ref):
    a = a.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item() if torch.isfinite(a).all() else float("inf")


def _bf16_verdict(err_k, err_t):
    # within bf16 rounding: one rounding per output (~1e-3 relative) where the twin rounds after each op
    return err_k <= max(1.25 * err_t, 2e-3) and err_k <= 1e-2


def _cases(device, small):
    g = torch.Generator(device="cpu").manual_seed(int(time.time_ns() % 2 ** 31))  # fresh inputs every run

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    D = 64 if small else 1536
    shapes = [(2, 5, D), (3, 7, 64), (2, 3, 1000 if not small else 40)] if small else \
        [(4, 1229, D), (2, 205, D), (3, 7, 64), (2, 3, 1000)]
    heads = [(2, 5, 2, 64), (2, 3, 3, 32)] if small else [(4, 1229, 24, 64), (2, 9, 3, 128), (3, 5, 2, 32)]
    return g, randn, shapes, heads


def check(device="cuda", small=False, verbose=True):
    """Compare every kernel (forward and input gradients) with its twin on fresh random inputs.
    Returns rows {op, case, what, err_kernel, err_twin, ok}; err = ||out - ref|| / ||ref|| against
    the twin in float64 on the same (upcast) inputs. small: little shapes (the emulated CPU build)."""
    if not enabled():
        raise RuntimeError("kernels unavailable: " + str(_state["error"] or "no CUDA device and no emulated build loaded"))
    rows = []
    g, randn, shapes, heads = _cases(device, small)
    bf = torch.bfloat16

    def record(op, case, what, out_k, out_t, ref):
        ek, et = _rel(out_k, ref), _rel(out_t, ref)
        rows.append(dict(op=op, case=case, what=what, err_kernel=ek, err_twin=et, ok=_bf16_verdict(ek, et)))

    def grads(fn, inputs, grad_out):
        inputs = [t.detach().requires_grad_(True) for t in inputs]
        out = fn(*inputs)
        out.backward(grad_out)
        return out.detach(), [t.grad for t in inputs]

    _state["poison"] = True
    try:
        for B, N, D in shapes:
            case = f"{B}x{N}x{D}"
            x, y = randn(B, N, D, scale=2.0).to(bf), randn(B, N, D).to(bf)
            ada = randn(B, 9 * D, scale=0.5).to(bf)[:, None]  # chunks of an adaLN output: strided (B, 1, D)
            scale, shift, gate = ada[..., 2 * D:3 * D], ada[..., 5 * D:6 * D], ada[..., 7 * D:8 * D]
            go = randn(B, N, D).to(bf)
            # (a) LayerNorm + modulate
            out_k, (dx_k,) = grads(lambda t: modulate(t, scale, shift), [x], go)
            with disabled():
                out_t, (dx_t,) = grads(lambda t: modulate(t, scale, shift), [x], go)
            out_r, (dx_r,) = grads(lambda t: modulate_twin(t, scale.double(), shift.double()), [x.double()], go.double())
            record("modulate", case, "forward", out_k, out_t, out_r)
            record("modulate", case, "d x", dx_k, dx_t, dx_r)
            # (b) gated residual
            out_k, (dx_k, dy_k) = grads(lambda a, b: gated_residual(a, gate, b), [x, y], go)
            with disabled():
                out_t, (dx_t, dy_t) = grads(lambda a, b: gated_residual(a, gate, b), [x, y], go)
            out_r, (dx_r, dy_r) = grads(lambda a, b: gated_residual_twin(a, gate.double(), b), [x.double(), y.double()], go.double())
            record("gated_residual", case, "forward", out_k, out_t, out_r)
            record("gated_residual", case, "d x", dx_k, dx_t, dx_r)
            record("gated_residual", case, "d y", dy_k, dy_t, dy_r)
            # (c) GELU-tanh, on a wider range (the feed-forward's hidden layer)
            h = randn(B, N, D, scale=3.0).to(bf)
            out_k, (dh_k,) = grads(gelu_tanh, [h], go)
            with disabled():
                out_t, (dh_t,) = grads(gelu_tanh, [h], go)
            out_r, (dh_r,) = grads(gelu_tanh_twin, [h.double()], go.double())
            record("gelu_tanh", case, "forward", out_k, out_t, out_r)
            record("gelu_tanh", case, "d x", dh_k, dh_t, dh_r)
        # (d) QK RMSNorm on q and k viewed out of a fused qkv projection, as model.Attention does
        for B, N, H, Dh in heads:
            case = f"q,k of {B}x{N}x3x{H}x{Dh}"
            qkv = randn(B, N, 3 * H * Dh, scale=2.0).to(bf)
            w = (1 + randn(Dh, scale=0.2)).to(bf)
            go = randn(B, H, N, Dh).to(bf)
            for name, part in (("q", 0), ("k", 1)):
                view = lambda t: t.view(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)[part]  # noqa: E731
                out_k, (d_k,) = grads(lambda t: rms_norm(view(t), w, 1e-6), [qkv], go)
                with disabled():
                    out_t, (d_t,) = grads(lambda t: rms_norm(view(t), w, 1e-6), [qkv], go)
                out_r, (d_r,) = grads(lambda t: rms_norm_twin(view(t), w.double(), 1e-6), [qkv.double()], go.double())
                record("rms_norm", case, f"{name} forward", out_k, out_t, out_r)
                record("rms_norm", case, f"{name}: d qkv", d_k, d_t, d_r)
        # (e) the SDE step, fp32: sampling at one noise level for the batch (rollout) and scoring at
        # per-sample levels; the kernel must match the fp32 twin (mean and sample to the bit)
        sigmas = torch.tensor([1.0, 0.97, 0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.02, 0.0], device=device)
        lat = (4, 16, 8, 8) if small else (16, 16, 64, 64)
        for mode in ("sample", "score"):
            x, v, noise = randn(*lat), randn(*lat), randn(*lat)
            if mode == "sample":
                j = 0
                args = (x, v, sigmas[j], sigmas[j + 1], sigmas[1], 0.7)
                kw = dict(noise=noise)
            else:
                j = torch.arange(lat[0], device=device) % 9
                args = (x, v, sigmas[j], sigmas[j + 1], sigmas[1], 0.7)
                kw = dict(next_latents=x + 0.1 * noise)
            nk, lpk, mk, _ = sde_step(*args, **kw)
            with disabled():
                nt, lpt, mt, _ = sde_step(*args, **kw)
            args64 = (x.double(), v.double(), *args[2:])
            kw64 = {k: t.double() for k, t in kw.items()}
            nr, lpr, mr, _ = sde_step_twin(*args64, **kw64)
            for what, a, b, r in (("mean", mk, mt, mr), ("next", nk, nt, nr), ("log_prob", lpk, lpt, lpr)):
                ek, et = _rel(a, r), _rel(b, r)
                same = torch.equal(a, b)
                if what == "log_prob":  # a reduction in another order: fp32 rounding apart
                    ok = bool(torch.isfinite(a).all()) and (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
                else:
                    ok = same or (bool(torch.isfinite(a).all()) and (a - b).abs().max().item() <= 1e-6 * b.abs().max().item())
                rows.append(dict(op="sde_step", case=f"{mode} {'x'.join(map(str, lat))}", what=what + (" (bitwise)" if same else ""),
                                 err_kernel=ek, err_twin=et, ok=ok))
    finally:
        _state["poison"] = False
    if verbose:
        print(format_check(rows), flush=True)
    return rows


def format_check(rows):
    lines = ["| kernel | case | output | rel. error, kernel | rel. error, twin (model.py) | ok |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['case']} | {r['what']} | {r['err_kernel']:.2e} | {r['err_twin']:.2e} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)
