"""python -m vitrain.report: discovery, the comparison table, CSV, plot and the CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from report_fixtures import write_fake_report

from vitrain import report
from vitrain.report import MISSING, ReportError
from vitrain.report.run_report import OVERRIDE_OF


@pytest.fixture
def ngc_vs_pip(tmp_path: Path) -> Path:
    """Two single runs differing only in container: pip 636 images/s, ngc 763 images/s."""
    logs = tmp_path / "logs"
    write_fake_report(
        logs / "runs/2026-11-26_10-00-00",
        config={"container": "ngc"},
        images_per_s=763.0,
        epoch_time_s=10.0,
    )
    write_fake_report(
        logs / "runs/2026-11-26_11-00-00",
        config={"container": "pip"},
        images_per_s=636.0,
        epoch_time_s=12.0,
    )
    return logs


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of each table line (header first, separator dropped)."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if "---" not in line]


def test_finds_reports_below_runs_multiruns_and_files(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    single = write_fake_report(logs / "runs/2026-11-26_10-00-00")
    # Jobs 2 and 10: natural order, not string order.
    jobs = [write_fake_report(logs / f"multiruns/2026-11-26_12-00-00/{n}") for n in (10, 2, 0)]
    (logs / "runs/2026-11-26_10-00-00/other.json").write_text("{}")

    found = report.find_reports([logs])
    assert found == [jobs[2], jobs[1], jobs[0], single]
    assert report.find_reports([logs / "multiruns/2026-11-26_12-00-00/2"]) == [jobs[1]]
    assert report.find_reports([single]) == [single]
    # A run reached through two PATHs is one row, at the first place it was found.
    assert report.find_reports([single, logs]) == [single, jobs[2], jobs[1], jobs[0]]
    loaded = report.load_reports([logs / "multiruns"])
    assert [r["_file"] for r in loaded] == [str(j) for j in (jobs[2], jobs[1], jobs[0])]


def test_no_report_is_an_error_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="empty"):
        report.find_reports([tmp_path / "empty"])
    with pytest.raises(ReportError, match="nope"):
        report.find_reports([tmp_path / "nope"])


def test_columns_are_only_the_differing_settings(tmp_path: Path) -> None:
    write_fake_report(tmp_path / "a", config={"precision": "bf16-mixed", "devices": 8})
    write_fake_report(tmp_path / "b", config={"precision": "32-true", "devices": 8})
    write_fake_report(tmp_path / "c", config={"precision": "32-true", "devices": 4})
    c = report.compare(report.load_reports([tmp_path]))
    assert c.settings == ["precision", "devices"]
    header = table_rows(report.to_markdown(c))[0]
    assert header[:2] == ["precision", "devices"]
    assert "model" not in header and "container" not in header
    assert c.run_labels[1] == "precision=32-true, devices=8"


SEARCH = ["hparams_search=optuna_deit", "experiment=quickstart", "trainer.max_epochs=10"]


def write_trials(sweep: Path, trials: list[dict[str, str]]) -> None:
    """Fake reports of an Optuna search: job n ran the common overrides and trials[n]'s values."""
    for number, values in enumerate(trials):
        overrides = [*SEARCH, *(f"{key}={value}" for key, value in values.items())]
        write_fake_report(sweep / str(number), overrides=overrides)


def test_searched_values_that_differ_are_columns(tmp_path: Path) -> None:
    write_trials(
        tmp_path / "search",
        [
            {"recipe.base_lr": "0.000321784", "recipe.weight_decay": "0.05"},
            {"recipe.base_lr": "0.00812", "recipe.weight_decay": "0.05"},
            {"recipe.base_lr": "0.0123", "recipe.weight_decay": "0.05"},
        ],
    )
    c = report.compare(report.load_reports([tmp_path]))
    # The searched key that varies, and none that every trial shares (the weight decay, the
    # common overrides).
    assert c.settings == ["recipe.base_lr"]
    header, *rows = table_rows(report.to_markdown(c))
    assert header[0] == "recipe.base_lr" and header[1] == "epoch time (s)"
    assert [row[0] for row in rows] == ["3.22e-4", "8.12e-3", "0.0123"]
    assert "run" not in c.keys  # the values tell the trials apart
    assert c.run_labels[0] == "recipe.base_lr=3.22e-4"
    # --baseline reads the same settings, a number in any notation.
    assert (
        report.compare(report.load_reports([tmp_path]), "recipe.base_lr=8.12e-3").baseline_row == 1
    )


