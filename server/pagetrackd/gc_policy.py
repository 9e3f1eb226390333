"""How the daemon's process runs Python's cyclic garbage collector.

A full (generation 2) collection walks every object the collector tracks. A daemon with a
thousand VMs and a thousand Watch streams tracks some 200k objects, and a full collection
then holds the event loop for 40-140 ms of CPU on a 2-core machine (measured with
``gc.callbacks``): every write and every stream waits that long. CPython runs one when
more than 10 younger (generation 1) collections have run and the objects that survived
them grew the long-lived set by a quarter (Python's gcmodule.c, ``collect_generations``);
a daemon whose histories fill up steadily meets that every few tens of seconds.

So the process, before it builds anything:

* freezes what the imports made (modules, classes, functions: some 50k objects that live
  as long as the process; ``gc.freeze``), so no collection walks them again;
* asks for a full collection only after 1,000 younger collections instead of 10 (the
  quarter-growth rule still applies): full collections become rare, not gone. Young
  collections are unchanged, so short-lived reference cycles (an exception and its
  traceback) are freed as before; cycles that outlive two young collections (a closed
  stream's objects) wait for the next full collection.
"""

from __future__ import annotations

import gc

#: younger collections between two full ones (CPython's default is 10)
FULL_COLLECTION_EVERY = 1000


def configure() -> None:
    """Freeze the objects made so far and make full collections rare (see the module)."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
