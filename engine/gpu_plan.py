"""What goes on the GPU, decided from the bundle's shapes before anything is loaded.

``plan_gpu(config, quant, vision_precision, budget)`` is a pure function: the language model
always goes on the GPU (its bitsandbytes layers, norms and biases; the fp16 embedding table stays
in CPU memory, where a token's row is looked up), then the vision graph if it fits beside it,
and the KV cache gets the rest, up to the model's context. Too small a budget is a ``TinyVError``
that says what the language model alone needs.

Byte counts are exact for the LLM's weights and KV cache; the workspaces and the CUDA context
are estimates (named constants below) that ``benchmarks/gpu_end_to_end.py`` compares with the
measured peak on a real GPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from tinyv.engine.config import PhiConfig, QFormerConfig, TinyGPTVConfig, VisionConfig
from tinyv.errors import TinyVError
from tinyv.kernels.quant import QuantConfig

MiB, GiB = 1 << 20, 1 << 30
DEFAULT_BUDGET = 8 * GiB
# outside torch's allocator: the CUDA context, cuBLAS workspaces and bitsandbytes' library
CUDA_CONTEXT_BYTES = 512 * MiB
# ONNX Runtime's CUDA provider beside it: its own cuDNN / cuBLAS handles and arena slack
ORT_CUDA_BYTES = 256 * MiB
PREFILL_CHUNK = 256  # prompt tokens run per forward on the GPU: bounds the attention scores
MIN_POSITIONS = 512  # the least KV cache worth running with (a stage-4 prompt is ~50 positions)
VISION_POSITIONS = 1024  # the vision graph goes on the GPU only if the KV cache keeps this many
PREFIX_CACHE_BYTES = 64 * MiB  # stored image prefixes (engine/prefix_cache.py): ~4 at full size
POSITION_STEP = 128  # KV capacities are multiples of this
SLACK = 1.25  # allocator rounding and fragmentation on the estimated workspaces
KV_BYTES = 2  # fp16 keys and values


@dataclass(frozen=True)
class GpuPlan:
    """Where each part runs and the bytes it is given (``parts``); ``total`` <= ``budget``."""

    budget: int
    vision_on_gpu: bool
    kv_positions: int
    parts: dict
    note: str = ""  # why the vision graph is where it is

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def prefix_cache_bytes(self) -> int:
        return self.parts["prefix_cache"]

    def describe(self) -> str:
        """One line, e.g. for ``tinyv bench`` and the CLI's note."""
        where = "LLM and vision on the GPU" if self.vision_on_gpu else "LLM on the GPU, vision on the CPU"
        parts = ", ".join(f"{k.replace('_', ' ')} {gb(v)}" for k, v in self.parts.items() if v)
        line = f"{where}: {gb(self.total)} of {gb(self.budget)} ({parts}); KV cache {self.kv_positions} positions"
        return line + (f"; {self.note}" if self.note else "")


def gb(n: float) -> str:
    return f"{n / GiB:.2f} GB"


