"""The FAISS store across processes: persistence, other writers, kills mid-write, bad files.

SQLite is the truth and every index file records the scope version it reflects; these tests
check that whatever a process left behind, a reopened store agrees with SQLite exactly.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from engine.store import NewConcept
from engine.store.faiss_store import (
    DB_NAME,
    FaissConceptStore,
    index_ids,
    index_path,
    read_index_file,
    read_index_header,
)
from engine.types import Box

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DIM = 16
MODEL = "test:model"
SCOPES = ("tg:-100123", "dc:987", "ü 🐱")

# A writer process: adds concepts and examples and deletes some, forever, printing each
# committed step. Small thresholds make scopes switch to IVF and defer saves of big scopes.
WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, {repo!r})
    from engine.store.faiss_store import FaissConceptStore
    from engine.types import Box

    root, seed, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    store = FaissConceptStore(root, {model!r}, {dim}, ivf_threshold=40, eager_save_max=60)
    rng = np.random.default_rng(seed)
    scopes = {scopes!r}
    print("ready", flush=True)
    step = 0
    while steps < 0 or step < steps:
        scope = scopes[int(rng.integers(len(scopes)))]
        vector = rng.standard_normal({dim}).astype(np.float32)
        vector /= np.linalg.norm(vector)
        concepts = store.list_concepts(scope)
        roll = rng.random()
        if roll < 0.6 or not concepts:
            store.add_concept(scope, name=f"c{{seed}}-{{step}}", description="", category="cat",
                              owner=f"u{{step % 3}}", embedding=vector, crop_jpeg=b"jpeg",
                              box=Box(0, 0, 4, 4), source=f"{{seed}}:{{step}}")
        elif roll < 0.9:
            target = concepts[int(rng.integers(len(concepts)))]
            store.add_example(scope, target.id, embedding=vector, crop_jpeg=b"jpeg",
                              box=Box(0, 0, 4, 4))
        else:
            store.delete(scope, concepts[int(rng.integers(len(concepts)))].id)
        step += 1
        print(step, flush=True)
    store.close()
    """
).format(repo=str(REPO), model=MODEL, dim=DIM, scopes=SCOPES)


def writer(root: Path, seed: int, steps: int = -1) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(seed), str(steps)],
        stdout=subprocess.PIPE,
        text=True,
    )


def truth(root: Path) -> tuple[dict[str, int], dict[str, list[int]], dict[str, tuple]]:
    """Straight from SQLite: scope versions, example ids per scope, one vector per concept."""
    db = sqlite3.connect(root / DB_NAME)
    try:
        versions = dict(db.execute("SELECT scope, version FROM scopes").fetchall())
        ids: dict[str, list[int]] = {scope: [] for scope in versions}
        vectors: dict[str, tuple] = {}
        for example_id, scope, concept_id, blob in db.execute(
            "SELECT id, scope, concept_id, embedding FROM examples ORDER BY id"
        ):
            ids[scope].append(example_id)
            vectors.setdefault(concept_id, (scope, np.frombuffer(blob, dtype=np.float32)))
        return versions, ids, vectors
    finally:
        db.close()


def check_files_against(
    root: Path, versions: dict[str, int], ids: dict[str, list[int]], damaged: bool = False
) -> None:
    """An index file is never ahead of SQLite, and one at SQLite's version holds its ids.

    Files are written atomically, so only a test that ``damaged`` them may find one unreadable.
    """
    db = sqlite3.connect(root / DB_NAME)
    store_id = db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
    db.close()
    for scope, version in versions.items():
        header = read_index_header(index_path(root, scope))
        if header is None or header["store_id"] != store_id:  # absent or foreign: rebuilt
            continue
        assert header["scope"] == scope and header["version"] <= version
        if header["version"] == version:
            loaded = read_index_file(index_path(root, scope))
            assert loaded is not None or damaged
            if loaded is not None:
                assert index_ids(loaded[1]).tolist() == ids[scope]


def check_store(root: Path, damaged: bool = False, **options) -> None:
    """Reopen and compare with SQLite: counts, searchability of every concept, index files."""
    versions, ids, vectors = truth(root)
    check_files_against(root, versions, ids, damaged)
    with FaissConceptStore(root, MODEL, DIM, **options) as store:
        assert store.count() == sum(len(v) for v in ids.values())
        for scope in versions:
            assert store.count(scope) == len(ids[scope])
            listed = store.list_concepts(scope)
            assert {c.id for c in listed} == {cid for cid, (s, _) in vectors.items() if s == scope}
            for concept in listed:
                hit = store.search(scope, vectors[concept.id][1], 1)[0][0]
                assert hit.concept_id == concept.id
                assert hit.score == pytest.approx(1.0, abs=1e-4)
        store.flush()
    check_files_against(root, versions, ids)
    for scope, version in versions.items():  # flushed: every file is now current
        assert read_index_header(index_path(root, scope))["version"] == version


