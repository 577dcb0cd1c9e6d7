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


def mask2former_instances(class_logits, mask_logits, image_size, min_score, mmdet_input=None):
    """mmdet's MaskFormer instance post-processing (spec 1.3, 2.1) for one image, with the mask logits
    upsampled straight to the image size (transformers' post-processor detours through 384x384).
    class_logits (Q, C+1); mask_logits (Q, h, w) covering the un-padded input. Returns (label, score, box, mask)
    for candidates whose score is > min_score. mmdet_input=((H, W), (h, w)): mmdet's own upsampling instead,
    with mask_logits covering the whole padded (H, W) input at stride 4: up to (H, W), crop to the resized
    image (h, w), then up to the image size."""
    class_probs = class_logits.float().softmax(-1)[:, :-1]        # drop the no-object column
    num_queries, num_classes = class_probs.shape
    probs, flat = class_probs.flatten().topk(num_queries)          # top-100 over (query x class) pairs
    # the final score is class prob x mean mask prob <= class prob, so this drops nothing that could pass
    keep = probs > min_score
    probs, flat = probs[keep], flat[keep]
    if len(flat) == 0:
        return []
    logits = mask_logits[flat // num_classes][None].float()
    if mmdet_input is not None:  # Mask2FormerHead.simple_test, then MaskFormerFusionHead.simple_test (mmdet 2.x)
        (padded_h, padded_w), (h, w) = mmdet_input
        logits = F.interpolate(logits, size=(padded_h, padded_w), mode="bilinear", align_corners=False)[..., :h, :w]
    logits = F.interpolate(logits, size=image_size, mode="bilinear", align_corners=False)[0]
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


# -----------------------------------------------------------------------------
# GenEval's own detector: mmdetection's Mask2Former Swin-S COCO checkpoint (spec 1.3), read without mmdet and
# mapped tensor by tensor onto transformers' Mask2FormerForUniversalSegmentation (docs/rewards.md, "Detector")

MMDET_GENEVAL_URL = ("https://download.openmmlab.com/mmdetection/v2.0/mask2former/"
                     "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco/"
                     "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth")
# where GenEvalReward(detector="mmdet") and evaluate.py --preset=sd35 look for it: `wget -P ~/.cache/flow_opd URL`
MMDET_GENEVAL_CHECKPOINT = os.path.join(os.path.expanduser("~"), ".cache", "flow_opd", MMDET_GENEVAL_URL.rsplit("/", 1)[1])
# mmdet's test pipeline for this config (mmdet 2.x, GenEval's): Resize to fit (1333, 800) keeping the aspect
# ratio (cv2 bilinear), Pad to a multiple of 32 with 128, Normalize with ImageNet mean/std in RGB
MMDET_MEAN, MMDET_STD, MMDET_PAD_VALUE = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), 128


def _numpy_safe_globals():
    """The numpy types an mmengine/mmcv checkpoint's meta may pickle (scalars, dtypes): data, not code."""
    if int(np.__version__.split(".")[0]) >= 2:
        from numpy._core import multiarray
    else:
        from numpy.core import multiarray
    dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                            np.uint8, np.bool_)]
    # a file pickled under numpy 1.x names them numpy.core.multiarray.*, under numpy 2 numpy._core.multiarray.*
    named = [(f, f"numpy.{core}.multiarray.{f.__name__}") for f in (multiarray.scalar, multiarray._reconstruct)
             for core in ("core", "_core")]
    return [*named, np.ndarray, np.dtype, *dtypes]


