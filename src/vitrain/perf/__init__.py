from vitrain.perf.speed import SpeedMonitor

__all__ = ["SpeedMonitor"]
