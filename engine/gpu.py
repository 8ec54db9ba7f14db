"""The GPU path: where a bundle runs (``place``), and its Phi-2 on bitsandbytes layers (``build_device_phi``).

``Engine.load(bundle, device="cuda")`` asks ``place`` first — before any weight is read — which
checks CUDA and bitsandbytes and plans the memory (``engine/gpu_plan.py``); then the language
model is the bundle's, validated by ``build_quant_phi`` exactly as on the CPU, with each Linear
swapped for a ``DeviceLinear`` over bitsandbytes (``engine/gpu_convert.py`` converts the weights
on the device) and its norms moved to the GPU. The fp16 embedding table stays in (mapped) CPU
memory: a token's row is looked up there and the model takes CPU embeddings and gives CPU logits,
so the generation loop, the sampler, the image cache and streaming run unchanged. The residual
stream, norms and attention stay fp32 (the matmuls run in fp16, the KV cache is fp16): Phi-2's
activations overflow fp16. The vision graph runs on ONNX Runtime's CUDA provider when
``onnxruntime-gpu`` is installed and the plan has room, else on the CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from tinyv.engine.config import PhiConfig, TinyGPTVConfig
from tinyv.engine.gpu_convert import convert_int8_rows, convert_nf4
from tinyv.engine.gpu_plan import DEFAULT_BUDGET, PREFILL_CHUNK, GpuPlan, nf4_blocksize, parse_memory, plan_gpu
from tinyv.engine.llm import build_quant_phi, decode_setting
from tinyv.engine.phi import PhiForCausalLM
from tinyv.errors import TinyVError
from tinyv.kernels.linear import QuantLinear
from tinyv.kernels.quant import QuantConfig

DEVICES = ("cpu", "cuda", "auto")
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold (bitsandbytes' and transformers' default)
CUDA_HELP = "install a CUDA build of torch and `pip install 'tinyv[gpu]'`, or run on the CPU (--device cpu)"


@dataclass(frozen=True)
class Placement:
    """Where a bundle runs: ``device`` is what the user gets (``cpu`` or ``cuda``); on ``cuda``,
    ``torch_device`` and ``plan`` say where and how much; ``note`` says why ``auto`` chose."""

    device: str
    torch_device: torch.device | None = None
    plan: GpuPlan | None = None
    note: str = ""

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    def vision_providers(self) -> list:
        """ONNX Runtime providers for the vision graph (CUDA first when the plan puts it there)."""
        if self.on_gpu and self.plan.vision_on_gpu and self.torch_device.type == "cuda":
            cuda = {"device_id": self.torch_device.index or 0, "arena_extend_strategy": "kSameAsRequested"}
            return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]


def accelerator() -> torch.device | None:
    """The CUDA device torch sees, or None."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU build"
    return "torch sees no CUDA GPU (check the driver and CUDA_VISIBLE_DEVICES)"


def bitsandbytes_problem(bits: int) -> str | None:
    """Why the quantized layers cannot run on the GPU (None: they can; 16-bit needs no bitsandbytes)."""
    if bits == 16:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed"
    return None


def ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def place(manifest: dict, device: str = "cpu", max_gpu_memory=DEFAULT_BUDGET) -> Placement:
    """Where ``manifest``'s bundle runs, decided before loading: ``cpu``; ``cuda`` (a
    ``TinyVError`` when there is no usable GPU or the budget is too small); ``auto`` (CUDA when it
    is usable and the plan fits, else the CPU, with the reason in ``note``)."""
    if device not in DEVICES:
        raise TinyVError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    if device == "cpu":
        return Placement("cpu")
    from tinyv.kernels.quant import QuantConfig

    quant = QuantConfig.from_dict(manifest["quantization"])
    target = accelerator()
    problem = f"no CUDA GPU: {no_cuda_reason()}" if target is None else bitsandbytes_problem(quant.bits)
    if problem:
        if device == "cuda":
            raise TinyVError(f"--device cuda: {problem}; {CUDA_HELP}")
        return Placement("cpu", note=f"on the CPU: {problem}")
    budget = parse_memory(max_gpu_memory) if isinstance(max_gpu_memory, str) else int(max_gpu_memory)
    if target.type == "cuda":
        budget = min(budget, torch.cuda.get_device_properties(target).total_memory)
    cfg = TinyGPTVConfig.from_dict(manifest["model"])
    try:
        plan = plan_gpu(cfg, quant, manifest["vision"]["precision"], budget, vision_gpu=ort_has_cuda())
    except TinyVError as e:
        if device == "cuda":
            raise
        return Placement("cpu", note=f"on the CPU: {e}")
    return Placement("cuda", target, plan)


