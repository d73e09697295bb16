"""--gc-every: the collector off during SSL steps and run at known steps; GCTimer's record."""
import gc
import types

import pytest

from fastsynth import engine, gcpolicy, train
from tinydata import tiny_folder


class _SpyGC(types.SimpleNamespace):
    """The gc module as gcpolicy sees it, with collect() calls recorded (and still made)."""

    def __init__(self):
        super().__init__(calls=[], isenabled=gc.isenabled, disable=gc.disable, enable=gc.enable,
                         get_freeze_count=gc.get_freeze_count)

    def collect(self, generation=2):
        self.calls.append(generation)
        return gc.collect(generation)

    def freeze(self):
        self.calls.append("freeze")
        gc.freeze()

    def unfreeze(self):
        self.calls.append("unfreeze")
        gc.unfreeze()


@pytest.fixture
def spy(monkeypatch):
    s = _SpyGC()
    monkeypatch.setattr(gcpolicy, "gc", s)
    assert gc.isenabled()
    yield s
    assert gc.isenabled()  # whatever the test did, the collector is back on


def test_every_zero_leaves_python_alone(spy):
    with gcpolicy.StepGC(0) as g:
        assert gc.isenabled()
        for n in range(1, 10):
            g.step(n)
        g.full()
    assert spy.calls == [] and gc.get_freeze_count() == 0


def test_every_n_collects_young_generations_at_known_steps(spy):
    with gcpolicy.StepGC(3) as g:
        assert not gc.isenabled()
        for n in range(1, 8):
            g.step(n)
        # After the first step everything is collected, then frozen; young ones after steps 3 and 6.
        assert spy.calls == [2, "freeze", 1, 1]
        g.full()
        assert spy.calls == [2, "freeze", 1, 1, 2]
    assert spy.calls == [2, "freeze", 1, 1, 2, "unfreeze", 2]  # everything once more on the way out
    assert gc.get_freeze_count() == 0


def test_someone_elses_freeze_is_left_alone():
    """gc.unfreeze() cannot undo a part: with objects already frozen (a server that froze before
    forking, say), StepGC neither freezes nor unfreezes."""
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with gcpolicy.StepGC(2) as g:
            g.step(1)
            assert g.frozen == 0
        assert gc.get_freeze_count() == before
    finally:
        gc.unfreeze()


def test_frozen_objects_are_skipped_and_later_garbage_still_collected():
    """What exists after the first step is frozen: a full collection leaves it alone (and is
    cheaper for it); cyclic garbage made afterwards is still collected; the end unfreezes."""
    import weakref

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    with gcpolicy.StepGC(5) as g:
        early = cycle()  # unreachable, uncollected (the collector is off): not to be frozen
        g.step(1)  # the full collection before the freeze takes it
        assert early() is None and g.frozen == gc.get_freeze_count() > 0
        later = cycle()
        g.full()
        assert later() is None  # made after the freeze: collected as before
    assert gc.get_freeze_count() == 0


def test_collector_back_on_after_an_error(spy):
    with pytest.raises(RuntimeError):
        with gcpolicy.StepGC(2):
            raise RuntimeError("a step failed")
    with pytest.raises(ValueError, match=">= 0"):
        gcpolicy.StepGC(-1)


def test_timer_records_each_collection():
    with gcpolicy.GCTimer() as t:
        gc.collect(0)
        gc.collect()
    s = t.summary(steps=2)
    assert s["gc_collections"] == {"0": 1, "2": 1}
    assert 0 <= s["gc_max_ms"] <= s["gc_ms_per_step"] * 2 + 1e-9
    assert t._callback not in gc.callbacks


def test_training_runs_its_steps_with_the_collector_off(tmp_path, spy, monkeypatch):
    """6 SSL steps (2 epochs of 3) with --gc-every 2: every step runs with automatic collection
    off, young generations after steps 2, 4, 6, everything at each epoch end and at the end."""
    root = tiny_folder(tmp_path / "data", test_per_class=2, size=40)
    seen, real = [], engine.ssl_step

    def step(*a, **k):
        seen.append(gc.isenabled())
        return real(*a, **k)
    monkeypatch.setattr(engine, "ssl_step", step)
    args = ["--dataset", "folder", "--data-root", root, "--output-dir", str(tmp_path / "run"), "--arch", "resnet18",
            "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--queue-size", "32", "--workers", "0",
            "--synth", "off", "--stage", "ssl", "--gc-every", "2"]
    assert train.main(args) == 0
    assert seen == [False] * 6
    young = [g for g in spy.calls if g == 1]
    # One full collection more than before: after the first step, before the freeze.
    assert len(young) == 3 and spy.calls.count(2) == 4 and spy.calls.count("freeze") == 1, spy.calls
    assert spy.calls[:2] == [2, "freeze"] and spy.calls[-2:] == ["unfreeze", 2]
