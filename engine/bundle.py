"""A bundle: a directory with ``manifest.json``, the tokenizer, ``vision.onnx`` and the LLM weights.

The manifest describes itself (format version, model config, prompt, quantization recipe,
every file with its size and sha256, the source checkpoints' hashes, quality figures).
``read_manifest`` rejects a bundle from an unknown format, a manifest naming anything but plain
files in the bundle folder, a file linked from outside it, or a missing, truncated or (with
``verify=True``) altered file. ``load_bundle`` is where a bundle's name is resolved: a local
folder, or a hub name that ``hub.py`` fetches and checks the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

from tinyv.errors import TinyVError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LLM_FILE = "llm.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str, error: str):
    """The JSON value in the file at ``path``.

    A file that cannot be read or parsed raises TinyVError with ``error`` formatted with ``path``
    and ``reason`` (what went wrong), e.g. ``"{path} is not readable JSON ({reason})"``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise TinyVError(error.format(path=path, reason=e)) from None


def file_entry(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


# characters a bundle file name may have: a plain name in the bundle folder, nothing a shell,
# a glob (hub downloads match names as patterns) or a path would read differently
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Bundle:
    """A bundle found and checked: its folder, its manifest, and the name it was asked for by."""

    folder: str
    manifest: dict
    name: str
    commit: str | None = None  # the hub commit, for a bundle fetched from the Hugging Face Hub


def load_bundle(spec, verify: bool = False) -> Bundle:
    """The bundle ``spec`` names, checked: a local folder, or ``hf://owner/repo[@revision]`` (or a
    bare ``owner/repo`` that is no local path) fetched into the Hugging Face cache.

    Sizes are always checked; sha256 with ``verify``, and for a hub bundle once per downloaded
    revision in any case (``engine/hub.py``). This is the one place bundle names are resolved.
    """
    from tinyv.engine import hub  # a hub name needs huggingface_hub; a local folder does not

    spec = os.fspath(spec)
    name = hub.parse_hub_name(spec)
    if name is None:
        return Bundle(spec, read_manifest(spec, verify=verify), spec)
    return hub.fetch_bundle(name, verify=verify)


def read_manifest(bundle: str, verify: bool = False) -> dict:
    """The manifest of the local folder ``bundle`` after checking its files (sizes always, sha256
    if ``verify``); every file must lie inside the folder once links are followed."""
    bundle = os.fspath(bundle)
    if not os.path.exists(bundle):
        raise TinyVError(f"bundle not found: {bundle} (make one with `tinyv export -o {bundle}`)")
    if not os.path.isdir(bundle):
        raise TinyVError(f"{bundle} is a file; a bundle is the folder `tinyv export` writes")
    path = os.path.join(bundle, MANIFEST)
    if not os.path.exists(path):
        raise TinyVError(f"{bundle} has no {MANIFEST}: it is not a tinyv bundle (or an export was cut short)")
    manifest = check_manifest(read_json(path, "{path} is not readable JSON ({reason}); re-export the bundle"), bundle)
    check_files(bundle, manifest, verify=verify)
    return manifest


def check_manifest(manifest, bundle: str) -> dict:
    """``manifest`` if it is of this format and names only plain files inside the bundle, each with
    a size and a sha256, and every file the engine opens among them; else a TinyVError."""
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise TinyVError(
            f"{bundle} is a bundle of format {version!r}; this tinyv reads format {FORMAT_VERSION}: "
            "re-export it with this version of tinyv"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise TinyVError(f"{bundle}/{MANIFEST} lists no files; re-export the bundle")
    for name, entry in files.items():
        if not _PLAIN_NAME.fullmatch(name) or name == MANIFEST:
            raise TinyVError(f"{bundle}/{MANIFEST} names a file outside the bundle or not a plain file name: {name!r}; "
                             "a bundle lists only files in its own folder")
        if (not isinstance(entry, dict) or type(entry.get("size")) is not int or entry["size"] < 0
                or not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"])):
            raise TinyVError(f"{bundle}/{MANIFEST}: the entry of {name} needs a size and a sha256; re-export the bundle")
    for name in _opened_files(manifest):
        if name not in files:
            raise TinyVError(f"{bundle}/{MANIFEST} refers to {name!r}, which it does not list with a size and sha256; "
                             "re-export the bundle")
    return manifest


def _opened_files(manifest: dict) -> list:
    """The names the engine opens, wherever the manifest gives them (each must be a listed file)."""
    def field(section, key, default=None):
        part = manifest.get(section)
        return part.get(key, default) if isinstance(part, dict) else default

    names = [field("tokenizer", "file", TOKENIZER_FILE), field("vision", "file"),
             field("quantization", "llm_file", LLM_FILE)]
    data = field("vision", "data_file")
    return names + ([data] if data is not None else [])


def check_files(bundle: str, manifest: dict, verify: bool = False, root: str | None = None,
                remedy: str | None = None) -> None:
    """Each listed file of ``bundle`` is a regular file inside ``root`` with its size (and sha256 if
    ``verify``). ``remedy`` (with ``{path}``, the file's real path) says what to do about a bad one."""
    inside = os.path.realpath(root if root is not None else bundle)
    for name, entry in manifest["files"].items():
        fpath = os.path.join(bundle, name)
        real = os.path.realpath(fpath)
        if not _within(inside, real):
            raise TinyVError(f"{bundle}/{name} is a link to {real}, outside the bundle: a bundle's files must be in its "
                             "folder (copy the file in instead of linking it)")
        if not os.path.isfile(fpath):
            raise TinyVError(f"{bundle} is missing {name}; re-export the bundle")
        size = os.path.getsize(fpath)
        fix = remedy.format(path=real) if remedy else None
        if size != entry["size"]:
            raise TinyVError(
                f"{bundle}/{name} has {size} bytes but the manifest says {entry['size']}: the file is "
                f"truncated or replaced; {fix or 're-export or re-copy the bundle'}"
            )
        if verify:
            check_sha256(bundle, name, entry, fix or "re-export it")


def _within(folder: str, path: str) -> bool:
    try:
        return os.path.commonpath([folder, path]) == folder
    except ValueError:  # another drive (Windows)
        return False


def check_sha256(bundle: str, name: str, entry: dict, remedy: str = "re-export it") -> None:
    if sha256_file(os.path.join(bundle, name)) != entry["sha256"]:
        raise TinyVError(f"{bundle}/{name} does not match its sha256 in the manifest: it was altered; {remedy}")


def format_manifest(m: dict) -> str:
    """The manifest as a few readable lines (``tinyv info``)."""
    cfg, q, v = m["model"], m["quantization"], m["vision"]
    phi = cfg["phi"]
    lines = [
        f"tinyv bundle, format {m['format_version']}, written by tinyv {m['tinyv_version']} on {m.get('created', '?')}",
        f"model: TinyGPT-V stage {cfg['stage']}, {v['image_size']} px, Phi-2 {phi['layers']} layers x {phi['hidden']}, "
        f"vocab {phi['vocab_size']}",
        f"LLM: {q['bits']}-bit" + (f" groups of {q['group_size']} ({q['scheme']})" if q["bits"] != 16 else " (fp16)")
        + f", {q['bits_per_weight']:.2f} bits/weight",
        f"vision: {v['precision']} ONNX, cosine vs fp32 {v['verify']['cosine_min']:.6f}, "
        f"max abs error {v['verify']['max_abs_err']:.3g}",
        f"prompt: {m['prompt']['template']!r}, stops at {m['prompt']['stop_strings']}",
    ]
    qual = m.get("quality", {})
    if qual:
        s = qual.get("sqnr_db", {})
        lines.append(
            f"quality vs fp32: layer SQNR min {s.get('min', float('nan')):.1f} dB (mean {s.get('mean', float('nan')):.1f}), "
            f"KL mean {qual.get('kl_mean', float('nan')):.4f} max {qual.get('kl_max', float('nan')):.4f}, "
            f"greedy agreement {qual.get('token_agreement', float('nan')):.1%} over {qual.get('steps', '?')} tokens"
        )
    lines.append("files:")
    for name, e in sorted(m["files"].items()):
        lines.append(f"  {name:<24} {e['size'] / 1e6:10.2f} MB  sha256 {e['sha256'][:16]}…")
    src = m.get("sources", {})
    if src:
        lines.append("exported from:")
        for part, files in src.items():
            for f in files:
                lines.append(f"  {part:<8} {f['name']}  sha256 {f['sha256'][:16]}…")
    return "\n".join(lines)
