#!/usr/bin/python3
"""Runs a command (workspacectl shell ...) on a terminal of its own and types a line into it
at once, before the command has reached the workspace or put the terminal in raw mode, as a
user typing ahead does; then `exit`. Prints what the terminal showed, as JSON.

Usage: typeahead.py line|partial COMMAND...  (partial: the line's end is typed only once the
command has attached, so the start of the line waited in the terminal's line buffer)."""
import json
import os
import pty
import select
import sys
import time

MODE = sys.argv[1]
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
os.write(fd, b"echo TYPED$((40+2))" + (b"\n" if MODE == "line" else b""))
out = b""


def read_for(seconds, until=None):
    global out
    deadline = time.time() + seconds
    while time.time() < deadline:
        if until is not None and until in out:
            return
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                return
            if not chunk:
                return
            out += chunk


if MODE == "partial":
    read_for(20, until=b"Attached")
    time.sleep(0.5)
    os.write(fd, b"\n")
read_for(20, until=b"TYPED42")
os.write(fd, b"exit\n")
read_for(10)
try:
    os.kill(pid, 9)
except ProcessLookupError:
    pass
os.waitpid(pid, 0)
print(json.dumps({"output": out.decode(errors="replace")}))
