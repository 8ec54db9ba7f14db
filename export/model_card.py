"""The README model card ``tinyv push`` writes next to a bundle on the Hugging Face Hub.

Everything in it comes from the bundle's manifest (model, source checkpoints and their sha256,
quantization recipe, quality against fp32, files) plus, when given, a ``tinyv eval`` accuracy
table. The YAML header carries ``library_name: tinyv`` and the license of the source weights,
which the manifest does not record: it is known for the real TinyGPT-V architecture and for
tinyv's demo model, and must be given (``--license``) for anything else.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from tinyv.engine.config import TinyGPTVConfig, preset
from tinyv.errors import TinyVError

_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")


@dataclass(frozen=True)
class Origin:
    """Where a bundle's weights come from, as far as its model configuration tells."""

    title: str
    summary: str
    base_model: str | None
    license: str | None
    license_note: str
    example_question: str


TINYGPTV_LICENSE_NOTE = (
    "The weights are converted from TinyGPT-V's stage checkpoint (BSD-3-Clause, "
    "[DLYuanGod/TinyGPT-V](https://github.com/DLYuanGod/TinyGPT-V)), Phi-2 (MIT, "
    "[microsoft/phi-2](https://huggingface.co/microsoft/phi-2)), and EVA ViT-g and BLIP-2's Q-Former "
    "(BSD-3-Clause, [Salesforce LAVIS](https://github.com/salesforce/LAVIS)); their terms apply to this bundle."
)
DEMO_LICENSE_NOTE = (
    "tinyv's demo model was trained from random initialisation by tinyv (`python -m tinyv.demo.train`) on "
    "generated scenes; no outside weights went into it. It is released under tinyv's license, MIT."
)


def origin_of(model: dict) -> Origin:
    """What the manifest's model configuration says about the weights' source."""
    cfg = TinyGPTVConfig.from_dict(model)
    real = TinyGPTVConfig()
    if dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=real.image_size),
                           stage=real.stage) == real:
        return Origin(
            title=f"TinyGPT-V stage {cfg.stage}",
            summary=f"[TinyGPT-V](https://arxiv.org/abs/2312.16862) stage {cfg.stage} (Phi-2 + EVA ViT-g + "
                    f"BLIP-2 Q-Former + projection) at {cfg.image_size} px",
            base_model="Tyrannosaurus/TinyGPT-V", license="bsd-3-clause", license_note=TINYGPTV_LICENSE_NOTE,
            example_question="What is on the table?",
        )
    if cfg == preset("demo"):
        return Origin(
            title="tinyv demo model",
            summary="tinyv's built-in demo model: a small TinyGPT-V (every part of the real architecture) "
                    "trained on generated 84×84 scenes of coloured shapes; it knows nothing else",
            base_model=None, license="mit", license_note=DEMO_LICENSE_NOTE,
            example_question="What colour is the circle?",
        )
    return Origin(
        title="TinyGPT-V-architecture model",
        summary=f"a model of the TinyGPT-V architecture (stage {cfg.stage} prompt, {cfg.image_size} px) "
                "in a configuration of its own",
        base_model=None, license=None, license_note="", example_question="What is in the picture?",
    )


def card_license(origin: Origin, given: str | None) -> tuple[str, str]:
    """(license id, note) for the card: ``given`` wins; else the origin's; else an error."""
    if given is not None:
        if not _LICENSE_ID.fullmatch(given):
            raise TinyVError(f"--license takes a license id as the hub spells it (mit, apache-2.0, bsd-3-clause, "
                             f"other), got {given!r}")
        note = origin.license_note if given == origin.license else \
            "The license of the source weights, as given by the publisher (`tinyv push --license`)."
        return given, note
    if origin.license is None:
        raise TinyVError("cannot tell the license of this bundle's source weights (its model is neither the real "
                         "TinyGPT-V nor tinyv's demo model): pass --license, e.g. --license mit")
    return origin.license, origin.license_note


