"""EDM2's network pickles read without torch and without running the code they carry.

    net = load("/weights/edm2-img512-xs-2147483-0.135.pkl")
    net.kwargs   # {'img_resolution': 64, 'img_channels': 4, 'label_dim': 1000,
                 #  'model_channels': 128, 'channel_mult': [1, 2, 3, 4], ...}
    net.params   # {'unet.out_gain': float32 [], 'unet.emb_fourier.freqs': float32 [128],
                 #  'unet.enc.64x64_conv.weight': float32 [128, 5, 3, 3], ...}

EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models";
code: NVlabs/edm2) publishes its ImageNet networks as `.pkl` files written by plain `pickle`:

* The training loop (`training/training_loop.py`) and `reconstruct_phema.py` dump a
  `dnnlib.util.EasyDict` (a dict) with `encoder`, `dataset_kwargs`, `loss_fn` and `ema`; `ema`
  is the network, a `Precond` (`training/networks_edm2.py`) holding a `UNet` of `Block`s,
  `MPConv`s and `MPFourier`s, in float16. Some tools save the `Precond` alone; both are read.
* EDM2's `torch_utils/persistence.py` pickles each of those objects as the call
  `torch_utils.persistence._reconstruct_persistent_obj(meta)`, meta = dict(type='class',
  version=6, module_src=<the source of the module defining the class>, class_name=<e.g.
  'Block'>, state=<the object's __dict__>). A module's state holds `training`, `_parameters`,
  `_buffers`, `_non_persistent_buffers_set`, `_modules` (name -> submodule; the `enc` / `dec`
  containers are `torch.nn.modules.container.ModuleDict`s, pickled as class + state), hook
  dicts, the constructor's `_init_args` / `_init_kwargs`, and the plain attributes.
* A tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` (a
  parameter wraps it in `_rebuild_parameter`), and its storage is
  `torch.storage._load_from_bytes(b)`, `b` a legacy `torch.save` stream of that storage, read
  by `scm_jax.evaluation.torch_pickle.storage_from_bytes`.

Refused: the embedded `module_src` is never executed nor compiled (a persistent object becomes a
record of its class name and state), and the unpickler resolves only `ALLOWED_GLOBALS`, each to
a stand-in of this module; any other global (`os.system`, `builtins.eval`, a class of the
network's code) is refused before anything is called, with a one-line TorchFileError naming it.
Pickle protocols 3 to 5 are read (`pickle.dump` writes 4 on the Python versions EDM2 runs on).

`Edm2Network.params` are the `Precond.state_dict()` entries as float32 arrays in PyTorch's
layout (an MPConv weight is [out, in, kh, kw], or [out, in] for a fully connected one);
`Edm2Network.kwargs` are the constructor arguments of `Precond` merged with those of `UNet` and
its blocks, EDM2's defaults filled in where the pickle leaves one out (`DEFAULTS`).
"""
import collections
import copy
import dataclasses
import os
import pickle
import struct

import numpy as np

from scm_jax import files
from scm_jax.errors import MissingInputError
from scm_jax.evaluation import torch_pickle
from scm_jax.evaluation.torch_pickle import TorchFileError

__all__ = ["ALLOWED_GLOBALS", "DEFAULTS", "Edm2Network", "TorchFileError", "load"]

# The defaults of EDM2's constructors (training/networks_edm2.py): Precond's own, UNet's, and
# Block's that UNet passes on as **block_kwargs (flavor / resample_mode / attention are UNet's).
DEFAULTS = {
    "use_fp16": True, "sigma_data": 0.5, "logvar_channels": 128,                    # Precond
    "model_channels": 192, "channel_mult": [1, 2, 3, 4], "channel_mult_noise": None,  # UNet
    "channel_mult_emb": None, "num_blocks": 3, "attn_resolutions": [16, 8],
    "label_balance": 0.5, "concat_balance": 0.5,
    "resample_filter": [1, 1], "channels_per_head": 64, "dropout": 0,                 # Block
    "res_balance": 0.3, "attn_balance": 0.3, "clip_act": 256,
}
PRECOND_ARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data",
                "logvar_channels")   # Precond's positional order
