"""The data protocol over a grain iterator, with a state that names its pipeline.

`get_state()` is grain's own iterator state plus the pipeline's signature (dataset, split, seed,
batch size, ...); `set_state` refuses a state saved by another pipeline instead of silently
drifting. Shared by the image (`images.py`) and latent (`latents.py`) datasets.
"""
import json

from scm_jax.errors import CheckpointMismatchError


class SignedIterator:
    """next(it) -> the dataset's next batch; get_state() -> JSON dict; set_state(state)."""

    kind = "data"   # named in errors: 'image', 'latent'

    def __init__(self, dataset, signature: dict):
        self._iter, self._signature = iter(dataset), signature

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._iter)

    def get_state(self) -> dict:
        return dict(self._signature, grain=json.loads(json.dumps(self._iter.get_state())))

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "grain" not in state:
            article = "an" if self.kind[0] in "aeiou" else "a"
            raise CheckpointMismatchError(f"not {article} {self.kind} data-iterator state (no 'grain' entry): "
                             f"{state!r}")
        for key, value in self._signature.items():
            if state.get(key) != value:
                raise CheckpointMismatchError(f"data-iterator state has {key}={state.get(key)!r} but this "
                                 f"pipeline has {key}={value!r}; it belongs to another pipeline")
        self._iter.set_state(state["grain"])
