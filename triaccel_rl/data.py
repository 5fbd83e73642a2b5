"""Load image classification data (Fashion-MNIST IDX files, CIFAR-10 python batches) into uint8 tensors."""

from __future__ import annotations

import functools
import gzip
import math
import numbers
import os
import pickle
import sys
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CIFAR10_CLASSES",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "DatasetError",
    "ImageDataset",
    "find_fashion_mnist",
    "load_cifar10",
    "load_fashion_mnist",
    "normalize_images",
    "read_idx",
    "to_float_images",
]

DEFAULT_FASHION_MNIST_DIR: Path = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the files; searched last."""

FASHION_MNIST_ENV_VAR = "TRIACCEL_DATA"
"""Environment variable naming a folder with the four Fashion-MNIST files; searched second."""

FASHION_MNIST_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
"""The four Fashion-MNIST files; each may also be present without the ``.gz`` suffix."""

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Fashion-MNIST class names, indexed by label."""

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""CIFAR-10 class names, indexed by label (used when ``batches.meta`` is absent)."""

_CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST_FILE = "test_batch"
_CIFAR10_META_FILE = "batches.meta"
_CIFAR10_SUBDIR = "cifar-10-batches-py"
_CIFAR10_ROW = 3 * 32 * 32

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type code -> big-endian numpy dtype of the stored elements.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetError(ValueError):
    """A data set is missing, malformed, or not where it was looked for."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An image classification data set split into train and test parts, as stored on disk.

    Attributes:
        train_images: uint8 pixels, shape ``[N, H, W]`` (grey, e.g. Fashion-MNIST ``[60000, 28, 28]``)
            or ``[N, C, H, W]`` (channel-first colour, e.g. CIFAR-10 ``[50000, 3, 32, 32]``), range 0..255.
        train_labels: int64 class indices, shape ``[N]``, range ``0..len(classes) - 1``.
        test_images: like ``train_images`` for the test split.
        test_labels: like ``train_labels`` for the test split.
        classes: class names, indexed by label.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped or plain.

    Gzip compression is detected from the file's first two bytes, not its name. The header is two zero
    bytes, a type code byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64),
    a dimension count byte, then one big-endian uint32 size per dimension; the big-endian data follows.

    Args:
        path: the file to read.

    Returns:
        A writable array in native byte order with the header's shape and the dtype of its type code.

    Raises:
        DatasetError: the file cannot be read, the gzip stream is truncated or corrupt, the magic number
            or type code is wrong, or the data is shorter or longer than the header's dimensions say.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, zlib.error, OSError) as exc:
            raise DatasetError(
                f"IDX file {path} is a truncated or corrupt gzip stream ({type(exc).__name__}: {exc}); "
                "download it again"
            ) from exc
    return _parse_idx(raw, path)


def find_fashion_mnist(path: str | os.PathLike[str] | None = None) -> Path:
    """Find the folder holding the four Fashion-MNIST IDX files.

    Looks, in order, at ``path``, at the folder named by the environment variable ``TRIACCEL_DATA``, and
    at :data:`DEFAULT_FASHION_MNIST_DIR` (``/usr/share/datasets/fashion-mnist``, installed by the Debian
    package ``dataset-fashion-mnist``). A folder qualifies if it holds ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each with or
    without a ``.gz`` suffix. A ``TRIACCEL_DATA`` folder that lacks them is skipped with a warning.

    Args:
        path: a folder to use instead of searching; if it lacks the files, that is an error.

    Returns:
        The qualifying folder.

    Raises:
        DatasetError: ``path`` was given and lacks the files, or no searched place has them (the message
            lists every place looked at and how to get the files).
    """
    if path is not None:
        folder = Path(path)
        missing = _missing_fashion_files(folder)
        if missing:
            raise DatasetError(
                f"Fashion-MNIST folder {folder} {_describe_missing(folder, missing)}. "
                f"Expected the files {', '.join(FASHION_MNIST_FILES)} (with or without .gz). " + _FASHION_MNIST_HOWTO
            )
        return folder

    looked: list[str] = []
    env_value = os.environ.get(FASHION_MNIST_ENV_VAR)
    if env_value:
        folder = Path(env_value)
        missing = _missing_fashion_files(folder)
        if not missing:
            return folder
        reason = _describe_missing(folder, missing)
        looked.append(f"{folder} (from ${FASHION_MNIST_ENV_VAR}): {reason}")
        warnings.warn(
            f"${FASHION_MNIST_ENV_VAR}={env_value} {reason}; looking elsewhere for Fashion-MNIST",
            stacklevel=_stacklevel_outside_package(),
        )
    else:
        looked.append(f"${FASHION_MNIST_ENV_VAR}: not set")

    folder = DEFAULT_FASHION_MNIST_DIR
    missing = _missing_fashion_files(folder)
    if not missing:
        return folder
    looked.append(f"{folder} (default): {_describe_missing(folder, missing)}")

    raise DatasetError(
        "Fashion-MNIST not found. Looked at:\n" + "".join(f"  - {place}\n" for place in looked) + _FASHION_MNIST_HOWTO
    )


