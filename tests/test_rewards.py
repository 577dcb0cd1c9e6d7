"""Tests for rewards.py: the rules against REWARDS.md's numbers, and every model-backed reward end to end on
a tiny randomly initialised model of the real class, saved and loaded through the reward's own loading code."""

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards import Detection


def images_uint8(n=2, height=48, width=40, seed=0):
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))

# -----------------------------------------------------------------------------
# tiny models, built once per module

def byte_vocab(specials):
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    for token in specials:
        vocab[token] = len(vocab)
    return vocab


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """CLIP with a 768-wide projection (the aesthetic MLP's input) and a byte-level tokenizer without merges."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": i + 256 for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=768)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("clip"))
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mask2former_dir(tmp_path_factory):
    """Mask2Former-Swin with the standard COCO-80 id2label (mouse / remote / keyboard) and a class-head bias
    that makes every query a confident "cat", so the post-processing sees real detections."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil
    coco_names = {geneval: coco for coco, geneval in rewards.COCO_TO_GENEVAL.items()}
    names = [coco_names.get(name, name) for name in rewards.GENEVAL_CLASSES]
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, num_queries=10, id2label=dict(enumerate(names)),
                               label2id={name: i for i, name in enumerate(names)})
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config)
    model.class_predictor.bias.data[rewards.GENEVAL_CLASSES.index("cat")] = 20.0
    path = str(tmp_path_factory.mktemp("mask2former"))
    model.save_pretrained(path)
    Mask2FormerImageProcessorPil().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def got_ocr_dir(tmp_path_factory):
    """GOT-OCR2 with a 64 px SAM-style encoder (8 px patches -> 4 image tokens) and a byte-level Qwen2 tokenizer."""
    from transformers import GotOcr2Config, GotOcr2ForConditionalGeneration, GotOcr2Processor, Qwen2Tokenizer
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<imgpad>"]
    vocab = byte_vocab(specials)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    config = GotOcr2Config(
        vision_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                           patch_size=8, window_size=2, global_attn_indexes=[1], mlp_dim=32),
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"]),
        image_token_index=vocab["<imgpad>"])
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("got_ocr2"))
    GotOcr2ForConditionalGeneration(config).save_pretrained(path)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 64, "width": 64})
    GotOcr2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen_vl_dir(tmp_path_factory):
    """Qwen2.5-VL with one vision block and one text layer; 56 px images -> 4 merged image tokens."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
    vocab = byte_vocab(specials)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           window_size=56, fullatt_block_indexes=[0]),
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                         bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("qwen_vl"))
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56}).save_pretrained(path)
    return path

# -----------------------------------------------------------------------------
# call shape, registry, helpers

def test_registry_and_unknown_name():
    assert {"geneval", "ocr", "pickscore", "clipscore", "aesthetic", "jpeg_compressibility",
            "jpeg_incompressibility", "qwenvl"} <= set(rewards.REWARDS)
    with pytest.raises(ValueError, match="known rewards: .*geneval.*ocr"):
        rewards.get_reward("imagereward")


def test_image_conversions_round_like_flow_grpo():
    floats = torch.tensor([0.0, 0.4 / 255, 1.6 / 255, 1.0, 1.2]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert rewards.to_uint8(floats)[0, 0, 0].tolist() == [0, 0, 2, 255, 255]  # x255, round, clamp
    uint8 = images_uint8()
    pils = rewards.to_pil(uint8)
    assert pils[0].size == (40, 48) and pils[0].mode == "RGB"
    assert torch.equal(rewards.to_uint8(pils), uint8)


def test_non_finite_scores_raise():
    class Broken(rewards.Reward):
        def score_batch(self, images, prompts, metadata):
            return [float("nan")] * len(images), {}
    with pytest.raises(FloatingPointError):
        Broken()(images_uint8(), ["a", "b"])


def test_multi_reward_is_the_weighted_sum():
    images, prompts = images_uint8(3), ["a", "b", "c"]
    multi = rewards.MultiReward({"jpeg_compressibility": 0.8, "jpeg_incompressibility": 0.2})
    total, details = multi(images, prompts)
    kb = torch.tensor([len(rewards.jpeg_bytes(im, 95)) / 1000 for im in rewards.to_pil(images)])
    assert torch.allclose(total, 0.8 * -kb / 500 + 0.2 * kb)
    assert torch.allclose(details["jpeg_incompressibility"], kb) and "jpeg_compressibility/kb" in details


def test_missing_weights_raise_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reward = rewards.get_reward("clipscore", model_id="nobody-xyz/no-such-model")
    with pytest.raises(rewards.RewardWeightsUnavailable, match="hf download nobody-xyz/no-such-model") as err:
        reward(images_uint8(1), ["x"])
    assert "\n" not in str(err.value)
    with pytest.raises(rewards.RewardWeightsUnavailable, match="not found"):
        rewards.get_reward("aesthetic", weights_path=str(tmp_path / "missing.pth")).load()

# -----------------------------------------------------------------------------
# GenEval rules on hand-made detections

def det(box, score=0.95, color=None):
    return Detection(score, box, None, color)


def single(cls, n=1, tag="single_object"):
    return {"tag": tag, "include": [{"class": cls, "count": n}]}


def counting(cls, n):
    return {"tag": "counting", "include": [{"class": cls, "count": n}], "exclude": [{"class": cls, "count": n + 1}]}


def position(a, relation, b):
    return {"tag": "position", "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}]}


def colors(cls, color):
    return {"tag": "colors", "include": [{"class": cls, "count": 1, "color": color}]}


def color_attr(a, color_a, b, color_b):
    return {"tag": "color_attr", "include": [{"class": a, "count": 1, "color": color_a}, {"class": b, "count": 1, "color": color_b}]}


BOX = (0, 0, 10, 10)


@pytest.mark.parametrize("box_a, box_b, expected", [
    ((0, 0, 10, 10), (50, 0, 60, 10), {"left of"}),
    ((50, 0, 60, 10), (0, 0, 10, 10), {"right of"}),
    ((0, 0, 10, 10), (0, 50, 10, 60), {"above"}),
    ((0, 50, 10, 60), (0, 0, 10, 10), {"below"}),
    ((0, 0, 10, 10), (50, 50, 60, 60), {"left of", "above"}),  # diagonal: dx = dy = -48 / (50 sqrt 2) = -0.68
    ((0, 0, 100, 100), (30, 0, 130, 100), set()),             # offset 30, margin 0.1*200 = 20: dx = -1/3
    ((0, 0, 10, 10), (1, 1, 11, 11), set()),                  # shrunk offset 0 on both axes: empty set
    ((0, 0, 10, 10), (12, 0, 22, 10), {"left of"}),           # offset 12 - margin 2 = 10, dx = -10/12
    ((0, 0, 10, 10), (4.5, 0, 14.5, 10), {"left of"}),        # dx = -2.5/4.5 = -0.56
    ((0, 0, 10, 10), (3.5, 0, 13.5, 10), set()),              # dx = -1.5/3.5 = -0.43: inside the 0.5 band
])
def test_relative_position(box_a, box_b, expected):
    assert rewards.relative_position(box_a, box_b) == expected


def test_filter_detections_threshold_sort_and_cap():
    candidates = {"cat": [det(BOX, s) for s in (0.3, 0.5, 0.95, 0.31)], "dog": [det(BOX, 0.2)],
                  "cup": [det(BOX, 0.99)] * 20}
    kept = rewards.filter_detections(candidates, threshold=0.3)
    assert [d.score for d in kept["cat"]] == [0.95, 0.5, 0.31]  # sorted, and "> 0.3" is strict
    assert "dog" not in kept and len(kept["cup"]) == 16
    assert [d.score for d in rewards.filter_detections(candidates, threshold=0.9)["cat"]] == [0.95]


def evaluate(detections, metadata, quirks=False):
    strict, score = rewards.geneval_strict_and_score(detections, metadata, unclipped_count=quirks,
                                                     failed_position_adds_one=quirks)
    return rewards.geneval_correct(detections, metadata), strict, score


def test_counting_n_n_plus_one_and_fewer():
    three = counting("cat", 3)
    assert evaluate({"cat": [det(BOX)] * 3}, three) == (True, True, 1.0)
    correct, strict, score = evaluate({"cat": [det(BOX)] * 4}, three)  # the exclude clause fires at N+1
    assert (correct, strict) == (False, False) and score == pytest.approx(2 / 3)
    correct, strict, score = evaluate({"cat": [det(BOX)] * 2}, three)
    assert (correct, strict) == (False, False) and score == pytest.approx(2 / 3)
    assert evaluate({}, three) == (False, False, 0.0)


def test_single_and_two_objects_official_vs_strict():
    # official: at least one; strict: exactly one
    assert evaluate({"bowl": [det(BOX)] * 2}, single("bowl"))[:2] == (True, False)
    two = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    assert evaluate({"cat": [det(BOX)], "dog": [det(BOX)]}, two) == (True, True, 1.0)
    assert evaluate({"cat": [det(BOX)]}, two) == (False, False, 0.5)


def test_colors_use_the_most_confident_objects():
    metadata = colors("car", "red")
    assert evaluate({"car": [det(BOX, color="red")]}, metadata) == (True, True, 1.0)
    assert evaluate({"car": [det(BOX, color="blue")]}, metadata) == (False, False, 0.5)
    # official rule checks only the top-1 object; strict needs exactly one car
    correct, strict, _ = evaluate({"car": [det(BOX, 0.9, "red"), det(BOX, 0.8, "blue")]}, metadata)
    assert (correct, strict) == (True, False)
    assert not evaluate({"car": [det(BOX, 0.9, "blue"), det(BOX, 0.8, "red")]}, metadata)[0]


@pytest.mark.parametrize("relation, a_box", [("left of", (0, 40, 10, 50)), ("right of", (80, 40, 90, 50)),
                                             ("above", (40, 0, 50, 10)), ("below", (40, 80, 50, 90))])
def test_every_position_relation(relation, a_box):
    b_box = (40, 40, 50, 50)
    detections = {"cat": [det(a_box)], "dog": [det(b_box)]}
    assert evaluate(detections, position("cat", relation, "dog")) == (True, True, 1.0)
    wrong = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
    assert evaluate(detections, position("cat", wrong, "dog"))[:2] == (False, False)


def test_position_checks_every_pair_in_the_official_rule():
    metadata = {"tag": "position", "include": [{"class": "dog", "count": 2}, {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    dogs = [det((50, 0, 60, 10)), det((70, 0, 80, 10))]
    assert rewards.geneval_correct({"cat": [det(BOX)], "dog": dogs}, metadata)
    assert not rewards.geneval_correct({"cat": [det((65, 0, 66, 10))], "dog": dogs}, metadata)


# REWARDS.md 1.8 worked examples: (metadata, detections, score with the reference quirks, score fixed)
A, B = (0, 40, 10, 50), (40, 40, 50, 50)  # A is left of B
WORKED_EXAMPLES = [
    (single("cat"), {"cat": [det(BOX)]}, 1.0, 1.0),
    (single("cat"), {}, 0.0, 0.0),
    (single("cat"), {"cat": [det(BOX)] * 2}, 0.0, 0.0),
    (single("cat"), {"cat": [det(BOX)] * 3}, -1.0, 0.0),
    (single("cat"), {"cat": [det(BOX)] * 16}, -14.0, 0.0),
    (counting("cat", 3), {"cat": [det(BOX)] * 2}, 2 / 3, 2 / 3),
    (counting("cat", 3), {"cat": [det(BOX)] * 4}, 2 / 3, 2 / 3),
    (counting("cat", 3), {}, 0.0, 0.0),
    (counting("cat", 2), {"cat": [det(BOX)] * 5}, -0.5, 0.0),
    (colors("cat", "red"), {"cat": [det(BOX, color="blue")]}, 0.5, 0.5),
    (colors("cat", "red"), {}, 0.0, 0.0),
    (position("cat", "left of", "dog"), {"cat": [det(A)], "dog": [det(B)]}, 1.0, 1.0),
    (position("cat", "right of", "dog"), {"cat": [det(A)], "dog": [det(B)]}, 0.75, 2 / 3),
    (position("cat", "left of", "dog"), {"dog": [det(B)]}, 1 / 3, 1 / 3),
    (position("cat", "left of", "dog"), {"cat": [det(A)]}, 1 / 3, 1 / 3),
    (color_attr("cat", "red", "dog", "blue"), {"cat": [det(A, color="red")], "dog": [det(B, color="green")]}, 0.75, 0.75),
]


@pytest.mark.parametrize("metadata, detections, quirk_score, fixed_score", WORKED_EXAMPLES)
def test_partial_credit_worked_examples(metadata, detections, quirk_score, fixed_score):
    assert evaluate(detections, metadata, quirks=True)[2] == pytest.approx(quirk_score)
    assert evaluate(detections, metadata, quirks=False)[2] == pytest.approx(fixed_score)


def test_geneval_aggregate_is_the_mean_of_tag_accuracies():
    results = ([{"tag": "counting", "correct": c} for c in (1, 0, 0, 0)]
               + [{"tag": "colors", "correct": c} for c in (1, 1)]
               + [{"tag": "position", "correct": False}])
    accuracy = rewards.geneval_aggregate(results)
    assert accuracy == {"counting": 0.25, "colors": 1.0, "position": 0.0, "overall": pytest.approx(1.25 / 3)}

# -----------------------------------------------------------------------------
# GenEval end to end

def test_mask2former_postprocessing_matches_transformers_at_384():
    """At a 384x384 image our direct upsampling is exactly transformers' 384 detour (spec 2.1)."""
    from types import SimpleNamespace
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil
    generator = torch.Generator().manual_seed(0)
    class_logits = torch.randn(1, 10, 81, generator=generator) * 3
    mask_logits = torch.randn(1, 10, 24, 24, generator=generator)
    outputs = SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
    reference = Mask2FormerImageProcessorPil().post_process_instance_segmentation(outputs, threshold=0.0, return_binary_maps=True)[0]
    ours = rewards.mask2former_instances(class_logits[0], mask_logits[0], (384, 384), min_score=0.0)
    assert len(ours) == len(reference["segments_info"]) == 10
    expected = sorted((s["score"], s["label_id"]) for s in reference["segments_info"])
    ours_sorted = sorted((score, label) for label, score, _, _ in ours)
    assert [label for _, label in ours_sorted] == [label for _, label in expected]
    assert [score for score, _ in ours_sorted] == pytest.approx([score for score, _ in expected], abs=1e-5)
    label, _, box, mask = max(ours, key=lambda instance: instance[1])
    rows, columns = np.nonzero(mask)
    assert box == (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)


