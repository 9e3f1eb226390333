#!/usr/bin/env python3
"""The compose stack's event consumer: every event of one VM, as JSON lines, in a file.

It runs the bundled CLI, ``pagetrack watch VM --format jsonl --from-seq N``, with its
output appended to the file. The CLI reconnects and resumes by itself when the daemon
restarts; when this process restarts, it starts after the last seq already in the file, so
each event is in the file once and in order, and events the daemon could no longer replay
show up as a ``"type": "gap"`` line rather than missing silently.

Environment: ``PAGETRACK_WATCH_VM`` (default ``demo``), ``PAGETRACK_EVENTS_FILE`` (default
``/events/VM.jsonl``), ``PAGETRACK_TARGET``, and the token in ``PAGETRACK_TOKEN`` or the file
``PAGETRACK_TOKEN_FILE`` (default /run/secrets/pagetrack-client-token).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

CHUNK = 1 << 16
DEFAULT_TOKEN_FILE = "/run/secrets/pagetrack-client-token"


def _seq_after(line: bytes) -> int | None:
    """The next seq to ask for after this JSONL record, if it tells."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    if rec.get("type") == "event":
        return int(rec["seq"]) + 1
    if rec.get("type") == "gap":
        return int(rec["last_seq"]) + 1
    return None


def repair(path: Path) -> None:
    """Cut a partly written last line (a consumer killed mid-write) off the file."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - CHUNK)
            f.seek(start)
            block = f.read(end - start)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                if keep != size:
                    f.truncate(keep)
                return
            end = start
        if size:
            f.truncate(0)


def next_seq(path: Path) -> int:
    """The seq after the last event (or gap) recorded in ``path``; 1 for a new file, so the
    first run replays everything the daemon still has."""
    if not path.exists():
        return 1
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        tail = b""
        while end > 0:
            start = max(0, end - CHUNK)
            f.seek(start)
            data = f.read(end - start) + tail
            lines = data.split(b"\n")
            # the first piece may be a partial line unless the file starts here
            tail, complete = (b"", lines) if start == 0 else (lines[0], lines[1:])
            for line in reversed(complete):
                seq = _seq_after(line) if line.strip() else None
                if seq is not None:
                    return seq
            end = start
    return 1


def main() -> int:
    """Watch until SIGTERM, restarting the CLI (after a pause) whenever it exits."""
    vm = os.environ.get("PAGETRACK_WATCH_VM", "demo")
    out = Path(os.environ.get("PAGETRACK_EVENTS_FILE", f"/events/{vm}.jsonl"))
    token_file = Path(os.environ.get("PAGETRACK_TOKEN_FILE", DEFAULT_TOKEN_FILE))
    env = dict(os.environ)
    if not env.get("PAGETRACK_TOKEN") and token_file.is_file():
        env["PAGETRACK_TOKEN"] = token_file.read_text().strip()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.touch()

    child: subprocess.Popen[bytes] | None = None
    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pause = 1.0
    while not stopping.is_set():
        repair(out)
        seq = next_seq(out)
        print(f"consumer: watching {vm} from seq {seq} into {out}", file=sys.stderr, flush=True)
        started = time.monotonic()
        with open(out, "ab") as sink:
            child = subprocess.Popen(
                ["pagetrack", "watch", vm, "--format", "jsonl", "--from-seq", str(seq)],
                stdout=sink, env=env,
            )
            rc = child.wait()
        if stopping.is_set():
            break
        # quick failures (daemon not up yet, VM not created yet) back off up to 10 s
        pause = 1.0 if time.monotonic() - started > 30 else min(pause * 2, 10.0)
        print(f"consumer: pagetrack watch exited ({rc}); again in {pause:.0f} s",
              file=sys.stderr, flush=True)
        stopping.wait(pause)
    return 0


if __name__ == "__main__":
    sys.exit(main())
