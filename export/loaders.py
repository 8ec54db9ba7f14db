"""Strict loaders for the checkpoint files TinyGPT-V users hold (SPEC §2).

Each file has a declared key table next to its reader: every key maps to one model tensor or is
ignored for a stated reason. A key no rule knows, a tensor the model needs that no file gives, or
a shape that does not fit is an error that names the keys — the original code loaded with
``strict=False`` and silently produced garbage (TinyGPT-V issues #10, #11, #26).

Memory: the model is built on the meta device and each tensor is converted and assigned as it is
read (safetensors and mmap'd pickles), so full-size checkpoints never sit in RAM twice.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from tinyv.engine.bundle import read_json
from tinyv.engine.config import PhiConfig, TinyGPTVConfig, preset as make_preset
from tinyv.errors import TinyVError
from tinyv.export.eva_vit import interpolate_pos_embed
from tinyv.export.hub import resolve

IGNORE = None  # a rule target meaning "known, deliberately unused"


@dataclass(frozen=True)
class Rule:
    """``pattern`` (full match) -> ``target`` template (``\\1``...), or IGNORE with ``why``."""

    pattern: str
    target: str | None
    why: str = ""

    def match(self, key: str):
        m = re.fullmatch(self.pattern, key)
        if m is None:
            return None
        return (m.expand(self.target) if self.target is not None else IGNORE, m)


def _map(key: str, rules: list[Rule]):
    for rule in rules:
        hit = rule.match(key)
        if hit is not None:
            return hit
    return False


def _short(keys, n: int = 6) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ---------------------------------------------------------------------------------------------
# Key tables
# ---------------------------------------------------------------------------------------------
L = r"model\.layers\.(\d+)\."
PHI2_RULES = [
    Rule(r"model\.embed_tokens\.weight", r"phi.embed_tokens.weight"),
    Rule(L + r"self_attn\.(query_key_value|dense)\.(weight|bias)", r"phi.layers.\1.self_attn.\2.\3"),
    Rule(L + r"mlp\.(fc1|fc2)\.(weight|bias)", r"phi.layers.\1.mlp.\2.\3"),
    Rule(L + r"input_layernorm\.(weight|bias)", r"phi.layers.\1.input_layernorm.\2"),
    Rule(r"model\.final_layernorm\.(weight|bias)", r"phi.final_layernorm.\1"),
    Rule(r"lm_head\.(weight|bias)", r"phi.lm_head.\1"),
    # newer transformers Phi (>= 4.37): separate projections, fused below into [H, 3, D] rows
    Rule(L + r"self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)", r"split:\1.\2.\3"),
    Rule(L + r"self_attn\.rotary_emb\.inv_freq", IGNORE, "recomputed (old .bin files store it)"),
    Rule(L + r"self_attn\.(q|k)_layernorm\.(weight|bias)", IGNORE, "TinyGPT-V's stage file supplies the q/k norms"),
]

VIT_RULES = [
    Rule(r"cls_token", r"visual.cls_token"),
    Rule(r"pos_embed", r"visual.pos_embed"),
    Rule(r"patch_embed\.proj\.(weight|bias)", r"visual.patch_embed.proj.\1"),
    Rule(r"blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"visual.blocks.\1.\2.\3"),
    Rule(r"blocks\.(\d+)\.attn\.qkv\.weight", r"visual.blocks.\1.attn.qkv.weight"),
    Rule(r"blocks\.(\d+)\.attn\.(q_bias|v_bias)", r"visual.blocks.\1.attn.\2"),
    Rule(r"(norm|fc_norm|head)\.(weight|bias)", IGNORE, "EVA's own head and final norm: BLIP-2 uses neither"),
]

Q = r"Qformer\.bert\.encoder\.layer\.(\d+)\."
QFORMER_RULES = [
    Rule(r"ln_vision\.(weight|bias)", r"ln_vision.\1"),
    Rule(r"query_tokens", r"qformer.query_tokens"),
    Rule(r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.layernorm.\1"),
    Rule(
        Q + r"(attention|crossattention)\.(self\.query|self\.key|self\.value|output\.dense|output\.LayerNorm)\.(weight|bias)",
        r"qformer.layer.\1.\2.\3.\4",
    ),
    Rule(Q + r"intermediate_query\.dense\.(weight|bias)", r"qformer.layer.\1.intermediate_query.dense.\2"),
    Rule(Q + r"output_query\.(dense|LayerNorm)\.(weight|bias)", r"qformer.layer.\1.output_query.\2.\3"),
    # the text side of BLIP-2, unused by TinyGPT-V (SPEC §1.6/§1.7)
    Rule(r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight", IGNORE, "text embeddings"),
    Rule(r"Qformer\.bert\.embeddings\.position_ids", IGNORE, "int64 buffer"),
    Rule(Q + r"intermediate\.dense\.(weight|bias)", IGNORE, "text FFN"),
    Rule(Q + r"output\.(dense|LayerNorm)\.(weight|bias)", IGNORE, "text FFN"),
    Rule(r"Qformer\.cls\..*", IGNORE, "BERT LM head"),
    Rule(r"(t5_proj|opt_proj|vision_proj|text_proj|itm_head)\.(weight|bias)", IGNORE, "BLIP-2's own heads"),
    Rule(r"temp", IGNORE, "BLIP-2's contrastive temperature"),
    Rule(r"visual_encoder\..*", IGNORE, "the ViT comes from eva_vit_g.pth"),
]

S = r"llama_model\.(?:base_model\.model\.)?model\."  # stage 1 may lack the peft prefix
STAGE_RULES = [
    Rule(r"(llama_proj|llama_proj2)\.(weight|bias)", r"\1.\2"),
    Rule(
        S + r"layers\.(\d+)\.self_attn\.(query_key_value|dense)\.lora_(A|B)(?:\.default)?\.weight",
        r"lora:\1.\2.\3",
    ),
    Rule(S + r"layers\.(\d+)\.self_attn\.(q_layernorm|k_layernorm)\.(weight|bias)", r"phi.layers.\1.self_attn.\2.\3"),
    Rule(S + r"layers\.(\d+)\.(input_layernorm|post_layernorm)\.weight", r"phi.layers.\1.\2.weight"),
    Rule(S + r"final_layernorm\.weight", r"phi.final_layernorm.weight"),
    Rule(r"Qformer\.bert\.embeddings\.position_ids", IGNORE, "int64 buffer"),
]

# Stage-file Phi-2 tensors replace the base Phi-2's where both exist (input_layernorm.weight,
# final_layernorm.weight; their biases stay Phi-2's) — SPEC §1.14.
# Tensors no file holds: they are zero (SPEC §1.14).
ZERO_DEFAULTS = re.compile(r"phi\.layers\.\d+\.self_attn\.(q|k)_layernorm\.bias")


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------
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
            f"{_sniff(list(obj)) if isinstance(obj, dict) else ''}"
        )
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TinyVError(f"{label}: {path} is not a state dict of tensors")
    return obj


def pickle_source(path: str, label: str, wrapped: bool) -> tuple[Source, dict]:
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
        shards = sorted(set(read_json(index, "--phi2: cannot read {path}: {reason}")["weight_map"].values()))
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
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise TinyVError(f"--phi2: {folder} has no config.json; pass a Phi-2 model folder")
    return PhiConfig.from_hf_config(read_json(path, "--phi2: cannot read {path}: {reason}"))


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------
_KIND_HINTS = [
    (re.compile(r"^blocks\.\d+\."), "an EVA ViT file (pass it as --vit)"),
    (re.compile(r"^Qformer\.bert\."), "a BLIP-2 Q-Former file (pass it as --qformer)"),
    (re.compile(r"^llama_model\.|^llama_proj"), "a TinyGPT-V stage file (pass it as --stage)"),
    (re.compile(r"^model\.layers\.|^lm_head"), "Phi-2 weights (pass the folder as --phi2)"),
    (re.compile(r"^transformer\.h\.\d+\.mixer"), "an old 'phi-msft' Phi-2 (use a transformers-format Phi-2)"),
]


def _sniff(keys) -> str:
    for pattern, what in _KIND_HINTS:
        if sum(bool(pattern.search(k)) for k in keys) >= max(1, len(keys) // 4):
            return f"; it looks like {what}"
    return ""


class Assembler:
    """Fills a meta-device model tensor by tensor and checks that nothing is missing or left over."""

    def __init__(self, model: torch.nn.Module, preset_name: str):
        self.model = model
        self.preset_name = preset_name
        self.expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.filled: dict[str, str] = {}

    def put(self, key: str, tensor: torch.Tensor, origin: str) -> None:
        if key not in self.expected:
            raise TinyVError(f"{origin} maps to {key}, which this model does not have")
        if key in self.filled:
            raise TinyVError(f"{key} is given twice: by {self.filled[key]} and by {origin}")
        if tuple(tensor.shape) != self.expected[key]:
            raise TinyVError(
                f"{origin} has shape {list(tensor.shape)} but the model ({self.preset_name}) expects "
                f"{list(self.expected[key])}: the checkpoint is for a different model size"
            )
        if not tensor.is_floating_point():
            raise TinyVError(f"{origin} holds {tensor.dtype} values, expected floating point")
        *path, name = key.split(".")
        module = self.model.get_submodule(".".join(path))
        module._parameters[name] = torch.nn.Parameter(tensor.to(torch.float32).contiguous(), requires_grad=False)
        self.filled[key] = origin

    def finish(self, skip_prefix: str | None = None) -> None:
        """Check that every tensor was given (those under ``skip_prefix`` stay on meta)."""
        missing = [k for k in self.expected if k not in self.filled and not (skip_prefix and k.startswith(skip_prefix))]
        if missing:
            raise TinyVError(
                f"the checkpoints lack {len(missing)} tensor(s) the model needs: {_short(missing)}"
                f"{_missing_hint(missing)}"
            )


def _missing_hint(missing) -> str:
    if any(re.search(r"(q_layernorm|k_layernorm|post_layernorm)", k) for k in missing):
        return " (the q/k and post-attention norms come only from a TinyGPT-V stage file: pass --stage)"
    return ""


def _mapped(source: Source, rules: list[Rule]) -> Iterator[tuple[str, str]]:
    """(file key, target) for every key, after checking that every key is known."""
    unknown = [k for k in source.keys if _map(k, rules) is False]
    if unknown:
        raise TinyVError(
            f"{source.label}: {len(unknown)} tensor(s) tinyv does not know: {_short(unknown)}"
            f"{_sniff(source.keys)}"
        )
    for k in source.keys:
        target, _ = _map(k, rules)
        yield k, target


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Separate q/k/v rows -> the fused per-head [H, 3, D] layout (SPEC §1.10)."""
    shape = (heads, -1) + tuple(q.shape[1:])
    return torch.stack([t.reshape(shape) for t in (q, k, v)], dim=1).reshape((-1,) + tuple(q.shape[1:]))


