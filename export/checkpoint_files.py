"""Reading checkpoint files: torch pickles (safely), safetensors, and a Phi-2 folder.

Each reader gives a ``Source``: the file's keys and a ``get(key)`` that reads one tensor, so a
loader can convert and assign tensors as they are read and full-size checkpoints never sit in
RAM twice. Pickles are loaded with ``weights_only=True``: a checkpoint is untrusted input.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Callable

import torch

from tinyv.engine.bundle import read_json
from tinyv.engine.config import PhiConfig
from tinyv.errors import TinyVError
from tinyv.export.key_tables import sniff


class Source:
    """Lazily readable tensors of one file: ``keys`` and ``get(key)``."""

    def __init__(self, label: str, keys: list[str], get: Callable[[str], torch.Tensor]):
        self.label, self.keys, self.get = label, keys, get


def load_pickle(path: str, label: str) -> dict:
    """``torch.load`` with ``weights_only=True`` (checkpoints are untrusted) and mmap when possible."""
    def _load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return _load(True)
        except RuntimeError as e:
            if zipfile.is_zipfile(path) or "mmap" not in str(e):
                raise  # a real problem, not the legacy format that mmap cannot read
            return _load(False)  # legacy (pre-1.6) format cannot be mmap'd
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(str(e))
        if "GLOBAL" in reason or "Unsupported" in reason:
            what = "holds pickled Python objects, not just tensors" if "GLOBAL" in reason else (
                "uses pickle instructions a plain tensor checkpoint does not need")
            raise TinyVError(
                f"{label}: refusing to load {path}: it {what} ({reason}); checkpoints are untrusted, "
                "so tinyv loads them with weights_only=True and nothing in the file was executed"
            ) from None
        raise TinyVError(f"{label}: {path} is not a readable torch checkpoint ({reason})") from None
    except Exception as e:  # truncated zip, garbage bytes, ...: torch raises many types
        raise TinyVError(
            f"{label}: {path} is not a complete torch checkpoint ({_first_sentence(e)}); "
            "is the download complete? re-download it"
        ) from None


def _first_sentence(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(". ")[0].rstrip(".")


def _unpickler_reason(message: str) -> str:
    """The line of torch's long weights_only message that says what was refused."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln:
            return ln.replace("WeightsUnpickler error: ", "")
    for ln in lines:
        if ln.startswith("WeightsUnpickler error:"):
            return ln.replace("WeightsUnpickler error: ", "")
    return lines[-1] if lines else "unreadable pickle"


def _state_dict_of(obj, label: str, path: str, wrapped: bool) -> dict:
    """The tensor dict inside a loaded pickle: plain, or under 'model' for BLIP-2/stage files."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif wrapped:
        raise TinyVError(
            f"{label}: {path} has no 'model' dict; expected a checkpoint like "
            f"{'blip2_pretrained_flant5xxl.pth' if label == '--qformer' else 'TinyGPT-V_for_Stage4.pth'}"
            f"{sniff(list(obj)) if isinstance(obj, dict) else ''}"
        )
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TinyVError(f"{label}: {path} is not a state dict of tensors")
    return obj


def pickle_source(path: str, label: str, wrapped: bool) -> tuple[Source, dict]:
    """The tensors of a torch pickle (under its 'model' dict if ``wrapped``) and the pickle's other
    entries (a stage file's 'config', ...) when it is wrapped."""
    obj = load_pickle(path, label)
    sd = _state_dict_of(obj, label, path, wrapped)
    extra = obj if isinstance(obj, dict) and obj.get("model") is sd else {}
    return Source(f"{label} ({os.path.basename(path)})", list(sd), sd.__getitem__), extra


def _safetensors_source(paths: list[str], label: str) -> Source:
    """Tensors of one or more safetensors files, each copied out of its file and the file unmapped.

    A tensor read from a mapped file is a view that keeps the whole mapping alive, and every page
    read through a mapping counts as the process's memory while it is mapped: a streamed Phi-2
    (2 GB shards) would hold a shard or more resident beside whatever the reader keeps.
    """
    from safetensors import safe_open

    owner: dict[str, str] = {}
    for p in paths:
        try:
            with safe_open(p, framework="pt") as h:  # reads the header only
                for k in h.keys():
                    owner[k] = p
        except Exception as e:  # SafetensorError and OSError
            raise TinyVError(f"{label}: cannot read {p} ({e}); is the download complete?") from None

    def get(key: str) -> torch.Tensor:
        path = owner[key]
        try:
            with safe_open(path, framework="pt") as h:
                return h.get_tensor(key).clone()
        except Exception as e:
            raise TinyVError(f"{label}: cannot read {key} from {path} ({e}); is the file complete?") from None

    return Source(label, list(owner), get)


def phi2_source(folder: str, label: str = "--phi2") -> Source:
    """The Phi-2 folder's weights: single or sharded safetensors, or pytorch_model.bin."""
    files = sorted(os.listdir(folder))
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = sorted(set(read_json(index, label + ": cannot read {path}: {reason}")["weight_map"].values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
        if missing:
            raise TinyVError(f"{label}: {folder} lacks shard(s) {', '.join(missing)} named in its index")
        return _safetensors_source([os.path.join(folder, s) for s in shards], label)
    st = [f for f in files if f.endswith(".safetensors")]
    if st:
        return _safetensors_source([os.path.join(folder, f) for f in st], label)
    bins = [f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")]
    if bins:
        sds = [pickle_source(os.path.join(folder, b), label, wrapped=False)[0] for b in bins]
        table = {k: s for s in sds for k in s.keys}
        return Source(label, list(table), lambda k: table[k].get(k))
    raise TinyVError(f"{label}: {folder} has no model.safetensors or pytorch_model.bin")


def read_phi2_config(folder: str) -> PhiConfig:
    """The ``PhiConfig`` of a Phi-2 folder's ``config.json``."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise TinyVError(f"--phi2: {folder} has no config.json; pass a Phi-2 model folder")
    return PhiConfig.from_hf_config(read_json(path, "--phi2: cannot read {path}: {reason}"))
