"""hydra-submitit-launcher's local launcher, with DDP ranks as tasks and a machine's GPUs shared
out between the jobs.

Inside a submitit job Lightning cannot start DDP ranks itself: it re-runs the main module with
the job's overrides, and that module is `submitit.core._submit`. So each rank is a submitit task
(`tasks_per_node: ${trainer.devices}` in conf/hydra/launcher/). Under SLURM, Lightning's
SLURMEnvironment reads the ranks from SLURM_*, and the plugin's SlurmLauncher needs nothing more.
Locally, this launcher exports them as torch.distributed's variables, which Lightning's default
environment reads, with a rendezvous port of each job's own. It also gives the jobs that run at
the same time disjoint GPUs (submitit's local executor would give every job the same ones: Hydra
issue 2757), running more jobs than fit in consecutive waves.
"""

import os
import socket
from collections.abc import Sequence
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher
except ImportError:  # vitrain[sweeps] is not installed
    LocalLauncher = None


def machine_gpus() -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES's entries, or every GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free now (all bound at once, then released)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def job_gpus(gpus: Sequence[str], per_job: int, job_num: int) -> list[str]:
    """Job `job_num`'s GPUs when len(gpus) // per_job jobs run at once: any run of that many
    consecutive job numbers (one wave) gets disjoint slices."""
    slot = job_num % (len(gpus) // per_job)
    return list(gpus[slot * per_job : (slot + 1) * per_job])


if LocalLauncher is not None:

    class SubmititLocalLauncher(LocalLauncher):
        """The plugin's LocalLauncher: DDP ranks as tasks, disjoint GPUs per running job."""

        def __init__(self, **params: Any) -> None:
            super().__init__(**params)
            # Set by launch(), pickled into every job with self.
            self.gpus: list[str] = []
            self.gpus_per_job = 0
            self.master_ports: dict[int, int] = {}

        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            # Each job's own rendezvous port: jobs run side by side, and one inherited
            # MASTER_PORT would let a job's ranks join another job's process group.
            ports = free_ports(len(job_overrides))
            self.master_ports = {initial_job_idx + i: port for i, port in enumerate(ports)}
            self.gpus_per_job = int(self.params.get("gpus_per_node") or 0)
            self.gpus = machine_gpus() if self.gpus_per_job else []
            if not self.gpus:  # CPU jobs, or a machine without GPUs: all jobs at once
                return super().launch(job_overrides, initial_job_idx)
            at_once = len(self.gpus) // self.gpus_per_job
            if at_once == 0:
                raise ValueError(
                    f"each job asks for {self.gpus_per_job} GPUs (hydra.launcher.gpus_per_node, "
                    f"by default trainer.devices), but this machine has {len(self.gpus)}"
                )
            returns: list[JobReturn] = []
            for start in range(0, len(job_overrides), at_once):
                wave = job_overrides[start : start + at_once]
                returns += super().launch(wave, initial_job_idx + start)
            return returns

        def __call__(
            self,
            sweep_overrides: list[str],
            job_dir_key: str,
            job_num: int,
            job_id: str,
            singleton_state: dict[type, Singleton],
        ) -> JobReturn:
            # In each task process of the job, before anything touches CUDA.
            import submitit

            if self.gpus:
                gpus = job_gpus(self.gpus, self.gpus_per_job, job_num)
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
            if submitit.JobEnvironment().num_tasks > 1:
                # MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE: Lightning then runs this task
                # as one rank instead of starting its own (LightningEnvironment: LOCAL_RANK set).
                os.environ["MASTER_PORT"] = str(self.master_ports[job_num])
                submitit.helpers.TorchDistributedEnvironment().export(
                    set_cuda_visible_devices=False, overwrite=True
                )
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
