"""Several nodes under torchrun, as README "Training on ImageNet" starts them: here two "nodes" of
one CPU process each on this machine, one torchrun per node, gloo between them. Lightning reads
torchrun's environment and starts no processes of its own; every rank runs train.py's Hydra
app by itself, so VITRAIN_RUN_ID gives them one run directory and a relaunch resumes on all."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT
from lightning.fabric.plugins.environments.lightning import find_free_network_port

RUN = [
    "experiment=quickstart",
    "strategy=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.num_nodes=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


def torchrun_two_nodes(overrides: list[str], log_dir: Path) -> list[subprocess.CompletedProcess]:
    """Both nodes' `torchrun --nnodes=2 --node-rank=N ... train.py`, side by side."""
    port = find_free_network_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_API")}
    env |= {"VITRAIN_LOG_DIR": str(log_dir), "VITRAIN_RUN_ID": "two-nodes", "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={rank}",
                "--nproc-per-node=1",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                str(ROOT / "train.py"),
                *RUN,
                *overrides,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=log_dir,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    return [
        subprocess.CompletedProcess(node.args, node.returncode, out)
        for node, out in zip(nodes, outputs, strict=True)
    ]


def test_two_torchrun_nodes_train_in_one_run_directory_and_resume_together(tmp_path):
    first = torchrun_two_nodes(["trainer.max_epochs=1"], tmp_path)
    assert [node.returncode for node in first] == [0, 0], first[1].stdout[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()  # one directory for both nodes' ranks
    report = json.loads((run_dir / "run_report.json").read_text())
    assert report["config"]["nodes"] == 2 and report["config"]["per_device_batch"] == 32  # of 64
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4

    # The same command, one epoch more: every rank finds last.ckpt and continues from it (a
    # rank that started afresh would run other steps and hang the all-reduce, or end elsewhere).
    second = torchrun_two_nodes(["trainer.max_epochs=2"], tmp_path)
    assert [node.returncode for node in second] == [0, 0], second[1].stdout[-3000:]
    assert f"resuming from {last}" in second[0].stdout
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 8
    attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    starts = [a for a in attempts if a["event"] == "start"]
    assert [a["start_step"] for a in starts] == [0, 4]
