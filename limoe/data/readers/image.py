"""Images: decoded and cropped in the worker, or with `resize_on="device"` cut to their crop's box
and resized on the device, or with `decode_on="device"` too only their headers read in the worker.

An image is decoded at a reduced scale where it is much larger than its crop needs
(`limoe.data.images.decode_rgb`); the crop boxes are `limoe.data.crops`': a random box of the
training crop's distribution, or the eval crop (resize the shorter side, centre crop).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Union

import numpy as np
from PIL import Image

from limoe.data.crops import (
    Uncropped, Window, box_pixels, centre_region, centre_window, crop_in_worker, draw_box, encoded_batch,
    largest_box_side, min_decoded_side, stack_crops, uncropped_batch,
)
from limoe.data.device_decode import Region
from limoe.data.images import Header, UnusableImage, decode_rgb, read_header
from limoe.data.preprocess import eval_crop, normalize
from limoe.data.readers import Reader

if TYPE_CHECKING:
    import torch

    from limoe.config import ModelConfig


@dataclass(frozen=True)
class ImageReader(Reader):
    """Images cropped to `image_size`, where `resize_on` and `decode_on` say."""

    image_size: int
    resize_on: Literal["worker", "device"] = "worker"
    decode_on: Literal["worker", "device"] = "worker"

    name = "image"
    extensions = ("jpg", "jpeg", "png", "webp")
    listed_captions = False
    unusable = UnusableImage
    inputs = "images"
    uncropped_on_device = True

    @classmethod
    def from_options(cls, image_size: int, resize_on: Literal["worker", "device"],
                     decode_on: Literal["worker", "device"]) -> ImageReader:
        return cls(image_size, resize_on, decode_on)

    @classmethod
    def loader_options(cls, config: ModelConfig) -> dict:
        return {}

    @classmethod
    def input_bytes(cls, config: ModelConfig, resize_on: Literal["worker", "device"]) -> int:
        """uint8 [3, S, S], or [H, W, 3] uncropped at the largest box it can carry."""
        side = largest_box_side(config.image_size) if resize_on == "device" else config.image_size
        return 3 * side * side

    def decode(self, data: bytes, train: bool, draws: Optional[random.Random]
               ) -> Union[Image.Image, tuple[Header, bytes]]:
        """An RGB image decoded with its shorter side reduced towards what the crop needs where it is
        much larger; or, with decode_on="device", only its header read (its bounds checked) and its
        bytes kept for the device."""
        if self.decode_on == "device":
            return read_header(data), data
        return decode_rgb(io.BytesIO(data), self._needed_side(train))

    def prepare(self, decoded: Union[Image.Image, tuple[Header, bytes]], train: bool
                ) -> Union[np.ndarray, Window, tuple]:
        """The image's [S, S, 3] uint8 crop, or with resize_on="device" the [h, w, 3] uint8 pixels of
        its random box (training) or the pixels around its centre crop and the crop's window in them
        (evaluation). With decode_on="device" the same boxes are drawn from the header's size:
        (header, bytes, the region the crop reads, the crop's window in it)."""
        if self.decode_on == "device":
            header, data = decoded
            if not train:
                return (header, data, *centre_region(header.size, self.image_size))
            box = draw_box(header, self.image_size)
            return header, data, Region(*box), (0.0, 0.0, float(box.height), float(box.width))
        if not train:
            if self.resize_on == "device":
                return centre_window(decoded, self.image_size)
            return np.asarray(eval_crop(self.image_size)(decoded))
        box = draw_box(decoded, self.image_size)
        if self.resize_on == "device":
            return box_pixels(decoded, box)
        return crop_in_worker(decoded, box, self.image_size)

    def collate(self, inputs: list, train: bool) -> Union[torch.Tensor, Uncropped]:
        """[B, 3, S, S] uint8 crops (float32, normalised, in evaluation), or an `Uncropped` the device
        decodes (decode_on="device") and crops (resize_on="device")."""
        if self.decode_on == "device":  # each input holds (header, bytes, region, window)
            return encoded_batch(*map(list, zip(*inputs)), self.image_size, self._needed_side(train))
        if self.resize_on == "device" and train:  # each input holds its box's pixels
            return uncropped_batch(inputs, self.image_size)
        if self.resize_on == "device":  # each input holds a Window: pixels and the eval crop's window in them
            return uncropped_batch([w.pixels for w in inputs], self.image_size, [w.window for w in inputs])
        images = stack_crops(inputs)
        return images if train else normalize(images)

    def _needed_side(self, train: bool) -> int:
        """The shorter side a decoded image needs: what the smallest random crop spans, or the eval crop."""
        return min_decoded_side(self.image_size) if train else self.image_size


READER = ImageReader
