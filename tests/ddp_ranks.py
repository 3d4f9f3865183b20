"""`python train.py ... strategy=ddp_cpu` with every rank's pid, exit code and exit time.

Lightning starts rank 1 as a child of rank 0; when rank 0 exits first, rank 1 is adopted by
init and its exit code is lost. This file, run as a script, is a child subreaper (Linux prctl):
it starts the command, adopts every orphaned descendant, reaps them all and writes each one's
exit code and exit time to a JSON file. `DdpRun` drives it from a test or a tool
(tests/preemption_loop.py): it finds the ranks' pids and waits for all of them, bounded.

    python tests/ddp_ranks.py OUT.json -- python train.py strategy=ddp_cpu ...
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36


def _children(pid: int) -> list[int]:
    """The pids whose parent is pid (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) is in parentheses and may contain spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


class DdpRun:
    """One `train.py` DDP run under the reaper; `ranks()` finds rank 0 and rank 1."""

    def __init__(self, args: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.result_file = workdir / f"ranks-{time.monotonic_ns()}.json"
        self.stderr_file = workdir / f"stderr-{time.monotonic_ns()}.txt"
        self._stderr = open(self.stderr_file, "w")  # noqa: SIM115 (closed in wait)
        root = Path(__file__).resolve().parents[1]
        self.reaper = subprocess.Popen(
            [sys.executable, __file__, str(self.result_file), "--"]
            + [sys.executable, str(root / "train.py"), *args],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=env,
            cwd=workdir,
            start_new_session=True,  # one process group: a hung run is killed whole
        )

    def ranks(self, timeout: float = 120) -> dict[int, int]:
        """{rank: pid} once both ranks run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.reaper.poll() is not None:
                raise AssertionError(f"the run ended before its ranks started: {self.stderr()}")
            rank0 = next(iter(_children(self.reaper.pid)), None)
            if rank0 is not None:
                rank1 = [p for p in _children(rank0) if _environ(p).get("LOCAL_RANK") == "1"]
                if rank1:
                    return {0: rank0, 1: rank1[0]}
            time.sleep(0.2)
        raise AssertionError("rank 1 did not start")

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_file.read_text()[-4000:]

    def wait(self, timeout: float) -> dict[int, dict]:
        """{pid: {"code", "exited_at"}} of every process the run had; a run still going after
        `timeout` seconds is killed (all of it) and fails the caller."""
        try:
            self.reaper.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.reaper.pid, signal.SIGKILL)
            self.reaper.wait()
            hung = f"hung: still running after {timeout} s"
            raise AssertionError(f"{hung}\n{self.stderr()}") from None
        finally:
            self._stderr.close()
        return {int(pid): info for pid, info in json.loads(self.result_file.read_text()).items()}


def _reap(result_file: str, command: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    # The reaper itself ignores the signals the test sends to the ranks' process group.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    child = subprocess.Popen(command, preexec_fn=_default_signals)
    exits = {}
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        exits[pid] = {"code": os.waitstatus_to_exitcode(status), "exited_at": time.time()}
    Path(result_file).write_text(json.dumps(exits))
    return 0 if exits.get(child.pid, {}).get("code") == 0 else 1


def _default_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)


if __name__ == "__main__":
    split = sys.argv.index("--")
    sys.exit(_reap(sys.argv[1], sys.argv[split + 1 :]))