class DeviceLinear(nn.Module):
    """A bundle Linear on the device: ``inner`` is bitsandbytes' ``Linear4bit`` (NF4) or
    ``Linear8bitLt`` (LLM.int8()), or an fp16 ``nn.Linear`` for 16-bit bundles. Input is cast to
    ``compute_dtype`` and the output back to the input's dtype (the model's fp32)."""

    def __init__(self, inner: nn.Module, compute_dtype: torch.dtype, scheme: str, sqnr_db: float | None = None):
        super().__init__()
        self.inner, self.compute_dtype, self.scheme, self.sqnr_db = inner, compute_dtype, scheme, sqnr_db

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:  # lm_head on the last position: LLM.int8() takes rows only
            return self(x.unsqueeze(0))[0]
        return self.inner(x.to(self.compute_dtype)).to(x.dtype)

    def weight_bytes(self) -> int:
        """Bytes of the weight read per token: codes plus their scales (NF4 absmax, int8 SCB)."""
        w = self.inner.weight
        state = getattr(w, "quant_state", None)
        scales = state.absmax if state is not None else getattr(w, "SCB", None)
        return sum(t.numel() * t.element_size() for t in (w, scales) if t is not None)

    def extra_repr(self) -> str:
        sq = "" if self.sqnr_db is None else f", sqnr vs bundle {self.sqnr_db:.1f} dB"
        return f"{self.scheme}, compute {str(self.compute_dtype).replace('torch.', '')}{sq}"


class DevicePhi(PhiForCausalLM):
    """Phi-2 with its layers on ``device``: CPU embeddings in, CPU fp32 logits out. Long prompts
    run PREFILL_CHUNK positions at a time (the same result: the mask is by absolute position),
    which bounds the attention scores the planner reserves for. With ``graphs`` (CUDA, unless
    TINYV_DECODE=unfused) a decoded token is one CUDA graph replay (``engine/gpu_graph.py``)."""

    def __init__(self, cfg: PhiConfig, device: torch.device):
        super().__init__(cfg)
        self.device = device
        self.kv_dtype = torch.float16
        self.graphs = False
        self.graph_note = ""  # why the eager step is used, when graphs were on and failed
        self._captured = None  # the CapturedDecode of the latest KV cache

    def decode(self, embeds: torch.Tensor, pos: int, cache) -> torch.Tensor:
        if not self.graphs or cache.k.shape[1] != 1:
            return super().decode(embeds, pos, cache)
        self._check_room(pos, 1, cache)
        captured = self._captured
        if captured is not None and captured.cache() is cache and captured.key == (cache.k.data_ptr(), cache.max_len):
            logits = captured.step(embeds, pos)
            cache.length = pos + 1
            return logits
        logits = super().decode(embeds, pos, cache)  # eager: this position's K/V and the reference logits
        self._captured = self._capture(cache, embeds, pos, logits)
        return logits

    def _capture(self, cache, embeds: torch.Tensor, pos: int, reference: torch.Tensor):
        """The captured step for ``cache``, or None (and graphs off) if capture fails or differs."""
        from tinyv.engine.gpu_graph import CapturedDecode

        try:
            captured = CapturedDecode(self, cache)
            captured.capture(embeds, pos)
            if captured.matches(reference, embeds, pos):
                return captured
            self.graph_note = "a captured step did not match the eager one"
        except RuntimeError as e:  # e.g. an op that syncs with the host while capturing
            self.graph_note = f"capture failed ({str(e).splitlines()[0][:120]})"
        self.graphs = False
        return None

    def forward(self, embeds: torch.Tensor, pos: int = 0, cache=None) -> torch.Tensor:
        x = embeds.to(self.device, torch.float32)
        if cache is None or x.shape[1] <= PREFILL_CHUNK:
            return super().forward(x, pos, cache)
        parts = []
        for s in range(0, x.shape[1], PREFILL_CHUNK):
            parts.append(super().forward(x[:, s:s + PREFILL_CHUNK], pos + s, cache))
        return torch.cat(parts, dim=1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float().cpu()

    def conversion_sqnr(self) -> dict[str, float]:
        """Each converted Linear's SQNR (dB) against the bundle's own dequantized weight."""
        return {n: m.sqnr_db for n, m in self.named_modules() if isinstance(m, DeviceLinear) and m.sqnr_db is not None}


def build_device_phi(cfg: PhiConfig, tensors: Mapping[str, torch.Tensor], qcfg: QuantConfig, device: torch.device,
                     kv_positions: int | None = None) -> DevicePhi:
    """The bundle's Phi-2 on ``device``: weights validated by ``build_quant_phi`` (same errors as on
    the CPU), Linears converted to bitsandbytes there, context capped at ``kv_positions``."""
    source = build_quant_phi(cfg, tensors, qcfg)  # torch path: views of the bundle, nothing copied
    compute = torch.float16 if device.type == "cuda" else torch.float32  # fp32 keeps CPU checks exact
    limit = min(kv_positions or cfg.max_positions, cfg.max_positions)
    with torch.device("meta"):
        phi = DevicePhi(dataclasses.replace(cfg, max_positions=limit), device)
    phi.embed_tokens = source.embed_tokens  # stays on the CPU
    phi.layers, phi.final_layernorm, phi.lm_head = source.layers, source.final_layernorm, source.lm_head
    phi.rotary = source.rotary.to(device)
    # LLM.int8()'s outlier check (threshold 6) syncs with the host, which a capture cannot hold
    phi.graphs = device.type == "cuda" and decode_setting() == "fused" and qcfg.bits != 8
    if device.type == "cuda" and qcfg.bits == 8:
        phi.graph_note = "LLM.int8()'s outlier check syncs with the host"
    for part in (phi.layers, phi.final_layernorm):  # its parameters are the norms (Linears hold buffers)
        for module in part.modules():
            for key, p in list(module._parameters.items()):
                module._parameters[key] = nn.Parameter(p.to(device), requires_grad=False)
    for name, module in list(phi.named_modules()):
        if isinstance(module, QuantLinear):
            parent, _, attr = name.rpartition(".")
            setattr(phi.get_submodule(parent) if parent else phi, attr, device_linear(module, device, compute))
    return phi.eval()


def device_linear(q: QuantLinear, device: torch.device, compute: torch.dtype) -> DeviceLinear:
    """``q`` (the bundle's stored weight) as a ``DeviceLinear`` on ``device``."""
    cfg, shape = q.cfg, (q.out_features, q.in_features)
    bias = q.bias.to(device)
    if cfg.bits == 16:
        inner = nn.Linear(q.in_features, q.out_features, device="meta")
        inner.weight = nn.Parameter(q.weight.to(device, compute), requires_grad=False)
        inner.bias = nn.Parameter(bias.to(compute), requires_grad=False)
        return DeviceLinear(inner, compute, "fp16")
    import bitsandbytes as bnb

    stored = {"qweight": q.qweight, "scales": q.scales}
    if cfg.bits == 4:
        blocksize = nf4_blocksize(cfg)
        code = bnb.functional.get_4bit_type("nf4", device=device)
        packed, absmax, sqnr = convert_nf4(stored, cfg, shape, blocksize, code, device)
        inner = bnb.nn.Linear4bit(q.in_features, q.out_features, bias=True, compute_dtype=compute,
                                  quant_type="nf4", device="meta")
        state = bnb.functional.QuantState(absmax=absmax, shape=torch.Size(shape), code=code, blocksize=blocksize,
                                          quant_type="nf4", dtype=compute)
        inner.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                                         compress_statistics=False, quant_type="nf4", bnb_quantized=True,
                                         module=inner)
        inner.bias = nn.Parameter(bias.to(compute), requires_grad=False)
        return DeviceLinear(inner, compute, f"bitsandbytes NF4 blocksize {blocksize}", sqnr)
    cb, scb, sqnr = convert_int8_rows(stored, cfg, shape, device, bnb.functional.int8_vectorwise_quant)
    inner = bnb.nn.Linear8bitLt(q.in_features, q.out_features, bias=True, has_fp16_weights=False,
                                threshold=INT8_THRESHOLD, device="meta")
    weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
    weight.CB, weight.SCB = cb, scb
    inner.weight = weight
    inner.state.CB, inner.state.SCB = cb, scb
    inner.bias = nn.Parameter(bias.to(torch.float16), requires_grad=False)
    # LLM.int8() quantizes its input from fp16 whatever the model's dtype
    return DeviceLinear(inner, torch.float16, f"bitsandbytes LLM.int8() threshold {INT8_THRESHOLD:g}", sqnr)


