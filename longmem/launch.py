"""Start fairseq's own distributed training on N processes (and several nodes), on CPUs or GPUs.

    python -m longmem.launch --nproc 2 -- DATA --user-dir longmem --task longmem_language_modeling ...

* **CPU** (``--cpu`` among the training flags, or no CUDA GPU): ``nproc`` processes of
  ``fairseq_cli.train`` with ``--distributed-backend gloo --ddp-backend legacy_ddp``, each told its
  rank and the rendezvous ``tcp://MASTER_ADDR:MASTER_PORT`` (``--distributed-no-spawn``). torchrun's
  ``env://`` path does not work on CPU in fairseq 0.12 (it divides by the GPU count).
* **GPUs, one node**: one ``fairseq_cli.train`` with ``--distributed-world-size nproc``: fairseq spawns a
  process per GPU and uses NCCL.
* **GPUs, several nodes**: ``torchrun --nnodes --node_rank --master_addr --master_port
  --nproc_per_node`` on each node (fairseq reads torchrun's environment).

On a CPU run, every rank's output goes to the terminal, the non-zero ranks' with a ``[rank R]`` prefix
(fairseq keeps them quiet but for warnings and errors); the launcher waits for all ranks and, if one
fails, stops the others and exits with its code. The ranks die with the launcher: SIGTERM, SIGINT or SIGHUP
to it stops them (then it exits 128 + the signal), and on Linux each rank also gets SIGTERM from the kernel
when the launcher dies any other way (``kill -9``). A master port already taken on this machine is refused
before any rank starts.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from longmem.utils.cli import non_negative_int, positive_int
from longmem.utils.processes import die_with_parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(args, train_args, cuda: bool):
    """The processes to start on this node: a list of (rank or None, argv)."""
    world = args.nproc * args.nnodes
    python = [sys.executable, "-m", "fairseq_cli.train", *train_args]
    if not cuda:
        init = f"tcp://{args.master_addr}:{args.master_port}"
        return [(rank, python + ["--distributed-world-size", str(world), "--distributed-rank", str(rank),
                                 "--distributed-init-method", init, "--distributed-no-spawn",
                                 "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", "--device-id", "0"])
                for rank in range(args.node_rank * args.nproc, (args.node_rank + 1) * args.nproc)]
    if args.nnodes == 1:
        return [(None, python + ["--distributed-world-size", str(world)])]
    return [(None, [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(args.nnodes),
                     "--node_rank", str(args.node_rank), "--master_addr", args.master_addr,
                     "--master_port", str(args.master_port), "--nproc_per_node", str(args.nproc),
                     "-m", "fairseq_cli.train", *train_args, "--distributed-world-size", str(world)])]


def port_is_free(addr: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gloo's listener binds it
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


class _Stopped(Exception):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise _Stopped(signum)


def _relay(proc, rank, sink):
    for line in proc.stdout:
        sink.write(f"[rank {rank}] {line}" if rank else line)
        sink.flush()


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 (find a free one) to 65535."""
    port = non_negative_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0-65535), got {text}")
    return port


def parse_args(argv):
    """(launcher arguments, fairseq-train's arguments), checked; a free port found when none is given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [--nproc N ...] -- FAIRSEQ_TRAIN_ARGS...")
    p.add_argument("--nproc", type=positive_int, default=1, help="processes on this node (one per GPU on GPUs)")
    p.add_argument("--nnodes", type=positive_int, default=1)
    p.add_argument("--node-rank", type=non_negative_int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1", help="the address of node 0")
    p.add_argument("--master-port", type=port_number, default=0, help="a free port on node 0 (default: one found here; "
                                                             "give one explicitly with several nodes)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, start nothing")
    if "--" not in argv:
        p.parse_args(argv)  # --help answers; anything else lacks the fairseq-train arguments
        p.error("give fairseq-train's arguments after --")
    cut = argv.index("--")
    args = p.parse_args(argv[:cut])
    if not 0 <= args.node_rank < args.nnodes:
        p.error(f"--node-rank {args.node_rank} must be in [0, {args.nnodes - 1}]")
    if args.nnodes > 1 and not args.master_port:
        p.error("several nodes need --master-port (the same free port of node 0 on every node)")
    local = args.node_rank == 0 and args.master_addr in ("127.0.0.1", "localhost", "0.0.0.0")
    if args.master_port and local and not args.dry_run and not port_is_free(args.master_addr, args.master_port):
        p.error(f"--master-port {args.master_port} is already in use on {args.master_addr}: choose another, or leave "
                f"it out and a free one is found")
    args.master_port = args.master_port or free_port()
    return args, argv[cut + 1:]


def main(argv=None):
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    procs = commands(args, train_args, torch.cuda.is_available() and "--cpu" not in train_args)
    if args.dry_run:
        for _, cmd in procs:
            print(" ".join(cmd))
        return 0
    if len(procs) == 1 and procs[0][0] is None:
        os.execv(sys.executable, procs[0][1])
    return supervise(procs)


def supervise(procs) -> int:
    """Start every rank, relay its output, stop them all when one fails or a signal arrives; the exit code."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _raise_stopped)
    running = []
    try:
        for rank, cmd in procs:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    preexec_fn=die_with_parent)
            thread = threading.Thread(target=_relay, args=(proc, rank, sys.stdout), daemon=True)
            thread.start()
            running.append((rank, proc, thread))
        failed = _wait(running)
    except _Stopped as stop:
        print(f"longmem.launch: stopped by signal {stop.signum}; stopping the ranks", file=sys.stderr)
        failed = (None, 128 + stop.signum)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # the ranks are stopped below whatever arrives now
        for rank, proc, thread in running:
            if proc.poll() is None:
                proc.terminate()
            proc.wait()
            thread.join(timeout=10)
    if failed and failed[0] is not None:
        print(f"longmem.launch: rank {failed[0]} failed with exit code {failed[1]}; the other ranks were stopped",
              file=sys.stderr)
    return failed[1] if failed else 0

def _wait(running):
    """Until every rank ended (None) or one failed ((rank, code)); ended ranks leave ``running``."""
    while running:
        for item in list(running):
            rank, proc, thread = item
            code = proc.poll()
            if code is None:
                continue
            thread.join()
            running.remove(item)
            if code != 0:
                return rank, code
        time.sleep(0.2)
    return None


if __name__ == "__main__":
    sys.exit(main())