def model_card(manifest: dict, repo_id: str, *, revision: str | None = None, license: str | None = None,
               accuracy: tuple[str, str] | None = None) -> str:
    """The README.md for ``manifest``'s bundle published as ``repo_id`` (at ``revision``).

    ``accuracy``: (caption line, Markdown table) of ``tinyv eval`` results, or None.
    """
    from huggingface_hub import ModelCardData

    origin = origin_of(manifest["model"])
    license_id, license_note = card_license(origin, license)
    q, v = manifest["quantization"], manifest["vision"]
    data = ModelCardData(
        library_name="tinyv", license=license_id, base_model=origin.base_model,
        base_model_relation="quantized" if origin.base_model else None, pipeline_tag="image-text-to-text",
        tags=["tinyv", "tinygpt-v", "quantized", "fp16" if q["bits"] == 16 else f"{q['bits']}-bit", "onnx"],
    )
    name = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    parts = [
        f"---\n{data.to_yaml()}\n---",
        f"# {repo_id}",
        f"{origin.summary}.\n\nThis repository holds it as a **tinyv** bundle: the language model quantized to "
        f"{_bits(q)}, the vision side one {v['precision']} ONNX graph, for tinyv to run on a laptop CPU.",
        _run_section(name, origin),
        _model_section(manifest, origin),
        _sources_section(manifest),
        _recipe_section(q, v),
        _quality_section(manifest),
    ]
    if accuracy:
        caption, table = accuracy
        parts.append(f"## Accuracy (`tinyv eval`)\n\n{caption}\n\n{table}")
    parts += [_files_section(manifest), f"## License\n\n`{license_id}`. {license_note}".rstrip()]
    return "\n\n".join(parts) + "\n"


def _bits(q: dict) -> str:
    if q["bits"] == 16:
        return "fp16"
    return f"{q['bits']} bits in groups of {q['group_size']} ({q['bits_per_weight']:.2f} bits per weight)"


def _run_section(name: str, origin: Origin) -> str:
    return (
        "## Run it with tinyv\n\n"
        "```bash\n"
        f"tinyv caption photo.jpg --bundle {name}\n"
        f"tinyv ask photo.jpg \"{origin.example_question}\" --bundle {name}\n"
        f"tinyv chat photo.jpg --bundle {name}\n"
        f"tinyv info {name} --verify\n"
        "```\n\n"
        "```python\n"
        "import tinyv\n\n"
        f"engine = tinyv.load(\"{name}\")\n"
        "print(engine.caption(\"photo.jpg\"))\n"
        "```\n\n"
        "tinyv fetches the manifest and exactly the files it lists into the Hugging Face cache, checks their "
        "sizes and sha256 before anything runs (the hashes once per downloaded revision), and runs nothing "
        "from the bundle but its weights. Once cached, it loads offline (`HF_HUB_OFFLINE=1`)."
    )


def _model_section(m: dict, origin: Origin) -> str:
    cfg = TinyGPTVConfig.from_dict(m["model"])
    vis, qf, phi, prompt = cfg.vision, cfg.qformer, cfg.phi, m["prompt"]
    rows = [
        ("model", f"{origin.title}, {cfg.image_size} px"),
        ("vision", f"EVA ViT {vis.depth} layers × {vis.width}, {vis.patch_size} px patches → Q-Former "
                   f"{qf.layers} layers × {qf.hidden}, {qf.num_queries} queries → projection to {phi.hidden}"),
        ("language model", f"Phi-2 {phi.layers} layers × {phi.hidden}, {phi.heads} heads, vocabulary "
                           f"{phi.vocab_size}, context {phi.max_positions} tokens"),
        ("prompt", f"`{prompt['template']}`, stops at {', '.join(f'`{s}`' for s in prompt['stop_strings'])}"),
        ("bundle", f"format {m['format_version']}, written by tinyv {m.get('tinyv_version', '?')} "
                   f"on {m.get('created', '?')}"),
    ]
    if origin.base_model:
        rows.insert(1, ("base model", f"[{origin.base_model}](https://huggingface.co/{origin.base_model})"))
    return "## Model\n\n" + _table(["", ""], rows)


