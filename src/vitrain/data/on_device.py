"""The float steps of the input pipeline, done on the training device after the batch is there:
for the fast path's uint8 batches 3-Augment and colour jitter, then normalisation; random erasing
for every image source.

3-Augment and colour jitter run here, batched, rather than per image in the DataLoader workers:
a worker's per-image PIL or tensor ops cost it more than its whole decode, while on a GPU the
batched ops take a sliver of a training step. Their statistics follow DeiT III's augment.py and
torchvision's ColorJitter (tests/test_loader.py compares them).
"""

import math

import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing

from vitrain.data import augmentation

# ITU-R 601-2 luma, as PIL's convert("L") (DeiT III's grayscale) and torchvision weigh RGB.
_LUMA = (0.299, 0.587, 0.114)
SOLARIZE_THRESHOLD = 128.0  # PIL's ImageOps.solarize default, DeiT III's value
BLUR_SIGMA = (0.1, 2.0)  # DeiT III's GaussianBlur radius range (PIL's radius is the sigma)


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


def _gray(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma of float RGB images."""
    weights = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred with its own sigma: one separable, reflect-padded kernel per image."""
    n, c, h, w = images.shape
    radius = math.ceil(3 * BLUR_SIGMA[1])
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    flat = images.reshape(1, n * c, h, w)
    horizontal, vertical = kernel[:, None, None], kernel[:, None, :, None]
    flat = F.pad(flat, (radius, radius, 0, 0), mode="reflect")
    flat = F.conv2d(flat, horizontal, groups=n * c)
    flat = F.pad(flat, (0, 0, radius, radius), mode="reflect")
    flat = F.conv2d(flat, vertical, groups=n * c)
    return flat.reshape(n, c, h, w)


def three_augment(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeiT III's 3-Augment on float 0..255 RGB images: per image one of grayscale (0),
    solarisation (1) and Gaussian blur (2), chosen uniformly. Returns (images, choices)."""
    n = images.shape[0]
    choice = torch.randint(0, 3, (n,), device=images.device)
    out = images.clone()
    gray = choice == 0
    out[gray] = _gray(images[gray]).expand(-1, 3, -1, -1)
    solar = images[choice == 1]
    out[choice == 1] = torch.where(solar >= SOLARIZE_THRESHOLD, 255.0 - solar, solar)
    blur = (choice == 2).nonzero().flatten()
    if blur.numel():
        low, high = BLUR_SIGMA
        sigma = torch.empty(blur.numel(), device=images.device).uniform_(low, high)
        out[blur] = gaussian_blur(images[blur], sigma.to(images.dtype))
    return out, choice


def _brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return images * factor


def _contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _gray(images).mean(dim=(1, 2, 3), keepdim=True)
    return factor * images + (1 - factor) * mean


def _saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return factor * images + (1 - factor) * _gray(images)


_JITTERS = (_brightness, _contrast, _saturation)


def color_jitter(images: torch.Tensor, strength: float) -> torch.Tensor:
    """torchvision's ColorJitter(strength, strength, strength) per image on float 0..255 RGB:
    each factor drawn from [1 - strength, 1 + strength], the three applied in a random order per
    image, clamped after each, as torchvision does."""
    n = images.shape[0]
    factors = torch.empty(n, 3, device=images.device, dtype=images.dtype)
    factors.uniform_(1 - strength, 1 + strength)
    order = torch.argsort(torch.rand(n, 3, device=images.device), dim=1)
    out = images.clone()
    for position in range(3):
        for op, jitter in enumerate(_JITTERS):
            chosen = (order[:, position] == op).nonzero().flatten()
            if chosen.numel():
                factor = factors[chosen, op].view(-1, 1, 1, 1)
                out[chosen] = jitter(out[chosen], factor).clamp_(0.0, 255.0)
    return out


class DeviceNormalize:
    """Pixel values 0..255 (N, 3, H, W), uint8 or float -> float (x / 255 - mean) / std, on
    whichever device the batch is."""

    def __init__(self, mean, std) -> None:
        std_255 = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        # (x / 255 - mean) / std as one in-place multiply-add, x * scale + bias: the same to
        # float rounding, and much cheaper than a broadcast subtract and divide.
        self.scale = 1.0 / std_255
        self.bias = -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0 / std_255
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = images.device
        if device not in self._on_device:  # copied once, not on every batch
            self._on_device[device] = self.scale.to(device), self.bias.to(device)
        scale, bias = self._on_device[device]
        # float() copies a uint8 batch; a float one is the caller's to keep: work on a copy too.
        pixels = images.float() if images.dtype == torch.uint8 else images.clone()
        return pixels.mul_(scale).add_(bias)


class DeviceAugment:
    """What the model's input still needs once the batch is on the device.

    uint8 batches (the fast path): for training, 3-Augment and colour jitter when data.augment
    asks for them; then normalisation. Float batches arrive normalised (the pil path and DALI did
    their colour work per image). Then, for training, random erasing.
    """

    def __init__(self, mean, std, augment: dict) -> None:
        self.normalize = DeviceNormalize(mean, std)
        self.erase = DeviceRandomErasing(augment["re_prob"])
        self.three_augment = augmentation.three_augment(augment)
        self.color_jitter = augmentation.color_jitter(augment)

    def __call__(self, images: torch.Tensor, training: bool) -> torch.Tensor:
        if images.dtype == torch.uint8:
            if training and (self.three_augment or self.color_jitter):
                pixels = images.float()
                if self.three_augment:
                    pixels, _ = three_augment(pixels)
                if self.color_jitter:
                    pixels = color_jitter(pixels, self.color_jitter)
                images = pixels
            images = self.normalize(images)
        return self.erase(images) if training else images
