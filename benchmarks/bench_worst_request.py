"""The worst requests one can craft (issue 11), against an ordinary photo's `who`, in one run.

Each case runs in its own process (a fresh engine: one request's memory cannot hide in
another's), after two warm-up requests. In that process the ordinary `who` and the case
alternate ``--repeats`` times; a request's time is its median, its memory the peak resident
set during it above the resident set just before it (Linux: the high-water mark is reset
through ``/proc/self/clear_refs`` before each request), the worst of the repeats. Each case is
printed as a ratio of time and as extra megabytes against the ordinary `who` of the same
process. Target (issue 11): within 3x the time and +300 MB.

The cases: strips (100000x1 and 60000x1 PNGs of a few hundred bytes, 1x49,000,000), a PNG
whose header declares 65535x65535, the largest photo the limits allow (a real photo upscaled
to ~49 MP, under 20 MB; `who` and `remember`) and a 169 MP one, `remember` with a 1 MB
description, `who` in a chat of 5,000 concepts with 5,000 categories, `search` naming a
concept with 3,000 examples, the `/concepts` contact sheet and `ask` (with the tiny LLaVA)
over crops of ~49 MP imported from an archive, and importing that archive and one whose crop
declares 65535x65535.

    python benchmarks/bench_worst_request.py [--profile tiny] [--repeats 3] [--only CASE ...]
    python benchmarks/bench_worst_request.py --profile cpu --detector yolo-world:yolov8s-worldv2.yaml
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from _setup import ROOT, require_photos, scratch_dir

SCOPE, CROWDED, CRAFTED = "bench", "crowded", "crafted"
CROWDED_CONCEPTS = 5_000  # each with its own category
NAMED_EXAMPLES = 3_000  # of "Mochi" in the crowded chat
CRAFTED_CONCEPTS = 20  # one contact sheet page, each crop ~49 MP
BIG_SIDE = 7_000  # 49 MP: the largest square under the default 50 MP limit
HUGE_SIDE = 13_000  # 169 MP
TARGET_TIME, TARGET_MB = 3.0, 300.0


# ----------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def measure(request: Callable[[], object]) -> tuple[float, float, str]:
    """Seconds, peak extra MB and outcome ("ok" or the user's one-line message) of one call."""
    from engine.errors import RapbotError

    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    try:
        request()
        outcome = "ok"
    except RapbotError as error:
        outcome = f"refused: {str(error)[:70]}"
    seconds = time.perf_counter() - start
    return seconds, (_status_kb("VmHWM") - before) / 1024, outcome


# ----------------------------------------------------------------------------- inputs


def png(width: int, height: int, rows: bytes) -> bytes:
    """An RGB PNG built by hand (``rows``: filtered scanlines), so huge sizes cost no memory."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


def jpeg_of(photo: Path, side: int, quality: int) -> bytes:
    """A real photo upscaled to ``side`` x ``side`` (a camera's worth of pixels)."""
    from PIL import Image

    from engine.images import load_image_file

    big = load_image_file(photo).resize((side, side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    big.save(out, "JPEG", quality=quality)
    return out.getvalue()


def bomb_jpeg() -> bytes:
    """A small real JPEG whose frame header claims 65535x65535."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(out, "JPEG")
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65535, 65535)
    return bytes(data)


def prepare(root: Path, photos: Path, settings_of: Callable[..., object]) -> None:
    """The store (three chats), the archives and the input files, written once under root."""
    import numpy as np

    from engine.backup import export_scopes
    from engine.engine import Engine
    from engine.permissions import Actor
    from engine.store import open_store
    from engine.store.base import NewConcept
    from engine.types import Box

    inputs = root / "inputs"
    inputs.mkdir(parents=True)
    subjects = sorted(p for p in photos.iterdir() if p.is_dir())
    ordinary = subjects[0] / "01.jpg"
    (inputs / "ordinary.jpg").write_bytes(ordinary.read_bytes())
    (inputs / "strip_100000x1.png").write_bytes(png(100_000, 1, b"\0" + b"\x80" * 300_000))
    (inputs / "strip_60000x1.png").write_bytes(png(60_000, 1, b"\0" + b"\x80" * 180_000))
    (inputs / "strip_1x49M.png").write_bytes(png(1, 49_000_000, b"\0\x80\x80\x80" * 49_000_000))
    (inputs / "bomb_65535.png").write_bytes(png(65535, 65535, b"\0" * 1000))
    big = jpeg_of(subjects[1] / "00.jpg", BIG_SIDE, 85)
    (inputs / "largest_allowed.jpg").write_bytes(big)
    (inputs / "huge_169mp.jpg").write_bytes(jpeg_of(subjects[1] / "00.jpg", HUGE_SIDE, 40))
    ordinary_crop = jpeg_of(ordinary, 600, 90)  # ~100 KB, as /remember stores one

    engine = Engine.open(settings_of())
    try:
        for subject in subjects[:30]:
            name = subject.name.replace("_", " ")
            engine.remember(SCOPE, (subject / "00.jpg").read_bytes(), name, user="bench")
        store = engine.store
        rng = np.random.default_rng(0)

        def unit() -> np.ndarray:
            vector = rng.standard_normal(store.dim).astype(np.float32)
            return vector / np.linalg.norm(vector)

        crop = store.example_crops(SCOPE, store.list_concepts(SCOPE)[0].id, 1)[0]
        crowd = [
            NewConcept(
                f"Thing {i}", unit(), crop, Box(0, 0, 10, 10), category=f"kind {i}", owner="bench"
            )
            for i in range(CROWDED_CONCEPTS)
        ]
        store.add_concepts_bulk(CROWDED, crowd)
        engine.remember(CROWDED, ordinary.read_bytes(), "Mochi", "my cat", user="bench")
        mochi = engine.concept(CROWDED, "Mochi").id
        with store.deferred_saves():
            for _ in range(NAMED_EXAMPLES - 1):
                store.add_example(
                    CROWDED, mochi, embedding=unit(), crop_jpeg=ordinary_crop, box=Box(0, 0, 9, 9)
                )
        admin = Actor("bench", is_admin=True)
        engine.set_indexing(CROWDED, True, admin)
        for i, subject in enumerate(subjects[:20]):
            engine.index_photo(CROWDED, (subject / "00.jpg").read_bytes(), "bench", f"p{i}")
        model, dim = store.model_id, store.dim
    finally:
        engine.close()

    # Archives, forged in a store of their own: 20 concepts whose crops are ~49 MP photos, and
    # one whose crop declares 65535x65535 (written as bytes: the store checks no pixels).
    forged = {
        "big_crops": [big] * CRAFTED_CONCEPTS,
        "ordinary_crops": [ordinary_crop] * CRAFTED_CONCEPTS,
        "bomb_crop": [bomb_jpeg()],
    }
    for name, crops in forged.items():
        forge = open_store(root / f"forge-{name}", model, dim)
        try:
            forge.add_concepts_bulk(
                CRAFTED,
                [
                    NewConcept(
                        f"Big {i}", unit(), c, Box(0, 0, 9, 9), category="cat", owner="mallory"
                    )
                    for i, c in enumerate(crops)
                ],
            )
            export_scopes(forge, [CRAFTED], inputs / f"{name}.zip")
        finally:
            forge.close()
    store = open_store(root / "data" / "store", model, dim)
    try:  # the crafted chat, as an import would leave it
        from engine.backup import import_archive

        import_archive(inputs / "big_crops.zip", store)
    finally:
        store.close()


# ----------------------------------------------------------------------------- cases


def cases(engine, inputs: Path, scratch: Path) -> dict[str, Callable[[], object]]:
    from engine.backup import import_archive
    from engine.store import open_store

    def read(name: str) -> bytes:
        return (inputs / name).read_bytes()

    ordinary = read("ordinary.jpg")
    fresh = iter(range(1_000_000))

    def import_into_empty(archive: str) -> Callable[[], object]:
        def run() -> object:
            target = scratch / f"import-{next(fresh)}"
            store = open_store(target, engine.store.model_id, engine.store.dim)
            try:
                return import_archive(inputs / archive, store)
            finally:
                store.close()

        return run

    def who(scope: str, data: bytes) -> Callable[[], object]:
        return lambda: engine.recognize(scope, data)

    def first_name() -> str:
        return engine.list_concepts(SCOPE)[0].name

    big = read("largest_allowed.jpg")
    ordinary_import = import_into_empty("ordinary_crops.zip")
    # name -> (the request, the same request made with ordinary input, or None: the `who`)
    return {
        "ordinary who": (who(SCOPE, ordinary), None),
        "who 100000x1 PNG": (who(SCOPE, read("strip_100000x1.png")), None),
        "who 60000x1 PNG": (who(SCOPE, read("strip_60000x1.png")), None),
        "who 1x49,000,000 PNG": (who(SCOPE, read("strip_1x49M.png")), None),
        "who PNG declaring 65535^2": (who(SCOPE, read("bomb_65535.png")), None),
        f"who {BIG_SIDE}^2 (largest allowed)": (who(SCOPE, big), None),
        f"who {HUGE_SIDE}^2 (169 MP)": (who(SCOPE, read("huge_169mp.jpg")), None),
        f"remember {BIG_SIDE}^2 (largest allowed)": (
            lambda: engine.remember(SCOPE, big, "Big upload", user="bench"),
            lambda: engine.remember(SCOPE, ordinary, "Ordinary upload", user="bench"),
        ),
        "remember, 1 MB description": (
            lambda: engine.remember(SCOPE, ordinary, "Zed", "x" * 1_000_000, user="bench"),
            lambda: engine.remember(SCOPE, ordinary, "Zed", "x" * 300, user="bench"),
        ),
        f"who in a chat of {CROWDED_CONCEPTS} categories": (who(CROWDED, ordinary), None),
        f"search naming a concept of {NAMED_EXAMPLES} examples": (
            lambda: engine.search(CROWDED, "Mochi on the sofa", k=5),
            lambda: engine.search(CROWDED, "Thing 1 on the sofa", k=5),  # 1 example
        ),
        f"/concepts sheet, {CRAFTED_CONCEPTS} crops of 49 MP": (
            lambda: engine.concept_sheet(CRAFTED, 1),
            lambda: engine.concept_sheet(SCOPE, 1),  # 24 remembered crops
        ),
        "ask (tiny LLaVA), crops of 49 MP": (
            lambda: engine.ask(CRAFTED, ordinary, "Is Big 0 here?", user="bench"),
            lambda: engine.ask(SCOPE, ordinary, f"Is {first_name()} here?", user="bench"),
        ),
        f"import archive, {CRAFTED_CONCEPTS} crops of 49 MP": (
            import_into_empty("big_crops.zip"),
            ordinary_import,
        ),
        "import archive, crop declaring 65535^2": (
            import_into_empty("bomb_crop.zip"),
            ordinary_import,
        ),
    }


def run_case(root: Path, case: str, repeats: int, settings_of) -> dict:
    """In this (child) process: the ordinary `who`, the case's ordinary counterpart (if any)
    and ``case``, in turn."""
    from engine.engine import Engine

    generator = "tiny-llava" if case.startswith("ask") else "none"
    engine = Engine.open(settings_of(generator=generator))
    try:
        requests = cases(engine, root / "inputs", root / "scratch")
        request, counterpart = requests[case]
        calls = {"base": requests["ordinary who"][0], "same": counterpart, "worst": request}
        calls = {k: v for k, v in calls.items() if v is not None}
        runs: dict[str, list] = {k: [] for k in calls}
        for _ in range(2):  # warm-up: models, caches, allocator
            for call in calls.values():
                measure(call)
        for _ in range(repeats):
            for key, call in calls.items():
                runs[key].append(measure(call))
    finally:
        engine.close()

    def summary(measured: list[tuple[float, float, str]]) -> dict:
        return {
            "seconds": statistics.median(r[0] for r in measured),
            "mb": max(r[1] for r in measured),
            "outcome": measured[-1][2],
        }

    return {"case": case, **{key: summary(measured) for key, measured in runs.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--detector", default="", help="override the profile's detector")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    parser.add_argument("--root", type=Path, help="reuse the folder an earlier run prepared")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child: the case to run
    args = parser.parse_args()

    def settings_of(generator: str = "none"):
        from engine.settings import EngineSettings

        return EngineSettings(
            data_dir=root / "data",
            profile=args.profile,
            random_weights=True,
            generator=generator,
            offline=True,
            detector=args.detector,
        )

    if args.case:
        root = args.root
        print(json.dumps(run_case(root, args.case, args.repeats, settings_of)))
        return 0

    if args.root:  # a folder an earlier run prepared
        root = args.root
    else:
        photos = require_photos()
        root = scratch_dir("worst")
        started = time.perf_counter()
        prepare(root, photos, settings_of)
        (root / "scratch").mkdir()
        print(f"prepared in {time.perf_counter() - started:.0f} s under {root}", file=sys.stderr)
    names = [c for c in cases(None, root / "inputs", root / "scratch") if c != "ordinary who"]
    names = ["ordinary who", *names] if not args.only else args.only
    print(
        f"profile {args.profile} (random weights), {args.repeats} repeats per case; each row"
        " against the ordinary `who` and the same request with ordinary input (x same, +MB),"
        " measured in its own process"
    )
    print(
        f"{'request':<46}{'s':>7}{'x who':>8}{'x same':>8}{'peak MB':>9}{'+MB':>6}  {'ok?':<4}"
        " outcome"
    )
    for name in names:
        child = subprocess.run(
            [sys.executable, __file__, "--root", str(root), "--case", name, "--profile",
             args.profile, "--repeats", str(args.repeats), "--detector", args.detector],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        if child.returncode != 0:
            print(f"{name:<46} failed: {child.stderr.strip().splitlines()[-1:]}")
            continue
        row = json.loads(child.stdout.strip().splitlines()[-1])
        base, worst = row["base"], row["worst"]
        same = row.get("same", base)  # the ordinary form of this request
        extra = worst["mb"] - same["mb"]
        versus = worst["seconds"] / same["seconds"]
        met = versus <= TARGET_TIME and extra <= TARGET_MB
        print(
            f"{name:<46}{worst['seconds']:>7.3f}{worst['seconds'] / base['seconds']:>7.2f}x"
            f"{versus:>7.2f}x{worst['mb']:>9.0f}{extra:>+6.0f}  {'yes' if met else 'NO':<4}"
            f" {worst['outcome'][:60]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
