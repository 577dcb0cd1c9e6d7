"""GenEval's own detector (issue 18): mmdetection's Mask2Former Swin-S checkpoint, converted by rewards.py into
transformers' Mask2FormerForUniversalSegmentation without mmdet.

Run everywhere (CI): the converter against the committed key/shape table of the official checkpoint's layout
(tests/data/mmdet_mask2former_swin_s_keys.json, every tensor of mmdet's model built from the official config,
mmdet 2.x as GenEval runs it and mmdet 3.x), the two re-orderings (patch merging, relative-position index)
against mmdet's own formulas written out here, the safe checkpoint reader, mmdet's preprocessing, and the reward
end to end on a tiny checkpoint. Run only where mmdet imports (test-only, never in requirements.txt): the
converted model against mmdet's on random weights (class logits, mask logits, final instance scores).

The key table is written by this file in an environment with mmdet (CPU, mmcv-lite, no compiled ops):
    python -m venv /tmp/venv_mmdet2 && . /tmp/venv_mmdet2/bin/activate
    pip install torch==2.13.0 "numpy<2" "setuptools<81" wheel && pip install --no-build-isolation mmcv==1.7.2
    pip install --no-deps mmdet==2.28.2 && pip install scipy pycocotools terminaltables transformers==5.24.0 pytest
    python tests/test_mmdet_detector.py --write-key-table      # adds this mmdet's layout to the table
    (mmdet 3.x: pip install torch==2.13.0 mmcv-lite==2.1.0 mmengine mmdet==3.3.0 transformers==5.24.0 pytest)
and the numerical comparison runs there with `python -m pytest -q -s tests/test_mmdet_detector.py -k numerically`
(-s prints the differences; the file's other tests need the project's requirements.txt venv).
"""

import io
import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402
from test_rewards import clip_dir  # noqa: E402,F401  (the tiny CLIP fixture)

KEY_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mmdet_mask2former_swin_s_keys.json")
CONFIGS = {"2": "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py",        # GenEval's (mmdet 2.x)
           "3": "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py"}       # the same model in mmdet 3.x


def mmdet_relative_position_index(window_size):
    """mmdet's WindowMSA index (mmdet/models/backbones/swin.py): double_step_seq, its transpose sum, flip."""
    def double_step_seq(step1, len1, step2, len2):
        return (torch.arange(0, step1 * len1, step1)[:, None] + torch.arange(0, step2 * len2, step2)[None, :]).reshape(1, -1)
    coords = double_step_seq(2 * window_size - 1, window_size, 1, window_size)
    return (coords + coords.T).flip(1)


def fake_checkpoint(shapes, seed=0):
    """Random tensors of exactly the table's keys and shapes (indices: mmdet's own)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("relative_position_index"):
            state[key] = mmdet_relative_position_index(int(round(shape[0] ** 0.5)))
        else:
            state[key] = torch.randn(shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def key_table():
    with open(KEY_TABLE) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def swin_s(key_table):
    """The official layout (mmdet 2.x) as a fake checkpoint, and transformers' Swin-S Mask2Former for it."""
    from transformers import Mask2FormerForUniversalSegmentation
    state = fake_checkpoint(key_table["layouts"]["mmdet 2.28.2"])
    config = rewards.mmdet_mask2former_config(state)
    torch.manual_seed(0)
    return state, Mask2FormerForUniversalSegmentation(config).eval()

# -----------------------------------------------------------------------------
# CI: the full key table, strictly

def test_key_table_is_the_official_swin_s(key_table):
    for layout, shapes in key_table["layouts"].items():
        assert len(shapes) == 649, layout
        assert sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith("_index")) == 68_739_547, layout  # ~69M parameters
        assert shapes["panoptic_head.cls_embed.weight"] == [81, 256]        # 80 COCO classes + no-object
        assert shapes["panoptic_head.query_feat.weight"] == [100, 256]
        assert sum(k.endswith("attn.w_msa.qkv.weight") for k in shapes) == 24  # Swin-S: 2 + 2 + 18 + 2 blocks
    assert set(key_table["layouts"]) == {"mmdet 2.28.2", "mmdet 3.3.0"}


