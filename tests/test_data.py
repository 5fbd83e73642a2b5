"""Tests for triaccel_rl.data: IDX reading, Fashion-MNIST discovery and loading, CIFAR-10 batches."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from triaccel_rl import data
from triaccel_rl.data import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    DatasetError,
    find_fashion_mnist,
    load_cifar10,
    load_fashion_mnist,
    normalize_images,
    read_idx,
    to_float_images,
)

_TYPE_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as an IDX file (big-endian header and data)."""
    code = _TYPE_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10,
        np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint8),
        np.array([[-(2**31), 2**31 - 1], [0, -7], [123456, 1]], dtype=np.int32),
        np.array([[0.5, -1.25, 3.0e-7], [np.inf, -0.0, 1.0e30]], dtype=np.float32),
        np.array([-128, 0, 127], dtype=np.int8),
        np.array([[-32768, 32767]], dtype=np.int16),
        np.array([np.pi, -np.e], dtype=np.float64),
    ],
    ids=["uint8-3d", "uint8-1d", "int32", "float32", "int8", "int16", "float64"],
)
def test_read_idx_roundtrip_gzip(tmp_path: Path, array: np.ndarray) -> None:
    out = read_idx(write_idx(tmp_path / "a.idx.gz", array))
    assert out.dtype == array.dtype
    assert out.dtype.isnative
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    out[...] = 0  # writable, not a view of a read-only buffer


def test_read_idx_plain_file_detected_by_magic(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.int32).reshape(3, 4)
    # A .gz name on a plain file: detection must use the content, not the name.
    out = read_idx(write_idx(tmp_path / "plain.gz", array, compress=False))
    np.testing.assert_array_equal(out, array)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00"))
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "bad magic" in msg
    assert "12 34 08 01" in msg  # what was found
    assert "two zero bytes" in msg  # what is expected


def test_read_idx_unknown_type_code(tmp_path: Path) -> None:
    path = tmp_path / "type.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x0a\x01" + struct.pack(">I", 1) + b"\x00"))
    with pytest.raises(DatasetError, match=r"unknown type code 0x0A") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_data_shorter_than_header(tmp_path: Path) -> None:
    raw = idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))[:-5]
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "shorter" in msg
    assert "needs 24 bytes, found 19" in msg


def test_read_idx_wrong_dimension_in_header(tmp_path: Path) -> None:
    # Header claims 5 rows of int32 pairs, data holds 4.
    raw = idx_bytes(np.zeros((4, 2), dtype=np.int32))
    raw = raw[:4] + struct.pack(">I", 5) + raw[8:]
    path = tmp_path / "dims.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DatasetError, match=r"shape \(5, 2\) of int32 needs 40 bytes, found 32"):
        read_idx(path)


def test_read_idx_trailing_data(tmp_path: Path) -> None:
    raw = idx_bytes(np.zeros(6, dtype=np.uint8)) + b"\x01\x02\x03"
    path = tmp_path / "long.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "longer" in msg
    assert "needs 6 bytes, found 9" in msg


def test_read_idx_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "hdr"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 2))
    with pytest.raises(DatasetError, match=r"truncated in its header.*need 16 header bytes, found 8"):
        read_idx(path)