def read_mmdet_checkpoint(path):
    """The state dict of an mmdet checkpoint (.pth, {'meta': ..., 'state_dict': ...}, read with weights_only=True
    and, if its meta holds numpy scalars, those numpy types allowlisted, nothing else) or of a .safetensors file."""
    if not os.path.isfile(path):
        raise RewardWeightsUnavailable(f"{path}: no such file; GenEval's detector is `wget -P {os.path.dirname(path) or '.'} "
                                       f"{MMDET_GENEVAL_URL}` (then pass detector='mmdet:FILE')")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    # released OpenMMLab files end in the first 8 hex digits of their sha256: a truncated download fails here
    digest = re.search(r"-([0-9a-f]{8})\.pth$", os.path.basename(path))
    if digest:
        import hashlib
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                sha.update(block)
        if not sha.hexdigest().startswith(digest.group(1)):
            raise ValueError(f"{path}: sha256 {sha.hexdigest()[:8]}... does not match the {digest.group(1)} in its name "
                             f"(an incomplete download?): download it again from {MMDET_GENEVAL_URL}")
    import pickle
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        what = re.search(r"GLOBAL [\w.]+", str(err))
        if not what:
            raise ValueError(f"{path}: not a readable torch checkpoint ({str(err).strip().splitlines()[-1][:120]}); "
                             f"download it again from {MMDET_GENEVAL_URL}") from None
        what = f"unsupported {what.group(0)}"
        raise ValueError(
            f"{path}: torch.load(weights_only=True) refuses an object in this checkpoint ({what}); if you trust the file, "
            f"write its tensors once to safetensors: python -c \"import torch, safetensors.torch as s; "
            f"c = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"s.save_file({{k: v.contiguous() for k, v in c.get('state_dict', c).items()}}, '{path}.safetensors')\" "
            f"and pass detector='mmdet:{path}.safetensors'") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {str(err).strip()[:120]}); "
                         f"download it again from {MMDET_GENEVAL_URL}") from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected an mmdet checkpoint, a dict with a 'state_dict' of tensors; "
                         f"download GenEval's from {MMDET_GENEVAL_URL}")
    return state


