"""Tests for scm_jax.evaluation.torch_pickle (torch.save files read without torch) and the
convert_weights command.

The files are written by a small writer of PyTorch's serialization format below (it emits the
pickle opcodes itself, so the torch globals need no torch), in both layouts; where torch is
installed, files written by torch.save itself are read too."""
import collections
import dataclasses
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from scm_jax.errors import MissingInputError
from scm_jax import convert_weights
from scm_jax.evaluation import torch_pickle, weight_conversion, weights

# ----------------------------------------------------------------------------- a writer


@dataclasses.dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclasses.dataclass(frozen=True)
class Call:   # func(*args), as pickle's REDUCE
    func: object
    args: tuple


@dataclasses.dataclass(frozen=True)
class PersistentId:
    pid: tuple


@dataclasses.dataclass(frozen=True)
class View:   # a tensor: elements of storage `key` at offset + sum(index * stride)
    key: str
    offset: int
    size: tuple
    stride: tuple
    parameter: bool = False


def _pickle(obj) -> bytes:
    """Protocol-2 pickle of str / int / bool / None / float / tuple / list / dict / Global /
    Call / PersistentId (no memo: every object is written out where it occurs)."""
    out = bytearray(b"\x80\x02")

    def emit(v):
        if v is None:
            out.extend(b"N")
        elif isinstance(v, bool):
            out.extend(b"\x88" if v else b"\x89")
        elif isinstance(v, int):
            raw = v.to_bytes(v.bit_length() // 8 + 1, "little", signed=True)
            out.extend(b"\x8a" + bytes([len(raw)]) + raw)   # LONG1
        elif isinstance(v, float):
            out.extend(b"G" + struct.pack(">d", v))
        elif isinstance(v, str):
            raw = v.encode()
            out.extend(b"X" + struct.pack("<I", len(raw)) + raw)
        elif isinstance(v, tuple):
            out.extend(b"(")
            for item in v:
                emit(item)
            out.extend(b"t")
        elif isinstance(v, list):
            out.extend(b"](")
            for item in v:
                emit(item)
            out.extend(b"e")
        elif isinstance(v, Global):
            out.extend(f"c{v.module}\n{v.name}\n".encode())
        elif isinstance(v, Call):
            emit(v.func)
            emit(tuple(v.args))
            out.extend(b"R")
        elif isinstance(v, PersistentId):
            emit(v.pid)
            out.extend(b"Q")
        elif isinstance(v, dict):
            if isinstance(v, collections.OrderedDict):
                emit(Call(Global("collections", "OrderedDict"), ()))
            else:
                out.extend(b"}")
            out.extend(b"(")
            for key, item in v.items():
                emit(key)
                emit(item)
            out.extend(b"u")
        else:
            raise TypeError(type(v))

    emit(obj)
    return bytes(out + b".")


STORAGE_CLASS = {"float32": "FloatStorage", "float16": "HalfStorage", "int64": "LongStorage",
                 "bool": "BoolStorage", "bfloat16": "BFloat16Storage"}


def _as_torch(obj, storages: dict, legacy: bool, used: dict):
    """`obj` with each View replaced by the call torch.save pickles for a tensor; the storages
    referred to are added to `used`."""
    if isinstance(obj, dict):
        return type(obj)((k, _as_torch(v, storages, legacy, used)) for k, v in obj.items())
    if not isinstance(obj, View):
        return obj
    dtype, data = storages[obj.key]
    used[obj.key] = data
    pid = ("storage", Global("torch", STORAGE_CLASS[dtype]), obj.key, "cpu", data.size)
    hooks = Call(Global("collections", "OrderedDict"), ())
    tensor = Call(Global("torch._utils", "_rebuild_tensor_v2"),
                  (PersistentId(pid + (None,) * legacy), obj.offset, obj.size, obj.stride,
                   False, hooks))
    if obj.parameter:
        return Call(Global("torch._utils", "_rebuild_parameter"), (tensor, True, hooks))
    return tensor


def write_torch_file(path, obj, storages: dict, legacy: bool) -> None:
    """A torch.save file of `obj` (Views in it become tensors); storages: key -> (torch dtype
    name, 1-D array of its elements; uint16 bits for bfloat16)."""
    used = {}   # torch.save writes only the storages the object refers to
    data_pkl = _pickle(_as_torch(obj, storages, legacy, used))
    if not legacy:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("model/data.pkl", data_pkl)
            archive.writestr("model/byteorder", "little")
            for key, data in used.items():
                archive.writestr(f"model/data/{key}", data.tobytes())
            archive.writestr("model/version", "3\n")
        return
    keys = sorted(used)
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(v, protocol=2) for v in (torch_pickle.MAGIC_NUMBER, 1001, sys_info)]
    parts += [data_pkl, pickle.dumps(keys, protocol=2)]
    for key in keys:
        parts += [struct.pack("<q", used[key].size), used[key].tobytes()]
    with open(path, "wb") as f:
        f.write(b"".join(parts))