UNET_ARGS = ("img_resolution", "img_channels", "label_dim", "model_channels", "channel_mult",
             "channel_mult_noise", "channel_mult_emb", "num_blocks", "attn_resolutions",
             "label_balance", "concat_balance")   # UNet's positional order
PRECOND_ATTRS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data")
REQUIRED = ("img_resolution", "img_channels", "label_dim")   # no default in EDM2
_PERSISTENT = ("torch_utils.persistence", "_reconstruct_persistent_obj")
_REBUILD_TENSOR = ("torch._utils", "_rebuild_tensor_v2")


@dataclasses.dataclass(frozen=True)
class Edm2Network:
    """An EDM2 network read from its pickle.

    kwargs: constructor arguments (img_resolution, img_channels, label_dim, model_channels,
        channel_mult, num_blocks, attn_resolutions, ..., sigma_data, logvar_channels, use_fp16).
    params: Precond state_dict() name -> float32 array in PyTorch's layout, e.g.
        'unet.enc.64x64_block0.conv_res0.weight' [cout, cout, 3, 3], 'unet.out_gain' [],
        'logvar_linear.weight' [1, logvar_channels]; in state_dict() order.
    class_names: the persistent classes the pickle holds, sorted (e.g. 'Block', 'EDM2Loss').
    """
    kwargs: dict
    params: dict
    class_names: tuple


class _Refused(Exception):
    """A global outside the allow-list; `load` reports it with the path."""


@dataclasses.dataclass(frozen=True, eq=False)
class _Persistent:
    """A persistent object of EDM2's code, not constructed: its class name and state."""
    class_name: str
    state: dict


class _ModuleDict:
    """A `torch.nn.ModuleDict`, not constructed: its state (the module's __dict__)."""
    state = None

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise ValueError(f"a ModuleDict's state is a {type(state).__name__}, not a dict")
        self.state = state


class _EasyDict(dict):
    """`dnnlib.util.EasyDict`, a dict; pickled as the class plus its items."""

    def __setstate__(self, state):
        if state:
            raise ValueError("an EasyDict carries attributes besides its items")


@dataclasses.dataclass(frozen=True)
class _StorageElements:
    dtype: str              # a torch_pickle.DTYPES key
    elements: np.ndarray    # [numel], as stored


def _load_from_bytes(data):
    if not isinstance(data, bytes):
        raise ValueError(f"a storage is given as a {type(data).__name__}, not bytes")
    return _StorageElements(*torch_pickle.storage_from_bytes(data))


def _rebuild_parameter(data, *_):
    if not isinstance(data, np.ndarray):
        raise ValueError(f"an nn.Parameter holds a {type(data).__name__}, not a tensor")
    return data


def _numpy_reconstruct(cls, *_):
    """numpy's `_reconstruct(ndarray, shape, typecode)`: an empty array its state then fills."""
    if cls is not np.ndarray:
        raise ValueError(f"numpy's _reconstruct is asked for {cls!r}, not numpy.ndarray")
    return np.ndarray((0,), np.int8)


