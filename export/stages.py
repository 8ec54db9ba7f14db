"""The stages of ``tinyv export``, one function each, in the order ``bundle.export_bundle`` runs them:

    load_sources -> export_and_probe_vision -> quantize_and_save_llm -> measure_quality -> write_bundle

Each writes into the export's staging folder. What one stage hands to the next is small, except
the quantized LLM and its fp32 reader, which ``measure_quality`` is the last to use.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch

from tinyv.engine import prompts
from tinyv.engine.bundle import LLM_FILE, MANIFEST, TOKENIZER_FILE, file_entry, sha256_file
from tinyv.engine.generate import build_prompt_embeds
from tinyv.engine.image import preprocess
from tinyv.engine.llm import build_quant_phi
from tinyv.kernels import native
from tinyv.engine.phi import PhiForCausalLM
from tinyv.engine.vision_onnx import open_session
from tinyv.errors import TinyVError
from tinyv.export import vision as vision_export
from tinyv.export.checkpoints import Checkpoints, open_checkpoints
from tinyv.export.llm_quant import quantize_llm, sqnr_summary
from tinyv.export.loaders import build_model
from tinyv.export.manifest import jsonable, make_manifest
from tinyv.export.memory import release_memory
from tinyv.export.onnx_pieces import run_in_pieces
from tinyv.export.phi_weights import PhiWeights
from tinyv.export.quality import StreamedPhi, compare_greedy
from tinyv.kernels.quant import QuantConfig

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def load_sources(phi2, vit, qformer, stage, *, image_size, preset, qcfg: QuantConfig,
                 progress: Progress) -> tuple[Checkpoints, dict]:
    """Resolve and read the sources (configs, tokenizer, stage file); the manifest's hashes of them."""
    progress("load", 0, 1)
    ck = open_checkpoints(phi2, vit, qformer, stage, image_size=image_size, preset=preset)
    widths = {"hidden": ck.cfg.phi.hidden, "intermediate": ck.cfg.phi.intermediate}
    bad = {k: v for k, v in widths.items() if v % qcfg.group_size}
    if bad and qcfg.bits != 16:
        raise TinyVError(f"the model's {', '.join(f'{k} {v}' for k, v in bad.items())} is not a multiple "
                         f"of --group-size {qcfg.group_size}; choose another group size")
    progress("load", 1, 1)
    return ck, _hash_sources(ck, progress)


def _hash_sources(ck: Checkpoints, progress: Progress) -> dict:
    files = ck.source_files()
    total = sum(len(v) for v in files.values())
    out, done = {}, 0
    for part, paths in files.items():
        out[part] = []
        for p in paths:
            out[part].append({"name": os.path.basename(p), "size": os.path.getsize(p), "sha256": sha256_file(p)})
            done += 1
            progress("hash sources", done, total)
    return out


@dataclass
class ExportedVision:
    """The bundle's vision graph, and one probe image's embeddings [1, Q, hidden] through it and
    through the fp32 torch model (the quality check feeds them to the quantized and fp32 LLMs)."""

    info: dict  # the manifest's "vision" entry
    torch_embeds: torch.Tensor
    graph_embeds: torch.Tensor


def export_and_probe_vision(ck: Checkpoints, folder: str, precision: str, progress: Progress) -> ExportedVision:
    """Export the vision graph into ``folder`` and embed a probe image with it and with torch.

    Only the vision side of the fp32 model is built (Phi-2 stays on meta) and it is freed before
    the graph runs: the quality check later runs no vision model (torch or ONNX Runtime) beside
    the quantized LLM.
    """
    progress("vision export", 0, 1)
    model = build_model(ck, with_phi=False)
    probe = vision_export.probe_images(1, size=ck.cfg.image_size, seed=1234)[0]
    pixels = preprocess(probe, ck.cfg.image_size)
    torch_embeds = model.encode_pixels(pixels)
    info = vision_export.export_vision(model, folder, precision=precision,
                                       progress=lambda msg: progress(f"vision: {msg}", 0, 1))
    del model
    release_memory()
    graph_embeds = torch.from_numpy(_run_bundle_vision(os.path.join(folder, info["file"]), info, pixels))
    progress("vision export", 1, 1)
    return ExportedVision({**info, "precision": precision}, torch_embeds, graph_embeds)


def _run_bundle_vision(path: str, info: dict, pixels: torch.Tensor):
    """The bundle's vision graph on ``pixels``; a large graph runs piece by piece, so the export
    does not hold a whole ONNX Runtime copy of ViT-g next to the quantized LLM."""
    data = info.get("data_file")
    if data and os.path.getsize(os.path.join(os.path.dirname(path), data)) > vision_export.WHOLE_RUN_BYTES:
        return run_in_pieces(path, {info["input"]: pixels.numpy()})[0]
    session = open_session(path)
    try:
        return session.run(None, {info["input"]: pixels.numpy()})[0]
    finally:
        del session


