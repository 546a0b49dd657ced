"""Metrics and progress output: <stage>/metrics.jsonl, TensorBoard (tensorboardX), a progress
line with throughput and ETA, and PNG sample grids. Only the primary process writes or prints.

metrics.jsonl holds one strict-JSON object per logged step ({"step": 100, "loss": 0.12, ...});
a non-finite value is written as null. A resumed run first drops the rows of steps after the
checkpoint it resumed from (they are trained again), so every step appears once. Local files
are appended to; on a bucket, where objects cannot be appended, the file is rewritten.

clu.metric_writers needs TensorFlow, which the core install does not carry, so scalars go
through tensorboardX (which writes to gs:// through google-cloud-storage).
"""
import json
import math
import time

import numpy as np

from scm_jax import files

METRICS_FILE = "metrics.jsonl"


def _json_value(value: float):
    return value if math.isfinite(value) else None


class MetricLogger:
    """Writes one JSON line per logged step and mirrors the scalars to TensorBoard.

    resume_step: the step the run restarts from (None for a fresh start); rows after it, left
    by an interrupted run, are dropped first.
    """

    def __init__(self, directory, *, name: str, total_steps: int, log=print,
                 resume_step: int | None = None):
        self.name, self.total, self.log = name, total_steps, log
        self.primary = files.is_primary()
        self.path = files.join(directory, METRICS_FILE)
        self._tb, self._tb_dir = None, files.join(directory, "tensorboard")
        self._last = None   # (time, step) of the previous log line
        self._rows = []
        if self.primary and self.path.exists():
            keep = resume_step or 0
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            self._rows = [line for line in lines if _step_of(line) <= keep]
            if len(self._rows) != len(lines):
                files.write_text(self.path, "".join(row + "\n" for row in self._rows))

    def _writer(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self._tb_dir))
        return self._tb

    def _append(self, step: int, scalars: dict) -> None:
        """One row to metrics.jsonl (appended; rewritten whole where the store cannot append)
        and its finite values to TensorBoard (a non-finite value is in the row, and the train
        loop's guard has reported its step)."""
        row = json.dumps(dict(step=step, **{k: _json_value(v) for k, v in scalars.items()}),
                         allow_nan=False)
        self._rows.append(row)
        if files.is_local(self.path):
            with self.path.open("a") as f:
                f.write(row + "\n")
        else:
            files.write_text(self.path, "".join(r + "\n" for r in self._rows))
        writer = self._writer()
        for key, value in scalars.items():
            if math.isfinite(value):
                writer.add_scalar(f"{self.name}/{key}", value, step)

    def write(self, step: int, metrics: dict, *, images: int | None = None) -> None:
        scalars = {k: float(v) for k, v in metrics.items()}
        now = time.time()
        rate = None
        if self._last is not None and step > self._last[1]:
            rate = (step - self._last[1]) / max(now - self._last[0], 1e-9)
            scalars["steps_per_sec"] = rate
        self._last = (now, step)
        if not self.primary:
            return
        self._append(step, scalars)
        eta = f"{(self.total - step) / rate / 60:.1f} min" if rate else "?"
        speed = f"{rate:.2f} steps/s" if rate else "warm-up"
        shown = " ".join(f"{k}={scalars[k]:.4g}" for k in ("loss", "raw_loss", "grad_norm",
                                                          "tangent_norm") if k in scalars)
        self.log(f"[{self.name}] step {step}/{self.total} {shown} | {speed} | ETA {eta}")

    def write_eval(self, step: int, scores: dict) -> None:
        """One row of in-training evaluation scores ({'fid': ...} -> 'eval/fid'), also to
        TensorBoard and the log."""
        if not self.primary:
            return
        scalars = {f"eval/{k}": float(v) for k, v in scores.items()
                   if isinstance(v, (int, float, np.floating, np.integer)) and k != "num_samples"}
        self._append(step, scalars)
        self.log(f"[{self.name}] step {step}: " + " ".join(
            f"{k}={v:.4g}" for k, v in scalars.items()))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def image_grid(images: np.ndarray, *, rows: int, low=-1.0, high=1.0, scale: int = 4) -> np.ndarray:
    """images: [N, H, W, C] in [low, high] -> uint8 pixels of a grid with `rows` rows,
    one background pixel between images, upscaled `scale`x ([H', W'] for C = 1, else [H', W', C])."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), low, np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = img
    pixels = np.clip((grid - low) / (high - low) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    pixels = pixels.repeat(scale, 0).repeat(scale, 1)
    return pixels[..., 0] if c == 1 else pixels


def save_image_grid(images: np.ndarray, path, *, rows: int, **kw) -> None:
    """`image_grid` written as a PNG (atomically, through the path layer)."""
    files.save_png(path, image_grid(np.asarray(images), rows=rows, **kw))
