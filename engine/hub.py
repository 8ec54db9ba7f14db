"""Bundles on the Hugging Face Hub: ``hf://owner/repo[@revision]``, or a bare ``owner/repo``.

A hub bundle is fetched with ``huggingface_hub`` into its cache (``$HF_HUB_CACHE``, resumable,
progress bars on stderr): the manifest first, then exactly the files it lists, pinned to the
commit the manifest came from. It is untrusted input like a local bundle: the manifest is checked
before anything is downloaded by its names (plain names only), every file must resolve inside
the repository's cache folder, sizes are always checked, and sha256 once per downloaded revision
(the verified commit and its files' identities are remembered in tinyv's cache, so later loads do
not re-hash gigabytes). Offline (``HF_HUB_OFFLINE=1``) a cached revision loads with no network.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from tinyv.engine.bundle import MANIFEST, Bundle, check_files, check_manifest, read_json
from tinyv.engine.file_identity import read_stamp, write_stamp
from tinyv.engine.paths import cache_dir
from tinyv.errors import TinyVError

HUB_SCHEME = "hf://"
# owner/repo as the hub spells them; the hub's own validator has the last word
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
_REVISION = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_./-]*")


@dataclass(frozen=True)
class HubName:
    repo: str  # owner/repo
    revision: str | None = None  # branch, tag or commit; None: main
    bare: bool = False  # given without hf://, so it might have been meant as a local path

    def __str__(self) -> str:
        return HUB_SCHEME + self.repo + (f"@{self.revision}" if self.revision else "")


def parse_hub_name(spec: str) -> HubName | None:
    """The hub bundle ``spec`` names, or None when it names a local path.

    ``hf://owner/repo[@revision]`` is always a hub name; a bare ``owner/repo[@revision]`` is one
    only when no such local path exists (a local folder always wins).
    """
    explicit = spec.startswith(HUB_SCHEME)
    if not explicit and (os.path.exists(spec) or "/" not in spec):
        return None
    repo, at, revision = spec[len(HUB_SCHEME) if explicit else 0:].partition("@")
    if _REPO.fullmatch(repo) and (not at or _REVISION.fullmatch(revision)) and ".." not in revision:
        return HubName(repo, revision or None, bare=not explicit)
    if explicit:
        raise TinyVError(f"{spec} is not a hub bundle name: write hf://owner/repo or hf://owner/repo@revision")
    return None  # e.g. a mistyped nested path: read_manifest says it does not exist


def fetch_bundle(name: HubName, verify: bool = False) -> Bundle:
    """The hub bundle ``name``, downloaded where missing and checked (see the module docstring);
    ``verify`` re-hashes every file even if this revision was verified before."""
    manifest_path = _download(name, MANIFEST, name.revision)
    folder = os.path.dirname(manifest_path)  # <cache>/models--owner--repo/snapshots/<commit>
    commit = os.path.basename(folder)
    repo_root = os.path.dirname(os.path.dirname(folder))
    label = f"{name} (commit {commit[:12]})"
    manifest = check_manifest(read_json(manifest_path, "{path} is not readable JSON ({reason})"), label)
    for file in sorted(manifest["files"]):  # only the listed files, at the manifest's commit
        _download(name, file, commit)
    damaged = "the cached download is damaged: delete {path} and run again to fetch it anew"
    check_files(folder, manifest, root=repo_root, remedy=damaged)
    fingerprint = _fingerprint(folder, manifest)
    record = _record_path(name.repo, commit)
    if verify or read_stamp(record) != fingerprint:
        check_files(folder, manifest, verify=True, root=repo_root, remedy=damaged)
        write_stamp(record, fingerprint)
    return Bundle(folder, manifest, str(name), commit)


def _download(name: HubName, filename: str, revision: str | None) -> str:
    """The cached path of ``filename`` of ``name`` at ``revision``, downloaded if missing."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    what = f"{name}" if filename == MANIFEST else f"{filename} of {name}"
    if name.bare and filename == MANIFEST:
        what = f"{str(name)[len(HUB_SCHEME):]} is no local folder, and as a hub bundle {name}"
    try:
        return huggingface_hub.hf_hub_download(name.repo, filename, revision=revision, library_name="tinyv")
    except errors.LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: first)
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise TinyVError(f"{what} is not in the Hugging Face cache and {why}: fetch it once while connected, "
                         "or give a local bundle folder") from None
    except errors.GatedRepoError:
        raise TinyVError(f"{name.repo} is a gated repository: accept its terms on the hub and log in "
                         "(`hf auth login` or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise TinyVError(f"bundle not found: {name.repo} is no local folder and no Hugging Face Hub repository "
                         "you can read (a private one needs `hf auth login` or HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise TinyVError(f"{name.repo} has no revision {revision!r} on the hub") from None
    except errors.EntryNotFoundError:
        if filename == MANIFEST:
            raise TinyVError(f"{name} has no {MANIFEST}: it is not a tinyv bundle") from None
        raise TinyVError(f"{name} lists {filename} in its manifest but the repository lacks it: "
                         "the bundle was pushed incompletely") from None
    except errors.HFValidationError as e:
        raise TinyVError(f"{name} is not a valid hub name: {e}") from None
    except errors.HfHubHTTPError as e:
        raise TinyVError(f"cannot fetch {what}: {e}") from None
    except OSError as e:  # a full disk, an unwritable cache
        raise TinyVError(f"cannot fetch {what} into the Hugging Face cache: {e}") from None


def _fingerprint(folder: str, manifest: dict) -> dict:
    """What identifies the downloaded files on disk: a re-download or an edit changes it."""
    out = {}
    for file in [MANIFEST, *sorted(manifest["files"])]:
        real = os.path.realpath(os.path.join(folder, file))
        st = os.stat(real)
        out[file] = {"blob": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
                     "sha256": manifest["files"].get(file, {}).get("sha256")}
    return out


def _record_path(repo: str, commit: str) -> str:
    return os.path.join(cache_dir(), "hub-verified", repo.replace("/", "--"), f"{commit}.json")


