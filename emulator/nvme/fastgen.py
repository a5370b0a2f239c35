"""The generation of the I/O fast path's cached conditions (emulator/nvme/fastpath.py).

The fast path keeps, per controller, what is costly to work out on every doorbell: the
attached namespaces it may serve (open, no Write Uncorrectable marks, its table for the C
code), whether a User Data Migration Queue logs the controller's writes (TP4159), whether a
sanitize operation is in progress.  Every place that changes one of these calls
:func:`bump` after the change; the fast path compares one integer per call and works the
conditions out again when it moved.  The places: namespace create, delete, attach, detach
(ns_mgmt.py), open/reformat/close of a namespace (namespace.py), Write Uncorrectable marks
stored (uncorrectable.py), sanitize start and end (sanitize.py), user-data logging start and
stop and a CDQ created or deleted (migration/udlog.py, migration/cdq.py, migration/model.py),
a controller state restored (controller.py).  One counter for the whole process: a change
in one controller (an MMC's UDMQ) can concern another.
"""
from __future__ import annotations

value = 0  # read by the fast path on every call; only ever grows


def bump() -> None:
    """Something the fast path caches changed: it works its conditions out again."""
    global value
    value += 1
