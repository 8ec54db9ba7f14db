"""Shared fixtures: tiny checkpoints in the real formats, written once per test session."""
import threading

import pytest
import torch
from PIL import Image, ImageDraw


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    from tinyv.testing import write_checkpoints

    return write_checkpoints(str(tmp_path_factory.mktemp("ckpt")), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_paths):
    import tinyv

    return tinyv.TinyGPTV.from_checkpoints(**tiny_paths.as_kwargs(), preset="tiny")


class TinyBundles:
    """Tiny bundles exported on first request and shared by the whole test session (an export
    takes seconds; tests that only read a bundle must not each make their own)."""

    def __init__(self, paths, root):
        self.paths, self.root, self.made = paths, root, {}

    def __call__(self, bits: int = 16, vision: str = "fp32") -> str:
        key = (bits, vision)
        if key not in self.made:
            from tinyv.export.bundle import export_bundle

            out = self.root / f"b{bits}-{vision}"
            self.made[key] = (str(out), export_bundle(**self.paths.as_kwargs(), out=str(out), preset="tiny",
                                                      bits=bits, vision=vision))
        return self.made[key][0]

    def manifest(self, bits: int = 16, vision: str = "fp32") -> dict:
        """What export_bundle returned for that bundle."""
        self(bits, vision)
        return self.made[(bits, vision)][1]


@pytest.fixture(scope="session")
def tiny_bundle(tiny_paths, tmp_path_factory):
    """``tiny_bundle(bits, vision)`` -> the path of a shared tiny bundle (read it, never change it)."""
    return TinyBundles(tiny_paths, tmp_path_factory.mktemp("shared-bundles"))


@pytest.fixture(scope="session")
def scene():
    img = Image.new("RGB", (160, 120), "white")
    d = ImageDraw.Draw(img)
    d.ellipse((10, 30, 70, 90), fill=(220, 30, 30))
    d.rectangle((95, 30, 150, 90), fill=(30, 60, 220))
    return img


@pytest.fixture(scope="session")
def other_image():
    img = Image.new("RGB", (100, 140), (240, 240, 200))
    d = ImageDraw.Draw(img)
    d.polygon([(10, 120), (50, 20), (90, 120)], fill=(20, 160, 40))
    return img


@pytest.fixture(scope="session")
def scene_embeds(tiny_model, scene):
    """The fp32 reference's image embeddings of ``scene``, computed once: tests of the language
    side pass them instead of the image (the reference takes either)."""
    return tiny_model.encode_image(scene)


@pytest.fixture(scope="session")
def scene_path(scene, tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    scene.save(path)
    return str(path)


@pytest.fixture
def torch_kernels(monkeypatch):
    """The pure-torch Linear path for the engines one test opens (``open_kernels`` returns None)."""
    monkeypatch.setenv("TINYV_KERNELS", "torch")


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """No test may touch the user's cache (default model, default embedding cache)."""
    monkeypatch.setenv("TINYV_CACHE", str(tmp_path / "tinyv-cache"))
    monkeypatch.delenv("TINYV_DEBUG", raising=False)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread for the whole session (a test that wants more sets it itself): on a
    busy 2-core machine torch's spinning pool runs the tiny model up to 100x slower (a 160-wide
    LayerNorm took 5 ms); results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class OfflineHub:
    """A Hugging Face Hub cache laid out exactly as huggingface_hub writes it, for offline tests."""

    def __init__(self, cache):
        self.cache = cache

    def add(self, repo: str, folder: str, commit: str, ref: str | None = "main") -> str:
        """Cache ``folder``'s files as a download of ``repo`` at ``commit`` (named by ``ref``):
        blobs/<sha256>, snapshots/<commit>/<name> -> ../../blobs/<sha256>, refs/<ref> = commit."""
        import hashlib
        import os

        root = os.path.join(self.cache, "models--" + repo.replace("/", "--"))
        snapshot = os.path.join(root, "snapshots", commit)
        os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
        os.makedirs(snapshot)
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            blob = hashlib.sha256(data).hexdigest()  # the hub names LFS blobs by their sha256
            if not os.path.exists(os.path.join(root, "blobs", blob)):
                with open(os.path.join(root, "blobs", blob), "wb") as f:
                    f.write(data)
            os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
        if ref:
            os.makedirs(os.path.join(root, "refs"), exist_ok=True)
            with open(os.path.join(root, "refs", ref), "w") as f:
                f.write(commit)
        return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path, offline (HF_HUB_OFFLINE=1), tinyv's cache there too.
    huggingface_hub reads its environment once, at import: its constants are set as well."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TINYV_CACHE", str(tmp_path / "tinyv-cache"))
    monkeypatch.delenv("TINYV_DEBUG", raising=False)
    return OfflineHub(cache)


HANG_GUARD_S = 120  # a wait that outlives this is a hang, not a slow machine


class GatedSampler:
    """Greedy; counts its calls and, at call ``gate_at``, waits for ``open`` (holding the worker)."""

    def __init__(self, gate_at: int):
        self.calls, self.gate_at = 0, gate_at
        self.open, self.reached = threading.Event(), threading.Event()

    def __call__(self, logits, history):
        self.calls += 1
        if self.calls == self.gate_at:
            self.reached.set()
            assert self.open.wait(HANG_GUARD_S)
        return int(torch.argmax(logits))


@pytest.fixture
def gate_sampling(monkeypatch):
    """``gate_sampling(n)``: answers from here on sample through one GatedSampler, which holds the
    engine's worker at its n-th call until its ``open`` is set; returns it."""
    from tinyv.engine import generate

    def install(gate_at: int) -> GatedSampler:
        gate = GatedSampler(gate_at)
        monkeypatch.setattr(generate, "make_sampler", lambda *a, **k: gate)
        return gate

    return install