@pytest.mark.parametrize("ndim", [0, 33, 65, 255])
def test_read_idx_refuses_a_dimension_count_numpy_cannot_hold(tmp_path: Path, ndim: int) -> None:
    """65 dimensions of size 1 and the one data byte they call for: numpy's own ValueError, not a DatasetError."""
    path = tmp_path / "dims"
    path.write_bytes(b"\x00\x00\x08" + bytes([ndim]) + struct.pack(">I", 1) * ndim + b"\x07")
    with pytest.raises(DatasetError, match=rf"^IDX file {path} has a dimension count of {ndim}; expected 1 to 32$"):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    blob = gzip.compress(idx_bytes(rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "truncated or corrupt gzip" in msg


@pytest.mark.parametrize("damage", ["deflate-data", "crc", "trailing-garbage"])
def test_read_idx_corrupt_gzip(tmp_path: Path, damage: str) -> None:
    """A damaged stream (bad deflate bits: zlib.error), a wrong checksum (BadGzipFile) or garbage after the stream:
    each is a DatasetError naming the file, never a partial array."""
    rng = np.random.default_rng(0)
    blob = bytearray(gzip.compress(idx_bytes(rng.integers(0, 256, size=(8, 28, 28), dtype=np.uint8))))
    if damage == "deflate-data":
        blob[10] = 0xFF  # the first deflate block header: block type 3, reserved
    elif damage == "crc":
        blob[-8] ^= 0x01  # the CRC-32 of the uncompressed data, in the trailer
    else:
        blob += b"garbage!"
    path = tmp_path / "bad.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DatasetError, match=r"truncated or corrupt gzip stream .*download it again") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"is 0 bytes long, too short for the 4-byte IDX magic"):
        read_idx(path)


def test_read_idx_huge_header_counts_exactly(tmp_path: Path) -> None:
    """Three dimensions of 2^32 - 1 uint8s need (2^32 - 1)^3 bytes. Before, np.prod in int64 wrapped around and the
    message said the file needed 12884901887 bytes."""
    path = tmp_path / "huge"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 2**32 - 1, 2**32 - 1, 2**32 - 1) + b"\x00" * 7)
    with pytest.raises(DatasetError, match=rf"needs {(2**32 - 1) ** 3} bytes, found 7"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read IDX file") as info:
        read_idx(tmp_path / "nope.gz")
    assert str(tmp_path / "nope.gz") in str(info.value)


# ---------------------------------------------------------------- find / load Fashion-MNIST


def write_fake_fashion(folder: Path, n_train: int = 20, n_test: int = 10, *, compress: bool = True) -> Path:
    """Write tiny but valid Fashion-MNIST files (labels cycle through 0..9)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = [
        rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        (np.arange(n_train) % 10).astype(np.uint8),
        rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        (np.arange(n_test) % 10).astype(np.uint8),
    ]
    for name, array in zip(FASHION_MNIST_FILES, arrays, strict=True):
        write_idx(folder / (name if compress else name.removesuffix(".gz")), array, compress=compress)
    return folder


@pytest.fixture
def no_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Unset TRIACCEL_DATA and point the default folder at a path that does not exist."""
    missing = tmp_path / "no-such-default"
    monkeypatch.delenv("TRIACCEL_DATA", raising=False)
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_DIR", missing)
    return missing


def test_find_explicit_path_missing_files_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = write_fake_fashion(tmp_path / "good")
    monkeypatch.setenv("TRIACCEL_DATA", str(good))  # must not be used as a fallback
    bad = tmp_path / "empty"
    bad.mkdir()
    (bad / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        find_fashion_mnist(bad)
    msg = str(info.value)
    assert str(bad) in msg
    assert "t10k-labels-idx1-ubyte.gz" in msg
    assert "lacks" in msg
    assert "train-images-idx3-ubyte.gz," not in msg.split("Expected")[0]  # present file not listed missing


def test_find_explicit_path_nonexistent(tmp_path: Path) -> None:
    """The message says where it looked, what it expected there, and how to install the files."""
    with pytest.raises(DatasetError) as info:
        find_fashion_mnist(tmp_path / "nowhere")
    msg = str(info.value)
    assert f"Fashion-MNIST folder {tmp_path / 'nowhere'} does not exist" in msg
    assert all(name in msg for name in FASHION_MNIST_FILES)
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert "/usr/share/datasets/fashion-mnist" in msg


def test_find_explicit_path_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "a-file"
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match=rf"Fashion-MNIST folder {path} is not a folder"):
        find_fashion_mnist(path)


def test_find_explicit_path_ok_plain_names(tmp_path: Path) -> None:
    folder = write_fake_fashion(tmp_path / "plain", compress=False)
    assert find_fashion_mnist(folder) == folder
    assert find_fashion_mnist(str(folder)) == folder


def test_find_uses_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_defaults: Path) -> None:
    folder = tmp_path / "env"
    folder.mkdir()
    for name in FASHION_MNIST_FILES:
        (folder / name).write_bytes(b"fake")
    monkeypatch.setenv("TRIACCEL_DATA", str(folder))
    assert find_fashion_mnist() == folder


