"""Progress bars for long loops; tqdm is a dependency, but a missing bar must never stop a run."""
try:
    from tqdm.auto import tqdm
except ImportError:
    def tqdm(it=None, **_):
        return it

__all__ = ["tqdm"]