def _infer_stage(ckpt_config, image_size: int, cfg: TinyGPTVConfig) -> int:
    """Stage 4 (chat template ``[INST]``) or stages 1-3 (``###Human:``) from the checkpoint's config."""
    model_cfg = ckpt_config.get("model", {}) if isinstance(ckpt_config, dict) else {}
    arch = model_cfg.get("arch") if isinstance(model_cfg, dict) else None
    if arch == "minigpt_v2":
        return 4
    if arch == "minigpt4":
        return 3
    return cfg.stage


@dataclass
class Checkpoints:
    """The four sources, resolved and read as far as needed to build or export a model."""

    cfg: TinyGPTVConfig
    preset_name: str
    tokenizer: object
    phi2_dir: str
    vit_path: str
    qformer_path: str
    stage_path: str
    stage_model: dict  # stage-file tensors outside Phi-2 (llama_proj, llama_proj2): target -> (tensor, origin)
    stage_phi: dict  # stage-file Phi-2 tensors (norms): target -> (tensor, origin)
    lora: dict  # (layer, module) -> {"A": tensor, "B": tensor}

    def source_files(self) -> dict[str, list[str]]:
        """Every file each source consists of (for hashing into a bundle's manifest)."""
        phi = sorted(os.path.join(self.phi2_dir, f) for f in os.listdir(self.phi2_dir)
                     if os.path.isfile(os.path.join(self.phi2_dir, f)))
        return {"phi2": phi, "vit": [self.vit_path], "qformer": [self.qformer_path], "stage": [self.stage_path]}


