"""Where checkpoint files come from: local paths, Hugging Face Hub names, or URLs.

Local paths always work and never touch the network. For connected users:

* ``hf://owner/repo`` (a folder, e.g. a Phi-2) or ``hf://owner/repo/path/in/repo`` (one file),
  optionally ``@revision`` at the end, resolved through ``huggingface_hub`` and its cache;
* ``https://…`` (BLIP-2's files live on LAVIS's storage), downloaded once into tinyv's cache;
* a short name from ``KNOWN`` (``tinygptv-stage4``, ``phi-2``, ``eva-vit-g``, ``blip2-flant5xxl``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.parse
import urllib.request

from tinyv.errors import TinyVError
from tinyv.engine.paths import cache_dir  # noqa: F401  (re-exported)

LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2"
KNOWN = {
    "tinygptv-stage1": "hf://Tyrannosaurus/TinyGPT-V/TinyGPT-V_for_Stage1.pth",
    "tinygptv-stage2": "hf://Tyrannosaurus/TinyGPT-V/TinyGPT-V_for_Stage2.pth",
    "tinygptv-stage3": "hf://Tyrannosaurus/TinyGPT-V/TinyGPT-V_for_Stage3.pth",
    "tinygptv-stage4": "hf://Tyrannosaurus/TinyGPT-V/TinyGPT-V_for_Stage4.pth",
    "phi-2": "hf://microsoft/phi-2",
    "eva-vit-g": f"{LAVIS}/eva_vit_g.pth",
    "blip2-flant5xxl": f"{LAVIS}/blip2_pretrained_flant5xxl.pth",
}
PHI2_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


def resolve(spec, what: str, folder: bool = False) -> str:
    """A local path for ``spec``; ``what`` names the option in error messages (e.g. '--vit')."""
    if spec is None:
        raise TinyVError(f"{what} is required")
    spec = os.fspath(spec)
    if os.path.exists(spec):
        if folder and not os.path.isdir(spec):
            raise TinyVError(f"{what} must be a folder (a Phi-2 model folder), got the file {spec}")
        if not folder and os.path.isdir(spec):
            raise TinyVError(f"{what} must be a checkpoint file, got the folder {spec}")
        return spec
    spec = KNOWN.get(spec, spec)
    if spec.startswith("hf://") or spec.startswith("hf:"):
        return _from_hub(spec.split(":", 1)[1].lstrip("/"), what, folder)
    if spec.startswith(("https://", "http://", "file://")):
        if folder:
            raise TinyVError(f"{what} takes a folder or an hf:// name, not a URL")
        return _from_url(spec, what)
    raise TinyVError(
        f"{what}: {spec} does not exist; give a local path, an hf://owner/repo[/file] name "
        f"or one of: {', '.join(KNOWN)}"
    )


def _from_hub(name: str, what: str, folder: bool) -> str:
    rev = None
    if "@" in name:
        name, rev = name.rsplit("@", 1)
    parts = name.split("/")
    if len(parts) < 2 or not all(parts):
        raise TinyVError(f"{what}: hub names look like hf://owner/repo or hf://owner/repo/file, got {name!r}")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if folder and filename:
        raise TinyVError(f"{what} takes a whole repository (hf://owner/repo), not a file in it")
    if not folder and not filename:
        raise TinyVError(f"{what} takes one file: hf://{repo}/FILENAME")
    try:
        import huggingface_hub
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:  # pragma: no cover - a dependency of tinyv
        raise TinyVError("resolving hub names needs the huggingface_hub package") from None
    try:
        if folder:
            path = snapshot_download(repo, revision=rev, allow_patterns=PHI2_PATTERNS)
            if not any(f.endswith(".safetensors") for f in os.listdir(path)):  # an older .bin-only repo
                path = snapshot_download(repo, revision=rev, allow_patterns=PHI2_PATTERNS + ["pytorch_model*.bin"])
            return path
        return hf_hub_download(repo, filename, revision=rev)
    except huggingface_hub.errors.LocalEntryNotFoundError:
        raise TinyVError(
            f"{what}: hf://{name}{'@' + rev if rev else ''} is not in the local Hugging Face cache and the hub cannot be "
            "reached (offline?); download it when connected, or pass a local path"
        ) from None
    except huggingface_hub.errors.HFValidationError as e:
        raise TinyVError(f"{what}: hf://{name} is not a valid hub name: {e}") from None
    except huggingface_hub.errors.HfHubHTTPError as e:
        raise TinyVError(f"{what}: cannot fetch hf://{name}: {e}") from None


def _from_url(url: str, what: str) -> str:
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    folder = os.path.join(cache_dir(), "downloads", hashlib.sha256(url.encode()).hexdigest()[:16])
    target = os.path.join(folder, name)
    if os.path.exists(target):
        return target
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as src:
            shutil.copyfileobj(src, out, length=1 << 20)
        os.replace(tmp, target)  # atomic: a cut download never looks complete
    except OSError as e:
        raise TinyVError(f"{what}: cannot download {url}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
