"""The float steps of the input pipeline, done on the training device after the batch is there:
uint8 -> normalised floats (the fast path), and timm's random erasing (every image source)."""

import torch
from timm.data.random_erasing import RandomErasing


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
    """uint8 (N, 3, H, W) -> float (x / 255 - mean) / std, on whichever device the batch is."""

    def __init__(self, mean, std) -> None:
        std_255 = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        # (x / 255 - mean) / std as one in-place multiply-add, x * scale + bias: the same to
        # float rounding, and much cheaper than a broadcast subtract and divide.
        self.scale = 1.0 / std_255
        self.bias = -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0 / std_255
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceNormalize expects uint8 images, got {images.dtype}")
        device = images.device
        if device not in self._on_device:  # copied once, not on every batch
            self._on_device[device] = self.scale.to(device), self.bias.to(device)
        scale, bias = self._on_device[device]
        return images.float().mul_(scale).add_(bias)


class DeviceAugment:
    """What the model's input still needs once the batch is on the device: normalisation of the
    fast path's uint8 images (float images arrive normalised), then random erasing for training."""

    def __init__(self, mean, std, re_prob: float) -> None:
        self.normalize = DeviceNormalize(mean, std)
        self.erase = DeviceRandomErasing(re_prob)

    def __call__(self, images: torch.Tensor, training: bool) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = self.normalize(images)
        return self.erase(images) if training else images