def open_checkpoints(phi2, vit, qformer, stage, image_size=None, preset=None) -> Checkpoints:
    """Resolve the sources, read the configs, tokenizer and the (small) stage file."""
    from tinyv.engine.tokenizer import Tokenizer

    phi2_dir = resolve(phi2, "--phi2", folder=True)
    vit_path = resolve(vit, "--vit")
    qformer_path = resolve(qformer, "--qformer")
    stage_path = resolve(stage, "--stage")

    if isinstance(preset, TinyGPTVConfig):
        base, preset_name = preset, "custom"
    else:
        preset_name = preset or ("stage3" if image_size == 224 else "stage4")
        base = make_preset(preset_name)
    cfg = base.replace(phi=read_phi2_config(phi2_dir))
    if image_size is not None:
        if image_size % cfg.vision.patch_size:
            raise TinyVError(f"image size must be a multiple of {cfg.vision.patch_size}, got {image_size}")
        cfg = cfg.replace(image_size=image_size)
    tokenizer = Tokenizer.from_dir(phi2_dir)

    src, extra = pickle_source(stage_path, "--stage", wrapped=True)
    cfg = cfg.replace(stage=_infer_stage(extra.get("config"), cfg.image_size, cfg))
    lora: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    stage_model, stage_phi = {}, {}
    for key, target in _mapped(src, STAGE_RULES):
        if target is IGNORE:
            continue
        if target.startswith("lora:"):
            layer, module, ab = target[5:].split(".")
            lora.setdefault((layer, module), {})[ab] = src.get(key)
        else:
            (stage_phi if target.startswith("phi.") else stage_model)[target] = (src.get(key), f"{src.label} {key}")
    _check_lora(lora, cfg)
    return Checkpoints(cfg, preset_name, tokenizer, phi2_dir, vit_path, qformer_path, stage_path,
                       stage_model, stage_phi, lora)