def load_device_phi(cfg: PhiConfig, tensors: Mapping[str, torch.Tensor], qcfg: QuantConfig,
                    placement: Placement) -> DevicePhi:
    """``build_device_phi`` for a GPU placement; running out of device memory is a ``TinyVError``."""
    try:
        return build_device_phi(cfg, tensors, qcfg, placement.torch_device, placement.plan.kv_positions)
    except torch.OutOfMemoryError:
        raise TinyVError(f"the GPU ran out of memory loading the model (plan: {placement.plan.describe()}); "
                         "give a --max-gpu-memory no larger than what is free on it") from None


def placement_line(placement: Placement, phi) -> str:
    """Where an engine runs, for the user who asked for ``cuda`` or ``auto``."""
    if not placement.on_gpu:
        return f"running {placement.note or 'on the CPU'}"
    return f"running on {describe(placement, phi)}"


def describe(placement: Placement, phi: DevicePhi) -> str:
    """One line for ``tinyv bench``: the device, the layers' scheme, the conversion error, the plan."""
    schemes = sorted({m.scheme for m in phi.modules() if isinstance(m, DeviceLinear)})
    sqnr = list(phi.conversion_sqnr().values())
    dev = placement.torch_device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    conv = f"; conversion SQNR vs bundle min {min(sqnr):.1f} dB" if sqnr else ""
    step = "CUDA graph decode" if phi.graphs else f"eager decode{f' ({phi.graph_note})' if phi.graph_note else ''}"
    return f"{name}: {', '.join(schemes)}{conv}; {step}; {placement.plan.describe()}"


def gpu_memory_figures(device: torch.device) -> dict:
    """Peak bytes torch allocated and reserved, and the device's used memory (every allocator and
    context in every process: ONNX Runtime's arena included), in MB."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"gpu_peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "gpu_peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
            "gpu_used_mb": (total - free) / 2**20, "gpu_total_mb": total / 2**20}


__all__ = ["Placement", "place", "DevicePhi", "DeviceLinear", "build_device_phi", "load_device_phi", "gpu_memory_figures"]
