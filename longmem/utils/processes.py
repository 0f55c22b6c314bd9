"""Child processes that do not outlive their parent, and a SIGTERM that is not lost while they start."""
import contextlib
import os
import signal
import sys

_stopped_by = []  # the SIGTERM the handler of exit_on_sigterm saw, if any


def die_with_parent() -> None:
    """In a child (a ``preexec_fn`` or a pool ``initializer``): ask Linux to send it SIGTERM when its parent
    dies, however it dies (``kill -9`` included: prctl PR_SET_PDEATHSIG), and let SIGTERM kill it (the default
    action, not a handler inherited from the parent). Elsewhere, nothing."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread: exec resets the handler anyway
        pass
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit(128 + 15) in the main thread, so that ``finally`` and ``except BaseException``
    blocks clean up (a staging folder) as for Ctrl-C. Use ``sigterm_not_lost`` around forks."""
    def handler(signum, frame):
        _stopped_by.append(signum)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def sigterm_not_lost():
    """Around a fork (a process pool starting its workers, a ``subprocess.Popen``): Python runs its at-fork hooks
    (logging's lock among them) in the parent and *ignores* an exception raised in one, so the SystemExit of a
    SIGTERM handled there is lost and the process goes on (seen under load: a stopped ``longmem-prepare-pile``
    ran to the end). The handler of ``exit_on_sigterm`` remembers the signal; this raises it again after the
    block."""
    yield
    if _stopped_by:
        sys.exit(128 + _stopped_by[0])


def alive(pid: int) -> bool:
    """Is a process of this PID running (someone's, even where this user may not signal it)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
