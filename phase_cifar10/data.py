"""CIFAR-10 read safely, downloaded and checked; the synthetic task; the train/validation split."""

import functools
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .files import UserError, lock_file, new_folders_removed_on_failure, one_line, open_regular_file, os_error

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_CASES_PER_BATCH = 10000
# Bounds on a batch file's size: an image's 3,072 bytes plus its label and file name (3,103 bytes
# per image in the official files), and room for the rest.
BATCH_BYTES_PER_IMAGE = 4096
PICKLE_OVERHEAD_BYTES = 1 << 20
SPLIT_SEED = 0  # the one permutation behind --subset and --val-size, the same for every --seed


class Dataset(NamedTuple):
    train_x: np.ndarray  # (N, 3, 32, 32) uint8
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray


# The official batch files are Python 2 pickles of dicts holding lists, strings and one numpy
# array. An ordinary unpickler would run whatever a tampered file names, so this one resolves
# only what those files need: numpy's array reconstruction (under its numpy 1 and numpy 2
# module names) and dtypes. Everything else in them is plain pickle opcodes.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class SafeCifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return _SAFE_GLOBALS[(module, name)]


def read_cifar_pickle(path, max_bytes=CIFAR_CASES_PER_BATCH * BATCH_BYTES_PER_IMAGE + PICKLE_OVERHEAD_BYTES):
    """One batch or meta file as a dict with str keys (files written with bytes keys too); a file
    larger than max_bytes, what its contents can need, is refused before it is read."""
    try:
        with open_regular_file(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise UserError(f"{path}: {size:,} bytes, more than the {max_bytes:,} such a file can need")
            obj = SafeCifarUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"{path}: file missing") from None
    except UserError:
        raise
    except Exception as e:  # a tampered or truncated pickle fails in many ways; MemoryError among them
        raise UserError(f"{path}: not a readable CIFAR-10 pickle ({one_line(e)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_batch(path, count):
    """Images (count, 3, 32, 32) uint8 and labels (count,) int64 of one batch file, checked."""
    batch = read_cifar_pickle(path, max_bytes=count * BATCH_BYTES_PER_IMAGE + PICKLE_OVERHEAD_BYTES)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (count, 3072):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: 'data' should be uint8 of shape ({count}, 3072), found {found}")
    # Checked as Python values first: np.asarray of lists nested in lists could expand without bound.
    if isinstance(labels, list) and len(labels) == count and all(type(v) is int for v in labels):
        low, high = min(labels), max(labels)
    elif isinstance(labels, np.ndarray) and labels.shape == (count,) and np.issubdtype(labels.dtype, np.integer):
        low, high = labels.min(), labels.max()
    else:
        found = f"{labels.dtype} {labels.shape}" if isinstance(labels, np.ndarray) else describe_labels(labels)
        raise UserError(f"{path}: 'labels' should be {count} integers, found {found}")
    if low < 0 or high > 9:
        raise UserError(f"{path}: labels must lie in 0-9, found {low}..{high}")
    # Each row holds the red plane, then green, then blue, each 32x32 row-major.
    return data.reshape(count, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def describe_labels(labels):
    if not isinstance(labels, list):
        return type(labels).__name__
    kinds = sorted({type(v).__name__ for v in labels})
    return f"a list of {len(labels)} ({', '.join(kinds) or 'nothing'})"


def read_cifar10(folder):
    """(train_x, train_y, test_x, test_y) from a cifar-10-batches-py folder, every file checked.

    Batch sizes are checked against the folder's own batches.meta, so a smaller folder in the
    same format (as the tests write) reads too; the full dataset has 10,000 per batch.
    """
    folder = Path(folder)
    meta = read_cifar_pickle(folder / "batches.meta", max_bytes=PICKLE_OVERHEAD_BYTES)
    count, names = meta.get("num_cases_per_batch"), meta.get("label_names")
    if not isinstance(count, int) or count < 1:
        raise UserError(f"{folder / 'batches.meta'}: 'num_cases_per_batch' is {count!r}")
    if not isinstance(names, list) or len(names) != 10:
        raise UserError(f"{folder / 'batches.meta'}: 'label_names' should list 10 classes")
    train = [read_cifar_batch(folder / name, count) for name in CIFAR_TRAIN_FILES]
    test_x, test_y = read_cifar_batch(folder / "test_batch", count)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return train_x, train_y, test_x, test_y


def file_md5(path):
    digest = hashlib.md5(usedforsecurity=False)
    with open_regular_file(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar10_archive(dest_dir):
    """The official archive into dest_dir, its MD5 checked; raises OSError when it differs."""
    target = Path(dest_dir) / CIFAR_ARCHIVE
    with urllib.request.urlopen(CIFAR_URL, timeout=60) as response, open(target, "wb") as f:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            f.write(chunk)
    if file_md5(target) != CIFAR_ARCHIVE_MD5:
        raise OSError(f"the download's MD5 is not the official archive's {CIFAR_ARCHIVE_MD5}")
    return target


def extract_cifar_archive(archive, dest_dir):
    # Only the dataset's own folder, and only plain files and folders inside it: an archive
    # from elsewhere cannot write outside dest_dir or plant links.
    with tarfile.open(archive, "r:gz") as tar:
        members = [
            m for m in tar.getmembers()
            if (m.isfile() or m.isdir()) and Path(m.name).parts[:1] == (CIFAR_FOLDER,)
            and ".." not in Path(m.name).parts
        ]  # fmt: skip
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest_dir, members=members, **extra)


def prepare_cifar10(data_dir):
    """The path of a valid cifar-10-batches-py folder in data_dir, unpacked or downloaded if needed.

    Unpacking and downloading happen in a hidden temporary folder that is renamed into place
    only after every file has been read and checked, so an interrupted download, a failed
    checksum or a broken archive leaves no half-written dataset behind. One process at a time
    unpacks into a data folder (the others wait), and it first removes what a killed one left.
    """
    data_dir = Path(data_dir)
    folder = data_dir / CIFAR_FOLDER
    how_to_fix = (
        f"put the official {CIFAR_ARCHIVE} into {data_dir}/ (or unpack it there as "
        f"{folder}/), or point --data-dir at the folder that holds {CIFAR_FOLDER}/"
    )
    try:
        if folder.is_dir():
            return folder
        if folder.exists() or folder.is_symlink():
            raise UserError(f"{folder} is not a folder: remove it, or point --data-dir at another folder")
        with new_folders_removed_on_failure(data_dir, "--data-dir"):
            wait = f"another process ({{holder}}) is unpacking CIFAR-10 in {data_dir}; waiting for it"
            with lock_file(data_dir / ".cifar10-unpacking.lock", wait_message=wait) as locked:
                if folder.is_dir():  # the process waited for put it there
                    return folder
                if locked:  # no one else is unpacking: what is there was left by a killed process
                    for leftover in data_dir.glob(".cifar10-unpacking-*"):
                        if leftover.is_dir() and not leftover.is_symlink():
                            shutil.rmtree(leftover)
                return unpack_or_download_cifar10(data_dir, folder, how_to_fix)
    except OSError as e:  # a read-only data folder, say
        raise UserError(f"--data-dir {data_dir}: cannot unpack CIFAR-10 there ({os_error(e)}); {how_to_fix}") from None


def unpack_or_download_cifar10(data_dir, folder, how_to_fix):
    archive = data_dir / CIFAR_ARCHIVE
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".cifar10-unpacking-") as tmp:
        if archive.exists():
            if file_md5(archive) != CIFAR_ARCHIVE_MD5:
                raise UserError(
                    f"{archive}: MD5 differs from the official archive's; unpack it yourself "
                    f"as {folder}/ to use it anyway (its files are then read and checked)"
                )
            print(f"unpacking {archive}")
        else:
            print(f"CIFAR-10 not found in {data_dir}; downloading {CIFAR_URL}")
            try:
                archive = download_cifar10_archive(tmp)
            except Exception as e:
                raise UserError(f"CIFAR-10 could not be downloaded ({e}); {how_to_fix}") from None
        try:
            extract_cifar_archive(archive, tmp)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"{archive}: cannot unpack ({e}); {how_to_fix}") from None
        read_cifar10(Path(tmp) / CIFAR_FOLDER)
        try:
            os.replace(Path(tmp) / CIFAR_FOLDER, folder)
        except OSError:
            if not folder.is_dir():
                raise
            # Another process (a Slurm task, say) put its folder in place first; it is read and
            # checked like any existing folder, and ours goes away with the temporary folder.
    return folder