def parse_memory(text) -> int:
    """Bytes from ``8GB``, ``7.5G``, ``6000MB``, ``8GiB`` or a plain number of GB.

    GB here are GiB (2**30 bytes), the way a GPU's memory is counted ("an 8 GB GPU").
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?\s*", str(text).lower())
    if not m:
        raise TinyVError(f"GPU memory must look like 8GB, 7.5GB or 6000MB; got {text!r}")
    value = float(m.group(1)) * (MiB if (m.group(2) or "g").startswith("m") else GiB)
    if value <= 0:
        raise TinyVError(f"GPU memory must be more than 0; got {text!r}")
    return int(value)


def nf4_blocksize(q: QuantConfig) -> int:
    """bitsandbytes' 4-bit block: the bundle's group, so each block requantizes one group."""
    return q.group_size


def linear_shapes(c: PhiConfig) -> list[tuple[int, int]]:
    """(out, in) of every Linear the bundle quantizes (per layer qkv, dense, fc1, fc2; lm_head)."""
    h, i = c.hidden, c.intermediate
    return [(3 * h, h), (h, h), (i, h), (h, i)] * c.layers + [(c.vocab_size, h)]


def llm_weight_bytes(c: PhiConfig, q: QuantConfig) -> int:
    """The language model's bytes on the GPU: bitsandbytes weights (4-bit: packed NF4 codes and an
    fp32 absmax per block; 8-bit: int8 and an fp32 scale per row; 16-bit: fp16), fp16 biases,
    fp32 norms. The embedding table stays on the CPU."""
    total = 0
    for n, k in linear_shapes(c):
        if q.bits == 4:
            total += n * k // 2 + n * k // nf4_blocksize(q) * 4
        elif q.bits == 8:
            total += n * k + n * 4
        else:
            total += n * k * 2
        total += n * 2  # bias
    norms = c.layers * (3 * c.hidden + 4 * c.head_dim) + 2 * c.hidden
    return total + norms * 4


def kv_bytes(c: PhiConfig, positions: int) -> int:
    return 2 * c.layers * positions * c.hidden * KV_BYTES


def llm_workspace_bytes(c: PhiConfig, q: QuantConfig, positions: int) -> int:
    """Transients of a forward of PREFILL_CHUNK tokens against ``positions`` cached ones: fp32
    attention scores (scores, mask, softmax), the layer's cache read in fp32, hidden and MLP
    activations, and a 4-bit weight dequantized to fp16 for a many-row matmul."""
    chunk, h = PREFILL_CHUNK, c.hidden
    scores = 3 * c.heads * chunk * positions * 4
    cache_read = 2 * positions * h * 4
    activations = chunk * (11 * h + 2 * c.intermediate) * 4
    dequant = max(n * k for n, k in linear_shapes(c)[:4]) * 2 if q.bits == 4 else 0
    return int(SLACK * (scores + cache_read + activations + dequant))


def vision_params(v: VisionConfig, qf: QFormerConfig, llm_hidden: int) -> int:
    """Parameters of the bundle's vision graph: EVA ViT, ln_vision, Q-Former (query side) and the
    folded projection (SPEC §1)."""
    w, m = v.width, v.mlp_hidden
    vit = 3 * v.patch_size**2 * w + w + w + v.num_tokens * w
    vit += v.depth * (2 * w + 3 * w * w + 2 * w + w * w + w + 2 * w + w * m + m + m * w + w)
    H, inner = qf.hidden, qf.intermediate
    qformer = qf.num_queries * H + 2 * H
    for layer in range(qf.layers):
        qformer += 4 * (H * H + H) + 2 * H  # self-attention and its LayerNorm
        if layer % qf.cross_attention_freq == 0:
            qformer += 2 * (H * H + H) + 2 * (qf.encoder_width * H + H) + 2 * H
        qformer += H * inner + inner + inner * H + H + 2 * H
    return vit + 2 * w + qformer + H * llm_hidden + llm_hidden


def vision_weight_bytes(cfg: TinyGPTVConfig, precision: str) -> int:
    per_param = 1 if precision == "int8" else 4  # int8: the MatMul weights, which are nearly all of it
    return vision_params(cfg.vision, cfg.qformer, cfg.phi.hidden) * per_param


def vision_workspace_bytes(v: VisionConfig) -> int:
    """One image through the ViT in fp32: attention scores and the MLP's hidden activations."""
    t = v.num_tokens
    return int(SLACK * (3 * v.heads * t * t + 4 * t * v.mlp_hidden + 8 * t * v.width) * 4)


def plan_gpu(cfg: TinyGPTVConfig, quant: QuantConfig, vision_precision: str, budget: int, *,
             vision_gpu: bool = True) -> GpuPlan:
    """The placement for ``budget`` bytes of GPU memory.

    ``vision_gpu``: whether the vision graph can run on the GPU at all (ONNX Runtime's CUDA
    provider is installed). Raises ``TinyVError`` when not even the language model with a KV
    cache of ``MIN_POSITIONS`` fits.
    """
    c = cfg.phi
    lowest = min(MIN_POSITIONS, c.max_positions)

    def llm_parts(positions: int) -> dict:
        return {"cuda_context": CUDA_CONTEXT_BYTES, "llm_weights": llm_weight_bytes(c, quant),
                "kv_cache": kv_bytes(c, positions), "llm_workspace": llm_workspace_bytes(c, quant, positions),
                "prefix_cache": PREFIX_CACHE_BYTES}

    def most_positions(fixed: int, floor: int) -> int | None:
        """The largest KV capacity (a POSITION_STEP multiple, or the context) >= floor that fits."""
        options = sorted({c.max_positions, *range(POSITION_STEP, c.max_positions, POSITION_STEP)}, reverse=True)
        for n in options:
            if n < floor:
                break
            if fixed + sum(llm_parts(n).values()) <= budget:
                return n
        return None

    need = sum(llm_parts(lowest).values())
    if need > budget:
        detail = ", ".join(f"{k.replace('_', ' ')} {gb(v)}" for k, v in llm_parts(lowest).items())
        raise TinyVError(
            f"a GPU budget of {gb(budget)} is too small for the {quant.bits}-bit language model: it needs "
            f"{gb(need)} ({detail}; KV cache for {lowest} positions); give a larger --max-gpu-memory or run on "
            "the CPU (--device cpu)")
    vision = {"ort_cuda": ORT_CUDA_BYTES, "vision_weights": vision_weight_bytes(cfg, vision_precision),
              "vision_workspace": vision_workspace_bytes(cfg.vision)}
    if not vision_gpu:
        note = "ONNX Runtime has no CUDA provider here (install onnxruntime-gpu)"
    else:
        positions = most_positions(sum(vision.values()), min(VISION_POSITIONS, c.max_positions))
        if positions is not None:
            return GpuPlan(budget, True, positions, {**llm_parts(positions), **vision})
        note = f"the vision graph ({gb(sum(vision.values()))} with its workspace) does not fit beside it"
    positions = most_positions(0, lowest)
    return GpuPlan(budget, False, positions, llm_parts(positions), note)
