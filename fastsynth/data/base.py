"""The one shape every dataset builder returns: lists of real image files with labels.

Every loader (torch now, DALI later) reads the same `ImageList`, so sample indices are the
positions in these lists; the memory bank and retrieval rely on them being stable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


class DatasetError(RuntimeError):
    """A dataset is missing or malformed; the message says which path and what to do."""


@dataclass
class ImageList:
    paths: List[str]          # absolute file paths
    labels: List[int]         # 0 .. num_classes - 1
    classes: List[str] = field(default_factory=list)  # class names, index = label

    def __post_init__(self):
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else (max(self.labels) + 1 if self.labels else 0)


@dataclass
class Splits:
    train: ImageList
    test: ImageList
    name: str = ""
