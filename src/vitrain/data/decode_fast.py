"""data.loader=fast: an encoded image -> a uint8 crop in the worker; the float work happens on the
device (vitrain.data.on_device).

Per sample, in a DataLoader worker: the JPEG header gives the image size; the RandomResizedCrop box
is drawn from it by timm's get_params (the pil path's draws for the same random state) before
decoding, so that a crop with room to spare is decoded at 1/2, 1/4 or 1/8 scale in libjpeg-turbo's
DCT (simplejpeg); then torch's vectorised antialiased uint8 crop + resize, the flip, and
RandAugment (when configured) on a PIL view of the crop, as timm does. The sample stays uint8: 4x
fewer bytes to collate, pin and copy. Why each step is the fast one, with the measurements:
docs/performance.md ("Input pipeline").

Other formats (PNG, GIF, ...) and CMYK/YCCK JPEGs, which libjpeg-turbo cannot turn into RGB, are
decoded by PIL, then go through the same crop and resize. Every decoder's failure is one of
bad_samples.IMAGE_ERRORS, so that the bad-sample rule sees it.
"""

import io
import math

import numpy as np
import simplejpeg
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.nn.functional import interpolate
from torchvision.transforms import InterpolationMode

from vitrain.data import augmentation
from vitrain.data.augmentation import check_augment
from vitrain.data.decode_pil import Encoded, pillow13_safe, read_encoded, to_rgb
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
# The reduced-scale decodes that are faster than a full one (libjpeg-turbo's other M/8 scales are
# slower than a full decode: docs/performance.md).
_DCT_SCALES = (8, 4, 2)


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
        image.load()  # decodes it all: errors surface here
        return np.array(to_rgb(image))


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


class FastSampleTransform:
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
        check_augment(augment, "fast")
        self.training = split == "train"
        self.size = image_size
        self.crop = augmentation.crop(augment)
        self.scale = tuple(augment["scale"])
        self.ratio = tuple(augment["ratio"])
        self.hflip = float(augment["hflip"])
        self.resize_to = math.floor(image_size / eval_crop_pct)  # timm's eval scale_size
        self.interpolation = INTERPOLATIONS[interpolation]
        # bilinear and bicubic are antialiased like PIL's; nearest takes neither option.
        self.smooth = None if interpolation == "nearest" else True
        self.rand_augment = None
        policy = augmentation.rand_augment(augment)  # 3-Augment happens on the device
        if self.training and policy:
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

    def __call__(self, source: Encoded) -> torch.Tensor:
        data = read_encoded(source)
        (height, width), jpeg = _header_size(data)
        if self.training:
            return self._train(data, height, width, jpeg)
        return self._eval(data, height, width, jpeg)

    def _resize(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # torchvision's resize minus its per-call dispatch: the same kernel, the same pixels.
        return interpolate(
            image[None],
            size=size,
            mode=self.interpolation.value,
            align_corners=None if self.smooth is None else False,
            antialias=bool(self.smooth),
        )[0]

    def _random_resized_crop(self, data: bytes, height: int, width: int, jpeg) -> torch.Tensor:
        top, left, crop_h, crop_w = self.crop_box(height, width)
        divisor = _dct_divisor(crop_h, crop_w, self.size, self.size) if jpeg else 1
        image = _decode_rgb(data, jpeg, divisor)
        # The decoded size is ceil(size / divisor): map the box onto it.
        sy, sx = image.shape[1] / height, image.shape[2] / width
        top, left = round(top * sy), round(left * sx)
        crop_h = max(1, min(round(crop_h * sy), image.shape[1] - top))
        crop_w = max(1, min(round(crop_w * sx), image.shape[2] - left))
        return self._resize(image[:, top : top + crop_h, left : left + crop_w], (self.size,) * 2)

    def _simple_random_crop(self, data: bytes, height: int, width: int, jpeg) -> torch.Tensor:
        """DeiT III's SRC: the shorter side resized to the image size, a reflective padding of
        SRC_PADDING px, a random crop of the image size (torchvision's RandomCrop draws)."""
        short = min(height, width)
        new_h, new_w = round(self.size * height / short), round(self.size * width / short)
        divisor = _dct_divisor(height, width, new_h, new_w) if jpeg else 1
        image = self._resize(_decode_rgb(data, jpeg, divisor), (new_h, new_w))
        pad = augmentation.SRC_PADDING
        padded = torch.nn.functional.pad(image[None].float(), (pad,) * 4, mode="reflect")[0]
        top = int(torch.randint(0, padded.shape[1] - self.size + 1, (1,)))
        left = int(torch.randint(0, padded.shape[2] - self.size + 1, (1,)))
        return padded[:, top : top + self.size, left : left + self.size].to(torch.uint8)

    def _train(self, data: bytes, height: int, width: int, jpeg) -> torch.Tensor:
        if self.crop == "src":
            out = self._simple_random_crop(data, height, width, jpeg)
        else:
            out = self._random_resized_crop(data, height, width, jpeg)
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
