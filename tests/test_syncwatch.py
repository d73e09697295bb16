"""fastsynth.syncwatch: where host synchronisations come from. The capture runs everywhere; torch's
sync debug mode, and with it the training-step checks, needs a GPU (bench/gpu_check.sh runs
this file there)."""
import traceback
import warnings

import pytest
import torch

from fastsynth import fast, syncwatch
from fastsynth.config import Config
from fastsynth.engine import ssl_step
from fastsynth.guard import finite_flag, finite_step
from stepcase import built

CPU = torch.device("cpu")
CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="torch's sync debug mode needs a CUDA device")


def _warn_sync():
    warnings.warn("called a synchronizing CUDA operation")  # torch's text, as a C++ TORCH_WARN raises it


def _line_of(fn, text):
    return next(fn.__code__.co_firstlineno + i for i, line in enumerate(_source(fn)) if text in line)


def _source(fn):
    import inspect
    return inspect.getsource(fn).splitlines()


def test_records_each_sync_where_our_code_made_it_and_passes_other_warnings_on():
    with pytest.warns(UserWarning, match="something else"):  # the outer handler still sees it
        with syncwatch.SyncWatch(CPU) as w:
            _warn_sync()
            _warn_sync()  # every one counted, not once per location
            warnings.warn("something else")
    assert not w.active and w.count == 2
    line = _line_of(_warn_sync, "warnings.warn")
    assert w.sites == [(f"tests/test_syncwatch.py:{line} _warn_sync", 2)]


def test_leaves_warning_state_as_it_was_even_when_the_block_raises():
    show, filters = warnings.showwarning, list(warnings.filters)
    with pytest.raises(RuntimeError, match="boom"):
        with syncwatch.SyncWatch(CPU):
            raise RuntimeError("boom")
    assert warnings.showwarning is show and warnings.filters == filters


def test_a_cpu_watch_leaves_the_sync_debug_mode_alone(monkeypatch):
    def refuse(*a):
        raise AssertionError("sync debug mode touched on a CPU")
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", refuse)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", refuse)
    with syncwatch.SyncWatch(CPU) as w:
        torch.ones(3).nonzero()
    assert w.count == 0


def test_caller_skips_torch_and_the_warnings_machinery():
    torch_file = torch.nn.modules.module.__file__
    stack = traceback.StackSummary.from_list([
        ("/somewhere/else/train.py", 10, "main", None),
        ("/somewhere/else/step.py", 42, "ssl_step", None),
        (torch_file, 1000, "_call_impl", None),
        (warnings.__file__, 100, "_showwarnmsg", None)])
    assert syncwatch.caller(stack) == "/somewhere/else/step.py:42 ssl_step"
    only_torch = traceback.StackSummary.from_list([(torch_file, 7, "f", None)])
    assert syncwatch.caller(only_torch) == f"{torch_file}:7 f"  # nothing of ours: the innermost frame


@needs_gpu
def test_finds_real_syncs_on_a_gpu():
    """Positive control for the step tests below: the mode is on and each sync is found."""
    x = torch.arange(4.0, device="cuda")
    with syncwatch.SyncWatch(x.device) as w:
        x.nonzero()
        float(x.sum())
        x * 2  # no sync
    assert w.active and w.count == 2, w.sites
    assert all(site.startswith("tests/test_syncwatch.py:") for site, _ in w.sites), w.sites
    assert torch.cuda.get_sync_debug_mode() == 0  # restored


def _cfg():
    return Config(arch="resnet18", image_size=32, batch_size=4, queue_size=16, bank_size=8, moco_dim=8,
                  decoder_width=16, sigma_g=0.5, sigma_v=0.5, impl="fast", loader="torch").validate()


@needs_gpu
@pytest.mark.parametrize("deferred", [True, False], ids=["fast-deferred-check", "reference-host-check"])
def test_the_fast_step_makes_no_host_sync(deferred):
    """Issue 4: no host synchronisation in the training step. The fast path (fused optimizers,
    the finiteness check as a device flag, Triton kernels) after two warm-up steps; the
    reference check (finite_step's bool) must show up, at fastsynth/guard.py."""
    dev = torch.device("cuda", torch.cuda.current_device())
    model, opt, dec_opt, autocast, params = built(_cfg(), fast.Plan("fast", "torch", True, False, True), dev)
    check = (lambda loss: finite_flag(loss, params)) if deferred else (lambda loss: finite_step(loss, params))
    g = torch.Generator().manual_seed(0)
    batch = tuple(torch.randn(4, 3, 32, 32, generator=g).to(dev, memory_format=torch.channels_last)
                  for _ in range(3))
    for seed in range(2):
        ssl_step(model, model, opt, dec_opt, None, autocast, batch, seed, check)
    torch.cuda.synchronize(dev)
    with syncwatch.SyncWatch(dev) as w:
        ssl_step(model, model, opt, dec_opt, None, autocast, batch, 2, check)
    torch.cuda.synchronize(dev)
    if deferred:
        assert w.count == 0, w.sites
    else:
        assert w.count >= 1 and all("fastsynth/guard.py" in site for site, _ in w.sites), w.sites
