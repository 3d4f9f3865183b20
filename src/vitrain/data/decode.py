"""The fast CPU input path: encoded image -> uint8 crop in the worker, float work on the device.

Per sample, in a DataLoader worker (one core), with the times measured here on 500x375 quality-90
JPEGs (bench/loader.py's files):
- decode with libjpeg-turbo through simplejpeg: 0.84 ms, against 0.93-1.0 ms for
  torchvision.io.decode_jpeg and 1.35 ms for PIL;
- the RandomResizedCrop box is drawn from the header's size before decoding, by timm's get_params,
  the pil path's (torchvision's algorithm on python's random: 3 us, not 50 us), so that a crop with
  room to spare is decoded at 1/2, 1/4 or 1/8 scale in the DCT. Only those: libjpeg-turbo's other
  M/8 scales took longer than a full decode (1.05-1.3 ms);
- crop + resize with torch's vectorised antialiased uint8 kernels: 0.35 ms, against 0.8-1.0 ms for
  PIL's; then the flip, and RandAugment (when configured) on a PIL view of the crop, as timm does.
The sample stays uint8: 4x fewer bytes to collate, pin and copy. DeviceNormalize turns the batch
into normalised floats and applies timm's RandomErasing, on the device, from the datamodule's
on_after_batch_transfer.

Other formats (PNG, GIF, ...) and CMYK/YCCK JPEGs, which libjpeg-turbo cannot turn into RGB, are
decoded by PIL, then go through the same crop and resize. Every decoder's failure is one of
images.IMAGE_ERRORS, so that RobustImageFolder's data.on_bad_sample handling sees it.
"""

import io
import math
from pathlib import Path

import numpy as np
import simplejpeg
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.nn.functional import interpolate
from torchvision.transforms import InterpolationMode

from vitrain.data.transforms import pillow13_safe
from vitrain.errors import UserError

INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}
PIL_INTERPOLATIONS = {
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "nearest": Image.NEAREST,
}
_JPEG_MAGIC = b"\xff\xd8"
_RGB_DECODABLE = ("Gray", "YCbCr", "RGB")  # simplejpeg's names; CMYK and YCCK go through PIL
_DCT_SCALES = (8, 4, 2)  # the reduced-scale decodes that are faster than a full one


def _read(source: bytes | str | Path) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    with open(source, "rb") as handle:
        return handle.read()


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG libjpeg-turbo can decode to RGB; None for anything else."""
    if not data.startswith(_JPEG_MAGIC):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # let PIL decide: it names the problem, or reads what libjpeg-turbo cannot
    return (height, width) if colorspace in _RGB_DECODABLE else None


def _dct_divisor(region_h: float, region_w: float, need_h: float, need_w: float) -> int:
    """The largest 1/d DCT scale that keeps the region at least need_h x need_w pixels."""
    for divisor in _DCT_SCALES:
        if region_h / divisor >= need_h and region_w / divisor >= need_w:
            return divisor
    return 1


def _pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))  # convert() decodes it all: errors surface here


def _decode_rgb(data: bytes, size: tuple[int, int] | None, divisor: int) -> torch.Tensor:
    """uint8 CHW (a view of an HWC array, the layout torch's fast uint8 resize wants)."""
    if size is None:
        return torch.from_numpy(_pil_rgb(data)).permute(2, 0, 1)
    height, width = size
    try:
        array = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            min_height=math.ceil(height / divisor),
            min_width=math.ceil(width / divisor),
        )
    except ValueError:
        # simplejpeg's strict mode also refuses what libjpeg only warns about (e.g. extraneous
        # bytes before a marker), which PIL, the pil path and `vitrain.data.check` accept: PIL
        # decides. What PIL cannot read raises one of IMAGE_ERRORS there.
        array = _pil_rgb(data)
    return torch.from_numpy(array).permute(2, 0, 1)


def _header_size(data: bytes) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """((height, width), jpeg_size_or_None) without decoding the pixels."""
    jpeg = _jpeg_size(data)
    if jpeg is not None:
        return jpeg, jpeg
    with Image.open(io.BytesIO(data)) as image:  # header only; errors are IMAGE_ERRORS
        width, height = image.size
    return (height, width), None


class AugmentationError(RuntimeError):
    pass


