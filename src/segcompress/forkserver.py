"""A fork server for the workflow's jobs: the heavy packages imported once, every job forked.

Every segcompress job is a new Python process that first imports torch, mmseg and the rest: 3 to
6 s on a 2-core machine, about a quarter of the default study's CPU time. A local Snakemake run
starts one server (``workflow/rules/common.smk``, ``onstart``) that imports them once and listens
on a UNIX socket named by ``SEGCOMPRESS_FORK_SERVER``. A ``segcompress`` command started by the
workflow hands the server its arguments, working directory, environment and standard streams and
waits; the server forks a child that runs the command in exactly that state and sends its exit
status back. Signals sent to the command (Snakemake cancelling a job) are passed on to the child,
and a child whose command process is gone stops.

The server is only ever a shortcut. Whenever it cannot serve (not started or not ready yet,
another Python environment, a socket gone), the command runs in its own process as usual. The
results are the same either way: the child runs the same code on the same arguments.
``SEGCOMPRESS_FORK_SERVER=0`` in the environment of ``snakemake`` turns the server off.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

ENV = "SEGCOMPRESS_FORK_SERVER"  # the socket's path; "0" or empty: no server
_HEADER = struct.Struct("!I")  # length of the JSON request that follows
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# What every job imports before its own code: torch and its compiler stack (an optimizer step
# imports torch._dynamo), the data pipeline (mmseg), checkpoints, the token methods' and the
# pruning's libraries. segcompress's own modules are not preloaded: a job runs the code on disk.
PRELOAD = (
    "numpy", "cv2", "PIL.Image", "torch", "torch.nn.functional", "torch._dynamo", "torchvision",
    "safetensors.torch", "mmengine", "mmcv", "mmseg.datasets", "mmseg.evaluation", "timm",
    "torch_pruning", "fvcore.nn", "pandas",
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ client


def delegate(argv: list[str], path: str | None = None) -> int | None:
    """Run ``segcompress argv[1:]`` in a child of the fork server at ``path`` (default: the
    environment's ``SEGCOMPRESS_FORK_SERVER``) and return its exit status; None when no server
    serves this process (the caller then runs the command itself)."""
    path = os.environ.get(ENV, "") if path is None else path
    if path in ("", "0") or not os.path.exists(path):
        return None
    request = json.dumps({"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ),
                          "python": _python()}).encode()
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        socket.send_fds(conn, [_HEADER.pack(len(request))], [0, 1, 2])
        conn.sendall(request)
        reader = conn.makefile("rb")
        first = reader.readline().split()
    except OSError:
        return None
    if len(first) != 2 or first[0] != b"pid":
        return None  # refused (another environment) or gone before it started the child
    pid = int(first[1])
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    last = reader.readline().split()
    if len(last) == 2 and last[0] == b"exit":
        return int(last[1])
    if received:  # the child died of the signal the command received: do the same
        signal.signal(received[-1], signal.SIG_DFL)
        os.kill(os.getpid(), received[-1])
    print(f"segcompress: the fork server's process {pid} for this command ended without an exit "
          f"status (killed?); set {ENV}=0 to run commands in their own processes", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------ server


def serve(path: Path, parent: int, idle_timeout: float = 3600.0) -> None:
    """Import :data:`PRELOAD`, then serve commands on the UNIX socket ``path`` until the process
    ``parent`` (the Snakemake run) is gone or no command came for ``idle_timeout`` seconds."""
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as e:  # a missing optional package only costs its import in each job
            log.warning("fork server: not preloading %s: %s", name, e)
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        # A thread (an OpenMP pool, say) does not survive a fork: its children could hang.
        raise RuntimeError("fork server: a preloaded package started a thread; not serving")
    sys.stdout.flush()
    sys.stderr.flush()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    last = time.monotonic()
    try:
        listener.bind(str(partial))
        listener.listen(16)
        os.replace(partial, path)  # commands see the socket only once it serves
        while os.getppid() == parent and time.monotonic() - last < idle_timeout:
            _reap()
            if not select.select([listener], [], [], 1.0)[0]:
                continue
            conn, _ = listener.accept()
            last = time.monotonic()
            try:
                _start(conn, listener)
            except Exception as e:  # a bad request: that command runs itself
                log.warning("fork server: request refused: %s", e)
            finally:
                conn.close()
    finally:
        listener.close()
        for leftover in (partial, path):
            leftover.unlink(missing_ok=True)


def _python() -> list[str | None]:
    """What makes a command's Python the server's: the environment and where modules come from."""
    return [sys.prefix, sys.version, os.environ.get("PYTHONPATH")]


def _reap() -> None:
    """Collect finished children (so their resource usage counts towards this process's)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _start(conn: socket.socket, listener: socket.socket) -> None:
    head, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    try:
        (size,) = _HEADER.unpack(head[:_HEADER.size])
        body = bytearray(head[_HEADER.size:])
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise ConnectionError("request cut short")
            body += chunk
        request = json.loads(body)
        if len(fds) != 3 or request["python"] != _python():
            conn.sendall(b"refused\n")
            return
        pid = os.fork()
        if pid == 0:
            listener.close()
            _run_child(conn, fds, request)  # never returns
    finally:
        for fd in fds:
            os.close(fd)


def _run_child(conn: socket.socket, fds: list[int], request: dict) -> None:
    """In the forked child: become the command's process, run it, report its exit status (or
    refuse, so that the command runs itself, where CUDA cannot work in a forked child)."""
    if _cuda_unusable_after_fork():
        print("fork server: CUDA was initialised before the fork; the command runs in its own process",
              file=sys.stderr, flush=True)  # still the server's log
        conn.sendall(b"refused\n")
        os._exit(0)
    code = 1
    try:
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, as in any Python
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False, buffering=1 if os.isatty(1) else -1)
        sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), errors="backslashreplace",
                                      line_buffering=True, write_through=True)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        logging.root.handlers.clear()
        # OpenMP read OMP_NUM_THREADS when the server loaded torch: apply the command's own value
        # (Snakemake sets it to the job's threads), or torch's default for a fresh process.
        threads = os.environ.get("OMP_NUM_THREADS", "")
        import torch

        torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                              else len(os.sched_getaffinity(0)))
        conn.sendall(f"pid {os.getpid()}\n".encode())
        threading.Thread(target=_stop_when_gone, args=(conn,), daemon=True).start()
        from segcompress.cli import main

        code = main(sys.argv[1:])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(f"exit {code}\n".encode())
        finally:
            os._exit(code if 0 <= code < 256 else 1)


