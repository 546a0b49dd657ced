"""A writer of EDM2's network pickles (NVlabs/edm2, Karras et al. 2024) that needs no torch.

`write_edm2_pickle` builds the object tree `pickle.dump` sees in EDM2's training loop
(`training/training_loop.py`: an EasyDict of encoder, dataset_kwargs, loss_fn and ema, the
float16 `Precond`) from stand-ins, and pickles it with the standard pickler while stand-in
modules named `torch`, `torch._utils`, `torch.storage`, `torch.nn.modules.container`,
`torch_utils.persistence`, `dnnlib.util` and `numpy.core.multiarray` sit in `sys.modules` (the
previous entries are restored afterwards). The pickle therefore names exactly the globals a real
EDM2 pickle names:

* each persistent object (`torch_utils/persistence.py`) as
  `_reconstruct_persistent_obj(dict(type='class', version=6, module_src, class_name, state))`;
* `enc` / `dec` as `torch.nn.modules.container.ModuleDict` (class, then its state);
* a tensor as `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`,
  a parameter wrapped in `_rebuild_parameter`, a storage as `torch.storage._load_from_bytes(b)`
  with `b` a legacy `torch.save` stream of one `torch.HalfStorage`;
* the latent encoder's numpy arrays as numpy 1.x writes them (`numpy.core.multiarray`).

`random_edm2_params` follows `training/networks_edm2.py` for the names and shapes.
"""
import collections
import contextlib
import io
import pickle
import struct
import sys
import types

import numpy as np

# EDM2's constructor defaults (training/networks_edm2.py), kept apart from the reader's copy.
PRECOND_DEFAULTS = dict(use_fp16=True, sigma_data=0.5, logvar_channels=128)
UNET_DEFAULTS = dict(model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_noise=None,
                     channel_mult_emb=None, num_blocks=3, attn_resolutions=[16, 8],
                     label_balance=0.5, concat_balance=0.5)
BLOCK_DEFAULTS = dict(resample_filter=[1, 1], channels_per_head=64, dropout=0, res_balance=0.3,
                      attn_balance=0.3, clip_act=256)
MODULE_SOURCE = "import torch\n\nclass Precond(torch.nn.Module):\n    pass\n"
ENCODER_SOURCE = "class StabilityVAEEncoder:\n    pass\n"
LOSS_SOURCE = "class EDM2Loss:\n    pass\n"
_SYS_INFO = dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=8))


# ----------------------------------------------------------------------------- stand-ins

def _named(module: str, name: str, obj=None):
    """A function (or the class `obj`) that pickles as the global module.name."""
    if obj is None:
        def obj(*args):
            raise AssertionError(f"stand-in {module}.{name} called")
    obj.__module__, obj.__qualname__, obj.__name__ = module, name, name
    return obj


_GLOBALS = {
    "torch": {"HalfStorage": _named("torch", "HalfStorage", type("HalfStorage", (), {}))},
    "torch._utils": {n: _named("torch._utils", n)
                     for n in ("_rebuild_tensor_v2", "_rebuild_parameter")},
    "torch.storage": {"_load_from_bytes": _named("torch.storage", "_load_from_bytes")},
    "torch.nn.modules.container": {"ModuleDict": _named(
        "torch.nn.modules.container", "ModuleDict", type("ModuleDict", (), {}))},
    "torch_utils.persistence": {"_reconstruct_persistent_obj": _named(
        "torch_utils.persistence", "_reconstruct_persistent_obj")},
    "dnnlib.util": {"EasyDict": _named("dnnlib.util", "EasyDict", type("EasyDict", (dict,), {}))},
    "numpy.core.multiarray": {n: _named("numpy.core.multiarray", n)
                              for n in ("_reconstruct", "scalar")},
}
_PACKAGES = ("torch.nn", "torch.nn.modules", "torch_utils", "dnnlib")   # parents, empty
_G = {f"{m}.{n}": obj for m, names in _GLOBALS.items() for n, obj in names.items()}


@contextlib.contextmanager
def _stand_in_modules():
    saved = {name: sys.modules.get(name) for name in (*_GLOBALS, *_PACKAGES)}
    try:
        for name, attrs in {**dict.fromkeys(_PACKAGES, {}), **_GLOBALS}.items():
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


