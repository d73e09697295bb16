"""fastsynth: self-supervised fine-grained recognition from synthesized data pairs.

The method is specified in METHOD.md (shared with the project); equation numbers in
docstrings refer to it.
"""
__version__ = "0.1.0"