# ----------------------------------------------------------------------------- fixtures

BASE = np.arange(12, dtype=np.float32).reshape(3, 4) * 0.5 - 2
# Exact in bfloat16 (8 significant bits), so a correct reader returns them unchanged.
BF16_VALUES = np.array([1.5, -2.0, 0.15625, 1.5 * 2.0 ** 120, -0.0], np.float32)
STORAGES = {
    "0": ("float32", BASE.ravel()),
    "1": ("float16", np.linspace(-1, 1, 5).astype(np.float16)),
    "2": ("int64", np.array([7, -3, 2 ** 40], np.int64)),
    "3": ("bool", np.array([1, 0, 0, 1, 1, 0], bool)),
    "4": ("bfloat16", (BF16_VALUES.view(np.uint32) >> 16).astype(np.uint16)),
}
STATE = collections.OrderedDict([
    ("conv.weight", View("0", 0, (3, 4), (4, 1), parameter=True)),
    ("conv.weight_t", View("0", 0, (4, 3), (1, 4))),          # a transposed view
    ("tail", View("0", 5, (2, 2), (4, 1))),                   # an offset into the shared storage
    ("half", View("1", 0, (5,), (1,))),
    ("bn.num_batches_tracked", View("2", 1, (), ())),          # a 0-d tensor
    ("ids", View("2", 0, (3,), (1,))),
    ("mask", View("3", 0, (2, 3), (3, 1))),
    ("empty", View("0", 0, (0, 4), (4, 1))),
    ("bf16", View("4", 0, (5,), (1,))),
])
EXPECTED = {
    "conv.weight": BASE, "conv.weight_t": BASE.T, "tail": BASE[1:3, 1:3],
    "half": STORAGES["1"][1], "bn.num_batches_tracked": np.array(-3, np.int64),
    "ids": STORAGES["2"][1], "mask": STORAGES["3"][1].reshape(2, 3),
    "empty": np.zeros((0, 4), np.float32), "bf16": BF16_VALUES,
}


def assert_same_arrays(loaded: dict, expected: dict) -> None:
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        assert loaded[key].flags.c_contiguous, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


@pytest.fixture(params=["zip", "legacy"])
def layout(request):
    return request.param


def _file(tmp_path, obj, layout, name="w.pth", storages=STORAGES):
    path = tmp_path / name
    write_torch_file(path, obj, storages, legacy=layout == "legacy")
    return path


# ----------------------------------------------------------------------------- reading


def test_reads_every_tensor_kind_exactly(tmp_path, layout):
    loaded = torch_pickle.load(_file(tmp_path, STATE, layout))
    assert_same_arrays(loaded, EXPECTED)
    assert not np.shares_memory(loaded["conv.weight"], loaded["conv.weight_t"])


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_unwraps_a_checkpoint_dict(tmp_path, layout, wrapper):
    inner = {k: STATE[k] for k in ("conv.weight", "half")}
    checkpoint = {"epoch": 3, wrapper: inner, "optimizer": {"lr": 0.1, "m": STATE["ids"]}}
    loaded = torch_pickle.load(_file(tmp_path, checkpoint, layout))
    assert_same_arrays(loaded, {k: EXPECTED[k] for k in inner})


def test_load_state_dict_dispatches_and_reads_a_bucket(tmp_path, fake_bucket):
    raw = _file(tmp_path, STATE, "legacy").read_bytes()
    with fake_bucket().open("gs://weights/w.bin", "wb") as f:
        f.write(raw)
    assert_same_arrays(weights.load_state_dict("gs://weights/w.bin"), EXPECTED)


def test_refuses_a_global_outside_the_allowed_names(tmp_path, layout):
    evil = {"w": Call(Global("os", "system"), ("touch " + str(tmp_path / "pwned"),))}
    path = _file(tmp_path, evil, layout)
    with pytest.raises(ValueError, match=r"os\.system.*refused") as err:
        torch_pickle.load(path)
    assert str(path) in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_refuses_a_leaf_that_is_not_a_tensor(tmp_path, layout):
    path = _file(tmp_path, {"w": STATE["half"], "lr": 0.1}, layout)
    with pytest.raises(ValueError, match=r"entry 'lr' of the state dict is a float, not a tensor"):
        torch_pickle.load(path)


