"""The images built and run by a real Docker engine, through docker-compose.yml's CPU services.

Marked `docker`. They run wherever an engine answers `docker info` and the base images are there:
.ci/run starts one through ../shared/docker/engine.sh, which also builds local stand-ins for the
bases that cannot be pulled here (standin/ngc-pytorch:25.12 for nvcr.io/nvidia/pytorch:25.12-py3,
standin/python:3.11 for python:3.12-slim). Without an engine or bases every test is skipped with
the reason (pytest -rs shows it). VITRAIN_DOCKER_NGC_BASE / VITRAIN_DOCKER_PIP_BASE pick other
bases, e.g. the real ones on a machine that can pull them; no base is ever pulled unasked.

The images are built once per session, from the project's Dockerfiles with only
--build-arg BASE_IMAGE changed, as vitrain-test:ngc and vitrain-test:pip (never over a user's
vitrain:ngc), owned by VITRAIN_UID/GID 4321 when the tests run as root (the invoking user's ids
otherwise); Docker's layer cache makes a second session's builds take seconds.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitrain.data.digits import write_digits_imagefolder

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "vitrain-test"  # containers, network and volume apart from a user's `vitrain...`
TAGS = {"ngc": "vitrain-test:ngc", "pip": "vitrain-test:pip"}
STANDINS = {"ngc": "standin/ngc-pytorch:25.12", "pip": "standin/python:3.11"}
SERVICES = {"ngc": "train-cpu", "pip": "train-pip-cpu"}
PROFILES = ["--profile", "cpu", "--profile", "ab-cpu"]
ENGINE_SH = ROOT.parent / "shared" / "docker" / "engine.sh"
# Bounds: a cold pip build downloads 7 GB of wheels; a 30-epoch quickstart takes ~80 s alone.
BUILD_TIMEOUT, RUN_TIMEOUT, START_TIMEOUT = 1800, 1800, 600
QUICKSTART_ACC1 = 0.95  # README: 97.2 % on the host; digits val set of 360 images

# What pip must never have replaced in the NGC image; hashed file by file in base and image.
FINGERPRINT = r"""
import hashlib, json, re
from importlib import metadata
stack = re.compile(r"(torch|torchvision|torchaudio|triton|pytorch-triton|nvidia-(?!ml-py$).*)")
out = {"versions": {}, "files": {}}
for dist in metadata.distributions():
    name = dist.metadata["Name"].lower().replace("_", "-")
    out["versions"][name] = dist.version
    if not stack.fullmatch(name):
        continue
    digest, count = hashlib.sha256(), 0
    for file in sorted(dist.files or [], key=str):
        digest.update(str(file).encode() + b"\0")
        try:
            with open(dist.locate_file(file), "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            count += 1
        except OSError:
            digest.update(b"missing")
    out["files"][name] = {"where": str(dist.locate_file("")), "count": count,
                          "sha256": digest.hexdigest()}
print(json.dumps(out))
"""


def run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def tail(result: subprocess.CompletedProcess, chars: int = 4000) -> str:
    return (result.stdout + result.stderr)[-chars:]


# --- the engine, the bases, the images ------------------------------------------------------


@pytest.fixture(scope="session")
def compose_command() -> list[str]:
    """Compose v1 (`docker-compose`, Debian's) or v2 (`docker compose`), once an engine answers."""
    how = f"start one with {ENGINE_SH}" if ENGINE_SH.exists() else "none is set up here"
    if not shutil.which("docker"):
        pytest.skip(f"no docker CLI: the docker tests need a Docker engine ({how})")
    info = run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=60)
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no answer"])[-1]
        pytest.skip(f"no Docker engine answers ({reason}); {how}")
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if run(["docker", "compose", "version"], timeout=60).returncode == 0:
        return ["docker", "compose"]
    pytest.skip("no Docker Compose (docker-compose or the docker compose plugin)")


@pytest.fixture(scope="session")
def bases(compose_command) -> dict[str, str]:
    chosen = {}
    for image, standin in STANDINS.items():
        base = os.environ.get(f"VITRAIN_DOCKER_{image.upper()}_BASE", standin)
        present = run(["docker", "image", "inspect", base], timeout=60).returncode == 0
        if base == standin and not present:
            pytest.skip(
                f"base image {standin} is not on this engine: {ENGINE_SH} builds it, or set "
                f"VITRAIN_DOCKER_{image.upper()}_BASE to a base image to build on"
            )
        chosen[image] = base
    return chosen


@pytest.fixture(scope="session")
def owner() -> tuple[int, int]:
    """The ids the images are built for: the invoking user's, or a non-root pair under root
    (root's own ids would prove nothing about ownership)."""
    return (os.getuid(), os.getgid()) if os.getuid() != 0 else (4321, 4321)


# The commit the images are built from, as README's Docker section has users pass it.
GIT_COMMIT = subprocess.run(
    ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
).stdout.strip()


def compose_env(owner: tuple[int, int], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "AB_", "VITRAIN_"))}
    env |= {"VITRAIN_UID": str(owner[0]), "VITRAIN_GID": str(owner[1])}
    env |= {"VITRAIN_GIT_COMMIT": GIT_COMMIT}
    env |= {"VITRAIN_NGC_IMAGE": TAGS["ngc"], "VITRAIN_PIP_IMAGE": TAGS["pip"]}
    return env | extra


