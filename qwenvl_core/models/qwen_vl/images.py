"""The official Qwen-VL v1 pixel preprocessing (loading images is ``qwenvl_core.images``, for every family).

``preprocess_image``: bicubic resize to S x S (no aspect ratio, no crop), [0, 1] floats, OpenAI CLIP
normalisation, exactly as the official ``visual.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from qwenvl_core.images import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_image(image: Image.Image, image_size: int) -> torch.Tensor:
    """Official v1 preprocessing: bicubic resize to (S, S), [0, 1], CLIP normalise. Returns ``[3, S, S]``."""
    if image.mode != "RGB":
        image = to_rgb(image)
    resized = image.resize((image_size, image_size), resample=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)  # (S, S, 3)
    pixels = pixels.permute(2, 0, 1)  # (3, S, S)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return ((pixels - mean) / std).contiguous()
