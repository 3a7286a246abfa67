"""The workflow's fork server (segcompress.forkserver): a command it serves behaves as the same
command run in its own process (arguments, working directory, environment, streams, exit status),
and whatever keeps it from serving makes the command run itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segcompress import forkserver


@pytest.fixture(scope="module")
def server():
    path = forkserver.start(parent=os.getpid())
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "the fork server did not start"
        time.sleep(0.2)
    yield path
    os.kill(_server_pid(path), signal.SIGTERM)


def _server_pid(path: str) -> int:
    """The server's pid: the process with its command line whose parent is this test process (its
    forked children share the command line)."""
    found = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", f"forkserver --socket {path}"],
                           capture_output=True, text=True).stdout.split()
    assert len(found) == 1, found
    return int(found[0])


def test_no_server_means_the_command_runs_itself(tmp_path, monkeypatch):
    monkeypatch.delenv(forkserver.ENV, raising=False)
    assert forkserver.delegate(["segcompress", "--version"]) is None
    assert forkserver.delegate(["segcompress", "--version"], "0") is None
    assert forkserver.delegate(["segcompress", "--version"], str(tmp_path / "gone.sock")) is None


def test_a_served_command_prints_and_exits_as_itself(server, capfd):
    assert forkserver.delegate(["segcompress", "--version"], server) == 0
    assert capfd.readouterr().out.strip() == "segcompress 0.1.0"
    code = forkserver.delegate(["segcompress", "evaluate", "--model", "missing.safetensors", "--layout", "ade20k",
                                "--root", "nowhere", "--img-scale", "64", "64", "--out", "x.json"], server)
    err = capfd.readouterr().err
    assert code == 2
    assert "segcompress evaluate: error:" in err and "missing.safetensors" in err


def test_a_served_command_runs_in_the_callers_folder_and_environment(server, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEGCOMPRESS_LOG_COMMAND", "1")  # segcompress.cli logs the command line first
    code = forkserver.delegate(["segcompress", "data", "--layout", "ade20k", "--root", "rel/ade20k", "--synthetic",
                                "--num-train", "1", "--num-val", "1"], server)
    assert code == 0
    assert (tmp_path / "rel/ade20k/manifest.json").is_file()  # relative to the caller's folder
    assert "command: segcompress data --layout ade20k" in capfd.readouterr().err
    assert json.loads((tmp_path / "rel/ade20k/manifest.json").read_text())


def test_another_python_environment_is_refused(server, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    assert forkserver.delegate(["segcompress", "--version"], server) is None


def test_the_server_checks_for_gpus_without_initialising_cuda(server):
    """NVML's device check (a CUDA device initialised in the server would fail in every job)."""
    env = Path(f"/proc/{_server_pid(server)}/environ").read_bytes().split(b"\0")
    assert b"PYTORCH_NVML_BASED_CUDA_CHECK=1" in env


def test_a_server_that_initialised_cuda_lets_the_command_run_itself(tmp_path):
    """CUDA cannot work in a child forked after it was initialised: such a child refuses the
    command, which then runs in its own process (a server whose fork check says so, as it would
    on a GPU machine where something initialised CUDA while it imported)."""
    path, log = tmp_path / "server.sock", tmp_path / "server.log"
    code = ("import sys, torch; torch.cuda._is_in_bad_fork = lambda: True\n"
            "from segcompress import forkserver; forkserver.main(sys.argv[1:])")
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, "--socket", str(path), "--parent", str(os.getpid())],
                                stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, forkserver.ENV: "0", "OMP_NUM_THREADS": "1"})  # as start() runs it
    try:
        deadline = time.monotonic() + 120
        while not path.exists():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.2)
        assert forkserver.delegate(["segcompress", "--version"], str(path)) is None
        time.sleep(0.5)  # the refusing child writes to the server's log before it exits
        assert "CUDA was initialised before the fork" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_console_command_uses_the_server_it_is_given(server, tmp_path):
    """`segcompress` as the workflow runs it: through the server, the same output as without."""
    exe = Path(sys.executable).with_name("segcompress")
    for value in (server, "0"):
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, env={**os.environ, forkserver.ENV: value})
        assert (out.returncode, out.stdout.strip()) == (0, "segcompress 0.1.0")


def test_a_killed_command_takes_its_child_along(server, tmp_path, synthetic_ade20k):
    """Snakemake cancelling a job (SIGTERM to its process group) or killing it (SIGKILL) must not
    leave the served child running."""
    exe = Path(sys.executable).with_name("segcompress")
    data = synthetic_ade20k  # read only: the runs are killed while training
    arch = json.dumps({"embed_dim": 16, "depth": 1, "num_heads": 1, "patch_size": 16})
    recipe = json.dumps({"iters": 100000, "batch_size": 1, "log_every": 1, "checkpoint_every": 0, "num_workers": 0})
    cmd = [str(exe), "train", "--layout", "ade20k", "--root", str(data), "--crop", "64", "--img-scale", "128", "64",
           "--arch", arch, "--recipe", recipe, "--out", str(tmp_path / "m.safetensors")]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        log = tmp_path / f"train-{sig}.log"
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True,
                                env={**os.environ, forkserver.ENV: server})
        deadline = time.monotonic() + 60
        while "iter " not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        child = _served_children(server)
        assert len(child) == 1
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _served_children(server):
            assert time.monotonic() < deadline, f"the served child outlived its command ({sig!r})"
            time.sleep(0.2)


def _served_children(server: str) -> list[str]:
    """The server's live children (a finished one may wait a second to be collected)."""
    kids = subprocess.run(["pgrep", "-P", str(_server_pid(server))], capture_output=True, text=True).stdout.split()
    live = []
    for kid in kids:
        try:
            if Path(f"/proc/{kid}/stat").read_text().split()[2] != "Z":
                live.append(kid)
        except FileNotFoundError:  # gone meanwhile
            pass
    return live
