"""Scoring a stream of generated samples: FID, FD-DINOv2 and precision / recall against a
reference, without holding the samples.

    scorer = FeatureScorer(networks, reference, featurize, pr_samples=10000)
    scores = scorer.score(generate, num=50000, state_path=".../eval/scd_nfe2.partial.npz")
    # {'fid': ..., 'fd_dinov2': ..., 'precision': ..., 'recall': ..., 'num_samples': 50000}

`generate(i)` returns the i-th chunk of samples (a global batch, the same on every process: the
caller draws it over the whole mesh from a key folded with i, so chunks never repeat a sample
and the result does not depend on the number of processes). Each chunk's features are added to
streaming moments (`statistics.FeatureMoments`); the first `pr_samples` Inception feature
vectors are kept for precision / recall (Kynkaanniemi et al. 2019, k = 3, against the
reference's real features). Every `save_every` chunks the accumulators are written to
`state_path` (primary process), so a preempted evaluation resumes at the first unfinished chunk.
"""
import time

import numpy as np

from scm_jax import files
from scm_jax.evaluation.frechet import frechet_distance
from scm_jax.evaluation.precision_recall import precision_recall
from scm_jax.evaluation.statistics import FeatureMoments

PR_NETWORK = "inception"   # precision / recall live in the Inception pool features (as ADM's)


class FeatureScorer:
    """FID / FD-DINOv2 (and precision / recall) of streamed samples against a reference. The
    scorer protocol `evaluate.py` uses: `metric` (the score rows are compared to the teacher
    by), `baseline_rows()` (rows scored before any model: none here), `summary()` (what the
    results record of the scorer), and `score(...)`."""

    metric = "fid"

    def baseline_rows(self) -> list:
        return []

    def summary(self) -> dict:
        return dict(reference=self.reference.source)

    def __init__(self, networks, reference, featurize, *, pr_samples: int = 10000, k: int = 3,
                 save_every: int = 10):
        self.networks, self.reference, self.featurize = networks, reference, featurize
        self.pr_samples, self.k, self.save_every = int(pr_samples), int(k), int(save_every)
        for net in networks:
            mu, _ = reference.require(net.name)
            if mu.shape[0] != net.dim:
                raise ValueError(f"reference {reference.source} has {net.name} statistics of "
                                 f"dimension {mu.shape[0]}, the network gives {net.dim}")

    def _fresh(self):
        return 0, {n.name: FeatureMoments(n.dim) for n in self.networks}, []

    def _load(self, state_path, num):
        if not state_path or not files.exists(state_path):
            return self._fresh()
        state = files.load_npz(state_path)
        if int(state["num"]) != num:   # another sample count: start over
            return self._fresh()
        moments = {n.name: FeatureMoments.from_state(state, f"{n.name}/") for n in self.networks}
        kept = [state["pr_features"]] if "pr_features" in state else []
        return int(state["chunks_done"]), moments, kept

    def _save(self, state_path, num, chunks_done, moments, kept):
        if not state_path or not files.is_primary():
            return
        arrays = dict(num=np.int64(num), chunks_done=np.int64(chunks_done))
        for name, m in moments.items():
            arrays.update(m.state(f"{name}/"))
        if kept:
            arrays["pr_features"] = np.concatenate(kept)
        files.save_npz(state_path, **arrays)

    def score(self, generate, num: int, batch_size: int, *, state_path=None, log=None,
              sink=None, wants_images=lambda chunk: False, labels=None) -> dict:
        """Scores `num` samples drawn `batch_size` at a time by `generate(chunk)`.

        sink(chunk, uint8 images [b, H, W, C]) receives the pixels of every chunk for which
        `wants_images(chunk)` (grids, saved samples). labels: unused (the digits scorer's).
        """
        chunks = -(-num // batch_size)
        done, moments, kept = self._load(state_path, num)
        if done and log:
            log(f"resuming at sample {min(done * batch_size, num)} of {num} ({state_path})")
        start = time.time()
        for i in range(done, chunks):
            rows = min(batch_size, num - i * batch_size)
            feats, images = self.featurize(generate(i), with_images=bool(wants_images(i)))
            feats = {k: np.asarray(v)[:rows] for k, v in feats.items()}
            if images is not None and sink is not None:
                sink(i, np.asarray(images)[:rows])
            for name, m in moments.items():
                m.add(feats[name])
            have = sum(len(f) for f in kept)
            if PR_NETWORK in feats and have < self.pr_samples:
                kept.append(feats[PR_NETWORK][:self.pr_samples - have])
            if (i + 1) % self.save_every == 0 and i + 1 < chunks:
                self._save(state_path, num, i + 1, moments, kept)
            if log and (i + 1 - done) % max(1, chunks // 10) == 0:
                rate = (i + 1 - done) * batch_size / max(time.time() - start, 1e-9)
                log(f"{min((i + 1) * batch_size, num)}/{num} samples, {rate:.1f}/s, eta "
                    f"{(chunks - i - 1) * batch_size / max(rate, 1e-9):.0f}s")
        self._save(state_path, num, chunks, moments, kept)
        out = {"num_samples": num}
        for net in self.networks:
            mu, sigma = moments[net.name].mean_cov()
            out[net.metric] = frechet_distance(*self.reference.require(net.name), mu, sigma)
        real = self.reference.features.get(PR_NETWORK)
        if kept and real is not None and min(len(real), sum(len(f) for f in kept)) > self.k:
            out.update(precision_recall(real, np.concatenate(kept), k=self.k))
        return out