def load_fashion_mnist(path: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load Fashion-MNIST from the folder :func:`find_fashion_mnist` finds.

    Loads are cached in-process per resolved folder (and the files' sizes and modification times), so
    repeated calls are cheap and return the same tensors: clone them before modifying them in place.

    Args:
        path: a folder with the four IDX files; ``None`` searches as :func:`find_fashion_mnist` does.

    Returns:
        ``train_images`` uint8 ``[60000, 28, 28]``, ``train_labels`` int64 ``[60000]``, ``test_images``
        uint8 ``[10000, 28, 28]``, ``test_labels`` int64 ``[10000]`` (counts as stored in the files),
        and the 10 class names.

    Raises:
        DatasetError: the files are missing or malformed (wrong shape, count mismatch, label out of 0..9).
    """
    folder = find_fashion_mnist(path).resolve()
    files = tuple(_fashion_file(folder, name) for name in FASHION_MNIST_FILES)
    stamps = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return _load_fashion_mnist_cached(folder, stamps)


def load_cifar10(path: str | os.PathLike[str]) -> ImageDataset:
    """Load CIFAR-10 from its "python version" pickled batches.

    The batches are ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (and optionally
    ``batches.meta`` with the class names), in ``path`` or in ``path/cifar-10-batches-py``. Each batch
    is a pickled dict with ``b"data"`` (uint8 ``[N, 3072]``, each row a channel-first RGB 32×32 image)
    and ``b"labels"`` (``N`` ints in 0..9).

    The batches are read with :mod:`pickle`, which can run arbitrary code: load only trusted files.

    Args:
        path: the folder holding the batches, or its parent.

    Returns:
        ``train_images`` uint8 ``[50000, 3, 32, 32]``, ``train_labels`` int64 ``[50000]``,
        ``test_images`` uint8 ``[10000, 3, 32, 32]``, ``test_labels`` int64 ``[10000]`` (counts as stored
        in the batches), and the 10 class names.

    Raises:
        DatasetError: the folder or a batch is missing, or a batch is malformed (not a dict, missing key,
            wrong row length or dtype, label out of 0..9, image and label counts differ).
    """
    folder = Path(path)
    if (folder / _CIFAR10_SUBDIR).is_dir():
        folder = folder / _CIFAR10_SUBDIR
    expected = (*_CIFAR10_TRAIN_FILES, _CIFAR10_TEST_FILE)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise DatasetError(f"CIFAR-10 folder {folder} {state}. {_cifar10_howto(expected)}")
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}. {_cifar10_howto(expected)}")

    train = [_read_cifar10_batch(folder / name) for name in _CIFAR10_TRAIN_FILES]
    test_images, test_labels = _read_cifar10_batch(folder / _CIFAR10_TEST_FILE)
    classes = CIFAR10_CLASSES
    if (folder / _CIFAR10_META_FILE).is_file():
        classes = _read_cifar10_meta(folder / _CIFAR10_META_FILE)
    return ImageDataset(
        train_images=torch.from_numpy(np.concatenate([images for images, _ in train])),
        train_labels=torch.from_numpy(np.concatenate([labels for _, labels in train])),
        test_images=torch.from_numpy(test_images),
        test_labels=torch.from_numpy(test_labels),
        classes=classes,
    )


def to_float_images(images_uint8: torch.Tensor) -> torch.Tensor:
    """Convert uint8 pixels to float32 in [0, 1], adding a channel dimension to grey images.

    Args:
        images_uint8: uint8 ``[N, H, W]`` (grey) or ``[N, C, H, W]``.

    Returns:
        float32 ``[N, 1, H, W]`` or ``[N, C, H, W]``, pixel value / 255, on the input's device.

    Raises:
        DatasetError: the input is not a tensor, not uint8, or not 3-D or 4-D.
    """
    if not isinstance(images_uint8, torch.Tensor):  # a NumPy uint8 array was told it "expects uint8, got uint8"
        hint = " (use torch.from_numpy)" if isinstance(images_uint8, np.ndarray) else ""
        raise DatasetError(f"to_float_images expects a torch.Tensor; got {type(images_uint8).__name__}{hint}")
    if images_uint8.dtype != torch.uint8:
        raise DatasetError(f"to_float_images expects uint8 images, got {images_uint8.dtype}")
    if images_uint8.dim() == 3:
        images_uint8 = images_uint8.unsqueeze(1)
    elif images_uint8.dim() != 4:
        raise DatasetError(
            f"to_float_images expects [N, H, W] or [N, C, H, W] images, got shape {tuple(images_uint8.shape)}"
        )
    return images_uint8.to(torch.float32).div_(255.0)


def normalize_images(x: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float]) -> torch.Tensor:
    """Return ``(x - mean) / std`` per channel.

    Args:
        x: floating images ``[N, C, H, W]``.
        mean: one mean for all channels, or one per channel (length ``C``).
        std: one standard deviation for all channels, or one per channel (length ``C``); all finite and > 0.

    Returns:
        A new tensor of ``x``'s shape, dtype and device.

    Raises:
        DatasetError: ``x`` is not a floating ``[N, C, H, W]`` tensor, a per-channel sequence has the
            wrong length, a mean is not finite, or a std is not finite and > 0.
    """
    if not isinstance(x, torch.Tensor):  # a NumPy array (or None) failed on x.dim() with a bare AttributeError
        hint = " (use torch.from_numpy)" if isinstance(x, np.ndarray) else ""
        raise DatasetError(f"normalize_images expects a torch.Tensor; got {type(x).__name__}{hint}")
    if x.dim() != 4 or not x.is_floating_point():
        raise DatasetError(f"normalize_images expects floating [N, C, H, W] images, got {x.dtype} {tuple(x.shape)}")
    channels = x.shape[1]
    mean_values = _per_channel(mean, channels, "mean")
    std_values = _per_channel(std, channels, "std")
    if not all(math.isfinite(v) for v in mean_values):
        raise DatasetError(f"normalize_images needs finite means, got {mean}")
    if not all(math.isfinite(v) and v > 0 for v in std_values):
        raise DatasetError(f"normalize_images needs finite std > 0, got {std}")
    # Checked on the host before any tensor is made: no device sync.
    mean_t = torch.tensor(mean_values, dtype=x.dtype, device=x.device).view(1, channels, 1, 1)
    std_t = torch.tensor(std_values, dtype=x.dtype, device=x.device).view(1, channels, 1, 1)
    return (x - mean_t) / std_t


_FASHION_MNIST_HOWTO = (
    "To get the files: `sudo apt-get install dataset-fashion-mnist` (installs them in "
    f"{DEFAULT_FASHION_MNIST_DIR}), or set ${FASHION_MNIST_ENV_VAR} to a folder holding "
    f"{', '.join(FASHION_MNIST_FILES)} (with or without .gz)."
)


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file into a native-byte-order array."""
    if len(raw) < 4:
        raise DatasetError(f"IDX file {path} is {len(raw)} bytes long, too short for the 4-byte IDX magic")
    zero, type_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00":
        raise DatasetError(
            f"IDX file {path} has bad magic {raw[:4].hex(' ')}: expected two zero bytes, a type code and a "
            "dimension count (e.g. 00 00 08 03 for uint8 images); is it an IDX file?"
        )
    if type_code not in _IDX_DTYPES:
        known = ", ".join(f"0x{code:02X} ({dt.name})" for code, dt in _IDX_DTYPES.items())
        raise DatasetError(f"IDX file {path} has unknown type code 0x{type_code:02X}; known: {known}")
    if not 1 <= ndim <= 32:  # numpy holds up to 64 (32 before numpy 2); IDX files hold 1 to 4 in practice
        raise DatasetError(f"IDX file {path} has a dimension count of {ndim}; expected 1 to 32")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(
            f"IDX file {path} is truncated in its header: {ndim} dimensions need {header_len} header "
            f"bytes, found {len(raw)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: np.prod's int64 wrapped for huge headers
    found = len(raw) - header_len
    if found != expected:
        kind = "shorter" if found < expected else "longer"
        raise DatasetError(
            f"IDX file {path} data is {kind} than its header says: shape {shape} of {dtype.name} needs "
            f"{expected} bytes, found {found}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _fashion_file(folder: Path, name: str) -> Path:
    """Return the gzipped file ``name`` in ``folder`` if present, else its un-gzipped twin."""
    gz = folder / name
    return gz if gz.is_file() else folder / name.removesuffix(".gz")


def _missing_fashion_files(folder: Path) -> list[str]:
    """Return the Fashion-MNIST file names absent (in both forms) from ``folder``; all if no folder."""
    if not folder.is_dir():
        return list(FASHION_MNIST_FILES)
    return [name for name in FASHION_MNIST_FILES if not _fashion_file(folder, name).is_file()]


def _describe_missing(folder: Path, missing: list[str]) -> str:
    """Say why ``folder`` does not qualify, given the missing file names."""
    if not folder.exists():
        return "does not exist"
    if not folder.is_dir():
        return "is not a folder"
    return f"lacks {', '.join(missing)}"


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist_cached(folder: Path, stamps: tuple[tuple[str, int, int], ...]) -> ImageDataset:
    """Load and validate Fashion-MNIST from ``folder``; ``stamps`` only keys the cache."""
    del stamps
    arrays = [read_idx(_fashion_file(folder, name)) for name in FASHION_MNIST_FILES]
    train_images, train_labels, test_images, test_labels = arrays
    n_classes = len(FASHION_MNIST_CLASSES)
    for split, images, labels in (("train", train_images, train_labels), ("t10k", test_images, test_labels)):
        # The files read, by name: where both a .gz and a plain copy are present, the .gz is the one to replace.
        image_file, label_file = (_fashion_file(folder, f"{split}-{kind}-idx{rank}-ubyte.gz").name
                                  for kind, rank in (("images", 3), ("labels", 1)))  # fmt: skip
        where = f"{folder} ({image_file}, {label_file})"
        _check_split(where, split, images, labels, image_shape=(28, 28), n_classes=n_classes)
        if images.dtype != np.uint8:
            raise DatasetError(f"Fashion-MNIST {split} images in {where} are {images.dtype}, expected uint8")
    return ImageDataset(
        train_images=torch.from_numpy(train_images),
        train_labels=torch.from_numpy(train_labels.astype(np.int64)),
        test_images=torch.from_numpy(test_images),
        test_labels=torch.from_numpy(test_labels.astype(np.int64)),
        classes=FASHION_MNIST_CLASSES,
    )


def _check_split(
    where: Path | str,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    image_shape: tuple[int, ...],
    n_classes: int,
) -> None:
    """Check one split's image shape, label shape and dtype, counts and label range."""
    if images.ndim != 1 + len(image_shape) or images.shape[1:] != image_shape:
        raise DatasetError(
            f"{split} images in {where} have shape {images.shape}, expected [N, {', '.join(map(str, image_shape))}]"
        )
    if labels.ndim != 1:
        raise DatasetError(f"{split} labels in {where} have shape {labels.shape}, expected [N]")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{split} labels in {where} are {labels.dtype}, expected integers")
    if len(images) != len(labels):
        raise DatasetError(
            f"{split} split in {where} has {len(images)} images but {len(labels)} labels; they must agree"
        )
    if len(images) == 0:  # well-formed files of 0 samples: a task over them failed later, naming no file
        raise DatasetError(f"{split} split in {where} holds no samples (its files' headers say 0)")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise DatasetError(
            f"{split} labels in {where} range {int(labels.min())}..{int(labels.max())}, expected 0..{n_classes - 1}"
        )


def _cifar10_howto(expected: Sequence[str]) -> str:
    """Say which files load_cifar10 expects and where to get them."""
    return (
        f"Expected the CIFAR-10 python version batches {', '.join(expected)} (and optionally "
        f"{_CIFAR10_META_FILE}) in it or in its subfolder {_CIFAR10_SUBDIR}/; they come from "
        "cifar-10-python.tar.gz at https://www.cs.toronto.edu/~kriz/cifar.html."
    )


def _unpickle(path: Path) -> object:
    """Unpickle a trusted CIFAR-10 file with bytes keys, turning failures into DatasetError."""
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="bytes")  # trusted files only (documented)
    except Exception as exc:  # a corrupt pickle raises almost anything: TypeError, MemoryError, KeyError, ...
        raise DatasetError(
            f"cannot unpickle CIFAR-10 file {path} ({type(exc).__name__}: {exc}); is it the CIFAR-10 python version?"
        ) from exc


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch into uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``."""
    batch = _unpickle(path)
    if not isinstance(batch, dict):
        raise DatasetError(f"CIFAR-10 batch {path} holds a {type(batch).__name__}, expected a dict")
    for key in (b"data", b"labels"):
        if key not in batch:
            raise DatasetError(
                f"CIFAR-10 batch {path} lacks the key {key!r} (has {sorted(map(repr, batch))}); is it the "
                "CIFAR-10 python version (not CIFAR-100, which has b'fine_labels')?"
            )
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise DatasetError(f"CIFAR-10 batch {path} b'data' is {desc}, expected a uint8 [N, 3072] array")
    if data.shape[1] != _CIFAR10_ROW:
        raise DatasetError(
            f"CIFAR-10 batch {path} rows are {data.shape[1]} bytes long, expected {_CIFAR10_ROW} (3 channels × 32 × 32)"
        )
    try:
        labels = np.asarray(batch[b"labels"])
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"CIFAR-10 batch {path} b'labels' is not a list of ints: {exc}") from exc
    images = np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy()
    _check_split(path, "CIFAR-10", images, labels, image_shape=(3, 32, 32), n_classes=len(CIFAR10_CLASSES))
    return images, labels.astype(np.int64)


def _read_cifar10_meta(path: Path) -> tuple[str, ...]:
    """Read the 10 class names from a CIFAR-10 ``batches.meta`` file."""
    meta = _unpickle(path)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != len(CIFAR10_CLASSES):
        raise DatasetError(
            f"CIFAR-10 meta file {path} has no list of {len(CIFAR10_CLASSES)} b'label_names'; "
            "is it the CIFAR-10 python version?"
        )
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _stacklevel_outside_package() -> int:
    """``warnings.warn``'s ``stacklevel``, in this module's caller, of the first frame outside ``triaccel_rl``.

    The warning then names the user's line whichever public function they called: ``stacklevel=2`` named
    ``load_fashion_mnist``'s own line in this file, and a task's data (``tasks.py``) is deeper still. Frames are told
    apart by module name, not by file: ``triaccel_rl.envs`` and the other subpackages live outside this folder.
    """
    level, frame = 1, sys._getframe(1)  # the function that calls warnings.warn is its stacklevel 1
    while frame.f_back is not None and str(frame.f_globals.get("__name__")).partition(".")[0] == "triaccel_rl":
        level, frame = level + 1, frame.f_back
    return level


def _per_channel(value: float | Sequence[float], channels: int, name: str) -> list[float]:
    """Turn a scalar (a NumPy or 0-d tensor or array one too) or per-channel sequence into ``channels`` floats."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:  # a 0-d array was "not a number"
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return [float(value)] * channels
    if isinstance(value, (str, bytes)):  # iterable: "12" read as the per-channel values 1 and 2
        raise DatasetError(f"normalize_images: {name} {value!r} must be a number or one number a channel, not text")
    try:
        values = [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):  # "0.5" gave a bare ValueError, np.float32(0.5) "not iterable"
        raise DatasetError(f"normalize_images: {name} {value!r} must be a number or one number a channel") from None
    if len(values) != channels:
        raise DatasetError(f"normalize_images got {len(values)} {name} values for {channels} channels")
    return values