class _HalfStorage:
    """A float16 storage; pickles as `_load_from_bytes(<legacy torch.save stream>)`."""
    _keys = iter(range(94_000_000_000_000, 95_000_000_000_000, 4096))   # like str(_cdata)

    def __init__(self, values: np.ndarray):
        self.values = np.ascontiguousarray(values, "<f2").reshape(-1)
        self.key = str(next(self._keys))

    def __reduce__(self):
        return _G["torch.storage._load_from_bytes"], (self._legacy_bytes(),)

    def _legacy_bytes(self) -> bytes:
        storage = self

        class _Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if obj is storage:
                    return ("storage", _G["torch.HalfStorage"], storage.key, "cpu",
                            storage.values.size, None)
                return None

        out = [pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, _SYS_INFO)]
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=2).dump(self)
        out += [buffer.getvalue(), pickle.dumps([self.key], protocol=2),
                struct.pack("<q", self.values.size), self.values.tobytes()]
        return b"".join(out)


class _Tensor:
    """A contiguous float16 tensor (or nn.Parameter) as torch's __reduce_ex__ writes it."""

    def __init__(self, values: np.ndarray, parameter: bool):
        self.values, self.parameter = np.asarray(values, np.float16), parameter

    def __reduce_ex__(self, protocol):
        if self.parameter:
            return (_G["torch._utils._rebuild_parameter"],
                    (_Tensor(self.values, False), False, collections.OrderedDict()))
        shape = self.values.shape
        stride = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
        return (_G["torch._utils._rebuild_tensor_v2"],
                (_HalfStorage(self.values), 0, shape, stride, False, collections.OrderedDict()))


class _Persistent:
    """An object of a persistent class, as persistence.py's __reduce__ writes it."""

    def __init__(self, class_name: str, state: dict, source: str):
        self.meta = dict(type="class", version=6, module_src=source, class_name=class_name,
                         state=state)

    def __reduce__(self):
        return _G["torch_utils.persistence._reconstruct_persistent_obj"], (self.meta,), None


def _module_state(parameters=(), buffers=(), modules=(), attrs=(), args=(), kwargs=None):
    """torch.nn.Module.__dict__ in its order: Module's fields, then the subclass's attributes
    (None-valued submodules are plain attributes), then persistence's _init_args/kwargs."""
    o = collections.OrderedDict
    state = dict(training=False, _parameters=o(parameters), _buffers=o(buffers),
                 _non_persistent_buffers_set=set(), _backward_pre_hooks=o(), _backward_hooks=o(),
                 _is_full_backward_hook=None, _forward_hooks=o(), _forward_hooks_with_kwargs=o(),
                 _forward_hooks_always_called=o(), _forward_pre_hooks=o(),
                 _forward_pre_hooks_with_kwargs=o(), _state_dict_hooks=o(),
                 _state_dict_pre_hooks=o(), _load_state_dict_pre_hooks=o(),
                 _load_state_dict_post_hooks=o(), _modules=o())
    for name, module in modules:
        if module is None:
            state[name] = None
        else:
            state["_modules"][name] = module
    state.update(attrs)
    state.update(_init_args=tuple(args), _init_kwargs=dict(kwargs or {}))
    return state


# ----------------------------------------------------------------------------- the network

