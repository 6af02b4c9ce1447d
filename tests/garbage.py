"""What a block of test code left that only the cyclic GC can free."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def cyclic_garbage(kinds: tuple[type, ...]) -> Iterator[list[object]]:
    """Yields a list that, once the block ends, holds the objects of ``kinds`` made
    in the block that only the cyclic GC could free. Only ``kinds``: an earlier
    test's objects may become garbage meanwhile (its metrics, its TLS context)."""
    found: list[object] = []
    gc.collect()
    gc.disable()  # nothing made in the block is collected before it is counted
    try:
        yield found
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found.extend(o for o in gc.garbage if isinstance(o, kinds))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
