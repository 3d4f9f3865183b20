"""Dense (no sparsity) peak tensor FLOP/s of known GPUs, per precision, from NVIDIA's datasheets."""

import torch

TFLOPS = 1e12
# (substring of torch.cuda.get_device_name, {precision: dense peak TFLOP/s}); first match wins, so
# more specific names come first. fp16 is with fp32 accumulation, as AMP trains.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM (HBM3)
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 35.0}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),  # SXM2; no bf16, no tf32
]


def compute_dtype(precision: str) -> str:
    """The matmul precision a Lightning precision setting trains in."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one device at the run's precision; None when unknown (e.g. a CPU)."""
    dtype = compute_dtype(precision)
    for key, peaks in GPU_PEAK_TFLOPS:
        if key in device_name:
            # Without tf32 units (V100) fp32 matmuls run at the fp32 rate.
            value = peaks.get(dtype) or (peaks.get("fp32") if dtype == "tf32" else None)
            return value * TFLOPS if value else None
    return None


def mfu(flops_per_image: float, images_per_s: float, peak_per_device: float, devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' dense peak."""
    return flops_per_image * images_per_s / (peak_per_device * devices)