class _Builder:
    """Walks networks_edm2.py's constructors; `tensor(name, shape, parameter)` gives each
    state_dict entry's value."""

    def __init__(self, tensor, source: str):
        self.tensor, self.source = tensor, source

    def persistent(self, class_name, prefix, **fields):
        return _Persistent(class_name, _module_state(**fields), self.source)

    def fourier(self, prefix, channels):
        return self.persistent("MPFourier", prefix, args=(channels,), buffers=[
            (n, self.tensor(f"{prefix}{n}", (channels,), False)) for n in ("freqs", "phases")])

    def conv(self, prefix, cin, cout, kernel):
        return self.persistent(
            "MPConv", prefix, args=(cin, cout), kwargs=dict(kernel=list(kernel)),
            attrs=dict(out_channels=cout),
            parameters=[("weight", self.tensor(f"{prefix}weight", (cout, cin, *kernel), True))])

    def block(self, prefix, cin, cout, cemb, block_kwargs, flavor, resample_mode=None,
              attention=None):
        kwargs = dict(flavor=flavor)
        kwargs.update({} if resample_mode is None else dict(resample_mode=resample_mode))
        kwargs.update({} if attention is None else dict(attention=attention))
        kwargs.update(block_kwargs)
        b = {**BLOCK_DEFAULTS, **block_kwargs}
        heads = cout // b["channels_per_head"] if attention else 0
        attrs = dict(out_channels=cout, flavor=flavor, resample_filter=b["resample_filter"],
                     resample_mode=resample_mode or "keep", num_heads=heads,
                     dropout=b["dropout"], res_balance=b["res_balance"],
                     attn_balance=b["attn_balance"], clip_act=b["clip_act"])
        p = prefix
        gain = self.tensor(f"{p}emb_gain", (), True)   # a module's parameters come first
        modules = [("conv_res0", self.conv(f"{p}conv_res0.", cout if flavor == "enc" else cin,
                                           cout, (3, 3))),
                   ("emb_linear", self.conv(f"{p}emb_linear.", cemb, cout, ())),
                   ("conv_res1", self.conv(f"{p}conv_res1.", cout, cout, (3, 3))),
                   ("conv_skip", self.conv(f"{p}conv_skip.", cin, cout, (1, 1))
                    if cin != cout else None),
                   ("attn_qkv", self.conv(f"{p}attn_qkv.", cout, 3 * cout, (1, 1))
                    if heads else None),
                   ("attn_proj", self.conv(f"{p}attn_proj.", cout, cout, (1, 1))
                    if heads else None)]
        return self.persistent("Block", p, args=(cin, cout, cemb), kwargs=kwargs, attrs=attrs,
                               parameters=[("emb_gain", gain)],
                               modules=modules)

    def unet(self, p, unet_kwargs, block_kwargs):
        u = {**UNET_DEFAULTS, **unet_kwargs}
        m, res0 = u["model_channels"], u["img_resolution"]
        cblock = [m * x for x in u["channel_mult"]]
        cnoise = m * u["channel_mult_noise"] if u["channel_mult_noise"] is not None else cblock[0]
        cemb = m * u["channel_mult_emb"] if u["channel_mult_emb"] is not None else max(cblock)
        gain = self.tensor(f"{p}out_gain", (), True)
        modules = [("emb_fourier", self.fourier(f"{p}emb_fourier.", cnoise)),
                   ("emb_noise", self.conv(f"{p}emb_noise.", cnoise, cemb, ())),
                   ("emb_label", self.conv(f"{p}emb_label.", u["label_dim"], cemb, ())
                    if u["label_dim"] else None)]
        enc, cout = [], u["img_channels"] + 1
        for level, channels in enumerate(cblock):
            res = res0 >> level
            if level == 0:
                name, cin, cout = f"{res}x{res}_conv", cout, channels
                enc.append((name, self.conv(f"{p}enc.{name}.", cin, cout, (3, 3)), cout))
            else:
                name = f"{res}x{res}_down"
                enc.append((name, self.block(f"{p}enc.{name}.", cout, cout, cemb, block_kwargs,
                                             "enc", resample_mode="down"), cout))
            for i in range(u["num_blocks"]):
                name, cin, cout = f"{res}x{res}_block{i}", cout, channels
                enc.append((name, self.block(f"{p}enc.{name}.", cin, cout, cemb, block_kwargs,
                                             "enc", attention=res in u["attn_resolutions"]),
                            cout))
        skips, dec = [c for _, _, c in enc], []
        for level, channels in reversed(list(enumerate(cblock))):
            res = res0 >> level
            if level == len(cblock) - 1:
                for name, attention in ((f"{res}x{res}_in0", True), (f"{res}x{res}_in1", None)):
                    dec.append((name, self.block(f"{p}dec.{name}.", cout, cout, cemb,
                                                 block_kwargs, "dec", attention=attention)))
            else:
                name = f"{res}x{res}_up"
                dec.append((name, self.block(f"{p}dec.{name}.", cout, cout, cemb, block_kwargs,
                                             "dec", resample_mode="up")))
            for i in range(u["num_blocks"] + 1):
                name, cin, cout = f"{res}x{res}_block{i}", cout + skips.pop(), channels
                dec.append((name, self.block(f"{p}dec.{name}.", cin, cout, cemb, block_kwargs,
                                             "dec", attention=res in u["attn_resolutions"])))
        for name, entries in (("enc", [(n, b) for n, b, _ in enc]), ("dec", dec)):
            container = _G["torch.nn.modules.container.ModuleDict"]()
            container.__dict__.update(_module_state(modules=entries, args=(), kwargs={}))
            del container.__dict__["_init_args"], container.__dict__["_init_kwargs"]
            modules.append((name, container))
        modules.append(("out_conv", self.conv(f"{p}out_conv.", cout, u["img_channels"], (3, 3))))
        return self.persistent("UNet", p, kwargs=unet_kwargs, parameters=[("out_gain", gain)],
                               modules=modules, attrs=dict(label_balance=u["label_balance"],
                                                           concat_balance=u["concat_balance"]))

    def precond(self, kwargs):
        own = {**PRECOND_DEFAULTS, **{k: v for k, v in kwargs.items() if k in PRECOND_DEFAULTS}}
        interface = ("img_resolution", "img_channels", "label_dim")
        unet_kwargs = {k: kwargs[k] for k in interface}   # Precond passes these first
        unet_kwargs.update({k: v for k, v in kwargs.items()
                            if k not in PRECOND_DEFAULTS and k not in interface})
        block_kwargs = {k: v for k, v in unet_kwargs.items()
                        if k not in UNET_DEFAULTS and k not in PRECOND_DEFAULTS
                        and k not in ("img_resolution", "img_channels", "label_dim")}
        c = own["logvar_channels"]
        modules = [("unet", self.unet("unet.", unet_kwargs, block_kwargs)),
                   ("logvar_fourier", self.fourier("logvar_fourier.", c)),
                   ("logvar_linear", self.conv("logvar_linear.", c, 1, ()))]
        attrs = {k: kwargs[k] for k in ("img_resolution", "img_channels", "label_dim")}
        attrs.update(use_fp16=own["use_fp16"], sigma_data=own["sigma_data"])
        return self.persistent("Precond", "", kwargs=kwargs, attrs=attrs, modules=modules)


