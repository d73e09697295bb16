"""Run `fastsynth.train` on a variant of the synthetic set: a developer script for issue 2's question
"can the quick budget beat a random encoder on some version of the set?".

Not a test and not a benchmark. Leading NAME=VALUE pairs override the generator's knobs in
fastsynth.data.synthetic (CLUTTER, ROTATION, MARKER, KINDS, LENGTH; values are Python literals),
TPC=N sets the training images per class; every other argument goes to fastsynth.train as is.
Each knob combination gets its own cache folder under $FASTSYNTH_KNOBS_CACHE (default
/tmp/fastsynth-knobs), because the cache name of the set does not encode the knobs.

    python bench/synthetic_knobs.py KINDS=3 "CLUTTER=(0,1)" ROTATION=0 "LENGTH=(0.85,0.9)" \\
        --synth off --lr 0.3 --output-dir /tmp/easy-off

Results of the sweep behind issue 2's status: bench/results/2026-11-26-quick-vs-random/.
"""
import hashlib
import os
import sys

import fastsynth.data.datasets as datasets
import fastsynth.data.synthetic as syn

GENERATOR_KNOBS = ("CLUTTER", "ROTATION", "MARKER", "KINDS", "LENGTH")


def apply_knobs(pairs, extra=()) -> dict:
    """NAME=VALUE strings -> {name: value}; generator knobs are set on fastsynth.data.synthetic,
    names in `extra` are only returned. Shared with synthetic_learnability.py."""
    knobs = {}
    for pair in pairs:
        name, value = pair.split("=", 1)
        if name not in GENERATOR_KNOBS + tuple(extra):
            sys.exit(f"unknown knob {name!r}; choose from {', '.join(GENERATOR_KNOBS + tuple(extra))}")
        knobs[name] = eval(value)  # developer script: knob values are Python literals
        if name in GENERATOR_KNOBS:
            setattr(syn, name, knobs[name])
    return knobs


def main(argv):
    pairs = []
    while argv and "=" in argv[0] and not argv[0].startswith("-"):
        pairs.append(argv.pop(0))
    knobs = apply_knobs(pairs, extra=("TPC",))
    train_per_class = knobs.pop("TPC", 40)
    tag = hashlib.sha1(repr(sorted(knobs.items())).encode()).hexdigest()[:10]
    root = os.path.join(os.environ.get("FASTSYNTH_KNOBS_CACHE", "/tmp/fastsynth-knobs"), tag)

    def variant(root=None, download=False, seed=0, _cache=root):  # the knob cache wins over --data-root
        return syn.synthetic(root=_cache, download=download, seed=seed, train_per_class=train_per_class)

    datasets.synthetic = variant  # build_dataset looks the builder up in this module at call time
    print(f"synthetic knobs {knobs or 'as shipped'}, {train_per_class} train images per class, cache {root}")
    from fastsynth import train
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