def _sources_section(m: dict) -> str:
    rows = [(part, f["name"], f"{f['size']:,}", f"`{f['sha256']}`")
            for part, files in m.get("sources", {}).items() for f in files]
    if not rows:
        return "## Source checkpoints\n\nThe manifest records none."
    return ("## Source checkpoints\n\nExported (`tinyv export`) from these files; the sha256 are the manifest's.\n\n"
            + _table(["part", "file", "bytes", "sha256"], rows))


def _recipe_section(q: dict, v: dict) -> str:
    if q["bits"] == 16:
        llm = "fp16 weights, no quantization"
    else:
        llm = (f"{q['bits']}-bit, groups of {q['group_size']}, scheme `{q['scheme']}`, {q.get('scale_dtype', '?')} "
               f"scales, {q['bits_per_weight']:.2f} bits per weight")
    lines = [
        f"- **Language model** (`{q.get('llm_file', '?')}`, {q.get('llm_params', 0):,} parameters): {llm}; "
        f"{q.get('quantized', '')}.",
        f"- **Vision** (`{v['file']}`, ONNX opset {v.get('opset', '?')}): EVA ViT + ln_vision + Q-Former + the folded "
        f"projection in one graph, {v['precision']}.",
    ]
    int8 = v.get("int8")
    if int8:
        which = int8.get("quantized") or f"the {', '.join(int8.get('op_types', []))} weights"
        lines.append(f"  Dynamic int8 quantization of {which}, "
                     f"{'per channel' if int8.get('per_channel') else 'per tensor'} (the closer of the two to fp32).")
    return "## Quantization recipe\n\n" + "\n".join(lines)


def _quality_section(m: dict) -> str:
    qual, check = m.get("quality") or {}, m["vision"].get("verify") or {}
    rows = []
    if "sqnr_db" in qual:
        s = qual["sqnr_db"]
        rows.append(("language model layer SQNR, min / mean", f"{_num(s.get('min'), '.1f')} / "
                                                                f"{_num(s.get('mean'), '.1f')} dB"))
        worst = ", ".join(f"{w['layer']} {w['db']:.1f} dB" for w in s.get("worst", [])[:3])
        if worst:
            rows.append(("worst layers", worst))
    if "kl_mean" in qual:
        rows.append((f"next-token KL vs fp32, mean / max ({qual.get('steps', '?')} tokens)",
                     f"{_num(qual.get('kl_mean'), '.4f')} / {_num(qual.get('kl_max'), '.4f')}"))
    if "token_agreement" in qual:
        rows.append(("greedy agreement with fp32", f"{_num(qual['token_agreement'], '.1%')} over "
                                                  f"{qual.get('steps', '?')} tokens"))
    if "cosine_min" in check:
        rows.append((f"vision graph vs torch fp32 ({check.get('probes', '?')} probe images)",
                     f"cosine ≥ {check['cosine_min']:.15g}, max abs error {check.get('max_abs_err', float('nan')):.3g}"))
    if not rows:
        return "## Quality against fp32\n\nThe manifest records none."
    probe = f" (probe prompt `{qual['probe_prompt']}`)" if qual.get("probe_prompt") else ""
    return f"## Quality against fp32\n\nMeasured by `tinyv export`{probe}.\n\n" + _table(["figure", "value"], rows)


def _files_section(m: dict) -> str:
    rows = [(f"`{name}`", f"{e['size']:,}", f"`{e['sha256']}`") for name, e in sorted(m["files"].items())]
    return ("## Files\n\n`manifest.json` lists these; tinyv rejects a file whose size or sha256 differs.\n\n"
            + _table(["file", "bytes", "sha256"], rows))


def _num(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def _table(header: list, rows: list) -> str:
    align = ["---:" if h == "bytes" else "---" for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)
