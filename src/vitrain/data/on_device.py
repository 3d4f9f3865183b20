"""The float steps of the input pipeline, done on the training device after the batch is there:
for the fast path's uint8 batches 3-Augment and colour jitter, then normalisation; random erasing
for every image source.

3-Augment and colour jitter run here, batched, rather than per image in the DataLoader workers,
whose decode they would otherwise outweigh. Grayscale, the jitter's brightness, contrast and
saturation and the normalisation are each an affine map of an image's three channels, so they
compose into one 3x3 matrix and offset per image, applied in one pass (clamped once, at the end,
where torchvision clamps after each jitter op: the same wherever no intermediate value leaves
0..255); solarisation and the Gaussian blur act on their third of the batch alone. Statistics as
DeiT III's augment.py and torchvision's ColorJitter (tests/test_recipes.py).
"""

import math

import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing

from vitrain.data import augmentation

# ITU-R 601-2 luma, as PIL's convert("L") (DeiT III's grayscale) and torchvision weigh RGB.
LUMA = (0.299, 0.587, 0.114)
SOLARIZE_THRESHOLD = 128.0  # PIL's ImageOps.solarize default, DeiT III's value
BLUR_SIGMA = (0.1, 2.0)  # DeiT III's GaussianBlur radius range (PIL's radius is the sigma)
GRAY, SOLARIZE, BLUR = 0, 1, 2  # 3-Augment's three ops, one per image
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2  # colour jitter's, all three per image


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


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred with its own sigma: one separable, reflect-padded kernel per image."""
    n, c, h, w = images.shape
    radius = math.ceil(3 * BLUR_SIGMA[1])
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    horizontal, vertical = kernel[:, None, None], kernel[:, None, :, None]
    flat = images.reshape(1, n * c, h, w)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="reflect")
    flat = F.conv2d(flat, horizontal, groups=n * c)
    flat = F.pad(flat, (0, 0, radius, radius), mode="reflect")
    flat = F.conv2d(flat, vertical, groups=n * c)
    return flat.reshape(n, c, h, w)


def three_augment(pixels: torch.Tensor) -> torch.Tensor:
    """DeiT III's 3-Augment on float 0..255 RGB images, in place: per image one of grayscale,
    solarisation (threshold 128) and a Gaussian blur (sigma 0.1-2.0), chosen uniformly.
    Solarisation and blur are applied here; grayscale is a colour matrix (color_transform).
    Returns each image's choice (GRAY, SOLARIZE, BLUR)."""
    n = pixels.shape[0]
    choice = torch.randint(0, 3, (n,), device=pixels.device)
    solar = (choice == SOLARIZE).nonzero().flatten()
    if solar.numel():
        chosen = pixels.index_select(0, solar)
        flipped = torch.where(chosen >= SOLARIZE_THRESHOLD, 255.0 - chosen, chosen)
        pixels.index_copy_(0, solar, flipped)
    blur = (choice == BLUR).nonzero().flatten()
    if blur.numel():
        low, high = BLUR_SIGMA
        sigma = torch.empty(blur.numel(), device=pixels.device).uniform_(low, high)
        blurred = gaussian_blur(pixels.index_select(0, blur), sigma.to(pixels.dtype))
        pixels.index_copy_(0, blur, blurred)
    return choice


