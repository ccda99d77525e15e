"""Object detectors: where the things in a photo are, as pixel boxes with a label and a score.

- :class:`YoloWorldDetector` — ultralytics YOLO-World, open vocabulary. The vocabulary's text
  features come from *our* open_clip text tower (``encode_text_for_yolo``) and are installed in
  the model the way ``WorldModel.set_classes`` does (``txt_feats``, the head's ``nc``, ``names``),
  so ultralytics never builds (or downloads) its own CLIP. We run the network ourselves
  (letterbox → forward → NMS → boxes back to the input's pixels) instead of through ultralytics'
  predictor, whose ``setup_model`` deep-copies and re-fuses the model after every vocabulary
  change.
- :class:`YoloDetector` — a plain ultralytics YOLO (``.pt``, ``.onnx``, ``.tflite`` ...) with
  its own fixed classes; the vocabulary is ignored and all classes are kept.
- :class:`NullDetector` — finds nothing.

When a detector finds nothing, the engine uses the whole image as the one crop (the
whole-image fallback lives in the engine, not here).

All detectors take a batch of upright RGB images and return, per image, detections sorted by
score (highest first), at most ``max_detections``, each with ``score >= confidence``. NMS is
class-agnostic: one box per object, labelled with its best class (an open vocabulary often
holds near-synonyms such as "dog" and "puppy").
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from engine.types import Box, Detection

if TYPE_CHECKING:
    import torch
    from PIL import Image

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# Things people name in a chat beyond COCO: toys, clothes, keepsakes.
_PERSONAL_EXTRAS: tuple[str, ...] = (
    "plush toy", "stuffed animal", "toy", "doll", "figurine", "robot", "toy car", "duck",
    "sneaker", "shoe", "boot", "sunglasses", "glasses", "hat", "cap", "scarf", "jacket",
    "teapot", "mug", "candle", "can", "jar", "lamp", "guitar", "bag", "wallet", "watch",
    "necklace", "ring", "painting", "poster", "pillow", "blanket", "plant", "flower", "puppy",
    "kitten", "rabbit", "hamster", "parrot", "fish", "turtle", "baby", "child",
)  # fmt: skip

GENERAL_VOCABULARY: list[str] = list(dict.fromkeys(COCO_CLASSES + _PERSONAL_EXTRAS))

NMS_IOU = 0.7  # ultralytics' predict default
PRE_REDUCE_ABOVE = 4  # x the input size: larger images are shrunk in Pillow before the letterbox


class Detector(Protocol):
    """Finds objects; ``vocabulary`` names what to look for (open-vocabulary detectors only)."""

    name: str

    def detect(
        self, images: Sequence[Image.Image], vocabulary: Sequence[str]
    ) -> list[list[Detection]]: ...


def clean_vocabulary(vocabulary: Sequence[str]) -> tuple[str, ...]:
    """Stripped, de-duplicated (first wins), non-empty; empty means :data:`GENERAL_VOCABULARY`."""
    words = tuple(dict.fromkeys(w.strip() for w in vocabulary if w and w.strip()))
    return words or tuple(GENERAL_VOCABULARY)


def _sorted_detections(
    rows: np.ndarray, labels: Sequence[str] | Mapping[int, str], width: int, height: int, limit: int
) -> list[Detection]:
    """``rows`` = (n, 6) [x1, y1, x2, y2, score, class] in the image's pixels."""
    found = []
    for x1, y1, x2, y2, score, cls in rows.tolist():
        box = Box.from_xyxy((x1, y1, x2, y2)).clipped(width, height)
        if box.area > 0:
            found.append(
                Detection(box=box, label=labels[int(cls)], score=float(min(max(score, 0.0), 1.0)))
            )
    found.sort(key=lambda d: d.score, reverse=True)
    return found[:limit]


class NullDetector:
    """``detector = none``: never finds anything (the engine then uses the whole image)."""

    name = "none"

    def detect(
        self, images: Sequence[Image.Image], vocabulary: Sequence[str]
    ) -> list[list[Detection]]:
        return [[] for _ in images]


