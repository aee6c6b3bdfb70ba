"""Readers for client data: ``.npz`` arrays and folders of image/mask pairs.

Both return a :class:`RawClient`: images (N, H, W) or (N, H, W, 3), masks (N, H, W) in {0, 1},
case ids, and notes about conversions that were made (255-valued masks, thresholded JPEG masks,
merged extra masks). Every check runs here, before any training, and every error names the file.

:mod:`.raw` holds the type, the size limits and the mask check every reader shares; :mod:`.npz`
reads ``.npz`` files, :mod:`.images` single image and mask files, :mod:`.folder` folders of them.
"""

from fedoap.data.sources.folder import load_folder
from fedoap.data.sources.images import IMAGE_EXTENSIONS, LOSSY_EXTENSIONS, read_image, read_mask
from fedoap.data.sources.npz import (
    DEFLATE_MAX_RATIO,
    IMAGE_KINDS,
    MASK_KINDS,
    ZIP_MAGICS,
    load_npz,
)
from fedoap.data.sources.raw import (
    MAX_IMAGE_PIXELS,
    MAX_VOLUME_VOXELS,
    RawClient,
    check_mask_values,
)

__all__ = [
    "DEFLATE_MAX_RATIO",
    "IMAGE_EXTENSIONS",
    "IMAGE_KINDS",
    "LOSSY_EXTENSIONS",
    "MASK_KINDS",
    "MAX_IMAGE_PIXELS",
    "MAX_VOLUME_VOXELS",
    "ZIP_MAGICS",
    "RawClient",
    "check_mask_values",
    "load_folder",
    "load_npz",
    "read_image",
    "read_mask",
]
