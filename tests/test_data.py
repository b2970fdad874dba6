"""leanconv.data: the CIFAR reader on generated folders and archives (good,
missing, truncated, corrupt, mismatched), download with checksum from a local
HTTP server, the embedded set, augmentation and the deterministic loader."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch

from leanconv.data import (
    BatchLoader, ChecksumError, CifarFormatError, download, load_dataset, normalize, random_crop_flip, read_cifar,
    resize, sample_crop_flip,
)
from leanconv.data.loader import plan_epoch

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from more threads, and on a shared machine lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(n: int, seed: int, label_key: str = "labels", num_classes: int = 10) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"generated", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key.encode(): rng.integers(0, num_classes, n).tolist()}


def write_cifar10(folder: str, per_batch: int = 6, test: int = 5, *, train: bool = True) -> str:
    """A CIFAR-10 python folder of random images; returns cifar-10-batches-py's path."""
    root = os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(root, exist_ok=True)
    files = {"batches.meta": {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch},
             "test_batch": _batch(test, 99)}
    if train:
        files.update({f"data_batch_{i}": _batch(per_batch, i) for i in range(1, 6)})
    for name, content in files.items():
        with open(os.path.join(root, name), "wb") as handle:
            pickle.dump(content, handle, protocol=2)
    return root


def write_cifar100(folder: str) -> str:
    root = os.path.join(folder, "cifar-100-python")
    os.makedirs(root)
    files = {"meta": {b"fine_label_names": [f"c{i}".encode() for i in range(100)]},
             "train": _batch(7, 1, "fine_labels", 100), "test": _batch(3, 2, "fine_labels", 100)}
    for name, content in files.items():
        with open(os.path.join(root, name), "wb") as handle:
            pickle.dump(content, handle)
    return root


def make_archive(folder: str, path: str) -> str:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=os.path.basename(folder))
    return path


# --- the reader ---------------------------------------------------------------------------------------------


def test_folder_and_archive_read_the_same(tmp_path):
    root = write_cifar10(str(tmp_path / "src"))
    archive = make_archive(root, str(tmp_path / "cifar-10-python.tar.gz"))
    for split, n in (("train", 30), ("test", 5)):
        from_folder = read_cifar(root, split)
        from_parent = read_cifar(str(tmp_path / "src"), split)
        from_archive = read_cifar(archive, split)
        assert from_folder[0].shape == (n, 3, 32, 32) and from_folder[0].dtype == torch.uint8
        assert from_folder[1].dtype == torch.int64 and from_folder[2] == CLASSES
        for other in (from_parent, from_archive):
            assert torch.equal(other[0], from_folder[0]) and torch.equal(other[1], from_folder[1])
    # Row layout: 1024 R, 1024 G, 1024 B, each row-major.
    with open(os.path.join(root, "test_batch"), "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")[b"data"]
    images = read_cifar(root, "test")[0]
    assert images[2, 1, 3, 5].item() == raw[2, 1024 + 3 * 32 + 5]


def test_test_split_needs_only_test_batch_and_meta(tmp_path):
    root = write_cifar10(str(tmp_path), train=False)
    images, labels, _ = read_cifar(root, "test")
    assert images.shape[0] == labels.shape[0] == 5
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        read_cifar(root, "train")


def test_cifar100_folder(tmp_path):
    write_cifar100(str(tmp_path))
    data = load_dataset(str(tmp_path), "train")
    assert data.name == "cifar100" and data.num_classes == 100 and len(data) == 7


