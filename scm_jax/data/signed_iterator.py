"""The data protocol over a grain pipeline of global batches, with a state any host can resume.

The state is the pipeline's signature (dataset, split, seed, batch size, ...) and the number of
global batches delivered so far: the same on every host, and independent of the number of
hosts and of grain's worker processes. `set_state` refuses a state saved by another pipeline
instead of silently drifting, and rebuilds the pipeline at the saved batch (grain's datasets
are random access, so that costs nothing). Shared by the image (`images.py`) and latent
(`latents.py`) datasets.
"""
from scm_jax.errors import CheckpointMismatchError


def process_rows(n: int, process_index: int, process_count: int) -> range:
    """The positions, within a global batch of n rows, that process `process_index` feeds: a
    contiguous block, process 0's first, which is where `jax.make_array_from_process_local_data`
    puts each process's rows on a mesh whose batch axes run over the processes in order (as
    `sharding.make_mesh` builds them). Any other split would pair rows with other positions'
    per-sample noise than a one-process run (sCM's randomness is keyed by global position)."""
    return range(n * process_index // process_count, n * (process_index + 1) // process_count)


class SignedIterator:
    """next(it) -> this host's rows of the next global batch; get_state() -> JSON dict;
    set_state(state). `make(start)` builds the iterable of global batches start, start+1, ..."""

    kind = "data"   # named in errors: 'image', 'latent'

    def __init__(self, make, signature: dict):
        self._make, self._signature = make, signature
        self._delivered, self._iter = 0, None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = iter(self._make(self._delivered))
        batch = next(self._iter)
        self._delivered += 1
        return batch

    def get_state(self) -> dict:
        return dict(self._signature, batches=self._delivered)

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "batches" not in state:
            article = "an" if self.kind[0] in "aeiou" else "a"
            raise CheckpointMismatchError(f"not {article} {self.kind} data-iterator state (no "
                                          f"'batches' entry): {state!r}")
        for key, value in self._signature.items():
            if state.get(key) != value:
                raise CheckpointMismatchError(
                    f"data-iterator state has {key}={state.get(key)!r} but this pipeline has "
                    f"{key}={value!r}; it belongs to another pipeline")
        self.close()
        self._delivered = int(state["batches"])

    def close(self) -> None:
        """Stops the current grain iterator (and its worker processes, if any)."""
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()
        self._iter = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
