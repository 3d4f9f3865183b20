"""python -m vitrain.report --scaling: strong and weak scaling efficiency against 1-device runs."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from report_fixtures import write_fake_report

from vitrain import report
from vitrain.report import ReportError
from vitrain.report.__main__ import main
from vitrain.report.scaling import scaling, scaling_markdown


def _run(root: Path, name: str, devices: int, global_batch: int, ips: float, **config) -> None:
    write_fake_report(
        root / name,
        config={
            "devices": devices,
            "global_batch": global_batch,
            "per_device_batch": global_batch // devices,
            "strategy": "SingleDeviceStrategy" if devices == 1 else "DDPStrategy",
            **config,
        },
        images_per_s=ips,
    )


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """1, 2 and 4 devices at a fixed global batch (strong) and per-device batch (weak)."""
    _run(tmp_path, "a1", 1, 256, 1000.0)
    _run(tmp_path, "a2", 4, 256, 3000.0)  # strong: 3.00x, 75 %
    _run(tmp_path, "a3", 4, 1024, 3800.0)  # weak: 3.80x, 95 %
    _run(tmp_path, "a4", 2, 512, 1900.0)  # weak: 1.90x, 95 %
    _run(tmp_path, "b1", 1, 256, 1500.0, precision="32-true")
    _run(tmp_path, "b2", 2, 256, 2400.0, precision="32-true")  # strong: 1.60x, 80 %
    _run(tmp_path, "c1", 4, 128, 999.0)  # nothing to compare with
    return tmp_path


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if "---" not in line]


def test_each_multi_device_run_against_its_1_device_run(sweep: Path) -> None:
    s = scaling(report.load_reports([sweep]))
    assert s.settings == ["precision"]  # what tells the two groups apart
    got = [
        (r["precision"], r["kind"], r["devices"], r["global_batch"], r["run"][-2:]) for r in s.rows
    ]
    assert got == [
        ("bf16-mixed", "1 device", 1, 256, "a1"),
        ("bf16-mixed", "strong", 4, 256, "a2"),
        ("bf16-mixed", "weak", 2, 512, "a4"),
        ("bf16-mixed", "weak", 4, 1024, "a3"),
        ("32-true", "1 device", 1, 256, "b1"),
        ("32-true", "strong", 2, 256, "b2"),
    ]
    by_run = {r["run"][-2:]: r for r in s.rows}
    assert by_run["a1"]["scaling"] == 1.0 and by_run["a1"]["scaling_efficiency"] == 1.0
    assert by_run["a2"]["scaling"] == pytest.approx(3.0)
    assert by_run["a2"]["scaling_efficiency"] == pytest.approx(0.75)
    assert by_run["a3"]["scaling_efficiency"] == pytest.approx(0.95)
    assert by_run["a4"]["scaling_efficiency"] == pytest.approx(0.95)
    assert by_run["b2"]["scaling_efficiency"] == pytest.approx(0.80)
    # the same figure from the per-device throughput: images/s/device(N) / images/s(1)
    assert by_run["a3"]["images_per_s_per_device"] / 1000.0 == pytest.approx(0.95)
    assert any("c1 (4 devices, global batch 128) has no 1-device run" in n for n in s.notes)

    header, *rows = table_rows(scaling_markdown(s))
    assert header[:5] == ["precision", "kind", "devices", "global batch", "per-device batch"]
    assert header[-3:] == ["scaling (x)", "efficiency (%)", "run"]
    assert rows[1][-3:-1] == ["3.00", "75.0"] and rows[3][-3:-1] == ["3.80", "95.0"]


def test_no_pair_is_an_error_that_says_what_to_run(tmp_path: Path) -> None:
    _run(tmp_path, "one", 1, 256, 1000.0)
    _run(tmp_path, "other_model", 4, 256, 3000.0, model="vit_s16")
    with pytest.raises(ReportError, match=r"--scaling: no multi-device run .* trainer.devices"):
        scaling(report.load_reports([tmp_path]))


def test_cli_scaling_table_and_csv(sweep: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vitrain.report", str(sweep), "--scaling", "--csv", "s.csv"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "| precision | kind | devices |" in result.stdout
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert [r["kind"] for r in rows] == ["1 device", "strong", "weak", "weak", "1 device", "strong"]
    assert float(rows[1]["scaling_efficiency_pct"]) == pytest.approx(75.0)


def test_cli_scaling_without_a_pair_exits_2_with_one_line(sweep: Path, capsys) -> None:
    assert main([str(sweep / "a1"), "--scaling"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: --scaling: no multi-device run")
    assert len(out.err.strip().splitlines()) == 1


@pytest.mark.slow
def test_real_1_and_2_process_runs_give_strong_and_weak_scaling(real_runs, ddp_run) -> None:
    reports = report.load_reports([real_runs, ddp_run])
    single16, single32, ddp = reports
    assert ddp["config"]["devices"] == 2 and ddp["config"]["per_device_batch"] == 16
    s = scaling(reports)
    assert [(r["kind"], r["devices"], r["global_batch"]) for r in s.rows] == [
        ("1 device", 1, 16),
        ("1 device", 1, 32),
        ("strong", 2, 32),  # the same 32 images per step, split over 2 processes
        ("weak", 2, 32),  # 16 per process, as the 1-process run with batch 16
    ]
    ips = ddp["summary"]["images_per_s"]
    strong, weak = s.rows[2], s.rows[3]
    assert strong["scaling"] == pytest.approx(ips / single32["summary"]["images_per_s"])
    assert strong["scaling_efficiency"] == pytest.approx(strong["scaling"] / 2)
    assert weak["scaling_efficiency"] == pytest.approx(
        ddp["summary"]["images_per_s_per_device"] / single16["summary"]["images_per_s"]
    )
    assert s.settings == [] and s.notes == []
