"""What the demo and the recipes share: presets read as data, a stage that is cached once done, and a stage command
that dies with its parent.

A preset (``configs/*.sh``) holds ``KEY=VALUE`` lines and comments only, so that bash can ``source`` it (the
training scripts do) and Python can read it (here). A preset that changes another names it: ``PARENT=file.sh``
(a path beside it); its lines are read first and the child's win.
"""
import json
import logging
import os
import subprocess
import sys
import time

from longmem.errors import CommandFailed, ConfigError
from longmem.utils.atomic import atomic_open
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


class Pipeline:
    """The stages of one run into ``out``, in order. A stage counts as done only when it finished: its stamp
    ``out/.stages/<name>.json`` is written last, and records the settings it was built with and those of every
    stage before it. A stage whose stamp records other settings is refused in one line (its outputs would be
    reused silently otherwise); a stage with no stamp runs, from whatever a killed run left.

        pipe = Pipeline(out)
        with pipe.stage("bpe", vocab_size=8000) as st:
            if not st.cached:
                ...
    """

    def __init__(self, out: str, log=logger):
        self.out, self.log = out, log
        self.settings = {}  # stage name -> its settings, for the stages met so far

    def stage(self, name: str, **settings) -> "Stage":
        self.settings[name] = json.loads(json.dumps(settings, sort_keys=True, default=str))
        return Stage(self, name, dict(self.settings))

    def stamp(self, name: str) -> str:
        return os.path.join(self.out, ".stages", f"{name}.json")


class Stage:
    """One stage of a :class:`Pipeline`: ``cached`` when its stamp holds the same settings; timed."""

    def __init__(self, pipeline: Pipeline, name: str, settings: dict):
        self.pipeline, self.name, self.settings = pipeline, name, settings
        self.log = pipeline.log

    def __enter__(self):
        self.start = time.time()
        stamp = self.pipeline.stamp(self.name)
        self.cached = os.path.isfile(stamp)
        if self.cached:
            with open(stamp, encoding="utf-8") as f:
                built = json.load(f)
            if built != self.settings:
                raise ConfigError(f"stage {self.name} in {self.pipeline.out} was built with other settings "
                                  f"({differences(built, self.settings)}): run with the same, use another output "
                                  f"folder, or delete {stamp} and the stamps of the stages after it to rebuild them")
            self.log.info("[%s] cached (%s)", self.name, stamp)
        else:
            self.log.info("[%s] running", self.name)
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None and not self.cached:
            os.makedirs(os.path.dirname(self.pipeline.stamp(self.name)), exist_ok=True)
            with atomic_open(self.pipeline.stamp(self.name)) as f:
                json.dump(self.settings, f, indent=1, sort_keys=True)
            self.log.info("[%s] done in %.0f s", self.name, time.time() - self.start)


def differences(built: dict, wanted: dict, most: int = 3) -> str:
    """``stage.key: then -> now`` for up to ``most`` settings that differ between two stamps."""
    found = []
    for stage in list(dict.fromkeys([*built, *wanted])):
        then, now = built.get(stage, {}), wanted.get(stage, {})
        for key in sorted(set(then) | set(now)):
            if then.get(key) != now.get(key):
                found.append(f"{stage}.{key}: {then.get(key, '(none)')} -> {now.get(key, '(none)')}")
    more = f" and {len(found) - most} more" if len(found) > most else ""
    return "; ".join(found[:most]) + more


def shakespeare_corpus(pipe: Pipeline) -> str:
    """Stage corpus of the demo and the SmolLM2 recipe: the Shakespeare plays (``longmem-build-shakespeare``) in
    ``OUT/corpus``; returns that folder."""
    corpus = os.path.join(pipe.out, "corpus")
    with pipe.stage("corpus") as st:
        if not st.cached:
            run([sys.executable, "-m", "longmem.commands.build_shakespeare_corpus", "--out", corpus])
    return corpus
