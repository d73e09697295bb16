"""Progress bars for long loops; tqdm is a dependency, but a missing bar must never stop a run.

Under torchrun only rank 0 draws bars (RANK is set by the launcher): W interleaved bars are noise.
"""
import os

try:
    from tqdm.auto import tqdm as _tqdm
except ImportError:
    _tqdm = None


def tqdm(it=None, **kw):
    if _tqdm is None:
        return it
    if os.environ.get("RANK", "0") != "0":
        kw["disable"] = True
    return _tqdm(it, **kw)


__all__ = ["tqdm"]