def test_a_child_process_writes_and_the_parent_reads(tmp_path: Path) -> None:
    root = tmp_path / "store"
    child = writer(root, seed=1, steps=40)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0 and out.split()[-1] == "40"
    check_store(root)


def test_an_open_store_sees_another_process_changes(tmp_path: Path) -> None:
    root = tmp_path / "store"
    assert writer(root, seed=2, steps=15).wait(timeout=60) == 0
    mine = FaissConceptStore(root, MODEL, DIM)
    try:
        vector = np.eye(DIM, dtype=np.float32)[0]
        own = mine.add_concept(
            "mine",
            name="Mine",
            description="",
            category="",
            owner="me",
            embedding=vector,
            crop_jpeg=b"",
            box=Box(0, 0, 1, 1),
        )
        before = {scope: mine.count(scope) for scope in SCOPES}  # now cached in this process
        assert all(before.values())
        assert writer(root, seed=3, steps=30).wait(timeout=60) == 0
        versions, ids, vectors = truth(root)
        for scope in SCOPES:
            assert mine.count(scope) == len(ids[scope])
        assert mine.count() == sum(len(v) for v in ids.values())
        for concept_id, (scope, vec) in vectors.items():
            assert mine.search(scope, vec, 1)[0][0].concept_id == concept_id
        assert mine.search("mine", vector, 1)[0][0].concept_id == own.id
    finally:
        mine.close()
    check_store(root)


def test_kill_during_writes_leaves_a_consistent_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    rng = random.Random(7)
    for round_ in range(5):
        child = writer(root, seed=100 + round_)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 0.9))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert child.returncode == -signal.SIGKILL
        # Reopen with the writer's settings (IVF, deferred saves) and with the defaults.
        check_store(root, ivf_threshold=40, eager_save_max=60)
        check_store(root)
    versions, ids, _ = truth(root)
    assert sum(len(v) for v in ids.values()) > 20  # the writers did get somewhere


def _store_with_history(root: Path) -> tuple[FaissConceptStore, bytes, list[str]]:
    """A store whose scope's index file was saved at an early version (returned as bytes)."""
    store = FaissConceptStore(root, MODEL, DIM)
    rng = np.random.default_rng(3)

    def add(name: str):
        vector = rng.standard_normal(DIM).astype(np.float32)
        vector /= np.linalg.norm(vector)
        return store.add_concept(
            "tg:1",
            name=name,
            description="",
            category="",
            owner="u",
            embedding=vector,
            crop_jpeg=b"",
            box=Box(0, 0, 1, 1),
        )

    early = [add(f"early{i}") for i in range(5)]
    old_file = index_path(root, "tg:1").read_bytes()
    store.delete("tg:1", early[0].id)
    later = [add(f"later{i}") for i in range(5)]
    return store, old_file, [c.id for c in early[1:] + later]


@pytest.mark.parametrize("damage", ["stale", "garbage", "truncated", "missing", "foreign"])
def test_a_stale_or_broken_index_file_is_repaired(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "store"
    store, old_file, alive = _store_with_history(root)
    store.close()
    path = index_path(root, "tg:1")
    if damage == "stale":  # e.g. killed after the commit, before the save
        path.write_bytes(old_file)
    elif damage == "garbage":
        path.write_bytes(b"not an index at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "missing":
        path.unlink()
    else:  # an index file of the same scope from another store folder
        other, other_file, _ = _store_with_history(tmp_path / "other")
        other.close()
        path.write_bytes(index_path(tmp_path / "other", "tg:1").read_bytes())
    check_store(root, damaged=True)
    with FaissConceptStore(root, MODEL, DIM) as reopened:
        assert {c.id for c in reopened.list_concepts("tg:1")} == set(alive)
        assert reopened.count("tg:1") == len(alive)


def test_large_scope_switches_to_ivf_and_back(tmp_path: Path) -> None:
    root = tmp_path / "store"
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((300, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with FaissConceptStore(root, MODEL, DIM, ivf_threshold=100) as store:
        made = store.add_concepts_bulk(
            "big", [NewConcept(f"n{i}", vectors[i], owner="u") for i in range(300)]
        )
        assert store._sync("big").kind == "ivf"
        hits = store.search("big", vectors[:50], 1)
        assert sum(h[0].concept_id == made[i].id for i, h in enumerate(hits)) >= 48
        for concept in made[:260]:
            store.delete("big", concept.id)
        assert store._sync("big").kind == "flat" and store.count("big") == 40
        for i, concept in enumerate(made[260:], start=260):
            assert store.search("big", vectors[i], 1)[0][0].concept_id == concept.id
    check_store(root, ivf_threshold=100)
