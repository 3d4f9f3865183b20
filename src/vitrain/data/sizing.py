"""Each device's share: of the global batch, and of the node's CPUs as DataLoader workers."""

import os

from vitrain.errors import UserError


def per_device_batch_size(global_batch_size: int, world_size: int) -> int:
    """data.batch_size is the global batch; each of the world's devices gets an equal share."""
    if global_batch_size < 1:
        raise UserError(f"data.batch_size={global_batch_size} must be a positive integer.")
    if global_batch_size % world_size:
        lower = global_batch_size // world_size * world_size or world_size
        raise UserError(
            f"data.batch_size={global_batch_size} (the global batch) is not divisible by the "
            f"world size {world_size} (devices x nodes): use a multiple of {world_size}, "
            f"e.g. data.batch_size={lower}."
        )
    return global_batch_size // world_size


def auto_num_workers(devices_per_node: int, cap: int = 16) -> int:
    """The CPUs this process may use, shared among the node's device processes."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cap, (cpus or 1) // max(devices_per_node, 1)))
