"""notebooks/analyze_runs.ipynb runs headless on run reports, and is committed without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# The notebook extra (in .[dev], so in CI); a GPU box with only the runtime skips this module.
nbformat = pytest.importorskip("nbformat", reason="needs the notebook extra: pip install -e .[dev]")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

from report_fixtures import write_fake_report  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analyze_runs.ipynb"
KERNEL = "vitrain-test-python"


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec for this very interpreter, found first through JUPYTER_PATH.

    Works on a fresh CI venv without `ipykernel install --user`, and never picks up a user's own
    "python3" spec that may point at another Python without vitrain.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "vitrain test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # The kernel inherits this environment: no wandb calls, and ipykernel's inline (headless)
    # plot backend, which it only picks when MPLBACKEND is unset.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("VITRAIN_WANDB_PROJECT", raising=False)
    monkeypatch.delenv("VITRAIN_BASELINE", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    return KERNEL


def write_gpu_runs(logs: Path) -> None:
    """An NGC vs pip pair of GPU runs and a CPU run (no gpu_* and no MFU keys)."""
    write_fake_report(
        logs / "runs/2026-11-26_10-00-00", config={"container": "ngc"}, images_per_s=763.0
    )
    write_fake_report(
        logs / "runs/2026-11-26_11-00-00", config={"container": "pip"}, images_per_s=636.0
    )
    write_fake_report(logs / "runs/2026-11-26_12-00-00", config={"container": "host"}, gpu=False)


def write_cpu_runs(logs: Path) -> None:
    """A CPU-only multirun: every GPU and MFU panel has nothing to show."""
    for job, precision in enumerate(["32-true", "bf16-mixed"]):
        write_fake_report(
            logs / f"multiruns/2026-11-26_12-00-00/{job}",
            gpu=False,
            config={"container": "host", "precision": precision},
        )


def execute(cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, kernel_name=KERNEL, timeout=180, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # raises CellExecutionError on the first cell that fails
    return nb


@pytest.mark.parametrize("how", ["real runs", "VITRAIN_RUNS", "VITRAIN_ROOT"])
def test_notebook_runs_on_reports(
    how: str, kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request
) -> None:
    if how == "real runs":  # reports of two real tiny CPU training runs
        monkeypatch.setenv("VITRAIN_RUNS", str(request.getfixturevalue("real_runs")))
        column = "global_batch"
    elif how == "VITRAIN_RUNS":  # GPU and CPU runs, anywhere
        write_gpu_runs(tmp_path / "somewhere")
        monkeypatch.setenv("VITRAIN_RUNS", str(tmp_path / "somewhere"))
        monkeypatch.delenv("VITRAIN_ROOT", raising=False)
        column = "container"
    else:  # CPU runs only, in the default place: <root>/logs
        write_cpu_runs(tmp_path / "logs")
        monkeypatch.delenv("VITRAIN_RUNS", raising=False)
        monkeypatch.setenv("VITRAIN_ROOT", str(tmp_path))
        column = "precision"
    nb = execute(NOTEBOOK.parent)  # where Jupyter would start it

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert [o for o in outputs if o.output_type == "error"] == []
    text = "\n".join(o.get("text", "") + json.dumps(o.get("data", {})) for o in outputs)
    assert f"| {column} |" in text and "1.00x" in text  # the comparison table
    assert text.count("image/png") >= 2  # the bar charts and the per-epoch curves
    assert "wandb: skipped" in text


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert all(not c.metadata.get("execution") for c in code)
