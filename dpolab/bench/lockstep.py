"""Training workers in lockstep: one optimizer step at a time, taking turns, so that they share the machine's moods.

This machine is shared and noisy: the same step takes a third longer in one minute than in the next. Run one after
the other, TRL and dpolab meet different minutes and their ratio carries the noise of both. In lockstep each worker
is its own process (its own peak memory) and the coordinator lets them take turns:

    every worker: load, precompute, warm-up step 1           (all at once, untimed)
    for step 2..T:  for each worker (the order alternating by step):  "go" -> one step -> "done"
    a step's time runs from its "go" to its "done": only that worker was running

so that neighbouring steps of the two see the same machine. The protocol is one byte each way on two pipes per
worker; a worker that dies closes its pipe, and the coordinator reports its stderr.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["Gate", "run_lockstep", "worker_argv", "worker_env"]


def worker_argv(kind: str, spec_path: Path, out_path: Path) -> list[str]:
    """The command line of one worker (``dpolab.bench.workers``) in a fresh interpreter."""
    return [sys.executable, "-m", "dpolab.bench.workers", kind, str(spec_path), str(out_path)]


def worker_env(source: str | None = None) -> dict[str, str]:
    """The workers' environment: this one, offline, without tokenizers' own threads; with ``source`` (a folder holding
    another tree of dpolab, ``against.export_ref``) first on PYTHONPATH, so that the worker runs that dpolab."""
    path = {"PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))} if source else {}
    return {
        **os.environ,
        **path,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"),
    }


class Gate:
    """The worker's end of the protocol: ``step_done()`` at the end of each step; it returns when the coordinator
    lets the next step start. Records each step's start (the "go") and end, in ``time.monotonic()`` seconds
    (one clock for every process of the machine)."""

    def __init__(self, go_fd: int | None = None, done_fd: int | None = None):
        self.go_fd, self.done_fd = go_fd, done_fd
        self.starts: list[float] = [time.monotonic()]  # step 1 starts unannounced
        self.ends: list[float] = []

    def step_done(self) -> None:
        self.ends.append(time.monotonic())
        if self.done_fd is not None:
            os.write(self.done_fd, b"d")
            if os.read(self.go_fd, 1) != b"g":
                raise RuntimeError("the bench coordinator went away")
        self.starts.append(time.monotonic())

    def step_seconds(self, warmup: int) -> list[float]:
        """Durations of the steps after the warm-up, each from its start to its end."""
        return [end - start for start, end in zip(self.starts[warmup:], self.ends[warmup:])]

    def intervals(self) -> list[list[float]]:
        return [[start, end] for start, end in zip(self.starts, self.ends)]


def _await(proc: subprocess.Popen, fd: int, timeout: float, stderr_path: Path, label: str) -> None:
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready or os.read(fd, 1) != b"d":  # timed out, or the pipe closed: the worker is gone
        try:
            proc.wait(0 if not ready else 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        why = "timed out" if not ready else f"stopped with status {proc.returncode}"
        raise RuntimeError(f"bench worker {label} {why}:\n{stderr_path.read_text()[-4000:]}")


def run_lockstep(jobs: list[tuple[str, dict]], steps: int, timeout: float) -> list[dict]:
    """Run the training workers ``jobs`` ((kind, spec) pairs, each ``steps`` optimizer steps) in lockstep (module
    docstring); returns their results in order, each with ``wall_seconds``."""
    procs, pipes, labels = [], [], [f"{kind} ({spec.get('variant', kind)})" for kind, spec in jobs]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i, (kind, spec) in enumerate(jobs):
                go_r, go_w = os.pipe()
                done_r, done_w = os.pipe()
                spec_path, out_path, err_path = (Path(tmp, f"{i}.{x}") for x in ("spec.json", "out.json", "err"))
                spec_path.write_text(json.dumps({**spec, "gate": [go_r, done_w]}))
                with open(err_path, "w") as err:
                    procs.append(
                        subprocess.Popen(
                            worker_argv(kind, spec_path, out_path),
                            env=worker_env(spec.get("source")),
                            cwd=spec.get("source"),  # sys.path[0] is the working folder: the tree's dpolab
                            stdout=subprocess.DEVNULL,
                            stderr=err,
                            pass_fds=(go_r, done_w),
                        )
                    )
                os.close(go_r)
                os.close(done_w)
                pipes.append((go_w, done_r, out_path, err_path))
            start = time.perf_counter()
            for (_, done_r, _, err_path), proc, label in zip(pipes, procs, labels):  # step 1, all at once
                _await(proc, done_r, timeout, err_path, label)
            for step in range(2, steps + 1):
                order = range(len(jobs)) if step % 2 == 0 else reversed(range(len(jobs)))
                for i in order:
                    go_w, done_r, _, err_path = pipes[i]
                    os.write(go_w, b"g")
                    _await(procs[i], done_r, timeout, err_path, labels[i])
            results = []
            for (go_w, _, out_path, err_path), proc, label in zip(pipes, procs, labels):
                os.write(go_w, b"g")  # the last step's "go": finish and write the results
                if proc.wait(timeout) != 0:
                    raise RuntimeError(
                        f"bench worker {label} failed with status {proc.returncode}:\n{err_path.read_text()[-4000:]}"
                    )
                results.append({**json.loads(out_path.read_text()), "wall_seconds": time.perf_counter() - start})
            return results
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for go_w, done_r, *_ in pipes:
                os.close(go_w)
                os.close(done_r)
