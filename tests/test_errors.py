"""Errors a user can cause: one clear message naming the value and the fix."""

import pytest
from conftest import TINY, run_cli, run_train

from vitrain.data.sizing import per_device_batch_size
from vitrain.errors import UserError


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=imagenet", "data.root=/no/such/imagenet"], "data.root=/no/such/imagenet"),
        (["model.name=vit_no_such_model"], "model.name=vit_no_such_model is not a timm model"),
        (["data.image_size=30"], "data.image_size=30 is not divisible by model.patch_size=4"),
        (
            ["trainer.precision=16-mixed", "trainer.accelerator=cpu"],
            "use trainer.precision=bf16-mixed",
        ),
        (["data.batch_size=63", "trainer.accelerator=cpu"], "an odd number"),
        (["trainer.precision=fp8"], "trainer: Precision 'fp8' is invalid"),
        # raised while Hydra instantiates the data module: reaches the user unwrapped
        (["data=imagenet", "data.loader=bogus"], "data.loader=bogus is not one of fast, pil"),
        # a setting the chosen data option's class does not take (an experiment's, say)
        (
            ["data=synthetic", "+data.train_image_size=24"],
            "data.train_image_size=24 is set, but data=synthetic",
        ),
    ],
)
def test_user_error_names_the_value_and_the_fix(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        run_train([*TINY, "recipe.mixup_alpha=0.8", *overrides], tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.num_workers=-1", "data.num_workers=-1 must be 0 (load in the training process)"),
        ("seed=abc", "seed=abc is not a seed .* e.g. seed=42"),
    ],
)
def test_a_bad_value_stops_before_anything_is_written(override, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_train([*TINY, override], tmp_path)
    assert not (tmp_path / "run_report.json").exists() and not (tmp_path / "csv").exists()


def test_a_dataset_root_that_is_a_file_is_named_so(tmp_path):
    (tmp_path / "imagenet.tar").write_bytes(b"not a folder")
    root = tmp_path / "imagenet.tar"
    with pytest.raises(UserError, match=f"data.root={root} is a file, not a folder"):
        run_train([*TINY, "data=imagenet", f"data.root={root}"], tmp_path / "run")


def test_empty_dataset_root_names_the_folder_and_the_override(tmp_path):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(UserError) as err:
        run_train([*TINY, "data=imagenet", f"data.root={tmp_path}/imagenet"], tmp_path / "run")
    assert f"{tmp_path}/imagenet/train" in str(err.value)
    assert "data.root=/path/to/imagenet" in str(err.value)


def test_batch_not_divisible_by_world_size():
    with pytest.raises(
        UserError, match=r"data.batch_size=1023 .* world size 8 .* data.batch_size=1016"
    ):
        per_device_batch_size(1023, 8)
    assert per_device_batch_size(1024, 8) == 128


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = run_cli(["data.root=/no/such/imagenet"], tmp_path)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: data.root=/no/such/imagenet does not exist")
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_unknown_model_option_lists_the_options(tmp_path):
    result = run_cli(["model=vit_huge"], tmp_path)
    assert result.returncode != 0
    assert "Could not find 'model/vit_huge'" in result.stderr
    assert "vit_b16" in result.stderr and "Traceback" not in result.stderr


def test_cli_batch_not_divisible_by_ddp_world_fails_before_launching(tmp_path):
    result = run_cli(
        ["experiment=quickstart", "strategy=ddp_cpu", "data.batch_size=63", "logger=none"],
        tmp_path,
    )
    assert result.returncode == 2
    assert (
        "data.batch_size=63 (the global batch) is not divisible by the world size 2"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
