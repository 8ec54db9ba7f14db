"""The manifest ``tinyv export`` writes into a bundle (``engine.bundle.read_manifest`` reads it)."""
from __future__ import annotations

import datetime
import math

from tinyv._version import __version__
from tinyv.engine import prompts
from tinyv.engine.bundle import FORMAT_VERSION, LLM_FILE, TOKENIZER_FILE
from tinyv.kernels.quant import QuantConfig


def make_manifest(ck, qcfg: QuantConfig, *, n_params: int, vision: dict, files: dict, sources: dict,
                  quality: dict, timings: dict) -> dict:
    """The manifest of a bundle exported from ``ck`` (a ``Checkpoints``), in the order it is written."""
    cfg = ck.cfg
    fmt = prompts.PromptFormat.for_stage(cfg.stage)
    return {
        "format_version": FORMAT_VERSION,
        "tinyv_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": cfg.to_dict(),
        "prompt": {
            "template": fmt.template,
            "image_placeholder": prompts.IMAGE_PLACEHOLDER,
            "caption_question": fmt.caption_question,
            "vqa_question": fmt.vqa_question,
            "stop_strings": list(fmt.stop_strings),
        },
        "tokenizer": {"file": TOKENIZER_FILE, "eos_id": ck.tokenizer.eos_id},
        "quantization": {**qcfg.to_dict(), "bits_per_weight": qcfg.bits_per_weight(),
                         "quantized": "every Linear of Phi-2 (query_key_value, dense, fc1, fc2, lm_head); "
                                      "biases and norms fp32, embeddings fp16",
                         "llm_file": LLM_FILE, "llm_params": n_params},
        "vision": vision,
        "files": files,
        "sources": sources,
        "quality": quality,
        "export_timings": timings,
    }


def jsonable(x):
    """``x`` with non-finite floats spelled as JSON can hold them ("inf", "-inf", null for NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [jsonable(v) for v in x]
    return x