@functools.cache  # read once per process, whatever the number of seeds
def cifar10_dataset(data_dir):
    folder = prepare_cifar10(data_dir)
    train_x, train_y, test_x, test_y = read_cifar10(folder)
    if len(train_y) != 5 * CIFAR_CASES_PER_BATCH:
        print(f"note: {folder} holds {len(train_y)} training images, not the 50,000 of CIFAR-10")
    return Dataset(train_x, train_y, test_x, test_y)


def synthetic_dataset(seed, n_train=2048, n_test=256):
    """A small learnable 10-class task of 32x32 images, made from the seed alone.

    Each class is a coarse random colour pattern; an image is its class pattern under heavy
    pixel noise, so a small network learns it gradually rather than in one step. For smoke
    runs and tests only: never reported as CIFAR-10.
    """
    rng = np.random.default_rng(seed)
    patterns = np.kron(rng.normal(size=(10, 3, 4, 4)), np.ones((8, 8)))  # (10, 3, 32, 32)

    def draw(n):
        labels = rng.integers(0, 10, size=n)
        pixels = 128 + 60 * patterns[labels] + rng.normal(0, 60, size=(n, 3, 32, 32))
        return np.clip(pixels, 0, 255).astype(np.uint8), labels.astype(np.int64)

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return Dataset(train_x, train_y, test_x, test_y)


def fingerprint(data):
    """16 hexadecimal digits that change with any image or label of either split, or their order: what
    a run's numbers depend on, besides its settings. A hash of CIFAR-10's 180 MB takes a fraction of
    a second."""
    digest = hashlib.blake2b(digest_size=8)
    for array in data:
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def split_indices(n_train, subset, val_size):
    """(train, val) indices into the training split: val is the first val_size images of one
    fixed permutation, train the next `subset` (all the rest when subset is 0). Disjoint."""
    if val_size + max(subset, 1) > n_train:
        raise UserError(
            f"--val-size {val_size} and --subset {subset} need more than the {n_train} training images available"
        )
    order = np.random.default_rng(SPLIT_SEED).permutation(n_train)
    val, rest = order[:val_size], order[val_size:]
    return (rest[:subset] if subset else rest), val


def data_label(cfg):
    name = "CIFAR-10" if cfg["dataset"] == "cifar10" else "synthetic task (not CIFAR-10)"
    return name + (f", {cfg['subset']}-image subset" if cfg["subset"] else "")