@pytest.mark.parametrize("layout", ["mmdet 2.28.2", "mmdet 3.3.0"])
def test_every_checkpoint_tensor_lands_once_in_transformers_strictly(key_table, swin_s, layout):
    """Fake checkpoint of the table's exact keys/shapes -> convert -> load_state_dict(strict=True). Every value
    moves (sums and sums of squares are kept: nothing dropped or used twice), and spot checks of each op."""
    _, model = swin_s
    state = fake_checkpoint(key_table["layouts"][layout], seed=1)
    config = rewards.mmdet_mask2former_config(state)
    assert config.backbone_config.depths == [2, 2, 18, 2] and config.backbone_config.num_heads == [3, 6, 12, 24]
    assert config.backbone_config.embed_dim == 96 and config.backbone_config.window_size == 7
    assert config.num_labels == 80 and [config.id2label[i] for i in range(80)] == rewards.GENEVAL_CLASSES
    assert (config.num_queries, config.encoder_layers, config.decoder_layers, config.num_attention_heads) == (100, 6, 10, 8)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    converted = rewards.convert_mmdet_mask2former(state, config, layout, expected)
    model.load_state_dict(converted, strict=True)
    assert set(converted) == set(expected)
    source = [v.double() for k, v in state.items() if not k.endswith("relative_position_index")]
    target = [v.double() for k, v in converted.items() if k not in rewards.MMDET_UNMAPPED_HF_KEYS]
    assert sum(v.numel() for v in source) == sum(v.numel() for v in target)
    assert sum(v.sum() for v in source).item() == pytest.approx(sum(v.sum() for v in target).item(), rel=1e-12)
    assert sum((v * v).sum() for v in source).item() == pytest.approx(sum((v * v).sum() for v in target).item(), rel=1e-12)
    hf = model.state_dict()
    swin = "model.pixel_level_module.encoder.swin.encoder.layers"
    qkv = state["backbone.stages.2.blocks.17.attn.w_msa.qkv.weight"]
    assert torch.equal(hf[f"{swin}.2.blocks.17.attention.q_proj.weight"], qkv[:384])
    assert torch.equal(hf[f"{swin}.2.blocks.17.attention.v_proj.weight"], qkv[768:])
    reduction = state["backbone.stages.1.downsample.reduction.weight"]      # (384, 768): 4 x 192 channels
    # transformers' input channel 192 + 5 is position (row 1, col 0) of channel 5: unfold's 5 * 4 + 2
    assert torch.equal(hf[f"{swin}.1.downsample.reduction.weight"][:, 192 + 5], reduction[:, 5 * 4 + 2])
    assert torch.equal(hf[f"{swin}.1.downsample.norm.weight"][2 * 192 + 7], state["backbone.stages.1.downsample.norm.weight"][7 * 4 + 1])
    assert torch.equal(hf["class_predictor.weight"], state["panoptic_head.cls_embed.weight"])
    assert torch.equal(hf["model.transformer_module.decoder.mask_predictor.mask_embedder.2.0.weight"],
                       state["panoptic_head.mask_embed.4.weight"])
    self_attn = "attentions.1" if layout == "mmdet 2.28.2" else "self_attn"
    in_proj = state[f"panoptic_head.transformer_decoder.layers.8.{self_attn}.attn.in_proj_bias"]
    assert torch.equal(hf["model.transformer_module.decoder.layers.8.self_attn.k_proj.bias"], in_proj[256:512])
    cross = "attentions.0" if layout == "mmdet 2.28.2" else "cross_attn"
    assert torch.equal(hf["model.transformer_module.decoder.layers.0.cross_attn.in_proj_weight"],
                       state[f"panoptic_head.transformer_decoder.layers.0.{cross}.attn.in_proj_weight"])
    assert torch.equal(hf["model.transformer_module.decoder.layers.3.cross_attn_layer_norm.bias"],
                       state["panoptic_head.transformer_decoder.layers.3.norms.0.bias"])
    assert torch.equal(hf["model.pixel_level_module.decoder.level_embed"], state["panoptic_head.pixel_decoder.level_encoding.weight"])
    assert torch.equal(hf["model.pixel_level_module.decoder.input_projections.0.0.weight"],
                       state["panoptic_head.pixel_decoder.input_convs.0.conv.weight"])   # the 768-channel stage 4
    assert torch.equal(hf["model.pixel_level_module.encoder.hidden_states_norms.stage4.weight"], state["backbone.norm3.weight"])
    assert hf["criterion.empty_weight"].tolist() == [1.0] * 80 + [pytest.approx(0.1)]