def test_a_run_that_did_not_finish_is_named_below_the_table(tmp_path: Path) -> None:
    write_trials(tmp_path / "search", [{"recipe.base_lr": "1e-3"}, {"recipe.base_lr": "1e30"}])
    failed = tmp_path / "search/1/run_report.json"
    data = json.loads(failed.read_text())
    data["run"]["status"] = "failed"
    failed.write_text(json.dumps(data))
    md = report.to_markdown(report.compare(report.load_reports([tmp_path])))
    assert "_not finished: row 2 failed_" in md.splitlines()


def test_identical_overrides_add_no_column(tmp_path: Path) -> None:
    write_trials(tmp_path / "search", [{"recipe.base_lr": "1e-3"}, {"recipe.base_lr": "0.001"}])
    c = report.compare(report.load_reports([tmp_path]))
    assert c.settings == []  # 1e-3 and 0.001 are one value
    header = table_rows(report.to_markdown(c))[0]
    assert header[0] == "run" and not any("." in cell for cell in header)


def test_an_override_of_a_recorded_setting_is_its_column(tmp_path: Path) -> None:
    for precision in ("32-true", "bf16-mixed"):
        write_fake_report(
            tmp_path / precision,
            config={"precision": precision},
            overrides=[f"trainer.precision={precision}", "trainer.devices=auto"],
        )
    c = report.compare(report.load_reports([tmp_path]), "trainer.precision=32-true")
    assert c.settings == ["precision"] and c.baseline_row == 0


def test_a_run_without_the_override_shows_a_dash_and_says_why(tmp_path: Path) -> None:
    write_trials(tmp_path / "search", [{"recipe.base_lr": "1e-3"}, {}])
    c = report.compare(report.load_reports([tmp_path]))
    md = report.to_markdown(c)
    assert [row[0] for row in table_rows(md)] == ["recipe.base_lr", "1e-3", MISSING]
    assert f"{MISSING} under recipe.base_lr: not overridden" in md


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3.2e-4, "3.2e-4"),
        (0.000321784, "3.22e-4"),
        (0.05, "0.05"),
        (0.123456, "0.123"),
        (250.0, "250"),
        (1e30, "1e30"),
        (0.0, "0.0"),
        (8, "8"),
        (True, "true"),
        ("1e-3", "1e-3"),
    ],
)
def test_setting_text_is_compact(value, text) -> None:
    assert report.setting_text(value) == text


def test_single_run_shows_model_precision_devices(tmp_path: Path) -> None:
    write_fake_report(tmp_path / "a")
    c = report.compare(report.load_reports([tmp_path]))
    assert table_rows(report.to_markdown(c))[0][:4] == [
        "model",
        "precision",
        "devices",
        "epoch time (s)",
    ]


def test_ngc_vs_pip_speedup_against_pip_baseline(ngc_vs_pip: Path) -> None:
    c = report.compare(report.load_reports([ngc_vs_pip]), baseline="container=pip")
    md = report.to_markdown(c)
    header, ngc, pip = table_rows(md)
    # Exactly what an "NGC vs pip" claim needs: the container, then epoch time, images/s, speed-up.
    assert header[0] == "container"
    assert header[1:3] == ["epoch time (s)", "images/s"] and header[-1] == "speed-up"
    assert ngc[0] == "ngc" and ngc[1] == "10.00" and ngc[2] == "763.0" and ngc[-1] == "1.20x"
    assert pip[0] == "pip" and pip[-1] == "1.00x"
    assert c.baseline_row == 1 and c.rows[0]["speedup"] == pytest.approx(763 / 636)
    assert "row 2 (container=pip)" in md
    # Default baseline: the first row.
    assert report.compare(report.load_reports([ngc_vs_pip])).rows[1]["speedup"] == pytest.approx(
        636 / 763
    )


