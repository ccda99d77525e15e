"""Compare the training-free fusions of photo search (engine/composition.py): product vs sum.

For late fusion by the product of rectified cosines (``product``, the default, no weight) and
the weighted sum at every text weight (0.0, 0.1 ... 1.0) the CIR queries of a
CIRR- or FashionIQ-format triplet set (read by ``rapbot eval cir``'s loader,
``engine.cir.train.load_triplets``) are composed from one open_clip model's embeddings exactly as
``Engine.search`` composes them (``engine.composition.ComposedQuery``: reference photo + text),
the gallery (every image the set names) is ranked by cosine with each query's reference left out
(``engine.eval.cir_metrics.rank_gallery``; each query's reference left out for CIRR only, as
its official evaluation does: ``engine.eval.cir_protocol``), and
Recall@1/5/10 are printed, then the best setting (highest mean of R@1, R@5 and R@10; ties go to
the weight nearest 0.5). The product ranks the whole gallery here (the engine reranks the union
of each part's top ``RAPBOT_SEARCH_CANDIDATES``). Every image and text is embedded once; the
sweep itself is numpy.

    python benchmarks/tune_composition.py --data cirr/val.json --images cirr/img \\
        --model ViT-L-14 --pretrained openai --device cuda
    python benchmarks/tune_composition.py --data fiq/dress.json --images fiq/images \\
        --model ViT-B-32 --pretrained laion2b_s34b_b79k
    python benchmarks/tune_composition.py --synthetic --model rapbot-tiny   # offline, no data

``--synthetic`` writes a small CIRR-format set of coloured shapes (the learnability set of
tests/test_cir.py: 5 shapes x 6 colours, "red instead of blue" / "a circle instead of a square")
to a temporary folder and runs on it. Without ``--pretrained`` the model has random weights:
the table then shows the machinery working, not which setting is good.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.cir.train import ImageCache, Triplet, load_triplets  # noqa: E402
from engine.composition import ComposedQuery, rank_product  # noqa: E402
from engine.embedder import load_clip  # noqa: E402
from engine.eval.cir_metrics import rank_gallery, recall_at_k  # noqa: E402
from engine.eval.cir_protocol import excludes_reference  # noqa: E402
from engine.settings import EngineSettings  # noqa: E402

KS = (1, 5, 10)
WEIGHTS = [round(0.1 * i, 1) for i in range(11)]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 30),
    "purple": (140, 40, 180),
    "orange": (240, 140, 20),
}
SHAPES = ("square", "circle", "triangle", "diamond", "bar")


def draw(shape: str, colour: str, size: int = 96):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    d, fill, s = ImageDraw.Draw(image), COLOURS[colour], size
    if shape == "square":
        d.rectangle([s * 0.2, s * 0.2, s * 0.8, s * 0.8], fill=fill)
    elif shape == "circle":
        d.ellipse([s * 0.15, s * 0.15, s * 0.85, s * 0.85], fill=fill)
    elif shape == "triangle":
        d.polygon([(s * 0.5, s * 0.1), (s * 0.9, s * 0.85), (s * 0.1, s * 0.85)], fill=fill)
    elif shape == "diamond":
        d.polygon(
            [(s * 0.5, s * 0.1), (s * 0.9, s * 0.5), (s * 0.5, s * 0.9), (s * 0.1, s * 0.5)],
            fill=fill,
        )
    else:
        d.rectangle([s * 0.1, s * 0.4, s * 0.9, s * 0.6], fill=fill)
    return image


def write_synthetic(root: Path, seed: int = 0) -> Path:
    """Shapes x colours images and a CIRR-format JSON of colour and shape changes; its path."""
    records = []
    for shape in SHAPES:
        for colour in COLOURS:
            draw(shape, colour).save(root / f"{shape}-{colour}.png")
    for shape in SHAPES:
        for colour in COLOURS:
            for other in COLOURS:
                if other != colour:
                    records.append((shape, colour, f"{other} instead of {colour}", shape, other))
            for other in SHAPES:
                if other != shape:
                    text = f"a {other} instead of a {shape}"
                    records.append((shape, colour, text, other, colour))
    random.Random(seed).shuffle(records)
    path = root / "synthetic-cirr.json"
    path.write_text(
        json.dumps(
            [
                {"reference": f"{s}-{c}", "caption": t, "target_hard": f"{s2}-{c2}"}
                for s, c, t, s2, c2 in records
            ]
        )
    )
    return path


def embed_set(clip, triplets: list[Triplet], images: ImageCache, batch: int = 64):
    """(gallery names, gallery image embeddings, text embeddings per triplet)."""
    names: list[str] = []
    for t in triplets:
        for name in (t.reference, t.target, *(t.subset or ())):
            if name not in names:
                names.append(name)
    gallery = np.concatenate(
        [
            clip.embed_images([images(n) for n in names[i : i + batch]])
            for i in range(0, len(names), batch)
        ]
    )
    texts = clip.embed_texts([t.text for t in triplets])
    return names, gallery, texts


def sweep(triplets, names, gallery, texts) -> list[dict]:
    """Recall@K (percent) for the product and for the sum at every weight."""
    position = {n: i for i, n in enumerate(names)}
    queries = [
        ComposedQuery("text", text, gallery[position[t.reference]])
        for t, text in zip(triplets, texts, strict=True)
    ]
    targets = [t.target for t in triplets]
    refs = [t.reference for t in triplets]
    exclude = refs if excludes_reference(triplets[0].kind) else None
    ids = np.arange(len(names))
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    rankings = []
    for query, ref in zip(queries, exclude or [None] * len(queries), strict=True):
        ranked = rank_product(query.parts(), ids, gallery, len(names))
        rankings.append([names[i] for i, _ in ranked if names[i] != ref])
    recall = recall_at_k(rankings, targets, KS)
    rows = [{"mode": "product", "weight": None, **{k: 100 * recall[k] for k in KS}}]
    for weight in WEIGHTS:
        summed = np.stack([q.summed(weight) for q in queries])
        rankings = rank_gallery(summed, gallery, names, exclude=exclude)
        recall = recall_at_k(rankings, targets, KS)
        rows.append({"mode": "sum", "weight": weight, **{k: 100 * recall[k] for k in KS}})
    return rows


def best(rows: list[dict]) -> dict:
    return max(
        rows, key=lambda r: (sum(r[k] for k in KS) / len(KS), -abs((r["weight"] or 0.5) - 0.5))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="CIRR or FashionIQ triplets (JSON list or JSON lines)")
    source.add_argument("--synthetic", action="store_true", help="generated coloured shapes")
    parser.add_argument("--images", help="image folder (default: the data file's folder)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture")
    parser.add_argument("--pretrained", default="", help="open_clip tag or weights file")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--limit", type=int, default=None, help="at most N triplets")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="rapbot-tune-"))
    try:
        if args.synthetic:
            data, image_root = write_synthetic(folder), folder
        else:
            data = Path(args.data).expanduser()
            image_root = Path(args.images).expanduser() if args.images else data.parent
        triplets = load_triplets(data)[: args.limit]
        settings = EngineSettings(data_dir=folder / "data", device=args.device)
        started = time.perf_counter()
        clip = load_clip(args.model, args.pretrained, settings)
        weights = args.pretrained or "random weights"
        names, gallery, texts = embed_set(clip, triplets, ImageCache(image_root))
        print(
            f"{args.model} ({weights}) on {clip.device}: {len(triplets)} triplets,"
            f" {len(names)} gallery images, embedded in {time.perf_counter() - started:.1f}s"
        )
        rows = sweep(triplets, names, gallery, texts)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    top = best(rows)
    if args.json:
        print(json.dumps({"rows": rows, "best": top}, indent=2))
        return
    print(f"{'mode':<7} {'weight':>6} {'R@1':>6} {'R@5':>6} {'R@10':>6}")
    for r in rows:
        weight = "-" if r["weight"] is None else f"{r['weight']:.1f}"
        print(f"{r['mode']:<7} {weight:>6} {r[1]:>6.1f} {r[5]:>6.1f} {r[10]:>6.1f}")
    print(
        f"best: {top['mode']}"
        + ("" if top["weight"] is None else f" at text weight {top['weight']:.1f}")
        + f" (R@1 {top[1]:.1f}, R@5 {top[5]:.1f}, R@10 {top[10]:.1f})"
    )
    if not args.pretrained:
        print("(random weights: these figures say nothing about which setting is good)")


if __name__ == "__main__":
    main()
