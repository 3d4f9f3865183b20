"""What the real containers showed (tests/test_docker_engine.py), checked on the host: a data or log
folder that cannot be written ends in vitrain's one-line error (exit code 2), not a traceback,
and inside vitrain's images the message names the mount that fixes it."""

import pytest
from conftest import TINY, run_cli, run_train

from vitrain.data.digits import write_digits_imagefolder
from vitrain.errors import UserError, docker_hint
from vitrain.hydra_callbacks import unwritable_reason


def test_docker_hint_only_inside_vitrains_images(monkeypatch):
    monkeypatch.delenv("VITRAIN_IMAGE", raising=False)
    assert docker_hint("mount it") == ""
    monkeypatch.setenv("VITRAIN_IMAGE", "pip")
    assert docker_hint("mount it").startswith(" In Docker (user id ")
    assert docker_hint("mount it").endswith(": mount it (docs/docker.md).")


def test_digits_that_cannot_be_written_name_the_folder_and_the_fix(tmp_path, monkeypatch):
    # A file where the folder should be fails for root too (permissions do not).
    (tmp_path / "data").write_text("")
    monkeypatch.setenv("VITRAIN_IMAGE", "ngc")
    with pytest.raises(UserError) as err:
        write_digits_imagefolder(tmp_path / "data" / "digits", 0.2, 0)
    message = str(err.value)
    assert message.startswith(f"cannot write the digits data set to data.root={tmp_path}/data/")
    assert "data.root=/writable/path/digits" in message and "VITRAIN_DATA" in message


def test_digits_already_written_need_no_write_access(tmp_path):
    root = tmp_path / "digits"
    write_digits_imagefolder(root, 0.2, 0)
    root.chmod(0o555)  # a read-only mount of a complete folder is fine
    try:
        write_digits_imagefolder(root, 0.2, 0)
    finally:
        root.chmod(0o755)


def test_missing_data_set_in_an_image_names_the_mount(tmp_path, monkeypatch):
    (tmp_path / "imagenet").mkdir()  # what Docker leaves for a bind mount of a missing folder
    monkeypatch.setenv("VITRAIN_IMAGE", "pip")
    missing = r"imagenet/train does not exist.* IMAGENET_DIR=/host/imagenet"
    with pytest.raises(UserError, match=missing):
        run_train([*TINY, "data=imagenet", f"data.root={tmp_path}/imagenet"], tmp_path / "run")


def test_unwritable_reason_leaves_nothing_behind(tmp_path):
    assert unwritable_reason(tmp_path / "a" / "b") is None
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    assert unwritable_reason(tmp_path / "file" / "runs") == f"{tmp_path}/file: Not a directory"


@pytest.mark.parametrize("multirun", [False, True])
def test_unwritable_log_dir_is_one_line_before_hydra_writes(tmp_path, multirun):
    """Hydra creates the run directory before vitrain runs; it used to end in its traceback."""
    (tmp_path / "logs").write_text("")
    args = ["-m"] if multirun else []
    result = run_cli(
        [*args, *TINY, "trainer.max_epochs=1"],
        tmp_path,
        timeout=120,
        env={"VITRAIN_LOG_DIR": str(tmp_path / "logs"), "VITRAIN_IMAGE": "pip"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the run directory {tmp_path}/logs/")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    assert f"{key}=/writable/path" in last and "VITRAIN_LOGS" in last
    assert "Traceback" not in result.stderr + result.stdout
