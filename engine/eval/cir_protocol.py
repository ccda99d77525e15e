"""The official evaluation protocols of the composed image retrieval benchmarks, over rankings of
a whole gallery (``rapbot eval cir``). Checked against the upstream evaluation code: CIRR's
(Cuberick-Orion/CIRR) and SEARLE's validate.py (miccunifi/SEARLE, which also evaluates
FashionIQ the CLIP4Cir way) and CIRCO's (miccunifi/CIRCO).

=========  ==========================  ==================  =================================
set        gallery (``--gallery``)     reference removed   metrics
=========  ==========================  ==================  =================================
CIRR       ``split.rc2.<split>.json``  yes (its own row)   R@1/5/10/50, Rsubset@1/2/3 (the
           (optional: else the images                      query's img_set minus the
           the triplets name)                              reference)
FashionIQ  ``split.<cat>.<split>.json``  no                R@10/50 per category (dress,
           (required)                                      shirt, toptee) and their average
CIRCO      every COCO-2017 unlabeled   no                  mAP@5/10/25/50 (all ground truths,
           image (required)                                AP@K / min(K, |G|)), R@K of the
                                                           first ground truth
Shoes      ``eval_im_names.txt``       no                  R@1/10/50
           (optional, as CIRR)
=========  ==========================  ==================  =================================

A gallery is a split file (CIRR's dict of names, FashionIQ's list, a text file of one name per
line), a folder (every image in it, by file stem) or a comma-separated list of names. A target
missing from the gallery is an error, as the upstream code asserts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from engine.errors import InvalidInputError
from engine.eval.cir_metrics import (
    CIRCO_KS,
    FASHIONIQ_KS,
    RECALL_KS,
    SUBSET_KS,
    map_at_k,
    recall_at_k,
    subset_recall_at_k,
)

SHOES_KS = (1, 10, 50)
NEEDS_GALLERY = ("fashioniq", "circo")
FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def read_gallery(spec: str) -> list[str]:
    """Gallery image names from a split file, a folder or a comma-separated list."""
    path = Path(spec).expanduser()
    if path.is_dir():
        names = sorted(p.stem for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    elif path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            if isinstance(data, (dict, list)):  # CIRR: {name: path}; FashionIQ: [name]
                names = [str(n) for n in data]
            else:
                raise InvalidInputError(f"{path}: a gallery split must be a JSON list or dict")
        else:  # Shoes and others: one name per line
            names = [line.strip() for line in text.splitlines() if line.strip()]
    elif "," in spec:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    else:
        raise InvalidInputError(
            f"gallery {spec!r} not found: give a split file, a folder or a comma-separated list"
        )
    names = [_stem(n) for n in names]
    unique = list(dict.fromkeys(names))
    if not unique:
        raise InvalidInputError(f"the gallery {spec!r} names no images")
    return unique


def _stem(name: str) -> str:
    """Image names as the triplets give them: no folder, no image suffix."""
    base = name.rsplit("/", 1)[-1]
    stem, dot, suffix = base.rpartition(".")
    return stem if dot and f".{suffix.lower()}" in _IMAGE_SUFFIXES else base


def check_gallery(kind: str, gallery: Sequence[str] | None, triplets) -> None:
    """The protocol's rules on the gallery: required for FashionIQ and CIRCO; every target
    (and CIRCO ground truth) in it."""
    if gallery is None:
        if kind in NEEDS_GALLERY:
            raise InvalidInputError(
                f"{kind} is ranked over its whole split: give --gallery (FashionIQ:"
                " image_splits/split.<category>.<split>.json; CIRCO: the COCO 2017 unlabeled"
                " image folder or its list)."
            )
        return
    members = set(gallery)
    missing = sorted({g for t in triplets for g in (t.target, *t.positives) if g not in members})
    if missing:
        raise InvalidInputError(
            f"{len(missing)} targets are not in the gallery (e.g. {missing[0]!r}): wrong split?"
        )


def excludes_reference(kind: str) -> bool:
    """Only CIRR removes the query's reference image from its ranking."""
    return kind == "cirr"


def score(kind: str, rankings: Sequence[Sequence[str]], triplets) -> dict[str, float]:
    """The benchmark's metrics in percent from rankings of the gallery (one per triplet;
    already without the reference for CIRR)."""
    targets = [t.target for t in triplets]
    if kind == "cirr":
        result = {f"R@{k}": v for k, v in recall_at_k(rankings, targets, RECALL_KS).items()}
        if all(t.subset for t in triplets):
            refs, subsets = [t.reference for t in triplets], [t.subset for t in triplets]
            subs = subset_recall_at_k(rankings, targets, refs, subsets, SUBSET_KS)
            result.update({f"Rsubset@{k}": v for k, v in subs.items()})
    elif kind == "fashioniq":
        result = {f"R@{k}": v for k, v in recall_at_k(rankings, targets, FASHIONIQ_KS).items()}
    elif kind == "circo":
        gts = [t.positives or (t.target,) for t in triplets]
        result = {f"mAP@{k}": v for k, v in map_at_k(rankings, gts, CIRCO_KS).items()}
        result.update({f"R@{k}": v for k, v in recall_at_k(rankings, targets, CIRCO_KS).items()})
    elif kind == "shoes":
        result = {f"R@{k}": v for k, v in recall_at_k(rankings, targets, SHOES_KS).items()}
    else:
        raise InvalidInputError(f"unknown CIR benchmark {kind!r}")
    return {key: 100 * value for key, value in result.items()}


def fashioniq_category(path: str | Path) -> str:
    """dress, shirt or toptee from a FashionIQ file name (cap.dress.val.json), else the stem."""
    parts = Path(path).name.lower().split(".")
    found = [c for c in FASHIONIQ_CATEGORIES if c in parts]
    return found[0] if found else Path(path).stem


def average_categories(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """FashionIQ's headline: each metric averaged over the categories."""
    keys = next(iter(per_category.values())).keys()
    return {k: sum(m[k] for m in per_category.values()) / len(per_category) for k in keys}
