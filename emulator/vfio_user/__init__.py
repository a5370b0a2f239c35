"""vfio-user: the wire protocol, a server for a device backend, and a client.

Modules, bottom up (import what you need; this package imports nothing eagerly):

* ``protocol``  constants, every wire layout (``struct.Struct``), the error types
* ``messages``  typed request/reply dataclasses with ``parts()`` / ``decode()``
* ``caps``      region-info capability chains (sparse mmap)
* ``codec``     sans-IO ``Connection(role)``: ``receive_data`` / ``next_event`` /
  ``send`` / ``next_read_size``
* ``irq``       ``IrqTable``: eventfds and masks per irq index (implements ``IrqLines``)
* ``session``   one client's negotiation, DMA map, interrupts and command handlers
* ``sockio``    the recvmsg/sendmsg calls (fds via SCM_RIGHTS)
* ``server``    ``VfioUserServer(path, backend, loop, log)`` on an asyncio loop
* ``client``    blocking ``VfioUserClient(path, timeout)``
* ``testing``   ``ServerThread(backend)``: a server on its own loop thread, for tests
* ``backend``   the ``DeviceBackend`` interface a device implements
"""