GENEVAL_ROWS = [
    {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"},
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}], "prompt": "a photo of two cats"},
    {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a cat left of a dog"},
]


def test_geneval_end_to_end(mask2former_dir, clip_dir):
    reward = rewards.get_reward("geneval", detector_id=mask2former_dir, clip_id=clip_dir, detector_size=64, batch_size=2)
    scores, details = reward(images_uint8(3), [row["prompt"] for row in GENEVAL_ROWS], GENEVAL_ROWS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert details["tag"] == ["colors", "counting", "position"]
    assert scores.tolist() == details["score"]
    # every query predicts "cat" with prob ~1 x a random mask's mean prob (~0.5-0.7): above 0.3, below 0.9
    assert details["detected"][0]["cat"] > 1 and details["detected"][1] == {}
    # several cats for "a red cat" and no dog for the position prompt: only the official colour check can pass
    assert details["strict"] == [0.0, 0.0, 0.0] and details["correct"][1:] == [0.0, 0.0]
    assert details["score"] == [0.0, 0.0, 0.0]  # count terms clipped at 0, failed checks add 0
    strict = rewards.get_reward("geneval", detector_id=mask2former_dir, clip_id=clip_dir, detector_size=64, score="strict")
    assert strict(images_uint8(3), [row["prompt"] for row in GENEVAL_ROWS], GENEVAL_ROWS)[0].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="metadata"):
        reward(images_uint8(1), ["a photo of a cat"], None)


