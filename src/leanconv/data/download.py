"""Download a CIFAR archive with checksum verification and an atomic rename.

The file is streamed through :func:`leanconv.files.write_atomic`: its digest is
checked before the temporary file is renamed to its final name, so an interrupted or
corrupted download never leaves a file that looks complete.

Example::

    path = download_cifar("cifar10", "~/data")   # ~/data/cifar-10-python.tar.gz
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from typing import Callable

from ..files import write_atomic

__all__ = ["OFFICIAL_ARCHIVES", "ChecksumError", "download", "download_cifar"]

# name -> (url, md5) as published on https://www.cs.toronto.edu/~kriz/cifar.html
OFFICIAL_ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "md5:eb9058c3a382ffc7106e4002c42a8d85"),
}


class ChecksumError(ValueError):
    """The downloaded bytes do not have the expected digest."""


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algorithm, _, digest = checksum.partition(":")
    if not digest or algorithm not in hashlib.algorithms_available:
        raise ValueError(f"checksum must look like 'md5:<hex>' or 'sha256:<hex>', got {checksum!r}")
    return algorithm, digest.lower()


def file_digest(path: str, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(
    url: str,
    destination: str,
    checksum: str | None,
    *,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> str:
    """Fetch ``url`` to the file ``destination`` and return its path.

    ``checksum``: "md5:<hex>" or "sha256:<hex>", or None to skip the check.
    An existing ``destination`` with the right digest is reused; one with the
    wrong digest is replaced. On a digest mismatch the temporary file is
    removed and :class:`ChecksumError` names the URL and both digests.
    """
    algorithm, expected = _parse_checksum(checksum) if checksum else (None, None)
    if os.path.isfile(destination) and (algorithm is None or file_digest(destination, algorithm) == expected):
        return destination

    def fetch(out) -> None:  # raising here leaves no file behind
        digest = hashlib.new(algorithm) if algorithm else None
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            done = 0
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                if digest:
                    digest.update(block)
                done += len(block)
                if progress:
                    progress(done, total)
        if total is not None and done != total:
            raise OSError(f"download of {url} ended after {done} of {total} bytes")
        if digest and digest.hexdigest() != expected:
            raise ChecksumError(
                f"checksum mismatch for {url}: expected {algorithm}:{expected}, got {algorithm}:{digest.hexdigest()}"
            )

    write_atomic(destination, fetch)
    return destination


def download_cifar(name: str, root: str, *, url: str | None = None, checksum: str | None = None, **kwargs) -> str:
    """Download the official CIFAR-10/100 python archive into ``root``.

    ``url``/``checksum`` override the official address (a mirror); the file
    keeps the official archive name.
    """
    if name not in OFFICIAL_ARCHIVES:
        raise ValueError(f"dataset must be one of {sorted(OFFICIAL_ARCHIVES)}, got {name!r}")
    official_url, official_checksum = OFFICIAL_ARCHIVES[name]
    destination = os.path.join(os.path.expanduser(root), os.path.basename(official_url))
    return download(url or official_url, destination, checksum or official_checksum, **kwargs)