def build_model(ck: Checkpoints, with_phi: bool = True):
    """A fp32 ``TinyGPTV``; ``with_phi=False`` fills only the vision side (Phi-2 stays on meta)."""
    from tinyv.export.reference import TinyGPTV
    from tinyv.engine.phi import Rotary

    with torch.device("meta"):
        model = TinyGPTV(ck.cfg, ck.tokenizer)
    asm = Assembler(model, ck.preset_name)
    # One file at a time, each file's mapping dropped once its tensors are assigned, Phi-2 (the
    # largest) last and one shard at a time: peak RSS stays near the fp32 model itself.
    for target, (tensor, origin) in ck.stage_model.items():
        asm.put(target, tensor, origin)
    _load_vit(asm, ck.vit_path, ck.cfg)
    _load_qformer(asm, ck.qformer_path)
    if with_phi:
        weights = PhiWeights(ck, set(k for k in asm.expected if k.startswith("phi.")))
        for target in weights.targets:
            asm.put(target, weights.get(target), weights.origin(target))
        model.phi.rotary = Rotary(ck.cfg.phi)  # non-persistent buffer, was built on meta
    asm.finish(skip_prefix=None if with_phi else "phi.")
    return model.eval()


def load_model(phi2, vit, qformer, stage, image_size=None, preset=None):
    """Build a fp32 ``TinyGPTV`` from the four sources (paths or hub names)."""
    return build_model(open_checkpoints(phi2, vit, qformer, stage, image_size, preset))