def test_converter_refuses_leftover_missing_and_misshapen_tensors(swin_s):
    state, model = swin_s
    config, expected = model.config, {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\).*panoptic_head.extra"):
        rewards.convert_mmdet_mask2former({**state, "panoptic_head.extra.weight": torch.zeros(1)}, config, "x.pth", expected)
    partial = {k: v for k, v in state.items() if k != "panoptic_head.mask_embed.2.bias"}
    with pytest.raises(ValueError, match=r"x.pth: .*1 missing .*mask_embed.2.bias"):
        rewards.convert_mmdet_mask2former(partial, config, "x.pth", expected)
    wrong = {**state, "panoptic_head.pixel_decoder.mask_feature.bias": torch.zeros(255)}
    with pytest.raises(ValueError, match=r"mask_feature.bias -> .*mask_projection.bias: shape \(255,\)"):
        rewards.convert_mmdet_mask2former(wrong, config, "x.pth", expected)
    index = "backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"
    with pytest.raises(ValueError, match="relative-position index"):
        rewards.convert_mmdet_mask2former({**state, index: state[index].flip(0)}, config, "x.pth", expected)
    no_index = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    assert len(rewards.convert_mmdet_mask2former(no_index, config, "x.pth", expected)) == len(expected)
    with pytest.raises(ValueError, match="x.pth: .*not an mmdet Mask2Former Swin checkpoint"):
        rewards.mmdet_mask2former_config({"backbone.conv1.weight": torch.zeros(1)}, "x.pth")


def test_relative_position_index_is_mmdets_and_transformers():
    from transformers.models.swin.modeling_swin import SwinRelativePositionBias
    for window in (2, 7, 12):
        ours = rewards.swin_relative_position_index(window)
        assert torch.equal(ours, mmdet_relative_position_index(window))
        assert torch.equal(ours.flatten(), SwinRelativePositionBias(1, (window, window)).relative_position_index)


def mmdet_patch_merging(x, height, width, norm, reduction):
    """mmdet's PatchMerging (swin.py) for kernel 2, stride 2: nn.Unfold over (B, C, H, W), then norm, reduction."""
    batch, _, channels = x.shape
    x = x.view(batch, height, width, channels).permute(0, 3, 1, 2)
    x = torch.nn.Unfold(kernel_size=2, stride=2)(x).transpose(1, 2)   # (B, H/2 * W/2, 4C), channel-major
    return reduction(norm(x))


def test_patch_merging_permutation_matches_mmdets_unfold():
    """mmdet's nn.Unfold patch merging == transformers' concat merging with the permuted weights (and not
    without the permutation: the check can fail)."""
    from transformers.models.swin.modeling_swin import SwinPatchMerging
    torch.manual_seed(0)
    channels, height, width = 6, 8, 10
    norm, reduction = torch.nn.LayerNorm(4 * channels), torch.nn.Linear(4 * channels, 2 * channels, bias=False)
    for p in (norm.weight, norm.bias, reduction.weight):
        torch.nn.init.normal_(p)
    x = torch.randn(2, height * width, channels)
    reference = mmdet_patch_merging(x, height, width, norm, reduction)
    merge = SwinPatchMerging(channels)
    order = rewards.unfold_to_concat_order(channels)
    with torch.no_grad():
        merge.norm.weight.copy_(norm.weight[order]), merge.norm.bias.copy_(norm.bias[order])
        merge.reduction.weight.copy_(reduction.weight[:, order])
    assert torch.allclose(merge(x, (height, width)), reference, atol=1e-5)
    with torch.no_grad():
        merge.norm.weight.copy_(norm.weight), merge.norm.bias.copy_(norm.bias), merge.reduction.weight.copy_(reduction.weight)
    assert not torch.allclose(merge(x, (height, width)), reference, atol=1e-2)

# -----------------------------------------------------------------------------
# CI: reading the checkpoint safely

