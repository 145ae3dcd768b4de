"""ddpm_jax.images: uint8 conversion, grid layout and PNG files read back with PIL."""

import jax
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import images


def test_to_uint8_inverts_the_data_normalisation():
    u = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(images.to_uint8(u / 127.5 - 1.0), u)
    x = np.array([-3.0, -1.0, -0.999, 0.0, 0.999, 1.0, 2.0], np.float32)
    expected = [0, 0, 0, 128, 255, 255, 255]  # 127.5 and 254.87 round to 128 and 255
    np.testing.assert_array_equal(images.to_uint8(x), expected)
    assert images.to_uint8(x).dtype == np.uint8
    np.testing.assert_array_equal(jax.jit(images.to_uint8)(x), expected)


def test_make_grid_layout():
    batch = np.stack([np.full((2, 3, 1), 10 * (k + 1), np.uint8) for k in range(5)])
    grid = images.make_grid(batch, ncols=3, padding=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1) and grid.dtype == np.uint8
    for k in range(5):
        top, left = 1 + (k // 3) * 3, 1 + (k % 3) * 4
        np.testing.assert_array_equal(grid[top : top + 2, left : left + 3], 10 * (k + 1))
    # Padding and the empty sixth cell are pad_value.
    assert (grid[0] == 0).all() and (grid[:, 0] == 0).all() and (grid[4:6, 9:12] == 0).all()
    assert images.make_grid(batch).shape == (2 * 4 + 2, 3 * 5 + 2, 1)  # ncols = ceil(sqrt(5))


@pytest.mark.parametrize("channels", [1, 3])
def test_write_grid_png(tmp_path, channels):
    rng = np.random.default_rng(0)
    batch = rng.uniform(-1, 1, (4, 5, 6, channels)).astype(np.float32)
    path = tmp_path / "sub" / "grid.png"
    images.write_grid(path, batch, ncols=2, padding=0)
    with Image.open(path) as png:
        assert png.mode == ("L" if channels == 1 else "RGB")
        pixels = np.asarray(png).reshape(10, 12, channels)
    np.testing.assert_array_equal(pixels[5:, 6:], images.to_uint8(batch[3]))


def test_write_trajectory(tmp_path):
    frames = np.zeros((4, 10, 2, 2, 3), np.uint8)  # 4 frames of 10 samples
    for f in range(4):
        for b in range(10):
            frames[f, b] = 10 * f + b
    path = tmp_path / "traj.png"
    images.write_trajectory(path, frames, max_rows=3, padding=0)
    with Image.open(path) as png:
        strip = np.asarray(png)
    assert strip.shape == (3 * 2, 4 * 2, 3)
    expected = [[10 * f + b for f in range(4)] for b in range(3)]  # rows: samples; columns: frames
    np.testing.assert_array_equal(strip[::2, ::2, 0], expected)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="uint8 or float"):
        images.make_grid(np.zeros((1, 2, 2, 3), np.int32))
    with pytest.raises(ValueError, match="N, H, W, C"):
        images.make_grid(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="1 or 3"):
        images.write_grid(tmp_path / "x.png", np.zeros((1, 2, 2, 4), np.uint8))
    with pytest.raises(ValueError, match="F, B, H, W, C"):
        images.write_trajectory(tmp_path / "x.png", np.zeros((1, 2, 2, 3), np.uint8))