class YoloWorldDetector:
    """ultralytics YOLO-World with its vocabulary encoded by our own CLIP text tower."""

    def __init__(
        self,
        model: torch.nn.Module,  # an ultralytics WorldModel
        text_encoder: Callable[[Sequence[str]], torch.Tensor],
        *,
        name: str,
        device: torch.device,
        confidence: float = 0.25,
        image_size: int = 640,
        max_detections: int = 20,
        batch_size: int = 8,
        text_cache_size: int = 64,
        half: bool | None = None,  # default: fp16 on CUDA
    ) -> None:
        import torch

        self.name = name
        self.device = device
        self.confidence = confidence
        self.max_detections = max_detections
        self.batch_size = batch_size
        self.half = device.type == "cuda" if half is None else half
        stride = max(int(model.stride.max()), 32)
        self.image_size = (
            math.ceil(image_size / stride) * stride
        )  # the network needs stride multiples
        self.text_dim = int(model.txt_feats.shape[-1])
        model = (
            model.eval().fuse(verbose=False).to(device)
        )  # fused once, here, never by a predictor
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.half() if self.half else model.float()
        self._encode = text_encoder
        self._cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self._cache_size = text_cache_size
        self._installed: tuple[str, ...] | None = None
        self._lock = threading.Lock()
        self._torch = torch

    def text_features(self, vocabulary: tuple[str, ...]) -> torch.Tensor:
        """``(1, n, dim)`` unit text features for ``vocabulary``; cached per vocabulary tuple."""
        feats = self._cache.get(vocabulary)
        if feats is not None:
            self._cache.move_to_end(vocabulary)
            return feats
        feats = self._encode(list(vocabulary)).float()
        if feats.shape != (len(vocabulary), self.text_dim):
            raise ValueError(
                f"YOLO-World needs {self.text_dim}-d text features, "
                f"the text encoder gives {tuple(feats.shape)}"
            )
        feats = feats.reshape(1, len(vocabulary), self.text_dim).to(self.device)
        feats = feats.half() if self.half else feats
        self._cache[vocabulary] = feats
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return feats

    def set_vocabulary(self, vocabulary: Sequence[str]) -> tuple[str, ...]:
        """What ``WorldModel.set_classes`` does, with our text features; a no-op when unchanged."""
        words = clean_vocabulary(vocabulary)
        if words != self._installed:
            self.model.txt_feats = self.text_features(words)
            self.model.model[-1].nc = len(words)
            self.model.names = dict(enumerate(words))
            self._installed = words
        return words

    def detect(
        self, images: Sequence[Image.Image], vocabulary: Sequence[str]
    ) -> list[list[Detection]]:
        from ultralytics.utils.nms import non_max_suppression

        results: list[list[Detection]] = []
        with self._lock:  # the installed vocabulary is model state
            words = self.set_vocabulary(vocabulary)
            for start in range(0, len(images), self.batch_size):
                batch = list(images[start : start + self.batch_size])
                boxed = [self._letterbox(im) for im in batch]
                x = self._torch.from_numpy(np.stack([b[0] for b in boxed])).to(self.device)
                x = x.permute(0, 3, 1, 2).contiguous()
                x = (x.half() if self.half else x.float()) / 255.0
                with self._torch.inference_mode():
                    out = self.model.predict(x)
                    kept = non_max_suppression(
                        out, self.confidence, NMS_IOU, agnostic=True, max_det=self.max_detections
                    )
                for im, (_, ratio, left, top), rows in zip(batch, boxed, kept, strict=True):
                    rows = rows.float().cpu().numpy()
                    rows[:, [0, 2]] = (rows[:, [0, 2]] - left) / ratio
                    rows[:, [1, 3]] = (rows[:, [1, 3]] - top) / ratio
                    results.append(
                        _sorted_detections(rows, words, im.width, im.height, self.max_detections)
                    )
        return results

    def _letterbox(self, image: Image.Image) -> tuple[np.ndarray, float, int, int]:
        """Scale to fit ``image_size`` square, keep aspect, pad grey (as ultralytics' LetterBox)."""
        import cv2

        width, height = image.size
        size = self.image_size
        ratio = min(size / height, size / width)
        new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
        # An image far larger than the input (a 49 MP upload) is first shrunk by an integer
        # factor in Pillow, to no less than 4x the input: its full-size NumPy copy cost 280 MB,
        # and INTER_LINEAR from 10x the size only aliases. Ordinary photos are not touched.
        factor = max(width, height) // (PRE_REDUCE_ABOVE * size)
        source = image.reduce(factor) if factor >= 2 else image
        rgb = np.asarray(source if source.mode == "RGB" else source.convert("RGB"))
        if (new_w, new_h) != (rgb.shape[1], rgb.shape[0]):
            rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        left, top = (size - new_w) // 2, (size - new_h) // 2
        canvas = np.full((size, size, 3), 114, dtype=np.uint8)
        canvas[top : top + new_h, left : left + new_w] = rgb
        return canvas, ratio, left, top


class YoloDetector:
    """A plain ultralytics YOLO with fixed classes (e.g. the COCO model); vocabulary is ignored."""

    def __init__(
        self,
        yolo: Any,  # ultralytics.YOLO
        *,
        name: str,
        device: torch.device,
        confidence: float = 0.25,
        image_size: int = 640,
        max_detections: int = 20,
        batch_size: int = 1,
    ) -> None:
        self.yolo = yolo
        self.name = name
        self.device = "cpu" if device.type == "cpu" else str(device.index or 0)
        self.confidence = confidence
        self.image_size = image_size
        self.max_detections = max_detections
        self.batch_size = batch_size  # exports (.tflite, .onnx) usually have a fixed batch of 1
        self._lock = threading.Lock()  # ultralytics' predictor is not thread-safe

    def _predict(self, images: Sequence[Image.Image]) -> list:
        return self.yolo.predict(
            [im if im.mode == "RGB" else im.convert("RGB") for im in images],
            conf=self.confidence,
            iou=NMS_IOU,
            imgsz=self.image_size,
            max_det=self.max_detections,
            agnostic_nms=True,
            device=self.device,
            batch=self.batch_size,
            verbose=False,
            save=False,
        )

    @property
    def classes(self) -> list[str]:
        names = self.yolo.names
        return [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)

    def detect(
        self, images: Sequence[Image.Image], vocabulary: Sequence[str]
    ) -> list[list[Detection]]:
        if not images:
            return []
        # ultralytics' device selection calls torch.set_num_threads(cpus - 1), which would leave
        # every later CLIP forward of this process on one thread; restore the caller's setting.
        import torch  # lazily, like the rest of this module's heavy imports

        threads = torch.get_num_threads()
        with self._lock:
            try:
                predictions = self._predict(images)
            finally:
                torch.set_num_threads(threads)
        results = []
        for im, prediction in zip(images, predictions, strict=True):
            boxes = prediction.boxes
            rows = np.column_stack(
                [boxes.xyxy.cpu().numpy(), boxes.conf.cpu().numpy(), boxes.cls.cpu().numpy()]
            )
            results.append(
                _sorted_detections(rows, prediction.names, im.width, im.height, self.max_detections)
            )
        return results
