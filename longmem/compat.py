"""Small adjustments that let stock fairseq 0.12 run on today's numpy and torch.

Applied once when ``longmem`` is imported (``--user-dir longmem`` imports it before any data or
checkpoint is loaded).
"""
import argparse
import logging
import os
import sys
import types

import numpy as np
import torch


def apply() -> None:
    # fairseq's TokenBlockDataset(break_mode="eos") -- used by the hub interface and interactive
    # generation -- asks for np.compat.long, which numpy 2 removed. It means int64.
    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=np.int64)
    # torch >= 2.6 loads checkpoints with weights_only=True; legacy fairseq checkpoints (the released
    # LongMem ones included) keep their config as an argparse.Namespace.
    torch.serialization.add_safe_globals([argparse.Namespace])
    _cpu_fallbacks()
    _trusted_broadcasts()
    _one_line_config_errors()
    _parameter_groups()
    _resume_from_an_intact_checkpoint()
    _one_run_per_save_dir()
    _checkpoints_survive_a_full_disk()


def _resume_from_an_intact_checkpoint() -> None:
    """fairseq copies checkpoint_last.pt non-atomically: a run killed during the copy leaves it truncated, and
    the next resume ended in a traceback while an intact checkpoint_*.pt sat beside it. Resume from the newest
    intact one instead, said in one line, or refuse in one line when there is none."""
    import importlib.util

    if importlib.util.find_spec("fairseq") is None:
        return
    from fairseq import checkpoint_utils

    if getattr(checkpoint_utils.load_checkpoint, "_longmem", False):
        return
    load = checkpoint_utils.load_checkpoint

    def load_checkpoint(cfg, trainer, **kwargs):
        from omegaconf import open_dict

        from longmem.errors import ConfigError
        from longmem.utils.checkpoints import intact_fallback, model_settings_that_differ

        if cfg.restore_file == "checkpoint_last.pt":
            fallback = intact_fallback(os.path.join(cfg.save_dir, f"checkpoint_last{trainer.checkpoint_suffix}.pt"))
            if fallback is not None:
                with open_dict(cfg):
                    cfg.restore_file = fallback
        try:
            return load(cfg, trainer, **kwargs)
        except Exception as e:  # fairseq's own words for a model that does not fit the checkpoint's weights
            if "Cannot load model parameters from checkpoint" not in str(e):
                raise
            path = str(e).split("checkpoint ", 1)[1].split(";", 1)[0]
            raise ConfigError(f"resume: {path} holds another model than this run builds "
                              f"({model_settings_that_differ(path, trainer.cfg.model)}): resume with the model flags it "
                              f"was trained with, or use a new --save-dir") from None

    load_checkpoint._longmem = True
    checkpoint_utils.load_checkpoint = load_checkpoint


def _one_run_per_save_dir() -> None:
    """fairseq-train's master checks its --save-dir before any work (``verify_checkpoint_directory``): take the
    folder's lock there (``longmem/utils/save_lock.py``), so a second run into it refuses in one line."""
    import importlib.util

    if importlib.util.find_spec("fairseq") is None:
        return
    from fairseq import checkpoint_utils

    if getattr(checkpoint_utils.verify_checkpoint_directory, "_longmem", False):
        return
    verify = checkpoint_utils.verify_checkpoint_directory

    def verify_checkpoint_directory(save_dir: str) -> None:
        from longmem.utils.save_lock import hold

        hold(save_dir)
        verify(save_dir)

    verify_checkpoint_directory._longmem = True
    checkpoint_utils.verify_checkpoint_directory = verify_checkpoint_directory


