"""EDM2's published parameters <-> the params of an EDM2-native `EDM2UNet`.

EDM2 (Karras et al. 2024; NVlabs/edm2, training/networks_edm2.py) saves a `Precond` whose
PyTorch state_dict holds the U-Net under the prefix 'unet.':

    unet.emb_fourier.{freqs, phases}   [cnoise]          -> emb_fourier/{freqs, phases}
    unet.emb_noise.weight              [cemb, cnoise]    -> emb_noise/mp_weight [cnoise, cemb]
    unet.emb_label.weight              [cemb, label_dim] -> emb_label/mp_weight [label_dim, cemb]
    unet.enc.{R}x{R}_conv.weight       [out, in, 3, 3]   -> enc_{R}x{R}_conv/mp_weight
                                                            [3, 3, in, out]
    unet.{enc|dec}.{r}x{r}_{name}.<block param>          -> {enc|dec}_{r}x{r}_{name}/<ours>
        name: down, block{i} (enc); in0, in1 (dec, lowest resolution), up, block{i} (dec)
        emb_gain []                 -> modulation/emb_gain
        emb_linear.weight [out, cemb] -> modulation/emb_linear/mp_weight [cemb, out]
        conv_res0 / conv_res1 / conv_skip / attn_proj .weight [out, in, k, k]
                                    -> conv_res0 / conv_res1 / conv_skip / attn/proj [k, k, in, out]
        attn_qkv.weight [3C, C, 1, 1] -> attn/qkv/mp_weight [1, 1, C, 3C], output channels permuted
    unet.out_conv.weight, unet.out_gain -> out_conv/mp_weight, out_gain

(EDM2's 'logvar_fourier.*' / 'logvar_linear.*', its uncertainty head, are ignored: the package
trains its own `AdaptiveWeight`.) Flax kernels are [kh, kw, in, out] and dense [in, out];
PyTorch's conv2d is the same cross-correlation, so a transpose is the whole change, except for
attention: EDM2 reshapes qkv's 3C channels as [heads, C / heads, 3] (`qkv_permutation`), this
package as [3, heads, C / heads]. With `scan_blocks` the unrolled tree is stacked into the
scanned layout (`networks.scan.convert_like`). Only an EDM2-native network (`edm2.NATIVE`)
takes these params: with them it computes F = -F_edm (`edm2` module docstring).
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.networks import scan
from scm_jax.networks.edm2 import EDM2UNet, native_mismatches
from scm_jax.networks.mp_layers import MP_WEIGHT
from scm_jax.tree_checks import path_names

PREFIX = "unet."
IGNORED = ("logvar_fourier.", "logvar_linear.")   # EDM2's uncertainty head (Precond)
_FIRST_CONV = re.compile(r"^(enc)_(\d+)x\2_conv$")
_EDM2_FIRST_CONV = re.compile(r"^unet\.enc\.(\d+)x\1_conv\.weight$")


def qkv_permutation(channels: int, channels_per_head: int) -> np.ndarray:
    """perm [3C] with ours[..., j] = edm2[..., perm[j]] along the qkv output channels.

    Ours: j = which * C + head * cph + c (qkv reshaped [3, heads, cph]); EDM2's: head * 3 cph
    + c * 3 + which (reshaped [heads, cph, 3]). which: 0 q, 1 k, 2 v; cph = channels_per_head.
    """
    if channels % channels_per_head:
        raise ValueError(f"attention width {channels} is not divisible by channels_per_head "
                         f"{channels_per_head}")
    heads = channels // channels_per_head
    which, head, c = np.meshgrid(np.arange(3), np.arange(heads), np.arange(channels_per_head),
                                 indexing="ij")
    return (head * 3 * channels_per_head + c * 3 + which).reshape(-1)


def edm2_name(path: tuple) -> str:
    """EDM2's state_dict name of the param at `path` (unrolled names, e.g. ('dec_8x8_in0',
    'attn', 'qkv', 'mp_weight') -> 'unet.dec.8x8_in0.attn_qkv.weight')."""
    head, rest = path[0], list(path[1:])
    match = re.fullmatch(r"(enc|dec)_(\d+x\d+_\w+)", head)
    parts = [f"{match[1]}.{match[2]}"] if match else [head]
    while rest:
        name = rest.pop(0)
        if name == "modulation":
            continue
        if name == "attn":
            name = f"attn_{rest.pop(0)}"
        parts.append("weight" if name == MP_WEIGHT else name)
    return PREFIX + ".".join(parts)


def _module(model) -> EDM2UNet:
    module = model if isinstance(model, EDM2UNet) else EDM2UNet(**dict(model))
    wrong = native_mismatches(module)
    if wrong:
        raise ValueError(f"EDM2's parameters fit an EDM2-native EDM2UNet (edm2.NATIVE) only; "
                         f"this one has {', '.join(wrong)}")
    if module.guidance_input:
        raise ValueError("EDM2's networks have no guidance input: use guidance_input=False (a "
                         "guided student adds its zero-initialized emb_guidance itself)")
    return module


def _flat(tree) -> dict:
    return {path_names(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nested(flat: dict) -> dict:
    tree = {}
    for path, leaf in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return tree


def _abstract_params(module: EDM2UNet, resolution: int, img_channels: int):
    """module's params as ShapeDtypeStructs (init traced, nothing run), unboxed."""
    x = jax.ShapeDtypeStruct((1, resolution, resolution, img_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if module.num_classes else None
    traced = module.clone(sigma_d=module.sigma_d or 1.0)   # shapes do not depend on sigma_d
    return nn.meta.unbox(jax.eval_shape(traced.init, jax.random.PRNGKey(0), x, t, y)["params"])


def _kind(path: tuple, ndim: int) -> str:
    if path[-1] != MP_WEIGHT:
        return "copy"                        # gains [], MPFourier freqs / phases [N]
    if ndim == 2:
        return "dense"
    return "qkv" if path[-2] == "qkv" else "conv"


def _table(module: EDM2UNet, resolution: int, img_channels: int) -> dict:
    """EDM2 name -> (our unrolled path, our shape, EDM2's shape, kind)."""
    table = {}
    unrolled = module.clone(scan_blocks=False)
    for path, leaf in _flat(_abstract_params(unrolled, resolution, img_channels)).items():
        shape, kind = tuple(leaf.shape), _kind(path, len(leaf.shape))
        theirs = {"copy": shape, "dense": shape[::-1]}.get(
            kind, shape[3:] + shape[2:3] + shape[:2])          # conv: [out, in, kh, kw]
        table[edm2_name(path)] = (path, shape, theirs, kind)
    return table


def _to_ours(kind: str, w: np.ndarray, channels_per_head: int) -> np.ndarray:
    if kind == "dense":
        return np.ascontiguousarray(w.T)
    if kind in ("conv", "qkv"):
        w = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
        if kind == "qkv":
            w = w[..., qkv_permutation(w.shape[2], channels_per_head)]
        return w
    return np.array(w)


def _to_edm2(kind: str, w: np.ndarray, channels_per_head: int) -> np.ndarray:
    if kind == "dense":
        return np.ascontiguousarray(w.T)
    if kind in ("conv", "qkv"):
        if kind == "qkv":
            w = w[..., np.argsort(qkv_permutation(w.shape[2], channels_per_head))]
        return np.ascontiguousarray(w.transpose(3, 2, 0, 1))
    return np.array(w)


def _refuse(problems: list, what: str) -> None:
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{what}: {'; '.join(problems[:5])}{more}")


def params_from_edm2(state: dict, model) -> dict:
    """EDM2's Precond state_dict -> the params of `model` (an EDM2-native `EDM2UNet` or its
    constructor kwargs), in its layout (`scan_blocks` or not).

    state: EDM2 name -> array (numpy or array-like; EDM2's shapes, module docstring); the image
    resolution R and channels C are read from 'unet.enc.{R}x{R}_conv.weight' [c0, C + 1, 3, 3].
    Returns a nested dict of numpy arrays in the state's dtypes. A ValueError names every
    missing, unexpected or mis-shaped entry (with both shapes).
    """
    module = _module(model)
    state = {k: np.asarray(v) for k, v in state.items() if not k.startswith(IGNORED)}
    firsts = [k for k in state if _EDM2_FIRST_CONV.match(k)]
    if len(firsts) != 1 or state[firsts[0]].ndim != 4:
        raise ValueError(f"EDM2 state needs exactly one 4-d 'unet.enc.{{R}}x{{R}}_conv.weight' "
                         f"(the first conv, [model_channels, img_channels + 1, 3, 3]); it has "
                         f"{[(k, state[k].shape) for k in firsts]}")
    resolution = int(_EDM2_FIRST_CONV.match(firsts[0])[1])
    table = _table(module, resolution, state[firsts[0]].shape[1] - 1)
    problems = [f"missing {name} {table[name][2]}" for name in table if name not in state]
    problems += [f"unexpected {name} {state[name].shape}" for name in state if name not in table]
    problems += [f"{name} has shape {state[name].shape}, expected {table[name][2]}"
                 for name in table if name in state and state[name].shape != table[name][2]]
    _refuse(problems, f"EDM2 state does not fit this EDM2UNet at {resolution}x{resolution}")
    flat = {path: _to_ours(kind, state[name], module.channels_per_head)
            for name, (path, _, _, kind) in table.items()}
    params = _nested(flat)
    if module.scan_blocks:
        target = _abstract_params(module, resolution, state[firsts[0]].shape[1] - 1)
        params = scan.convert_like(params, target, stack=np.stack, take=lambda leaf, k: leaf[k])
    return params


def params_to_edm2(params, model) -> dict:
    """The inverse of `params_from_edm2`: params of `model` (either layout; boxed or plain) ->
    EDM2 name -> numpy array, EDM2's 'unet.*' entries (no 'logvar_*'). A ValueError names
    every leaf that is missing, unexpected or mis-shaped."""
    module = _module(model)
    flat = {p: np.asarray(v) for p, v in _flat(nn.meta.unbox(params)).items()}
    firsts = [p for p in flat if len(p) == 2 and _FIRST_CONV.match(p[0]) and p[1] == MP_WEIGHT]
    if len(firsts) != 1 or flat[firsts[0]].ndim != 4:
        raise ValueError(f"params need exactly one enc_{{R}}x{{R}}_conv/{MP_WEIGHT} (the first "
                         f"conv, [3, 3, img_channels + 1, model_channels]); they have {firsts}")
    resolution = int(_FIRST_CONV.match(firsts[0][0])[2])
    img_channels = flat[firsts[0]].shape[2] - 1
    if scan.is_scanned_tree(params):
        scanned = _abstract_params(module.clone(scan_blocks=True), resolution, img_channels)
        names = set(_flat(scanned))
        _refuse([f"missing {'/'.join(p)}" for p in sorted(names - set(flat))]
                + [f"unexpected {'/'.join(p)}" for p in sorted(set(flat) - names)],
                "scanned params do not fit this EDM2UNet")
        unrolled = _abstract_params(module.clone(scan_blocks=False), resolution, img_channels)
        flat = _flat(scan.convert_like(_nested(flat), unrolled, stack=np.stack,
                                       take=lambda leaf, k: leaf[k]))
    table = {path: (name, shape, theirs, kind) for name, (path, shape, theirs, kind)
             in _table(module, resolution, img_channels).items()}
    problems = [f"missing {'/'.join(p)} {table[p][1]}" for p in table if p not in flat]
    problems += [f"unexpected {'/'.join(p)} {flat[p].shape}" for p in flat if p not in table]
    problems += [f"{'/'.join(p)} has shape {flat[p].shape}, expected {table[p][1]}"
                 for p in table if p in flat and flat[p].shape != table[p][1]]
    _refuse(problems, "params do not fit this EDM2UNet")
    return {name: _to_edm2(kind, flat[path], module.channels_per_head)
            for path, (name, _, _, kind) in table.items()}
