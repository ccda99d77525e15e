"""Issue 11, part 9: one unreadable thumbnail does not stop the re-index of every chat."""

from __future__ import annotations

import sqlite3

from engine.store.photos import DB_NAME
from tests.test_transfer import jpeg


def test_a_bad_thumbnail_is_skipped_and_reported_with_its_chat(tiny_engine) -> None:
    ids = {}
    for scope, seeds in (("cli:1", (41, 42, 43)), ("cli:2", (44, 45))):
        for seed in seeds:
            ids[seed] = tiny_engine.index_photo(
                scope, jpeg(seed, 160), "me", f"/photos/{seed}.jpg", force=True
            )
    # An imported (or damaged) thumbnail: JPEG magic and junk.
    db = sqlite3.connect(tiny_engine.photos.root / DB_NAME)
    with db:
        db.execute(
            "UPDATE photos SET thumbnail = ? WHERE id = ?",
            (b"\xff\xd8\xff" + b"junk" * 40, ids[42]),
        )
    db.close()
    report = tiny_engine.reindex_report(force=True)  # before: ImageError, every chat half done
    assert report.skipped == {"cli:1": [ids[42]]}
    assert report.photos == 4
    assert tiny_engine.photos.mismatch is None
    for scope, seed in (("cli:1", 41), ("cli:2", 45)):  # search works again in every chat
        hit = tiny_engine.search(scope, "", jpeg(seed, 160), k=1)[0]
        assert hit.source == f"/photos/{seed}.jpg"
    assert tiny_engine.photos.count("cli:1") == 2
