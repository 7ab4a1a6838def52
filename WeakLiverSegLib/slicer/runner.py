"""Run a ``weakliverseg`` command in a background process and read its jsonl progress.

Pure standard library (no Qt, no Slicer): the Slicer widget polls ``poll()`` from a
``qt.QTimer`` so the GUI never blocks, and the tests drive it from plain Python.

Events returned by ``poll()`` are dicts with an ``"event"`` key, in the order they happened:

* ``progress`` / ``log`` / ``done`` / ``error``: exactly the child's jsonl lines
  (see ``progress.py``); a stdout line that is not JSON becomes ``{"event": "log"}``;
* ``{"event": "log", "message", "stream": "stderr"}`` for every stderr line;
* ``{"event": "exit", "returncode", "cancelled", "error"}``: always last.  ``error`` is None on
  success, else one clear message: the child's last ``error`` event, else its last stderr
  line, else the exit status.

``AnnotationWorker`` (below) keeps one ``weakliverseg annotate --serve`` child alive over such a
runner: requests go to its stdin one at a time, queued in between, each answered by its own events.

The child runs in its own session / process group, so ``cancel()`` ends the whole tree
(data-loader workers and any other grandchildren) and not only the direct child.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque

_IS_WINDOWS = sys.platform.startswith("win")


class BackgroundRunner:
    def __init__(self, argv, env: dict | None = None, cwd=None, grace_s: float = 3.0, stdin_pipe: bool = False):
        self.argv = [str(a) for a in argv]
        self.stdin_pipe = bool(stdin_pipe)   # keep the child's stdin open for requests (AnnotationWorker)
        self.env = dict(os.environ if env is None else env)
        # Progress lines must arrive as they are printed, not when a 4 KiB buffer fills.
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.cwd = None if cwd is None else str(cwd)
        self.grace_s = float(grace_s)
        self.process: subprocess.Popen | None = None
        self.cancelled = False
        self.returncode: int | None = None
        self._events: queue.Queue = queue.Queue()
        self._stderr_tail: deque = deque(maxlen=50)
        self._last_error: str | None = None
        self._finished = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "BackgroundRunner":
        if self.process is not None:
            raise RuntimeError("this runner was already started")
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **popen_platform_kwargs(),
        )
        readers = [
            threading.Thread(target=self._read_stdout, name="runner-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="runner-stderr", daemon=True),
        ]
        waiter = threading.Thread(target=self._wait, args=(readers,), name="runner-wait", daemon=True)
        self._threads = readers + [waiter]
        for thread in self._threads:
            thread.start()
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and not self._finished.is_set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def error_message(self) -> str | None:
        """Why the child failed (None while running or after success)."""
        if not self._finished.is_set() or self.returncode == 0:
            return None
        if self.cancelled:
            return "cancelled by the user"
        if self._last_error:
            return self._last_error
        if self._stderr_tail:
            return self._stderr_tail[-1]
        return f"{os.path.basename(self.argv[0])} exited with status {self.returncode}"

    def poll(self) -> list:
        """Every event since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the child and its output readers are done; the return code (None on timeout)."""
        self._finished.wait(timeout)
        return self.returncode

    def cancel(self, wait: bool = False) -> None:
        """Stop the whole process tree: SIGTERM to the group, SIGKILL after ``grace_s``.

        Returns at once unless ``wait``; the escalation runs in a helper thread so a GUI
        calling this never freezes.
        """
        if self.process is None or self._finished.is_set():
            return
        self.cancelled = True
        if _IS_WINDOWS:
            # taskkill /T takes the children; /F because console apps ignore WM_CLOSE.
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                           **popen_platform_kwargs(new_group=False))
        else:
            self._signal_group(signal.SIGTERM)
            threading.Thread(target=self._escalate, name="runner-kill", daemon=True).start()
        if wait:
            self._finished.wait(self.grace_s + 10.0)

    # ------------------------------------------------------------------ threads

    def _signal_group(self, sig) -> None:
        try:
            os.killpg(self.process.pid, sig)  # pgid == pid: start_new_session made it the leader
        except (ProcessLookupError, PermissionError):
            pass

    def _escalate(self) -> None:
        # The group may outlive its leader (an orphaned grandchild ignoring SIGTERM), so
        # SIGKILL the group after the grace period even when the leader is already gone.
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and self.process.poll() is None:
            time.sleep(0.05)
        self._signal_group(signal.SIGKILL)

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            line = line.strip()
            if not line:
                continue
            event = _parse_event(line)
            if event.get("event") == "error" and event.get("message"):
                self._last_error = str(event["message"])
            self._events.put(event)
        self.process.stdout.close()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            line = line.rstrip()
            if not line.strip():
                continue
            self._stderr_tail.append(line.strip())
            self._events.put({"event": "log", "message": line, "stream": "stderr"})
        self.process.stderr.close()

    def _wait(self, readers) -> None:
        self.returncode = self.process.wait()
        for thread in readers:  # all output is queued before the exit event
            thread.join()
        self._finished.set()
        self._events.put({"event": "exit", "returncode": self.returncode, "cancelled": self.cancelled,
                          "error": self.error_message})


def popen_platform_kwargs(new_group: bool = True) -> dict:
    """``subprocess.Popen`` keyword arguments for a background child on this platform.

    POSIX: its own session and process group (``cancel`` signals the whole tree).  Windows: a
    new process group, and no console window, as Slicer's ``launchConsoleProcess`` does
    (``STARTUPINFO`` with ``STARTF_USESHOWWINDOW`` / ``SW_HIDE``) plus ``CREATE_NO_WINDOW``:
    ``PythonSlicer`` is a console program, so without them every job opens a console whose
    closing would kill the job.
    """
    if not _IS_WINDOWS:
        return {"start_new_session": True} if new_group else {}
    info = subprocess.STARTUPINFO()
    info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
    info.wShowWindow = subprocess.SW_HIDE
    flags = subprocess.CREATE_NO_WINDOW | (subprocess.CREATE_NEW_PROCESS_GROUP if new_group else 0)
    return {"creationflags": flags, "startupinfo": info}


def _parse_event(line: str) -> dict:
    """One stdout line -> event dict; anything that is not a JSON object is a log line."""
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            if "event" not in obj:  # bare {"stage", "step", ...} lines are progress
                obj = {"event": "progress", **obj}
            return obj
    return {"event": "log", "message": line}


class AnnotationWorker:
    """A warm ``weakliverseg annotate --serve`` process: the annotator is loaded once and answers
    one request after another; requests made while one runs wait in a queue.

    Pure standard library, polled like ``BackgroundRunner`` (which it uses: the same jsonl parsing,
    process group / Windows no-console flags, and process-tree cancel).  A request is a dict
    ``{"input", "boxes" or "boxes_file", "out"}``; ``submit`` gives it an ``id``.  ``poll()``
    returns the events since the last call, each request's tagged with its ``"id"``:

    * ``progress`` / ``log``: while it runs (the child's lines; progress carries no id of its
      own, it belongs to the request in flight);
    * ``done`` (``labels``, ``seconds``, ``encoded_slices``...) or ``error`` (``message``,
      ``cancelled``): the request's last event.

    Also ``{"event": "worker", "state": "started" | "ready" | "exited", ...}`` for the status line.
    A worker that dies while a request runs fails that request and restarts for the queued ones
    (at most ``max_restarts`` times in a row); one that dies before it was ready (the annotator
    cannot load: the wheel missing, a bad model folder) fails every request with its message.
    ``cancel()`` ends the process tree and fails everything pending as cancelled; ``stop()`` closes
    its stdin (the worker ends by itself) and kills it after ``grace_s`` if it does not.
    The next ``submit`` after either starts a fresh worker.
    """

    def __init__(self, argv, env: dict | None = None, cwd=None, grace_s: float = 3.0, max_restarts: int = 2):
        self.argv = [str(a) for a in argv]
        self.env = env
        self.cwd = cwd
        self.grace_s = float(grace_s)
        self.max_restarts = int(max_restarts)
        self.runner: BackgroundRunner | None = None
        self.ready = False               # the current process answered (loaded its annotator)
        self.starts = 0                  # processes started so far (1 = never restarted)
        self._crashes = 0                # consecutive crashes (reset by an answered request)
        self._queue: deque = deque()     # requests not yet written to the worker
        self._current: dict | None = None
        self._callbacks: dict = {}
        self._events: list = []
        self._ids = 0
        self._stopping = False

    # ------------------------------------------------------------------ state

    @property
    def alive(self) -> bool:
        return self.runner is not None and not self.runner.finished

    @property
    def busy(self) -> bool:
        """A request runs or waits."""
        return self._current is not None or bool(self._queue)

    @property
    def current_id(self):
        return None if self._current is None else self._current["id"]

    @property
    def queued_ids(self) -> list:
        return [r["id"] for r in self._queue]

    @property
    def pid(self) -> int | None:
        return self.runner.pid if self.alive else None

    def pending_requests(self) -> list:
        """Copies of the running request (first) and the waiting ones."""
        return [dict(r) for r in ([self._current] if self._current is not None else []) + list(self._queue)]

    # ------------------------------------------------------------------ requests

    def submit(self, request: dict, callback=None) -> str:
        """Queue a request; its id (``request["id"]`` or a new one).  ``callback(event)`` gets its events."""
        request = dict(request)
        if request.get("id") is None:
            self._ids += 1
            request["id"] = f"r{self._ids}"
        rid = str(request["id"])
        request["id"] = rid
        if callback is not None:
            self._callbacks[rid] = callback
        self._queue.append(request)
        self._pump()
        return rid

    def withdraw(self, rid) -> bool:
        """Drop a request that still waits in the queue (not the one running); True when dropped."""
        for request in list(self._queue):
            if request["id"] == rid:
                self._queue.remove(request)
                self._callbacks.pop(rid, None)
                return True
        return False

    def poll(self) -> list:
        """Every event since the last call (never blocks); callbacks run here, in the caller's thread."""
        if self.runner is not None:
            for event in self.runner.poll():
                self._handle(event)
        self._pump()
        out, self._events = self._events, []
        for event in out:
            callback = self._callbacks.get(event.get("id"))
            if callback is not None:
                callback(event)
            if event.get("event") in ("done", "error") and event.get("id") is not None:
                self._callbacks.pop(event.get("id"), None)
        return out

    def wait_idle(self, timeout: float | None = None, interval: float = 0.05) -> list:
        """Poll until no request runs or waits (tests, scripts); the events seen."""
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        seen = []
        while True:
            seen += self.poll()
            if not self.busy:
                return seen
            if deadline is not None and time.monotonic() > deadline:
                return seen
            time.sleep(interval)

    # ------------------------------------------------------------------ lifecycle

    def cancel(self) -> None:
        """End the worker's process tree now; every running or queued request fails as cancelled."""
        self._fail_all("cancelled by the user", cancelled=True)
        runner, self.runner = self.runner, None
        if runner is not None and not runner.finished:
            runner.cancel()
        self.ready = False

    def stop(self, wait: bool = False) -> None:
        """Close the worker (the panel closes, the scene closes): pending requests fail as cancelled;
        EOF on stdin ends the worker, which is killed after ``grace_s`` if it does not."""
        self._fail_all("the annotation worker was stopped", cancelled=True)
        runner, self.runner = self.runner, None
        self.ready = False
        if runner is None or runner.finished:
            return
        try:
            runner.process.stdin.close()
        except (OSError, ValueError):
            pass

        def reap():
            if runner.wait(self.grace_s) is None:
                runner.cancel(wait=True)

        if wait:
            reap()
        else:
            threading.Thread(target=reap, name="annotation-worker-stop", daemon=True).start()

    # ------------------------------------------------------------------ internals

    def _start(self) -> None:
        self.runner = BackgroundRunner(self.argv, env=self.env, cwd=self.cwd, grace_s=self.grace_s,
                                       stdin_pipe=True).start()
        self.ready = False
        self.starts += 1
        self._events.append({"event": "worker", "state": "started", "pid": self.runner.pid,
                             "restart": self.starts > 1})

    def _pump(self) -> None:
        """Write the next queued request when none runs (starting the worker if needed)."""
        while self._current is None and self._queue:
            if not self.alive:
                try:
                    self._start()
                except OSError as exc:
                    self._fail_all(f"cannot start the annotation worker ({os.path.basename(self.argv[0])}): {exc}")
                    return
            request = self._queue.popleft()
            self._current = request
            try:
                self.runner.process.stdin.write(json.dumps(request) + "\n")
                self.runner.process.stdin.flush()
            except (OSError, ValueError):
                # The worker is dying: the exit event fails (or restarts) this request.
                pass

    def _finish(self, rid, event: dict) -> None:
        if self._current is not None and self._current["id"] == rid:
            self._current = None
        self._events.append(event)

    def _handle(self, event: dict) -> None:
        kind = event.get("event")
        rid = event.get("id")
        current = self.current_id
        if kind == "exit":
            self._exited(event)
            return
        if kind in ("done", "error") and rid is not None:
            self.ready = True
            self._crashes = 0 if kind == "done" else self._crashes
            self._finish(str(rid), {**event, "id": str(rid)})
            return
        if kind == "error":            # no id: the worker's own failure (loading); its exit follows
            self._events.append({**event, "worker": True})
            return
        if kind == "log" and str(event.get("message", "")).startswith("annotator ") \
                and str(event.get("message", "")).endswith(" ready"):
            self.ready = True
            self._events.append({"event": "worker", "state": "ready", "message": event["message"]})
        if event.get("id") is None and current is not None:
            event = {**event, "id": current}
        self._events.append(event)

    def _exited(self, event: dict) -> None:
        runner = self.runner
        was_ready = self.ready
        self.runner = None
        self.ready = False
        message = (runner.error_message if runner is not None else None) or event.get("error") \
            or f"status {event.get('returncode')}"
        self._events.append({"event": "worker", "state": "exited", "returncode": event.get("returncode"),
                             "error": message if event.get("returncode") else None})
        if self._current is None and not self._queue:
            return
        if not was_ready:
            self._fail_all(f"the annotation worker could not start: {message}")
            return
        if self._current is not None:
            rid = self._current["id"]
            self._finish(rid, {"event": "error", "id": rid, "cancelled": False,
                               "message": f"the annotation worker stopped while annotating ({message})"})
        self._crashes += 1
        if self._queue and self._crashes > self.max_restarts:
            self._fail_all(f"the annotation worker stopped {self._crashes} times in a row; last: {message}")

    def _fail_all(self, message: str, cancelled: bool = False) -> None:
        pending = ([self._current] if self._current is not None else []) + list(self._queue)
        self._current = None
        self._queue.clear()
        for request in pending:
            self._events.append({"event": "error", "id": request["id"], "message": message, "cancelled": cancelled})
