"""Image files (PNG, JPEG, TIFF, BMP) as arrays, their size checked from the header before any
pixel is decoded; mask files as {0, 1} masks."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedoap.data.errors import DataError
from fedoap.data.sources.raw import MAX_IMAGE_PIXELS, check_mask_values, too_large

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LOSSY_EXTENSIONS = (".jpg", ".jpeg")


def _bomb_error(path: Path, err: Exception, max_pixels: int) -> DataError:
    """PIL's own refusal of a huge image (raised inside ``Image.open``, before our bound can be
    checked) as a :class:`DataError` naming the file and the bound."""
    hit = re.search(r"\((\d+) pixels\)", str(err))
    pixels = int(hit.group(1)) if hit else None
    if pixels is not None and pixels <= max_pixels:
        # Only for a bound raised past PIL's hard limit (2 x Image.MAX_IMAGE_PIXELS, 179 MP).
        return DataError(f"{path}: PIL refuses to decode it: {err}")
    size = f"{pixels:,}" if pixels is not None else "too many"
    return DataError(
        f"{path}: image is {size} pixels, more than the limit of {max_pixels:,} "
        "(data.max_image_pixels; raise it if the data is genuine); not decoded"
    )


def read_image(
    path: Path, channels: int, channel: int | None = None, *, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Read one image file as (H, W) (channels=1) or (H, W, 3); errors name the file.

    Its size is read from the header and checked against ``max_pixels`` (height x width) before
    any pixel is decoded: a 164 KB PNG can declare 13000 x 13000 pixels and cost 2 GB to decode.
    """
    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # PIL warns in Image.open above Image.MAX_IMAGE_PIXELS (89 MP): our own check of the
            # same size follows at once, with a message that names the file and the bound.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size  # from the header: Image.open decodes no pixel
                if w * h > max_pixels:
                    raise DataError(
                        f"{path}: " + too_large("image is", w, h, max_pixels) + "; not decoded"
                    )
                # A warning while decoding concerns a size not checked above (a plugin's other
                # frame or resolution): an error, unless the bound was raised past PIL's limit.
                if pil_limit is None or max_pixels <= pil_limit:
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()  # forces decoding: a truncated file fails here, not later
                arr = np.asarray(im)
    except DataError:
        raise
    except FileNotFoundError as err:
        raise DataError(f"image file not found: {path}") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _bomb_error(path, err, max_pixels) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot decode image (corrupt or truncated?): {err}") from err
    if arr.ndim == 3 and arr.shape[-1] == 4:  # drop alpha
        arr = arr[..., :3]
    if channels == 1:
        if arr.ndim == 3:
            if channel is not None:
                if channel >= arr.shape[-1]:
                    raise DataError(
                        f"{path}: has {arr.shape[-1]} channels, channel={channel} asked"
                    )
                arr = arr[..., channel]
            else:  # ITU-R 601 luma, as PIL's "L" conversion
                arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: image contains NaN or infinite values")
    return arr


def read_mask(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, str | None]:
    arr = read_image(path, channels=1, max_pixels=max_pixels)
    if arr.dtype != np.uint8:
        arr = np.rint(arr).astype(np.int64)
    return check_mask_values(arr, str(path), lossy=path.suffix.lower() in LOSSY_EXTENSIONS)
