"""cold_start.py: the merges through the script against float64 (exact, best rank-r, naive), the flow-matching
loss and the timestep density against float64 / their closed forms, and the SFT and pre-training paths end
to end on a tiny pixel-space pipeline (the loss drops, the data cache resumes, 2 ranks equal 1, resume)."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import model as M

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
SFT = dict(mode="sft", resolution=16, t5_length=8, samples_per_teacher=8, shard_size=4, sample_batch_size=4, sample_steps=4,
           lora_rank=4, lora_alpha=4.0, steps=60, batch_size=4, lr=1e-2, warmup=1, save_every=5, keep=0, grid_every=1000,
           dtype="float32")


def _args(**kw):
    return [f"--{k}={v}" for k, v in kw.items()]


def _run(args, ranks=1, check=True):
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    out = subprocess.run(launcher + ["cold_start.py"] + args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    if check and out.returncode:
        raise AssertionError(out.stderr[-3000:])
    return out


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def _random_adapter(model, name, rank, alpha, seed, targets=M.DEFAULT_LORA_TARGETS):
    """A teacher-like adapter: gaussian A (add_adapter's init, its own seed), B ~ N(0, 0.3)."""
    M.add_adapter(model, name, rank=rank, alpha=alpha, targets=targets, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    for layer in model.lora_layers().values():
        if name in layer.lora_B:
            has = torch.tensor(layer.lora_has_part[name], dtype=torch.float32)[:, None, None]
            layer.lora_B[name].data.copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.3 * has)
    return M.adapter_state(model, name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pixel-space pipeline (16 and 32 px), two teachers with their prompt files, for SFT."""
    root = tmp_path_factory.mktemp("cold")
    M.build_tiny_pipeline(str(root / "tiny"), num_layers=2, codec="pixel", pixel_factor=2, sample_size=8)
    model = M.load_transformer(str(root / "tiny" / "transformer"))
    for name, fmt, seed in (("a", "peft", 1), ("b", "diffusers", 2)):
        M.write_adapter(_random_adapter(model, name, 4, 4.0, seed), str(root / "teachers" / name), fmt, base_model="tiny")
    (root / "a.txt").write_text("a red circle\ntwo blue squares\na green triangle\nthe word cat\n")
    (root / "b.jsonl").write_text("".join(json.dumps({"prompt": p, "tag": "x"}) + "\n" for p in ("a dog", "a cat left of a box", "sky")))
    return root


def _teachers(root):
    """a and b, and c: a's adapter and prompts under another name (its samples must still be its own)."""
    return [{"name": "a", "adapter": str(root / "teachers" / "a"), "prompts": str(root / "a.txt"), "weight": 1.0},
            {"name": "b", "adapter": str(root / "teachers" / "b"), "prompts": str(root / "b.jsonl"), "weight": 1.0},
            {"name": "c", "adapter": str(root / "teachers" / "a"), "prompts": str(root / "a.txt"), "weight": 1.0}]


# ---- merge mode ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merges(world, tmp_path_factory):
    """Teacher adapters in both formats with different A's, ranks and scales, and the merge runs on them
    (independent, started at once): {case: (process, stderr, out_dir)}."""
    root = tmp_path_factory.mktemp("merge")
    model = M.load_transformer(str(world / "tiny" / "transformer"))
    specs = {"t1": ("peft", 4, 8.0, 1), "t2": ("diffusers", 4, 8.0, 2), "t3": ("peft", 2, 2.0, 3)}
    for name, (fmt, rank, alpha, seed) in specs.items():
        M.write_adapter(_random_adapter(model, name, rank, alpha, seed), str(root / name), fmt, base_model="tiny")
    narrow = _random_adapter(model, "narrow", 4, 8.0, 4, targets=["attn.to_q", "attn.to_k", "attn.to_v"])
    M.write_adapter(narrow, str(root / "narrow"), "peft", base_model="tiny")  # other target modules
    wide = dict(_random_adapter(model, "wide", 4, 8.0, 5))
    A, B, s = wide["transformer_blocks.1.attn.to_v"]
    wide["transformer_blocks.1.attn.to_v"] = (torch.zeros(4, 32), B, s)  # a wider network's to_v
    M.write_adapter(wide, str(root / "wide"), "diffusers", base_model="tiny")
    teachers = lambda *names, w=(3.0, 1.0, 2.0): [{"name": n, "adapter": str(root / n), "prompts": "", "weight": x}
                                                 for n, x in zip(names, w)]
    cases = {"exact": dict(teachers=teachers("t1", "t2", "t3")),
             "rank": dict(teachers=teachers("t1", "t2", "t3"), merge_rank=3),
             "naive": dict(teachers=teachers("t1", "t2"), merge_naive=True),
             "targets": dict(teachers=teachers("t1", "narrow")),
             "shapes": dict(teachers=teachers("t1", "wide"))}
    procs = {case: subprocess.Popen([sys.executable, "cold_start.py"] + _args(mode="merge", out_dir=root / case, **over),
                                    cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for case, over in cases.items()}
    runs = {case: (p, p.communicate(timeout=300)[1], root / case) for case, p in procs.items()}
    return root, runs


def _merge_inputs(root, names, weights):
    deltas = [M.adapter_delta(M.read_adapter(str(root / n))[0]) for n in names]
    states = [M.read_adapter(str(root / n))[0] for n in names]
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)  # the script's weights sum to 1
    exact = {k: sum(wk * d[k] for wk, d in zip(w.tolist(), deltas)) for k in deltas[0]}
    return states, w.tolist(), exact


def _merge_output(runs, case):
    proc, stderr, out = runs[case]
    assert proc.returncode == 0, stderr[-2000:]
    merged, info = M.read_adapter(str(out / "adapter"))
    return merged, info, json.load(open(out / "merge_report.json"))


def test_exact_merge_is_the_weighted_sum_of_deltas(merges):
    root, runs = merges
    merged, info, report = _merge_output(runs, "exact")
    states, w, exact = _merge_inputs(root, ["t1", "t2", "t3"], [3.0, 1.0, 2.0])
    assert info["base_model"] == "tiny" and report["report"]["rank"] == 4 + 4 + 2
    assert merged.keys() == exact.keys()
    for k, (A, B, scale) in merged.items():
        assert A.shape[0] == 10
        delta = M.adapter_delta({k: (A, B, scale)})[k]
        # The merged factors are stored in float32: B = [w_1 s_1 B_1, ...] rounds once per element, A is copied.
        # That rounding is the only error allowed: |delta - exact| <= 2^-24 sum_k |w_k s_k B_k| |A_k| (+ float64 noise).
        bound = sum(abs(wk * s) * Bk.double().abs() @ Ak.double().abs() for wk, (Ak, Bk, s) in zip(w, (st[k] for st in states)))
        assert ((delta - exact[k]).abs() <= 2 ** -24 * bound + 1e-12 * exact[k].abs().max()).all(), k
    assert report["report"]["max_relative_error"] <= 1e-6


def test_rank_r_merge_is_the_best_rank_r_approximation(merges):
    """Eckart-Young: the truncated SVD of the exact delta, computed here in float64, and the reported error is
    ||dW - dW_r|| / ||dW|| per layer."""
    root, runs = merges
    merged, _, report = _merge_output(runs, "rank")
    _, _, exact = _merge_inputs(root, ["t1", "t2", "t3"], [3.0, 1.0, 2.0])
    errors = report["per_layer_relative_error"]
    assert report["report"]["rank"] == 3 and merged.keys() == exact.keys()
    for k, dW in exact.items():
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        delta = M.adapter_delta({k: merged[k]})[k]
        assert merged[k][0].shape[0] == 3
        assert (delta - best).norm() <= 1e-6 * best.norm(), k  # float32 storage of the factors
        expected = ((dW - best).norm() / dW.norm()).item()
        assert expected > 1e-2 and abs(errors[k] - expected) <= 1e-6, (k, errors[k], expected)  # rank 10 -> 3 loses
        assert math.isclose(expected, (S[3:].square().sum().sqrt() / S.square().sum().sqrt()).item(), rel_tol=1e-9)


def test_naive_merge_differs_from_the_exact_one(merges):
    """The reference's average of A and B separately: mean(B) mean(A) != mean(B A) when the A's differ."""
    root, runs = merges
    merged, _, report = _merge_output(runs, "naive")
    states, w, exact = _merge_inputs(root, ["t1", "t2"], [3.0, 1.0])
    for k, dW in exact.items():
        naive = M.adapter_delta({k: merged[k]})[k]
        s = states[0][k][2]
        averaged = s * sum(wk * st[k][1].double() for wk, st in zip(w, states)) @ sum(wk * st[k][0].double() for wk, st in zip(w, states))
        assert (naive - averaged).norm() <= 1e-6 * averaged.norm(), k  # it is the reference's rule ...
        relative = ((naive - dW).norm() / dW.norm()).item()
        assert relative > 0.1, k  # ... and not the weighted sum of deltas
        assert abs(report["per_layer_relative_error"][k] - relative) <= 1e-5


@pytest.mark.parametrize("case,message", [
    ("targets", "adapters 0 and 1 target different layers (first difference: transformer_blocks.0.attn.add_k_proj)"),
    ("shapes", "adapters 0 and 1 differ in the shape of transformer_blocks.1.attn.to_v"),
])
def test_mismatched_adapters_are_an_error_naming_the_key(merges, case, message):
    _, runs = merges
    proc, stderr, out = runs[case]
    assert proc.returncode != 0 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, last
    assert not os.path.exists(out)  # nothing written


# ---- the flow-matching loss and the timestep density ---------------------------------------------------------


def test_flow_matching_loss_equals_float64_reference():
    """METHOD 1: E ||v - (e - x0)||^2; the target is dx_s/ds of x_s = (1 - s) x0 + s e (a central difference,
    exact for a line), reduced as the sum over every element over their count."""
    g = torch.Generator().manual_seed(0)
    x0, e, v = (torch.randn(3, 12, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    s = torch.rand(3, generator=g, dtype=torch.float64).view(-1, 1, 1, 1) * 0.8 + 0.1
    x_s = lambda s: (1 - s) * x0 + s * e
    target = (x_s(s + 0.05) - x_s(s - 0.05)) / 0.1
    reference = lambda v: sum(((v[i] - target[i]) ** 2).sum() for i in range(3)) / v.numel()
    assert abs(M.flow_matching_loss(v, x0, e, s.flatten()).item() - reference(v).item()) <= 1e-12 * reference(v).item()
    ours = M.flow_matching_loss(v.float(), x0.float(), e.float(), s.flatten().float())
    assert ours.dtype == torch.float32 and abs(ours.item() - reference(v).item()) <= 1e-6 * reference(v).item()
    v16 = v.bfloat16()  # a bf16 network output is upcast before the subtraction, not rounded again
    ours16 = M.flow_matching_loss(v16, x0.float(), e.float(), s.flatten().float())
    assert abs(ours16.item() - reference(v16.double()).item()) <= 1e-6 * reference(v16.double()).item()
    assert M.flow_matching_loss(e - x0, x0, e, s.flatten()).item() <= 1e-30  # zero at the true velocity


@pytest.mark.parametrize("density,mean,std,shift", [
    ("logit_normal", 0.0, 1.0, 1.0), ("logit_normal", 0.5, 0.6, 1.0), ("logit_normal", 0.0, 1.0, 3.0), ("uniform", 0.0, 1.0, 1.0)])
def test_timestep_density_has_the_stated_quantiles(density, mean, std, shift):
    """s = sigmoid(N(mean, std)) (SD3) or U(0, 1), then s -> shift s / (1 + (shift - 1) s): its CDF is
    F(s) = Phi((logit(u) - mean) / std) at u = s / (shift - (shift - 1) s). Median and quantiles of 200k
    draws within 0.005, and the Kolmogorov-Smirnov distance below the 99.9% critical value 1.95 / sqrt(n)."""
    n = 200_000
    s = M.sample_timesteps(n, torch.Generator().manual_seed(0), density, mean, std, shift=shift).double()
    assert s.shape == (n,) and 0 < s.min() and s.max() < 1
    unshift = lambda s: s / (shift - (shift - 1) * s)
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
    if density == "logit_normal":
        cdf = lambda s: normal.cdf(torch.logit(unshift(s)))
        quantile = lambda q: torch.sigmoid(normal.icdf(torch.tensor(q, dtype=torch.float64)))
    else:
        cdf = unshift
        quantile = lambda q: torch.tensor(q, dtype=torch.float64)
    shifted = lambda u: shift * u / (1 + (shift - 1) * u)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert abs(torch.quantile(s.float(), q).item() - shifted(quantile(q)).item()) <= 0.005, q
    if density == "logit_normal" and shift == 1.0:
        assert abs(s.median().item() - 1 / (1 + math.exp(-mean))) <= 0.005
    ordered = s.sort().values
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf(ordered), cdf(ordered) - torch.arange(n) / n).max().item()
    assert ks <= 1.95 / math.sqrt(n), ks


# ---- SFT, the data cache, 2 ranks ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft(world):
    """One SFT run, single process: 8 samples from each of 3 teachers in shards of 4, 60 steps of 4 pairs."""
    out, data = world / "sft", world / "sft_data"
    _run(_args(model=world / "tiny", teachers=_teachers(world), out_dir=out, data_dir=data, **SFT))
    return out, data


def _pairs(data):
    manifest = json.load(open(data / "manifest.json"))["shards"]
    latents, captions = [], []
    for shard in manifest:
        with safe_open(str(data / shard["file"]), framework="pt") as f:
            latents.append(f.get_tensor("latents").float())
            captions += json.loads(f.metadata()["prompts"])
    return manifest, torch.cat(latents), captions


def test_sft_lowers_the_loss_on_its_training_pairs(world, sft):
    """The flow-matching loss of the base and of the trained student on the 24 cached pairs, 4 draws of noise
    and noise level per pair, the same for both. Most of that loss is irreducible for a random tiny network
    in 60 steps (it cannot infer x0 from x_s; measured: 1.5% lower), so the check is statistical: the
    paired differences' mean is above 5 standard errors."""
    out, data = sft
    manifest, latents, captions = _pairs(data)
    assert [s["file"] for s in manifest] == [f"{t}_0000{k}.safetensors" for t in "abc" for k in (0, 1)]
    assert latents.shape == (24, 12, 8, 8) and len(captions) == 24
    a_prompts, b_prompts = set(open(world / "a.txt").read().split("\n")), {"a dog", "a cat left of a box", "sky"}
    assert set(captions[:8]) <= a_prompts and set(captions[8:16]) <= b_prompts  # each teacher on its own prompts
    # c is a under another name: its own prompt draws and initial noise, so other samples
    assert captions[16:] != captions[:8] and not any(torch.equal(x, y) for x in latents[16:] for y in latents[:8])
    pipe = M.load_pipeline(str(world / "tiny"), t5_length=8)
    latents, captions = latents.repeat(4, 1, 1, 1), captions * 4
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(latents.shape, generator=g)
    sigma = M.sample_timesteps(len(latents), g)
    s = sigma.view(-1, 1, 1, 1)
    embeds, pooled = pipe.text.encode(captions)

    def losses():  # flow_matching_loss per pair
        with torch.no_grad():
            velocity = M.predict_velocity(pipe.transformer, (1 - s) * latents + s * noise, sigma, embeds, pooled)
        return torch.stack([M.flow_matching_loss(velocity[i], latents[i], noise[i], sigma[i]) for i in range(len(latents))])
    base = losses()
    M.load_adapter(pipe.transformer, "student", str(out))
    with pipe.transformer.adapter("student"):
        student = losses()
    lower = base - student
    assert lower.mean() > 5 * lower.std() / math.sqrt(len(lower)), (base.mean(), student.mean())
    assert len(_log(out)) == 60 and all(math.isfinite(r["loss"]) for r in _log(out))


def test_data_cache_resumes_without_regenerating(world, sft, tmp_path):
    """Finished shards are kept (their mtimes unchanged); a truncated one is regenerated alone, identical."""
    _, data = sft
    cache = tmp_path / "data"
    shutil.copytree(data, cache)  # copy2: mtimes preserved
    shards = sorted(p for p in os.listdir(cache) if p.endswith(".safetensors"))
    before = {p: os.stat(cache / p).st_mtime_ns for p in shards}
    original = load_file(str(cache / "a_00001.safetensors"))["latents"].clone()  # not a view of the file's mmap
    blob = open(cache / "a_00001.safetensors", "rb").read()
    open(cache / "a_00001.safetensors", "wb").write(blob[:len(blob) // 2])  # a run killed mid-write, without _atomic
    _run(_args(model=world / "tiny", teachers=_teachers(world), out_dir=tmp_path / "out", data_dir=cache, **dict(SFT, steps=1)))
    after = {p: os.stat(cache / p).st_mtime_ns for p in shards}
    assert {p for p in shards if after[p] != before[p]} == {"a_00001.safetensors"}
    assert torch.equal(load_file(str(cache / "a_00001.safetensors"))["latents"], original)
    assert not [p for p in os.listdir(cache) if ".tmp" in p]


def test_two_ranks_equal_one_rank(world, sft, tmp_path):
    """torchrun, 2 ranks (gloo, FSDP2 over the frozen base + LoRA), each with half the batch: the same pairs,
    noise and noise levels per step, gradients averaged over ranks. The cache (made by 2 ranks, every other
    shard each) is bitwise the 1-rank cache; after 5 steps the adapter equals the 1-rank one to 1e-5 of the
    update in Frobenius norm and 1e-4 of the largest update elementwise, the logged losses to 1e-6."""
    out, data = sft
    _run(_args(model=world / "tiny", teachers=_teachers(world), out_dir=tmp_path / "out", data_dir=tmp_path / "data",
               **dict(SFT, steps=5, batch_size=2)), ranks=2)
    for shard in json.load(open(data / "manifest.json"))["shards"]:
        assert torch.equal(load_file(str(tmp_path / "data" / shard["file"]))["latents"], load_file(str(data / shard["file"]))["latents"])
    one, _ = M.read_adapter(str(out / "step_000005"))
    two, _ = M.read_adapter(str(tmp_path / "out" / "step_000005"))
    model = M.load_transformer(str(world / "tiny" / "transformer"))
    M.add_adapter(model, "init", rank=4, alpha=4.0, seed=0)  # the script's initial student (seed 0)
    init = M.adapter_state(model, "init")
    for i in (0, 1):  # A and B
        update = torch.cat([(one[k][i] - init[k][i]).flatten() for k in one])
        diff = torch.cat([(one[k][i] - two[k][i]).flatten() for k in one])
        assert update.abs().max() > 1e-4
        assert diff.norm() <= 1e-5 * update.norm() and diff.abs().max() <= 1e-4 * update.abs().max(), (i, diff.abs().max())
    assert len(_log(tmp_path / "out")) == 5
    for a, b in zip(_log(out)[:5], _log(tmp_path / "out")):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"]


# ---- pre-training from scratch on an image-caption folder ----------------------------------------------------


@pytest.fixture(scope="module")
def pretraining(world, tmp_path_factory):
    import toyworld
    root = tmp_path_factory.mktemp("pretrain")
    toyworld.make_pretraining_set(str(root / "images"), 24, seed=0, size=32)
    common = dict(model=world / "tiny", images=root / "images", data_dir=root / "latents", init="scratch", train="full",
                  resolution=32, t5_length=8, batch_size=4, lr=1e-3, warmup=1, ema_decay=0.5, save_every=2, keep=10,
                  grid_every=1000, sample_steps=4, shard_size=8, dtype="float32")
    _run(_args(out_dir=root / "full", steps=4, **common))  # uninterrupted, 4 steps
    return root, common


def test_pretraining_writes_a_loadable_pipeline(world, pretraining):
    root, _ = pretraining
    final = M.latest_checkpoint(str(root / "full"))
    assert final.endswith("step_000004") and len(_log(root / "full")) == 4
    pipe = M.load_pipeline(os.path.join(final, "pipeline"), t5_length=8)  # the folder is a whole pipeline
    assert isinstance(pipe.codec, M.PixelCodec) and pipe.latent_shape(32) == (12, 16, 16)
    skeleton = M.load_transformer(str(world / "tiny" / "transformer"))
    ema, trained = pipe.transformer.state_dict(), M.load_transformer(os.path.join(final, "trained_transformer")).state_dict()
    assert pipe.transformer.proj_out.weight.abs().max() > 0  # zero at the scratch init: trained
    assert not torch.equal(ema["proj_out.weight"], skeleton.state_dict()["proj_out.weight"])
    assert any(not torch.equal(ema[k], trained[k]) for k in ema)  # the pipeline ships the EMA, not the last weights


def test_pretraining_resume_equals_uninterrupted(pretraining):
    """Stopped at step 2 and resumed to 4: the trained weights, their EMA and the log equal the 4-step run's."""
    root, common = pretraining
    _run(_args(out_dir=root / "resumed", steps=2, **common))
    _run(_args(out_dir=root / "resumed", steps=4, resume=True, **common))
    full, resumed = (M.latest_checkpoint(str(root / d)) for d in ("full", "resumed"))
    for part in ("pipeline/transformer", "trained_transformer"):
        a, b = (M.read_safetensors_folder(os.path.join(c, part)) for c in (full, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    strip = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log if "resumed_from" not in r]  # steps 2 -> 4
    assert strip(_log(root / "full")) == strip(_log(root / "resumed"))