def test_geneval_detect_mixed_sizes_gives_full_resolution_masks(mask2former_dir, clip_dir):
    """A padded batch: each image's masks and boxes come back in that image's own pixels."""
    reward = rewards.get_reward("geneval", detector_id=mask2former_dir, clip_id=clip_dir, detector_size=64).load()
    images = rewards.to_pil(images_uint8(1, 48, 40)) + rewards.to_pil(images_uint8(1, 32, 64, seed=1))
    with torch.no_grad():
        per_image = reward.detect(images, thresholds=[0.3, 0.3])
    for image, candidates in zip(images, per_image):
        assert candidates["cat"]
        for d in candidates["cat"]:
            assert d.mask.shape == (image.height, image.width) and d.mask.any()
            assert 0 <= d.box[0] < d.box[2] <= image.width and 0 <= d.box[1] < d.box[3] <= image.height


def test_geneval_reference_transport_flags(mask2former_dir, clip_dir):
    """reference_quirks feeds the detector a JPEG-q75 copy with red and blue swapped; colour crops stay RGB."""
    reward = rewards.get_reward("geneval", detector_id=mask2former_dir, clip_id=clip_dir, detector_size=64,
                                reference_quirks=True)
    assert reward.bgr_swap and reward.jpeg_q75 and reward.unclipped_count and reward.failed_position_adds_one
    assert not rewards.get_reward("geneval", reference_quirks=True, bgr_swap=False).bgr_swap
    seen = []
    detect = reward.detect
    reward.detect = lambda images, thresholds: seen.extend(images) or detect(images, thresholds)
    image = rewards.to_pil(images_uint8(1))[0]
    scores, details = reward([image], [GENEVAL_ROWS[0]["prompt"]], GENEVAL_ROWS[:1])
    expected = np.asarray(Image.open(io.BytesIO(rewards.jpeg_bytes(image, 75))))[..., ::-1]
    assert np.array_equal(np.asarray(seen[0]), expected)
    cats = details["detected"][0]["cat"]  # "a red cat" with k cats: unclipped count term 1 - (k - 1), colour term 0
    assert cats > 1 and scores.item() == pytest.approx((2 - cats) / 2)