@pytest.fixture(scope="session")
def images(compose_command, bases, owner):
    """Both images, built by Compose from the Dockerfiles with only BASE_IMAGE changed."""
    built = {}
    for image, service in SERVICES.items():
        started = time.monotonic()
        result = run(
            [*compose_command, "-p", PROJECT, *PROFILES, "build"]
            + ["--build-arg", f"BASE_IMAGE={bases[image]}", service],
            timeout=BUILD_TIMEOUT,
            cwd=ROOT,
            env=compose_env(owner),
        )
        assert result.returncode == 0, f"building {TAGS[image]} failed:\n{tail(result)}"
        size = run(["docker", "image", "inspect", "--format", "{{.Size}}", TAGS[image]], 60)
        built[image] = {"seconds": time.monotonic() - started, "bytes": int(size.stdout)}
        print(f"built {TAGS[image]} on {bases[image]}: {built[image]}", file=sys.stderr)
    yield built
    # Containers, network and cache volume go; the images stay, as the next session's cache.
    down = [*compose_command, "-p", PROJECT, *PROFILES, "down", "-v", "--remove-orphans"]
    run(down, 300, cwd=ROOT, env=compose_env(owner))


@pytest.fixture
def workspace(tmp_path, owner) -> dict:
    """The host folders compose mounts, owned by the image's user as `mkdir -p` would make them."""
    dirs = {name: tmp_path / name for name in ("data", "logs", "wandb")}
    dirs["imagenet"] = dirs["data"] / "imagenet"
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, *owner)
    env = {"VITRAIN_DATA": dirs["data"], "VITRAIN_LOGS": dirs["logs"]}
    env |= {"VITRAIN_WANDB": dirs["wandb"], "IMAGENET_DIR": dirs["imagenet"]}
    return dirs | {"env": {k: str(v) for k, v in env.items()}, "tmp": tmp_path}


def compose(compose_command, owner, workspace, *args, files=(), timeout=RUN_TIMEOUT, **env):
    command = [*compose_command, "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml")]
    for extra in files:
        command += ["-f", str(extra)]
    return run(
        [*command, *PROFILES, *args],
        timeout=timeout,
        cwd=ROOT,
        env=compose_env(owner, **(workspace["env"] | env)),
    )


def exit_code(compose_command, owner, workspace, service: str, files=(), **env) -> int:
    ids = compose(
        compose_command, owner, workspace, "ps", "-q", service, files=files, timeout=60, **env
    )
    assert ids.stdout.strip(), f"no container of {service}: {tail(ids)}"
    state = run(["docker", "inspect", "--format", "{{.State.ExitCode}}", ids.stdout.split()[0]], 60)
    return int(state.stdout)


