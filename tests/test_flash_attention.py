"""The differentiated pass's flash attention (`scm_jax.kernels.flash_vjp`: the kernels JAX
ships) and its dispatch: which implementation each pass resolves to per platform, why a call
falls back to XLA, the TPU kernel's value and gradients against XLA attention (run on this CPU
in the Pallas interpreter, alone and under a mesh), the sCM tangent pass's primal taken from
that same forward, and `jax.grad` of a whole sCM step with it, compiled for a v5p slice.
"""
import collections
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from scm_jax.errors import ConfigError
from scm_jax.kernels import flash_vjp
from scm_jax.networks import attention as attn

gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def _qkv(seed, b, n, h, d, dtype=jnp.float32, m=None):
    rng = np.random.default_rng(seed)
    shapes = ((b, n, h, d), (b, m or n, h, d), (b, m or n, h, d))
    return tuple(jnp.asarray(rng.normal(size=s), dtype) for s in shapes)


def _value_and_grads(fn, q, k, v, w):
    """fn(q, k, v) and the gradients of sum(fn(q, k, v) * w) w.r.t. q, k, v (w: a fixed
    random cotangent, so every path of the VJP matters)."""
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)  # noqa: E731
    return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_same(got, want, tol):
    (o, grads), (o_ref, grads_ref) = got, want
    np.testing.assert_allclose(o, o_ref, atol=tol, rtol=tol)
    for g, g_ref, name in zip(grads, grads_ref, "qkv"):
        np.testing.assert_allclose(g, g_ref, atol=tol, rtol=tol, err_msg=f"d{name}")


# ---------------------------------------------------------------------------------------------
# Names and dispatch (no kernel runs).
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl,platform,tangent,differentiated", [
    ("auto", "tpu", "pallas:mosaic_tpu", "flash:tpu"),
    ("auto", "gpu", "pallas:triton", "flash:gpu"),
    ("auto", "cpu", "xla", "xla"),
    ("xla", "tpu", "xla", "xla"),                       # explicit XLA: XLA everywhere
    ("xla", "gpu", "xla", "xla"),
    ("pallas", "tpu", "pallas:mosaic_tpu", "flash:tpu"),
    ("pallas", "cpu", "pallas:interpret", "xla"),       # interpreters have no flash partner
    ("pallas:tpu_interpret", "tpu", "pallas:tpu_interpret", "xla"),
    ("flash:tpu", "cpu", "pallas:mosaic_tpu", "flash:tpu"),   # pinned: the platform is moot
    ("flash:gpu", "tpu", "pallas:triton", "flash:gpu"),
])
def test_each_pass_resolves_per_platform(impl, platform, tangent, differentiated):
    assert attn.resolve_attention_impl(impl, platform) == tangent
    assert attn.resolve_attention_impl(impl, platform, differentiated=True) == differentiated
    # The differentiated impl of the tangent impl is the same: the two always pair up.
    assert attn.resolve_attention_impl(tangent, platform, differentiated=True) == differentiated


def test_unknown_names_are_config_errors():
    for bad in ("flash", "flash:cuda", "flash:", "cudnn", "pallas:tpu"):
        with pytest.raises(ConfigError, match="unknown attention_impl"):
            attn.check_attention_impl(bad)
    assert attn.check_attention_impl("flash:gpu") == "flash:gpu"


def test_fallback_reasons(monkeypatch):
    q, k, _ = _qkv(0, 2, 128, 2, 16)
    qh, kh = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    if not flash_vjp._cudnn_present():
        assert "no cuDNN" in flash_vjp.unsupported("gpu", qh, kh)
        monkeypatch.setattr(flash_vjp, "_cudnn_present", lambda: True)   # to check the rest
    assert flash_vjp.unsupported("tpu", q, k) is None
    assert "multiples of 128" in flash_vjp.unsupported("tpu", q[:, :64], k[:, :64])
    assert "multiples of 128" in flash_vjp.unsupported("tpu", q, k[:, :100])
    assert "key mask" in flash_vjp.unsupported("tpu", q, k, jnp.ones(k.shape[:2], bool))
    assert "float16 or bfloat16" in flash_vjp.unsupported("gpu", q, k)
    assert flash_vjp.unsupported("gpu", qh, kh) is None
    assert "head dim 12" in flash_vjp.unsupported("gpu", qh[..., :12], kh[..., :12])
    assert "head dim 256" in flash_vjp.unsupported("gpu", jnp.tile(qh, 16), jnp.tile(kh, 16))
    with pytest.raises(ValueError, match="variant"):
        flash_vjp.unsupported("cuda", q, k)