# -----------------------------------------------------------------------------
# GenEval training metadata

def test_geneval_train_metadata_mix_fields_and_exclusion(tmp_path):
    rows = rewards.make_geneval_train_metadata(1000, seed=0)
    assert rows == rewards.make_geneval_train_metadata(1000, seed=0)
    tags = [row["tag"] for row in rows]
    # weights 0.7 / 0.3 / 0.1 / 0.5 / 0.1 over their sum 1.7
    assert {tag: tags.count(tag) for tag in set(tags)} == {"position": 412, "counting": 294, "color_attr": 176,
                                                            "colors": 59, "two_object": 59}
    for row in rows:
        assert row["prompt"].startswith("a photo of ")
        assert all(clause["class"] in rewards.GENEVAL_CLASSES for clause in row["include"])
        if row["tag"] == "counting":
            n = row["include"][0]["count"]
            assert 2 <= n <= 4 and row["exclude"] == [{"class": row["include"][0]["class"], "count": n + 1}]
        if row["tag"] in ("colors", "color_attr"):
            assert all(c["color"] in rewards.GENEVAL_COLORS and c["class"] != "person" for c in row["include"])
        if row["tag"] == "position":
            relation, ref = row["include"][1]["position"]
            assert relation in rewards.POSITIONS and ref == 0
    assert rewards.with_article("orange") == "an orange" and rewards.make_plural("bus") == "buses"
    assert rewards.make_plural("skis") == "skises" and rewards.make_plural("cat") == "cats"
    row = rewards.make_geneval_row("counting", np.random.default_rng(3))
    assert row["prompt"] == f"a photo of {rewards.COUNT_WORDS[row['include'][0]['count']]} {rewards.make_plural(row['include'][0]['class'])}"
    # excluding an evaluation file: no drawn prompt may appear in it
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text("".join(json.dumps(row) + "\n" for row in rows[:300]))
    fresh = rewards.make_geneval_train_metadata(300, seed=0, exclude_file=str(evaluation))
    assert len(fresh) == 300 and not {row["prompt"] for row in fresh} & {row["prompt"] for row in rows[:300]}
    singles = tmp_path / "singles.txt"
    singles.write_text("\n".join(f"a photo of {rewards.with_article(c)}" for c in rewards.GENEVAL_CLASSES))
    with pytest.raises(ValueError, match="cannot draw"):
        rewards.make_geneval_train_metadata(2, seed=0, exclude_file=str(singles), tag_weights={"single_object": 1.0})