def test_find_env_var_without_files_falls_back_with_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = write_fake_fashion(tmp_path / "default")
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_DIR", default)
    monkeypatch.setenv("TRIACCEL_DATA", str(tmp_path / "wrong"))
    with pytest.warns(UserWarning, match="TRIACCEL_DATA"):
        assert find_fashion_mnist() == default


def test_find_nothing_lists_all_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_defaults: Path) -> None:
    env_dir = tmp_path / "env-empty"
    env_dir.mkdir()
    monkeypatch.setenv("TRIACCEL_DATA", str(env_dir))
    with pytest.warns(UserWarning), pytest.raises(DatasetError) as info:
        find_fashion_mnist()
    msg = str(info.value)
    assert str(env_dir) in msg
    assert str(no_defaults) in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert "TRIACCEL_DATA" in msg


def test_find_nothing_env_unset(no_defaults: Path) -> None:
    with pytest.raises(DatasetError) as info:
        find_fashion_mnist()
    msg = str(info.value)
    assert "$TRIACCEL_DATA: not set" in msg
    assert str(no_defaults) in msg
    assert "dataset-fashion-mnist" in msg


def test_load_fake_fashion_mnist(tmp_path: Path) -> None:
    folder = write_fake_fashion(tmp_path / "fake", n_train=20, n_test=10)
    ds = load_fashion_mnist(folder)
    assert ds.train_images.shape == (20, 28, 28)
    assert ds.train_images.dtype == torch.uint8
    assert ds.train_labels.dtype == torch.int64
    assert ds.test_images.shape == (10, 28, 28)
    # The pixels write_fake_fashion drew (the same generator, the same draws), in file order; its cycling labels.
    rng = np.random.default_rng(1)
    train, test = (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8) for n in (20, 10))
    np.testing.assert_array_equal(ds.train_images.numpy(), train)
    np.testing.assert_array_equal(ds.test_images.numpy(), test)
    assert ds.train_labels.tolist() == [i % 10 for i in range(20)]
    assert ds.test_labels.tolist() == list(range(10))
    assert ds.classes == FASHION_MNIST_CLASSES
    assert load_fashion_mnist(folder) is ds  # cached


def test_load_fashion_mnist_cache_sees_changed_files(tmp_path: Path) -> None:
    folder = write_fake_fashion(tmp_path / "fake", n_train=20, n_test=10)
    first = load_fashion_mnist(folder)
    write_fake_fashion(folder, n_train=30, n_test=10)
    assert load_fashion_mnist(folder).train_images.shape[0] == 30
    assert first.train_images.shape[0] == 20


@pytest.mark.parametrize(
    ("file_index", "array", "match"),
    [
        (0, np.zeros((20, 28, 27), dtype=np.uint8), r"shape \(20, 28, 27\), expected \[N, 28, 28\]"),
        (1, np.zeros((20, 1), dtype=np.uint8), r"labels .* shape \(20, 1\), expected \[N\]"),
        (1, np.zeros(19, dtype=np.uint8), "20 images but 19 labels"),
        (3, np.full(10, 10, dtype=np.uint8), r"range 10\.\.10, expected 0\.\.9"),
        (0, np.zeros((20, 28, 28), dtype=np.float32), r"train images in .* are float32, expected uint8"),
        (2, np.zeros((10, 28), dtype=np.uint8), r"t10k images in .* have shape \(10, 28\), expected \[N, 28, 28\]"),
    ],
    ids=["image-size", "labels-2d", "count-mismatch", "label-range", "image-dtype", "image-ndim"],
)
def test_load_fashion_mnist_validates(tmp_path: Path, file_index: int, array: np.ndarray, match: str) -> None:
    folder = write_fake_fashion(tmp_path / "fake")
    write_idx(folder / FASHION_MNIST_FILES[file_index], array)
    with pytest.raises(DatasetError, match=match):
        load_fashion_mnist(folder)