def test_unsupported_calls_are_xla_attention():
    """A call the shipped kernel cannot take is XLA attention, exactly (no kernel is traced)."""
    q, k, v = _qkv(1, 2, 64, 2, 8)
    mask = jnp.asarray(np.random.default_rng(0).random((2, 64)) < 0.5)
    want = attn.dot_product_attention(q, k, v)
    for impl in ("flash:tpu", "flash:gpu"):        # 64 tokens; float32 for cuDNN
        jaxpr = jax.make_jaxpr(lambda q, k, v, i=impl: attn.attention(q, k, v, impl=i))(q, k, v)
        assert "pallas_call" not in str(jaxpr) and "cudnn" not in str(jaxpr)
        np.testing.assert_array_equal(attn.attention(q, k, v, impl=impl), want)
    np.testing.assert_array_equal(attn.attention(q, k, v, impl="flash:tpu", kv_mask=mask),
                                  attn.dot_product_attention(q, k, v, mask))


# ---------------------------------------------------------------------------------------------
# The TPU kernel (splash attention), run by the Pallas interpreter on this CPU.
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def tpu_interpreter():
    with flash_vjp.interpret():
        yield


def test_tpu_flash_value_and_grads_equal_xla(tpu_interpreter):
    q, k, v = _qkv(2, 1, 128, 2, 16, m=256)      # two key blocks of 128
    w = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)
    flash = lambda q, k, v: attn.attention(q, k, v, impl="flash:tpu")  # noqa: E731
    assert "pallas_call" in str(jax.make_jaxpr(flash)(q, k, v))
    _assert_same(_value_and_grads(flash, q, k, v, w),
                 _value_and_grads(attn.dot_product_attention, q, k, v, w), 2e-5)


def test_tpu_flash_under_a_mesh_runs_per_device(tpu_interpreter):
    """Under `jax.set_mesh` the kernel runs in a shard_map over the batch (Mosaic kernels are
    not auto-partitioned), and value and gradients are unchanged."""
    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1), ("data", "fsdp"),
                axis_types=(AxisType.Auto,) * 2)
    q, k, v = _qkv(4, 2, 128, 1, 8)
    w = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32)
    flash = lambda q, k, v: attn.attention(q, k, v, impl="flash:tpu")  # noqa: E731
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: _value_and_grads(flash, q, k, v, w))(q, k, v)
        assert "shard_map" in str(jax.make_jaxpr(flash)(q, k, v))
        # A batch the mesh cannot split falls back to XLA.
        assert "not divisible" in flash_vjp.unsupported("tpu", q[:1], k[:1])
    _assert_same(got, _value_and_grads(attn.dot_product_attention, q, k, v, w), 2e-5)