# -----------------------------------------------------------------------------
# OCR

def test_ocr_target_and_normalisation():
    assert rewards.ocr_target('A sign that says "Hello World" and "more"') == "Hello World"
    with pytest.raises(ValueError, match="double quotes"):
        rewards.ocr_target("A sign that says hello")
    assert rewards.normalize_ocr_text("Hello  World\tX\n!") == "helloworld\tx\n!"


def brute_force_levenshtein(a, b):
    if not a or not b:
        return len(a) + len(b)
    return min(brute_force_levenshtein(a[1:], b) + 1, brute_force_levenshtein(a, b[1:]) + 1,
               brute_force_levenshtein(a[1:], b[1:]) + (a[0] != b[0]))


def test_levenshtein_known_pairs_and_brute_force():
    for a, b, distance in [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "abc", 0),
                           ("intention", "execution", 5), ("ab", "ba", 2)]:
        assert rewards.levenshtein(a, b) == rewards.levenshtein(b, a) == distance
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 6)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 6)))
        assert rewards.levenshtein(a, b) == brute_force_levenshtein(a, b)


def test_ocr_score_rules():
    assert rewards.ocr_score("Welcome to the OPEN cafe", "Open Cafe") == 1.0  # spaces removed, lowercased
    assert rewards.ocr_score("xx OPEN yy", "open") == 1.0                 # substring: extra text is free
    assert rewards.ocr_score("opne", "open") == pytest.approx(1 - 2 / 4)  # two substitutions
    assert rewards.ocr_score("", "open") == 0.0                           # empty reading
    assert rewards.ocr_score("zzzzzzzzzz", "open") == 0.0                 # distance clipped at len(target)
    with pytest.raises(ValueError, match="empty OCR target"):
        rewards.ocr_score("abc", "  ")