def save_mmdet_style(path, state, meta, numpy1_names=False):
    """An mmcv/mmengine-style checkpoint in the legacy (non-zip) format that mmdet's publish_model.py writes;
    numpy1_names: its pickle names numpy's types as numpy 1.x did (the 2022 file was written under numpy 1.x)."""
    buffer = io.BytesIO()
    torch.save({"meta": meta, "state_dict": state}, buffer, _use_new_zipfile_serialization=False)
    raw = buffer.getvalue()
    if numpy1_names:  # protocol-2 GLOBAL opcodes are newline-terminated text: the rename keeps the stream valid
        raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    with open(path, "wb") as f:
        f.write(raw)


class NotAllowlisted:
    pass


def test_read_checkpoint_weights_only_numpy_meta_and_one_line_errors(tmp_path):
    state = {"panoptic_head.cls_embed.bias": torch.arange(81.0)}
    meta = {"mmcv_version": "1.5.0", "CLASSES": ("person", "bicycle"), "seed": np.int64(12345), "best": np.float64(0.5),
            "epoch": 50, "config": "model = dict(...)"}
    for numpy1 in (False, True):
        path = str(tmp_path / f"numpy{int(numpy1)}.pth")
        save_mmdet_style(path, state, meta, numpy1_names=numpy1)
        if numpy1:
            assert b"numpy.core.multiarray\nscalar" in open(path, "rb").read()
        assert torch.equal(rewards.read_mmdet_checkpoint(path)["panoptic_head.cls_embed.bias"], torch.arange(81.0))
    path = str(tmp_path / "custom.pth")
    save_mmdet_style(path, state, {"hook": NotAllowlisted()})
    with pytest.raises(ValueError) as err:
        rewards.read_mmdet_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and path in message and "NotAllowlisted" in message
    assert "safetensors" in message and f"detector='mmdet:{path}.safetensors'" in message
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "m.safetensors"))
    assert torch.equal(rewards.read_mmdet_checkpoint(str(tmp_path / "m.safetensors"))["panoptic_head.cls_embed.bias"],
                       torch.arange(81.0))
    with pytest.raises(rewards.RewardWeightsUnavailable, match=r"nope.pth: no such file; .*wget -P .*743b7d99.pth"):
        rewards.read_mmdet_checkpoint(str(tmp_path / "nope.pth"))
    digest = str(tmp_path / "mask2former_20220504_001756-743b7d99.pth")   # a truncated download of the real name
    with open(digest, "wb") as f:
        f.write(open(str(tmp_path / "numpy0.pth"), "rb").read()[:100])
    with pytest.raises(ValueError, match=r"sha256 .* does not match the 743b7d99 .*download it again"):
        rewards.read_mmdet_checkpoint(digest)
    broken = str(tmp_path / "broken.pth")
    with open(broken, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"broken.pth: not a readable torch checkpoint"):
        rewards.read_mmdet_checkpoint(broken)
    torch.save([1, 2], str(tmp_path / "list.pth"))
    with pytest.raises(ValueError, match=r"list.pth: expected an mmdet checkpoint"):
        rewards.read_mmdet_checkpoint(str(tmp_path / "list.pth"))

# -----------------------------------------------------------------------------
# CI: mmdet's preprocessing and the reward end to end

def test_mmdet_preprocess_resize_pad_normalise():
    mean, std = torch.tensor(rewards.MMDET_MEAN).view(3, 1, 1), torch.tensor(rewards.MMDET_STD).view(3, 1, 1)
    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    pixels, size = rewards.mmdet_preprocess(square)
    assert size == (800, 800) and pixels.shape == (3, 800, 800)      # 512^2 -> 800^2, no padding (spec 1.3)
    x = torch.from_numpy(np.array(square)).permute(2, 0, 1).float()[None]
    resized = F.interpolate(x, size=(800, 800), mode="bilinear", align_corners=False)[0].round()
    assert torch.allclose(pixels, (resized - mean) / std, atol=1e-5)
    wide = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    pixels, size = rewards.mmdet_preprocess(wide)
    # mmcv's rescale_size: scale min(1333 / 640, 800 / 480), int(x * scale + 0.5); pad to 32 with 128
    assert size == (800, 1067) and pixels.shape == (3, 800, 1088)
    assert torch.allclose(pixels[:, :, 1067:], ((128 - mean) / std).expand(3, 800, 21))
    assert rewards.mmdet_preprocess(Image.new("RGB", (2000, 1000)))[1] == (667, 1333)   # longest side caps
    exact = Image.fromarray(rng.integers(0, 256, (800, 800, 3), dtype=np.uint8))
    x = torch.from_numpy(np.array(exact)).permute(2, 0, 1).float()
    assert torch.equal(rewards.mmdet_preprocess(exact)[0], (x - mean) / std)   # no resize: the pixels as they are


