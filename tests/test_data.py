"""Reading CIFAR-10 safely, fetching it without half-written leftovers, the synthetic task,
the splits, the device-resident loader and the network."""

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import official_pickle, write_cifar_folder

from phase_cifar10 import data, files, loader, model

# ----- reading the official format -----


@pytest.mark.parametrize("layout", ["official", "bytes-keys", "str-keys"])
def test_reads_official_format_folders(tmp_path, layout):
    expected = write_cifar_folder(tmp_path, per_batch=20, layout=layout)
    got = data.read_cifar10(tmp_path / data.CIFAR_FOLDER)
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(have, want)
    train_x, train_y, test_x, test_y = got
    assert train_x.shape == (100, 3, 32, 32) and train_x.dtype == np.uint8
    assert train_y.dtype == np.int64 and test_x.shape == (20, 3, 32, 32)


def test_official_layout_names_numpy_core_and_numpy_2_names_load_too(tmp_path):
    folder = tmp_path / "batch"
    raw = official_pickle({"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "labels": [1, 2]})
    assert b"numpy.core.multiarray" in raw
    folder.write_bytes(raw.replace(b"numpy.core.multiarray", b"numpy._core.multiarray"))
    assert data.read_cifar_pickle(folder)["data"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_channel_planes_map_to_rgb(tmp_path):
    write_cifar_folder(tmp_path, per_batch=2)
    folder = tmp_path / data.CIFAR_FOLDER
    raw = data.read_cifar_pickle(folder / "data_batch_1")["data"]
    train_x = data.read_cifar10(folder)[0]
    # Row layout: 1024 red values, then green, then blue, each 32x32 row-major.
    assert train_x[0, 1, 0, 5] == raw[0, 1024 + 5]
    assert train_x[1, 2, 31, 31] == raw[1, 3071]


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refuses_a_pickle_that_would_run_a_command(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": RunsACommand(marker)}, protocol=2))
    with pytest.raises(files.UserError, match=r"data_batch_1.*refusing to load (posix|nt)\.system"):
        data.read_cifar_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["builtins eval", "subprocess Popen", "_codecs encode"])
def test_refuses_any_other_global(tmp_path, target):
    module, name = target.split()
    path = tmp_path / "batch"
    path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"U\x01x\x85R.")
    with pytest.raises(files.UserError, match=f"refusing to load {module}.{name}"):
        data.read_cifar_pickle(path)


def test_truncated_batch_file_names_the_file(tmp_path):
    write_cifar_folder(tmp_path, per_batch=20)
    batch = tmp_path / data.CIFAR_FOLDER / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(files.UserError, match=r"data_batch_3: not a readable CIFAR-10 pickle"):
        data.read_cifar10(tmp_path / data.CIFAR_FOLDER)


def test_garbage_batch_file(tmp_path):
    write_cifar_folder(tmp_path, per_batch=20)
    (tmp_path / data.CIFAR_FOLDER / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(files.UserError, match="test_batch"):
        data.read_cifar10(tmp_path / data.CIFAR_FOLDER)


def rewrite_batch(folder, name, **changes):
    path = folder / data.CIFAR_FOLDER / name
    batch = data.read_cifar_pickle(path)
    batch.update(changes)
    path.write_bytes(official_pickle(batch))


def test_mislabelled_batch(tmp_path):
    write_cifar_folder(tmp_path, per_batch=20)
    rewrite_batch(tmp_path, "data_batch_2", labels=[10] + [0] * 19)
    with pytest.raises(files.UserError, match=r"data_batch_2: labels must lie in 0-9, found 0\.\.10"):
        data.read_cifar10(tmp_path / data.CIFAR_FOLDER)


def test_wrong_count_of_labels(tmp_path):
    write_cifar_folder(tmp_path, per_batch=20)
    rewrite_batch(tmp_path, "data_batch_4", labels=[0] * 19)
    with pytest.raises(files.UserError, match="data_batch_4: 'labels' should be 20 integers"):
        data.read_cifar10(tmp_path / data.CIFAR_FOLDER)


def test_wrongly_shaped_images(tmp_path):
    write_cifar_folder(tmp_path, per_batch=20)
    rewrite_batch(tmp_path, "data_batch_5", data=np.zeros((20, 3071), np.uint8))
    with pytest.raises(files.UserError, match=r"data_batch_5: 'data' should be uint8 of shape \(20, 3072\)"):
        data.read_cifar10(tmp_path / data.CIFAR_FOLDER)


def test_batch_shorter_than_meta_says(tmp_path):
    write_cifar_folder(tmp_path, per_batch=20)
    rewrite_batch(tmp_path, "data_batch_1", data=np.zeros((10, 3072), np.uint8), labels=[0] * 10)
    with pytest.raises(files.UserError, match=r"data_batch_1: 'data' should be uint8 of shape \(20, 3072\)"):
        data.read_cifar10(tmp_path / data.CIFAR_FOLDER)


def test_missing_batch_file(tmp_path):
    write_cifar_folder(tmp_path, per_batch=20)
    (tmp_path / data.CIFAR_FOLDER / "data_batch_5").unlink()
    with pytest.raises(files.UserError, match="data_batch_5: file missing"):
        data.read_cifar10(tmp_path / data.CIFAR_FOLDER)


# ----- fetching: nothing half-written is ever left behind -----


def make_archive(tmp_path, per_batch=20):
    source = tmp_path / "source"
    write_cifar_folder(source, per_batch=per_batch)
    archive = tmp_path / data.CIFAR_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / data.CIFAR_FOLDER, arcname=data.CIFAR_FOLDER)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def data_dir_with_archive(tmp_path, monkeypatch=None):
    """A --data-dir holding an archive; with monkeypatch, its MD5 stands in for the official one."""
    archive, md5 = make_archive(tmp_path)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive.rename(data_dir / data.CIFAR_ARCHIVE)
    if monkeypatch is not None:
        monkeypatch.setattr(data, "CIFAR_ARCHIVE_MD5", md5)
    return data_dir


def hidden_leftovers(data_dir):
    return [p.name for p in Path(data_dir).iterdir() if p.name.startswith(".")]


def test_existing_folder_is_used_as_is(tmp_path, monkeypatch):
    write_cifar_folder(tmp_path, per_batch=20)
    monkeypatch.setattr(data, "download_cifar10_archive", lambda dest: pytest.fail("should not download"))
    assert data.prepare_cifar10(tmp_path) == tmp_path / data.CIFAR_FOLDER


def test_unpacks_an_archive_put_into_the_data_dir(tmp_path, monkeypatch):
    data_dir = data_dir_with_archive(tmp_path, monkeypatch)
    folder = data.prepare_cifar10(data_dir)
    assert len(data.read_cifar10(folder)[1]) == 100
    assert hidden_leftovers(data_dir) == []


def test_archive_with_wrong_checksum_is_refused(tmp_path):
    data_dir = data_dir_with_archive(tmp_path)
    with pytest.raises(files.UserError, match="MD5 differs from the official archive"):
        data.prepare_cifar10(data_dir)
    assert not (data_dir / data.CIFAR_FOLDER).exists() and hidden_leftovers(data_dir) == []


def test_download_is_unpacked_and_checked_before_it_appears(tmp_path, monkeypatch):
    archive, _ = make_archive(tmp_path)

    def fake_download(dest):
        target = Path(dest) / data.CIFAR_ARCHIVE
        target.write_bytes(archive.read_bytes())
        return target

    monkeypatch.setattr(data, "download_cifar10_archive", fake_download)
    data_dir = tmp_path / "fresh" / "data"
    folder = data.prepare_cifar10(data_dir)
    assert folder == data_dir / data.CIFAR_FOLDER and len(data.read_cifar10(folder)[0]) == 100
    assert hidden_leftovers(data_dir) == []


@pytest.mark.parametrize("failure", [OSError("network is unreachable"), RuntimeError("File not found or corrupted.")])
def test_failed_download_leaves_nothing_and_says_where_to_put_the_archive(tmp_path, monkeypatch, failure):
    def broken_download(dest):
        (Path(dest) / data.CIFAR_ARCHIVE).write_bytes(b"partial")
        raise failure

    monkeypatch.setattr(data, "download_cifar10_archive", broken_download)
    with pytest.raises(files.UserError) as error:
        data.prepare_cifar10(tmp_path)
    message = str(error.value)
    assert "could not be downloaded" in message and f"put the official {data.CIFAR_ARCHIVE} into {tmp_path}" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(dest):
        (Path(dest) / data.CIFAR_ARCHIVE).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "download_cifar10_archive", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.prepare_cifar10(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_download_leaves_nothing(tmp_path, monkeypatch):
    archive, _ = make_archive(tmp_path / "src")

    def corrupted(dest):
        target = Path(dest) / data.CIFAR_ARCHIVE
        target.write_bytes(archive.read_bytes()[:2000])
        return target

    monkeypatch.setattr(data, "download_cifar10_archive", corrupted)
    data_dir = tmp_path / "data"
    with pytest.raises(files.UserError, match="cannot unpack"):
        data.prepare_cifar10(data_dir)
    assert not data_dir.exists()  # the folder it made for the download goes too


def test_another_process_finishing_first_is_no_crash(tmp_path, monkeypatch):
    # Two processes unpack into the same --data-dir; the other one renames its folder into place
    # while this one is still unpacking. This one must then use that folder, not crash on its rename.
    data_dir = data_dir_with_archive(tmp_path, monkeypatch)
    extract = data.extract_cifar_archive

    def extract_while_another_process_finishes(archive, dest):
        extract(archive, dest)
        write_cifar_folder(data_dir, per_batch=30, seed=1)  # the other process's complete folder

    monkeypatch.setattr(data, "extract_cifar_archive", extract_while_another_process_finishes)
    folder = data.prepare_cifar10(data_dir)
    assert folder == data_dir / data.CIFAR_FOLDER
    assert len(data.read_cifar10(folder)[1]) == 150  # the other process's, intact
    assert hidden_leftovers(data_dir) == []


def test_archive_cannot_write_outside_its_folder(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in (f"{data.CIFAR_FOLDER}/../escaped.txt", "elsewhere.txt", f"{data.CIFAR_FOLDER}/ok.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    dest = tmp_path / "dest"
    dest.mkdir()
    data.extract_cifar_archive(archive, dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
        data.CIFAR_FOLDER,
        f"{data.CIFAR_FOLDER}/ok.txt",
    ]
    assert not (tmp_path / "escaped.txt").exists()


# ----- synthetic task and splits -----


def test_synthetic_task_is_a_function_of_the_seed():
    a, b, c = data.synthetic_dataset(1), data.synthetic_dataset(1), data.synthetic_dataset(2)
    assert a.train_x.shape == (2048, 3, 32, 32) and a.train_x.dtype == np.uint8 and a.test_x.shape == (256, 3, 32, 32)
    assert set(np.unique(a.train_y)) == set(range(10))
    np.testing.assert_array_equal(a.train_x, b.train_x)
    assert not np.array_equal(a.train_x, c.train_x)


def test_subset_is_a_prefix_of_one_fixed_permutation():
    train_small, _ = data.split_indices(1000, 100, 0)
    train_big, _ = data.split_indices(1000, 300, 0)
    np.testing.assert_array_equal(train_big[:100], train_small)
    assert len(set(train_big)) == 300


@pytest.mark.parametrize("subset, val_size", [(0, 0), (100, 50), (0, 200), (800, 200), (1, 999)])
def test_validation_split_never_overlaps_training_images(subset, val_size):
    train, val = data.split_indices(1000, subset, val_size)
    assert len(val) == val_size and len(train) == (subset or 1000 - val_size)
    assert not set(train) & set(val)
    assert set(train) | set(val) <= set(range(1000))


@pytest.mark.parametrize("subset, val_size", [(1001, 0), (900, 200), (0, 1000)])
def test_split_refuses_more_images_than_exist(subset, val_size):
    with pytest.raises(files.UserError, match="training images available"):
        data.split_indices(1000, subset, val_size)


# ----- the device-resident loader -----


def small_split(n=300):
    dataset = data.synthetic_dataset(0)
    return loader.DeviceSplit(dataset.train_x[:n], dataset.train_y[:n], torch.device("cpu"))


def epoch_batches(split, seed, epoch, batch_size=64):
    return [(x.clone(), y.clone()) for x, y in split.train_batches(batch_size, seed, epoch)]


def test_batches_depend_on_seed_and_epoch_only():
    split = small_split()
    first = epoch_batches(split, seed=5, epoch=3)
    torch.manual_seed(123)
    torch.rand(1000)  # other consumers of randomness do not matter
    np.random.seed(9)
    again = epoch_batches(split, seed=5, epoch=3)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other_epoch = epoch_batches(split, seed=5, epoch=4)
    other_seed = epoch_batches(split, seed=6, epoch=3)
    assert not torch.equal(first[0][1], other_epoch[0][1]) and not torch.equal(first[0][1], other_seed[0][1])


def test_every_image_once_per_epoch_last_batch_smaller():
    split = small_split(300)
    batches = epoch_batches(split, seed=1, epoch=0)
    assert [len(y) for _, y in batches] == [64, 64, 64, 64, 44]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(split.labels.tolist())
    x = batches[0][0]
    assert x.dtype == torch.float32 and x.shape == (64, 3, 32, 32)


def test_crop_and_flip_match_a_per_image_reference():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(1, 256, size=(40, 3, 32, 32), dtype=np.uint8))
    shifts = torch.from_numpy(rng.integers(0, 9, size=(40, 2)))
    flips = torch.from_numpy(rng.random(40) < 0.5)
    out = loader.crop_and_flip(images, shifts, flips)
    for i in range(40):
        padded = np.pad(images[i].numpy(), ((0, 0), (4, 4), (4, 4)))  # zeros
        dy, dx = shifts[i].tolist()
        crop = padded[:, dy : dy + 32, dx : dx + 32]
        if flips[i]:
            crop = crop[:, :, ::-1]
        np.testing.assert_array_equal(out[i].numpy(), crop)
    assert (out == 0).any()  # some crops reach into the zero padding


def test_normalization_uses_cifar_statistics():
    split = loader.DeviceSplit(np.full((2, 3, 32, 32), 255, np.uint8), np.array([0, 1]), torch.device("cpu"))
    x, _ = next(split.eval_batches(10))
    expected = [(1 - m) / s for m, s in zip(loader.CIFAR_MEAN, loader.CIFAR_STD, strict=True)]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_eval_batches_cover_the_split_in_order():
    split = small_split(250)
    labels = torch.cat([y for _, y in split.eval_batches(100)])
    assert torch.equal(labels, split.labels)


# ----- network -----


def test_parameter_count_at_width_32():
    assert sum(p.numel() for p in model.CifarResNet(32).parameters()) == 696_618


def test_network_shape_and_identical_initial_weights():
    a = model.build_model(8, 3, torch.device("cpu"))
    b = model.build_model(8, 3, torch.device("cpu"))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert a(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_memory_format_avoids_the_narrow_channels_last_cpu_kernel():
    assert model.memory_format_for(torch.device("cpu"), 8) == torch.contiguous_format
    assert model.memory_format_for(torch.device("cpu"), 32) == torch.channels_last
    assert model.memory_format_for(torch.device("cuda"), 8) == torch.channels_last
