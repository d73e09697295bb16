"""The tiny synthetic set the end-to-end tests train on, as a plain train/ test/ folder tree."""
import os

from fastsynth.data.synthetic import synthetic


def tiny_folder(root, train_per_class: int = 6, test_per_class: int = 3, size: int = 48) -> str:
    """4 classes written under `root`; returns the folder holding train/ and test/ (for
    `--dataset folder --data-root`)."""
    splits = synthetic(root=str(root), num_classes=4, train_per_class=train_per_class,
                       test_per_class=test_per_class, size=size)
    return os.path.dirname(os.path.dirname(os.path.dirname(splits.train.paths[0])))
