"""The control socket of an emulator process: JSON-RPC 2.0 over a UNIX socket.

``server.ControlServer`` runs on the process's asyncio loop; methods are
registered by name (``register``).  ``client.ControlClient`` is a blocking
client (the migration tool, tests).  Wire format: ``docs/control-socket.md``.
It borrows only the fd-passing socket helpers of ``emulator.vfio_user`` (sockio,
close_fds) and knows nothing of vfio-user messages, PCI or NVMe.
"""
from emulator.control.client import ControlClient, ControlError
from emulator.control.server import ControlServer, MethodError, Reply, Request

__all__ = ["ControlClient", "ControlError", "ControlServer", "MethodError", "Reply", "Request"]
