"""model.py against diffusers / transformers (same weights, same outputs) and against float64 math."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD3.5-style pipeline (dual attention in block 0, qk RMSNorm), transformer in sharded files."""
    folder = str(tmp_path_factory.mktemp("tiny"))
    return M.build_tiny_pipeline(folder, num_layers=3, dual_attention_layers=(0, 1), shard_size="20KB")


def _inputs(B=3, seed=0, L=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, 8, 8, generator=g), torch.rand(B, generator=g) * 1000,
            torch.randn(B, L, 48, generator=g), torch.randn(B, 20, generator=g))


@pytest.mark.parametrize("dual,qk_norm", [((0, 1), "rms_norm"), ((), None)])
def test_transformer_equals_diffusers(tmp_path, dual, qk_norm):
    from diffusers import SD3Transformer2DModel
    M.build_tiny_pipeline(str(tmp_path), num_layers=3, dual_attention_layers=dual, qk_norm=qk_norm, shard_size="20KB")
    assert os.path.isfile(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json")  # sharded
    ours = M.load_transformer(str(tmp_path / "transformer"))
    ref = SD3Transformer2DModel.from_pretrained(str(tmp_path / "transformer")).eval()
    x, t, c, p = _inputs()
    run_ref = lambda m, dt: m(hidden_states=x.to(dt), timestep=t, encoder_hidden_states=c.to(dt),
                              pooled_projections=p.to(dt)).sample.float()
    with torch.no_grad():
        fp32, ref32 = ours(x, t, c, p), run_ref(ref, torch.float32)
        assert (fp32 - ref32).abs().max() <= 1e-5
        ours16 = M.load_transformer(str(tmp_path / "transformer"), dtype=torch.bfloat16)
        b16 = ours16(x.bfloat16(), t, c.bfloat16(), p.bfloat16()).float()
        ref16 = run_ref(ref.to(torch.bfloat16), torch.bfloat16)
    # "within bf16 rounding": our bf16 output is as close to diffusers' bf16 output, and to fp32, as
    # diffusers' own bf16 output is to fp32 (a few bf16 ulps of the output's magnitude).
    ref_err = (ref16 - ref32).abs().max()
    assert ref_err < 0.05 * ref32.abs().max()
    assert (b16 - ref16).abs().max() <= 2 * ref_err
    assert (b16 - ref32).abs().max() <= 2 * ref_err


def test_strict_loading_names_the_key(tmp_path, tiny):
    state = M.read_safetensors_folder(os.path.join(tiny, "transformer"))
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "config.json").write_text(open(os.path.join(tiny, "transformer", "config.json")).read())
    missing = dict(state)
    missing.pop("transformer_blocks.1.attn.to_k.weight")
    save_file(missing, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(M.UserError, match=r"missing \['transformer_blocks.1.attn.to_k.weight'\]"):
        M.load_transformer(str(folder))
    extra = dict(state, **{"transformer_blocks.9.attn.to_q.weight": torch.zeros(1)})
    save_file(extra, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(M.UserError, match=r"unexpected \['transformer_blocks.9.attn.to_q.weight'\]"):
        M.load_transformer(str(folder))
    wrong = dict(state, **{"proj_out.weight": torch.zeros(3, 3)})
    save_file(wrong, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(M.UserError, match="proj_out.weight has shape"):
        M.load_transformer(str(folder))


def test_save_transformer_round_trip(tmp_path, tiny):
    from diffusers import SD3Transformer2DModel
    ours = M.load_transformer(os.path.join(tiny, "transformer"))
    M.save_transformer(ours, str(tmp_path))
    ref = SD3Transformer2DModel.from_pretrained(str(tmp_path)).eval()  # diffusers reads what we wrote
    x, t, c, p = _inputs()
    with torch.no_grad():
        assert (ours(x, t, c, p) - ref(hidden_states=x, timestep=t, encoder_hidden_states=c, pooled_projections=p).sample).abs().max() <= 1e-5


def test_text_encoding_and_vae_equal_diffusers_pipeline(tiny):
    from diffusers import StableDiffusion3Pipeline
    pipe = M.load_pipeline(tiny, t5_length=12)
    ref = StableDiffusion3Pipeline.from_pretrained(tiny)
    prompts = ["a red circle", "two blue squares", "", "a red circle"]
    embeds, pooled = pipe.text.encode(prompts)
    ref_embeds, _, ref_pooled, _ = ref.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                     max_sequence_length=12)
    assert embeds.shape == ref_embeds.shape == (4, 77 + 12, 48)
    assert (embeds - ref_embeds).abs().max() <= 1e-5 and (pooled - ref_pooled).abs().max() <= 1e-5
    assert len(pipe.text.cache) == 3  # repeated prompts are encoded once
    pipe.text.cache_budget = 2 * pipe.text.cache_bytes // 3  # room for two prompts: older ones are forgotten
    again, _ = pipe.text.encode(prompts + ["a green triangle", "a red circle"])
    assert (again[:4] - embeds).abs().max() == 0 and len(pipe.text.cache) == 2
    latents = torch.randn(2, 4, 8, 8)
    z = latents / ref.vae.config.scaling_factor + ref.vae.config.shift_factor
    with torch.no_grad():
        expected = (ref.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    assert (pipe.codec.decode(latents) - expected).abs().max() <= 1e-6


def test_pixel_codec_is_lossless():
    codec = M.PixelCodec(factor=2, scaling_factor=1.7, shift_factor=0.1)
    images = torch.rand(2, 3, 8, 8)
    latents = codec.encode(images)
    assert latents.shape == (2, 12, 4, 4)
    assert (codec.decode(latents) - images).abs().max() <= 1e-6


def test_missing_model_is_a_one_line_error(tmp_path):
    with pytest.raises(M.UserError, match="not found: no such local path"):
        M.load_pipeline(str(tmp_path / "nowhere"))
    with pytest.raises(M.UserError, match="transformer/ is missing"):
        M.load_pipeline(str(tmp_path))
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with pytest.raises(M.UserError, match="hf download someone/sd35-that-is-not-here"):
            M.load_pipeline("someone/sd35-that-is-not-here")
    finally:
        del os.environ["HF_HUB_OFFLINE"]


# ---- LoRA ------------------------------------------------------------------------------------------


def _randomize(model, name, seed=0):
    g = torch.Generator().manual_seed(seed)
    for layer in model.lora_layers().values():
        if name in layer.lora_B:
            layer.lora_B[name].data.copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.1)
            has = torch.tensor(layer.lora_has_part[name])[:, None, None].float()
            layer.lora_B[name].data *= has


def test_lora_counts_and_zero_init(tiny):
    model = M.load_transformer(os.path.join(tiny, "transformer"))
    n = M.add_adapter(model, "student", rank=4, alpha=8)
    # 3 blocks x 8 projections, minus the last block's to_add_out (its text stream is not updated)
    modules = [k for k in M.official_modules(model) if M._matches(k, M.DEFAULT_LORA_TARGETS)]
    assert len(modules) == 3 * 8 - 1
    assert n == sum(4 * (16 + 16) for _ in modules)  # r (in + out), width 16
    assert not any(".attn2." in k for k in modules)
    x, t, c, p = _inputs()
    with torch.no_grad():
        base = model(x, t, c, p)
        with model.adapter("student"):
            assert torch.equal(model(x, t, c, p), base)  # B = 0: an untrained adapter changes nothing


def test_lora_equals_merged_weights(tiny):
    """The adapter's effect equals adding scale * B @ A to each official weight (float64 reference)."""
    model = M.load_transformer(os.path.join(tiny, "transformer")).double()
    M.add_adapter(model, "a", rank=3, alpha=5, targets=["attn.to_q", "attn.to_v", "attn.to_out.0", "context_embedder"])
    for layer in model.lora_layers().values():
        for d in (layer.lora_A, layer.lora_B):
            for k in d:
                d[k].data = d[k].data.double()
    _randomize(model, "a")
    merged = M.load_transformer(os.path.join(tiny, "transformer")).double()
    official = M.to_official_state_dict(merged)
    for module, delta in M.adapter_delta(M.adapter_state(model, "a")).items():
        official[f"{module}.weight"] = official[f"{module}.weight"] + delta
    M.load_official_state_dict(merged, official)
    x, t, c, p = (v.double() for v in _inputs())
    with torch.no_grad(), model.adapter("a"):
        assert (model(x, t, c, p) - merged(x, t, c, p)).abs().max() <= 1e-10


def test_partial_targets_stay_partial_under_training(tiny):
    model = M.load_transformer(os.path.join(tiny, "transformer"))
    M.add_adapter(model, "s", rank=2, alpha=2, targets=["attn.to_q"])
    _randomize(model, "s")
    x, t, c, p = _inputs()
    with model.adapter("s"):
        model(x, t, c, p).square().mean().backward()
    layer = model.transformer_blocks[0].attn.to_qkv
    assert layer.lora_B["s"].grad[1:].abs().max() == 0 and layer.lora_B["s"].grad[0].abs().max() > 0
    assert set(M.adapter_state(model, "s")) == {f"transformer_blocks.{i}.attn.to_q" for i in range(3)}


@pytest.mark.parametrize("fmt", ["peft", "diffusers"])
def test_adapter_files_round_trip(tmp_path, tiny, fmt):
    model = M.load_transformer(os.path.join(tiny, "transformer"))
    M.add_adapter(model, "s", rank=4, alpha=8)
    _randomize(model, "s")
    M.save_adapter(model, "s", str(tmp_path), format=fmt, base_model="tiny")
    expected_file = "adapter_model.safetensors" if fmt == "peft" else "pytorch_lora_weights.safetensors"
    keys = set(load_file(str(tmp_path / expected_file)))
    prefix = "base_model.model." if fmt == "peft" else "transformer."
    assert f"{prefix}transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    info = M.load_adapter(model, "t", str(tmp_path))
    assert info["base_model"] == "tiny"
    x, t, c, p = _inputs()
    with torch.no_grad():
        with model.adapter("s"):
            a = model(x, t, c, p)
        with model.adapter("t"):
            b = model(x, t, c, p)
    assert torch.equal(a, b)


def test_adapter_loads_into_diffusers_pipeline(tmp_path, tiny):
    """An adapter saved by us, loaded with diffusers' load_lora_weights, gives our transformer output."""
    from diffusers import StableDiffusion3Pipeline
    model = M.load_transformer(os.path.join(tiny, "transformer"))
    M.add_adapter(model, "s", rank=4, alpha=8)  # scale 2: diffusers must read alpha from the header
    _randomize(model, "s")
    M.save_adapter(model, "s", str(tmp_path), format="diffusers")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny)
    pipe.load_lora_weights(str(tmp_path))
    x, t, c, p = _inputs()
    with torch.no_grad(), model.adapter("s"):
        ours = model(x, t, c, p)
        theirs = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=c, pooled_projections=p).sample
    assert (ours - theirs).abs().max() <= 1e-5
    with torch.no_grad():
        assert (model(x, t, c, p) - ours).abs().max() > 1e-3  # the adapter mattered (adapter off here)


