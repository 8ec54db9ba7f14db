import numpy as np
import pytest
import torch
from PIL import Image

from tinyv import TinyVError
from tinyv.engine.image import MEAN, STD, open_image, preprocess


def test_preprocess_matches_independent_computation(scene):
    x = preprocess(scene, 112)
    assert x.shape == (1, 3, 112, 112) and x.dtype == torch.float32
    ref = np.asarray(scene.resize((112, 112), Image.BICUBIC), dtype=np.float64) / 255.0
    ref = (ref - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), ref, atol=1e-5)


def test_straight_resize_keeps_no_aspect_and_crops_nothing():
    # left half red, right half blue, 4:1 aspect: a centre crop would lose the colours' balance
    img = Image.new("RGB", (400, 100), (255, 0, 0))
    img.paste((0, 0, 255), (200, 0, 400, 100))
    x = preprocess(img, 28)[0]
    red = (1 - MEAN[0]) / STD[0]
    assert torch.allclose(x[0, :, :10], torch.full((28, 10), red), atol=1e-3)
    assert torch.allclose(x[2, :, 18:], torch.full((28, 10), (1 - MEAN[2]) / STD[2]), atol=1e-3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_modes_become_rgb(mode, scene):
    img = scene.convert(mode)
    x = preprocess(img, 56)
    assert x.shape == (1, 3, 56, 56)
    assert torch.isfinite(x).all()


def test_bytes_and_paths(scene, scene_path):
    with open(scene_path, "rb") as f:
        data = f.read()
    assert torch.equal(preprocess(data, 56), preprocess(scene_path, 56))


@pytest.mark.parametrize(
    "bad, message",
    [(b"not an image at all", "cannot read"), ("/nonexistent/photo.jpg", "not found"), (3.5, "expected an image")],
)
def test_bad_images_raise_one_clear_error(bad, message):
    with pytest.raises(TinyVError, match=message):
        open_image(bad)


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(TinyVError, match="folder"):
        open_image(tmp_path)


def test_truncated_image_file(tmp_path, scene):
    path = tmp_path / "cut.png"
    scene.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TinyVError, match="cannot read"):
        open_image(path)
