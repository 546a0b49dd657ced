"""Per-sample randomness of a training step (every objective's draws go through it).

Each sample of the global batch gets its own key, `fold_in(step_key, index)`, and each kind of
draw (time, noise, label dropout, ...) its own stream of that key. A sample therefore draws the
same numbers whether the batch is processed whole or in microbatches (gradient accumulation),
on one device or many, so accumulation changes nothing but float rounding.
"""
import jax
import jax.numpy as jnp
from flax import struct

# Independent per-sample streams of `Randomness.keys`, one per kind of draw.
TIME, NOISE, LABEL_DROP, GUIDANCE, GRID_INDEX = range(5)
# aVSD (objectives/vsd.py): the generator's latent, the VSD term's time and noise, and the fake
# score's own diffusion loss (a `substream`).
VSD_LATENT, VSD_TIME, VSD_NOISE, FAKE_SCORE = range(5, 9)


@struct.dataclass
class Randomness:
    """The randomness of one (micro)batch of b samples.

    keys: [b] PRNG keys, one per sample, from the step's key and the sample's index in the
    global batch: a sample draws the same numbers whether the batch is processed whole or in
    microbatches (`microbatches`), on one device or many. dropout_key: one key for the
    networks' dropout, shared by the tangent and the gradient pass of this (micro)batch.
    """

    keys: jax.Array
    dropout_key: jax.Array

    @classmethod
    def for_rows(cls, key, index, part=0):
        """The randomness of global samples `index` [b] (uint32) of the step whose key is
        `key`; `part` (the microbatch) picks the dropout key."""
        k_samples, k_drop = jax.random.split(key)
        return cls(jax.vmap(lambda i: jax.random.fold_in(k_samples, i))(index),
                   jax.random.fold_in(k_drop, part))

    @classmethod
    def for_batch(cls, key, batch_size: int):
        """The randomness of a whole batch of `batch_size` samples (tests, tools)."""
        return cls.for_rows(key, jnp.arange(batch_size, dtype=jnp.uint32))

    def substream(self, kind: int) -> "Randomness":
        """Independent randomness for a second loss on the same samples: every stream and the
        dropout key derived from `kind`."""
        return Randomness(self.stream(kind), jax.random.fold_in(self.dropout_key, kind))

    def stream(self, kind: int) -> jax.Array:
        """[b] keys of one kind of draw (TIME, NOISE, ...)."""
        return jax.vmap(lambda k: jax.random.fold_in(k, kind))(self.keys)

    def normal(self, kind: int, shape=(), dtype=jnp.float32) -> jax.Array:
        """[b, *shape] standard normals."""
        return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(self.stream(kind))

    def uniform(self, kind: int, low: float, high: float) -> jax.Array:
        """[b] uniforms in [low, high)."""
        return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, low, high))(
            self.stream(kind))

    def bernoulli(self, kind: int, p: float) -> jax.Array:
        """[b] booleans, True with probability p."""
        return jax.vmap(lambda k: jax.random.bernoulli(k, p))(self.stream(kind))

    def choice(self, kind: int, n: int, p) -> jax.Array:
        """[b] indices in [0, n) with probabilities p [n]."""
        return jax.vmap(lambda k: jax.random.choice(k, n, p=p))(self.stream(kind))
