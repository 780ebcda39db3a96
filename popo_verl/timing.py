"""Truthful device timing for POPO's own per-step work (EMA, drift, feature noise).

On an asynchronous device a wall clock around a few kernel launches measures the launches, not the work.
`DeviceTimer` brackets each span with CUDA events and reads them once, when the step's figures are asked
for (one synchronize per step, not one per span); the CPU runs its kernels synchronously, so there the
wall clock is the truth.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class DeviceTimer:
    """Sum of the device time of the spans it wrapped since the last `pop_seconds`."""

    def __init__(self) -> None:
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0

    @contextmanager
    def span(self, device: torch.device | str):
        device = torch.device(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((start, end))
            return
        synchronize = device.type != "cpu" and torch.accelerator.is_available()
        if synchronize:  # another accelerator: no events here, so wait for its queue on both sides
            torch.accelerator.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if synchronize:
                torch.accelerator.synchronize()
            self._seconds += time.perf_counter() - t0

    def pop_seconds(self) -> float:
        seconds, self._seconds = self._seconds, 0.0
        if self._events:
            self._events[-1][1].synchronize()
            seconds += sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
            self._events.clear()
        return seconds
