"""Metrics and progress output: workdir/metrics.jsonl, TensorBoard (tensorboardX), a progress
line with throughput and ETA, and PNG sample grids.

clu.metric_writers needs TensorFlow, which the core install does not carry (DESIGN.md §3), so
scalars go through tensorboardX.
"""
import json
import os
import time

import numpy as np
from PIL import Image


class MetricLogger:
    """Appends one JSON line per logged step and mirrors the scalars to TensorBoard."""

    def __init__(self, directory: str, *, name: str, total_steps: int, log=print):
        self.name, self.total, self.log = name, total_steps, log
        self.path = os.path.join(directory, "metrics.jsonl")
        self._tb = None
        self._tb_dir = os.path.join(directory, "tensorboard")
        self._last = None   # (time, step) of the previous log line

    def _writer(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self._tb_dir)
        return self._tb

    def write(self, step: int, metrics: dict, *, images: int | None = None) -> None:
        scalars = {k: float(v) for k, v in metrics.items()}
        now = time.time()
        rate = None
        if self._last is not None and step > self._last[1]:
            rate = (step - self._last[1]) / max(now - self._last[0], 1e-9)
            scalars["steps_per_sec"] = rate
        self._last = (now, step)
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(step=step, **scalars)) + "\n")
        writer = self._writer()
        for key, value in scalars.items():
            writer.add_scalar(f"{self.name}/{key}", value, step)
        eta = f"{(self.total - step) / rate / 60:.1f} min" if rate else "?"
        speed = f"{rate:.2f} steps/s" if rate else "warm-up"
        shown = " ".join(f"{k}={scalars[k]:.4g}" for k in ("loss", "raw_loss", "grad_norm",
                                                          "tangent_norm") if k in scalars)
        self.log(f"[{self.name}] step {step}/{self.total} {shown} | {speed} | ETA {eta}")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def save_image_grid(images: np.ndarray, path: str, *, rows: int, low=-1.0, high=1.0,
                    scale: int = 4) -> None:
    """images: [N, H, W, C] in [low, high] -> a PNG grid with `rows` rows, upscaled `scale`x."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), low, np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = img
    pixels = np.clip((grid - low) / (high - low) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    pixels = pixels.repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