def _load_vit(asm: Assembler, path: str, cfg: TinyGPTVConfig) -> None:
    """EVA ViT: the stored 40th block is dropped; pos_embed resized to the input grid."""
    src, _ = pickle_source(path, "--vit", wrapped=False)
    for key, target in _mapped(src, VIT_RULES):
        if target is IGNORE:
            continue
        m = re.match(r"visual\.blocks\.(\d+)\.", target)
        if m and int(m.group(1)) == cfg.vision.depth:
            continue  # BLIP-2 uses the first `depth` blocks (39 of the 40 stored)
        tensor = src.get(key)
        if target == "visual.pos_embed":
            tensor = _resize_pos_embed(tensor, cfg)
        asm.put(target, tensor, f"{src.label} {key}")


def _load_qformer(asm: Assembler, path: str) -> None:
    src, _ = pickle_source(path, "--qformer", wrapped=True)
    for key, target in _mapped(src, QFORMER_RULES):
        if target is not IGNORE:
            asm.put(target, src.get(key), f"{src.label} {key}")


_LINEAR = re.compile(r"phi\.layers\.(\d+)\.self_attn\.(query_key_value|dense)\.weight")


class PhiWeights:
    """Random access to Phi-2's tensors exactly as the model needs them.

    ``get(target)`` returns the tensor for a model key (``phi.…``): q/k/v fused into the per-head
    [H, 3, D] rows if the folder has them split, LoRA merged (W + alpha/r · B @ A, in fp32), the
    stage file's norms and overrides applied, q/k norm biases zero. Nothing is held beyond the
    stage file's small tensors, so an exporter can stream layer by layer, or read one layer again.
    """

    def __init__(self, ck: Checkpoints, expected: set[str]):
        self.ck = ck
        self.src = phi2_source(ck.phi2_dir)
        self.base: dict[str, list[str]] = {}  # target -> source key(s), in file order
        split: dict[str, dict[str, str]] = {}
        for key, target in _mapped(self.src, PHI2_RULES):
            if target is IGNORE:
                continue
            if target.startswith("split:"):
                layer, proj, kind = target[6:].split(".")
                split.setdefault(f"{layer}.{kind}", {})[proj] = key
                continue
            if target not in expected:
                raise TinyVError(f"--phi2 {key} maps to {target}, which this model does not have")
            self.base[target] = [key]
        for lk, parts in split.items():
            missing = [p for p in ("q_proj", "k_proj", "v_proj") if p not in parts]
            layer, kind = lk.split(".")
            if missing:
                gaps = [f"model.layers.{layer}.self_attn.{p}.{kind}" for p in missing]
                raise TinyVError(f"--phi2: incomplete q/k/v projections: {_short(gaps)} missing")
            target = f"phi.layers.{layer}.self_attn.query_key_value.{kind}"
            if target not in expected:
                raise TinyVError(f"--phi2 model.layers.{layer}.self_attn.q_proj.{kind} maps to {target}, "
                                 "which this model does not have")
            self.base[target] = [parts["q_proj"], parts["k_proj"], parts["v_proj"]]
        for (layer, module) in ck.lora:
            if f"phi.layers.{layer}.self_attn.{module}.weight" not in self.base:
                raise TinyVError(f"--stage: LoRA for layer {layer} {module} has no base weight in --phi2")
        for target in ck.stage_phi:
            if target not in expected:
                raise TinyVError(f"{ck.stage_phi[target][1]} maps to {target}, which this model does not have")
        # model order (layer by layer), which is also the order a streaming reader wants
        self.targets = [t for t in _model_order(expected)]
        missing = [t for t in self.targets if not self._has(t)]
        if missing:
            raise TinyVError(
                f"the checkpoints lack {len(missing)} tensor(s) the model needs: {_short(missing)}"
                f"{_missing_hint(missing)}"
            )

    def _has(self, target: str) -> bool:
        return target in self.ck.stage_phi or target in self.base or bool(ZERO_DEFAULTS.fullmatch(target))

    def origin(self, target: str) -> str:
        if target in self.ck.stage_phi:
            return self.ck.stage_phi[target][1]
        if target in self.base:
            keys = self.base[target]
            return f"--phi2 {keys[0]}" if len(keys) == 1 else f"--phi2 {{q,k,v}}_proj of {keys[0]}"
        return "zero (no file holds it)"

    def get(self, target: str) -> torch.Tensor:
        if target in self.ck.stage_phi:  # the stage file's value wins (SPEC §1.14)
            return self.ck.stage_phi[target][0]
        if target not in self.base:
            if ZERO_DEFAULTS.fullmatch(target):
                d = self.ck.cfg.phi.head_dim
                return torch.zeros(d)
            raise TinyVError(f"no file holds {target}")
        keys = self.base[target]
        if len(keys) == 3:
            tensor = _fuse_qkv(*(self.src.get(k) for k in keys), self.ck.cfg.phi.heads)
        else:
            tensor = self.src.get(keys[0])
        m = _LINEAR.fullmatch(target)
        if m and (m.group(1), m.group(2)) in self.ck.lora:
            ab = self.ck.lora[(m.group(1), m.group(2))]
            if (ab["B"].shape[0], ab["A"].shape[1]) != tuple(tensor.shape):
                raise TinyVError(
                    f"--stage: LoRA of layer {m.group(1)} {m.group(2)} is for a {ab['B'].shape[0]}x"
                    f"{ab['A'].shape[1]} weight, but --phi2's is {list(tensor.shape)}"
                )
            # W' = W + (alpha / r) * B @ A (peft semantics, SPEC §1)
            tensor = tensor.float() + self.ck.cfg.lora_scale * (ab["B"].float() @ ab["A"].float())
        return tensor

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """fp32 state dict of decoder layer ``i`` (keys relative to the layer)."""
        pre = f"phi.layers.{i}."
        return {t[len(pre):]: self.get(t).float() for t in self.targets if t.startswith(pre)}