@pytest.mark.parametrize("damage, message", [
    ("truncate", "data_batch_3: not a complete CIFAR pickle"),
    ("garbage", "data_batch_3: not a complete CIFAR pickle"),
    ("not_a_dict", "data_batch_3: expected a pickled dict"),
    ("no_labels", "data_batch_3: key b'labels' missing"),
    ("label_mismatch", "data_batch_3: 6 images but 5 labels"),
    ("bad_shape", r"data_batch_3: 'data' must be an array of shape \(N, 3072\)"),
    ("bad_dtype", "data_batch_3: 'data' must hold uint8"),
    ("label_range", r"data_batch_3: labels must lie in 0..9"),
    ("missing", "missing CIFAR file .*data_batch_3"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_broken_batch_named_in_error(tmp_path, damage, message):
    root = write_cifar10(str(tmp_path))
    path = os.path.join(root, "data_batch_3")
    good = _batch(6, 3)
    content = {
        "not_a_dict": [1, 2, 3],
        "no_labels": {b"data": good[b"data"]},
        "label_mismatch": {**good, b"labels": good[b"labels"][:5]},
        "bad_shape": {**good, b"data": good[b"data"][:, :100]},
        "bad_dtype": {**good, b"data": good[b"data"].astype(np.float32)},
        "label_range": {**good, b"labels": [0, 1, 2, 3, 4, 10]},
    }.get(damage)
    if content is not None:
        with open(path, "wb") as handle:
            pickle.dump(content, handle)
    elif damage == "truncate":
        with open(path, "rb") as handle:
            raw = handle.read()
        with open(path, "wb") as handle:
            handle.write(raw[: len(raw) // 2])
    elif damage == "garbage":
        with open(path, "wb") as handle:
            handle.write(b"\x00not a pickle at all" * 10)
    elif damage == "missing":
        os.unlink(path)
    error = FileNotFoundError if damage == "missing" else CifarFormatError
    with pytest.raises(error, match=message):
        read_cifar(root, "train")
    # The test split does not read the broken file.
    assert read_cifar(root, "test")[0].shape[0] == 5


def test_missing_folder_meta_and_truncated_archive(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_cifar(str(tmp_path / "nowhere"), "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no CIFAR meta file"):
        read_cifar(str(tmp_path / "empty"), "test")
    root = write_cifar10(str(tmp_path / "src"))
    os.unlink(os.path.join(root, "batches.meta"))
    with pytest.raises(FileNotFoundError, match="batches.meta"):
        read_cifar(root, "test")
    root = write_cifar10(str(tmp_path / "src2"))
    archive = make_archive(root, str(tmp_path / "cut.tar.gz"))
    with open(archive, "rb") as handle:
        raw = handle.read()
    with open(archive, "wb") as handle:
        handle.write(raw[: len(raw) * 2 // 3])
    with pytest.raises(CifarFormatError, match="cut.tar.gz"):
        read_cifar(archive, "test")


def test_shared_subset_reads_when_present():
    subset = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10-subset")
    if not os.path.isdir(subset):
        pytest.skip("../shared/data/cifar10-subset not present")
    data = load_dataset(subset, "test")
    assert len(data) == 850 and data.classes[0] == "airplane"


def test_embedded_set():
    train, test = load_dataset("embedded", "train"), load_dataset("embedded", "test")
    assert train.images.shape == (1000, 3, 32, 32) and test.images.shape == (500, 3, 32, 32)
    assert train.labels.bincount().tolist() == [100] * 10 and test.labels.bincount().tolist() == [50] * 10
    assert train.classes == CLASSES and train.images.dtype == torch.uint8
    # Real images, not noise: neighbouring pixels are strongly correlated.
    x = train.images.float()
    assert torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1] > 0.8
    import leanconv.data.datasets as datasets

    assert os.path.getsize(datasets.EMBEDDED_PATH) < 4_000_000


# --- download ----------------------------------------------------------------------------------------------


@pytest.fixture
def http_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checksum_and_atomic_rename(tmp_path, http_server):
    served, url = http_server
    archive = make_archive(write_cifar10(str(tmp_path / "src")), str(served / "cifar-10-python.tar.gz"))
    with open(archive, "rb") as handle:
        digest = hashlib.md5(handle.read()).hexdigest()
    destination = str(tmp_path / "data" / "cifar-10-python.tar.gz")
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        download(f"{url}/cifar-10-python.tar.gz", destination, "md5:" + "0" * 32)
    assert os.listdir(tmp_path / "data") == []  # nothing half-written left behind
    assert download(f"{url}/cifar-10-python.tar.gz", destination, "md5:" + digest) == destination
    assert load_dataset(destination, "test").images.shape == (5, 3, 32, 32)
    with pytest.raises(OSError):
        download(f"{url}/absent.tar.gz", str(tmp_path / "data" / "absent.tar.gz"), None)
    assert sorted(os.listdir(tmp_path / "data")) == ["cifar-10-python.tar.gz"]


# --- augmentation and loader -------------------------------------------------------------------------------


def test_crop_flip_against_a_per_image_reference():
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (9, 3, 32, 32), dtype=torch.uint8, generator=generator)
    offsets, flips = sample_crop_flip(9, generator)
    out = random_crop_flip(images, offsets, flips)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for b in range(9):
        r, c = offsets[b].tolist()
        expected = padded[b, :, r:r + 32, c:c + 32]
        assert torch.equal(out[b], expected.flip(-1) if flips[b] else expected)
    assert torch.equal(random_crop_flip(images.float(), offsets, flips), out.float())
    assert random_crop_flip(images[:0], offsets[:0], flips[:0]).shape == (0, 3, 32, 32)
    normalised = normalize(images, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(normalised, (images.float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_loader_depends_only_on_seed_and_epoch():
    data = load_dataset("embedded", "test")

    def epoch(seed, number, **kwargs):
        loader = BatchLoader(data, 64, shuffle=True, augment=True, seed=seed, drop_last=True, **kwargs)
        loader.set_epoch(number)
        return [x for x, _ in loader]

    first = epoch(0, 3)
    assert len(first) == 7 and first[0].shape == (64, 3, 32, 32) and first[0].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(0, 3, workers=2)))
    assert not torch.equal(first[0], epoch(0, 4)[0]) and not torch.equal(first[0], epoch(1, 3)[0])
    # Two ranks with half the batch see, together, exactly one process's global batch.
    assert torch.equal(first[0][0::2], _first(data, 32, rank=0))
    assert torch.equal(first[0][1::2], _first(data, 32, rank=1))
    assert len(epoch(0, 3, rank=1, world_size=2)) == 3  # 500 // (64 * 2) whole global batches
    plan = plan_epoch(10, 0, 0, shuffle=False, augment=False)
    assert plan.order.tolist() == list(range(10)) and not plan.flips.any()


def _first(data, batch, rank):
    loader = BatchLoader(data, batch, shuffle=True, augment=True, seed=0, drop_last=True, rank=rank, world_size=2)
    loader.set_epoch(3)
    return next(iter(loader))[0]


def test_eval_loader_covers_every_image_once_across_ranks():
    data = load_dataset("embedded", "test")
    seen = []
    for rank in range(3):
        loader = BatchLoader(data, 64, rank=rank, world_size=3)
        seen += [y for _, y in loader]
    assert sum(len(y) for y in seen) == 500
    assert torch.equal(torch.cat(seen).sort().values, data.labels.sort().values)


def test_loader_resizes_after_crop_and_flip():
    """image_size: every batch is the stored batch (same crops and flips) resized bilinearly;
    a constant image stays constant, and sizes are checked by name."""
    data = load_dataset("embedded", "test")
    plain = BatchLoader(data, 32, shuffle=True, augment=True, seed=0, drop_last=True)
    large = BatchLoader(data, 32, shuffle=True, augment=True, seed=0, drop_last=True, image_size=48)
    small = BatchLoader(data, 32, image_size=16)
    (x, y), (x48, y48) = next(iter(plain)), next(iter(large))
    assert x48.shape == (32, 3, 48, 48) and torch.equal(y, y48)
    reference = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    assert torch.allclose(x48, reference, atol=1e-6)
    assert next(iter(small))[0].shape == (32, 3, 16, 16)
    constant = torch.full((2, 3, 32, 32), 0.25)
    assert torch.allclose(resize(constant, 224), torch.full((2, 3, 224, 224), 0.25))
    assert resize(constant, 32) is constant
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"image_size must be None or an integer >= 1, got {bad!r}"):
            BatchLoader(data, 8, image_size=bad)
