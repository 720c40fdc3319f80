"""A pre-imported parent that forks the suite's bigtrain processes (the test harness only).

Each `python -m bigtrain ...` the suite starts, and each rank its `--nproc` launcher starts, used to
pay ~5 CPU-seconds of imports (torch, transformers' model modules, DeepSpeed) before doing
anything: hundreds of processes, minutes of a 2-core machine. This server imports all of that once,
then forks one child per request. A child is a fresh process in every way the tests look at: its
own pid, argv, environment, working directory, stdin/stdout/stderr (passed over the socket as file
descriptors), exit code or signal; it runs `bigtrain/__main__.py` (or a script) as `python -m`
(or `python SCRIPT`) would, and ends as the interpreter would (non-daemon threads joined, atexit
handlers, flushed streams). What it shares with the server is the memory of modules already
imported, copy-on-write.

Only tests/common.py (run_cli) and tests/ranks.py use it, when BIGTRAIN_TEST_FORKSERVER names
its socket (tests/conftest.py starts one per pytest worker). A `--nproc` launcher forked from here
starts its ranks through the same server (`bigtrain.launch.start_rank` is replaced in the child
only). Tests that need a real interpreter start (imports, signals to a launcher, memory peaks)
keep starting `sys.executable` themselves.

Protocol (SOCK_SEQPACKET: one message each): the client sends a JSON request with three file
descriptors (stdin, stdout, stderr); the server answers "<pid>" once forked and "<exit code>"
(negative: killed by that signal, as subprocess reports it) once the child has ended.
"""

from __future__ import annotations

import io
import json
import os
import selectors
import socket
import subprocess
import sys
import time

ENV = "BIGTRAIN_TEST_FORKSERVER"


# ---------------------------------------------------------------- client side (any process)

class Forked:
    """A child of the fork server, with the parts of subprocess.Popen the tests use."""

    def __init__(self, server: str, request: dict, fds: tuple[int, int, int]) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.connect(server)
        socket.send_fds(self._sock, [json.dumps(request).encode()], list(fds))
        self.pid = int(self._sock.recv(64))
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self._finish(self._sock.recv(64, socket.MSG_DONTWAIT))
            except BlockingIOError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._sock.settimeout(timeout)
            try:
                msg = self._sock.recv(64)
            except TimeoutError:
                raise subprocess.TimeoutExpired("forked", timeout) from None
            self._finish(msg)
        return self.returncode

    def _finish(self, msg: bytes) -> None:
        self.returncode = int(msg) if msg else -9  # the server itself died: report the child as killed
        self._sock.close()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(15)

    def kill(self) -> None:
        self.send_signal(9)


def start(argv: list[str], env: dict, cwd: str, stdin: int, stdout: int, stderr: int) -> Forked:
    """Fork `argv` (["-m", "bigtrain", ...] or [SCRIPT, ...], as after `python`) in the server."""
    return Forked(os.environ[ENV], {"argv": list(map(str, argv)), "env": env, "cwd": str(cwd)}, (stdin, stdout, stderr))