def owned_by(root: Path, owner: tuple[int, int]) -> list[str]:
    """Paths under root that are not owner's (none expected)."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        stat = path.lstat()
        if (stat.st_uid, stat.st_gid) != owner:
            wrong.append(f"{path} {stat.st_uid}:{stat.st_gid}")
    return wrong


# --- 1. the builds --------------------------------------------------------------------------


def fingerprint(image: str) -> dict:
    result = run(["docker", "run", "--rm", "--entrypoint", "python", image, "-c", FINGERPRINT], 600)
    assert result.returncode == 0, tail(result)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_both_images_build_and_the_ngc_image_keeps_the_bases_torch(images, bases, owner):
    """In the built NGC image, torch and torchvision (and any CUDA-stack wheel the base has) are
    the base's own: the same versions and the same files, byte for byte, as before vitrain was
    installed, and no distribution of the base changed version."""
    before, after = fingerprint(bases["ngc"]), fingerprint(TAGS["ngc"])
    assert {"torch", "torchvision"} <= set(before["files"])
    assert after["files"] == before["files"]
    changed = {
        name: (version, after["versions"].get(name))
        for name, version in before["versions"].items()
        if after["versions"].get(name) != version
    }
    assert changed == {}
    added = set(after["versions"]) - set(before["versions"])
    assert "vitrain" in added and {"lightning", "timm", "wandb"} <= added

    pip_image = fingerprint(TAGS["pip"])["versions"]
    assert pip_image["torch"].startswith("2.10.") and pip_image["torchvision"].startswith("0.25.")
    for image, tag in TAGS.items():
        who = run(["docker", "run", "--rm", "--entrypoint", "id", tag], 120).stdout
        assert f"uid={owner[0]}(vitrain) gid={owner[1]}(vitrain)" in who, (image, who)
        env = run(["docker", "run", "--rm", "--entrypoint", "env", tag], 120).stdout
        assert f"VITRAIN_IMAGE={image}" in env.splitlines()


# --- 2. the quickstart through compose, on the CPU ------------------------------------------


@pytest.mark.parametrize(
    ("image", "overrides"),
    [
        # The service's own command: the whole quickstart, as a user without a GPU runs it.
        ("ngc", []),
        # Hydra overrides after the service name replace that command.
        (
            "pip",
            ["model=vit_micro", "experiment=quickstart", "trainer.max_epochs=2"]
            + ["tags=[docker_test]", "hydra.run.dir=/workspace/logs/runs/overridden"],
        ),
    ],
    ids=["ngc-quickstart", "pip-overrides"],
)
def test_compose_cpu_quickstart(compose_command, images, owner, workspace, image, overrides):
    """`docker-compose --profile cpu run --rm train-cpu [overrides]`: the digits are written to
    the host's data folder, the run report and wandb's offline run land in the host's logs and
    wandb folders, everything owned by VITRAIN_UID/GID."""
    started = time.monotonic()
    result = compose(
        compose_command, owner, workspace, "run", "--rm", "-T", SERVICES[image], *overrides
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, tail(result)
    reports = list(workspace["logs"].glob("runs/*/run_report.json"))
    assert len(reports) == 1, reports
    report = json.loads(reports[0].read_text())
    run_dir = reports[0].parent
    assert report["run"]["status"] == "finished"
    assert report["config"]["container"] == image  # detected in the image, recorded
    assert report["environment"]["container"]["image"] == image
    assert report["environment"]["git_commit"] == (GIT_COMMIT or None)  # the build argument
    if overrides:
        assert run_dir.name == "overridden"  # hydra.* overrides are Hydra's, not in the report
        assert report["overrides"] == [o for o in overrides if not o.startswith("hydra.")]
        assert report["config"]["max_epochs"] == 2 and "docker_test" in report["config"]["tags"]
    else:
        assert report["config"]["max_epochs"] == 30
        acc1 = report["summary"]["best_val_acc1"]
        print(f"quickstart in {TAGS[image]}: {acc1:.4f} val/acc1, {seconds:.0f} s", file=sys.stderr)
        assert acc1 >= QUICKSTART_ACC1
    # wandb: offline (no key), under the run directory; its settings and cache in ./wandb.
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert list(workspace["wandb"].rglob("*.log"))
    # The digits, written where the image expects them (VITRAIN_DATA_DIR=/data): ./data/digits.
    digits = workspace["data"] / "digits"
    assert (digits / ".complete").is_file()
    assert sorted(p.name for p in (digits / "val").iterdir()) == [str(d) for d in range(10)]
    for name in ("data", "logs", "wandb"):
        assert owned_by(workspace[name], owner) == []


# --- 3. the A/B on the CPU ------------------------------------------------------------------


def test_ab_on_cpu_reports_both_images(compose_command, images, owner, workspace):
    """`--profile ab-cpu up ab-report-cpu`: each image on synthetic data and on the digits folder
    mounted as the data set (IMAGENET_DIR), then vitrain.report's table with a row per image."""
    digits = workspace["data"] / "digits"
    write_digits_imagefolder(digits, 0.2, 0)
    for path in [digits, *digits.rglob("*")]:
        os.chown(path, *owner)
    env = {"IMAGENET_DIR": str(digits), "AB_NAME": "cpu"}
    result = compose(
        compose_command, owner, workspace, "up", "--no-color", "ab-report-cpu", timeout=1500, **env
    )
    assert result.returncode == 0, tail(result)
    for service in ("ab-ngc-cpu", "ab-pip-cpu", "ab-report-cpu"):
        assert exit_code(compose_command, owner, workspace, service, **env) == 0, tail(result)
    for data in ("synthetic", "imagenet"):
        table = (workspace["logs"] / "ab" / "cpu" / f"{data}.md").read_text()
        assert f"## {data}" in result.stdout  # printed, and kept in logs/ab/cpu/<data>.md
        speed = {r.split(" | ")[0][2:]: r for r in table.splitlines() if r.endswith("x |")}
        assert set(speed) == {"ngc", "pip"} and speed["pip"].endswith("| 1.00x |")
        versions = {
            r.split(" | ")[0][2:]: r.split(" | ")
            for r in table.splitlines()
            if r.startswith(f"| {data}-")
        }
        assert {name: cells[1] for name, cells in versions.items()} == {
            f"{data}-ngc": "ngc",
            f"{data}-pip": "pip",
        }
        assert versions[f"{data}-ngc"][3] == "25.12" and versions[f"{data}-pip"][3] == "–"
        assert all(cells[5].startswith("2.10.") for cells in versions.values())  # torch
        report = json.loads((workspace["logs"] / f"ab/cpu/{data}-ngc/run_report.json").read_text())
        assert report["config"]["data"] == data and report["config"]["model"] == "vit_micro"
    compose(compose_command, owner, workspace, "rm", "-f", "-s", timeout=300, **env)


