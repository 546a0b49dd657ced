"""A PyTorch state dict (a file written by `torch.save`) as numpy arrays, read without torch.

    state = load("/weights/pt_inception-2015-12-05-6726825d.pth")
    # {'Conv2d_1a_3x3.conv.weight': np.ndarray float32 [32, 3, 3, 3], ...}

PyTorch's serialization format (`torch.save`, described in the `torch.serialization` module of
PyTorch) has two layouts, both read here:

* zip (the default since torch 1.6): a zip archive whose single top folder `<name>/` holds
  `data.pkl` (the pickled object), `data/<key>` (each storage's raw bytes), `byteorder`
  ('little' or 'big'; absent means little) and `version`.
* legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): pickles one after another
  in one stream: the magic number 0x1950a86a20f9469cfc6c, the protocol version 1001, a dict of
  system facts, the object, the list of storage keys; then, for each key in that list's order,
  the storage's element count as a little-endian int64 followed by its little-endian bytes.

In both, a tensor is pickled as the call `torch._utils._rebuild_tensor_v2(storage,
storage_offset, size, stride, requires_grad, backward_hooks[, metadata])` (offset and strides
counted in elements; `_rebuild_parameter(tensor, ...)` wraps an `nn.Parameter`; torch < 0.4
wrote `_rebuild_tensor` with the first four), and a storage is a persistent id:
('storage', storage_type, key, location, numel) in the zip layout and ('storage', storage_type,
root_key, location, numel, view_metadata) in the legacy one. storage_type is a class such as
`torch.FloatStorage` that names the element type; view_metadata is None, or, in files of
torch < 0.4, (view_key, offset, numel) of a slice of the root storage.

The pickle is read by an unpickler that resolves only the names a state dict of tensors uses
(`_ALLOWED`): any other global is refused with a ValueError naming it, so no pickled code runs.
A file holding {'state_dict': {...}} or {'model': {...}} (a training checkpoint) gives the
inner dict. bfloat16 tensors come back as float32 (exactly; numpy has no bfloat16).

`storage_from_bytes` (one storage's legacy stream, as plain `pickle` embeds it through
`torch.storage._load_from_bytes`) and `strided_array` (a tensor's view of its storage) serve
readers of other pickles that hold tensors, such as `scm_jax.edm2_pickle`.
"""
import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile

import numpy as np

from scm_jax import files
from scm_jax.errors import MissingInputError, UserError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
WRAPPERS = ("state_dict", "model")   # keys of the checkpoint dicts whose value is the state dict

# torch dtype name -> numpy dtype of its stored elements (little-endian). bfloat16's 16 bits are
# read as uint16 and widened to float32 once the strides are applied.
DTYPES = {
    "float32": "<f4", "float64": "<f8", "float16": "<f2", "bfloat16": "<u2",
    "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
    "complex64": "<c8", "complex128": "<c16",
}
STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}


class TorchFileError(UserError, ValueError):
    """A file is not a readable PyTorch state dict. The message names the path and the fault."""


@dataclasses.dataclass(frozen=True, slots=True)
class _DType:
    """A torch element type the pickle names (a storage class or a `torch.<dtype>` object)."""
    name: str   # a DTYPES key


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
    """A storage persistent id: elements [offset, offset + numel) of the root storage `key`."""
    key: str
    dtype: str
    numel: int
    offset: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class _Tensor:
    """A tensor of the pickle, built into an array once its storage's bytes are read."""
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


