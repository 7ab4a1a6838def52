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
    def __init__(self, argv, env: dict | None = None, cwd=None, grace_s: float = 3.0):
        self.argv = [str(a) for a in argv]
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
            stdin=subprocess.DEVNULL,
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
