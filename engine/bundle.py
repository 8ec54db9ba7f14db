"""A bundle: a directory with ``manifest.json``, the tokenizer, ``vision.onnx`` and the LLM weights.

The manifest describes itself (format version, model config, prompt, quantization recipe,
every file with its size and sha256, the source checkpoints' hashes, quality figures).
``read_manifest`` rejects a bundle from an unknown format, or with a missing, truncated or
(with ``verify=True``) altered file.
"""
from __future__ import annotations

import hashlib
import json
import os

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


def read_manifest(bundle: str, verify: bool = False) -> dict:
    """The manifest of ``bundle`` after checking its files (sizes always, sha256 if ``verify``)."""
    bundle = os.fspath(bundle)
    if not os.path.exists(bundle):
        raise TinyVError(f"bundle not found: {bundle} (make one with `tinyv export -o {bundle}`)")
    if not os.path.isdir(bundle):
        raise TinyVError(f"{bundle} is a file; a bundle is the folder `tinyv export` writes")
    path = os.path.join(bundle, MANIFEST)
    if not os.path.exists(path):
        raise TinyVError(f"{bundle} has no {MANIFEST}: it is not a tinyv bundle (or an export was cut short)")
    manifest = read_json(path, "{path} is not readable JSON ({reason}); re-export the bundle")
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise TinyVError(
            f"{bundle} is a bundle of format {version!r}; this tinyv reads format {FORMAT_VERSION}: "
            "re-export it with this version of tinyv"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise TinyVError(f"{path} lists no files; re-export the bundle")
    for name, entry in files.items():
        fpath = os.path.join(bundle, name)
        if os.path.basename(name) != name:
            raise TinyVError(f"{path} names a file outside the bundle: {name!r}")
        if not os.path.isfile(fpath):
            raise TinyVError(f"{bundle} is missing {name}; re-export the bundle")
        size = os.path.getsize(fpath)
        if size != entry.get("size"):
            raise TinyVError(
                f"{bundle}/{name} has {size} bytes but the manifest says {entry.get('size')}: the file is "
                "truncated or replaced; re-export or re-copy the bundle"
            )
        if verify and sha256_file(fpath) != entry.get("sha256"):
            raise TinyVError(f"{bundle}/{name} does not match its sha256 in the manifest: it was altered; re-export it")
    return manifest


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
