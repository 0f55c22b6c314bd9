"""argparse types shared by the scripts: a bad value is rejected where it enters, in one line."""
import argparse


def int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (``what`` names it in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer >= 0")


def can_write_in(folder: str) -> bool:
    """Can this process create a file in ``folder``? Tried (a nameless temporary file), not asked: access(2) can
    answer yes where a write fails."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _nearest_existing(path: str) -> str:
    import os

    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def output_file(text: str) -> str:
    """An argparse type: a file this process can write (it, or the nearest folder above it that exists, is
    writable; not a folder itself), checked before any work is done rather than after it."""
    import os

    path = os.path.abspath(text)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is a folder: give a file name")
    folder = _nearest_existing(os.path.dirname(path))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot create {text}: {folder} is a file, not a folder")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} exists and is not writable")
    if not can_write_in(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text}: the folder {folder} is not writable (read-only or "
                                         f"no permission)")
    return text


def output_folder(text: str) -> str:
    """An argparse type: a folder this process can make, or replace through a staging folder beside it (so the
    folder above it must be writable), checked before any work."""
    import os

    path = os.path.abspath(text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is a file: give a folder")
    parent = _nearest_existing(os.path.dirname(path))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot create {text}: {parent} is a file, not a folder")
    for folder in (parent, path) if os.path.isdir(path) else (parent,):
        if not can_write_in(folder):
            raise argparse.ArgumentTypeError(f"cannot write {text}: the folder {folder} is not writable (read-only "
                                             f"or no permission)")
    return text


output_folder.__name__ = "a writable folder"
output_file.__name__ = "a writable file path"


def input_file(text: str) -> str:
    """An argparse type: a file that exists and can be read, checked where it enters."""
    import os

    if os.path.isdir(existing_path(text)):
        raise argparse.ArgumentTypeError(f"{text} is a folder: give a file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable")
    return text


input_file.__name__ = "an existing file"


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


non_negative_float.__name__ = "a number >= 0"


def existing_path(text: str) -> str:
    """An argparse type: a file or folder that exists (a model given as a folder or as one file)."""
    import os

    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


existing_path.__name__ = "an existing path"


def exit_on_config_error(run, argv=None):
    """What a command's ``main(argv)`` does: ``run(argv)``, returning its exit status when it returns an int (an
    entry point exits with what main returns), where a ``ConfigError`` (a setting or input that cannot work) or a
    ``CommandFailed`` (a program it started failed) ends the program with ``prog: error: message`` and exit code
    2, as argparse ends, through the normal exit path (``finally`` blocks, atexit, logging flushed). A disk that
    fills up or turns read-only while an output is written ends it the same way, naming the file."""
    import errno
    import os
    import sys

    from longmem.errors import CommandFailed, ConfigError

    try:
        result = run(argv)
    except (ConfigError, CommandFailed) as e:
        sys.stderr.write(f"{os.path.basename(sys.argv[0]) or 'longmem'}: error: {e}\n")
        sys.exit(2)
    except OSError as e:  # a disk that fills up, or turns read-only, while writing: the outputs are written
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # atomically, so the previous ones are whole
            raise
        where = f" while writing {e.filename}" if e.filename else ""
        sys.stderr.write(f"{os.path.basename(sys.argv[0]) or 'longmem'}: error: {e.strerror}{where}: the files "
                         f"written before are whole; free space (or choose another place) and run it again\n")
        sys.exit(2)
    # an entry point exits with what main returns: a result (a dict of figures) would be printed and exit 1
    return result if isinstance(result, int) and not isinstance(result, bool) else None


def check_writable(parser: argparse.ArgumentParser, flag: str, path: str) -> None:
    """``output_file``'s check of ``path`` (a file the program will write under ``flag``'s value), ended by
    ``parser`` in one line naming the flag: for a flag that names a folder or a prefix, not the file itself."""
    try:
        output_file(path)
    except argparse.ArgumentTypeError as e:
        parser.error(f"{flag}: {e}")


def quiet_libraries() -> None:
    """A command's output is its own: library warnings off, library logging from WARNING up."""
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
