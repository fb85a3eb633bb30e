"""Batches assembled ahead of the step that needs them, by a background thread."""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
  """The items of `items`, in order, produced up to `depth` ahead by a background thread.

  Why: the host builds each batch (bucketing, padding, the per-process slice) while the
  accelerator runs the previous step, even across the steps where the loop waits on the device
  (metrics, checkpoints). An exception raised by `items` is raised here, at the item where it
  happened. Closing the returned generator stops the thread after the item it is producing.
  """
  if depth < 1:
    raise ValueError(f"prefetch depth must be >= 1, got {depth}.")
  ready: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce() -> None:
    try:
      for item in items:
        if not put((item, None)):
          return
    except BaseException as error:  # pylint: disable=broad-except
      put((_DONE, error))
      return
    put((_DONE, None))

  thread = threading.Thread(target=produce, name="prefetch", daemon=True)
  thread.start()
  try:
    while True:
      item, error = ready.get()
      if error is not None:
        raise error
      if item is _DONE:
        return
      yield item
  finally:
    stop.set()
    thread.join(timeout=5)
