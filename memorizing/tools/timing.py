"""Wall-clock timing of jitted calls, for the benchmark scripts."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional, Tuple

import jax


def back_to_back_ms(fn: Callable, *args, calls: int = 5, repeats: int = 5,
                    slow_s: Optional[float] = None) -> Tuple[float, Any]:
  """(ms per call of fn(*args), the last output): the median over `repeats` of
  the wall time of `calls` back-to-back calls, synchronised once at the end,
  divided by `calls`; after one warm-up call. Back-to-back calls hide the host's
  dispatch behind the device. If the warm-up took longer than `slow_s` seconds,
  one call per repeat and at most 3 repeats."""
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  if slow_s is not None and time.perf_counter() - t > slow_s:
    calls, repeats = 1, min(repeats, 3)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) * 1e3 / calls)
  return statistics.median(times), out