def _numpy_scalar(dtype, data=None):
    """numpy's `scalar(dtype, bytes)`: one numpy scalar (object scalars are refused)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise ValueError(f"a numpy scalar of dtype {dtype!r}, not a numeric dtype")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise ValueError(f"a numpy scalar of dtype {dtype} holds {data!r}")
    return np.frombuffer(data, dtype)[0]


# (module, name) -> the stand-in the unpickler gives for it. With the two globals each unpickler
# adds (_PERSISTENT, which records the class names, and _REBUILD_TENSOR, which numbers the
# tensors for its messages), these are all that is resolved.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,   # protocol 3 writes a set as set(list); 4 and 5 need no global
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDict,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(module, "_reconstruct"): _numpy_reconstruct
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _numpy_scalar
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
}
ALLOWED_GLOBALS = tuple(sorted(f"{m}.{n}" for m, n in (*_ALLOWED, _PERSISTENT, _REBUILD_TENSOR)))


class _Unpickler(pickle.Unpickler):
    """Resolves only the allow-list; persistent objects become `_Persistent` records."""

    def __init__(self, file):
        super().__init__(file)
        self.class_names = set()
        self.tensors = 0
        self._globals = {**_ALLOWED, _PERSISTENT: self._reconstruct_persistent_obj,
                         _REBUILD_TENSOR: self._rebuild_tensor}

    def find_class(self, module, name):
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def _reconstruct_persistent_obj(self, meta):
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise ValueError(f"a persistent object's meta is not a dict(type='class', ...): "
                             f"{_describe(meta)}")
        name, source, state = meta.get("class_name"), meta.get("module_src"), meta.get("state")
        if not isinstance(name, str) or not isinstance(source, str):
            raise ValueError("a persistent object's meta lacks the str class_name / module_src")
        if not isinstance(state, (dict, type(None))):
            raise ValueError(f"persistent {name}'s state is a {type(state).__name__}, not a dict")
        self.class_names.add(name)
        return _Persistent(name, dict(state or {}))   # module_src is dropped, never run

    def _rebuild_tensor(self, storage, offset, size, stride, *_):
        """`_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])`:
        the array [*size] (float16 stays float16 here)."""
        self.tensors += 1
        name = f"#{self.tensors} of the pickle"
        if not isinstance(storage, _StorageElements):
            raise ValueError(f"tensor {name}'s storage is a {type(storage).__name__}, not a "
                             f"storage")
        if not isinstance(offset, int) or not all(isinstance(v, int) for v in (*size, *stride)):
            raise ValueError(f"tensor {name} has the offset {offset!r}, size {size!r}, stride "
                             f"{stride!r}")
        return torch_pickle.strided_array(name, storage.elements, storage.dtype, offset, size,
                                          stride)


def _describe(obj) -> str:
    if isinstance(obj, _Persistent):
        return f"a persistent {obj.class_name}"
    if isinstance(obj, dict):
        keys = [repr(k) for k in list(obj)[:8]]
        return f"a dict with the keys [{', '.join(keys)}{', ...' if len(obj) > 8 else ''}]"
    return f"a {type(obj).__name__}"


def _precond(top) -> _Persistent:
    """The network of the unpickled object: its 'ema' entry, or the object itself."""
    if isinstance(top, dict) and "ema" in top:
        ema, where = top["ema"], "its 'ema'"
    elif isinstance(top, _Persistent):
        ema, where = top, "the pickle"
    else:
        raise ValueError(f"found {_describe(top)}; expected a dict whose 'ema' is EDM2's "
                         f"persistent Precond (a training snapshot), or the Precond itself")
    if not (isinstance(ema, _Persistent) and ema.class_name == "Precond"):
        raise ValueError(f"{where} is {_describe(ema)}; expected EDM2's persistent Precond")
    return ema


def _state_dict(module, prefix: str, out: dict) -> None:
    """Adds module.state_dict() (parameters, persistent buffers, then submodules) to `out`."""
    state = module.state
    if not isinstance(state, dict):
        raise ValueError(f"module {prefix or '(root)'!r} has no state")
    skip = state.get("_non_persistent_buffers_set") or set()
    for section in ("_parameters", "_buffers"):
        entries = state.get(section) or {}
        if not isinstance(entries, dict):
            raise ValueError(f"{section} of {prefix or '(root)'!r} is not a dict")
        for name, value in entries.items():
            if value is None or (section == "_buffers" and name in skip):
                continue
            if not isinstance(value, np.ndarray):
                raise ValueError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            floating = np.issubdtype(value.dtype, np.floating)
            out[f"{prefix}{name}"] = value.astype(np.float32) if floating else value
    submodules = state.get("_modules") or {}
    if not isinstance(submodules, dict):
        raise ValueError(f"_modules of {prefix or '(root)'!r} is not a dict")
    for name, sub in submodules.items():
        if sub is None:
            continue
        if not isinstance(sub, (_Persistent, _ModuleDict)):
            raise ValueError(f"submodule {prefix}{name} is {_describe(sub)}, not a persistent "
                             f"module or a ModuleDict")
        _state_dict(sub, f"{prefix}{name}.", out)


def _init_kwargs(record: _Persistent, positional: tuple) -> dict:
    """The constructor arguments a persistent object recorded, positional ones named."""
    args = record.state.get("_init_args") or ()
    kwargs = record.state.get("_init_kwargs") or {}
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise ValueError(f"{record.class_name}'s _init_args / _init_kwargs are not a tuple / dict")
    if len(args) > len(positional):
        raise ValueError(f"{record.class_name} was constructed with {len(args)} positional "
                         f"arguments; EDM2's takes at most {len(positional)}")
    return {**dict(zip(positional, args)), **kwargs}


def _kwargs(precond: _Persistent) -> dict:
    """DEFAULTS < UNet's arguments < Precond's arguments < Precond's attributes."""
    unet = (precond.state.get("_modules") or {}).get("unet")
    if not (isinstance(unet, _Persistent) and unet.class_name == "UNet"):
        raise ValueError(f"the Precond's 'unet' is {_describe(unet)}, not a persistent UNet")
    kwargs = copy.deepcopy(DEFAULTS)
    kwargs.update(_init_kwargs(unet, UNET_ARGS))
    kwargs.update(_init_kwargs(precond, PRECOND_ARGS))
    kwargs.update({k: precond.state[k] for k in PRECOND_ATTRS if k in precond.state})
    missing = [k for k in REQUIRED if k not in kwargs]
    if missing:
        raise ValueError(f"the Precond records no {', '.join(missing)}")
    return kwargs


