"""Planted massive activations (tinyv.testing outliers=N): the residual streams of Phi-2 and the
ViT get the few huge channels real checkpoints have, and only those channels."""
import pytest
import torch

import tinyv
from tinyv.testing import outlier_channels, write_checkpoints


def _residual_channel_peaks(paths) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per model: (each channel's peak |activation|, the median |activation|) entering the last layer."""
    model = tinyv.TinyGPTV.from_checkpoints(**paths.as_kwargs(), preset="tiny")
    seen = {}

    def record(name):
        def hook(module, inputs):
            x = inputs[0].detach().abs().flatten(0, -2)
            seen[name] = (x.amax(0), x.median())
        return hook

    model.visual.blocks[-1].norm1.register_forward_pre_hook(record("vit"))
    model.phi.layers[-1].input_layernorm.register_forward_pre_hook(record("phi"))
    size = model.config.vision.image_size
    with torch.no_grad():
        image = model.encode_pixels(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
        model.phi(torch.cat([model.phi.embed(torch.arange(12)[None]), image], 1))
    return seen


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return _residual_channel_peaks(write_checkpoints(str(tmp_path_factory.mktemp("outliers")), "tiny", seed=0,
                                                     outliers=4))


def test_planting_makes_the_chosen_channels_huge(planted):
    for name, (peaks, median) in planted.items():
        assert sorted(peaks.topk(4).indices.tolist()) == outlier_channels(peaks.numel(), 4), name
        assert peaks.max() / median > 30, name  # 10-100x the rest, as in real checkpoints


def test_without_planting_no_channel_stands_out(tiny_paths):
    for name, (peaks, median) in _residual_channel_peaks(tiny_paths).items():
        assert peaks.max() / median < 15, name


def test_planting_leaves_the_other_weights_of_the_seed_alone(tmp_path, tiny_paths):
    from safetensors.torch import load_file

    plain = load_file(f"{tiny_paths.phi2}/model.safetensors")
    paths = write_checkpoints(str(tmp_path), "tiny", seed=0, outliers=2)
    grown = load_file(f"{paths.phi2}/model.safetensors")
    changed = {k for k in plain if not torch.equal(plain[k], grown[k])}
    assert changed == {"model.embed_tokens.weight"} | {k for k in plain if k.endswith("mlp.fc2.bias")}