def swin_relative_position_index(window_size):
    """The (w*w, w*w) index into a Swin window's relative-position table, as transformers and mmdet build it."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
    return relative[..., 0] * (2 * window_size - 1) + relative[..., 1]


def unfold_to_concat_order(channels):
    """Index i such that x_concat[..., j] = x_unfold[..., i[j]] for Swin's 2x2 patch merging of `channels` channels.
    mmdet's PatchMerging gathers the 2x2 neighbourhood with nn.Unfold: channel-major, c * 4 + 2 * row + col.
    transformers concatenates the four positions (row, col) = (0,0), (1,0), (0,1), (1,1), position-major:
    k * C + c. The merging norm and reduction read the 4C vector, so their weights are permuted by i."""
    order = [(0, 0), (1, 0), (0, 1), (1, 1)]
    return torch.tensor([c * 4 + 2 * row + col for row, col in order for c in range(channels)])


def mmdet_mask2former_key_table(depths, encoder_layers, decoder_layers, layout):
    """Every tensor of an mmdet Mask2Former-Swin checkpoint as (mmdet key, transformers key, op), in checkpoint
    order. layout "2.x" is mmdet 2.x (GenEval's checkpoint), "3.x" mmdet 3.x. ops: "copy"; "q"/"k"/"v": that
    third of a fused qkv / in_proj; "merge_rows"/"merge_cols": the patch-merging permutation on dim 0 / 1;
    "index": a relative-position index, checked against transformers' own and not loaded (transformers key None)."""
    rows = []

    def add(mmdet, hf, op="copy", parts=("weight", "bias")):
        for part in parts:
            rows.append((f"{mmdet}.{part}" if part else mmdet, f"{hf}.{part}" if part and hf else hf, op))

    def fused(mmdet, hf_names, weight, bias):  # one (3C, C) projection -> three (C, C) ones
        for part, name in ((weight, "weight"), (bias, "bias")):
            for op, hf in zip("qkv", hf_names):
                rows.append((f"{mmdet}{part}", f"{hf}.{name}", op))

    swin, pix, trf = "model.pixel_level_module.encoder.swin", "model.pixel_level_module", "model.transformer_module"
    add("backbone.patch_embed.projection", f"{swin}.embeddings.patch_embeddings.projection")
    add("backbone.patch_embed.norm", f"{swin}.embeddings.norm")
    for s, depth in enumerate(depths):
        for b in range(depth):
            m, h = f"backbone.stages.{s}.blocks.{b}", f"{swin}.encoder.layers.{s}.blocks.{b}"
            add(f"{m}.norm1", f"{h}.layernorm_before")
            add(f"{m}.attn.w_msa.relative_position_bias_table",
                f"{h}.attention.relative_position_bias.relative_position_bias_table", parts=(None,))
            rows.append((f"{m}.attn.w_msa.relative_position_index", None, "index"))
            fused(f"{m}.attn.w_msa.qkv.", [f"{h}.attention.{n}_proj" for n in "qkv"], "weight", "bias")
            add(f"{m}.attn.w_msa.proj", f"{h}.attention.o_proj")
            add(f"{m}.norm2", f"{h}.layernorm_after")
            add(f"{m}.ffn.layers.0.0", f"{h}.mlp.fc1")
            add(f"{m}.ffn.layers.1", f"{h}.mlp.fc2")
        if s < len(depths) - 1:
            m, h = f"backbone.stages.{s}.downsample", f"{swin}.encoder.layers.{s}.downsample"
            add(f"{m}.norm", f"{h}.norm", "merge_rows")
            add(f"{m}.reduction", f"{h}.reduction", "merge_cols", parts=("weight",))
    for s in range(len(depths)):
        add(f"backbone.norm{s}", f"model.pixel_level_module.encoder.hidden_states_norms.stage{s + 1}")
    p, h = "panoptic_head.pixel_decoder", f"{pix}.decoder"
    for i in range(3):
        add(f"{p}.input_convs.{i}.conv", f"{h}.input_projections.{i}.0")
        add(f"{p}.input_convs.{i}.gn", f"{h}.input_projections.{i}.1")
    attn, ffn = ("attentions.0", "ffns.0") if layout == "2.x" else ("self_attn", "ffn")
    for i in range(encoder_layers):
        m, e = f"{p}.encoder.layers.{i}", f"{h}.encoder.layers.{i}"
        for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            add(f"{m}.{attn}.{name}", f"{e}.self_attn.{name}")
        add(f"{m}.{ffn}.layers.0.0", f"{e}.fc1")
        add(f"{m}.{ffn}.layers.1", f"{e}.fc2")
        add(f"{m}.norms.0", f"{e}.self_attn_layer_norm")
        add(f"{m}.norms.1", f"{e}.final_layer_norm")
    add(f"{p}.level_encoding.weight", f"{h}.level_embed", parts=(None,))
    add(f"{p}.lateral_convs.0.conv", f"{h}.adapter_1.0", parts=("weight",))
    add(f"{p}.lateral_convs.0.gn", f"{h}.adapter_1.1")
    add(f"{p}.output_convs.0.conv", f"{h}.layer_1.0", parts=("weight",))
    add(f"{p}.output_convs.0.gn", f"{h}.layer_1.1")
    add(f"{p}.mask_feature", f"{h}.mask_projection")
    # the decoder layer runs cross-attention, norm, self-attention, norm, FFN, norm (operation_order); 2.x
    # numbers its attentions in that order: attentions.0 = cross, attentions.1 = self
    cross, self_, ffn = ("attentions.0", "attentions.1", "ffns.0") if layout == "2.x" else ("cross_attn", "self_attn", "ffn")
    for i in range(decoder_layers):
        m, d = f"panoptic_head.transformer_decoder.layers.{i}", f"{trf}.decoder.layers.{i}"
        fused(f"{m}.{self_}.attn.", [f"{d}.self_attn.{n}_proj" for n in "qkv"], "in_proj_weight", "in_proj_bias")
        add(f"{m}.{self_}.attn.out_proj", f"{d}.self_attn.out_proj")
        add(f"{m}.{cross}.attn", f"{d}.cross_attn", parts=("in_proj_weight", "in_proj_bias"))
        add(f"{m}.{cross}.attn.out_proj", f"{d}.cross_attn.out_proj")
        add(f"{m}.{ffn}.layers.0.0", f"{d}.fc1")
        add(f"{m}.{ffn}.layers.1", f"{d}.fc2")
        for k, norm in enumerate(("cross_attn_layer_norm", "self_attn_layer_norm", "final_layer_norm")):
            add(f"{m}.norms.{k}", f"{d}.{norm}")
    add("panoptic_head.transformer_decoder.post_norm", f"{trf}.decoder.layernorm")
    add("panoptic_head.query_embed.weight", f"{trf}.queries_embedder.weight", parts=(None,))
    add("panoptic_head.query_feat.weight", f"{trf}.queries_features.weight", parts=(None,))
    add("panoptic_head.level_embed.weight", f"{trf}.level_embed.weight", parts=(None,))
    add("panoptic_head.cls_embed", "class_predictor")
    for k in range(3):
        add(f"panoptic_head.mask_embed.{2 * k}", f"{trf}.decoder.mask_predictor.mask_embedder.{k}.0")
    return rows


# transformers keys with no mmdet counterpart: SwinModel's final norm (SwinBackbone never applies it) and the
# training loss's class weights (1, ..., 1, no-object 0.1); both are filled, neither touches inference
MMDET_UNMAPPED_HF_KEYS = ("model.pixel_level_module.encoder.swin.layernorm.weight",
                          "model.pixel_level_module.encoder.swin.layernorm.bias", "criterion.empty_weight")


def _mmdet_architecture(state, name):
    """Depths, widths and layer counts of an mmdet Mask2Former-Swin checkpoint, read from its tensor shapes."""
    try:
        depths = [1 + max(int(k.split(".")[4]) for k in state if k.startswith(f"backbone.stages.{s}.blocks."))
                  for s in range(4)]
        table = state["backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table"]
        count = lambda prefix: 1 + max(int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix))
        heads = [state[f"backbone.stages.{s}.blocks.0.attn.w_msa.relative_position_bias_table"].shape[1] for s in range(4)]
        return dict(
            embed_dim=state["backbone.patch_embed.projection.weight"].shape[0], depths=depths, num_heads=heads,
            window_size=(int(round(table.shape[0] ** 0.5)) + 1) // 2,
            patch_size=state["backbone.patch_embed.projection.weight"].shape[-1],
            hidden_dim=state["panoptic_head.query_feat.weight"].shape[1],
            num_queries=state["panoptic_head.query_feat.weight"].shape[0],
            num_labels=state["panoptic_head.cls_embed.weight"].shape[0] - 1,
            encoder_layers=count("panoptic_head.pixel_decoder.encoder.layers."),
            decoder_layers=count("panoptic_head.transformer_decoder.layers."),
            encoder_feedforward_dim=next(v.shape[0] for k, v in state.items() if k.startswith(
                "panoptic_head.pixel_decoder.encoder.layers.0.") and k.endswith("layers.0.0.weight")),
            dim_feedforward=next(v.shape[0] for k, v in state.items() if k.startswith(
                "panoptic_head.transformer_decoder.layers.0.") and k.endswith("layers.0.0.weight")),
            num_attention_heads=next(v.shape[0] for k, v in state.items() if k.startswith(
                "panoptic_head.pixel_decoder.encoder.layers.0.") and k.endswith("attention_weights.weight")) // 12,
            # (attention_weights: heads x 3 levels x 4 points rows, the config's num_levels and num_points)
            layout="2.x" if any(".attentions.0." in k for k in state) else "3.x")
    except (KeyError, ValueError, StopIteration, IndexError) as err:
        raise ValueError(f"{name}: not an mmdet Mask2Former Swin checkpoint (no {err}); GenEval's is "
                         f"{MMDET_GENEVAL_URL}") from None


