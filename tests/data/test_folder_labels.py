"""ImageFolder label rules match the .npz ones (issue 14): one class is an error; a val class with no
training image is one warning line; class folders that differ between the splits are one error line."""

import numpy as np
import pytest
from PIL import Image

from fastkd.data.datasets import load_data


def _folder(root, classes):
    for split, names in classes.items():
        for c in names:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8), 60 * i + 7 * len(c), np.uint8)).save(d / f"{i}.png")
    return str(root)


def test_single_class_folder_is_one_line_error(tmp_path):
    spec = _folder(tmp_path / "ds", {"train": ["a"], "val": ["a"]})
    with pytest.raises(ValueError, match="only one class") as e:
        load_data(spec, log=lambda *a: None)
    assert "\n" not in str(e.value)


def test_val_class_unseen_in_train_warns_once(tmp_path, capsys):
    spec = _folder(tmp_path / "ds", {"train": ["a", "b"], "val": ["a", "b", "c"]})
    (tmp_path / "ds" / "train" / "c").mkdir()  # the class exists in train/, without an image
    d = load_data(spec, log=lambda *a: None)
    assert d.num_classes == 3
    out = capsys.readouterr()
    assert (out.err + out.out).count("val class(es) 'c' have no training image") == 1


def test_split_class_folders_must_match(tmp_path):
    spec = _folder(tmp_path / "ds", {"train": ["a", "b"], "val": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="give both splits the same class subfolders"):
        load_data(spec, log=lambda *a: None)