def _luma_row(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(LUMA, device=like.device, dtype=like.dtype)


def color_transform(
    pixels: torch.Tensor, gray: torch.Tensor | None, jitter: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image the matrix A (n, 3, 3) and offset b (n, 3) with which A @ x + b is: grayscale
    (where `gray`), then torchvision's ColorJitter(jitter, jitter, jitter): a factor for each of
    brightness, contrast and saturation from [1 - jitter, 1 + jitter], applied in a random order
    per image. Contrast blends with the image's mean luma, found from its channel means."""
    n = pixels.shape[0]
    luma = _luma_row(pixels)
    to_gray = torch.ones(3, 1, device=pixels.device, dtype=pixels.dtype) * luma[None]  # 1 w^T
    eye = torch.eye(3, device=pixels.device, dtype=pixels.dtype)
    a = eye.repeat(n, 1, 1)
    b = torch.zeros(n, 3, device=pixels.device, dtype=pixels.dtype)
    if gray is not None:
        a[gray] = to_gray
    if not jitter:
        return a, b
    channel_means = pixels.mean(dim=(2, 3))  # (n, 3)
    factors = torch.empty(n, 3, device=pixels.device, dtype=pixels.dtype)
    factors.uniform_(1 - jitter, 1 + jitter)
    order = torch.argsort(torch.rand(n, 3, device=pixels.device), dim=1)
    for position in range(3):
        op = order[:, position]
        f = factors.gather(1, op[:, None])  # (n, 1): this position's op's factor, per image
        f3 = f[:, :, None]
        mean_luma = ((a @ channel_means[:, :, None]).squeeze(2) + b) @ luma  # (n,)
        # Each op's update of (a, b), for every image; each image keeps its op's.
        updates = {
            BRIGHTNESS: (f3 * a, f * b),
            CONTRAST: (f3 * a, f * b + (1 - f) * mean_luma[:, None]),
            SATURATION: (
                (f3 * eye + (1 - f3) * to_gray) @ a,
                ((f3 * eye + (1 - f3) * to_gray) @ b[:, :, None]).squeeze(2),
            ),
        }
        for kind, (new_a, new_b) in updates.items():
            mine = op == kind
            a = torch.where(mine[:, None, None], new_a, a)
            b = torch.where(mine[:, None], new_b, b)
    return a, b


def apply_color(pixels: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A @ x + b for every pixel of every image (N, 3, H, W): one batched matrix product."""
    n = pixels.shape[0]
    return torch.baddbmm(b[:, :, None], a, pixels.reshape(n, 3, -1)).view_as(pixels)


def color_jitter(pixels: torch.Tensor, strength: float) -> torch.Tensor:
    """ColorJitter(strength, strength, strength) on float 0..255 RGB images, clamped to 0..255."""
    a, b = color_transform(pixels, None, strength)
    return apply_color(pixels, a, b).clamp_(0.0, 255.0)


class DeviceNormalize:
    """Pixel values 0..255 (N, 3, H, W), uint8 or float -> float (x / 255 - mean) / std, on
    whichever device the batch is."""

    def __init__(self, mean, std) -> None:
        std_255 = torch.tensor(std, dtype=torch.float32) * 255.0
        # (x / 255 - mean) / std as one in-place multiply-add, x * scale + bias: the same to
        # float rounding, and much cheaper than a broadcast subtract and divide.
        self.scale = 1.0 / std_255
        self.bias = -torch.tensor(mean, dtype=torch.float32) * 255.0 / std_255
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def per_channel(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, bias), each (3,), on `device` (copied there once)."""
        if device not in self._on_device:
            self._on_device[device] = self.scale.to(device), self.bias.to(device)
        return self._on_device[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        scale, bias = self.per_channel(images.device)
        # float() copies a uint8 batch; a float one is the caller's to keep: work on a copy too.
        pixels = images.float() if images.dtype == torch.uint8 else images.clone()
        return pixels.mul_(scale.view(1, -1, 1, 1)).add_(bias.view(1, -1, 1, 1))


class DeviceAugment:
    """What the model's input still needs once the batch is on the device.

    uint8 batches (the fast path): for training, 3-Augment and colour jitter when data.augment
    asks for them, composed with the normalisation into one colour transform per image; else
    normalisation alone. Float batches arrive normalised (the pil path and DALI did their colour
    work per image). Then, for training, random erasing.
    """

    def __init__(self, mean, std, augment: dict) -> None:
        self.normalize = DeviceNormalize(mean, std)
        self.erase = DeviceRandomErasing(augment["re_prob"])
        self.three_augment = augmentation.three_augment(augment)
        self.color_jitter = augmentation.color_jitter(augment)

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float()
        gray = three_augment(pixels) == GRAY if self.three_augment else None
        a, b = color_transform(pixels, gray, self.color_jitter)
        scale, bias = self.normalize.per_channel(images.device)
        out = apply_color(pixels, scale[None, :, None] * a, scale * b + bias)
        if not self.color_jitter:  # grayscale, solarisation and blur stay within 0..255
            return out
        # normalise(clamp(A x + b)) = clamp(S A x + S b + t), the clamp's bounds normalised
        low, high = bias, 255.0 * scale + bias
        return out.clamp_(low.view(1, -1, 1, 1), high.view(1, -1, 1, 1))

    def __call__(self, images: torch.Tensor, training: bool) -> torch.Tensor:
        if images.dtype == torch.uint8:
            if training and (self.three_augment or self.color_jitter):
                images = self._augment(images)
            else:
                images = self.normalize(images)
        return self.erase(images) if training else images
