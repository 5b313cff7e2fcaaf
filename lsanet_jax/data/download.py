"""Checksum-verified download of MedMNIST npz files from the official Zenodo record.

The URL template is configurable (mirrors, a local file:// folder, a test server). The file is
streamed into a temporary file next to its destination, its MD5 is checked against the official
table (data.medmnist.INFO), and only then is it renamed into place, so an interrupted or corrupted
download never leaves a file that looks valid.
"""
from __future__ import annotations

import hashlib
import pathlib
import urllib.error
import urllib.request

from runkit.metrics_log import atomic_write

from lsanet_jax.data.medmnist import DEFAULT_ROOT, INFO, MedMNISTError, check_flag, npz_filename

ZENODO_URL_TEMPLATE = "https://zenodo.org/records/10519652/files/{filename}?download=1"


class DownloadError(MedMNISTError):
  """The download failed or the file's checksum does not match."""


def file_md5(path, chunk_size: int = 1 << 20) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(chunk_size), b""):
      digest.update(chunk)
  return digest.hexdigest()


def download_medmnist(flag: str, root=DEFAULT_ROOT, size: int = 28, *,
                      url_template: str = ZENODO_URL_TEMPLATE, md5: str | None = None,
                      overwrite: bool = False, timeout: float = 60.0) -> pathlib.Path:
  """Downloads `{flag}.npz` / `{flag}_{size}.npz` into root and verifies its MD5.

  url_template: a URL with a `{filename}` placeholder. md5: overrides the official checksum (for
  mirrors of other versions and for tests). An existing file with the right checksum is kept."""
  info = check_flag(flag)
  if info.get("builtin"):
    raise DownloadError(f"{flag!r} is built in (made from scikit-learn's digits); nothing to download")
  filename = npz_filename(flag, size)
  expected = md5 or INFO[flag]["md5"].get(size)
  if not expected:
    raise DownloadError(f"no official checksum known for {filename}; pass md5= to download it anyway")
  if "{filename}" not in url_template:
    raise DownloadError(f"url template {url_template!r} has no {{filename}} placeholder")
  root = pathlib.Path(root).expanduser()
  root.mkdir(parents=True, exist_ok=True)
  dest = root / filename
  if dest.exists() and not overwrite:
    if file_md5(dest) == expected:
      return dest
    raise DownloadError(f"{dest} exists but its MD5 is not the official {expected}; delete it "
                        "(or pass overwrite=True / --download-overwrite) to download it again")
  url = url_template.format(filename=filename)
  # Written beside dest and renamed into place only when the checksum matches (a mismatch raises
  # inside the block, which removes the partial file).
  with atomic_write(dest, "wb") as out:
    digest = hashlib.md5()
    try:
      with urllib.request.urlopen(url, timeout=timeout) as response:
        for chunk in iter(lambda: response.read(1 << 20), b""):
          digest.update(chunk)
          out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
      raise DownloadError(f"could not download {url} ({e}); check the network or pass another "
                          f"url template (a mirror or file:// folder holding {filename})") from e
    got = digest.hexdigest()
    if got != expected:
      raise DownloadError(f"{url} has MD5 {got}, expected {expected}; the download is corrupted or "
                          "not the official file: nothing was written, try again or use another mirror")
  return dest
