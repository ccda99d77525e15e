"""First-run weight downloads against a local HTTP server: resume, checksums, clear failures."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine import weights
from engine.errors import MissingWeightError
from engine.settings import EngineSettings

MIB = 1 << 20


@dataclass
class FakeRelease:
    """What the local server serves, and what it saw."""

    body: bytes = field(default_factory=lambda: os.urandom(3 * MIB + 123))
    cut_after: int | None = None  # close the connection after this many body bytes, once
    honour_range: bool = True
    ranges: list[str | None] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def release() -> Iterator[FakeRelease]:
    state = FakeRelease()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            wanted = self.headers.get("Range")
            state.ranges.append(wanted)
            start = 0
            if wanted and state.honour_range:
                start = int(wanted.removeprefix("bytes=").split("-")[0])
                if start >= len(state.body):
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(state.body) - 1}/*")
            else:
                self.send_response(200)
            payload = state.body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if state.cut_after is not None:
                payload, state.cut_after = payload[: state.cut_after], None
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def test_interrupted_download_resumes_where_it_stopped(release: FakeRelease, tmp_path: Path):
    dest = tmp_path / "models" / "fake.pt"
    release.cut_after = int(1.5 * MIB)
    with pytest.raises(MissingWeightError) as info:
        weights.download(f"{release.url}/fake.pt", dest, how="put it there.")
    message = str(info.value)
    assert "\n" not in message and "'fake.pt'" in message and "--profile tiny" in message
    part = dest.with_name("fake.pt.part")
    assert not dest.exists() and MIB <= part.stat().st_size < len(release.body)
    kept = part.stat().st_size

    assert weights.download(f"{release.url}/fake.pt", dest, how="") == dest
    assert release.ranges == [None, f"bytes={kept}-"]  # the second request asked for the rest
    assert dest.read_bytes() == release.body and not part.exists()
    recorded = weights.recorded_checksums(dest.parent)
    assert recorded == {"fake.pt": hashlib.sha256(release.body).hexdigest()}


def test_server_that_ignores_range_sends_it_all_again(release: FakeRelease, tmp_path: Path):
    dest = tmp_path / "fake.pt"
    dest.with_name("fake.pt.part").write_bytes(b"stale bytes from another version")
    release.honour_range = False
    weights.download(f"{release.url}/fake.pt", dest, how="")
    assert dest.read_bytes() == release.body


def test_wrong_checksum_is_refused_and_deleted(release: FakeRelease, tmp_path: Path):
    dest = tmp_path / "fake.pt"
    with pytest.raises(MissingWeightError, match="does not match its checksum") as info:
        weights.download(f"{release.url}/fake.pt", dest, how="get it by hand.", sha256="0" * 64)
    assert "\n" not in str(info.value)
    assert not dest.exists() and not dest.with_name("fake.pt.part").exists()
    assert weights.recorded_checksums(tmp_path) == {}

    # A file downloaded once is held to its recorded checksum when it is fetched again.
    weights.download(f"{release.url}/fake.pt", dest, how="")
    dest.unlink()
    release.body = os.urandom(MIB)  # the server now serves different bytes under that name
    with pytest.raises(MissingWeightError, match="does not match its checksum"):
        weights.download(f"{release.url}/fake.pt", dest, how="")
    assert not dest.exists()


def test_detector_first_run_goes_through_the_resumable_download(
    release: FakeRelease, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    for name in ("HF_HUB_OFFLINE", "YOLO_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(weights, "ULTRALYTICS_RELEASE_URL", release.url)
    settings = EngineSettings(data_dir=tmp_path, offline=False)
    path = weights.detector_weight("yolov8s-worldv2.pt", settings)
    assert path == tmp_path / "models" / "yolov8s-worldv2.pt"
    assert path.read_bytes() == release.body
    # The size is announced before the bytes come.
    assert "downloading yolov8s-worldv2.pt (3 MB) once into" in capsys.readouterr().err
    # Cached: no second request.
    assert weights.detector_weight("yolov8s-worldv2.pt", settings) == path
    assert len(release.ranges) == 1


def test_unreachable_server_is_one_line_pointing_to_the_tiny_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in ("HF_HUB_OFFLINE", "YOLO_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(weights, "ULTRALYTICS_RELEASE_URL", "http://127.0.0.1:9")  # discard port
    settings = EngineSettings(data_dir=tmp_path, offline=False)
    with pytest.raises(MissingWeightError) as info:
        weights.detector_weight("yolov8s-worldv2.pt", settings)
    message = str(info.value)
    assert "\n" not in message and "--profile tiny" in message
    assert "Could not download 'yolov8s-worldv2.pt'" in message


def test_offline_errors_point_to_the_tiny_profile(tmp_path: Path):
    settings = EngineSettings(data_dir=tmp_path, offline=True)
    with pytest.raises(MissingWeightError, match="--profile tiny"):
        weights.detector_weight("yolov8s-worldv2.pt", settings)
    with pytest.raises(MissingWeightError, match="--profile tiny"):
        weights.clip_checkpoint("ViT-B-32", "openai", settings, "RAPBOT_CLIP_PRETRAINED")