class _AtomicCopies:
    """fairseq's PathManager as ``checkpoint_utils`` sees it, except that ``copy`` (checkpoint_N.pt to
    checkpoint_last.pt) writes a temporary file beside the target and renames it over: a copy that fails halfway
    (a full disk, a kill) leaves the previous target whole. Remote paths (``scheme://``) go to fairseq's own."""

    def __init__(self, manager):
        self._manager = manager

    def __getattr__(self, name):
        return getattr(self._manager, name)

    def copy(self, src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        import shutil

        if "://" in src_path or "://" in dst_path or (not overwrite and os.path.exists(dst_path)):
            return self._manager.copy(src_path, dst_path, overwrite)
        tmp = dst_path + ".tmp"
        try:
            shutil.copyfile(src_path, tmp)
            os.replace(tmp, dst_path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return True


def _checkpoints_survive_a_full_disk() -> None:
    """A save-dir that fills up while saving: the checkpoints written before stay whole (fairseq writes a file
    to ``.tmp`` and renames it, and copies it to checkpoint_last.pt through :class:`_AtomicCopies`), the
    half-written ``.tmp`` files go, and training ends in one line (``no space left on DIR``), without fairseq's
    three retries and their traceback."""
    import errno
    import importlib.util

    if importlib.util.find_spec("fairseq") is None:
        return
    from fairseq import checkpoint_utils

    if getattr(checkpoint_utils.save_checkpoint, "_longmem", False):
        return
    from longmem.errors import ConfigError

    checkpoint_utils.PathManager = _AtomicCopies(checkpoint_utils.PathManager)
    save, persist = checkpoint_utils.save_checkpoint, checkpoint_utils._torch_persistent_save

    def persist_once_when_full(obj, f):
        if not isinstance(f, str):
            try:
                return torch.save(obj, f)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise
        return persist(obj, f)

    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        try:
            return save(cfg, trainer, epoch_itr, val_loss)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            for name in os.listdir(cfg.save_dir):
                if name.endswith(".tmp"):
                    os.remove(os.path.join(cfg.save_dir, name))
            raise ConfigError(f"no space left on {cfg.save_dir} while saving a checkpoint: the checkpoints saved "
                              f"before are whole (checkpoint_last.pt included); free space, then run the same "
                              f"command to resume") from None

    save_checkpoint._longmem = True
    checkpoint_utils.save_checkpoint = save_checkpoint
    checkpoint_utils._torch_persistent_save = persist_once_when_full


def _parameter_groups() -> None:
    """fairseq's optimizers get one flat list of parameters: the gate options need groups of their own
    (longmem/optim_groups.py; a no-op for models that ask for none)."""
    import importlib.util

    if importlib.util.find_spec("fairseq") is None:
        return
    from longmem import optim_groups

    optim_groups.install()


def _one_line_config_errors() -> None:
    """Under a fairseq command line, a ``ConfigError`` (a setting that cannot work) ends the process with
    ``program: error: message`` and exit code 2, like argparse, not a traceback: fairseq's ``call_main`` (every
    ``fairseq_cli`` program runs its main through it) turns it into ``sys.exit(2)``, a normal exit (``finally``
    blocks, atexit, logs flushed). One raised before ``call_main`` (while fairseq reads the command line) gets the
    same line from ``sys.excepthook``, with Python's exit code for an uncaught exception (1)."""
    if not _fairseq_cli():
        return
    from fairseq.distributed import utils as dist_utils

    from longmem.errors import ConfigError

    def say(error) -> None:
        sys.stderr.write(f"{os.path.basename(sys.argv[0])}: error: {error}\n")
        sys.stderr.flush()

    if not getattr(dist_utils.call_main, "_longmem", False):
        call_main = dist_utils.call_main

        def call_main_one_line(cfg, main, **kwargs):
            try:
                return call_main(cfg, main, **kwargs)
            except ConfigError as e:
                say(e)
                sys.exit(2)

        call_main_one_line._longmem = True
        dist_utils.call_main = call_main_one_line
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, ConfigError):
            return say(value)
        previous(kind, value, tb)

    sys.excepthook = hook


def _fairseq_cli() -> bool:
    program = sys.argv[0] if sys.argv else ""
    return os.path.basename(program).startswith("fairseq-") or "fairseq_cli" in program


def _trusted_broadcasts() -> None:
    """fairseq sends objects between ranks as torch.save bytes (e.g. the checkpoint state rank 0 read,
    when training resumes on several processes); torch >= 2.6 reads them with weights_only=True and
    refuses their omegaconf configs. The bytes come from rank 0 of the same job, so the receiving side
    reads them in full."""
    import importlib.util

    if importlib.util.find_spec("fairseq") is None:
        return
    import io

    from fairseq.distributed import utils as dist_utils

    def broadcast_object_slow(obj, src_rank, group, dist_device):
        if dist_utils.get_rank(group) == src_rank:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = torch.ByteTensor(buffer.getbuffer()).to(dist_device)
            dist_utils.broadcast(torch.LongTensor([len(data)]).to(dist_device), src=src_rank, group=group)
            dist_utils.broadcast(data, src=src_rank, group=group)
            return obj
        length = torch.LongTensor([0]).to(dist_device)
        dist_utils.broadcast(length, src=src_rank, group=group)
        data = torch.ByteTensor(int(length.item())).to(dist_device)
        dist_utils.broadcast(data, src=src_rank, group=group)
        return torch.load(io.BytesIO(data.cpu().numpy()), map_location="cpu", weights_only=False)

    dist_utils._broadcast_object_slow = broadcast_object_slow


HALF_PRECISION_FLAGS = ("--fp16", "--memory-efficient-fp16", "--amp")


def _cpu_fallbacks() -> None:
    """A fairseq command line with --fp16 (or --memory-efficient-fp16, --amp) on a machine without a CUDA
    GPU: fairseq would fail deep inside with a CUDA traceback. The flag is dropped before fairseq parses
    the command line (``--user-dir`` is imported first), with one line saying so: training runs in fp32."""
    if not _fairseq_cli() or torch.cuda.is_available():
        return
    dropped = [flag for flag in HALF_PRECISION_FLAGS if flag in sys.argv[1:]]
    if dropped:
        sys.argv[1:] = [a for a in sys.argv[1:] if a not in HALF_PRECISION_FLAGS]
        logging.getLogger("longmem").warning(
            "%s needs a CUDA GPU and torch.cuda.is_available() is False here: ignored, running in fp32 on the CPU",
            " ".join(dropped))
