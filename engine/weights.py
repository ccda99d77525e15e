"""Find model weight files: a local path, the data folder's cache, or a one-time download.

Offline (``RAPBOT_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` or ``YOLO_OFFLINE=1``) a weight that is not
already here is a :class:`MissingWeightError` with a one-line message naming the file and how to
provide it; online, downloads have timeouts and failures become the same error, so loading
never hangs and never ends in a traceback.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import urllib.request
from pathlib import Path

from engine.errors import MissingWeightError
from engine.settings import EngineSettings

log = logging.getLogger(__name__)

ULTRALYTICS_RELEASE_URL = "https://github.com/ultralytics/assets/releases/download/v8.3.0"
# Ultralytics release assets we know how to fetch by bare name.
_ULTRALYTICS_ASSET = re.compile(r"^(yolov8[nsmlx]|yolov8[smlx]-world(v2)?|yolo11[nsmlx])\.pt$")
HF_ENDPOINT = "https://huggingface.co"
# open_clip's default file names in a hub repo, safest format first.
_HF_DEFAULT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation (connect, each read), not for the whole file


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def first_line(error: object, limit: int = 300) -> str:
    """An error as one short line (messages here are shown to people, never tracebacks)."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def is_offline(settings: EngineSettings) -> bool:
    return (
        settings.offline
        or _truthy(os.environ.get("HF_HUB_OFFLINE"))
        or _truthy(os.environ.get("YOLO_OFFLINE"))
    )


def models_dir(settings: EngineSettings) -> Path:
    return Path(settings.data_dir).expanduser() / "models"


def looks_like_path(ref: str) -> bool:
    """A reference with a folder part (or ``~``) is a local file, never a download name."""
    return (
        "/" in ref or os.sep in ref or ref.startswith(("~", ".")) or Path(ref).expanduser().exists()
    )


def local_file(ref: str, what: str) -> Path:
    path = Path(ref).expanduser()
    if not path.is_file():
        raise MissingWeightError(f"{what} file not found: {path}")
    return path


def detector_weight(ref: str, settings: EngineSettings, setting: str = "RAPBOT_DETECTOR") -> Path:
    """A detector weight file: a local path, cached in ``<data_dir>/models/``, or downloaded."""
    if looks_like_path(ref):
        return local_file(ref, "Detector weight")
    cached = models_dir(settings) / ref
    if cached.is_file():
        return cached
    if not _ULTRALYTICS_ASSET.match(ref):
        raise MissingWeightError(
            f"Detector weight '{ref}' is neither a file nor a known download: "
            f"set {setting}=/path/to/weights (.pt, .onnx or .tflite)."
        )
    url = f"{ULTRALYTICS_RELEASE_URL}/{ref}"
    how = (
        f"download it from {url} and set {setting}=/path/to/{ref} "
        f"(or put it in {models_dir(settings)}/)."
    )
    if is_offline(settings):
        raise MissingWeightError(f"Model weight '{ref}' is not available offline: {how}")
    return download(url, cached, how=how)


def download(url: str, dest: Path, how: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch ``url`` into ``dest`` once, with a progress bar; atomic (temp file, then rename)."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    log.info("downloading %s to %s", url, dest)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "rapbot"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name
            ) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        if total is not None and tmp.stat().st_size != total:
            raise OSError(f"got {tmp.stat().st_size} of {total} bytes")
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException, ValueError) as error:  # URLError is an OSError
        reason = first_line(getattr(error, "reason", None) or error)
        raise MissingWeightError(f"Could not download '{dest.name}' ({reason}): {how}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def clip_checkpoint(model: str, pretrained: str, settings: EngineSettings, setting: str) -> Path:
    """The open_clip checkpoint for a pretrained tag (from the Hugging Face hub) or a local file.

    Hub downloads are cached in ``<data_dir>/models/hf``.
    """
    if looks_like_path(pretrained):
        return local_file(pretrained, f"CLIP {model} weight")
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise MissingWeightError(
            f"open_clip has no weights '{pretrained}' for {model} (known: {tags}); "
            f"set {setting}=<tag or /path/to/weights>."
        )
    hub = cfg.get("hf_hub", "")
    if hub:
        return _hf_file(hub, model, pretrained, settings, setting)
    url = cfg.get("url", "")
    name = url.rsplit("/", 1)[-1]
    cached = models_dir(settings) / "open_clip" / name
    if cached.is_file():
        return cached
    how = (
        f"download it from {url} and set {setting}=/path/to/{name} (or put it in {cached.parent}/)."
    )
    if is_offline(settings):
        raise MissingWeightError(
            f"CLIP weights {model} '{pretrained}' are not available offline: {how}"
        )
    return download(url, cached, how=how)


def _hf_file(hub: str, model: str, pretrained: str, settings: EngineSettings, setting: str) -> Path:
    # open_clip's convention: "org/repo/" = the default file names, "org/repo/file.bin" = that file.
    repo_id, filename = os.path.split(hub)
    if filename.endswith((".bin", ".pth")):
        candidates: tuple[str, ...] = (filename[:-4] + ".safetensors", filename)
    else:
        candidates = (filename,) if filename else _HF_DEFAULT_FILES
    cache_dir = models_dir(settings) / "hf"

    from huggingface_hub import hf_hub_download

    for name in candidates:  # cached copy first: costs no network, works offline
        try:
            return Path(hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure here just means "not cached"
            continue
    how = (
        f"download {candidates[0]} from {HF_ENDPOINT}/{repo_id} "
        f"and set {setting}=/path/to/{candidates[0]} "
        f"(or run once online to cache it in {cache_dir})."
    )
    if is_offline(settings):
        raise MissingWeightError(
            f"CLIP weights {model} '{pretrained}' are not available offline: {how}"
        )
    last = ""
    for name in candidates:
        try:
            return Path(
                hf_hub_download(repo_id, name, cache_dir=cache_dir, etag_timeout=DOWNLOAD_TIMEOUT_S)
            )
        except Exception as error:  # noqa: BLE001 - network, missing file, auth: all "not available"
            last = first_line(error)
    raise MissingWeightError(
        f"Could not download CLIP weights {model} '{pretrained}' ({last}): {how}"
    )