def test_a_split_error_names_the_files_read(tmp_path: Path) -> None:
    """With both a .gz and a plain copy present the .gz is read; the error named only the folder, so a user could
    replace the wrong copy."""
    folder = write_fake_fashion(tmp_path / "fake")
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(10, dtype=np.uint8))  # a good plain copy ...
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.full(10, 10, dtype=np.uint8))  # ... and a bad .gz, read
    with pytest.raises(DatasetError) as info:
        load_fashion_mnist(folder)
    assert str(info.value) == (
        f"t10k labels in {folder} (t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) range 10..10, expected 0..9"
    )


_REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not _REAL_FASHION.is_dir(),
    reason=f"{_REAL_FASHION} absent (install the Debian package dataset-fashion-mnist)",
)
def test_real_fashion_mnist() -> None:
    ds = load_fashion_mnist(_REAL_FASHION)
    assert ds.train_images.shape == (60000, 28, 28)
    assert ds.train_labels.shape == (60000,)
    assert ds.test_images.shape == (10000, 28, 28)
    assert ds.test_labels.shape == (10000,)
    assert ds.train_images.dtype == torch.uint8
    assert ds.test_images.dtype == torch.uint8
    assert ds.train_labels.dtype == torch.int64
    assert ds.test_labels.dtype == torch.int64
    for labels in (ds.train_labels, ds.test_labels):
        assert int(labels.min()) == 0
        assert int(labels.max()) == 9
    assert torch.bincount(ds.train_labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(ds.test_labels, minlength=10).tolist() == [1000] * 10
    assert ds.classes == FASHION_MNIST_CLASSES
    assert load_fashion_mnist(_REAL_FASHION) is ds


# ---------------------------------------------------------------- CIFAR-10


def cifar_batch(n: int, first_label: int, seed: int) -> tuple[dict[bytes, object], np.ndarray, np.ndarray]:
    """Build a batch dict plus the expected [n, 3, 32, 32] images and labels.

    Channel c of image i is filled with a distinct pattern so a wrong reshape (e.g. HWC) would show.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for c in range(3):
        images[:, c] = rng.integers(c * 80, c * 80 + 60, size=(n, 32, 32), dtype=np.uint8)
    labels = [(first_label + i) % 10 for i in range(n)]
    rows = images.reshape(n, 3072)  # R plane, then G plane, then B plane, each row-major
    batch: dict[bytes, object] = {
        b"batch_label": b"fake",
        b"labels": labels,
        b"data": rows.copy(),
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }
    return batch, images, np.array(labels, dtype=np.int64)


def write_pickle(path: Path, obj: object) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def write_fake_cifar(folder: Path, n_batches: int = 5, meta: bool = True) -> tuple[np.ndarray, ...]:
    """Write 5 train batches (2 of 4 images, then 3 empty-ish of 1) and a test batch of 3."""
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = [], []
    for i in range(1, n_batches + 1):
        batch, images, labels = cifar_batch(4 if i <= 2 else 1, first_label=i, seed=i)
        write_pickle(folder / f"data_batch_{i}", batch)
        train_images.append(images)
        train_labels.append(labels)
    batch, test_images, test_labels = cifar_batch(3, first_label=7, seed=99)
    write_pickle(folder / "test_batch", batch)
    if meta:
        names = [f"class{i}".encode() for i in range(10)]
        write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return np.concatenate(train_images), np.concatenate(train_labels), test_images, test_labels


def test_cifar10_pixel_exact(tmp_path: Path) -> None:
    folder = tmp_path / "cifar"
    train_images, train_labels, test_images, test_labels = write_fake_cifar(folder)
    ds = load_cifar10(folder)
    assert ds.train_images.dtype == torch.uint8
    assert ds.train_images.shape == (11, 3, 32, 32)
    assert ds.train_labels.dtype == torch.int64
    assert ds.test_images.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(ds.train_images.numpy(), train_images)
    np.testing.assert_array_equal(ds.train_labels.numpy(), train_labels)
    np.testing.assert_array_equal(ds.test_images.numpy(), test_images)
    np.testing.assert_array_equal(ds.test_labels.numpy(), test_labels)
    # Channel-first: every channel stays within its own value band.
    for c in range(3):
        plane = ds.train_images[:, c]
        assert int(plane.min()) >= c * 80
        assert int(plane.max()) < c * 80 + 60
    assert ds.classes == tuple(f"class{i}" for i in range(10))


def test_cifar10_parent_folder_and_default_classes(tmp_path: Path) -> None:
    _, _, test_images, _ = write_fake_cifar(tmp_path / "cifar-10-batches-py", meta=False)
    ds = load_cifar10(tmp_path)
    np.testing.assert_array_equal(ds.test_images.numpy(), test_images)
    assert ds.classes == CIFAR10_CLASSES


def test_cifar10_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_cifar10(tmp_path / "nowhere")
    msg = str(info.value)
    assert str(tmp_path / "nowhere") in msg
    assert "python version" in msg
    assert "data_batch_1" in msg


def test_cifar10_path_is_a_file(tmp_path: Path) -> None:
    """Before, a file given as the folder was reported as not existing."""
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"not unpacked")
    with pytest.raises(DatasetError, match=rf"CIFAR-10 folder {path} is not a folder\. Expected the CIFAR-10 python"):
        load_cifar10(path)


class _RaisesTypeError:
    """Unpickles as int('1', 2, 3): a TypeError, as a damaged pickle's REDUCE can raise."""

    def __reduce__(self) -> tuple[object, ...]:
        return (int, ("1", 2, 3))


def test_cifar10_corrupt_pickle_raising_anything(tmp_path: Path) -> None:
    """Before, only some exception types were turned into DatasetError; a TypeError (as here), MemoryError or
    KeyError from a damaged batch escaped bare."""
    folder = tmp_path / "cifar"
    write_fake_cifar(folder)
    write_pickle(folder / "data_batch_3", _RaisesTypeError())
    with pytest.raises(
        DatasetError, match=r"cannot unpickle CIFAR-10 file .*data_batch_3 \(TypeError: .*python version"
    ):
        load_cifar10(folder)


def test_cifar10_missing_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar"
    write_fake_cifar(folder)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DatasetError) as info:
        load_cifar10(folder)
    msg = str(info.value)
    assert "lacks data_batch_4." in msg
    assert "CIFAR-10 python version" in msg


