"""``tinyv export``: checkpoints -> a self-describing bundle.

Stages (``export.stages``, one function each): load (resolve and read configs, hash the sources),
vision (fused ONNX graph, verified against torch), quantize (Phi-2 streamed tensor by tensor,
LoRA merged, per-layer SQNR), verify (quantized vs a streamed fp32 reference on a fixed probe,
then the quality gate), write (manifest with sizes and hashes).

Everything is written into a temporary folder beside the target and renamed at the end: an error,
a full disk or Ctrl-C leaves neither a half bundle nor stray temp files, and the folders of an
export that was killed are removed by the next one (``export.staging``).

Memory (full size: Phi-2 2.8 B, ViT-g 1 B): each stage frees what the next does not need, so the
peak is the vision stage (the fp32 torch vision model beside its ONNX export, ~7 GB); the LLM
stages hold the quantized tensors plus one weight at a time. ``export_memory`` in the returned
dict gives the RSS at the end of each stage and the peak so far.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

from tinyv.errors import TinyVError
from tinyv.export.memory import StageMemory, release_memory
from tinyv.export.quality import check_gate
from tinyv.export.staging import check_target, staging_folder
from tinyv.export.stages import (
    Progress,
    export_and_probe_vision,
    load_sources,
    measure_quality,
    quantize_and_save_llm,
    write_bundle,
)
from tinyv.kernels.quant import QuantConfig

VISION_PRECISIONS = ("fp32", "int8")


def _quiet(stage: str, done: int, total: int) -> None:
    pass


def export_bundle(
    phi2,
    vit,
    qformer,
    stage,
    out: str,
    *,
    bits: int = 4,
    group_size: int = 32,
    vision: str = "int8",
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
    from tinyv.kernels import native

    native.check_setting()  # the quality gate runs the kernels: a mistyped TINYV_KERNELS fails before any work
    qcfg = QuantConfig(bits, group_size)
    if vision not in VISION_PRECISIONS:
        raise TinyVError(f"--vision must be one of {', '.join(VISION_PRECISIONS)}, got {vision!r}")
    out = check_target(out, force)
    log = _StageLog()
    with staging_folder(out) as tmp:
        with log.stage("load"):
            ck, sources = load_sources(phi2, vit, qformer, stage, image_size=image_size, preset=preset, qcfg=qcfg,
                                       progress=progress)
        with log.stage("vision"):
            vis = export_and_probe_vision(ck, tmp, vision, progress)
        with log.stage("quantize"):
            llm = quantize_and_save_llm(ck, tmp, qcfg, progress)
        with log.stage("verify"):
            quality = measure_quality(ck, qcfg, llm, vis, steps, progress)
            n_params = llm.n_params
            del llm  # the quantized tensors and the fp32 reader: writing needs neither
        check_gate(quality, min_sqnr, min_agreement, max_kl)
        manifest = write_bundle(tmp, out, ck, qcfg, n_params=n_params, vision=vis.info, sources=sources,
                                quality=quality, timings=log.export_timings, progress=progress)
        log.memory.mark("write")
    return {**manifest, "export_memory": log.memory.summary()}


class _StageLog:
    """Seconds and memory at the end of each stage: the manifest's ``export_timings`` and the
    returned ``export_memory``."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.memory = StageMemory()

    @contextmanager
    def stage(self, name: str):
        """Time the block as stage ``name``; at its end hand what it freed back to the OS, then
        note the RSS."""
        t = time.perf_counter()
        yield
        release_memory()
        self.seconds[name] = time.perf_counter() - t
        self.memory.mark(name)

    def export_timings(self) -> dict:
        """Seconds per stage so far and in total, rounded for the manifest."""
        timings = {f"{name}_s": round(s, 2) for name, s in self.seconds.items()}
        timings["total_s"] = round(time.perf_counter() - self.start, 2)
        return timings
