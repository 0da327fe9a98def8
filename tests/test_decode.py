import numpy as np
import pytest
from PIL import Image

from pipelines.images.decode import BadImage, decode_batch, decode_canvas
from tests.helpers.corpus import bad_images, encode, good_images


@pytest.mark.parametrize("name", sorted(good_images()))
def test_every_mode_decodes_to_rgb_canvas(name):
    canvas = decode_canvas(good_images()[name], 24)
    assert canvas.shape == (24, 24, 3) and canvas.dtype == np.uint8


@pytest.mark.parametrize(
    "name, reason",
    [
        ("truncated.jpg", "corrupt image"),
        ("corrupt.png", "corrupt image"),
        ("empty.png", "empty bytes"),
        ("text.jpg", "not an image"),
        ("bomb.png", "decompression bomb"),
    ],
)
def test_bad_bytes_raise_with_reason(name, reason):
    with pytest.raises(BadImage, match=reason):
        decode_canvas(bad_images()[name], 24)


def test_null_image_and_explicit_pixel_limit():
    with pytest.raises(BadImage, match="null image"):
        decode_canvas(None, 8)
    with pytest.raises(BadImage, match="decompression bomb: 40x30 pixels > limit 100"):
        decode_canvas(good_images()["rgb.png"], 8, max_pixels=100)


def test_sixteen_bit_is_scaled_not_clipped():
    grey = np.array([[0, 32768], [65535, 16384]], dtype=np.uint16).repeat(8, 0).repeat(8, 1)
    canvas = decode_canvas(encode(Image.fromarray(grey)), 16)
    assert canvas[0, 0, 0] == 0 and canvas[15, 0, 0] == 255
    assert abs(int(canvas[0, 15, 0]) - 128) <= 1 and abs(int(canvas[15, 15, 0]) - 64) <= 1


def test_transparent_pixels_become_white():
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert (decode_canvas(encode(clear), 8) == 255).all()


def test_exif_orientation_is_applied():
    # Top half red, bottom half blue; EXIF 6 says "rotate 90 degrees clockwise to display",
    # which moves the top (red) to the right.
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:16, :, 0] = 255
    pixels[16:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    canvas = decode_canvas(encode(Image.fromarray(pixels), "PNG", exif=exif), 16)
    assert canvas[8, -1, 0] > 200 and canvas[8, -1, 2] < 50  # right column red
    assert canvas[8, 0, 2] > 200 and canvas[8, 0, 0] < 50  # left column blue
    upright = decode_canvas(encode(Image.fromarray(pixels), "PNG"), 16)
    assert upright[0, 8, 0] > 200 and upright[-1, 8, 2] > 200


def test_decode_batch_keeps_order_and_names_bad_ids():
    good, bad = good_images(), bad_images()
    values = [good["rgb.png"], bad["text.jpg"], {"bytes": good["l.png"], "path": "x"}, None]
    canvases, kept, skipped = decode_batch(values, ["a", "b", "c", "d"], 8)
    assert canvases.shape == (2, 8, 8, 3) and kept == [0, 2]
    assert [i for i, _ in skipped] == ["b", "d"]