def _check_shapes(kwargs: dict, params: dict) -> None:
    """The arguments agree with the weights: the first and last convolutions [cout, cin, 3, 3],
    logvar_linear [1, logvar_channels], emb_label present iff label_dim."""
    res, channels = kwargs["img_resolution"], kwargs["img_channels"]
    base = kwargs["model_channels"] * kwargs["channel_mult"][0]
    expected = {f"unet.enc.{res}x{res}_conv.weight": (base, channels + 1, 3, 3),
                "unet.out_conv.weight": (channels, base, 3, 3),
                "logvar_linear.weight": (1, kwargs["logvar_channels"])}
    for name, shape in expected.items():
        if name not in params:
            raise ValueError(f"the network has no {name!r}")
        if params[name].shape != shape:
            raise ValueError(f"{name} is {list(params[name].shape)}, but the constructor "
                             f"arguments make it {list(shape)}")
    if ("unet.emb_label.weight" in params) != bool(kwargs["label_dim"]):
        raise ValueError(f"label_dim is {kwargs['label_dim']} but unet.emb_label is "
                         f"{'present' if 'unet.emb_label.weight' in params else 'absent'}")


# What malformed pickles make the reader raise; file-system errors (OSError) are not among them.
_FORMAT_ERRORS = (ValueError, pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError,
                  AttributeError, struct.error, OverflowError, RecursionError)


def load(path) -> Edm2Network:
    """The EDM2 network in the pickle at `path` (a local path or a bucket URI); see the module
    docstring for the format.

    Raises MissingInputError when there is no file, and TorchFileError (a UserError and
    ValueError; one line naming the path) for a global outside ALLOWED_GLOBALS, a pickle that
    holds no EDM2 Precond, or a truncated or corrupt file.
    """
    where = os.fspath(path)
    if not files.exists(path):
        raise MissingInputError(f"EDM2 network pickle not found at {where!r}")
    try:
        with files.path(path).open("rb") as f:
            unpickler = _Unpickler(f)
            top = unpickler.load()
        precond = _precond(top)
        params = {}
        _state_dict(precond, "", params)
        kwargs = _kwargs(precond)
        _check_shapes(kwargs, params)
    except _Refused as err:
        raise TorchFileError(f"refusing global {err} in {where!r}: not part of an EDM2 network "
                             f"pickle (resolving it could run arbitrary code)") from None
    except _FORMAT_ERRORS as err:
        message = " ".join(str(err).splitlines()) or type(err).__name__
        raise TorchFileError(f"cannot read {where!r} as an EDM2 network pickle: "
                             f"{message}") from err
    return Edm2Network(kwargs, params, tuple(sorted(unpickler.class_names)))
