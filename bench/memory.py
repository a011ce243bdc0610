"""Peak memory of a block of work: CUDA's allocator peak, or the process RSS sampled in a thread."""
from __future__ import annotations

import threading
import time


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim), so the RSS at entry does not
    include memory earlier work freed but the allocator kept (that would hide the next peak)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: RSS peaks may be understated
        pass


class PeakMemory:
    """Context manager; `peak_mb` is the peak above the level at entry (CUDA: allocated bytes)."""

    def __init__(self, device: str = "cpu", interval_s: float = 0.005):
        self.device, self.interval_s = device, interval_s
        self.peak_mb = 0.0

    def __enter__(self):
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        import psutil
        _release_freed_memory()   # so memory freed by earlier work is not reused unseen
        self._proc = psutil.Process()
        self._start = self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._start) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.peak_mb = (self._peak - self._start) / 2**20
        return False
