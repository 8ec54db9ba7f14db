"""``tinyv export``: checkpoints -> a self-describing bundle.

Stages: load (resolve and read configs, hash the sources), vision (fused ONNX graph, verified
against torch), quantize (Phi-2 streamed tensor by tensor, LoRA merged, per-layer SQNR), verify
(quantized vs a streamed fp32 reference on a fixed probe), write (manifest with sizes and hashes).

Everything is written into a temporary folder beside the target and renamed at the end: an error,
a full disk or Ctrl-C leaves neither a half bundle nor stray temp files.

Memory (full size: Phi-2 2.8 B, ViT-g 1 B): each stage frees what the next does not need, so the
peak is the vision stage (the fp32 torch vision model beside its ONNX export, ~7 GB); the LLM
stages hold the quantized tensors plus one weight at a time. ``export_memory`` in the returned
dict gives the RSS at the end of each stage and the peak so far.
"""
from __future__ import annotations

import datetime
import errno
import json
import math
import os
import shutil
import tempfile
import time
from typing import Callable

import torch

from tinyv._version import __version__
from tinyv.engine import prompts
from tinyv.engine.bundle import FORMAT_VERSION, LLM_FILE, MANIFEST, TOKENIZER_FILE, file_entry, sha256_file
from tinyv.errors import TinyVError
from tinyv.engine.image import preprocess
from tinyv.engine.llm import LAYER_LINEARS, build_quant_phi, linear_names
from tinyv.engine.generate import build_prompt_embeds
from tinyv.export.memory import StageMemory, release_memory
from tinyv.kernels.quant import QuantConfig, dequantize_weight, quantize_weight, sqnr_from_sums

Progress = Callable[[str, int, int], None]  # (stage, done, total)

VISION_PRECISIONS = ("fp32", "int8")


def _quiet(stage: str, done: int, total: int) -> None:
    pass


def _hash_sources(ck, progress: Progress) -> dict:
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


BLOCK_ELEMS = 1 << 22  # weights quantized this many at a time; lm_head whole cost ~5 GB of temporaries


def quantize_llm(weights, cfg, qcfg: QuantConfig, progress: Progress = _quiet):
    """Bundle tensors of the LLM and the SQNR (dB) of every quantized Linear, streamed."""
    linears = set(linear_names(cfg.phi))
    tensors: dict[str, torch.Tensor] = {}
    sqnr: dict[str, float] = {}
    for n, target in enumerate(weights.targets, 1):
        name = target[len("phi."):]
        t = weights.get(target)
        if name.endswith(".weight") and name[: -len(".weight")] in linears:
            lin = name[: -len(".weight")]
            stored, sqnr[lin] = quantize_rows(t, qcfg)
            tensors.update({f"{lin}.{k}": v for k, v in stored.items()})
        elif name == "embed_tokens.weight":
            tensors[name] = t.to(torch.float16, copy=True).contiguous()  # a copy: no view pins the source file
        else:
            tensors[name] = t.float().contiguous().clone()
        del t
        progress("quantize", n, len(weights.targets))
    return tensors, sqnr