def test_baseline_errors_and_repeats(tmp_path: Path) -> None:
    write_fake_report(tmp_path / "a", config={"container": "ngc"}, images_per_s=800.0)
    write_fake_report(tmp_path / "b", config={"container": "pip"}, images_per_s=600.0)
    write_fake_report(tmp_path / "c", config={"container": "pip"}, images_per_s=640.0)
    reports = report.load_reports([tmp_path])
    with pytest.raises(ReportError, match="no run has container=host"):
        report.compare(reports, "container=host")
    with pytest.raises(ReportError, match="no run has config key 'contaner'"):
        report.compare(reports, "contaner=pip")
    with pytest.raises(ReportError, match="KEY=VALUE"):
        report.compare(reports, "pip")
    # Several matches: the first is the baseline, and the notes say so.
    c = report.compare(reports, "container=pip")
    assert c.baseline_row == 1 and c.rows[0]["speedup"] == pytest.approx(800 / 600)
    assert any("2 runs match container=pip" in note for note in c.notes)
    # Rows with the same settings get a run column to tell them apart.
    assert "run" in c.keys and c.rows[2]["run"].endswith("c")
    # Booleans and numbers match as Hydra writes them.
    assert report.compare(reports, "compile=false").baseline_row == 0


def test_absent_gpu_fields_show_a_dash(tmp_path: Path) -> None:
    write_fake_report(tmp_path / "gpu", config={"container": "ngc"})
    write_fake_report(tmp_path / "cpu", config={"container": "host"}, gpu=False)
    c = report.compare(report.load_reports([tmp_path]))
    header, *rows = table_rows(report.to_markdown(c))
    cpu = dict(zip(header, rows[0], strict=True))  # "cpu" sorts before "gpu"
    gpu = dict(zip(header, rows[1], strict=True))
    for col in ("MFU (%)", "GPU util (%)", "peak GPU mem (GB)"):
        assert cpu[col] == MISSING and gpu[col] != MISSING
    assert gpu["MFU (%)"] == "31.0" and gpu["GPU util (%)"] == "97"
    assert cpu["images/s"] == "910.0"


def test_csv_has_the_rows_as_raw_numbers(ngc_vs_pip: Path, tmp_path: Path) -> None:
    write_fake_report(
        ngc_vs_pip / "runs/2026-11-26_12-00-00",
        config={"container": "host"},
        gpu=False,
        images_per_s=100.0,
    )
    c = report.compare(report.load_reports([ngc_vs_pip]), "container=pip")
    out = tmp_path / "runs.csv"
    report.write_csv(c, out)
    rows = list(csv.DictReader(out.open()))
    assert [r["container"] for r in rows] == ["ngc", "pip", "host"]
    assert float(rows[0]["images_per_s"]) == 763.0
    assert float(rows[0]["speedup"]) == pytest.approx(763 / 636)
    assert float(rows[0]["mfu_pct"]) == pytest.approx(31.0)
    assert rows[2]["mfu_pct"] == "" and rows[2]["gpu_mem_gb"] == ""
    assert list(rows[0]) == c.keys


def test_plot_writes_a_png(ngc_vs_pip: Path, tmp_path: Path) -> None:
    write_fake_report(ngc_vs_pip / "runs/x", config={"container": "host"}, gpu=False)
    c = report.compare(report.load_reports([ngc_vs_pip]))
    out = tmp_path / "runs.png"
    report.plot(c, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vitrain.report", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_without_reports_exits_2_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    result = run_cli(str(tmp_path / "logs"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "logs") in lines[0] and "run_report.json" in lines[0]


def test_cli_end_to_end(ngc_vs_pip: Path, tmp_path: Path) -> None:
    result = run_cli(
        str(ngc_vs_pip),
        "--baseline",
        "container=pip",
        "--csv",
        "out.csv",
        "--plot",
        "out.png",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    header, ngc, pip = table_rows(result.stdout)
    assert header[0] == "container" and ngc[-1] == "1.20x" and pip[-1] == "1.00x"
    assert (tmp_path / "out.csv").read_text().startswith("container,epoch_time_s,images_per_s,")
    assert (tmp_path / "out.png").stat().st_size > 1000


def test_two_real_runs_make_a_table_with_the_right_speedup(real_runs) -> None:
    reports = report.load_reports([real_runs])
    assert [r["config"]["global_batch"] for r in reports] == [16, 32]
    # Each essential the report folds an override into is one a real run records.
    assert set(OVERRIDE_OF) <= set(reports[0]["config"])
    assert "data.batch_size=16" in reports[0]["overrides"]
    comparison = report.compare(reports, baseline="global_batch=16")
    assert comparison.settings == ["global_batch", "per_device_batch"]  # no data.batch_size
    table = report.to_markdown(comparison)
    assert "| global_batch |" in table.splitlines()[0]
    speeds = [r["summary"]["images_per_s"] for r in reports]
    assert f"{speeds[1] / speeds[0]:.2f}x" in table.splitlines()[3]
    assert "1.00x" in table.splitlines()[2]