def _corrupt(batch: dict[bytes, object], how: str) -> object:
    if how == "missing-key":
        del batch[b"labels"]
    elif how == "row-length":
        data_ = batch[b"data"]
        assert isinstance(data_, np.ndarray)
        batch[b"data"] = data_[:, :3000].copy()
    elif how == "label-range":
        batch[b"labels"] = [0, 1, 10, 2]
    elif how == "negative-label":
        batch[b"labels"] = [0, -1, 3, 2]
    elif how == "count":
        batch[b"labels"] = [0, 1, 2]
    elif how == "dtype":
        data_ = batch[b"data"]
        assert isinstance(data_, np.ndarray)
        batch[b"data"] = data_.astype(np.int64)
    elif how == "not-dict":
        return [batch]
    return batch


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("missing-key", r"lacks the key b'labels'"),
        ("row-length", "rows are 3000 bytes long, expected 3072"),
        ("label-range", r"range 0\.\.10, expected 0\.\.9"),
        ("negative-label", r"range -1\.\.3, expected 0\.\.9"),  # the lower bound was untested
        ("count", "4 images but 3 labels"),
        ("dtype", "expected a uint8"),
        ("not-dict", "holds a list, expected a dict"),
    ],
)
def test_cifar10_malformed_batch(tmp_path: Path, how: str, match: str) -> None:
    folder = tmp_path / "cifar"
    write_fake_cifar(folder)
    batch, _, _ = cifar_batch(4, first_label=0, seed=5)
    write_pickle(folder / "data_batch_2", _corrupt(batch, how))
    with pytest.raises(DatasetError, match=match) as info:
        load_cifar10(folder)
    assert "data_batch_2" in str(info.value)


def test_cifar10_truncated_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "cifar"
    write_fake_cifar(folder)
    blob = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(blob[:100])
    with pytest.raises(DatasetError, match=r"cannot unpickle CIFAR-10 file .*test_batch"):
        load_cifar10(folder)