def test_tangent_primal_is_the_gradient_pass_forward(tpu_interpreter, monkeypatch):
    """The custom_jvp beside the kernel returns its flash partner's output as its primal and
    the fused kernel's tangent; `jax.grad` through that primal (the sCM loss's one forward)
    runs the partner's fused backward and equals XLA attention's gradient, and never
    differentiates the kernel. On this CPU both run in interpreters: the JVP kernel's
    interpret backend stands in for Mosaic."""
    monkeypatch.setitem(attn.FLASH_PARTNERS, "interpret", "tpu")
    q, k, v = _qkv(6, 1, 128, 2, 16)
    dq, dk, dv = _qkv(7, 1, 128, 2, 16)
    w = _qkv(8, 1, 128, 2, 16)[0]
    fused = lambda q, k, v: attn.pallas_attention(q, k, v, None, "interpret")  # noqa: E731
    jaxpr = str(jax.make_jaxpr(lambda *a: jax.jvp(fused, a[:3], a[3:]))(q, k, v, dq, dk, dv))
    assert "attention_jvp_mosaic" in jaxpr and "splash" in jaxpr
    o, do = jax.jvp(fused, (q, k, v), (dq, dk, dv))
    o_ref, do_ref = jax.jvp(attn.dot_product_attention, (q, k, v), (dq, dk, dv))
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(do, do_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(o, flash_vjp.attention(q, k, v, "tpu"))

    def loss(attention, q, k, v):
        # The sCM shape: differentiate the JVP's primal; its tangent only through stop_gradient.
        o, do = jax.jvp(attention, (q, k, v), (dq, dk, dv))
        return jnp.sum(o * w) + jnp.sum(jax.lax.stop_gradient(do) * o)

    grad_jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, fused), (0, 1, 2)))(q, k, v))
    assert "splash_mha_fwd_residuals" in grad_jaxpr and "attention_jvp_mosaic" in grad_jaxpr
    grads = jax.grad(functools.partial(loss, fused), (0, 1, 2))(q, k, v)
    grads_ref = jax.grad(functools.partial(loss, attn.dot_product_attention), (0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# A whole sCM step, resolved for a TPU mesh: grad goes through the flash kernel, the tangent
# pass through the fused JVP kernel.
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow   # a TPU compile
def test_scm_step_with_flash_compiles_for_v5p_sharing_the_forward():
    pytest.importorskip("libtpu", reason="lowering for a TPU needs libtpu (the [test] extra)")
    from scm_jax import compile as cc
    from scm_jax.stage import build_stage
    from tests.helpers import load_experiment

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # A tiny DiT on 16x16 latents with patch 1: 256 tokens, so the flash kernel takes them.
    config = load_experiment("imagenet512", "variant=runlocal,backbone=dit", overrides=(
        "data.resolution=128", "model.patch_size=1", "model.scan_blocks=False",
        "sct.batch_size=8"))
    devices = cc.topology_devices(cc.parse_topology("v5p-8"))
    mesh = Mesh(np.asarray(devices).reshape(4, 1), ("data", "fsdp"),
                axis_types=(AxisType.Auto,) * 2)
    stage = build_stage(config, "sct", mesh)
    assert stage.objective.model_cfg.attention_impl == "pallas:mosaic_tpu"
    assert stage.objective.differentiated_attention_impl == "flash:tpu"
    hlo = stage.lower().compile().as_text()
    kernels = collections.Counter(re.findall(
        r"%([A-Za-z_]\w*?)(?:\.\d+)? = .*custom_call_target=\"tpu_custom_call\"", hlo))
    # Per block: the JVP kernel (tangent pass), the flash backward's kernel (gradient pass)
    # and ONE flash forward: the tangent pass's primal and the gradient pass's forward
    # are the same call, which XLA computes once.
    depth = config.model.depth
    assert kernels.pop("attention_jvp_mosaic") == depth
    assert kernels.pop("splash_mha_fwd_residuals") == depth
    assert kernels == {"splash_mha_dkv_no_residuals": depth}   # the fused dQ/dK/dV kernel


# ---------------------------------------------------------------------------------------------
# cuDNN on a GPU.
# ---------------------------------------------------------------------------------------------

@gpu
def test_cudnn_flash_value_and_grads_equal_xla():
    q, k, v = _qkv(8, 2, 256, 4, 64, jnp.bfloat16)
    w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
    flash = jax.jit(lambda q, k, v: attn.attention(q, k, v, impl="flash:gpu"))
    assert "cudnn" in jax.jit(flash).lower(q, k, v).as_text()
    _assert_same(_value_and_grads(flash, q, k, v, w),
                 _value_and_grads(attn.dot_product_attention, q, k, v, w), 3e-2)