def mmdet_mask2former_config(state, name="checkpoint"):
    """The transformers Mask2FormerConfig of an mmdet Mask2Former-Swin state dict (GenEval's: Swin-S, 80 classes in
    GenEval's order, 100 queries, 6 deformable encoder layers, 9 decoder layers)."""
    from transformers import Mask2FormerConfig, SwinConfig
    arch = _mmdet_architecture(state, name)
    if arch["num_labels"] != len(GENEVAL_CLASSES):
        raise ValueError(f"{name}: {arch['num_labels']} classes; GenEval reads the 80 COCO classes by index (spec 1.9)")
    backbone = SwinConfig(embed_dim=arch["embed_dim"], depths=arch["depths"], num_heads=arch["num_heads"],
                          window_size=arch["window_size"], patch_size=arch["patch_size"], mlp_ratio=4.0, qkv_bias=True,
                          hidden_act="gelu", layer_norm_eps=1e-5, drop_path_rate=0.0,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(
        backbone_config=backbone, num_labels=arch["num_labels"], id2label=dict(enumerate(GENEVAL_CLASSES)),
        label2id={c: i for i, c in enumerate(GENEVAL_CLASSES)}, num_queries=arch["num_queries"],
        hidden_dim=arch["hidden_dim"], feature_size=arch["hidden_dim"], mask_feature_size=arch["hidden_dim"],
        encoder_layers=arch["encoder_layers"], decoder_layers=arch["decoder_layers"] + 1,  # + the initial prediction
        encoder_feedforward_dim=arch["encoder_feedforward_dim"], dim_feedforward=arch["dim_feedforward"],
        num_attention_heads=arch["num_attention_heads"], activation_function="relu", pre_norm=False,
        enforce_input_projection=False, common_stride=4, feature_strides=[4, 8, 16, 32], no_object_weight=0.1)


def convert_mmdet_mask2former(state, config, name="checkpoint", expected_shapes=None):
    """transformers' state dict from an mmdet Mask2Former-Swin state dict, by mmdet_mask2former_key_table: every
    checkpoint tensor is used exactly once, every transformers tensor is produced (or is one of
    MMDET_UNMAPPED_HF_KEYS) and every shape is checked against `expected_shapes` ({key: shape}) when given."""
    arch = _mmdet_architecture(state, name)
    table = mmdet_mask2former_key_table(arch["depths"], arch["encoder_layers"], arch["decoder_layers"], arch["layout"])
    wanted = {m for m, _, _ in table}
    leftover, missing = sorted(set(state) - wanted), sorted(wanted - set(state))
    # relative-position indices are buffers fully determined by the window size: checked when present
    missing = [k for k in missing if not k.endswith("relative_position_index")]
    if leftover or missing:
        raise ValueError(f"{name}: not the mmdet {arch['layout']} Mask2Former-Swin layout this converter knows: "
                         f"{len(leftover)} unexpected key(s) (e.g. {leftover[:2]}), {len(missing)} missing "
                         f"(e.g. {missing[:2]}); GenEval's checkpoint is {MMDET_GENEVAL_URL}")
    out = {}
    for mmdet, hf, op in table:
        if mmdet not in state:
            continue
        x = state[mmdet]
        if op == "index":
            if not torch.equal(x.long(), swin_relative_position_index(arch["window_size"])):
                raise ValueError(f"{name}: {mmdet} is not the standard Swin relative-position index")
            continue
        if op in ("q", "k", "v"):
            if x.shape[0] % 3:
                raise ValueError(f"{name}: {mmdet} has shape {tuple(x.shape)}, not a fused (3C, ...) projection")
            x = x.chunk(3, dim=0)["qkv".index(op)]
        elif op in ("merge_rows", "merge_cols"):
            dim = 0 if op == "merge_rows" else 1
            if x.shape[dim] % 4:
                raise ValueError(f"{name}: {mmdet} has shape {tuple(x.shape)}, not a 2x2 patch merging of 4C channels")
            x = x.index_select(dim, unfold_to_concat_order(x.shape[dim] // 4))
        if expected_shapes is not None and hf not in expected_shapes:
            import transformers
            raise ValueError(f"{name}: {mmdet} -> {hf}: transformers {transformers.__version__} has no such tensor; "
                             f"install the requirements.txt version")
        if expected_shapes is not None and tuple(expected_shapes[hf]) != tuple(x.shape):
            raise ValueError(f"{name}: {mmdet} -> {hf}: shape {tuple(x.shape)}, transformers expects "
                             f"{tuple(expected_shapes[hf])}")
        out[hf] = x.contiguous()
    swin_width = arch["embed_dim"] * 2 ** (len(arch["depths"]) - 1)
    out[MMDET_UNMAPPED_HF_KEYS[0]], out[MMDET_UNMAPPED_HF_KEYS[1]] = torch.ones(swin_width), torch.zeros(swin_width)
    empty_weight = torch.ones(config.num_labels + 1)
    empty_weight[-1] = config.no_object_weight
    out[MMDET_UNMAPPED_HF_KEYS[2]] = empty_weight
    return out


def load_mmdet_mask2former(path, dtype=torch.float32):
    """transformers' Mask2FormerForUniversalSegmentation holding an mmdet checkpoint's weights, loaded strictly."""
    from transformers import Mask2FormerForUniversalSegmentation
    state = read_mmdet_checkpoint(path)
    config = mmdet_mask2former_config(state, path)
    model = Mask2FormerForUniversalSegmentation(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    converted = convert_mmdet_mask2former(state, config, path, expected)
    result = model.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:  # the installed transformers names its tensors differently
        import transformers
        raise ValueError(f"{path}: the converter's key table does not fit transformers {transformers.__version__} "
                         f"({len(result.missing_keys)} keys missing, e.g. {result.missing_keys[:2]}, "
                         f"{len(result.unexpected_keys)} unexpected); install the requirements.txt version")
    return model.to(dtype).eval()


def mmdet_preprocess(image, shortest=800, longest=1333, divisor=32):
    """mmdet 2.x's test pipeline for one RGB image (spec 1.3): bilinear resize with the aspect ratio kept to fit
    (longest, shortest) (mmcv's rescale_size; cv2's INTER_LINEAR is the half-pixel bilinear of F.interpolate,
    without antialiasing, then rounded to uint8), pad bottom/right to a multiple of 32 with 128, normalise.
    Returns (pixel_values (3, H, W) float32, (h, w) of the resized image inside it)."""
    x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float()
    height, width = x.shape[1:]
    scale = min(longest / max(height, width), shortest / min(height, width))
    size = (int(height * scale + 0.5), int(width * scale + 0.5))
    if size != (height, width):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255)
    padded = (-(-size[0] // divisor) * divisor, -(-size[1] // divisor) * divisor)
    x = F.pad(x, (0, padded[1] - size[1], 0, padded[0] - size[0]), value=MMDET_PAD_VALUE)
    mean, std = torch.tensor(MMDET_MEAN).view(3, 1, 1), torch.tensor(MMDET_STD).view(3, 1, 1)
    return (x - mean) / std, size


@register_reward("geneval")
class GenEvalReward(Reward):
    """GenEval with Mask2Former (COCO instance) + CLIP ViT-L/14 colour classification.
    details per image: score (partial credit), strict (reward-server rule), correct (official rule), tag,
    detected ({class: kept count}). `score` picks the training score: "score" (default, Flow-GRPO's training
    reward), "strict" or "correct". reference_quirks=True reproduces the reward server's four defects; each
    can also be set alone (bgr_swap, unclipped_count, failed_position_adds_one, jpeg_q75).
    detector: "mmdet:PATH" runs GenEval's own mmdet checkpoint (PATH .pth or .safetensors; "mmdet" alone:
    MMDET_GENEVAL_CHECKPOINT) converted into transformers' Mask2Former, with mmdet's pre- and post-processing;
    otherwise a transformers id or folder (default: detector_id)."""
    batch_size = 8

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=None,
                 detector_id="facebook/mask2former-swin-small-coco-instance",
                 clip_id="openai/clip-vit-large-patch14", score="score", detector_size=800,
                 threshold=0.3, counting_threshold=0.9, max_objects=16, position_threshold=0.1,
                 reference_quirks=False, bgr_swap=None, unclipped_count=None, failed_position_adds_one=None,
                 jpeg_q75=None, detector=None):
        super().__init__(device, dtype, batch_size)
        if score not in ("score", "strict", "correct"):
            raise ValueError(f"geneval score must be 'score', 'strict' or 'correct', got {score!r}")
        detector = detector or detector_id
        if detector == "mmdet":
            detector = f"mmdet:{MMDET_GENEVAL_CHECKPOINT}"
        self.mmdet_path = os.path.expanduser(detector[len("mmdet:"):]) if detector.startswith("mmdet:") else None
        if self.mmdet_path == "":
            raise ValueError(f"detector='mmdet:' needs a path, e.g. detector='mmdet:{MMDET_GENEVAL_CHECKPOINT}'")
        self.detector_id, self.clip_id, self.score_key = detector, clip_id, score
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
        if self.mmdet_path:
            self.detector = load_mmdet_mask2former(self.mmdet_path, self.dtype).to(self.device)
        else:
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

    @property
    def detector_name(self):
        """Which detector scores GenEval, for results tables."""
        if self.mmdet_path:
            return f"mmdet Mask2Former Swin-S `{os.path.basename(self.mmdet_path)}` (GenEval's official detector)"
        return f"`{self.detector_id}` (transformers; not GenEval's weights, not comparable with published GenEval numbers)"

    def detect_mmdet(self, images, thresholds):
        """detect() with the mmdet checkpoint, as GenEval runs it: mmdet's test pipeline and upsampling, and
        images of different padded sizes in separate forwards (GenEval runs one image at a time; padding to a
        common size would change the features, since neither model masks the padding)."""
        shortest = self.detector_size
        inputs = [mmdet_preprocess(image, shortest, round(shortest * 1333 / 800)) for image in images]
        groups = defaultdict(list)
        for i, (pixels, _) in enumerate(inputs):
            groups[tuple(pixels.shape[1:])].append(i)
        results = [None] * len(images)
        for padded, indices in groups.items():
            pixels = torch.stack([inputs[i][0] for i in indices]).to(self.device, self.dtype)
            outputs = self.detector(pixel_values=pixels)
            for j, i in enumerate(indices):
                candidates = defaultdict(list)
                for label, score, box, mask in mask2former_instances(
                        outputs.class_queries_logits[j], outputs.masks_queries_logits[j],
                        (images[i].height, images[i].width), thresholds[i], mmdet_input=(padded, inputs[i][1])):
                    candidates[GENEVAL_CLASSES[label]].append(Detection(score, box, mask))
                results[i] = candidates
        return results

    def detect(self, images, thresholds):
        """Per image {classname: [Detection]} of every candidate above its image's threshold (unsorted)."""
        if self.mmdet_path:
            return self.detect_mmdet(images, thresholds)
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