def _ints(value, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
        raise ValueError(f"a tensor's {what} is {value!r}, not a tuple of ints")
    return tuple(int(v) for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, _Storage):
        raise ValueError(f"a tensor's storage is a {type(storage).__name__}, not a storage id")
    if not isinstance(storage_offset, int):
        raise ValueError(f"a tensor's storage offset is {storage_offset!r}, not an int")
    return _Tensor(storage, int(storage_offset), _ints(size, "size"), _ints(stride, "stride"))


def _rebuild_parameter(data, *_):
    if not isinstance(data, _Tensor):
        raise ValueError(f"an nn.Parameter holds a {type(data).__name__}, not a tensor")
    return data


# (module, name) -> what the unpickler gives for that global; everything else is refused.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    **{("torch", name): _DType(dtype) for name, dtype in STORAGES.items()},
    # torch < 0.4 named the storage class of the device the tensor lived on.
    **{("torch.cuda", name): _DType(dtype) for name, dtype in STORAGES.items()},
    **{("torch", name): _DType(name) for name in DTYPES},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED` globals; records the storages the pickle refers to."""

    def __init__(self, file):
        super().__init__(file, encoding="utf-8")
        self.roots = {}   # root storage key -> its dtype name (the first reference's, as torch)

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            hint = ""
            if module.startswith(("torch.nn.", "__torch__")):
                hint = "; a whole module was saved: save its .state_dict() instead"
            raise ValueError(f"the pickle names the global {module}.{name}, which a state dict "
                             f"of tensors does not use; refused (unpickling it could run "
                             f"arbitrary code){hint}") from None

    def persistent_load(self, pid):
        tag = pid[0] if isinstance(pid, tuple) and pid else None
        tag = tag.decode("ascii") if isinstance(tag, bytes) else tag
        if tag != "storage" or len(pid) not in (5, 6):
            raise ValueError(f"unknown persistent id {pid!r}; expected ('storage', type, key, "
                             f"location, numel[, view])")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _DType):
            raise ValueError(f"storage {key!r} has the type {storage_type!r}, not a torch "
                             f"storage class")
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        self.roots.setdefault(key, storage_type.name)
        if view is None:
            return _Storage(key, storage_type.name, int(numel))
        _, offset, view_numel = view
        return _Storage(key, storage_type.name, int(view_numel), int(offset))


def _state_dict(obj) -> dict:
    """The dict of tensors in `obj`: itself, or its 'state_dict' / 'model' entry."""
    if not isinstance(obj, dict):
        raise ValueError(f"the file holds a {type(obj).__name__}, not a state dict (a dict of "
                         f"tensors)")
    where = ""
    if not all(isinstance(v, _Tensor) for v in obj.values()):
        wrapper = next((k for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if wrapper is not None:
            obj, where = obj[wrapper], f" of {wrapper!r}"
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ValueError(f"the state dict{where} has the key {key!r}, not a str")
        if not isinstance(value, _Tensor):
            raise ValueError(f"entry {key!r} of the state dict{where} is a "
                             f"{type(value).__name__}, not a tensor (a state dict holds only "
                             f"tensors; a checkpoint wraps one as {{'state_dict': ...}} or "
                             f"{{'model': ...}})")
    return obj


def _elements(raw, storage: _Storage, big_endian: bool) -> np.ndarray:
    """The elements [numel] of `storage` in its root storage's bytes `raw` (stored dtype)."""
    stored = np.dtype(DTYPES[storage.dtype])
    if big_endian:
        stored = stored.newbyteorder(">")
    elems = np.frombuffer(raw, stored, count=len(raw) // stored.itemsize)
    return elems[storage.offset:storage.offset + storage.numel]


def strided_array(name: str, elements: np.ndarray, dtype: str, offset: int, size: tuple,
                  stride: tuple) -> np.ndarray:
    """The C-contiguous, native-order array [*size] that a tensor of torch dtype `dtype` (a
    DTYPES key) views in its storage's `elements` [numel] (as stored: bfloat16 as uint16) at
    `offset` with `stride` (both counted in elements); bfloat16 is widened to float32. Raises
    ValueError, naming the tensor `name`, when the view is invalid or reaches past the storage.
    """
    size, stride = tuple(size), tuple(stride)
    stored = elements.dtype
    if len(size) != len(stride) or min(size + stride + (offset,)) < 0:
        raise ValueError(f"tensor {name!r} has an invalid offset {offset}, size {size}, "
                         f"stride {stride}")
    native = stored.newbyteorder("=")
    if 0 in size:
        out = np.zeros(size, native)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= len(elements):   # as_strided does not check bounds: it would read past the data
            raise ValueError(f"tensor {name!r} (offset {offset}, size {size}, stride {stride}) "
                             f"reaches element {last} of a storage of {len(elements)}; the file is "
                             f"truncated or corrupt")
        view = np.lib.stride_tricks.as_strided(
            elements[offset:], shape=size, strides=tuple(s * stored.itemsize for s in stride),
            writeable=False)
        out = np.array(view, dtype=native, order="C")
    if dtype == "bfloat16":
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _array(name: str, tensor: _Tensor, raw, big_endian: bool) -> np.ndarray:
    """The C-contiguous, native-order array of `tensor` over its root storage's bytes `raw`."""
    storage = tensor.storage
    return strided_array(name, _elements(raw, storage, big_endian), storage.dtype,
                         tensor.offset, tensor.size, tensor.stride)


def _materialize(tensors: dict, storages, big_endian: bool = False) -> dict:
    """name -> array; `storages` yields (root key, bytes), each root's bytes read only when its
    turn comes and dropped after its tensors are built (the peak is one storage, not the file)."""
    users = collections.defaultdict(list)
    for name, tensor in tensors.items():
        users[tensor.storage.key].append(name)
    arrays = {}
    for key, raw in storages(list(users)):
        for name in users.pop(key, ()):
            arrays[name] = _array(name, tensors[name], raw, big_endian)
    if users:
        key, names = next(iter(users.items()))
        raise ValueError(f"tensor {names[0]!r} uses storage {key!r}, which the file does not "
                         f"hold; the file is truncated or corrupt")
    return {name: arrays[name] for name in tensors}


def _read_zip(f) -> dict:
    try:
        archive = zipfile.ZipFile(f)
    except zipfile.BadZipFile as err:
        raise ValueError(f"a zip archive (the torch >= 1.6 layout) that cannot be opened ({err}); "
                         f"the file is truncated or corrupt") from None
    with archive:
        pickles = [n for n in archive.namelist()
                   if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"a zip archive with {len(pickles)} '<name>/data.pkl' records, not "
                             f"the one of a torch.save file")
        prefix = pickles[0][:-len("data.pkl")]
        byteorder = b"little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").strip()
        if byteorder not in (b"little", b"big"):
            raise ValueError(f"the byteorder record is {byteorder!r}, not b'little' or b'big'")
        with archive.open(pickles[0]) as data:
            tensors = _state_dict(_unpickle(io.BytesIO(data.read()), "state dict"))

        def storages(keys):
            for key in keys:
                try:
                    raw = archive.read(f"{prefix}data/{key}")
                except KeyError:
                    raise ValueError(f"the archive lacks the record {prefix}data/{key} of a "
                                     f"tensor's storage") from None
                yield key, raw

        return _materialize(tensors, storages, big_endian=byteorder == b"big")


def _unpickle(f, what: str, unpickler=None):
    try:
        return (unpickler or _Unpickler(f)).load()
    except (pickle.UnpicklingError, EOFError) as err:
        raise ValueError(f"the pickle of the {what} is cut short or corrupt ({err}); the file "
                         f"is truncated or corrupt") from None


def _legacy_header(f) -> None:
    """Reads the magic number, protocol version and system facts that open a legacy stream."""
    try:
        magic = _Unpickler(f).load()
    except Exception:   # noqa: BLE001 -- any failure of the first pickle means "not this format"
        magic = None
    if magic != MAGIC_NUMBER:
        raise ValueError("not a PyTorch file: neither a zip archive (torch >= 1.6) nor a legacy "
                         "torch.save stream (which starts with the pickled magic number "
                         f"{MAGIC_NUMBER:#x})")
    version = _unpickle(f, "protocol version")
    if version != PROTOCOL_VERSION:
        raise ValueError(f"legacy protocol version {version!r}; expected {PROTOCOL_VERSION}")
    _unpickle(f, "system facts")   # storages are little-endian whatever the writer's order


def _legacy_keys(f) -> list:
    keys = _unpickle(f, "storage key list")
    if not isinstance(keys, list):
        raise ValueError(f"the storage key list is a {type(keys).__name__}, not a list")
    return keys


def _legacy_storages(f, file_size: int, keys: list, roots: dict):
    """A `_materialize` storages function over the (count, bytes) records after the key list."""

    def storages(wanted):
        wanted = set(wanted)
        for key in keys:
            key = key.decode("ascii") if isinstance(key, bytes) else str(key)
            if key not in roots:
                raise ValueError(f"storage key {key!r} is listed but no tensor refers to it")
            itemsize = np.dtype(DTYPES[roots[key]]).itemsize
            header = f.read(8)
            if len(header) < 8:
                raise ValueError(f"the file ends before storage {key!r}; it is truncated")
            (count,) = struct.unpack("<q", header)
            nbytes = count * itemsize
            if count < 0 or nbytes > file_size - f.tell():
                raise ValueError(f"storage {key!r} claims {count} elements ({nbytes} bytes) but "
                                 f"{file_size - f.tell()} bytes remain; the file is truncated")
            if key in wanted:
                yield key, f.read(nbytes)
            else:
                f.seek(nbytes, io.SEEK_CUR)

    return storages


def _read_legacy(f, file_size: int) -> dict:
    _legacy_header(f)
    unpickler = _Unpickler(f)
    tensors = _state_dict(_unpickle(f, "state dict", unpickler))
    keys = _legacy_keys(f)
    return _materialize(tensors, _legacy_storages(f, file_size, keys, unpickler.roots))


def storage_from_bytes(data: bytes) -> tuple[str, np.ndarray]:
    """(dtype, elements [numel]) of the one storage in `data`: a legacy `torch.save` stream
    whose object is a storage alone, which is what `torch.storage._load_from_bytes(data)`
    reads and how a tensor pickled by plain `pickle` (not `torch.save`) carries its storage.
    dtype is a DTYPES key ('float16' for a `torch.HalfStorage`); the elements keep their stored
    type (little-endian; bfloat16 as uint16), for `strided_array`. Raises ValueError when
    `data` is not such a stream or is cut short.
    """
    f = io.BytesIO(data)
    _legacy_header(f)
    unpickler = _Unpickler(f)
    storage = _unpickle(f, "storage", unpickler)
    if not isinstance(storage, _Storage):
        raise ValueError(f"a storage record holds a {type(storage).__name__}, not a storage")
    keys = _legacy_keys(f)
    raw = dict(_legacy_storages(f, len(data), keys, unpickler.roots)([storage.key]))
    if storage.key not in raw:
        raise ValueError(f"a storage record lacks the bytes of its storage {storage.key!r}")
    return storage.dtype, _elements(raw[storage.key], storage, big_endian=False)


def _read(f) -> dict:
    head = f.read(512)
    file_size = f.seek(0, io.SEEK_END)
    f.seek(0)
    if head.startswith(b"PK\x03\x04"):
        return _read_zip(f)
    if head[257:262] == b"ustar":
        raise ValueError("a tar archive, the torch < 0.4 layout, which is not supported; load "
                         "it with torch and save it again")
    return _read_legacy(f, file_size)


# What malformed bytes make the parsers raise; file-system errors (OSError) are not among them.
_FORMAT_ERRORS = (ValueError, pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError,
                  AttributeError, struct.error, OverflowError, zipfile.BadZipFile)


def load(path) -> dict[str, np.ndarray]:
    """name -> np.ndarray of the state dict in the `torch.save` file at `path` (a local path
    or a bucket URI), in the file's order; see the module docstring for the formats.

    Raises MissingInputError when there is no file, and TorchFileError (a ValueError) naming
    the path and the fault for anything else that is not a state dict of tensors: another
    kind of file, a truncated one, a pickle naming a global outside `_ALLOWED`, a leaf that
    is not a tensor.
    """
    if not files.exists(path):
        raise MissingInputError(f"PyTorch weights not found at {os.fspath(path)!r}")
    with files.path(path).open("rb") as f:
        stream = f if f.seekable() else io.BytesIO(f.read())
        try:
            return _read(stream)
        except _FORMAT_ERRORS as err:
            message = " ".join(str(err).splitlines()) or type(err).__name__
            raise TorchFileError(f"cannot read {os.fspath(path)!r} as a PyTorch state dict "
                                 f"(torch.save): {message}") from err