def _model_order(expected: set[str]) -> list[str]:
    def key(t: str):
        m = re.match(r"phi\.layers\.(\d+)\.", t)
        if t.startswith("phi.embed_tokens"):
            return (-1, t)
        return (int(m.group(1)), t) if m else (10**9, t)

    return sorted(expected, key=key)


def _resize_pos_embed(t: torch.Tensor, cfg: TinyGPTVConfig) -> torch.Tensor:
    if t.dim() != 3 or t.shape[0] != 1:
        raise TinyVError(f"--vit: pos_embed has shape {list(t.shape)}, expected [1, 1 + g*g, width]")
    try:
        return interpolate_pos_embed(t, cfg.vision.grid)
    except ValueError as e:
        raise TinyVError(f"--vit: {e}") from None


def _check_lora(lora: dict, cfg: TinyGPTVConfig) -> None:
    """LoRA must cover every layer's query_key_value and dense, with A and B, rank lora_r."""
    if not lora:
        return  # stage 1 has none
    want = {(str(i), m) for i in range(cfg.phi.layers) for m in ("query_key_value", "dense")}
    missing = want - set(lora)
    if missing:
        raise TinyVError(f"--stage: LoRA weights missing for {_short(f'layer {a} {b}' for a, b in missing)}")
    for (layer, module), ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise TinyVError(f"--stage: layer {layer} {module} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != cfg.lora_r or b.shape[1] != cfg.lora_r:
            raise TinyVError(
                f"--stage: layer {layer} {module} LoRA has rank {a.shape[0]}, expected {cfg.lora_r} "
                f"(TinyGPT-V uses r={cfg.lora_r}, alpha={cfg.lora_alpha})"
            )