def run(argv: list[str], env: dict, cwd: str, input: str | None, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True) through the server."""
    import tempfile

    with tempfile.TemporaryFile("w+") as fin, tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
        fin.write(input or "")
        fin.flush()
        fin.seek(0)
        child = start(argv, env, cwd, fin.fileno(), fout.fileno(), ferr.fileno())
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise subprocess.TimeoutExpired(argv, timeout, output=_read(fout), stderr=_read(ferr)) from None
        return subprocess.CompletedProcess(argv, code, _read(fout), _read(ferr))


def _read(f) -> str:
    f.seek(0)
    return f.read()


def available() -> bool:
    return bool(os.environ.get(ENV)) and os.path.exists(os.environ[ENV])


# ---------------------------------------------------------------- server side

def _preimport() -> None:
    # What nearly every bigtrain process imports; nothing that reads the environment once for good
    # (bigtrain.kernels' Triton module, which fixes TRITON_INTERPRET when it loads, stays out).
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as bigtrain's launcher sets it for every rank
        # Triton decorates its own library functions when it is imported (DeepSpeed and
        # transformers import it), in interpreter mode or not for good: on a machine without a GPU
        # the interpreter is the only way a child can run a kernel, so import it that way. (A
        # child's bigtrain.kernels still reads TRITON_INTERPRET from its own environment.)
        os.environ["TRITON_INTERPRET"] = "1"
    import deepspeed  # noqa: F401
    # Every ZeRO engine's optimizer check imports DeepSpeed's Muon, whose torch.compile decorator
    # imports inductor: ~1.3 s per rank.
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import bigtrain.cli  # noqa: F401
    import bigtrain.launch  # noqa: F401
    import bigtrain.trainer  # noqa: F401
    # Every finished run plots its loss curve (Agg, as bigtrain.metrics selects) and logs to
    # TensorBoard by default: ~0.6 s of imports per run otherwise.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401

    # The model-family matrix (tests/test_models.py) starts ~50 runs of these.
    import families
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    for name, (model_type, _) in families.FAMILIES.items():
        head = AutoModelForCausalLM if name in families.CAUSAL else AutoModelForMaskedLM
        head._model_mapping[type(AutoConfig.for_model(model_type))]  # imports the modeling module
    for model_type in ("mixtral", "qwen3_moe"):  # tests/test_moe.py, with DeepSpeed's AutoEP
        AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(model_type))]
    import deepspeed.module_inject.auto_ep  # noqa: F401
    # Everything imported so far lives as long as the server: move it out of the garbage
    # collector's sight, so a child's collections (DeepSpeed and bigtrain call gc.collect()) do not
    # walk the millions of objects of torch and transformers (~0.3 s each), nor touch their pages.
    import gc

    gc.collect()
    gc.freeze()


def _child(request: dict, fds: list[int], keep_closed: list) -> None:
    """In the forked child: become `python ARGV` and never return."""
    import runpy

    code = 1
    try:
        for s in keep_closed:
            s.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", line_buffering=True, write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                      line_buffering=True, write_through=True)
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
        import bigtrain.launch

        bigtrain.launch.start_rank = _start_rank
        argv = request["argv"]
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter would print
        import traceback

        traceback.print_exc()
    _exit_like_the_interpreter(code)


def _start_rank(argv: list[str], env: dict):
    """bigtrain.launch.start_rank in a forked launcher: the rank forks from the server too."""
    return start(["-m", "bigtrain", *argv], env, os.getcwd(), 0, 1, 2)


def _exit_like_the_interpreter(code: int) -> None:
    import atexit
    import threading

    try:
        threading._shutdown()  # joins non-daemon threads, as Py_FinalizeEx does first
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    finally:
        os._exit(code)


def serve(path: str) -> None:
    _preimport()
    parent = os.getppid()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while os.getppid() == parent:  # the pytest worker that started us is gone: stop
        for _ in sel.select(timeout=0.05):
            conn, _ = srv.accept()
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            pid = os.fork()
            if pid == 0:
                _child(json.loads(msg), fds, [srv, conn, *children.values()])
            for fd in fds:
                os.close(fd)
            conn.send(str(pid).encode())
            children[pid] = conn
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.send(str(os.waitstatus_to_exitcode(status)).encode())
                except OSError:
                    pass  # the client went away
                conn.close()
    os.unlink(path)


def start_server(path: str, cwd: str | None = None) -> subprocess.Popen:
    """Start a server on `path` (from the pytest worker) and wait until it has imported everything.

    With `cwd`, the server starts there as `python -m forkserver`, so that directory is first on
    its sys.path while it imports torch, transformers and bigtrain, exactly as for a user's
    `bigtrain ...` typed there (tests/test_readme.py: a folder in the repository root named like a
    dependency would break this start, as it broke every rank)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if cwd is None:
        cmd = [sys.executable, __file__, path]
    else:
        cmd = [sys.executable, "-m", "forkserver", path]
        env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)
    t0 = time.monotonic()
    line = p.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"fork server did not start ({time.monotonic() - t0:.0f}s): {line!r}")
    return p


def shim_main(argv: list[str]) -> None:
    """`bigtrain ARGS` through the server: what a `bigtrain` shim on PATH runs (tests/test_readme.py).
    Signals to the shim reach the child; the exit code is the child's (128+N for signal N)."""
    import signal

    child = start(["-m", "bigtrain", *argv], dict(os.environ), os.getcwd(), 0, 1, 2)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    code = child.wait()
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    serve(sys.argv[1])