# ---------------------------------------------------------------- float conversion


def test_to_float_images_grey_and_colour() -> None:
    grey = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    out = to_float_images(grey)
    assert out.dtype == torch.float32
    assert out.shape == (1, 1, 2, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
    colour = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    torch.testing.assert_close(to_float_images(colour), colour.float() / 255, rtol=0, atol=0)  # no channel added
    assert grey.dtype == torch.uint8  # input untouched


def test_to_float_images_rejects_bad_input() -> None:
    with pytest.raises(DatasetError, match="uint8"):
        to_float_images(torch.zeros(1, 2, 2))
    with pytest.raises(DatasetError, match="shape"):
        to_float_images(torch.zeros(2, 2, dtype=torch.uint8))


def test_to_float_images_names_an_array_that_is_no_tensor() -> None:
    """Found in review: a NumPy uint8 array was told "expects uint8 images, got uint8" (NumPy's dtype, printed)."""
    import numpy as np

    expected = r"^to_float_images expects a torch.Tensor; got ndarray \(use torch.from_numpy\)$"
    with pytest.raises(DatasetError, match=expected):
        to_float_images(np.zeros((2, 28, 28), np.uint8))


@pytest.mark.parametrize(
    ("images", "shown"),
    [("array", r"ndarray \(use torch.from_numpy\)"), ("list", "list"), ("none", "NoneType")],
)
def test_normalize_images_names_images_that_are_no_tensor(images: str, shown: str) -> None:
    """Found in review: a NumPy array, a list or None failed on ``x.dim()`` with a bare AttributeError."""
    import numpy as np

    x = {"array": np.zeros((2, 1, 4, 4), np.float32), "list": [[1.0]], "none": None}[images]
    with pytest.raises(DatasetError, match=rf"^normalize_images expects a torch.Tensor; got {shown}$"):
        normalize_images(x, 0.5, 0.5)  # type: ignore[arg-type]


def test_normalize_images_takes_a_0_d_array_as_one_number() -> None:
    """Found in review: a 0-d NumPy array was refused as "must be a number", while a 0-d tensor and a NumPy scalar
    were taken."""
    import numpy as np

    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(normalize_images(x, np.array(0.5), np.array(4)), (x - 0.5) / 4, rtol=0, atol=0)


def test_normalize_images() -> None:
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(normalize_images(x, 0.5, 0.25), (x - 0.5) / 0.25)
    mean, std = [0.1, 0.2, 0.3], [0.5, 1.0, 2.0]
    out = normalize_images(x, mean, std)
    for c in range(3):
        torch.testing.assert_close(out[:, c], (x[:, c] - mean[c]) / std[c])
    with pytest.raises(DatasetError, match="2 mean values for 3 channels"):
        normalize_images(x, [0.1, 0.2], 1.0)
    with pytest.raises(DatasetError, match="std > 0"):
        normalize_images(x, 0.0, [1.0, 0.0, 1.0])
    with pytest.raises(DatasetError, match="floating"):
        normalize_images(torch.zeros(2, 4, 4), 0.0, 1.0)
    with pytest.raises(DatasetError, match=r"needs finite std > 0, got inf"):
        normalize_images(x, 0.0, float("inf"))
    with pytest.raises(DatasetError, match=r"needs finite means, got \[0.0, nan, 0.0\]"):
        normalize_images(x, [0.0, float("nan"), 0.0], 1.0)
    # NumPy and 0-d tensor scalars are scalars (TypeErrors before); text is a DatasetError naming it (a bare ValueError)
    import numpy as np

    for mean in (np.float32(0.5), torch.tensor(0.5)):
        torch.testing.assert_close(normalize_images(x, mean, np.int64(4)), (x - 0.5) / 4)
    with pytest.raises(DatasetError, match=r"normalize_images: mean '0\.5' must be a number or one number a channel"):
        normalize_images(x, "0.5", 1.0)
    with pytest.raises(DatasetError, match=r"mean '12' must be a number or one number a channel, not text"):
        normalize_images(x[:, :2], "12", 1.0)  # iterable: read as the two channels' means 1 and 2