def tiny_mmdet_checkpoint(path):
    """A tiny Mask2Former-Swin in mmdet 2.x's layout (the converter's table read backwards), every query a "cat"."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 2], window_size=2,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=16, dim_feedforward=16, encoder_layers=1, decoder_layers=3,
                               num_attention_heads=2, num_queries=10, num_labels=80)
    torch.manual_seed(0)
    hf = Mask2FormerForUniversalSegmentation(config).state_dict()
    hf["class_predictor.bias"][rewards.GENEVAL_CLASSES.index("cat")] = 20.0
    state = {}
    for mmdet, key, op in rewards.mmdet_mask2former_key_table([1, 1, 1, 1], 1, 2, "2.x"):
        if op == "index":
            state[mmdet] = mmdet_relative_position_index(2)
        elif op in "qkv":
            state[mmdet] = torch.cat([state[mmdet], hf[key]]) if op != "q" else hf[key]
        elif op.startswith("merge"):
            dim = 0 if op == "merge_rows" else 1
            order = rewards.unfold_to_concat_order(hf[key].shape[dim] // 4)
            state[mmdet] = hf[key].index_select(dim, torch.argsort(order))
        else:
            state[mmdet] = hf[key]
    save_mmdet_style(path, state, {"seed": np.int64(0)})
    return path


def test_geneval_reward_runs_the_mmdet_checkpoint(tmp_path, clip_dir):
    from test_rewards import GENEVAL_ROWS, images_uint8
    path = tiny_mmdet_checkpoint(str(tmp_path / "tiny.pth"))
    reward = rewards.get_reward("geneval", detector=f"mmdet:{path}", clip_id=clip_dir, detector_size=64, batch_size=3)
    assert "GenEval's official detector" in reward.detector_name and "tiny.pth" in reward.detector_name
    assert "not comparable" in rewards.get_reward("geneval").detector_name
    assert rewards.get_reward("geneval", detector="mmdet").mmdet_path == rewards.MMDET_GENEVAL_CHECKPOINT
    scores, details = reward(images_uint8(3), [row["prompt"] for row in GENEVAL_ROWS], GENEVAL_ROWS)
    assert torch.isfinite(scores).all() and details["detected"][0]["cat"] > 1 and details["detected"][1] == {}
    # images of different sizes: separate forwards, each image's masks and boxes in its own pixels
    images = rewards.to_pil(images_uint8(1, 48, 40)) + rewards.to_pil(images_uint8(1, 32, 64, seed=1))
    with torch.no_grad():
        per_image = reward.detect(images, thresholds=[0.3, 0.3])
        alone = reward.detect(images[1:], thresholds=[0.3])
    assert [d.score for d in per_image[1]["cat"]] == [d.score for d in alone[0]["cat"]]
    for image, candidates in zip(images, per_image):
        for d in candidates["cat"]:
            assert d.mask.shape == (image.height, image.width)
    with pytest.raises(rewards.RewardWeightsUnavailable, match="no such file"):
        rewards.get_reward("geneval", detector=f"mmdet:{tmp_path}/missing.pth", clip_id=clip_dir).load()


def test_mmdet_upsampling_crops_the_padding_before_the_image_size():
    """mmdet_input: up to the padded input, crop the resized image, then up to the image size. A mask that
    covers only the padding is empty in the image (the direct path would smear it in)."""
    class_logits = torch.full((1, 81), -10.0)
    class_logits[0, 3] = 10.0
    mask_logits = torch.full((1, 8, 12), -5.0)
    mask_logits[0, :, :10] = 5.0                       # inside the 40 px wide resized image of a 48 px input
    [(label, score, box, mask)] = rewards.mask2former_instances(class_logits, mask_logits, (20, 20), 0.1,
                                                                mmdet_input=((32, 48), (32, 40)))
    assert label == 3 and mask.all() and box == (0, 0, 20, 20) and score > 0.9
    direct = rewards.mask2former_instances(class_logits, mask_logits, (20, 20), 0.1)
    assert not direct[0][3].all()

# -----------------------------------------------------------------------------
# Only where mmdet imports: the converted model against mmdet's own, numerically


def import_mmdet():
    """mmdet on mmcv-lite: mmcv.ops imports once a stand-in for its compiled extension is registered (on the CPU
    MultiScaleDeformableAttention runs its PyTorch fallback, multi_scale_deformable_attn_pytorch)."""
    mmcv = pytest.importorskip("mmcv")
    import importlib.machinery
    import importlib.util
    if importlib.util.find_spec("mmcv._ext") is None:  # mmcv-lite
        ext = types.ModuleType("mmcv._ext")
        ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)

        def missing(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError(f"mmcv-lite has no compiled {name}"))
        ext.__getattr__ = missing
        sys.modules["mmcv._ext"] = ext
        if mmcv.__version__.startswith("1."):  # mmcv 1.x's runner imports torchvision, and uses it only to download
            try:
                import torchvision  # noqa: F401
            except ImportError:
                stub = types.ModuleType("torchvision")
                stub.__path__ = []
                sys.modules["torchvision"] = stub
                import mmcv.runner  # noqa: F401
                del sys.modules["torchvision"]
    import mmcv.ops  # noqa: F401
    return pytest.importorskip("mmdet")


def build_mmdet(scale=None):
    """mmdet's Mask2Former from the official config (random weights, perturbed so every tensor matters)."""
    mmdet = import_mmdet()
    major = mmdet.__version__.split(".")[0]
    path = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "mask2former", CONFIGS[major])
    if major == "2":
        from mmcv import Config
    else:
        from mmengine.config import Config
    from mmdet.apis import init_detector
    config = Config.fromfile(path)
    config.model.backbone.init_cfg = None
    if scale and major == "2":
        config.data.test.pipeline[1].img_scale = scale
    elif scale:
        config.test_dataloader.dataset.pipeline[1].scale = scale
    torch.manual_seed(0)
    model = init_detector(config, None, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in model.state_dict().items():
            if p.dtype.is_floating_point:
                p.add_(torch.randn(p.shape, generator=generator) * (0.02 if p.dim() > 1 else 0.1))
    return mmdet, model.eval()


def write_key_table():
    """python tests/test_mmdet_detector.py --write-key-table: this mmdet's layout into the committed table."""
    mmdet, model = build_mmdet()
    table = {"layouts": {}}
    if os.path.exists(KEY_TABLE):
        with open(KEY_TABLE) as f:
            table = json.load(f)
    table["generated_by"] = ("python tests/test_mmdet_detector.py --write-key-table, in a venv with mmdet (see this "
                             "file's docstring): every key and shape of mmdet's Mask2Former built from the official "
                             f"config ({CONFIGS['2']} for 2.x, {CONFIGS['3']} for 3.x) with random weights")
    table["layouts"][f"mmdet {mmdet.__version__}"] = {k: list(v.shape) for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(KEY_TABLE), exist_ok=True)
    with open(KEY_TABLE, "w") as f:  # one tensor a line
        f.write('{"generated_by": ' + json.dumps(table["generated_by"]) + ',\n "layouts": {')
        f.write(",".join(f"\n  {json.dumps(name)}: {{" + ",".join(f"\n   {json.dumps(k)}: {json.dumps(s)}" for k, s in keys.items())
                         + "}" for name, keys in sorted(table["layouts"].items())))
        f.write("}}\n")
    print(f"{KEY_TABLE}: mmdet {mmdet.__version__}, {len(model.state_dict())} tensors")


def test_converted_model_matches_mmdet_numerically(tmp_path):
    """Random weights in mmdet's model, saved in the checkpoint's layout, read and converted by rewards.py:
    class logits and mask logits on a random input, then the final instance scores, boxes and masks of the
    whole GenEval path (mmdet's inference_detector on a PNG vs GenEvalReward.detect) on two images."""
    mmdet, model = build_mmdet(scale=(427, 256))
    major = mmdet.__version__.split(".")[0]
    path = str(tmp_path / "mmdet.pth")
    save_mmdet_style(path, {k: v.clone() for k, v in model.state_dict().items()},
                     {"mmdet_version": mmdet.__version__, "CLASSES": tuple(rewards.GENEVAL_CLASSES), "seed": np.int64(3)})
    hf = rewards.load_mmdet_mask2former(path)
    x = torch.randn(1, 3, 256, 352, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.extract_feat(x)
        if major == "2":
            metas = [dict(batch_input_shape=(256, 352), img_shape=(256, 352, 3), ori_shape=(256, 352, 3), pad_shape=(256, 352, 3))]
            class_logits, mask_logits = model.panoptic_head(features, metas)
        else:
            from mmdet.structures import DetDataSample
            sample = DetDataSample(metainfo=dict(batch_input_shape=(256, 352), img_shape=(256, 352), ori_shape=(256, 352)))
            class_logits, mask_logits = model.panoptic_head(features, [sample])
        out = hf(pixel_values=x)
    class_diff = (class_logits[-1] - out.class_queries_logits).abs().max().item()
    mask_diff = (mask_logits[-1] - out.masks_queries_logits).abs().max().item()
    print(f"mmdet {mmdet.__version__}: max |d| class logits {class_diff:.2e}, mask logits {mask_diff:.2e}")
    assert class_diff < 1e-4 and mask_diff < 1e-3
    assert out.class_queries_logits.std() > 0.3 and out.masks_queries_logits.std() > 0.3   # not a degenerate net

    from mmdet.apis import inference_detector
    reward = rewards.get_reward("geneval", detector=f"mmdet:{path}", detector_size=256)
    reward.detector = hf
    # a smooth random image, square (no padding), and one whose resized size pads (mmdet 2.x pads with 128
    # before normalising, 3.x with 0 after: only the square image is compared there)
    rng = np.random.default_rng(0)
    shapes = [(200, 200), (150, 200)] if major == "2" else [(200, 200)]
    worst = 0.0
    for h, w in shapes:
        small = rng.integers(0, 256, (h // 10, w // 10, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        image.save(str(tmp_path / "image.png"))
        if major == "2":  # mmdet's test pipeline (cv2 resize, pad, normalise) vs ours: within one grey level
            from mmdet.datasets.pipelines import Compose
            data = Compose(model.cfg.data.test.pipeline)(dict(img_info=dict(filename=str(tmp_path / "image.png")), img_prefix=None))
            pixels, size = rewards.mmdet_preprocess(image, 256, 427)
            theirs_pixels, meta = (getattr(data[k][0], "data", data[k][0]) for k in ("img", "img_metas"))
            assert theirs_pixels.shape == pixels.shape and tuple(meta["img_shape"][:2]) == size
            gap = (theirs_pixels - pixels).abs().max().item() * min(rewards.MMDET_STD)
            assert gap <= 1.001, gap
            print(f"mmdet {mmdet.__version__}: {h}x{w} image, preprocessing max |d| {gap:.3f} grey levels")
        with torch.no_grad():
            result = inference_detector(model, str(tmp_path / "image.png"))
            ours = reward.detect([image], thresholds=[0.0])[0]
        if major == "2":
            boxes, masks = result
            theirs = {rewards.GENEVAL_CLASSES[c]: [(b[4], tuple(b[:4]), m) for b, m in zip(boxes[c], masks[c])]
                      for c in range(80) if len(boxes[c])}
        else:
            pred = result.pred_instances
            theirs = {}
            for score, label, box, mask in zip(pred.scores.tolist(), pred.labels.tolist(), pred.bboxes.tolist(), pred.masks.numpy()):
                theirs.setdefault(rewards.GENEVAL_CLASSES[label], []).append((score, tuple(box), mask))
        # the top 100 (query, class) pairs on both sides, matched per class by score (ours drops empty masks,
        # whose score is 0). A pair whose class probability ties the 100th within float error may be swapped
        # for another at the cut-off (random weights make many near-equal probabilities): at most 2 per side.
        assert sum(len(v) for v in theirs.values()) == 100 and sum(len(v) for v in ours.values()) > 50
        matched, unmatched = [], 0
        for name in set(theirs) | set(ours):
            a = sorted((t for t in theirs.get(name, []) if t[0] > 0), key=lambda t: -t[0])
            b = sorted(((d.score, d.box, d.mask) for d in ours.get(name, [])), key=lambda t: -t[0])
            i = j = 0
            while i < len(a) and j < len(b):
                if abs(a[i][0] - b[j][0]) < 2e-3:
                    matched.append((a[i][0], abs(a[i][0] - b[j][0]), a[i][1], a[i][2], b[j][1], b[j][2]))
                    i, j = i + 1, j + 1
                elif a[i][0] > b[j][0]:
                    i, unmatched = i + 1, unmatched + 1
                else:
                    j, unmatched = j + 1, unmatched + 1
            unmatched += len(a) - i + len(b) - j
        assert unmatched <= 4 and len(matched) > 50
        worst = max([worst] + [d for _, d, *_ in matched])
        # masks of random weights hover around logit 0 over wide areas, so a grey level of resize rounding
        # flips some pixels: the 10 best instances' masks overlap > 95% (IoU), their median > 99%
        ious = []
        for _, _, box_a, ma, box_b, mb in sorted(matched, key=lambda t: -t[0])[:10]:
            ious.append((ma & mb).sum() / max((ma | mb).sum(), 1))
            assert np.abs(np.array(box_a, dtype=float) - np.array(box_b, dtype=float)).max() <= 2
        assert min(ious) > 0.95 and np.median(ious) > 0.99, ious
        print(f"mmdet {mmdet.__version__}: {h}x{w} image, {len(matched)} instances matched, {unmatched} at the top-100 "
              f"cut-off, mask IoU of the 10 best: min {min(ious):.4f}, median {np.median(ious):.4f}")
    assert worst < 2e-3
    print(f"mmdet {mmdet.__version__}: max |d| final instance scores {worst:.2e}")


if __name__ == "__main__" and "--write-key-table" in sys.argv:
    write_key_table()


def test_evaluate_names_the_detector_and_finds_the_official_checkpoint(tmp_path, clip_dir):
    """evaluate.py --geneval_detector=mmdet:PATH scores GenEval with that checkpoint and says so in results.md
    and results.json; with no flag it picks up the file at rewards.MMDET_GENEVAL_CHECKPOINT (here under a fake
    HOME, a tiny file under the official name, which the sha256 check then refuses in one line)."""
    import subprocess
    import model as M
    import toyworld
    from test_rewards import GENEVAL_ROWS
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = M.build_tiny_pipeline(str(tmp_path / "tiny"), codec="pixel", pixel_factor=2, sample_size=16, patch_size=2,
                                 words=toyworld.VOCAB_WORDS, clip_length=16, num_layers=1)
    (tmp_path / "geneval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in GENEVAL_ROWS))
    checkpoint = tiny_mmdet_checkpoint(str(tmp_path / "tiny.pth"))
    benchmarks = {"geneval": {"prompts": str(tmp_path / "geneval.jsonl"), "rewards": ["geneval"], "aggregate": "geneval"}}
    args = [sys.executable, "evaluate.py", f"--model={base}", "--models={'base': ''}", f"--benchmarks={benchmarks!r}", "--num_steps=1",
            f"--reward_kwargs={{'geneval': {{'clip_id': '{clip_dir}', 'detector_size': 64}}}}", "--grid_prompts=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home")}
    out = subprocess.run(args + [f"--geneval_detector=mmdet:{checkpoint}", f"--out_dir={tmp_path / 'eval'}"], cwd=root,
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    named = "Detector: mmdet Mask2Former Swin-S `tiny.pth` (GenEval's official detector)."
    assert named in (tmp_path / "eval" / "results.md").read_text()
    assert "tiny.pth" in json.loads((tmp_path / "eval" / "results.json").read_text())["benchmarks"]["geneval"]["detector"]
    official = tmp_path / "home" / ".cache" / "flow_opd" / os.path.basename(rewards.MMDET_GENEVAL_URL)
    official.parent.mkdir(parents=True)
    official.write_bytes(open(checkpoint, "rb").read())
    out = subprocess.run(args + [f"--out_dir={tmp_path / 'eval2'}"], cwd=root, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode != 0 and "does not match the 743b7d99" in out.stderr, out.stderr[-2000:]