class SampleTransform:
    """Encoded image (bytes or path) -> uint8 (3, size, size); a class so workers can pickle it."""

    def __init__(
        self,
        split: str,
        image_size: int,
        augment: dict,
        eval_crop_pct: float,
        interpolation: str,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    ) -> None:
        if split not in ("train", "val"):
            raise UserError(f"split={split!r} is not one of train, val.")
        if interpolation not in INTERPOLATIONS:
            raise UserError(
                f"data.augment.interpolation={interpolation} is not one of "
                f"{', '.join(INTERPOLATIONS)} (data.loader=fast): pick one, or use data.loader=pil."
            )
        self.training = split == "train"
        self.size = image_size
        self.scale = tuple(augment["scale"])
        self.ratio = tuple(augment["ratio"])
        self.hflip = float(augment["hflip"])
        self.resize_to = math.floor(image_size / eval_crop_pct)  # timm's eval scale_size
        self.interpolation = INTERPOLATIONS[interpolation]
        # bilinear and bicubic are antialiased like PIL's; nearest takes neither option.
        self.smooth = None if interpolation == "nearest" else True
        self.rand_augment = None
        if self.training and augment.get("auto_augment"):
            policy = augment["auto_augment"]
            if not policy.startswith("rand"):
                raise UserError(
                    f"data.augment.auto_augment={policy}: data.loader=fast applies RandAugment "
                    "(rand-...) policies only: use one (e.g. rand-m9-mstd0.5-inc1) or "
                    "data.loader=pil."
                )
            # The hyper-parameters timm's create_transform gives it.
            self.rand_augment = pillow13_safe(
                rand_augment_transform(
                    policy,
                    {
                        "translate_const": int(image_size * 0.45),
                        "img_mean": tuple(min(255, round(255 * x)) for x in mean),
                        "interpolation": PIL_INTERPOLATIONS[interpolation],
                    },
                )
            )

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) for a height x width image: the pil path's RandomResizedCrop
        parameters (timm's get_params, the same draws for the same python random state)."""
        shape_only = torch.zeros(1).expand(1, height, width)  # no pixels needed, only the size
        return RandomResizedCropAndInterpolation.get_params(shape_only, self.scale, self.ratio)

    def __call__(self, source: bytes | str | Path) -> torch.Tensor:
        data = _read(source)
        (height, width), jpeg = _header_size(data)
        if self.training:
            return self._train(data, height, width, jpeg)
        return self._eval(data, height, width, jpeg)

    def _train(self, data: bytes, height: int, width: int, jpeg) -> torch.Tensor:
        top, left, crop_h, crop_w = self.crop_box(height, width)
        divisor = _dct_divisor(crop_h, crop_w, self.size, self.size) if jpeg else 1
        image = _decode_rgb(data, jpeg, divisor)
        # The decoded size is ceil(size / divisor): map the box onto it.
        sy, sx = image.shape[1] / height, image.shape[2] / width
        top, left = round(top * sy), round(left * sx)
        crop_h = max(1, min(round(crop_h * sy), image.shape[1] - top))
        crop_w = max(1, min(round(crop_w * sx), image.shape[2] - left))
        # torchvision's resized_crop minus its dispatch (40 us): the same kernel, the same pixels.
        out = interpolate(
            image[None, :, top : top + crop_h, left : left + crop_w],
            size=(self.size, self.size),
            mode=self.interpolation.value,
            align_corners=None if self.smooth is None else False,
            antialias=bool(self.smooth),
        )[0]
        if self.hflip and torch.rand(1).item() < self.hflip:
            out = out.flip(-1)
        if self.rand_augment is not None:
            pil = Image.fromarray(out.permute(1, 2, 0).numpy())
            try:
                augmented = self.rand_augment(pil)
            except Exception as err:
                # Not one of IMAGE_ERRORS: a failing augmentation is a bug to see, not a bad file.
                raise AugmentationError(f"RandAugment failed on a decoded image: {err!r}") from err
            out = torch.from_numpy(np.array(augmented)).permute(2, 0, 1)
        return out.contiguous()

    def _eval(self, data: bytes, height: int, width: int, jpeg) -> torch.Tensor:
        short = min(height, width)
        need = self.resize_to * height / short, self.resize_to * width / short
        divisor = _dct_divisor(height, width, *need) if jpeg else 1
        image = _decode_rgb(data, jpeg, divisor)
        resized = F.resize(
            image, [self.resize_to], interpolation=self.interpolation, antialias=True
        )
        return F.center_crop(resized, [self.size, self.size]).contiguous()


# The name the data modules and bench/loader.py build the fast path's per-sample step by:
# sample_transform(split, image_size, augment, eval_crop_pct, interpolation, mean=...).
sample_transform = SampleTransform


class DeviceRandomErasing:
    """timm's RandomErasing (pixel mode, one box per image) with probability re_prob, on a
    normalised float batch wherever it lives (its noise is made on the batch's device)."""

    def __init__(self, re_prob: float) -> None:
        self.re_prob = re_prob
        self._erasers: dict[torch.device, RandomErasing] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.re_prob <= 0:
            return images
        device = images.device
        if device not in self._erasers:
            self._erasers[device] = RandomErasing(
                self.re_prob, mode="pixel", max_count=1, num_splits=0, device=device
            )
        return self._erasers[device](images)


class DeviceNormalize:
    """uint8 (N, 3, H, W) on the device -> float (x / 255 - mean) / std, then, for training batches,
    timm's RandomErasing (DeviceRandomErasing): the `pil` path's float steps, done on the device."""

    def __init__(self, mean, std, re_prob: float = 0.0) -> None:
        std_255 = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        # (x / 255 - mean) / std as one in-place multiply-add: x * scale + bias (10x faster on a
        # CPU than a broadcast subtract and divide, and the same to float rounding).
        self.scale = 1.0 / std_255
        self.bias = -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0 / std_255
        self.erase = DeviceRandomErasing(re_prob)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor, training: bool) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceNormalize expects uint8 images, got {images.dtype}")
        device = images.device
        if device not in self._on_device:  # copied once, not on every batch
            self._on_device[device] = self.scale.to(device), self.bias.to(device)
        scale, bias = self._on_device[device]
        out = images.float().mul_(scale).add_(bias)
        return self.erase(out) if training else out
