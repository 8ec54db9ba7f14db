"""tinyv export / tinyv info."""
from __future__ import annotations

import json
import sys

import click

from tinyv.cli.main import checkpoint_options, checkpoint_sources, cli


class StageProgress:
    """One progress bar per export stage, on stderr (stdout stays clean for --json)."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.stage, self.bar = enabled, None, None
        self.tty = sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if not self.tty:  # a log, not a terminal: one line per finished stage
            if done >= total and stage != self.stage:
                click.echo(f"{stage}: done", err=True)
                self.stage = stage
            return
        if stage != self.stage:
            self.close()
            from tqdm import tqdm

            self.stage = stage
            self.bar = tqdm(total=total, desc=f"{stage:<16}", file=sys.stderr, leave=True,
                            bar_format="{desc} {bar:30} {n_fmt}/{total_fmt} [{elapsed}]")
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@cli.command("export")
@checkpoint_options
@click.option("--bits", type=click.Choice(["4", "8", "16"]), default="4", show_default=True, help="LLM weight bits.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True)
@click.option("--vision", type=click.Choice(["fp32", "int8"]), default="int8", show_default=True,
              help="Precision of the fused vision graph: int8 (the ViT's weight MatMuls in int8, the Q-Former's "
                   "weights in 8 bits; 2.6x faster, a quarter of the memory) or fp32.")
@click.option("--output", "-o", required=True, type=click.Path(), help="Bundle folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at -o.")
@click.option("--min-sqnr", type=float, help="Fail if any quantized layer's SQNR (dB) is below this.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), help="Fail if greedy agreement with fp32 is below this.")
@click.option("--max-kl", type=click.FloatRange(min=0), help="Fail if the mean next-token KL vs fp32 exceeds this.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def export_cmd(bits, group_size, vision, output, force, min_sqnr, min_agreement, max_kl, as_json, **ckpt):
    """Export checkpoints to a quantized bundle (vision ONNX + quantized Phi-2)."""
    given = checkpoint_sources(ckpt, "export")
    from tinyv.export.bundle import export_bundle

    bar = StageProgress(enabled=True)
    try:
        m = export_bundle(**given, out=output, bits=int(bits), group_size=int(group_size), vision=vision,
                          image_size=ckpt.get("image_size"), preset=ckpt.get("preset"), min_sqnr=min_sqnr,
                          min_agreement=min_agreement, max_kl=max_kl, force=force, progress=bar)
    finally:
        bar.close()
    summary = export_summary(output, m)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        q = summary["quality"]
        click.echo(f"wrote {output}: {summary['size_mb']:.1f} MB in {summary['seconds']:.1f} s")
        click.echo(f"vision {vision}: cosine vs fp32 {summary['vision_cosine']:.6f}")
        click.echo(f"LLM {bits}-bit: layer SQNR min {q['sqnr_min_db']:.1f} dB mean {q['sqnr_mean_db']:.1f} dB; "
                   f"KL mean {q['kl_mean']:.4f} max {q['kl_max']:.4f}; greedy agreement "
                   f"{q['token_agreement']:.1%} over {q['steps']} tokens")


def export_summary(output: str, m: dict) -> dict:
    q = m["quality"]
    return {
        "bundle": output,
        "bits": m["quantization"]["bits"],
        "group_size": m["quantization"]["group_size"],
        "vision": m["vision"]["precision"],
        "files": {k: v["size"] for k, v in m["files"].items()},
        "size_mb": sum(v["size"] for v in m["files"].values()) / 1e6,
        "seconds": m["export_timings"]["total_s"],
        "timings": m["export_timings"],
        "vision_cosine": m["vision"]["verify"]["cosine_min"],
        "vision_max_abs_err": m["vision"]["verify"]["max_abs_err"],
        "quality": {
            "sqnr_min_db": q["sqnr_db"]["min"], "sqnr_mean_db": q["sqnr_db"]["mean"],
            "kl_mean": q["kl_mean"], "kl_max": q["kl_max"], "token_agreement": q["token_agreement"],
            "steps": q["steps"],
        },
        "memory": m.get("export_memory"),  # RSS at the end of each stage and the peak so far, MB
    }


@cli.command()
@click.argument("bundle")
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(bundle, verify, as_json):
    """Describe BUNDLE (a folder, or hf://owner/repo[@revision]) and check its files."""
    from tinyv.engine.bundle import format_manifest, load_bundle

    found = load_bundle(bundle, verify=verify)
    if as_json:
        click.echo(json.dumps(found.manifest, indent=2))
        return
    if found.commit:
        click.echo(f"{found.name}: commit {found.commit}, cached in {found.folder}")
    click.echo(format_manifest(found.manifest))
    if verify:
        click.echo("files verified (sha256)")
    elif found.commit:
        click.echo("file sizes checked; sha256 verified once for this revision (add --verify to re-hash)")
    else:
        click.echo("file sizes checked (add --verify for sha256)")
