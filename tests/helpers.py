"""Shared test helpers: tiny random networks in float32 or float64, experiment configs, tiny
encoded latents, and runs of several processes."""
import functools
import os
import socket
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from scm_jax.networks import UNet, bind_apply


@functools.lru_cache(maxsize=None)
def tiny_unet(dtype=jnp.float32, num_classes=0, guidance_input=False, dropout=0.0):
    """Cached, so tests that share a configuration share its compiled functions."""
    return UNet(channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
                noise_channels=8, emb_channels=16, num_classes=num_classes,
                guidance_input=guidance_input, dropout=dropout, dtype=dtype)


def random_params(module, key, x, t, cond=None, scale=0.3, dtype=jnp.float32):
    """Initialized params plus noise, so zero-initialized layers do not hide any path."""
    cond = cond or {}
    k_init, k_noise = jax.random.split(key)
    params = jax.jit(module.init)(k_init, x, t, cond.get("y"), cond.get("guidance"))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(k_noise, len(leaves))
    leaves = [(p + scale * jax.random.normal(k, p.shape)).astype(dtype) for p, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


def tiny_net_fn(dtype=jnp.float32, key=0, batch=3, **kw):
    """(net_fn, params) of a random tiny U-Net on [batch, 8, 8, 1] inputs."""
    module = tiny_unet(dtype=dtype, **kw)
    x = jnp.zeros((batch, 8, 8, 1), dtype)
    t = jnp.ones((batch,), dtype)
    cond = {}
    if kw.get("num_classes"):
        cond["y"] = jnp.zeros((batch,), jnp.int32)
    if kw.get("guidance_input"):
        cond["guidance"] = jnp.ones((batch,), dtype)
    params = random_params(module, jax.random.PRNGKey(key), x, t, cond, dtype=dtype)
    return _bound(dtype, tuple(sorted(kw.items()))), params


@functools.lru_cache(maxsize=None)
def _bound(dtype, kw):
    kw = dict(kw)
    return jax.jit(bind_apply(tiny_unet(dtype=dtype, **kw), train=kw.get("dropout", 0.0) > 0))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_experiment(name: str, arg: str | None = None, overrides=()):
    """experiments/<name>.py[:arg] with 'key=value' overrides, through the package's one
    config loader (`configs.load`, as the command line loads it)."""
    from scm_jax import configs

    spec = os.path.join(REPO, "experiments", f"{name}.py") + (f":{arg}" if arg else "")
    return configs.load(spec, overrides)


def tiny_latents(out_dir, n=48, image=64, seed=0):
    """An encoded-latent directory as `python -m scm_jax.encode_latents` writes it, from a
    stand-in encoder (random posterior means/stds of the right shape), for runlocal training."""
    import numpy as np

    from scm_jax.data import latent_encoder

    rng = np.random.default_rng(seed)
    side = image // 8

    def batches():
        for start in range(0, n, 16):
            yield dict(image=rng.uniform(-1, 1, (16, image, image, 3)).astype(np.float32),
                       label=rng.integers(0, 1000, 16).astype(np.int32))

    def encode_fn(images):
        b = images.shape[0]
        mean = rng.normal(0, 5, (b, side, side, 4)).astype(np.float32)
        return mean, np.full_like(mean, 0.1)

    index = latent_encoder.encode_batches(batches(), encode_fn, str(out_dir), shard_batches=2,
                                          log=lambda m: None)
    assert index is not None and index["num_examples"] == n


# --- Several processes of one run (jax.distributed on 127.0.0.1) -------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    # The same XLA flags as this process (conftest.py), so both compile the same arithmetic,
    # with `devices` CPU devices.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count=")]
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}", *flags])
    return env


def start_two_processes(workdir, config: str, overrides) -> list:
    """`python -m scm_jax.main` as 2 processes of one run (4 CPU devices each). Their output
    goes to files, not pipes: a pipe nobody drains while
    the test waits on the other process fills up and blocks its writer inside a collective."""
    port = free_port()
    procs = []
    for i in range(2):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "scm_jax.main", f"--config={config}", f"--workdir={workdir}",
             *overrides, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}"],
            cwd=REPO, env=process_env(4), stdout=out, stderr=err, text=True))
        procs[-1].logs = (out, err)
    return procs


def _read_log(log) -> str:
    log.seek(0)
    return log.read()


def wait_for_output(proc, text: str, timeout: float = 600):
    """Waits until `text` appears in the process's stdout (it prints unbuffered)."""
    deadline = time.monotonic() + timeout
    while text not in _read_log(proc.logs[0]):
        assert proc.poll() is None and time.monotonic() < deadline, _read_log(proc.logs[1])[-3000:]
        time.sleep(0.2)


def finish_processes(procs, codes=(0, 0), timeout: float = 600):
    """Waits for every process (at most `timeout` seconds in all) and checks their exit codes;
    on a timeout all of them are killed, so a hung collective does not outlive the test."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        raise AssertionError(f"the processes did not finish within {timeout:g} s; stderr of the "
                             f"first: {_read_log(procs[0].logs[1])[-3000:]}") from None
    outputs = [(_read_log(p.logs[0]), _read_log(p.logs[1])) for p in procs]
    for p, code, (out, err) in zip(procs, codes, outputs):
        assert p.returncode == code, err[-3000:]
    return outputs
