"""GPU utilisation, memory and power sampled by NVML in a background thread (about 10 Hz)."""

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Sample:
    util_pct: float
    mem_used_bytes: float
    power_w: float


class NvmlReader:
    """Reads one GPU through pynvml (nvidia-ml-py)."""

    def __init__(self, handle) -> None:
        import pynvml

        self._nvml = pynvml
        self._handle = handle

    def __call__(self) -> Sample:
        nvml = self._nvml
        util = nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
        mem = nvml.nvmlDeviceGetMemoryInfo(self._handle).used
        power = nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0  # mW
        return Sample(float(util), float(mem), power)


def nvml_reader_for(cuda_index: int) -> NvmlReader | None:
    """A reader for torch's cuda:<index>, or None without NVML or a GPU.

    NVML numbers GPUs physically; torch numbers them after CUDA_VISIBLE_DEVICES.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if not visible:
            handle = pynvml.nvmlDeviceGetHandleByIndex(cuda_index)
        elif visible[cuda_index].strip().isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible[cuda_index]))
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(visible[cuda_index].strip())
        reader = NvmlReader(handle)
        reader()
        return reader
    except Exception:  # no driver, no GPU, a MIG slice NVML cannot read: no GPU metrics
        return None


class NvmlSampler:
    """Samples `reader` every `interval_s` in a daemon thread; window() averages since the last."""

    def __init__(self, reader: Callable[[], Sample], interval_s: float = 0.1) -> None:
        self._reader = reader
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._active = threading.Event()
        self._active.set()
        self._thread: threading.Thread | None = None
        self._reset()

    def _reset(self) -> None:
        self._count = 0
        self._util_sum = 0.0
        self._power_sum = 0.0
        self._mem_max = 0.0

    def sample_once(self) -> None:
        sample = self._reader()
        with self._lock:
            self._count += 1
            self._util_sum += sample.util_pct
            self._power_sum += sample.power_w
            self._mem_max = max(self._mem_max, sample.mem_used_bytes)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            if self._active.is_set():
                self.sample_once()

    def pause(self) -> None:
        """Stop counting samples (validation), keeping what the window holds."""
        self._active.clear()

    def resume(self) -> None:
        self._active.set()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="vitrain-nvml", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def window(self) -> dict[str, float] | None:
        """Mean util (%), peak memory (GB), mean power (W) since the last call, or None."""
        with self._lock:
            if self._count == 0:
                return None
            result = {
                "gpu_util": self._util_sum / self._count,
                "gpu_mem_gb": self._mem_max / 1e9,
                "gpu_power_w": self._power_sum / self._count,
            }
            self._reset()
        return result
