"""Isolated runs: every case runs in a long-lived worker process, so that a segfault, an illegal
memory access or a hang in one backend becomes a CRASH or TIMEOUT result for that case and the run
goes on in a fresh worker (FlashInfer-Bench runs each solution in its own process for the same
reason). The worker holds an ordinary Runner, so references are cached across the backends of a
case as in-process, and each Result is the one the in-process Runner would give.

Protocol, one duplex pipe per worker: the worker answers "ready" (or "failed" and a traceback)
once its imports are done (`modules`, and those of the backends sent by name so far); then, per
case, the parent sends (backend name, its module, pickled backend or None for "import its module
and take it from your registry", spec) and the worker answers ("result", Result), after
("waiting", None) and ("admitted", None) if the case had to wait for GPU memory: no timeout runs
while it waits (it waits only while other processes run big cases, which end or time out), the
case's starts when it is admitted. No answer within `timeout`: the worker is killed, TIMEOUT. The
pipe closes without an answer: CRASH.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import traceback
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING

import torch

from .registry import Backend, load_backends
from .result import Category, Result, Status, failed, identify
from .runner import Runner, finish, refusal
from .spec import CaseSpec

if TYPE_CHECKING:
    from typing import Self  # 3.11+, and only read by type checkers

_GRACE = 2.0  # seconds from SIGTERM (the worker dumps its Python stack on it) to SIGKILL


class IsolatedRunner:
    """Runner's interface (run, results, device, base_seed), with each case run in a worker process."""

    def __init__(self, device: str | torch.device = "cpu", base_seed: int = 0, timeout: float = 300.0,
                 modules: tuple[str, ...] = (), start_timeout: float = 300.0, finite_poison: bool = False):
        self.device = torch.device(device)
        self.base_seed, self.timeout, self.start_timeout = base_seed, timeout, start_timeout
        self.finite_poison = finite_poison
        self.modules = tuple(modules)
        # Modules of the backends sent by name so far: a fresh worker imports them while it starts,
        # not inside a case's timeout (importing an adapter package can take seconds).
        self._named_modules: dict[str, None] = {}
        self.results: list[Result] = []
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._stderr = ""  # the worker's fd 2, a temporary file

    @property
    def worker_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def run(self, backend: Backend, spec: CaseSpec) -> Result:
        # Finished here, on every path of _run: the results this process makes itself (skip, crash,
        # timeout, not started) too. The worker's Runner finished its own already; again is the same.
        result = finish(self._run(backend, spec), backend, spec, self.device)
        self.results.append(result)
        return result

    def _run(self, backend: Backend, spec: CaseSpec) -> Result:
        who = identify(backend.name, spec, self.device, self.base_seed)
        refused = refusal(backend, spec, self.device)  # here, so a skipped case never starts a worker
        if refused:
            return Result.of(who, refused)
        module = type(backend).__module__
        try:  # by name where the worker's registry holds this very object (its module imported there), else pickled
            registered = load_backends(self.modules).get(backend.name) is backend and module != "__main__"
            payload = None if registered else pickle.dumps(backend)
            if registered:
                self._named_modules[module] = None
        except Exception as e:  # noqa: BLE001 - anything pickle (or importing `modules`) raises
            return Result.of(who, failed(Category.NOT_STARTED, f"{backend.name} could not be sent to the worker "
                                                               f"process: {type(e).__name__}: {e}"))
        problem = self._start()
        if problem:
            return Result.of(who, failed(Category.NOT_STARTED, problem))
        try:
            self._conn.send((backend.name, module, payload, spec))
        except OSError:
            pass  # it died since its last case: the wait below sees that
        kind = "admitted"
        while kind in ("waiting", "admitted"):  # the time spent waiting for GPU memory is not the case's
            if not wait([self._conn, self._proc.sentinel], None if kind == "waiting" else self.timeout):
                _, tail = self._retire(kill=True)
                return Result.of(who, failed(Category.TIMEOUT, f"no result within {self.timeout:g}s: the worker was "
                                                               f"killed; later cases run in a fresh worker{tail}",
                                             Status.TIMEOUT))
            try:  # data first: a worker that lost its CUDA context answers, then exits
                kind, got = self._conn.recv()
            except (EOFError, OSError):
                how, tail = self._retire(kill=False)
                return Result.of(who, failed(Category.CRASH, f"worker process died during the case: {how}{tail}",
                                             Status.CRASH))
        if got.status is Status.CRASH:
            self._retire(kill=False)
        return got

    def _start(self) -> str | None:
        """Start a worker unless one is alive; why it could not start, or None."""
        if self._proc is not None:
            if self._proc.is_alive():
                return None
            self._retire(kill=False)  # died between cases
        fd, self._stderr = tempfile.mkstemp(prefix="conformance-worker-", suffix=".stderr")
        os.close(fd)
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, name="conformance-worker", daemon=True,
                           args=(child, str(self.device), self.base_seed, self.finite_poison,
                                 self.modules + tuple(self._named_modules), torch.get_num_threads(), self._stderr))
        try:
            proc.start()
        except Exception as e:  # noqa: BLE001 - no process (a main module without the __main__ guard, say)
            conn.close()
            os.unlink(self._stderr)
            return f"the worker process could not be started: {type(e).__name__}: {e}"
        finally:
            child.close()  # else the pipe never reads EOF when the worker dies
        self._proc, self._conn = proc, conn
        kind, detail = "timeout", ""
        if wait([self._conn, self._proc.sentinel], self.start_timeout):
            try:
                kind, detail = self._conn.recv()
            except (EOFError, OSError):
                kind = "died"
        if kind == "ready":
            return None
        how, tail = self._retire(kill=kind == "timeout")
        if kind == "failed":
            return f"the worker process failed to start:\n{detail}{tail}"
        if kind == "died":
            return f"the worker process died while starting: {how}{tail}"
        return f"the worker process did not start within {self.start_timeout:g}s{tail}"

    def _retire(self, kill: bool) -> tuple[str, str]:
        """Stop the worker (or collect a dead one): how it ended, and the tail of its stderr."""
        proc, self._proc = self._proc, None
        if kill and proc.is_alive():
            proc.terminate()
        proc.join(_GRACE)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        self._conn.close()
        tail = _tail(self._stderr)
        os.unlink(self._stderr)
        code = proc.exitcode
        how = f"{signal.Signals(-code).name} (exit code {code})" if code < 0 else f"exit code {code}"
        return how, (f"\nworker stderr (last lines):\n{tail}" if tail else "")

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._conn.send(None)  # the worker's loop ends on it
            except OSError:
                pass  # it died since its last case
            self._retire(kill=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tail(path: str, lines: int = 15) -> str:
    """The last lines of a worker's stderr, and the first line of a fatal error's report (which a
    deep stack of frames would push out of them)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 65536))
        text = f.read().decode(errors="replace")
    kept = [line for line in text.splitlines() if line.strip()]
    fatal = [line for line in kept[:-lines] if line.startswith("Fatal Python error")][-1:]
    return "\n".join(fatal + kept[-lines:])


def _cuda_lost(device: torch.device) -> str:
    """The error a tiny op meets on `device`, or "": sticky errors (an illegal memory access)
    leave the context unusable, and every later case in this process would fail with them."""
    try:
        torch.cuda.synchronize(device)
        (torch.ones(1, device=device) + 1).item()
        return ""
    except Exception as e:  # noqa: BLE001 - any failure means the context is gone
        first = str(e).strip().partition("\n")[0]  # the error; torch's advice follows it
        return f"{type(e).__name__}: {first}"


def _worker(conn: Connection, device: str, base_seed: int, finite_poison: bool, modules: tuple[str, ...],
            threads: int, stderr_path: str) -> None:
    # fd 2, not sys.stderr alone: C-level messages (CUDA errors, a segfault's report) land there too.
    fd = os.open(stderr_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.enable()  # the Python stack of a segfault or abort, for the reason's tail
    if hasattr(faulthandler, "register"):  # and of a hang: SIGTERM dumps it, then ends the process
        faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    try:
        torch.set_num_threads(threads)  # as the parent: CPU reductions, and so the numbers, depend on it
        load_backends(modules)
        runner = Runner(device, base_seed, finite_poison=finite_poison)
        runner.on_waiting = lambda: conn.send(("waiting", None))  # no timeout while it waits for memory
        runner.on_admitted = lambda: conn.send(("admitted", None))  # the case's timeout starts now
        if runner.device.type == "cuda":
            torch.ones(1, device=runner.device).sum().item()  # the context, before "ready"
    except BaseException:  # noqa: BLE001 - any failure here is the reason the case cannot run
        conn.send(("failed", traceback.format_exc()))
        return
    conn.send(("ready", ""))
    # Until the parent sends None. An exception of the harness itself ends the worker: a CRASH.
    for name, module, payload, spec in iter(conn.recv, None):
        try:
            backend = load_backends(modules + (module,))[name] if payload is None else pickle.loads(payload)
        except Exception as e:  # noqa: BLE001 - the adapter's module does not import here
            result = Result.of(identify(name, spec, runner.device, base_seed),
                               failed(Category.NOT_STARTED, f"{name} could not be sent to the worker process: "
                                                            f"{type(e).__name__}: {e}"))
        else:
            result = runner.run(backend, spec)
        lost = runner.device.type == "cuda" and result.status is Status.ERROR and _cuda_lost(runner.device)
        if lost:  # the same run, judged again: its error broke the context, so it is a crash
            result = dataclasses.replace(result, status=Status.CRASH, categories=(Category.CRASH,),
                                         reason=f"CUDA context lost: {lost}\nthe case's error: {result.reason}")
        conn.send(("result", result))
        if lost:
            sys.stderr.flush()
            os._exit(1)  # no CUDA teardown on a broken context; the parent starts a fresh worker


def make_runner(device: torch.device, base_seed: int, isolate: str = "auto", case_timeout: float = 300.0,
                poison: str = "nan", modules: tuple[str, ...] = ()) -> Runner | IsolatedRunner:
    """The runner config.add_run_options's options ask for."""
    finite = poison == "finite"
    if isolate == "on" or (isolate == "auto" and torch.device(device).type == "cuda"):
        return IsolatedRunner(device, base_seed, timeout=case_timeout, modules=modules, finite_poison=finite)
    return Runner(device, base_seed, finite_poison=finite)
