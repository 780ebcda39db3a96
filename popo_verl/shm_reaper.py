"""Removes a dead vLLM engine's shared-memory segments from /dev/shm.

vLLM's engine and its workers talk through shared-memory ring buffers (`psm_*` segments of 160-240 MB each on the
CPU). They are unlinked only on a clean shutdown; when Ray ends a run (it SIGKILLs its actors) or the engine dies,
they stay in /dev/shm, which is memory, run after run. `popo_verl.rollout.vllm_cpu` starts this process for its vLLM
server with `--detach`: it forks away from the server into a session of its own, because Ray kills a worker's
child processes with the worker (whatever their session), and a detached one is no longer its child. It watches the server
and every process below it, collects the /dev/shm files they map (the ring buffers, and the multiprocessing
semaphores that vLLM's processes hand each other at start-up, `sem.mp-*`), and once all of them have exited
unlinks those still there. Only files under /dev/shm, and only ones a watched process mapped, are ever touched.

    python -m popo_verl.shm_reaper --root PID
"""

from __future__ import annotations

import argparse
import os
import time

SHM_DIR = "/dev/shm"


def mapped_shm_inodes(pids) -> set[int]:
    """The inodes of the /dev/shm files these processes map now, from /proc/PID/maps.

    By inode, not by name: glibc's sem_open creates a semaphore as a temporary file, maps it and only then links
    it under its name (`sem.mp-*` for multiprocessing's locks), so its creator's maps show `sem.XXXXXX (deleted)`
    and never the name it lives under. tmpfs numbers inodes from a counter, so a number is not soon reused.
    """
    inodes: set[int] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as fh:
                for line in fh:
                    parts = line.rstrip("\n").split(maxsplit=5)  # address perms offset dev inode [path]
                    if len(parts) == 6 and parts[5].startswith(SHM_DIR + "/") and parts[4].isdigit():
                        inodes.add(int(parts[4]))
        except OSError:
            continue
    return inodes


def shm_files_of(inodes) -> list[str]:
    """The paths under /dev/shm now linked to one of these inodes."""
    try:
        with os.scandir(SHM_DIR) as entries:
            return sorted(e.path for e in entries if e.is_file(follow_symlinks=False) and e.inode() in inodes)
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """pid and every process below it (from /proc: no dependency, so this process starts at once)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:  # a zombie has exited: its mappings are gone
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def reap(root: int, poll_s: float = 2.0) -> list[str]:
    """Watch root and its descendants until all have exited; then unlink the /dev/shm files they mapped."""
    seen: set[int] = set()
    inodes: set[int] = set()
    while True:
        live = [p for p in descendants(root) if alive(p)] if alive(root) else []
        seen.update(live)
        inodes |= mapped_shm_inodes(live)
        if not any(alive(p) for p in seen):
            break
        time.sleep(poll_s)
    removed = []
    for path in shm_files_of(inodes):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m popo_verl.shm_reaper", description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=int, required=True, help="the process whose tree to watch")
    ap.add_argument("--poll", type=float, default=2.0, help="seconds between looks")
    ap.add_argument("--detach", action="store_true",
                    help="return at once and watch from a forked process of its own session (no one's child)")
    args = ap.parse_args(argv)
    if args.detach:
        if os.fork() > 0:
            os._exit(0)
        os.setsid()
    reap(args.root, args.poll)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
