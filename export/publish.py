"""``tinyv push``: a verified bundle and its generated model card, in one commit on the Hugging Face Hub.

``plan_push`` checks the bundle exactly as ``tinyv info --verify`` does (a bundle that fails is
refused before anything is sent), writes the card (``model_card.py``) and lists the files to send:
the card, the manifest and exactly the files the manifest lists. ``upload_to_hub`` sends them, the
one call that touches the network (tests replace it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from tinyv.engine.bundle import MANIFEST, load_bundle
from tinyv.engine.hub import parse_hub_name
from tinyv.errors import TinyVError
from tinyv.export.model_card import model_card

CARD_FILE = "README.md"


@dataclass(frozen=True)
class PushPlan:
    """What a push sends: ``files`` are (path in the repository, local path or bytes)."""

    repo_id: str
    revision: str | None
    private: bool
    card: str
    files: list
    message: str

    @property
    def names(self) -> list:
        return [path for path, _ in self.files]


def plan_push(bundle, repo_id: str, *, private: bool = False, revision: str | None = None,
              license: str | None = None, accuracy: tuple[str, str] | None = None) -> PushPlan:
    """Check ``bundle`` (sha256 of every file, as ``tinyv info --verify``) and make what pushing it sends."""
    repo_id = check_repo_id(repo_id)
    found = load_bundle(bundle, verify=True)
    manifest = found.manifest
    try:
        card = model_card(manifest, repo_id, revision=revision, license=license, accuracy=accuracy)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TinyVError(f"{found.name}: its manifest lacks what the model card needs ({e!r}); re-export the bundle") from None
    files = [(CARD_FILE, card.encode("utf-8")), (MANIFEST, os.path.join(found.folder, MANIFEST))]
    files += [(name, os.path.join(found.folder, name)) for name in sorted(manifest["files"])]
    q = manifest["quantization"]
    message = f"tinyv bundle: {'fp16' if q['bits'] == 16 else str(q['bits']) + '-bit'} LLM, " \
              f"{manifest['vision']['precision']} vision (format {manifest['format_version']})"
    return PushPlan(repo_id, revision, private, card, files, message)


def check_repo_id(repo_id: str) -> str:
    """``owner/repo`` (an ``hf://`` prefix is allowed); a branch goes in ``--revision``."""
    try:
        name = parse_hub_name(repo_id if repo_id.startswith("hf://") else "hf://" + repo_id)
    except TinyVError:
        raise TinyVError(f"the repository to push to is owner/repo, got {repo_id!r}") from None
    if name.revision:
        raise TinyVError(f"{repo_id}: give the branch with --revision, not after @")
    return name.repo


def upload_to_hub(plan: PushPlan) -> str:
    """Create the repository if needed (and the branch), then send every file in one commit: a
    reader never sees a half-pushed bundle. Returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, errors

    api = HfApi(library_name="tinyv")
    try:
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        if plan.revision:
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
        info = api.create_commit(plan.repo_id, [CommitOperationAdd(path, src) for path, src in plan.files],
                                 commit_message=plan.message, revision=plan.revision)
    except errors.OfflineModeIsEnabled:
        raise TinyVError(f"cannot push to {plan.repo_id}: HF_HUB_OFFLINE is set; unset it to push") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        raise TinyVError(f"cannot push to {plan.repo_id}: {e} (logged in? `hf auth login` or HF_TOKEN)") from None
    return info.commit_url
