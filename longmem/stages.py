"""What the demo and the recipes share: presets read as data, a stage that is cached once done, and a stage command
that dies with its parent.

A preset (``configs/*.sh``) holds ``KEY=VALUE`` lines and comments only, so that bash can ``source`` it (the
training scripts do) and Python can read it (here). A preset that changes another names it: ``PARENT=file.sh``
(a path beside it); its lines are read first and the child's win.
"""
import logging
import os
import subprocess
import sys
import time

from longmem.errors import CommandFailed, ConfigError
from longmem.utils.processes import die_with_parent

logger = logging.getLogger("longmem.stages")


def read_preset(path: str, _seen=()) -> dict:
    """KEY=VALUE lines of a ``configs/*.sh`` preset (comments and blank lines ignored), its PARENT's first."""
    if not os.path.isfile(path):
        raise ConfigError(f"preset {path} does not exist (see configs/)")
    if os.path.realpath(path) in _seen:
        raise ConfigError(f"preset {path}: PARENT lines form a cycle ({' -> '.join(_seen)})")
    own = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if "=" not in line or not line.split("=", 1)[0].strip().isidentifier():
                raise ConfigError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
            key, value = line.split("=", 1)
            own[key.strip()] = value.strip().strip("'\"")
    preset = {}
    if "PARENT" in own:
        parent = os.path.join(os.path.dirname(os.path.abspath(path)), own["PARENT"])
        preset.update(read_preset(parent, (*_seen, os.path.realpath(path))))
    preset.update(own)
    return preset


def run(cmd, env=None, capture=False):
    """Run a stage's command with library deprecation warnings silenced, as a child that Linux stops when this
    process dies (``kill -9`` included); returns its output when ``capture`` (otherwise it goes straight to the
    terminal, progress bars included). A command that fails is a CommandFailed naming it."""
    env = dict(os.environ if env is None else env, PYTHONWARNINGS="ignore")
    logger.info("$ %s", " ".join(map(str, cmd)))
    proc = subprocess.run(list(map(str, cmd)), env=env, text=True, capture_output=capture,
                          preexec_fn=die_with_parent)  # a killed demo or recipe leaves no trainer writing
    if proc.returncode != 0:
        if capture:
            sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise CommandFailed(f"stage command failed with exit code {proc.returncode}: {' '.join(map(str, cmd))}")
    return (proc.stdout + proc.stderr) if capture else None


class Stage:
    """``with Stage(name, done_marker) as st: if not st.cached: ...``: skipped when its marker exists, timed."""

    def __init__(self, name, done_marker, log=logger):
        self.name, self.done_marker, self.log = name, done_marker, log

    def __enter__(self):
        self.start = time.time()
        self.cached = os.path.exists(self.done_marker)
        if self.cached:
            self.log.info("[%s] cached (%s)", self.name, self.done_marker)
        else:
            self.log.info("[%s] running", self.name)
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None and not self.cached:
            self.log.info("[%s] done in %.0f s", self.name, time.time() - self.start)
