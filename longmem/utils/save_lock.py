"""One training run per ``--save-dir``: a lock held for the run's life (docs/design.md, "Invariants").

Two ``fairseq-train`` runs into one folder both write ``checkpoint_1_N.pt`` and ``checkpoint_last.pt``, and the one
that finished first loses its result. The lock is an ``flock`` on ``SAVE_DIR/.longmem-train.lock``: the kernel
releases it when the holding process ends in any way (a crash, ``kill -9``), so a lock can never outlive its run.
The file records the holder's PID: a second run refuses in one line naming it; a run that finds the file of a
dead holder takes it over and says so.
"""
import fcntl
import logging
import os

from longmem.errors import ConfigError
from longmem.utils.processes import alive

logger = logging.getLogger(__name__)
LOCK_NAME = ".longmem-train.lock"
_held = {}  # save dir (real path) -> the open lock file, kept open for the life of the process


def hold(save_dir: str) -> None:
    """Take the lock of ``save_dir`` (created if missing) for the rest of this process, or raise a ConfigError
    naming the PID that holds it (or saying why the folder cannot be written: before any work)."""
    key = os.path.realpath(save_dir)
    if key in _held:
        return
    path = os.path.join(save_dir, LOCK_NAME)
    try:
        os.makedirs(save_dir, exist_ok=True)
        f = open(path, "a+", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--save-dir {save_dir} cannot be written ({e.strerror}): checkpoints could not be saved "
                          f"there; choose a writable folder") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(f"--save-dir {save_dir} is in use by another training run (PID {holder}, lock {path}): "
                          f"wait for it to end, stop it, or choose another --save-dir") from None
    f.seek(0)
    previous = f.read().strip()
    if previous.isdigit() and int(previous) != os.getpid():
        state = "no longer running" if not alive(int(previous)) else "running, but not holding it"
        logger.warning("--save-dir %s: took over the lock of PID %s (%s)", save_dir, previous, state)
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _held[key] = f