def test_adapter_for_another_model_is_rejected(tmp_path, tiny):
    model = M.load_transformer(os.path.join(tiny, "transformer"))
    save_file({"base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 99),
               "base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, 4)},
              str(tmp_path / "adapter_model.safetensors"))
    json.dump({"r": 4, "lora_alpha": 4}, open(tmp_path / "adapter_config.json", "w"))
    with pytest.raises(M.UserError, match="do not fit a 16->16 layer"):
        M.load_adapter(model, "x", str(tmp_path))
    save_file({"base_model.model.down_blocks.0.to_q.lora_A.weight": torch.zeros(4, 16),
               "base_model.model.down_blocks.0.to_q.lora_B.weight": torch.zeros(16, 4)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(M.UserError, match="names no layer"):
        M.load_adapter(model, "x", str(tmp_path))


def test_many_adapters_share_one_base(tiny):
    """Teachers and the anchor are adapters on one frozen base: each adds only its LoRA parameters."""
    model = M.load_transformer(os.path.join(tiny, "transformer"))
    base = sum(p.numel() for p in model.parameters())
    sizes = [M.add_adapter(model, name, rank=4, alpha=4, seed=i) for i, name in enumerate(["t0", "t1", "t2", "anchor"])]
    assert sum(p.numel() for p in model.parameters()) == base + sum(sizes)
    for i, name in enumerate(["t0", "t1"]):
        _randomize(model, name, seed=i)
    x, t, c, p = _inputs()
    with torch.no_grad():
        with model.adapter("t0"):
            a = model(x, t, c, p)
        with model.adapter("t1"):
            b = model(x, t, c, p)
        assert (a - b).abs().max() > 1e-3


# ---- samplers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,shift", [(10, 3.0), (40, 3.0), (7, 1.0)])
def test_schedule_and_ode_step_equal_diffusers(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    sigmas = M.sigma_schedule(steps, shift)
    assert (sigmas - sched.sigmas).abs().max() <= 1e-6
    assert (1000 * sigmas[:-1] - sched.timesteps).abs().max() <= 1e-3
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for j in (0, steps // 2, steps - 1):
        sched.set_timesteps(steps)
        sched.set_begin_index(j)
        expected = sched.step(v, sched.timesteps[j], x, return_dict=False)[0]
        assert (M.ode_step(x, v, sigmas[j], sigmas[j + 1]) - expected).abs().max() <= 1e-6


def test_sde_mean_forms_agree():
    """METHOD 2's mean equals Flow-GRPO's form x (1 + std^2/(2s) dt) + v (1 + std^2 (1-s)/(2s)) dt."""
    x, v = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, 5, 5, dtype=torch.float64)
    s, s_next, std = 0.7, 0.55, 0.6
    ref = x * (1 + std ** 2 / (2 * s) * (s_next - s)) + v * (1 + std ** 2 * (1 - s) / (2 * s)) * (s_next - s)
    assert (M.sde_mean(x.float(), v.float(), s, s_next, std).double() - ref).abs().max() <= 1e-5
    sigmas = M.sigma_schedule(10, 3.0)
    stds = M.sde_std(sigmas[:-1], sigmas[1], 0.7)
    assert math.isclose(stds[0].item(), 0.7 * math.sqrt(1 / (1 - sigmas[1].item())), rel_tol=1e-6)
    assert math.isclose(stds[3].item(), 0.7 * math.sqrt(sigmas[3].item() / (1 - sigmas[3].item())), rel_tol=1e-6)


def test_log_prob_equals_torch_normal():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    x = mean + 0.3 * torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    std = torch.tensor([0.1, 0.3, 0.5, 1.2], dtype=torch.float64)
    ref = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1)).log_prob(x).flatten(1).mean(1)
    ours = M.gaussian_log_prob(x.float(), mean.float(), std.float())
    assert (ours.double() - ref).abs().max() <= 1e-5


def test_sde_samples_have_the_stated_mean_and_std():
    x = torch.randn(1, 2, 4, 4).expand(4000, 2, 4, 4)
    v = torch.randn(1, 2, 4, 4).expand(4000, 2, 4, 4)
    noise = torch.randn(4000, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    x_next, log_prob, mean, step_std = M.sde_step(x, v, 0.8, 0.6, 0.9, 0.7, noise)
    expected_std = 0.7 * math.sqrt(0.8 / 0.2) * math.sqrt(0.2)
    assert math.isclose(step_std.item(), expected_std, rel_tol=1e-6)
    assert (x_next.mean(0) - mean[0]).abs().max() < 4 * expected_std / math.sqrt(4000) * 1.5
    assert abs(x_next.std(0).mean().item() / expected_std - 1) < 0.03
    # scoring a stored transition gives back the same log-prob
    _, again, _, _ = M.sde_step(x, v, 0.8, 0.6, 0.9, 0.7, next_latents=x_next)
    assert torch.equal(again, log_prob)


def test_rollout_is_reproducible_per_sample(tiny):
    pipe = M.load_pipeline(tiny, t5_length=8)
    embeds, pooled = pipe.text.encode(["a", "b", "c"])
    neg = pipe.text.encode([""] * 3)
    args = dict(latent_shape=(4, 8, 8), num_steps=4, shift=3.0, guidance=4.5, noise_level=0.7)
    r1 = M.rollout(pipe.transformer, embeds, pooled, *neg, seeds=[11, 12, 13], **args)
    r2 = M.rollout(pipe.transformer, embeds[1:], pooled[1:], neg[0][1:], neg[1][1:], seeds=[12, 13], **args)
    assert r1.latents.shape == (3, 5, 4, 8, 8) and r1.log_probs.shape == (3, 4) and r1.sde_steps == 3
    assert (r1.latents[1:] - r2.latents).abs().max() <= 1e-5  # the same seed, another batch: the same sample
    assert torch.isfinite(r1.log_probs).all() and (r1.log_probs[:, -1] == 0).all()
    # re-scoring the stored transitions with the same model reproduces the sampling log-probs
    for j in range(r1.sde_steps):
        mean, step_std, _ = M.step_distribution(pipe.transformer, r1.latents[:, j], r1.sigmas[j], r1.sigmas[j + 1],
                                                r1.sigmas[1], 0.7, (embeds, pooled), neg, 4.5)
        lp = M.gaussian_log_prob(r1.latents[:, j + 1], mean, step_std)
        assert torch.equal(lp, r1.log_probs[:, j])


def test_rollout_sde_window_and_shared_starting_noise(tiny):
    pipe = M.load_pipeline(tiny, t5_length=8)
    embeds, pooled = pipe.text.encode(["a", "a", "b"])
    neg = pipe.text.encode([""] * 3)
    args = dict(latent_shape=(4, 8, 8), num_steps=5, shift=3.0, guidance=4.5, noise_level=0.7)
    full = M.rollout(pipe.transformer, embeds, pooled, *neg, seeds=[1, 2, 3], **args)
    window = M.rollout(pipe.transformer, embeds, pooled, *neg, seeds=[1, 2, 3], sde_steps=2, **args)
    # the first two steps are the same SDE draws, the rest are the deterministic ODE from there
    assert window.sde_steps == 2 and (window.log_probs[:, 2:] == 0).all() and (window.log_probs[:, :2] != 0).all()
    assert torch.equal(window.latents[:, :3], full.latents[:, :3])
    x = window.latents[:, 2]
    for j in range(2, 5):
        v = M.predict_velocity(pipe.transformer, x, window.sigmas[j], embeds, pooled, *neg, 4.5)
        x = M.ode_step(x, v, window.sigmas[j], window.sigmas[j + 1])
    assert (x - window.latents[:, -1]).abs().max() <= 1e-5
    # init_seeds: one starting noise per group, the SDE noise still each sample's own
    shared = M.rollout(pipe.transformer, embeds, pooled, *neg, seeds=[1, 2, 3], init_seeds=[7, 7, 8], **args)
    assert torch.equal(shared.latents[0, 0], shared.latents[1, 0]) and not torch.equal(shared.latents[0, 0], shared.latents[2, 0])
    assert not torch.equal(shared.latents[0, 1], shared.latents[1, 1])  # same prompt, same start, other SDE noise
    assert torch.equal(shared.latents[0, 0], M.sample_noise((4, 8, 8), [7], "cpu")[0][0])


# ---- losses ----------------------------------------------------------------------------------------


def test_transition_kl_identity_and_conventions():
    """KL_j = ||mean_a - mean_b||^2 / (2 std^2 |dt|) = (|dt|/2) (1/std + std (1-s)/(2s))^2 ||v_a - v_b||^2."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64)
    va, vb = torch.randn(2, 5, 4, 6, 6, generator=g, dtype=torch.float64)
    sigmas = M.sigma_schedule(10, 3.0).double()
    for j in (0, 4, 8):
        s, s_next = sigmas[j], sigmas[j + 1]
        std = M.sde_std(s, sigmas[1], 0.7).double()
        dt = s_next - s
        mean_a, mean_b = M.sde_mean(x, va, s, s_next, std), M.sde_mean(x, vb, s, s_next, std)
        step_std = std * dt.abs().sqrt()
        exact = M.transition_kl(mean_a, mean_b, step_std, dt)
        velocity_form = (dt.abs() / 2) * (1 / std + std * (1 - s) / (2 * s)) ** 2 * ((va - vb) ** 2).flatten(1).mean(1)
        assert (exact - velocity_form).abs().max() <= 1e-9 * velocity_form.abs().max()
        reference = M.transition_kl(mean_a, mean_b, step_std, dt, convention="reference")
        assert (reference - dt.abs() * exact).abs().max() <= 1e-12 * exact.max()
        # the closed form is the KL of the two Gaussians (float64 reference: torch.distributions)
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean_a, step_std), torch.distributions.Normal(mean_b, step_std))
        assert (exact - kl.flatten(1).mean(1)).abs().max() <= 1e-9 * exact.max()


def test_sampled_kl_is_an_unbiased_estimate_of_the_transition_kl():
    """log N(x; a) - log N(x; b) = KL + mean((x - a)(a - b)) / std^2 for x ~ N(a, std^2): exact per draw
    (float64 reference; the log-probs run in float32), and its mean over draws is the closed-form KL."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    b = a + 0.05 * torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    step_std = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    kl = M.transition_kl(a, b, step_std, 1.0)
    draws = a + step_std.view(-1, 1, 1, 1) * torch.randn(4000, 3, 2, 4, 4, generator=g, dtype=torch.float64)
    est = torch.stack([M.sampled_kl(x, a, b, step_std) for x in draws]).double()  # (4000, 3)
    by_hand = kl + ((draws - a) * (a - b)).flatten(2).mean(2) / step_std ** 2
    assert (est - by_hand).abs().max() <= 1e-4 * by_hand.abs().max()
    standard_error = est.std(0) / math.sqrt(len(est))
    assert ((est.mean(0) - kl).abs() <= 4 * standard_error).all() and (kl > 0).all()
    dt = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)  # reference convention: |dt| times, as transition_kl's
    reference = M.sampled_kl(draws[0], a, b, step_std, -dt, "reference").double()
    assert (reference - dt * est[0]).abs().max() <= 1e-6 * est[0].abs().max()


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    groups = [0, 0, 0, 1, 1, 1]
    adv, zero_frac = M.group_advantages(rewards, groups, global_std=True, clip=5.0)
    std = torch.tensor([1, 2, 3, 5, 5, 5.0], dtype=torch.float64).std(unbiased=False).item()  # 1.5723
    expected = torch.tensor([-1, 0, 1, 0, 0, 0]) / (std + 1e-4)
    assert (adv - expected).abs().max() <= 1e-6 and zero_frac == 0.5
    adv, _ = M.group_advantages(rewards, groups, global_std=False)
    group_std = math.sqrt(2 / 3)
    assert (adv - torch.tensor([-1, 0, 1, 0, 0, 0]) / (group_std + 1e-4)).abs().max() <= 1e-6
    adv, _ = M.group_advantages(torch.tensor([0.0, 0.0, 0.0, 10.0]), [0, 0, 0, 0], global_std=False, clip=1.0)
    assert adv.max() == 1.0 and adv.min() >= -1.0  # clipped


def test_clipped_surrogate_equals_float64_reference():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(64, generator=g, dtype=torch.float64)
    new = old + 3e-4 * torch.randn(64, generator=g, dtype=torch.float64)
    adv = torch.randn(64, generator=g, dtype=torch.float64)
    eps = 1e-4
    ratio = torch.exp(new - old)
    ref = torch.stack([-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps)]).max(0).values.mean()
    loss, stats = M.clipped_surrogate(new, old, adv, eps)
    assert abs(loss.item() - ref.item()) <= 1e-12
    assert 0 < stats["clipfrac"] < 1
    # at ratio 1 the gradient is the score-function gradient -A d(log p)/d theta / N
    new = old.clone().requires_grad_(True)
    M.clipped_surrogate(new, old, adv, eps)[0].backward()
    assert (new.grad + adv / 64).abs().max() <= 1e-12


def _nft_inputs(B=5, shape=(3, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, e, v_old = (torch.randn(B, *shape, generator=g, dtype=torch.float64) for _ in range(3))
    v_theta = v_old + 0.3 * torch.randn(B, *shape, generator=g, dtype=torch.float64)
    s = torch.rand(B, generator=g, dtype=torch.float64) * 0.98 + 0.01
    r = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)[:B]
    return x0, e, v_old, v_theta, s, r


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_equals_float64_reference(beta):
    """METHOD 3b.3 written out in float64: both weightings, and the identity between them (x0_hat - x0 = -s (v - u))."""
    x0, e, v_old, v_theta, s, r = _nft_inputs()
    u = e - x0
    v_pos, v_neg = (1 - beta) * v_old + beta * v_theta, (1 + beta) * v_old - beta * v_theta
    msq = lambda d: (d ** 2).flatten(1).mean(1)
    ref = (r * msq(v_pos - u) + (1 - r) * msq(v_neg - u)) / beta
    loss = M.nft_loss(v_theta, v_old, x0, e, s, r, beta, "velocity")
    assert loss.dtype == torch.float64 and loss.shape == (5,) and (loss - ref).abs().max() <= 1e-12
    # adaptive: x0-predictions from x_s, each branch's squared error over its own mean absolute error
    sb = s.view(-1, 1, 1, 1)
    x_s = (1 - sb) * x0 + sb * e
    branch = lambda v: msq(x_s - sb * v - x0) / (x_s - sb * v - x0).abs().flatten(1).mean(1)
    ref = (r * branch(v_pos) + (1 - r) * branch(v_neg)) / beta
    loss = M.nft_loss(v_theta, v_old, x0, e, s, r, beta, "adaptive")
    assert (loss - ref).abs().max() <= 1e-12
    same = lambda v: s * msq(v - u) / (v - u).abs().flatten(1).mean(1)  # the same in velocity terms
    assert (loss - (r * same(v_pos) + (1 - r) * same(v_neg)) / beta).abs().max() <= 1e-12
    with pytest.raises(M.UserError, match="nft_weighting"):
        M.nft_loss(v_theta, v_old, x0, e, s, r, beta, "x0")


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_gradient_at_the_sampling_policy(beta):
    """At v_theta = v_old the gradient of the batch mean is 2 (2r - 1) (v_old - (e - x0)) per element, divided
    by the elements per sample and the batch (the mean reductions), whatever beta; v_old gets none."""
    x0, e, v_old, _, s, r = _nft_inputs()
    v_old.requires_grad_(True)
    v_theta = v_old.detach().clone().requires_grad_(True)
    M.nft_loss(v_theta, v_old, x0, e, s, r, beta, "velocity").mean().backward()
    n = v_theta[0].numel() * len(v_theta)
    expected = 2 * (2 * r.view(-1, 1, 1, 1) - 1) * (v_old.detach() - (e - x0)) / n
    assert (v_theta.grad - expected).abs().max() <= 1e-15 and v_old.grad is None
    assert v_theta.grad[2].abs().max() <= 1e-15  # r = 1/2: no preference, no gradient (up to rounding)


def test_nft_optimality_at_the_clip_edges():
    A = torch.tensor([-9.0, -2.0, -1.0, 0.0, 1.0, 2.0, 9.0], dtype=torch.float64)
    r = M.nft_optimality(A, 2.0)
    assert r.tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_nft_decay_schedule_and_adapter_blend(tiny):
    assert [M.nft_decay(k) for k in (0, 1, 100, 499, 500, 5000)] == [0.0, 0.001, 0.1, 0.499, 0.5, 0.5]
    ocr = [M.nft_decay(k, 75, 0.0075, 0.999) for k in (0, 74, 75, 76, 208, 10000)]
    assert ocr[:3] == [0.0, 0.0, 0.0] and abs(ocr[3] - 0.0075) < 1e-15 and abs(ocr[4] - 0.9975) < 1e-12 and ocr[5] == 0.999
    model = M.load_transformer(os.path.join(tiny, "transformer"))
    M.add_adapter(model, "policy", rank=4, alpha=4.0, seed=1)
    M.add_adapter(model, "old", rank=4, alpha=4.0, seed=2, trainable=False)
    for p in model.adapter_parameters("policy"):
        p.data.normal_()
    before = [p.detach().double().clone() for p in model.adapter_parameters("old")]
    M.blend_adapter(model, "old", "policy", 0.3)
    for b, new, theta in zip(before, model.adapter_parameters("old"), model.adapter_parameters("policy")):
        assert (new.double() - (0.3 * b + 0.7 * theta.double())).abs().max() <= 1e-6
    M.blend_adapter(model, "old", "policy", 0.0)  # eta = 0: the sampling policy is the trained one, bitwise
    assert all(torch.equal(a, b) for a, b in zip(model.adapter_parameters("old"), model.adapter_parameters("policy")))
    M.add_adapter(model, "wide", rank=8, alpha=8.0)
    with pytest.raises(ValueError, match="same layers and ranks"):
        M.blend_adapter(model, "old", "wide", 0.5)


# ---- config, checkpoints, grids --------------------------------------------------------------------


def test_configure_presets_files_and_flags(tmp_path):
    scope = {"preset": "toy", "lr": 3e-4, "steps": 10, "name": "x", "flag": False, "sizes": [1, 2]}
    presets = {"toy": {"steps": 2}, "sd35": {"steps": 100, "name": "sd"}}
    cfg = M.configure(scope, presets, [])
    assert cfg["steps"] == 2
    (tmp_path / "c.py").write_text("lr = 1e-3  # comment\nsizes = [3]\n")
    cfg = M.configure(dict(scope), presets, ["--preset=sd35", f"--config={tmp_path / 'c.py'}", "--flag=True", "--steps=7"])
    assert cfg == {"preset": "sd35", "lr": 1e-3, "steps": 7, "name": "sd", "flag": True, "sizes": [3]}
    with pytest.raises(M.UserError, match="unknown config key 'nope'"):
        M.configure(dict(scope), presets, ["--nope=1"])
    with pytest.raises(M.UserError, match="steps must be a int"):
        M.configure(dict(scope), presets, ["--steps=abc"])
    with pytest.raises(M.UserError, match="unknown preset"):
        M.configure(dict(scope), presets, ["--preset=big"])


def test_checkpoint_killed_mid_save_keeps_the_previous(tmp_path):
    def write(text):
        def w(folder):
            open(os.path.join(folder, "a.txt"), "w").write(text)
        return w
    M.save_checkpoint(str(tmp_path), 1, write("one"))
    def crash(folder):
        open(os.path.join(folder, "a.txt"), "w").write("half")
        raise KeyboardInterrupt  # the run is killed while writing
    with pytest.raises(KeyboardInterrupt):
        M.save_checkpoint(str(tmp_path), 2, crash)
    latest = M.latest_checkpoint(str(tmp_path))
    assert latest.endswith("step_000001") and open(os.path.join(latest, "a.txt")).read() == "one"
    for step in (2, 3, 4, 5):
        M.save_checkpoint(str(tmp_path), step, write(str(step)), keep=2)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step_") and ".tmp" not in d) == ["step_000004", "step_000005"]


def test_draw_groups_is_deterministic_and_mixes_tasks():
    a = M.draw_groups([5, 100, 100], [3, 1, 1], 200, seed=1, iteration=7)
    assert a == M.draw_groups([5, 100, 100], [3, 1, 1], 200, seed=1, iteration=7)
    assert a != M.draw_groups([5, 100, 100], [3, 1, 1], 200, seed=1, iteration=8)
    tasks = [t for t, _ in a]
    assert 0.45 < tasks.count(0) / 200 < 0.75
    first = [i for t, i in a if t == 0][:5]
    assert sorted(first) == [0, 1, 2, 3, 4]  # without replacement until a task's prompts are used up


def test_sample_grid_through_public_functions(tmp_path, tiny):
    """The README's smallest end-to-end run: sample from the tiny pipeline and save a captioned grid."""
    pipe = M.load_pipeline(tiny, t5_length=8)
    prompts = ["a red circle", "two blue squares"]
    embeds, pooled = pipe.text.encode(prompts)
    neg = pipe.text.encode([""] * len(prompts))
    out = M.rollout(pipe.transformer, embeds, pooled, *neg, pipe.latent_shape(16), seeds=[0, 1], num_steps=4,
                    shift=pipe.shift, guidance=4.5, sde=False, keep=False)
    images = pipe.codec.decode(out.latents[:, -1])
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    grid = M.save_grid(images, prompts, str(tmp_path / "grid.png"))
    assert os.path.isfile(tmp_path / "grid.png") and grid.size[0] >= 256


def test_group_init_seeds_one_per_group():
    # a rank's slice of global indices 6..13 with groups of 4: groups 1, 2, 3 -> three distinct seeds
    seeds = M.group_init_seeds(0, 5, range(6, 14), 4)
    assert seeds[:2] == [seeds[0]] * 2 and seeds[2:6] == [seeds[2]] * 4 and seeds[6:] == [seeds[6]] * 2
    assert len({seeds[0], seeds[2], seeds[6]}) == 3
    assert seeds == M.group_init_seeds(0, 5, range(0, 14), 4)[6:]  # a sample's seed does not depend on the slice
    assert not set(seeds) & {M.sample_seed(0, 5, i) for i in range(10 ** 4)}  # apart from the per-sample seeds
    assert M.group_init_seeds(0, 6, [6], 4) != seeds[:1]  # a new draw every iteration


def test_mean_ci_against_statistics():
    """model.mean_ci: the mean, 1.96 s / sqrt(n) with the n - 1 sample std, and s^2 / n, against Python's statistics
    module in float64; one value has no spread; a constant shift moves the mean only."""
    import statistics
    values = torch.randn(37, generator=torch.Generator().manual_seed(0), dtype=torch.float64).tolist()
    mean, ci, var = M.mean_ci(values)
    assert mean == pytest.approx(statistics.fmean(values), abs=1e-15)
    assert ci == pytest.approx(1.96 * statistics.stdev(values) / 37 ** 0.5, rel=1e-12)
    assert var == pytest.approx(statistics.variance(values) / 37, rel=1e-12)
    assert M.mean_ci([0.25]) == (0.25, 0.0, 0.0)
    shifted = M.mean_ci([v + 3 for v in values])
    assert shifted[0] == pytest.approx(mean + 3) and shifted[1] == pytest.approx(ci, rel=1e-9)


def test_tag_mean_ci_is_genevals_overall_with_its_variance():
    """model.tag_mean_ci: the unweighted mean of per-tag means (not the image mean when tags differ in size) and
    1.96 sqrt(sum_t s_t^2 / n_t) / T, against statistics in float64; and rewards.geneval_aggregate's overall."""
    import statistics
    import rewards
    g = torch.Generator().manual_seed(1)
    sizes = {"single_object": 4, "counting": 12, "color_attr": 252}
    tags = [t for t, n in sizes.items() for _ in range(n)]
    values = (torch.rand(len(tags), generator=g, dtype=torch.float64) < 0.4).double().tolist()
    overall, ci, per_tag = M.tag_mean_ci(values, tags)
    groups = {t: [v for v, u in zip(values, tags) if u == t] for t in sizes}
    assert overall == pytest.approx(statistics.fmean(statistics.fmean(v) for v in groups.values()), abs=1e-15)
    assert overall == pytest.approx(rewards.geneval_aggregate([{"tag": t, "correct": v} for v, t in zip(values, tags)])["overall"])
    assert overall != pytest.approx(statistics.fmean(values))  # the image mean weights color_attr 252 / 268
    assert ci == pytest.approx(1.96 * sum(statistics.variance(v) / len(v) for v in groups.values()) ** 0.5 / 3, rel=1e-12)
    assert per_tag["counting"] == M.mean_ci(groups["counting"])
    one = M.tag_mean_ci(values[:4], tags[:4])  # one tag: the plain mean and its CI
    assert one[:2] == pytest.approx(M.mean_ci(values[:4])[:2])
    with pytest.raises(ValueError):
        M.tag_mean_ci(values, tags[:-1])


def test_optimizer_update_clips_steps_and_skips_non_finite():
    """model.optimizer_update: a finite gradient is clipped to max_norm (the returned norm is the unclipped one),
    stepped with, and the EMA follows; a non-finite one leaves the weights and the EMA as they were. The gradients
    are zeroed either way."""
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=1.0)
    ema = M.EMA([("w", w)], decay=0.5, every=1)
    w.grad = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)  # norm 5, clipped to 1
    norm, stepped = M.optimizer_update(opt, [w], 1.0, ema, step=100)
    assert stepped and float(norm) == pytest.approx(5.0) and w.grad is None
    assert torch.allclose(w.detach(), torch.tensor([-0.6, -0.8, 0, 0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(ema.shadow["w"], 0.5 * w.detach())  # decay min(101/110, 0.5) = 0.5 from the zero start
    before, shadow = w.detach().clone(), ema.shadow["w"].clone()
    w.grad = torch.tensor([float("inf"), 0.0, 0.0, 0.0], dtype=torch.float64)
    norm, stepped = M.optimizer_update(opt, [w], 1.0, ema, step=101)
    assert not stepped and not math.isfinite(float(norm)) and w.grad is None
    assert torch.equal(w.detach(), before) and torch.equal(ema.shadow["w"], shadow)
