"""
Every reward behind one call shape, in the training process, from models that transformers ships natively.

    r = get_reward("geneval", device="cuda", dtype=torch.float16)
    scores, details = r(images, prompts, metadata)    # scores: float32 (B,) on CPU; details: per-image lists

`images` is a uint8 tensor (B, 3, H, W), a float tensor in [0, 1] of that shape, or a list of PIL images.
The rules, thresholds and model ids come from docs/reward_spec.md ("spec" below, cited by section).
Every reward returns finite scores or raises: a NaN would silently poison a whole GRPO group.
Models load lazily on the first call (or on an explicit `load()`), so building a reward is free.
"""

import io
import json
import os
import random
import re
import warnings
from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# -----------------------------------------------------------------------------
# images in, images out

def to_uint8(images):
    """uint8 tensor (B, 3, H, W) from a uint8 tensor, a [0, 1] float tensor or a list of same-size PIL images."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return images.cpu()
        # the Flow-GRPO conversion (spec 1.8, 4, 6): x255, round, clamp
        return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])


def to_pil(images):
    """List of RGB PIL images from any accepted image input."""
    if isinstance(images, torch.Tensor):
        return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in to_uint8(images)]
    return [im.convert("RGB") for im in images]


def jpeg_bytes(image, quality):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()

# -----------------------------------------------------------------------------
# pretrained weights: a local folder, the HF cache, or one short download attempt

class RewardWeightsUnavailable(RuntimeError):
    """A reward's weights are neither local nor downloadable. evaluate.py catches this to skip a column."""


def _offline():
    return any(os.environ.get(key, "").lower() in ("1", "true", "yes", "on")
               for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_pretrained(model_id):
    """Local folder for `model_id`: the id itself if it is a folder, else its HF-cache snapshot, else the id
    (transformers then downloads it). When nothing local exists we probe the Hub once with a short timeout,
    because transformers' own loader retries a dead connection for about 45 s per file."""
    if os.path.isdir(model_id):
        return model_id
    import huggingface_hub
    try:
        return huggingface_hub.snapshot_download(model_id, local_files_only=True)
    except Exception:
        pass
    how = (f"pre-download it with `hf download {model_id}` on a machine with access, then point HF_HOME at "
           f"that cache or pass the local folder instead of the id")
    if _offline():
        raise RewardWeightsUnavailable(f"{model_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {how}")
    try:
        huggingface_hub.model_info(model_id, timeout=10)
    except Exception as err:
        raise RewardWeightsUnavailable(f"{model_id} is not local and cannot be fetched from the Hub ({type(err).__name__}): {how}") from None
    return model_id


def load_pretrained(cls, model_id, **kwargs):
    """cls.from_pretrained through resolve_pretrained; never trust_remote_code."""
    path = resolve_pretrained(model_id)
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RewardWeightsUnavailable(f"{model_id}: {first_line} (pre-download it with `hf download {model_id}`, "
                                       f"or pass a complete local folder)") from err


def clip_features(output):
    """transformers 5 returns an output object from get_image_features / get_text_features, 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output

# -----------------------------------------------------------------------------
# the call shape, the registry, the weighted sum

REWARDS = {}


def register_reward(name):
    def decorate(cls):
        cls.name = name
        REWARDS[name] = cls
        return cls
    return decorate


class RewardOutputError(ValueError):
    """A reward returned something other than (one finite-or-not float score per image, a dict of details)."""


_OUTPUT_ERROR = []


def _user_error(message):
    """A RewardOutputError that is also model.UserError where the stage scripts run (printed as one line)."""
    if not _OUTPUT_ERROR:
        try:
            from model import UserError
            _OUTPUT_ERROR.append(type("RewardOutputError", (UserError, RewardOutputError), {}))
        except ImportError:
            _OUTPUT_ERROR.append(RewardOutputError)
    return _OUTPUT_ERROR[0](message)


def check_output(name, output, n):
    """A reward call's result as (float32 scores (n,) on the CPU, details dict), or a one-line error that says
    what is wrong with it: the wrong count, shape or type. Non-finite scores pass (the stages skip them)."""
    how = f"a reward returns (scores, details): one float score per image (a list or 1-D tensor of {n}) and a dict"
    if not isinstance(output, (tuple, list)) or len(output) != 2 or not isinstance(output[1], dict):
        raise _user_error(f"reward {name!r} returned {type(output).__name__} {_short(output)}; {how}")
    scores, details = output
    numbers = isinstance(scores, torch.Tensor) or (isinstance(scores, np.ndarray) and scores.dtype.kind in "fiu") or (
        isinstance(scores, (list, tuple)) and all(isinstance(s, (int, float, np.integer, np.floating)) or
                                                  (isinstance(s, torch.Tensor) and s.numel() == 1) for s in scores))
    if not numbers:
        raise _user_error(f"reward {name!r} returned scores {_short(scores)}, not numbers; {how}")
    t = scores.detach().cpu() if isinstance(scores, torch.Tensor) else torch.as_tensor(np.asarray([float(s) for s in scores]))
    if t.dtype in (torch.bool, torch.complex64, torch.complex128) or t.ndim != 1 or len(t) != n:
        raise _user_error(f"reward {name!r} returned scores of shape {tuple(t.shape)} and dtype {t.dtype} for {n} images; {how}")
    return t.to(torch.float32), details


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class CheckedReward:
    """Your own reward (module:Class) with its output checked on every call (check_output); anything else
    (attributes, load()) is the reward's own."""

    def __init__(self, reward, name):
        self.reward, self.spec = reward, name

    def __call__(self, images, prompts, metadata=None):
        n = len(images)
        return check_output(self.spec, self.reward(images, prompts, metadata), n)

    def __getattr__(self, attr):
        return getattr(self.__dict__["reward"], attr)


def get_reward(name, **kwargs):
    """A registered reward by name, or your own Reward subclass as "package.module:ClassName" (its output is
    checked on every call: a wrong count, shape or type is a one-line error, not a crash further on)."""
    if ":" in name:
        import importlib
        module, _, cls = name.partition(":")
        try:
            return CheckedReward(getattr(importlib.import_module(module), cls)(**kwargs), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward {name!r}: cannot import {cls} from {module} ({err})") from None
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}, or module:Class")
    return REWARDS[name](**kwargs)


class Reward:
    """Subclasses implement _load() (models, lazily) and score_batch(pil_images, prompts, metadata) ->
    (list of float scores, dict of per-image lists)."""
    name = "reward"
    batch_size = 32

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=None):
        self.device, self.dtype = torch.device(device), dtype
        if batch_size is not None:
            self.batch_size = batch_size
        self._loaded = False

    def load(self):
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def _load(self):
        pass

    @torch.no_grad()
    def __call__(self, images, prompts, metadata=None):
        images = to_pil(images)
        metadata = [{} for _ in images] if metadata is None else list(metadata)
        if not len(images) == len(prompts) == len(metadata):
            raise ValueError(f"{self.name}: {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata rows")
        self.load()
        scores, details = [], defaultdict(list)
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            batch_scores, batch_details = self.score_batch(images[start:end], list(prompts[start:end]), metadata[start:end])
            scores.extend(float(s) for s in batch_scores)
            for key, values in batch_details.items():
                details[key].extend(values)
        if len(scores) != len(images):
            raise _user_error(f"reward {self.name!r} gave {len(scores)} scores for {len(images)} images; its "
                              f"score_batch must return one score per image")
        scores = torch.tensor(scores, dtype=torch.float32)
        if not torch.isfinite(scores).all():
            raise FloatingPointError(f"{self.name} produced non-finite scores at {torch.nonzero(~torch.isfinite(scores)).flatten().tolist()}")
        return scores, dict(details)

    def score_batch(self, images, prompts, metadata):
        raise NotImplementedError


