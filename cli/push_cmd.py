"""tinyv push: publish a bundle, with a generated model card, on the Hugging Face Hub."""
from __future__ import annotations

import click

from tinyv.cli.main import cli


@cli.command("push")
@click.argument("bundle")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its visibility).")
@click.option("--revision", help="Branch to push to, created if missing (default: main).")
@click.option("--eval", "eval_json", type=click.Path(exists=True, dir_okay=False),
              help="Output of `tinyv eval --json`: its accuracy table goes into the model card.")
@click.option("--license", "license_id",
              help="License id of the source weights (known without it for TinyGPT-V and the demo model).")
@click.option("--dry-run", is_flag=True, help="Send nothing: print the model card and the files a push would send.")
def push_cmd(bundle, repo_id, private, revision, eval_json, license_id, dry_run):
    """Upload BUNDLE to the hub repository REPO_ID (owner/repo) with a generated README model card.

    The bundle is checked first as `tinyv info --verify` does (sha256 of every file); one that fails
    is refused. Everything goes in one commit. Log in first (`hf auth login` or HF_TOKEN).
    """
    from tinyv.export import publish

    accuracy = None
    if eval_json:
        from tinyv.demo.evaluate import read_results

        accuracy = read_results(eval_json)
    plan = publish.plan_push(bundle, repo_id, private=private, revision=revision, license=license_id,
                             accuracy=accuracy)
    if dry_run:
        click.echo(plan.card)
        click.echo(f"would send to {plan.repo_id}{'@' + revision if revision else ''}: {', '.join(plan.names)}", err=True)
        return
    url = publish.upload_to_hub(plan)
    click.echo(f"pushed {len(plan.files)} files to {plan.repo_id}: {url}")
    click.echo(f"run it: tinyv caption photo.jpg --bundle hf://{plan.repo_id}{'@' + revision if revision else ''}")
