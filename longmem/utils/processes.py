"""Child processes that do not outlive their parent."""
import signal


def die_with_parent() -> None:
    """In a child (a ``preexec_fn`` or a pool ``initializer``): ask Linux to send it SIGTERM when its parent
    dies, however it dies (``kill -9`` included: prctl PR_SET_PDEATHSIG). Elsewhere, nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