class MultiReward(Reward):
    """Weighted sum, e.g. MultiReward({"ocr": 0.8, "pickscore": 0.2}). details holds each component's
    scores under its name and its own details under "name/key". reward_kwargs: {name: kwargs for get_reward}."""
    name = "multi"

    def __init__(self, weights, device="cpu", dtype=torch.float32, reward_kwargs=None):
        super().__init__(device, dtype)
        reward_kwargs = reward_kwargs or {}
        self.weights = dict(weights)
        self.rewards = {name: get_reward(name, device=device, dtype=dtype, **reward_kwargs.get(name, {}))
                        for name in self.weights}

    def _load(self):
        for reward in self.rewards.values():
            reward.load()

    def __call__(self, images, prompts, metadata=None):
        images = to_pil(images)
        total, details = torch.zeros(len(images)), {}
        for name, reward in self.rewards.items():
            scores, reward_details = reward(images, prompts, metadata)
            total += self.weights[name] * scores
            details[name] = scores
            details.update({f"{name}/{key}": value for key, value in reward_details.items()})
        return total, details

# -----------------------------------------------------------------------------
# GenEval (spec 1): pure rules over detections, then the reward that produces the detections

# spec 1.9: index = COCO-80 contiguous id = the detector's class id
GENEVAL_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
# the standard COCO-80 label map (HF id2label) names three classes differently
COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
GENEVAL_COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
GENEVAL_TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
POSITIONS = ["left of", "right of", "above", "below"]


class Detection(NamedTuple):
    score: float
    box: tuple          # (x1, y1, x2, y2) in pixels, x2 = last column + 1 (mmdet mask2bbox)
    mask: object        # bool array (H, W) or None (hand-made detections in tests)
    color: str = None   # one of GENEVAL_COLORS once classified (spec 1.5), else None


def filter_detections(candidates, threshold, max_objects=16):
    """Spec 1.3 filtering: per class sort by score, keep score > threshold, cap at max_objects, drop empty
    classes. NMS is off in both references (max_overlap 1.0), so it is not implemented."""
    kept = {}
    for classname, dets in candidates.items():
        dets = [d for d in sorted(dets, key=lambda d: -d.score) if d.score > threshold][:max_objects]
        if dets:
            kept[classname] = dets
    return kept