def _cuda_unusable_after_fork() -> bool:
    """Whether the server had initialised CUDA when it forked this child: CUDA then fails here
    ("Cannot re-initialize CUDA in forked subprocess"). The server is started with NVML's device
    check (:func:`start`), so that ``torch.cuda.is_available()``, which mmengine calls when it is
    imported, does not initialise CUDA; this catches anything else that did."""
    import torch

    return torch.cuda._is_in_bad_fork()


def _stop_when_gone(conn: socket.socket) -> None:
    """Stop this child when its command process is gone (killed without passing the signal on)."""
    try:
        conn.recv(1)
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


# --------------------------------------------------------------------------- from the workflow


def start(parent: int | None = None) -> str | None:
    """Start a server for the process ``parent`` (default: this one) in the background; return its
    socket's path (put it in the environment as ``SEGCOMPRESS_FORK_SERVER``), or None when turned
    off. Commands started before it is ready run in their own processes."""
    if os.environ.get(ENV, None) == "0":
        return None
    import subprocess

    folder = Path(tempfile.mkdtemp(prefix="segcompress-"))
    path = folder / "server.sock"
    with open(folder / "server.log", "w") as server_log:  # the server keeps its own copy
        subprocess.Popen(
            [sys.executable, "-m", "segcompress.forkserver", "--socket", str(path),
             "--parent", str(os.getpid() if parent is None else parent)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=server_log,
            # NVML's device check: is_available() (mmengine's import calls it) without initialising
            # CUDA, which would keep every forked job off the GPU (_cuda_unusable_after_fork)
            env={**os.environ, "OMP_NUM_THREADS": "1", ENV: "0", "PYTORCH_NVML_BASED_CUDA_CHECK": "1"},
            start_new_session=True,
        )
    return str(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m segcompress.forkserver", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True, help="the UNIX socket to serve on")
    parser.add_argument("--parent", type=int, required=True, help="serve while this process lives")
    parser.add_argument("--idle-timeout", type=float, default=3600.0, help="stop after this many idle seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(args.socket, args.parent, args.idle_timeout)  # removes its socket
    finally:
        if args.socket.parent.name.startswith("segcompress-"):  # start()'s folder, log included
            shutil.rmtree(args.socket.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
