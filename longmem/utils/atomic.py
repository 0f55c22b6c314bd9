"""Write files so that a crash never leaves a half-written output behind."""
import contextlib
import os
import tempfile


def remove_orphans(directory: str, prefix: str) -> None:
    """Temporary files ``<prefix><pid>.<random>`` whose writer is gone (a ``kill -9`` mid-write): removed."""
    from longmem.utils.processes import alive

    for name in os.listdir(directory):
        pid = name[len(prefix):].split(".", 1)[0]
        if name.startswith(prefix) and pid.isdigit() and not alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
    """Open a temporary file beside ``path``; it replaces ``path`` only if the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = f"tmp-{os.path.basename(path)}."
    remove_orphans(directory, prefix)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}.", dir=directory)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would differ from a plain open()
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: name the one it was for
            raise OSError(e.errno, e.strerror, path) from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str):
    """A fresh staging folder beside ``path``, yielded to be filled; when the block succeeds it replaces
    ``path`` (the previous folder, if any, is moved aside first and removed only after the swap), and when the
    block fails (an error, SIGTERM turned into SystemExit, Ctrl-C) the staging folder goes and ``path`` is left
    as it was."""
    import shutil

    path = os.path.abspath(path)
    parent, name = os.path.dirname(path), os.path.basename(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=name + ".tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would differ from a plain makedirs()
    try:
        yield staging
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=name + ".old-", dir=parent)
            os.replace(path, os.path.join(old, "previous"))
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