def test_ocr_end_to_end(got_ocr_dir):
    reward = rewards.get_reward("ocr", model_id=got_ocr_dir, max_new_tokens=8)
    prompts = ['A sign that says "open"', 'A mug with "tea" on it', 'A sign that says "hello world"']
    scores, details = reward(images_uint8(3), prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    assert details["target"] == ["open", "tea", "hello world"]
    assert not any("\n" in text for text in details["text"])  # lines joined without separator, like PaddleOCR's
    expected = [rewards.ocr_score(text, target) for text, target in zip(details["text"], details["target"])]
    assert scores.tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="double quotes"):
        reward(images_uint8(1), ["no quotes here"])


def test_make_ocr_prompts():
    prompts = rewards.make_ocr_prompts(50, seed=1)
    assert len(prompts) == 50 and prompts == rewards.make_ocr_prompts(50, seed=1)
    assert all(p.count('"') == 2 and rewards.ocr_target(p) for p in prompts)
    assert all(set(rewards.ocr_target(p).split()) == {"stop"} for p in rewards.make_ocr_prompts(5, 0, words=["stop"]))
    with pytest.raises(ValueError):
        rewards.make_ocr_prompts(1, 0, words=['say "hi"'])

# -----------------------------------------------------------------------------
# CLIP-family rewards against the formula computed by hand