def quantize_rows(w: torch.Tensor, qcfg: QuantConfig) -> tuple[dict[str, torch.Tensor], float]:
    """``quantize_weight(w)`` and its ``sqnr_db``, a block of rows (``BLOCK_ELEMS`` weights) at a time.

    Rows are quantized independently, so the stored tensors are those of the whole weight; the
    SQNR's two sums are accumulated in float64 over the blocks, as ``sqnr_db`` sums them.
    """
    parts: dict[str, list[torch.Tensor]] = {}
    signal = noise = 0.0
    for rows in w.split(max(1, BLOCK_ELEMS // w.shape[1])):
        ref = rows.float()
        stored = quantize_weight(ref, qcfg)
        err = ref.double() - dequantize_weight(stored, qcfg).double()
        noise += err.pow(2).sum().item()
        signal += ref.double().pow(2).sum().item()
        for k, v in stored.items():
            parts.setdefault(k, []).append(v)
        del ref, stored, err
    return {k: torch.cat(v).contiguous() for k, v in parts.items()}, sqnr_from_sums(signal, noise)


def _sqnr_summary(sqnr: dict[str, float]) -> dict:
    finite = [v for v in sqnr.values() if math.isfinite(v)]
    worst = sorted(sqnr.items(), key=lambda kv: kv[1])[:5]
    by_kind = {}
    for kind in LAYER_LINEARS + ("lm_head",):
        vals = [v for k, v in sqnr.items() if k.endswith(kind) and math.isfinite(v)]
        if vals:
            by_kind[kind] = round(sum(vals) / len(vals), 2)
    return {
        "min": min(finite) if finite else float("inf"),
        "mean": sum(finite) / len(finite) if finite else float("inf"),
        "worst": [{"layer": k, "db": round(v, 2)} for k, v in worst],
        "mean_by_kind": by_kind,
        "per_layer": {k: round(v, 3) for k, v in sqnr.items()},
    }


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def export_bundle(
    phi2,
    vit,
    qformer,
    stage,
    out: str,
    *,
    bits: int = 4,
    group_size: int = 32,
    vision: str = "fp32",
    image_size: int | None = None,
    preset=None,
    min_sqnr: float | None = None,
    min_agreement: float | None = None,
    max_kl: float | None = None,
    steps: int = 32,
    force: bool = False,
    progress: Progress = _quiet,
) -> dict:
    """Export a bundle to ``out``; returns its manifest, plus ``export_memory`` (RSS at the end of each
    stage and the peak so far, in MB; not written to the bundle). Raises TinyVError on bad input or a
    failed gate."""
    from tinyv.export.checkpoints import open_checkpoints
    from tinyv.export.loaders import build_model
    from tinyv.export.phi_weights import PhiWeights
    from tinyv.export.quality import StreamedPhi, compare_greedy
    from tinyv.export.vision import export_vision, probe_images
    from tinyv.kernels import native

    native.check_setting()  # the quality gate runs the kernels: a mistyped TINYV_KERNELS fails before any work
    qcfg = QuantConfig(bits, group_size)
    if vision not in VISION_PRECISIONS:
        raise TinyVError(f"--vision must be one of {', '.join(VISION_PRECISIONS)}, got {vision!r}")
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not force:
        raise TinyVError(f"{out} already exists; choose another -o or pass --force to replace it")
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, MANIFEST)) and os.listdir(out):
        raise TinyVError(f"{out} is a folder that is not a tinyv bundle; tinyv will not replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tinyv-export-", dir=parent)
    t_start = time.perf_counter()
    timings = {}
    memory = StageMemory()
    try:
        t = time.perf_counter()
        progress("load", 0, 1)
        ck = open_checkpoints(phi2, vit, qformer, stage, image_size=image_size, preset=preset)
        cfg = ck.cfg
        widths = {"hidden": cfg.phi.hidden, "intermediate": cfg.phi.intermediate}
        bad = {k: v for k, v in widths.items() if v % group_size}
        if bad and bits != 16:
            raise TinyVError(f"the model's {', '.join(f'{k} {v}' for k, v in bad.items())} is not a multiple "
                             f"of --group-size {group_size}; choose another group size")
        progress("load", 1, 1)
        sources = _hash_sources(ck, progress)
        timings["load_s"] = time.perf_counter() - t
        memory.mark("load")

        # vision: fp32 torch side only (Phi-2 stays on meta), exported, then freed; the probe's
        # embeddings from the torch model and from the bundle's graph are kept for verify, which
        # then runs no vision (torch or ONNX Runtime) beside the quantized LLM
        t = time.perf_counter()
        progress("vision export", 0, 1)
        model = build_model(ck, with_phi=False)
        probe = probe_images(1, size=cfg.image_size, seed=1234)[0]
        pixels = preprocess(probe, cfg.image_size)
        ref_image = model.encode_pixels(pixels)
        vinfo = export_vision(model, tmp, precision=vision, progress=lambda msg: progress(f"vision: {msg}", 0, 1))
        del model
        release_memory()
        q_image = torch.from_numpy(_run_vision(os.path.join(tmp, vinfo["file"]), vinfo, pixels))
        release_memory()
        progress("vision export", 1, 1)
        timings["vision_s"] = time.perf_counter() - t
        memory.mark("vision")

        # LLM: streamed, quantized tensor by tensor
        t = time.perf_counter()
        from tinyv.engine.phi import PhiForCausalLM

        with torch.device("meta"):
            meta_sd = PhiForCausalLM(cfg.phi).state_dict()
        expected = {f"phi.{k}" for k in meta_sd}
        n_params = sum(v.numel() for v in meta_sd.values())
        weights = PhiWeights(ck, expected)
        tensors, sqnr = quantize_llm(weights, cfg, qcfg, progress)
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(tmp, LLM_FILE), metadata={"format": "pt", "tinyv": "llm"})
        release_memory()
        timings["quantize_s"] = time.perf_counter() - t
        memory.mark("quantize")

        # verify: quantized LLM + bundle's vision graph vs fp32 torch, streamed
        t = time.perf_counter()
        progress("verify", 0, 2)
        quant = build_quant_phi(cfg.phi, tensors, qcfg)
        ref = StreamedPhi(cfg.phi, weights)
        prompt = prompts.build_prompt(cfg.stage)
        gate = compare_greedy(
            ref, quant,
            build_prompt_embeds(ref, ck.tokenizer, prompt, ref_image),
            build_prompt_embeds(quant, ck.tokenizer, prompt, q_image),
            steps=steps,
        )
        del ref, quant, weights, tensors
        release_memory()
        progress("verify", 2, 2)
        timings["verify_s"] = time.perf_counter() - t
        memory.mark("verify")
        quality = {"sqnr_db": _sqnr_summary(sqnr), "probe_prompt": prompt, **gate}
        _check_gate(quality, min_sqnr, min_agreement, max_kl)

        # write
        progress("write", 0, 1)
        _write_tokenizer(ck, tmp)
        files = {name: file_entry(tmp, name) for name in sorted(os.listdir(tmp))}
        manifest = {
            "format_version": FORMAT_VERSION,
            "tinyv_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": cfg.to_dict(),
            "prompt": {
                "template": prompts.template_for(cfg.stage),
                "image_placeholder": prompts.IMAGE_PLACEHOLDER,
                "caption_question": prompts.caption_question(cfg.stage),
                "vqa_question": prompts.vqa_question(cfg.stage),
                "stop_strings": list(prompts.STOP_STRINGS),
            },
            "tokenizer": {"file": TOKENIZER_FILE, "eos_id": ck.tokenizer.eos_id},
            "quantization": {**qcfg.to_dict(), "bits_per_weight": qcfg.bits_per_weight(),
                             "quantized": "every Linear of Phi-2 (query_key_value, dense, fc1, fc2, lm_head); "
                                          "biases and norms fp32, embeddings fp16",
                             "llm_file": LLM_FILE, "llm_params": n_params},
            "vision": {**vinfo, "precision": vision},
            "files": files,
            "sources": sources,
            "quality": quality,
            "export_timings": {k: round(v, 2) for k, v in timings.items()},
        }
        manifest["export_timings"]["total_s"] = round(time.perf_counter() - t_start, 2)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(_jsonable(manifest), f, indent=2)
        _make_readable(tmp)
        _move_into_place(tmp, out)
        progress("write", 1, 1)
        memory.mark("write")
        return {**manifest, "export_memory": memory.summary()}
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise TinyVError(f"the disk is full while writing {out}; free space and export again") from None
        raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _run_vision(path: str, vinfo: dict, pixels: torch.Tensor):
    """The bundle's vision graph on ``pixels``; a large graph runs piece by piece, so the export
    does not hold a whole ONNX Runtime copy of ViT-g next to the quantized LLM."""
    from tinyv.engine.vision_onnx import open_session
    from tinyv.export.onnx_pieces import run_in_pieces
    from tinyv.export.vision import WHOLE_RUN_BYTES

    data = vinfo.get("data_file")
    if data and os.path.getsize(os.path.join(os.path.dirname(path), data)) > WHOLE_RUN_BYTES:
        return run_in_pieces(path, {vinfo["input"]: pixels.numpy()})[0]
    session = open_session(path)
    try:
        return session.run(None, {vinfo["input"]: pixels.numpy()})[0]
    finally:
        del session


def _check_gate(q: dict, min_sqnr, min_agreement, max_kl) -> None:
    fails = []
    if min_sqnr is not None and q["sqnr_db"]["min"] < min_sqnr:
        w = q["sqnr_db"]["worst"][0]
        fails.append(f"layer SQNR {w['db']:.1f} dB at {w['layer']} < {min_sqnr} dB")
    if min_agreement is not None and q["token_agreement"] < min_agreement:
        fails.append(f"greedy agreement {q['token_agreement']:.1%} < {min_agreement:.1%}")
    if max_kl is not None and q["kl_mean"] > max_kl:
        fails.append(f"mean KL {q['kl_mean']:.4f} > {max_kl}")
    if fails:
        raise TinyVError("quality gate failed: " + "; ".join(fails) + " (no bundle written; try more bits "
                         "or a smaller --group-size)")


def _write_tokenizer(ck, folder: str) -> None:
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
