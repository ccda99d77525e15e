"""Find model weight files: a local path, the data folder's cache, or a one-time download.

Offline (``RAPBOT_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` or ``YOLO_OFFLINE=1``) a weight that is not
already here is a :class:`MissingWeightError` with a one-line message naming the file and how to
provide it; online, downloads have timeouts and failures become the same error, so loading
never hangs and never ends in a traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import re
import sys
import urllib.error
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
        raise MissingWeightError(
            f"Model weight '{ref}' is not available offline: {how} Or, {TINY_HINT}."
        )
    return download(url, cached, how=how)


# Approximate sizes of the files the built-in profiles download, for the estimate printed
# before a first run's download (the server's Content-Length wins when it sends one).
APPROX_SIZES_MB = {
    "yolov8s-worldv2.pt": 26,  # ultralytics keeps fp16 weights: ~2 bytes a parameter
    "yolov8x-worldv2.pt": 146,
    "timm/vit_base_patch32_clip_224.openai": 605,  # CLIP ViT-B-32, fp32
    "timm/vit_large_patch14_clip_336.openai": 1711,  # CLIP ViT-L-14-336, fp32
}
# sha256 of every file downloaded here, kept next to them: a later download of the same file
# (after a deletion, on another machine with this folder copied) must match the first one.
CHECKSUMS_FILE = "SHA256SUMS"
TINY_HINT = "without a network, `--profile tiny` runs on random miniature models (no download)"


def _human(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def recorded_checksums(folder: Path) -> dict[str, str]:
    """``{file name: sha256}`` recorded in ``folder``'s checksum file (sha256sum's format)."""
    path = folder / CHECKSUMS_FILE
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) == 64 and name:
            sums[name.strip()] = digest
    return sums


def _record_checksum(folder: Path, name: str, digest: str) -> None:
    sums = recorded_checksums(folder)
    sums[name] = digest
    text = "".join(f"{d}  {n}\n" for n, d in sorted(sums.items()))
    tmp = folder / f"{CHECKSUMS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, folder / CHECKSUMS_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def download(
    url: str,
    dest: Path,
    how: str,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    sha256: str | None = None,
) -> Path:
    """Fetch ``url`` into ``dest`` once: resumable, checksum-verified, with a progress bar.

    Bytes go to ``dest.part``; an interrupted download resumes from there with an HTTP Range
    request (a server that ignores it sends the whole file again). The finished file must match
    ``sha256`` when given, else the checksum recorded for its name in the folder's
    ``SHA256SUMS`` (from an earlier download); a first download records its checksum there.
    A mismatch deletes the bad bytes and is a :class:`MissingWeightError`, as is any network
    failure (one line, ending with how to provide the file and the offline alternative).
    """
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    expected = sha256 or recorded_checksums(dest.parent).get(dest.name)
    log.info("downloading %s to %s", url, dest)
    try:
        with open(part, "ab") as out:
            fcntl.flock(out, fcntl.LOCK_EX)  # one writer per file, across processes
            if dest.is_file():  # another process finished it while we waited
                part.unlink(missing_ok=True)
                return dest
            have = out.seek(0, os.SEEK_END)
            headers = {"User-Agent": "rapbot"}
            if have:
                headers["Range"] = f"bytes={have}-"
            request = urllib.request.Request(url, headers=headers)
            try:
                response = urllib.request.urlopen(request, timeout=timeout)
            except urllib.error.HTTPError as error:
                if error.code != 416 or not have:  # 416: nothing left to fetch past ``have``
                    raise
                response = None
            with contextlib.ExitStack() as stack:
                if response is not None:
                    stack.enter_context(response)
                    if have and response.status != 206:  # Range ignored: start over
                        out.truncate(0)
                        have = 0
                    remaining = int(response.headers.get("Content-Length") or 0) or None
                    total = have + remaining if remaining is not None else None
                    estimate = total or APPROX_SIZES_MB.get(dest.name, 0) * 10**6
                    size = f" ({_human(estimate)})" if estimate else ""
                    resumed = f", resuming at {_human(have)}" if have else ""
                    print(
                        f"rapbot: downloading {dest.name}{size} once into {dest.parent}{resumed}",
                        file=sys.stderr,
                        flush=True,
                    )
                    with tqdm(
                        total=total,
                        initial=have,
                        unit="B",
                        unit_scale=True,
                        unit_divisor=1024,
                        desc=dest.name,
                    ) as bar:
                        while chunk := response.read(1 << 20):
                            out.write(chunk)
                            bar.update(len(chunk))
                    out.flush()
                    if total is not None and out.tell() != total:
                        raise OSError(f"got {out.tell()} of {total} bytes; run again to resume")
            digest = _sha256(part)
            if expected and digest != expected:
                part.unlink(missing_ok=True)
                raise MissingWeightError(
                    f"Downloaded '{dest.name}' does not match its checksum (sha256 {digest[:12]}…,"
                    f" expected {expected[:12]}…) and was deleted: {how}"
                )
            os.replace(part, dest)
            _record_checksum(dest.parent, dest.name, digest)
    except (OSError, http.client.HTTPException, ValueError) as error:  # URLError is an OSError
        with contextlib.suppress(OSError):
            if part.stat().st_size == 0:  # nothing to resume from
                part.unlink()
        reason = first_line(getattr(error, "reason", None) or error)
        raise MissingWeightError(
            f"Could not download '{dest.name}' ({reason}): {how} Or, {TINY_HINT}."
        ) from None
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
            f"CLIP weights {model} '{pretrained}' are not available offline: {how} Or, {TINY_HINT}."
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
            f"CLIP weights {model} '{pretrained}' are not available offline: {how} Or, {TINY_HINT}."
        )
    last = ""
    for name in candidates:
        estimate = APPROX_SIZES_MB.get(repo_id)
        size = f" (~{_human(estimate * 10**6)})" if estimate else ""
        # huggingface_hub resumes an interrupted download and checks it against the hub's etag.
        print(f"rapbot: downloading {repo_id}/{name}{size} once into {cache_dir}", file=sys.stderr)
        try:
            return Path(
                hf_hub_download(repo_id, name, cache_dir=cache_dir, etag_timeout=DOWNLOAD_TIMEOUT_S)
            )
        except Exception as error:  # noqa: BLE001 - network, missing file, auth: all "not available"
            last = first_line(error)
    raise MissingWeightError(
        f"Could not download CLIP weights {model} '{pretrained}' ({last}): {how} Or, {TINY_HINT}."
    )