def hand_clip(clip_dir, images, prompts):
    from transformers import CLIPModel, CLIPProcessor
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=prompts, images=rewards.to_pil(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
    return model, image, text


def test_pickscore_and_clipscore(clip_dir):
    images, prompts = images_uint8(3), ["a cat", "a red dog on a skateboard", "x"]
    model, image, text = hand_clip(clip_dir, images, prompts)
    cosine = torch.nn.functional.cosine_similarity(image, text)
    pick, _ = rewards.get_reward("pickscore", processor_id=clip_dir, model_id=clip_dir, batch_size=2)(images, prompts)
    clip, _ = rewards.get_reward("clipscore", model_id=clip_dir)(images, prompts)
    assert pick.shape == clip.shape == (3,)
    assert torch.allclose(pick, model.logit_scale.exp() * cosine / 26, atol=1e-5)
    assert torch.allclose(clip, model.logit_scale.exp() * cosine / 30, atol=1e-5)


def test_aesthetic_converts_pth_once_and_scores(clip_dir, tmp_path):
    torch.manual_seed(0)
    mlp = rewards.AestheticMLP()
    pth = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(mlp.state_dict(), pth)
    images = images_uint8(2)
    scores, _ = rewards.get_reward("aesthetic", clip_id=clip_dir, weights_path=str(pth))(images, ["", ""])
    assert (tmp_path / "sac+logos+ava1-l14-linearMSE.safetensors").exists()
    _, image, _ = hand_clip(clip_dir, images, ["", ""])
    with torch.no_grad():
        expected = mlp.eval()(torch.nn.functional.normalize(image, dim=-1)).squeeze(-1)
    assert torch.allclose(scores, expected, atol=1e-5)
    pth.unlink()  # the cached .safetensors alone is enough from now on
    again, _ = rewards.get_reward("aesthetic", clip_id=clip_dir, weights_path=str(pth))(images, ["", ""])
    assert torch.equal(again, scores)

# -----------------------------------------------------------------------------
# JPEG

def test_jpeg_scores_match_pil_sizes():
    images = torch.cat([images_uint8(1), torch.full((1, 3, 48, 40), 128, dtype=torch.uint8)])
    sizes = []
    for pil in rewards.to_pil(images):
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    assert sizes[0] > sizes[1]  # noise compresses worse than a flat grey
    incompressibility, details = rewards.get_reward("jpeg_incompressibility")(images, ["", ""])
    assert details["kb"] == sizes
    sizes = torch.tensor(sizes)
    assert torch.allclose(incompressibility, sizes)
    assert torch.allclose(rewards.get_reward("jpeg_compressibility")(images, ["", ""])[0], -sizes / 500)
    assert torch.allclose(rewards.get_reward("jpeg_compressibility", divisor=1)(images / 255.0, ["", ""])[0], -sizes)


def test_brightness_and_its_inverse():
    images = torch.stack([torch.full((3, 8, 8), 51, dtype=torch.uint8), torch.full((3, 8, 8), 204, dtype=torch.uint8)])
    images[1, 0, 0, 0] = 0  # one dark pixel of 192
    bright = rewards.get_reward("brightness")(images, ["", ""])[0]
    expected = torch.tensor([0.2, (204 * 191 / 192) / 255])
    assert torch.allclose(bright, expected)
    assert torch.allclose(rewards.get_reward("brightness", invert=True)(images, ["", ""])[0], 1 - expected)


# -----------------------------------------------------------------------------
# Qwen-VL judge

def test_qwenvl_score_parsing():
    assert rewards.qwenvl_score("<Thought>ok</Thought><Score>4</Score>", "Score") == 0.8
    answer = "<QualityScore>2</QualityScore><InstructionScore>5</InstructionScore><OverallScore>3</OverallScore>"
    assert rewards.qwenvl_score(answer, "OverallScore") == 0.6
    assert rewards.qwenvl_score("<Score>4.5</Score>", "Score") == 0.0  # integers only, as the reference parses
    assert rewards.qwenvl_score("no tags", "OverallScore") == 0.0


def test_qwenvl_end_to_end(qwen_vl_dir):
    reward = rewards.get_reward("qwenvl", model_id=qwen_vl_dir, max_new_tokens=4, strict=True)
    assert "Be extremely strict." in reward.question("a cat") and "Instruction: a cat" in reward.question("a cat")
    images = rewards.to_pil(images_uint8(2, 56, 56))
    scores, details = reward(images, ["a cat", "two dogs playing in the snow"])
    assert scores.shape == (2,) and torch.isfinite(scores).all() and len(details["answer"]) == 2

# -----------------------------------------------------------------------------
# prompt files

def test_load_prompts_formats_and_errors(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text(' a "sign"  \n\nsecond\n')
    assert rewards.load_prompts(str(txt)) == (['a "sign"', "second"], [{}, {}])
    jsonl = tmp_path / "m.jsonl"
    row = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
    jsonl.write_text(json.dumps(row) + "\n")
    assert rewards.load_prompts(str(jsonl)) == (["a photo of a red car"], [row])
    jsonl.write_text(json.dumps(row) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"m.jsonl:2: not a JSON object"):
        rewards.load_prompts(str(jsonl))
    jsonl.write_text('{"tag": "colors"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:1: .*'prompt'"):
        rewards.load_prompts(str(jsonl))
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        rewards.load_prompts(str(empty))
    with pytest.raises(ValueError, match=r"\.txt .* or \.jsonl"):
        rewards.load_prompts(str(tmp_path / "prompts.csv"))