@pytest.mark.parametrize("keep", [0.5, -3])
def test_a_truncated_file_is_a_clear_error(tmp_path, layout, keep):
    raw = _file(tmp_path, STATE, layout).read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(raw[:int(len(raw) * keep)] if isinstance(keep, float) else raw[:keep])
    with pytest.raises(torch_pickle.TorchFileError, match="truncated") as err:
        torch_pickle.load(cut)
    assert repr(str(cut)) in str(err.value)


def test_a_tensor_past_its_storage_is_refused(tmp_path, layout):
    path = _file(tmp_path, {"w": View("1", 3, (3,), (1,))}, layout)   # elements 3..5 of 5
    with pytest.raises(ValueError, match=r"'w' .* reaches element 5 of a storage of 5"):
        torch_pickle.load(path)


def test_other_files_are_refused(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not weights\n")
    with pytest.raises(ValueError, match="not a PyTorch file"):
        torch_pickle.load(text)
    plain = tmp_path / "list.pth"   # a legacy file holding a list, not a dict
    write_torch_file(plain, [1, 2], {}, legacy=True)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        torch_pickle.load(plain)
    with pytest.raises(MissingInputError, match="absent.pth"):
        torch_pickle.load(tmp_path / "absent.pth")


# ----------------------------------------------------------------------------- against torch


def test_files_written_by_torch_save(tmp_path):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    state = collections.OrderedDict(model.state_dict())
    state.update({
        "transposed": base.t(), "slice": base[1:4, 2:], "row": base[3], "scalar": base[2, 2],
        "half": base.half()[::2], "bf16": torch.randn(4, 3, generator=gen).bfloat16(),
        "long": torch.arange(-5, 5), "bool": base > 0, "double": base.double()[:, 1],
        "expanded": base[0].expand(2, 5), "param": torch.nn.Parameter(base[:2]),
    })
    expected = {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy()
                for k, v in state.items()}
    for legacy, protocol in ((False, 2), (True, 2), (True, 4)):
        path = tmp_path / f"torch_{legacy}_{protocol}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy,
                   pickle_protocol=protocol)
        assert_same_arrays(torch_pickle.load(path), expected)
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 2}, path,
               _use_new_zipfile_serialization=False)
    assert_same_arrays(torch_pickle.load(path), {k: v.numpy()
                                                 for k, v in model.state_dict().items()})
    torch.save(model, path)   # the module itself, not its state dict
    with pytest.raises(ValueError, match=r"torch\.nn\.modules.*save its \.state_dict\(\)"):
        torch_pickle.load(path)


# ----------------------------------------------------------------------------- the command


def test_command_reports_bad_input_on_one_line(tmp_path, capsys):
    absent = tmp_path / "absent.pth"
    good = _file(tmp_path, STATE, "zip")
    cases = [
        (["--network=inception", f"--src={absent}", f"--out={tmp_path / 'o.npz'}"], str(absent)),
        (["--network=resnet", f"--src={good}", f"--out={tmp_path / 'o.npz'}"], "resnet"),
        (["--network=inception", f"--src={good}", f"--out={tmp_path / 'o.txt'}"], "o.txt"),
    ]
    for args, named in cases:
        assert convert_weights.main(["convert_weights"] + args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "o.npz").exists()


def test_command_converts_a_legacy_inception_file(tmp_path, capsys):
    inception = pytest.importorskip("scm_jax.evaluation.inception")
    state = inception.random_state_dict(seed=1)
    views, storages = {}, {}
    for i, (key, value) in enumerate(state.items()):
        storages[str(i)] = ("float32", value.ravel())
        stride = tuple(int(s) // 4 for s in value.strides)
        views[key] = View(str(i), 0, value.shape, stride, parameter=True)
    src, out = tmp_path / "pt_inception.pth", tmp_path / "out" / "inception.npz"
    write_torch_file(src, collections.OrderedDict(views), storages, legacy=True)
    assert convert_weights.main(["convert_weights", "--network=inception", f"--src={src}",
                                 f"--out={out}"]) == 0
    expected = inception.convert_state_dict(state)
    written = weights.load_state_dict(out)
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    params = weight_conversion.parameter_count(expected)
    assert capsys.readouterr().out.strip().startswith(
        f"wrote {out}: {len(expected)} arrays, {params:,} parameters")
    assert params == sum(v.size for k, v in state.items()
                         if not k.startswith("fc.") and "num_batches" not in k)
    assert os.listdir(out.parent) == ["inception.npz"]
