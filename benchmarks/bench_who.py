"""Time `who` on real photos, split into decode, detect, embed, search and render.

Uses the `cpu` architectures (CLIP ViT-B-32; random weights by default — the compute is the
same as with the real ones) and the real COCO detector from ../shared/models, on the DreamBooth
photos. Target: everything except the model forwards (detect + embed) under 15% of the total.

    python benchmarks/bench_who.py [--photos 40] [--concepts 30] [--detector PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _setup import COCO_TFLITE, require_photos, scratch_dir

STAGES = ["decode", "detect", "embed", "search", "render"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=40, help="photos to run `who` on")
    parser.add_argument("--concepts", type=int, default=30, help="concepts remembered first")
    parser.add_argument("--detector", default=str(COCO_TFLITE))
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--real-weights", action="store_true", help="load the real weights")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    photos_dir = require_photos()
    tmp = scratch_dir("who")

    from engine.engine import Engine
    from engine.settings import EngineSettings

    settings = EngineSettings(
        data_dir=tmp / "data",
        profile=args.profile,
        detector=args.detector,
        random_weights=not args.real_weights,
        device=args.device,
    )
    started = time.perf_counter()
    engine = Engine.open(settings)
    load_seconds = time.perf_counter() - started

    photos = sorted(photos_dir.glob("*/*.jpg"))
    subjects = sorted({p.parent.name for p in photos})[: args.concepts]
    for subject in subjects:
        name = subject.replace("_", " ")  # names allow no markup characters
        engine.remember("bench", (photos_dir / subject / "00.jpg").read_bytes(), name, user="bench")
    chosen = photos[:: max(1, len(photos) // args.photos)][: args.photos]
    engine.recognize("bench", chosen[0].read_bytes())  # warm-up

    totals: list[float] = []
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    for path in chosen:
        data = path.read_bytes()
        start = time.perf_counter()
        answer = engine.recognize("bench", data, annotate=True)
        totals.append(time.perf_counter() - start)
        for stage in STAGES:
            per_stage[stage].append(answer.timings.get(stage, 0.0))
    engine.close()

    total = sum(totals)
    print(
        f"`who` on {len(chosen)} real photos, profile {args.profile} "
        f"({'real' if args.real_weights else 'random'} weights), detector {Path(args.detector).name}, "
        f"{len(subjects)} concepts; models loaded in {load_seconds:.1f} s"
    )
    print(f"{'stage':<10}{'mean ms':>10}{'p50 ms':>10}{'share':>9}")
    accounted = 0.0
    for stage in STAGES:
        values = per_stage[stage]
        accounted += sum(values)
        print(
            f"{stage:<10}{1000 * statistics.mean(values):>10.1f}"
            f"{1000 * statistics.median(values):>10.1f}{100 * sum(values) / total:>8.1f}%"
        )
    other = total - accounted
    print(f"{'other':<10}{1000 * other / len(totals):>10.1f}{'':>10}{100 * other / total:>8.1f}%")
    print(
        f"{'total':<10}{1000 * statistics.mean(totals):>10.1f}{1000 * statistics.median(totals):>10.1f}"
    )
    models = sum(per_stage["detect"]) + sum(per_stage["embed"])
    outside = 100 * (total - models) / total
    print(f"outside the model forwards (decode+search+render+other): {outside:.1f}% (target < 15%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