def relative_position(box_a, box_b, position_threshold=0.1):
    """Spec 1.6: the set of relations of A (candidate) to B (reference)."""
    center_a = np.array([(box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2])
    center_b = np.array([(box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2])
    size_a = np.abs([box_a[2] - box_a[0], box_a[3] - box_a[1]])
    size_b = np.abs([box_b[2] - box_b[0], box_b[3] - box_b[1]])
    offset = center_a - center_b
    # shrink the offset by 10% of the summed sizes so touching or overlapping objects relate to nothing
    revised = np.sign(offset) * np.maximum(np.abs(offset) - position_threshold * (size_a + size_b), 0)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)  # divided by the original offset norm, as the reference does
    relations = set()
    if dx < -0.5: relations.add("left of")
    if dx > 0.5: relations.add("right of")
    if dy < -0.5: relations.add("above")  # image y grows downwards
    if dy > 0.5: relations.add("below")
    return relations


def _relation_holds(objects, relation, references, position_threshold):
    return all(relation in relative_position(a.box, b.box, position_threshold) for a in objects for b in references)


def geneval_correct(detections, metadata, position_threshold=0.1):
    """The official GenEval rule (spec 1.4): includes ANDed on the n most confident objects, excludes ORed.
    detections: {classname: [Detection, ...]} already filtered and sorted (filter_detections)."""
    correct, groups = True, []
    for clause in metadata["include"]:
        n = clause["count"]
        objects = detections.get(clause["class"], [])[:n]
        matched = len(objects) >= n
        if matched and "color" in clause:
            matched = sum(d.color == clause["color"] for d in objects) >= n
        if matched and "position" in clause:
            relation, ref = clause["position"]
            matched = groups[ref] is not None and _relation_holds(objects, relation, groups[ref], position_threshold)
        correct = correct and matched
        groups.append(objects if matched else None)
    for clause in metadata.get("exclude", []):
        if len(detections.get(clause["class"], [])) >= clause["count"]:
            correct = False
    return correct


def geneval_strict_and_score(detections, metadata, position_threshold=0.1, unclipped_count=False,
                             failed_position_adds_one=False):
    """The reward-server pass (spec 1.8): (strict_correct, partial-credit score). Every clause needs exactly n
    kept detections, all of them with the colour / relation. The score is the mean of the per-clause terms.
    The two reference defects are fixed unless asked for: the count term 1 - |n-k|/n is clipped at 0
    (unclipped it reaches -14 for n=1, k=16: a single-object image full of extra copies would be punished
    far below an empty one), and a failed relation adds only 0.0 (the reference also adds 1.0 after it)."""
    strict, terms, groups = True, [], []
    for clause in metadata["include"]:
        n = clause["count"]
        objects = detections.get(clause["class"], [])
        count_term = 1 - abs(n - len(objects)) / n
        terms.append(count_term if unclipped_count else max(count_term, 0.0))
        matched = len(objects) == n
        if not matched:
            if "color" in clause or "position" in clause:
                terms.append(0.0)
        else:
            if "color" in clause:
                right_color = sum(d.color == clause["color"] for d in objects)
                terms.append(1 - abs(n - right_color) / n)
                matched = right_color == n
            if matched and "position" in clause:
                relation, ref = clause["position"]
                if groups[ref] is None:
                    terms.append(0.0)
                    matched = False
                else:
                    matched = _relation_holds(objects, relation, groups[ref], position_threshold)
                    if not matched:
                        terms.append(0.0)
                    if matched or failed_position_adds_one:
                        terms.append(1.0)
        strict = strict and matched
        groups.append(objects if matched else None)
    return strict, (sum(terms) / len(terms) if terms else 0.0)


def geneval_aggregate(results, key="correct"):
    """Spec 1.7: per-tag accuracy (image-weighted within a tag) and overall = unweighted mean over tags.
    results: per-image dicts with "tag" and `key` (0/1 or bool), e.g. from the geneval reward's details."""
    by_tag = defaultdict(list)
    for result in results:
        by_tag[result["tag"]].append(float(result[key]))
    accuracy = {tag: sum(values) / len(values) for tag, values in by_tag.items()}
    accuracy["overall"] = sum(accuracy.values()) / len(accuracy) if accuracy else 0.0
    return accuracy


def mask2former_instances(class_logits, mask_logits, image_size, min_score):
    """mmdet's MaskFormer instance post-processing (spec 1.3, 2.1) for one image, with the mask logits
    upsampled straight to the image size (transformers' post-processor detours through 384x384).
    class_logits (Q, C+1); mask_logits (Q, h, w) covering the un-padded input. Returns (label, score, box, mask)
    for candidates whose score is > min_score."""
    class_probs = class_logits.float().softmax(-1)[:, :-1]        # drop the no-object column
    num_queries, num_classes = class_probs.shape
    probs, flat = class_probs.flatten().topk(num_queries)          # top-100 over (query x class) pairs
    # the final score is class prob x mean mask prob <= class prob, so this drops nothing that could pass
    keep = probs > min_score
    probs, flat = probs[keep], flat[keep]
    if len(flat) == 0:
        return []
    logits = F.interpolate(mask_logits[flat // num_classes][None].float(), size=image_size, mode="bilinear",
                           align_corners=False)[0]
    masks = logits > 0
    mask_probs = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    scores = probs * mask_probs
    instances = []
    for label, score, mask in zip((flat % num_classes).tolist(), scores.tolist(), masks):
        if score <= min_score:
            continue
        columns, rows = mask.any(0).nonzero().flatten(), mask.any(1).nonzero().flatten()
        box = (columns[0].item(), rows[0].item(), columns[-1].item() + 1, rows[-1].item() + 1)
        instances.append((label, score, box, mask.cpu().numpy()))
    return instances


def swap_red_blue(image):
    """What the reference server's detector saw (spec 1.8): an RGB array that mmdet took for BGR."""
    return Image.fromarray(np.ascontiguousarray(np.asarray(image)[..., ::-1]))


def jpeg_roundtrip(image, quality=75):
    """The reference client's transport (spec 1.8): PIL's default JPEG quality 75."""
    return Image.open(io.BytesIO(jpeg_bytes(image, quality))).convert("RGB")


@register_reward("geneval")
class GenEvalReward(Reward):
    """GenEval with Mask2Former (COCO instance) + CLIP ViT-L/14 colour classification.
    details per image: score (partial credit), strict (reward-server rule), correct (official rule), tag,
    detected ({class: kept count}). `score` picks the training score: "score" (default, Flow-GRPO's training
    reward), "strict" or "correct". reference_quirks=True reproduces the reward server's four defects; each
    can also be set alone (bgr_swap, unclipped_count, failed_position_adds_one, jpeg_q75)."""
    batch_size = 8

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=None,
                 detector_id="facebook/mask2former-swin-small-coco-instance",
                 clip_id="openai/clip-vit-large-patch14", score="score", detector_size=800,
                 threshold=0.3, counting_threshold=0.9, max_objects=16, position_threshold=0.1,
                 reference_quirks=False, bgr_swap=None, unclipped_count=None, failed_position_adds_one=None,
                 jpeg_q75=None):
        super().__init__(device, dtype, batch_size)
        if score not in ("score", "strict", "correct"):
            raise ValueError(f"geneval score must be 'score', 'strict' or 'correct', got {score!r}")
        self.detector_id, self.clip_id, self.score_key = detector_id, clip_id, score
        # mmdet resizes a 512^2 image to 800^2 (spec 1.3); the HF checkpoint's processor default is 384^2
        self.detector_size = detector_size
        self.threshold, self.counting_threshold = threshold, counting_threshold
        self.max_objects, self.position_threshold = max_objects, position_threshold
        quirk = lambda flag: reference_quirks if flag is None else flag
        self.bgr_swap, self.unclipped_count = quirk(bgr_swap), quirk(unclipped_count)
        self.failed_position_adds_one, self.jpeg_q75 = quirk(failed_position_adds_one), quirk(jpeg_q75)
        self.color_classifiers = {}

    def _load(self):
        from transformers import (AutoImageProcessor, CLIPModel, CLIPProcessor,
                                  Mask2FormerForUniversalSegmentation)
        self.detector_processor = load_pretrained(AutoImageProcessor, self.detector_id)
        self.detector = load_pretrained(Mask2FormerForUniversalSegmentation, self.detector_id, dtype=self.dtype)
        self.detector.to(self.device).eval()
        # GenEval reads detections by class index (spec 1.9): check the checkpoint's order is COCO-80's
        labels = [COCO_TO_GENEVAL.get(self.detector.config.id2label[i], self.detector.config.id2label[i])
                  for i in range(self.detector.config.num_labels)]
        if labels != GENEVAL_CLASSES:
            raise ValueError(f"{self.detector_id}: id2label is not the contiguous COCO-80 order GenEval expects")
        self.clip_processor = load_pretrained(CLIPProcessor, self.clip_id)
        self.clip = load_pretrained(CLIPModel, self.clip_id, dtype=self.dtype).to(self.device).eval()

    def detect(self, images, thresholds):
        """Per image {classname: [Detection]} of every candidate above its image's threshold (unsorted)."""
        size = {"shortest_edge": self.detector_size, "longest_edge": round(self.detector_size * 1333 / 800)}
        inputs = self.detector_processor(images, size=size, size_divisor=32, return_tensors="pt")
        outputs = self.detector(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                                pixel_mask=inputs["pixel_mask"].to(self.device))
        results = []
        for i, image in enumerate(images):
            # the processor resizes each image to a multiple of 32 and pads the batch: mask logits are at
            # stride 4 of the padded input, so the image's own region is the first rows/cols / 4
            height = int(inputs["pixel_mask"][i].any(1).sum()) // 4
            width = int(inputs["pixel_mask"][i].any(0).sum()) // 4
            mask_logits = outputs.masks_queries_logits[i, :, :height, :width]
            candidates = defaultdict(list)
            for label, score, box, mask in mask2former_instances(outputs.class_queries_logits[i], mask_logits,
                                                                 (image.height, image.width), thresholds[i]):
                candidates[GENEVAL_CLASSES[label]].append(Detection(score, box, mask))
            results.append(candidates)
        return results

    def color_classifier(self, classname):
        """Spec 1.5: 3 templates x 10 colours, normalised text embeddings averaged per colour, renormalised."""
        if classname not in self.color_classifiers:
            templates = [f"a photo of a {{}} {classname}", f"a photo of a {{}}-colored {classname}", "a photo of a {} object"]
            texts = [template.format(color) for color in GENEVAL_COLORS for template in templates]
            tokens = self.clip_processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            embeddings = F.normalize(clip_features(self.clip.get_text_features(**tokens)).float(), dim=-1)
            embeddings = embeddings.view(len(GENEVAL_COLORS), len(templates), -1).mean(1)
            self.color_classifiers[classname] = F.normalize(embeddings, dim=-1)
        return self.color_classifiers[classname]

    def classify_colors(self, image, classname, detections):
        """Spec 1.5: each object composited on #999 grey with its mask, cropped to its box, CLIP argmax."""
        grey = Image.new("RGB", image.size, (153, 153, 153))
        crops = [Image.composite(image, grey, Image.fromarray(d.mask)).crop(d.box) for d in detections]
        pixels = self.clip_processor.image_processor(crops, return_tensors="pt")["pixel_values"]
        embeddings = clip_features(self.clip.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        logits = F.normalize(embeddings.float(), dim=-1) @ self.color_classifier(classname).T
        return [d._replace(color=GENEVAL_COLORS[k]) for d, k in zip(detections, logits.argmax(-1).tolist())]

    def score_batch(self, images, prompts, metadata):
        if any("include" not in row or "tag" not in row for row in metadata):
            raise ValueError("geneval needs a GenEval metadata row (tag, include, ...) per image, e.g. from load_prompts(*.jsonl)")
        if self.jpeg_q75:
            images = [jpeg_roundtrip(image, 75) for image in images]
        thresholds = [self.counting_threshold if row["tag"] == "counting" else self.threshold for row in metadata]
        detector_view = [swap_red_blue(image) for image in images] if self.bgr_swap else images
        details = defaultdict(list)
        for image, row, candidates, threshold in zip(images, metadata, self.detect(detector_view, thresholds), thresholds):
            detections = filter_detections(candidates, threshold, self.max_objects)
            for classname in {clause["class"] for clause in row["include"] if "color" in clause}:
                if classname in detections:  # colour crops always use the true RGB image, also with bgr_swap
                    detections[classname] = self.classify_colors(image, classname, detections[classname])
            strict, score = geneval_strict_and_score(detections, row, self.position_threshold, self.unclipped_count,
                                                     self.failed_position_adds_one)
            details["score"].append(score)
            details["strict"].append(float(strict))
            details["correct"].append(float(geneval_correct(detections, row, self.position_threshold)))
            details["tag"].append(row["tag"])
            details["detected"].append({classname: len(dets) for classname, dets in detections.items()})
        return details[self.score_key], dict(details)

# -----------------------------------------------------------------------------
# GenEval-style training metadata (spec 1.1, 8) when the published train_metadata.jsonl is not at hand

# Flow-GRPO's dataset/merge_genevaltask.py task weights (normalised by their sum); single_object is not
# trained on there. Read in a public fork of flow_grpo (zqqqqz2000/flow_grpo), not in reward_spec.md.
GENEVAL_TRAIN_MIX = {"position": 0.7, "color_attr": 0.3, "colors": 0.1, "counting": 0.5, "two_object": 0.1}
COUNT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def with_article(word):
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def make_plural(word):
    return f"{word}es" if word.endswith("s") else f"{word}s"


def make_geneval_row(tag, rng):
    """One GenEval metadata row drawn as prompts/create_prompts.py draws it (spec 1.1)."""
    pick = lambda: GENEVAL_CLASSES[rng.integers(len(GENEVAL_CLASSES))]
    pick_two = lambda pool: [pool[i] for i in rng.choice(len(pool), size=2, replace=False)]
    not_person = GENEVAL_CLASSES[1:]  # never "[colour] person"
    if tag == "single_object":
        obj = pick()
        return {"tag": tag, "include": [{"class": obj, "count": 1}], "prompt": f"a photo of {with_article(obj)}"}
    if tag == "two_object":
        a, b = pick_two(GENEVAL_CLASSES)
        return {"tag": tag, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of {with_article(a)} and {with_article(b)}"}
    if tag == "counting":
        obj, n = pick(), int(rng.integers(2, 5))
        return {"tag": tag, "include": [{"class": obj, "count": n}], "exclude": [{"class": obj, "count": n + 1}],
                "prompt": f"a photo of {COUNT_WORDS[n]} {make_plural(obj)}"}
    if tag == "colors":
        obj, color = not_person[rng.integers(len(not_person))], GENEVAL_COLORS[rng.integers(10)]
        return {"tag": tag, "include": [{"class": obj, "count": 1, "color": color}],
                "prompt": f"a photo of {with_article(color)} {obj}"}
    if tag == "position":
        a, b = pick_two(GENEVAL_CLASSES)
        relation = POSITIONS[rng.integers(4)]
        # include[0] is the reference object B; position [relation, 0] points at it
        return {"tag": tag, "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
                "prompt": f"a photo of {with_article(a)} {relation} {with_article(b)}"}
    if tag == "color_attr":
        a, b = pick_two(not_person)
        color_a, color_b = pick_two(GENEVAL_COLORS)
        return {"tag": tag, "include": [{"class": a, "count": 1, "color": color_a}, {"class": b, "count": 1, "color": color_b}],
                "prompt": f"a photo of {with_article(color_a)} {a} and {with_article(color_b)} {b}"}
    raise ValueError(f"unknown GenEval tag {tag!r}; tags: {', '.join(GENEVAL_TAGS)}")


def make_geneval_train_metadata(n, seed, exclude_file=None, tag_weights=None):
    """n GenEval metadata rows split over tags by largest remainder (as merge_genevaltask.py does), drawn
    with repetition allowed, minus any prompt that appears in exclude_file (e.g. the evaluation jsonl)."""
    weights = tag_weights or GENEVAL_TRAIN_MIX
    total = sum(weights.values())
    exact = {tag: n * w / total for tag, w in weights.items()}
    counts = {tag: int(x) for tag, x in exact.items()}
    for tag in sorted(exact, key=lambda t: counts[t] - exact[t])[: n - sum(counts.values())]:
        counts[tag] += 1
    excluded = set(load_prompts(exclude_file)[0]) if exclude_file else set()
    rng = np.random.default_rng(seed)
    rows = []
    for tag, count in counts.items():
        drawn, attempts = 0, 0
        while drawn < count:
            attempts += 1
            if attempts > 1000 * count:
                raise ValueError(f"cannot draw {count} {tag} prompts that are not in {exclude_file}")
            row = make_geneval_row(tag, rng)
            if row["prompt"] not in excluded:
                rows.append(row)
                drawn += 1
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]

# -----------------------------------------------------------------------------
# OCR (spec 3)

def ocr_target(prompt):
    """The text between the first two ASCII double quotes (Flow-GRPO: prompt.split('"')[1])."""
    parts = prompt.split('"')
    if len(parts) < 3:
        raise ValueError(f'OCR prompts need the target text in double quotes, e.g. a sign that says "hello": {prompt!r}')
    return parts[1]


def normalize_ocr_text(text):
    """Spec 3: remove ' ' only (tabs and newlines stay), lowercase; punctuation stays."""
    return text.replace(" ", "").lower()


def levenshtein(a, b):
    """Edit distance with unit insert / delete / substitute costs (what python-Levenshtein computes)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_score(recognized, target):
    """Spec 3: 1 if the normalised target is a substring of the normalised reading,
    else 1 - min(edit distance, len(target)) / len(target). An empty reading scores 0."""
    recognized, target = normalize_ocr_text(recognized), normalize_ocr_text(target)
    if not target:
        raise ValueError("empty OCR target: the quoted text has no characters besides spaces")
    if target in recognized:
        return 1.0
    return 1 - min(levenshtein(recognized, target), len(target)) / len(target)


@register_reward("ocr")
class OcrReward(Reward):
    """GOT-OCR 2.0 (transformers-native) reads the whole image; greedy, stops at <|im_end|>.
    details: text (the reading), target."""
    batch_size = 8

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=None, model_id="stepfun-ai/GOT-OCR-2.0-hf",
                 max_new_tokens=64):
        super().__init__(device, dtype, batch_size)
        self.model_id, self.max_new_tokens = model_id, max_new_tokens

    def _load(self):
        from transformers import AutoProcessor, GotOcr2ForConditionalGeneration
        self.processor = load_pretrained(AutoProcessor, self.model_id)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues from the right end
        self.model = load_pretrained(GotOcr2ForConditionalGeneration, self.model_id, dtype=self.dtype)
        self.model.to(self.device).eval()
        vision = self.model.config.vision_config
        # the processor does not save how many image tokens the model makes (256 for 1024 px / 16 px patches):
        # the SAM-style encoder's patch grid shrinks 4x in the projector's two stride-2 convs
        self.num_image_tokens = (vision.image_size // vision.patch_size // 4) ** 2

    def read(self, images):
        inputs = self.processor(images, return_tensors="pt", num_image_tokens=self.num_image_tokens).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        tokens = self.model.generate(**inputs, do_sample=False, tokenizer=self.processor.tokenizer,
                                     stop_strings="<|im_end|>", max_new_tokens=self.max_new_tokens)
        texts = self.processor.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        # PaddleOCR's text lines are joined with no separator (spec 3); GOT puts "\n" between lines
        return [text.replace("\n", "") for text in texts]

    def score_batch(self, images, prompts, metadata):
        targets = [ocr_target(prompt) for prompt in prompts]  # a prompt without quotes is a data bug: raise
        try:
            readings = self.read(images)
        except Exception as err:  # spec 3: the reference scores any OCR failure 0
            warnings.warn(f"OCR failed on a batch of {len(images)} images ({err!r}); scoring them 0 as Flow-GRPO does")
            readings = [""] * len(images)
        return [ocr_score(text, target) for text, target in zip(readings, targets)], {"text": readings, "target": targets}


# Fallback OCR training prompts (the published 19,652-line train.txt is absent, spec 8)
OCR_TEMPLATES = [
    'A photo of a sign that says "{}"',
    'A wooden sign in a forest that says "{}"',
    'A neon sign on a brick wall that reads "{}"',
    'A storefront with a large sign that says "{}"',
    'A chalkboard menu outside a cafe that says "{}"',
    'A street sign at a busy intersection that says "{}"',
    'A poster on a wall with the words "{}" in bold letters',
    'A t-shirt printed with the text "{}"',
    'A book cover with the title "{}"',
    'A billboard next to a highway that says "{}"',
    'A birthday cake with "{}" written in icing',
    'A handwritten note on a desk that says "{}"',
]
OCR_WORDS = [
    "open", "closed", "welcome", "coffee", "bakery", "books", "sale", "exit", "stop", "hello", "world", "dream",
    "peace", "love", "garden", "library", "market", "pizza", "fresh", "bread", "music", "dance", "happy",
    "birthday", "summer", "winter", "ocean", "forest", "mountain", "river", "city", "night", "morning", "tea",
    "hotel", "station", "museum", "school", "park", "beach", "sunset", "flowers", "cinema", "theater", "gym",
    "pharmacy", "bank", "taxi", "bus", "keep", "calm", "think", "different", "create", "explore", "smile",
]


def make_ocr_prompts(n, seed, words=None):
    """n prompts "... a sign that says "TEXT" ...", TEXT = 1 to 3 words from `words` (default OCR_WORDS)."""
    words = list(words or OCR_WORDS)
    if any('"' in word for word in words):
        raise ValueError('OCR words must not contain double quotes: the target is read between the first two')
    rng = random.Random(seed)
    return [rng.choice(OCR_TEMPLATES).format(" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))))
            for _ in range(n)]

# -----------------------------------------------------------------------------
# CLIP-family rewards: PickScore (spec 4), CLIPScore and Aesthetic (spec 5)

def clip_cosine(model, processor, images, prompts, device, dtype):
    """Cosine similarity of each (image_i, prompt_i) pair, text padded / truncated to 77 tokens."""
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device, dtype)
    tokens = processor.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
    image_emb = F.normalize(clip_features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)
    text_emb = F.normalize(clip_features(model.get_text_features(**tokens)).float(), dim=-1)
    return (image_emb * text_emb).sum(-1)


@register_reward("pickscore")
class PickScoreReward(Reward):
    """exp(logit_scale) * cos(text, image) / 26 (Flow-GRPO's "norm to 0-1", a constant, not clipped)."""

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=None,
                 processor_id="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", model_id="yuvalkirstain/PickScore_v1"):
        super().__init__(device, dtype, batch_size)
        self.processor_id, self.model_id = processor_id, model_id

    def _load(self):
        from transformers import CLIPModel, CLIPProcessor
        self.processor = load_pretrained(CLIPProcessor, self.processor_id)
        self.model = load_pretrained(CLIPModel, self.model_id, dtype=self.dtype).to(self.device).eval()

    def score_batch(self, images, prompts, metadata):
        cosine = clip_cosine(self.model, self.processor, images, prompts, self.device, self.dtype)
        return (self.model.logit_scale.float().exp() * cosine / 26).cpu().tolist(), {}


@register_reward("clipscore")
class ClipScoreReward(Reward):
    """Flow-OPD's CLIPScore: logits_per_image / 30 = exp(logit_scale) * cos / 30 (100 * cos / 30 for OpenAI CLIP)."""

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=None, model_id="openai/clip-vit-large-patch14"):
        super().__init__(device, dtype, batch_size)
        self.model_id = model_id

    def _load(self):
        from transformers import CLIPModel, CLIPProcessor
        self.processor = load_pretrained(CLIPProcessor, self.model_id)
        self.model = load_pretrained(CLIPModel, self.model_id, dtype=self.dtype).to(self.device).eval()

    def score_batch(self, images, prompts, metadata):
        cosine = clip_cosine(self.model, self.processor, images, prompts, self.device, self.dtype)
        return (self.model.logit_scale.float().exp() * cosine / 30).cpu().tolist(), {}


class AestheticMLP(torch.nn.Module):
    """LAION improved-aesthetic-predictor head: linear layers only, no nonlinearities (keys layers.{0,2,4,6,7})."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, embeddings):
        return self.layers(embeddings)


AESTHETIC_WEIGHTS = os.path.expanduser("~/.cache/flow_opd/sac+logos+ava1-l14-linearMSE.pth")
AESTHETIC_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"


def load_aesthetic_state(path):
    """The MLP's state dict from `path` (.pth or .safetensors). The published .pth is read once with
    torch.load(weights_only=True) and cached as .safetensors next to it; later loads use the .safetensors."""
    from safetensors.torch import load_file, save_file
    stem, extension = os.path.splitext(path)
    if extension == ".safetensors" or os.path.exists(stem + ".safetensors"):
        return load_file(stem + ".safetensors")
    if not os.path.exists(path):
        raise RewardWeightsUnavailable(f"aesthetic MLP weights not found at {path}: download {AESTHETIC_URL} "
                                       f"(or Flow-GRPO's flow_grpo/assets copy) there, or pass weights_path=")
    state = torch.load(path, map_location="cpu", weights_only=True)  # saved on cuda:0 by its authors
    state = {key: value.contiguous() for key, value in state.items()}
    try:
        save_file(state, stem + ".safetensors")
    except OSError as err:  # a read-only folder only costs the conversion next time
        warnings.warn(f"could not cache {stem}.safetensors ({err}); reading the .pth each time")
    return state


@register_reward("aesthetic")
class AestheticReward(Reward):
    """CLIP-L/14 L2-normalised image embedding -> the linear MLP; raw output, roughly the AVA 1-10 scale."""

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=None, clip_id="openai/clip-vit-large-patch14",
                 weights_path=AESTHETIC_WEIGHTS):
        super().__init__(device, dtype, batch_size)
        self.clip_id, self.weights_path = clip_id, weights_path

    def _load(self):
        from transformers import CLIPModel, CLIPProcessor
        self.mlp = AestheticMLP()
        self.mlp.load_state_dict(load_aesthetic_state(self.weights_path))
        self.mlp.to(self.device, self.dtype).eval()
        self.processor = load_pretrained(CLIPProcessor, self.clip_id)
        self.clip = load_pretrained(CLIPModel, self.clip_id, dtype=self.dtype).to(self.device).eval()

    def score_batch(self, images, prompts, metadata):
        pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        embeddings = F.normalize(clip_features(self.clip.get_image_features(pixel_values=pixels)).float(), dim=-1)
        return self.mlp(embeddings.to(self.dtype)).float().squeeze(-1).cpu().tolist(), {}

# -----------------------------------------------------------------------------
# JPEG size (spec 6): quality 95, kB = bytes / 1000

@register_reward("jpeg_incompressibility")
class JpegIncompressibilityReward(Reward):
    def score_batch(self, images, prompts, metadata):
        kb = [len(jpeg_bytes(image, 95)) / 1000 for image in images]
        return kb, {"kb": kb}


@register_reward("jpeg_compressibility")
class JpegCompressibilityReward(Reward):
    """-kB / divisor: divisor 500 is Flow-GRPO's rescale, divisor=1 gives DDPO's -kB."""

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=None, divisor=500.0):
        super().__init__(device, dtype, batch_size)
        self.divisor = divisor

    def score_batch(self, images, prompts, metadata):
        kb = [len(jpeg_bytes(image, 95)) / 1000 for image in images]
        return [-x / self.divisor for x in kb], {"kb": kb}

# -----------------------------------------------------------------------------
# Optional evaluation judge: Qwen2.5-VL with the 1-5 rubric (spec 5, "QwenVL score"); off by default

QUALITY_LEVELS = """1 (Bad): very blurry, noisy or chaotic; the content is hard to make out.
2 (Poor): noticeable blur, noise, artifacts or distortions; weak composition.
3 (Fair): acceptable clarity with some flaws in exposure, color or composition.
4 (Good): clear and well exposed, pleasing color and composition, minor flaws only.
5 (Excellent): exceptional clarity, exposure, color and composition."""

QUALITY_PROMPT = ("Rate the aesthetic quality of this image on a 1-5 scale:\n" + QUALITY_LEVELS +
                  "\nFirst reason step by step inside <Thought></Thought>, then give the integer score as <Score>X</Score>.")

INSTRUCTION_PROMPT = ("Judge this generated image on three 1-5 scales.\nAesthetic Quality:\n" + QUALITY_LEVELS + """
Instruction Following: 1 ignores or contradicts the instruction; 2 follows a small part of it; 3 follows the
main request but misses or gets wrong several details; 4 follows it with minor deviations; 5 follows it perfectly.
Overall: a 1-5 score that primarily reflects how well the image follows the instruction.{strict}
Instruction: {prompt}
First reason step by step inside <Thought></Thought>, then answer with
<QualityScore>X</QualityScore><InstructionScore>Y</InstructionScore><OverallScore>Z</OverallScore> (integers).""")


@register_reward("qwenvl")
class QwenVLReward(Reward):
    """mode "instruction" (Flow-OPD, reward = OverallScore/5) or "quality" (Flow-GRPO, reward = Score/5);
    a missing tag scores 0 as in the references. Inputs are built from the image processor and tokenizer
    directly: transformers' Qwen2.5-VL processor needs torchvision, which we do not install."""
    batch_size = 4

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=None, model_id="Qwen/Qwen2.5-VL-7B-Instruct",
                 mode="instruction", strict=False, max_new_tokens=2048):
        super().__init__(device, dtype, batch_size)
        if mode not in ("instruction", "quality"):
            raise ValueError(f"qwenvl mode must be 'instruction' or 'quality', got {mode!r}")
        self.model_id, self.mode, self.strict, self.max_new_tokens = model_id, mode, strict, max_new_tokens

    def _load(self):
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        self.image_processor = load_pretrained(AutoImageProcessor, self.model_id)
        self.tokenizer = load_pretrained(AutoTokenizer, self.model_id)
        self.tokenizer.padding_side = "left"
        self.model = load_pretrained(Qwen2_5_VLForConditionalGeneration, self.model_id, dtype=self.dtype)
        self.model.to(self.device).eval()

    def question(self, prompt):
        if self.mode == "quality":
            return QUALITY_PROMPT
        return INSTRUCTION_PROMPT.format(prompt=prompt, strict="\nBe extremely strict." if self.strict else "")

    def score_batch(self, images, prompts, metadata):
        vision = self.image_processor(images=images, return_tensors="pt")
        texts = []
        for grid, prompt in zip(vision["image_grid_thw"], prompts):
            # Qwen2.5-VL's chat template, written out: one <|image_pad|> per merged 2x2 patch group
            image_tokens = "<|image_pad|>" * (int(grid.prod()) // self.image_processor.merge_size ** 2)
            texts.append(f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                         f"<|vision_start|>{image_tokens}<|vision_end|>{self.question(prompt)}<|im_end|>\n"
                         f"<|im_start|>assistant\n")
        inputs = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
        tokens = self.model.generate(**inputs, pixel_values=vision["pixel_values"].to(self.device, self.dtype),
                                     image_grid_thw=vision["image_grid_thw"].to(self.device),
                                     do_sample=False, max_new_tokens=self.max_new_tokens)
        answers = self.tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        tag = "Score" if self.mode == "quality" else "OverallScore"
        scores = [qwenvl_score(answer, tag) for answer in answers]
        return scores, {"answer": answers}


def qwenvl_score(answer, tag):
    """int(X) / 5 from <tag>X</tag>, integers only; 0 when the tag is missing (spec 5)."""
    match = re.search(rf"<{tag}>(\d+)</{tag}>", answer)
    return int(match.group(1)) / 5 if match else 0.0

# -----------------------------------------------------------------------------
# the toy world's programmatic rewards (toyworld.py reads the images back; no learned model)

class ToyReward(Reward):
    """toyworld.score behind the common call shape. The dense reward (strict=False) is the training
    signal; the strict 0/1 one is the evaluation metric, as GenEval's partial credit vs its rule."""
    task, strict = "composition", False
    batch_size = 4096

    def __call__(self, images, prompts, metadata=None):
        import toyworld
        pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
        metadata = None if metadata is None or not any(metadata) else [m or toyworld.parse_prompt(p) for m, p in zip(metadata, prompts)]
        if self.task == "text_accuracy":
            scores = toyworld.text_accuracy(pixels, prompts)
        else:
            scores = toyworld.score(self.task, pixels, list(prompts), metadata, strict=self.strict)
        scores = torch.as_tensor(scores, dtype=torch.float32)
        if not torch.isfinite(scores).all():
            raise FloatingPointError(f"{self.name} produced non-finite scores")
        return scores, {}


for _task in ("composition", "text", "quality"):
    register_reward(f"toy_{_task}")(type(f"Toy{_task.title()}", (ToyReward,), {"task": _task}))
    register_reward(f"toy_{_task}_strict")(type(f"Toy{_task.title()}Strict", (ToyReward,), {"task": _task, "strict": True}))
register_reward("toy_text_accuracy")(type("ToyTextAccuracy", (ToyReward,), {"task": "text_accuracy"}))


@register_reward("brightness")
class BrightnessReward(Reward):
    """Mean pixel value in [0, 1] (invert=True: one minus it): the simplest programmatic reward, for smoke
    tests of the RL loop; a run in each direction checks the sign of the update end to end."""

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=None, invert=False):
        super().__init__(device, dtype, batch_size)
        self.invert = invert

    def __call__(self, images, prompts, metadata=None):
        value = to_uint8(images).float().mean(dim=(1, 2, 3)) / 255
        return (1 - value if self.invert else value), {}


# -----------------------------------------------------------------------------
# prompt files (spec 8): .txt one prompt per line, or GenEval .jsonl rows

def load_prompts(path):
    """(prompts, metadata). .txt: stripped non-empty lines, metadata {}. .jsonl: prompt = row["prompt"],
    metadata = the row (Flow-GRPO's TextPromptDataset / GenevalPromptDataset)."""
    extension = os.path.splitext(path)[1]
    if extension not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: prompt files are .txt (one prompt per line) or .jsonl (GenEval rows), not {extension!r}")
    prompts, metadata = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                                 f"save the file as UTF-8") from None
            if not line.strip():
                continue
            if extension == ".txt":
                prompts.append(line.strip())
                metadata.append({})
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{number}: a row needs a string 'prompt' field")
            prompts.append(row["prompt"])
            metadata.append(row)
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    return prompts, metadata
