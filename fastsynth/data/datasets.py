"""Registry of dataset builders: a name on the command line -> `Splits` of real image files.

`synthetic` (the embedded default, generated on first use) needs no root; the official
benchmarks of METHOD.md (aircraft, cub, cars) and a generic `folder` tree need `--data-root`.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

from . import official
from .base import DatasetError, Splits
from .synthetic import synthetic

DATASETS: Dict[str, Callable[..., Splits]] = {
    "synthetic": synthetic,
    "aircraft": official.aircraft,
    "cub": official.cub,
    "cars": official.cars,
    "folder": official.folder,
}


def build_dataset(name: str, root: Optional[str] = None, download: bool = False,
                  seed: int = 0) -> Splits:
    """Build the named dataset. `seed` only changes the synthetic set (its generation seed)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
    if name == "synthetic":
        # root None -> the user cache ($FASTSYNTH_CACHE or ~/.cache/fastsynth)
        return synthetic(root=root, download=download, seed=seed)
    if root is None:
        # `python -m fastsynth.train --dataset aircraft` works as written when the data sits in
        # the default place; anywhere else, --data-root says where.
        root = default_data_root(name)
        if not os.path.exists(root) and not download:
            raise DatasetError(f"dataset {name!r}: nothing at the default location {root}; pass --data-root "
                               f"DIR (the folder holding it), set $FASTSYNTH_DATA, or add --download")
    return DATASETS[name](root, download=download)


def default_data_root(name: str) -> str:
    """$FASTSYNTH_DATA/<name>, else ./data/<name>."""
    return os.path.abspath(os.path.join(os.environ.get("FASTSYNTH_DATA", "data"), name))