def random_edm2_params(kwargs: dict, rng: np.random.Generator) -> dict:
    """state_dict() name -> random float32 array for a Precond(**kwargs), with EDM2's names,
    shapes and order, e.g. 'unet.enc.16x16_conv.weight' [model_channels * channel_mult[0],
    img_channels + 1, 3, 3], 'unet.emb_noise.weight' [cemb, cnoise], 'logvar_linear.weight'
    [1, logvar_channels]."""
    params = {}

    def tensor(name, shape, parameter):
        params[name] = rng.standard_normal(shape).astype(np.float32)

    _Builder(tensor, MODULE_SOURCE).precond(kwargs)
    return params


def write_edm2_pickle(path, params: dict, kwargs: dict, *, extra_globals=None,
                      extra_entries=None, source: str = MODULE_SOURCE,
                      top_level: str = "snapshot", protocol: int = 4,
                      legacy_numpy: bool = True) -> None:
    """Writes a Precond(**kwargs) holding `params` (names and shapes of `random_edm2_params`;
    stored as float16) as EDM2 pickles it: top_level 'snapshot' the training loop's EasyDict
    (a StabilityVAEEncoder with numpy arrays, dataset_kwargs, an EDM2Loss, ema), 'precond' the
    Precond alone. `source` is every network object's module_src. `extra_globals` maps keys to
    (callable, args): each is added as the call callable(*args) (so the pickle names the
    callable's global) to the EasyDict, or to the Precond's state for top_level 'precond';
    `extra_entries` (key -> value) are added there as they are. numpy values are named as
    numpy 1.x names them (numpy.core.multiarray), or, with legacy_numpy False, as this numpy
    does."""
    unused = dict(params)

    def tensor(name, shape, parameter):
        value = np.asarray(unused.pop(name))
        assert value.shape == tuple(shape), (name, value.shape, shape)
        return _Tensor(value, parameter)

    net = _Builder(tensor, source).precond(kwargs)
    assert not unused, f"params that a Precond(**kwargs) lacks: {sorted(unused)}"
    extras = {key: _Call(func, args) for key, (func, args) in (extra_globals or {}).items()}
    extras.update(extra_entries or {})
    if top_level == "precond":
        net.meta["state"].update(extras)
        top = net
    else:
        scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
        encoder = _Persistent("StabilityVAEEncoder", dict(
            vae_name="stabilityai/sd-vae-ft-mse", scale=scale,
            bias=np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * scale, batch_size=8,
            _vae=None, _init_args=(), _init_kwargs={}), ENCODER_SOURCE)
        loss = _Persistent("EDM2Loss", dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5,
                                            _init_args=(), _init_kwargs=dict(P_mean=-0.4,
                                                                             P_std=1.0)),
                           LOSS_SOURCE)
        top = _G["dnnlib.util.EasyDict"](encoder=encoder, dataset_kwargs=_G[
            "dnnlib.util.EasyDict"](class_name="training.dataset.ImageFolderDataset",
                                    path="datasets/img512-sd.zip", use_labels=True),
            loss_fn=loss, ema=net, **extras)
    with _stand_in_modules(), open(path, "wb") as f:
        (_Pickler if legacy_numpy else pickle.Pickler)(f, protocol=protocol).dump(top)


class _Call:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, tuple(self.args)


class _Pickler(pickle.Pickler):
    """numpy arrays and scalars as numpy 1.x pickles them (numpy.core.multiarray)."""

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            _, args, state = obj.__reduce__()
            return _G["numpy.core.multiarray._reconstruct"], args, state
        if isinstance(obj, np.generic):
            return _G["numpy.core.multiarray.scalar"], (obj.dtype, obj.tobytes())
        return NotImplemented
