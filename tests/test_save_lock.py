"""One training run per --save-dir: a second run refuses in one line naming the holder; the lock ends with its
process however it ends; a dead holder's lock file is taken over with a line saying so."""
import logging
import os
import subprocess
import sys

import pytest

from longmem.errors import ConfigError
from longmem.utils import save_lock

HOLDER = ("import sys, time; from longmem.utils.save_lock import hold; hold(sys.argv[1]); "
          "print('held', flush=True); time.sleep(120)")


def start_holder(save_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(save_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_holder_and_the_lock_dies_with_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(save_lock, "_held", {})
    holder = start_holder(tmp_path / "ckpt")
    try:
        with pytest.raises(ConfigError, match=rf"in use by another training run \(PID {holder.pid},"):
            save_lock.hold(str(tmp_path / "ckpt"))
    finally:
        holder.kill()  # SIGKILL: no exit handler runs, the kernel releases the lock
        holder.wait()
    with caplog.at_level(logging.WARNING):
        save_lock.hold(str(tmp_path / "ckpt"))
    assert f"took over the lock of PID {holder.pid} (no longer running)" in caplog.text
    assert (tmp_path / "ckpt" / save_lock.LOCK_NAME).read_text() == str(os.getpid())
    save_lock.hold(str(tmp_path / "ckpt"))  # the same process again: already its own



def test_a_stage_command_of_the_demo_dies_with_the_demo_even_under_kill_9(tmp_path):
    """The demo runs each stage (fairseq-train among them, exec'd by its shell script) as a child that Linux
    stops when the demo dies: a demo killed with -9 leaves no trainer writing into its folders."""
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c", "import sys; from longmem.demo import run; "
                               f"run([sys.executable, '-c', {child!r}])"])
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the stage command outlived the demo")