@dataclass
class QuantizedLLM:
    """The bundle's LLM tensors (already in ``llm.safetensors``) and what the quality check needs."""

    tensors: dict[str, torch.Tensor]
    fp32: PhiWeights  # reads the fp32 weights again, for the streamed reference
    sqnr: dict[str, float]  # Linear name -> SQNR (dB)
    n_params: int


def quantize_and_save_llm(ck: Checkpoints, folder: str, qcfg: QuantConfig, progress: Progress) -> QuantizedLLM:
    """Quantize Phi-2 tensor by tensor as it is read from the checkpoints; write ``llm.safetensors``."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        meta_sd = PhiForCausalLM(ck.cfg.phi).state_dict()
    weights = PhiWeights(ck, {f"phi.{k}" for k in meta_sd})
    tensors, sqnr = quantize_llm(weights, ck.cfg, qcfg, progress)
    save_file(tensors, os.path.join(folder, LLM_FILE), metadata={"format": "pt", "tinyv": "llm"})
    return QuantizedLLM(tensors, weights, sqnr, sum(v.numel() for v in meta_sd.values()))


def measure_quality(ck: Checkpoints, qcfg: QuantConfig, llm: QuantizedLLM, vision: ExportedVision, steps: int,
                    progress: Progress) -> dict:
    """The manifest's ``quality``: every Linear's SQNR, and the quantized LLM on the bundle's image
    embeddings against the fp32 LLM (streamed from the checkpoints) on torch's, over ``steps``
    greedy tokens of the caption prompt."""
    progress("verify", 0, 2)
    kernels = native.open_kernels()  # the gate measures what the engine will run: the compiled kernels
    quant = build_quant_phi(ck.cfg.phi, llm.tensors, qcfg, kernels=kernels)
    ref = StreamedPhi(ck.cfg.phi, llm.fp32)
    prompt = prompts.build_prompt(ck.cfg.stage)
    gate = compare_greedy(
        ref, quant,
        build_prompt_embeds(ref, ck.tokenizer, prompt, vision.torch_embeds),
        build_prompt_embeds(quant, ck.tokenizer, prompt, vision.graph_embeds),
        steps=steps,
    )
    progress("verify", 2, 2)
    return {"sqnr_db": sqnr_summary(llm.sqnr), "probe_prompt": prompt, **gate}


def write_bundle(folder: str, out: str, ck: Checkpoints, qcfg: QuantConfig, *, n_params: int, vision: dict,
                 sources: dict, quality: dict, timings: Callable[[], dict], progress: Progress) -> dict:
    """Complete the staged bundle in ``folder`` (tokenizer, manifest) and rename it to ``out``.

    ``timings()`` gives the manifest's ``export_timings``, read once every file is hashed.
    Returns the manifest as written.
    """
    progress("write", 0, 1)
    write_tokenizer(ck, folder)
    files = {name: file_entry(folder, name) for name in sorted(os.listdir(folder))}
    manifest = make_manifest(ck, qcfg, n_params=n_params, vision=vision, files=files, sources=sources,
                             quality=quality, timings=timings())
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(jsonable(manifest), f, indent=2)
    _make_readable(folder)
    _move_into_place(folder, out)
    progress("write", 1, 1)
    return manifest


def write_tokenizer(ck: Checkpoints, folder: str) -> None:
    """The Phi-2 folder's ``tokenizer.json``, copied into the bundle."""
    src = os.path.join(ck.phi2_dir, TOKENIZER_FILE)
    if os.path.exists(src):
        shutil.copyfile(src, os.path.join(folder, TOKENIZER_FILE))
    else:  # a folder with vocab.json + merges.txt only: save what was built from them
        ck.tokenizer._tok.save(os.path.join(folder, TOKENIZER_FILE))


def _make_readable(folder: str) -> None:
    """mkdtemp makes a private folder; a bundle gets the usual permissions (umask applied)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _move_into_place(tmp: str, out: str) -> None:
    """Rename ``tmp`` to ``out``; a bundle already there is replaced, or put back if that fails."""
    if not os.path.exists(out):
        os.rename(tmp, out)
        return
    old = tempfile.mkdtemp(prefix=".tinyv-old-", dir=os.path.dirname(out))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)  # put the previous bundle back
        raise
    shutil.rmtree(old, ignore_errors=True)
