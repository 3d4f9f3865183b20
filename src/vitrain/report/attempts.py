"""The attempts of a run: every start of training in the run directory, and how each ended.

`attempts.jsonl` in the run directory, one JSON line per event, only ever appended (nothing of an
earlier attempt is rewritten): a "start" line when an attempt begins training, after its resume
checks passed (an attempt that stops before, with an `error:` line, leaves no trace), and an
"end" line with its status. An attempt killed with -9 has a start and no end. The run report
lists them all (run_report.py); the attempt's number also tags its rows in csv/metrics.csv.
Rank 0 alone writes.
"""

import json
from pathlib import Path
from typing import Any

ATTEMPTS_NAME = "attempts.jsonl"
NO_END = "no end recorded (killed?)"


def read_attempts(output_dir: Path) -> list[dict[str, Any]]:
    """One dict per attempt, in order: its start line, updated by its end line."""
    path = Path(output_dir) / ATTEMPTS_NAME
    attempts: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a full disk or a kill
            number = event.pop("attempt", None)
            kind = event.pop("event", None)
            if kind == "start" and isinstance(number, int):
                attempts[number] = {"attempt": number, "status": NO_END, **event}
            elif kind == "end" and number in attempts:
                attempts[number].update(event)
    return [attempts[number] for number in sorted(attempts)]


def next_attempt(output_dir: Path) -> int:
    attempts = read_attempts(output_dir)
    return attempts[-1]["attempt"] + 1 if attempts else 1


def _append(output_dir: Path, event: dict[str, Any]) -> None:
    with open(Path(output_dir) / ATTEMPTS_NAME, "a") as handle:
        handle.write(json.dumps(event, default=str) + "\n")


def record_start(output_dir: Path, attempt: int, **facts: Any) -> None:
    """facts: started_at, resumed_from (a checkpoint or None), start_epoch, start_step, ..."""
    _append(output_dir, {"event": "start", "attempt": attempt, **facts})


def record_end(output_dir: Path, attempt: int, **facts: Any) -> None:
    """facts: status, finished_at, wall_time_s, end_step, ..."""
    _append(output_dir, {"event": "end", "attempt": attempt, **facts})