# --- 4. faults ------------------------------------------------------------------------------


def test_stop_saves_a_checkpoint_and_the_same_up_resumes(compose_command, images, owner, workspace):
    """`docker-compose stop` (SIGTERM) mid-training: last.ckpt on the host, a non-zero exit; the
    same `up` again resumes and ends at the step of an uninterrupted run."""
    epochs = 6
    override = workspace["tmp"] / "short.yml"
    command = ["experiment=quickstart", f"trainer.max_epochs={epochs}", "logger=csv"]
    command.append("trainer.enable_progress_bar=false")
    override.write_text(json.dumps({"services": {"train-pip-cpu": {"command": command}}}))
    env = {"VITRAIN_RUN_ID": "preempted"}  # the same run directory for both `up`s
    run_dir = workspace["logs"] / "runs" / "preempted"
    up = ["up", "--no-color", "--exit-code-from", "train-pip-cpu", "train-pip-cpu"]
    base = [*compose_command, "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml")]
    first = subprocess.Popen(
        [*base, "-f", str(override), *PROFILES, *up],
        cwd=ROOT,
        env=compose_env(owner, **(workspace["env"] | env)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (run_dir / "checkpoints" / "last.ckpt").exists():
            assert first.poll() is None, first.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "no checkpoint after the first epoch"
            time.sleep(0.5)
        stop = compose(
            compose_command, owner, workspace, "stop", "train-pip-cpu", files=[override], **env
        )
        assert stop.returncode == 0, tail(stop)
        output, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0, output[-4000:]
    code = exit_code(compose_command, owner, workspace, "train-pip-cpu", files=[override], **env)
    assert code == 143, output[-4000:]  # vitrain's exit for SIGTERM, after saving
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    stopped = json.loads((run_dir / "run_report.json").read_text())
    assert stopped["run"]["status"] == "preempted"
    per_epoch = stopped["epochs"][0]["global_step"]

    again = compose(compose_command, owner, workspace, *up, files=[override], **env)
    assert again.returncode == 0, tail(again)
    assert "resuming from /workspace/logs/runs/preempted/checkpoints/last.ckpt" in again.stdout
    resumed = json.loads((run_dir / "run_report.json").read_text())
    assert resumed["run"]["status"] == "finished"
    first_attempt, second = resumed["attempts"]
    assert first_attempt["status"] == "preempted"
    assert second["start_step"] == first_attempt["end_step"] > 0  # it continued, not over
    assert resumed["epochs"][-1]["global_step"] == epochs * per_epoch  # as if never stopped
    assert owned_by(workspace["logs"], owner) == []
    compose(compose_command, owner, workspace, "rm", "-f", "-s", files=[override], timeout=300)


@pytest.mark.parametrize("fault", ["read-only data", "missing data set", "unwritable logs"])
def test_bad_mounts_end_in_vitrains_error(compose_command, images, owner, workspace, fault):
    args, env, files = ["experiment=quickstart", "logger=csv"], {}, []
    if fault == "read-only data":
        # What `mkdir -p data` cannot fix: the data folder mounted read-only, digits not there.
        # (An override file: `run -v` does not replace a service's mount of the same path.)
        files = [workspace["tmp"] / "ro.yml"]
        volume = {"volumes": [f"{workspace['data']}:/data:ro"]}
        files[0].write_text(json.dumps({"services": {"train-cpu": volume}}))
        expected = "error: cannot write the digits data set to data.root=/data/digits"
    elif fault == "missing data set":
        env = {"IMAGENET_DIR": str(workspace["tmp"] / "no" / "such" / "imagenet")}
        args = ["data=imagenet", "logger=csv"]
        expected = "error: data.root=/data/imagenet: /data/imagenet/train does not exist"
    else:
        workspace["logs"].chmod(0o555)  # as a folder Docker created as root is to the user
        expected = "error: the run directory /workspace/logs/runs/"
    command = ["run", "--rm", "-T", "train-cpu", *args]
    result = compose(compose_command, owner, workspace, *command, files=files, timeout=300, **env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    # The last line the container wrote (Compose v1's `run` prints the exit code after it).
    last = [line for line in output.splitlines() if line.strip() and not line.isdigit()][-1]
    assert last.startswith(expected) and "In Docker (user id" in last, last
    if fault == "read-only data":
        assert "(Read-only file system)" in last
    assert "Traceback" not in output
