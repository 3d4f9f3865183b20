"""Folders that used to train silently wrong: symlink loops, splits with other classes, 16-bit
images, folders named like images. Training, the shard writer and `python -m vitrain.data.check`
apply the same rules (vitrain.data.layout, vitrain.data.decode_pil.to_rgb)."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, run_train
from PIL import Image

from vitrain.data.check import main as check_main
from vitrain.data.decode_fast import FastSampleTransform
from vitrain.data.decode_pil import PilSampleTransform
from vitrain.data.layout import check_classes, list_split
from vitrain.data.write_shards import convert
from vitrain.errors import UserError

AUGMENT = {
    "scale": [0.08, 1.0],
    "ratio": [0.75, 1.3333333],
    "hflip": 0.0,
    "auto_augment": None,
    "re_prob": 0.0,
    "interpolation": "bicubic",
}


def image_folder(root: Path, classes: dict[str, list[str]], per_class: int = 3) -> Path:
    """root/<split>/<class>/<i>.png for {split: [classes]}."""
    for split, names in classes.items():
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(folder / f"{i}.png")
    return root


def training_on(root: Path, tmp_path: Path, num_classes: int) -> None:
    run_train(
        [*TINY, "data=imagenet", f"data.root={root}", f"data.num_classes={num_classes}"],
        tmp_path / "run",
    )


def check_output(root: Path, capsys) -> tuple[int, str, str]:
    code = check_main([str(root), "--workers", "1"])
    out, err = capsys.readouterr()
    return code, out, err


# --- symlinks --------------------------------------------------------------------------------
def test_a_symlink_loop_is_an_error_naming_it_everywhere(tmp_path, capsys):
    root = image_folder(tmp_path / "data", {"train": ["a", "b"], "val": ["a", "b"]})
    loop = root / "train" / "a" / "loop"
    loop.symlink_to("..")  # train/a/loop -> train: torchvision listed class a 41 times
    for attempt in (
        lambda: list_split(root / "train"),
        lambda: training_on(root, tmp_path, num_classes=2),
        lambda: convert(root, tmp_path / "shards"),
    ):
        with pytest.raises(UserError, match=f"a symlink loop: {loop} leads back to"):
            attempt()
    code, _, err = check_output(root, capsys)
    assert code == 2 and f"error: a symlink loop: {loop} leads back to" in err


def test_a_linked_folder_is_read_once_and_a_second_link_to_it_is_an_error(tmp_path):
    root = image_folder(tmp_path / "data", {"train": ["a"]})
    image_folder(tmp_path / "elsewhere", {"b": ["images"]}, per_class=2)
    (root / "train" / "b").symlink_to(tmp_path / "elsewhere" / "b")  # a class on another disk
    listing = list_split(root / "train")
    assert listing.classes == ["a", "b"] and listing.labels == [0, 0, 0, 1, 1]
    (root / "train" / "c").symlink_to(tmp_path / "elsewhere" / "b")
    with pytest.raises(UserError, match=f"{root}/train/c.* is a second path to {root}/train/b"):
        list_split(root / "train")


# --- the splits' classes ---------------------------------------------------------------------
def test_val_with_other_class_folders_than_train_is_an_error_listing_them(tmp_path, capsys):
    root = image_folder(tmp_path / "data", {"train": ["a", "b", "c"], "val": ["a", "b", "d"]})
    message = r"only in train: c; only in val: d\): .* scored against the wrong labels"
    with pytest.raises(UserError, match=message):
        training_on(root, tmp_path, num_classes=3)
    with pytest.raises(UserError, match=message):
        convert(root, tmp_path / "shards")
    code, _, err = check_output(root, capsys)
    assert code == 2 and "only in train: c; only in val: d" in err


def test_val_lacking_a_class_gets_the_class_count_of_train(tmp_path):
    root = image_folder(tmp_path / "data", {"train": ["a", "b", "c"], "val": ["a", "b"]})
    with pytest.raises(UserError, match="only in train: c; only in val: none") as err:
        training_on(root, tmp_path, num_classes=2)
    assert "data.num_classes=3 (train/'s classes)" in str(err.value)
    assert "data.num_classes=2." not in str(err.value)


def test_given_class_names_are_checked_in_their_order_and_count():
    """data.classes (eval.py: a checkpoint's): each split read has them, in their order."""
    check_classes({"val": ["a", "b"]}, 2, "/d", named=["a", "b"])
    with pytest.raises(UserError, match=r"^/d/val has other class folders than data.classes"):
        check_classes({"val": ["a", "b"]}, 2, "/d", named=["b", "a"])
    with pytest.raises(UserError, match=r"\(the same names, in another order: a, b\)"):
        check_classes({"val": ["a", "b"]}, 2, "/d", named=["b", "a"])
    with pytest.raises(UserError, match=r"^data.num_classes=3 but data.classes names 2 classes"):
        check_classes({"val": ["a", "b"]}, 3, "/d", named=["a", "b"])


# --- pixel modes -----------------------------------------------------------------------------
def png_16bit(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40), value, dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("loader", ["fast", "pil"])
def test_a_16bit_png_keeps_its_brightness(loader):
    data = png_16bit(32768)  # mid grey; PIL's convert("RGB") made it 255
    if loader == "fast":
        sample = FastSampleTransform("val", 32, AUGMENT, 1.0, "bicubic")(data).float()
    else:
        mean, std = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)  # undo the normalisation
        sample = PilSampleTransform("val", 32, AUGMENT, 1.0, mean, std)(data)
    assert torch.allclose(sample, torch.full_like(sample, 128.0), atol=1.0)


def test_check_names_converted_and_refused_modes_and_ignores_folders(tmp_path, capsys):
    root = image_folder(tmp_path / "data", {"train": ["a"], "val": ["a"]}, per_class=2)
    (root / "train" / "a" / "grey16.png").write_bytes(png_16bit(1000))
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(root / "val" / "a" / "float.tif")
    (root / "train" / "a" / "empty.JPEG").mkdir()  # a folder named like an image
    nested = root / "train" / "a" / "more.JPEG"
    nested.mkdir()
    Image.new("RGB", (8, 8)).save(nested / "inside.png")  # ... whose image belongs to class a
    assert len(list_split(root / "train").files) == 4
    code, out, err = check_output(root, capsys)
    assert code == 1
    (bad,) = out.splitlines()
    assert bad.startswith(f"{root}/val/a/float.tif\t") and "32-bit float" in bad
    assert f"note: {root}/train/a/grey16.png has 16-bit pixels" in err
    assert "7 image files checked" in err and ": 1 bad, 1 converted, 0 layout errors" in err
