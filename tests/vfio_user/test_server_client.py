"""Server and client over a real UNIX socket, with the fake backend of conftest.py."""
from __future__ import annotations

import errno
import json
import mmap
import os
import socket
import stat

import pytest

from conftest import (BAR0_SIZE, BAR2_SIZE, BOOM, VENDOR_DEVICE, FakeBackend, assert_serves_fresh_client, connect, fired,
                      guest_ram)
from emulator.memory import DmaError, MappedMemory
from emulator.vfio_user import messages as m
from emulator.vfio_user import protocol as p
from emulator.vfio_user.client import VfioUserClient, VfioUserError
from emulator.vfio_user.codec import Connection, Role
from emulator.vfio_user.testing import ServerThread

CONFIG = p.PCI_CONFIG_REGION_INDEX
TRIGGER_FD = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER
QEMU_VERSION_JSON = (b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
                     b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
                     b'"pgsize": 4096}, "write_multiple": true}}')


def eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(n)]


def test_socket_is_private(server: ServerThread) -> None:
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_qemu_like_attach(server: ServerThread, backend: FakeBackend) -> None:
    """The attach sequence of vfio-user-protocol.md §4 / §4.0, as QEMU 11.1 sends it."""
    c = VfioUserClient(server.path)
    # 1. VERSION with QEMU's JSON; the reply is compact, minor 0, shorter than the request
    request = p.VERSION.pack(0, 0) + QEMU_VERSION_JSON + b"\0"
    c.send_raw(p.HEADER.pack(0, p.Command.VERSION, 16 + len(request), 0, 0) + request)
    reply = c.recv_raw()
    assert reply is not None and not reply.is_error and reply.msg_size < 16 + len(request)
    assert reply.payload == (b"\0\0\0\0" + b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,'
                             b'"pgsizes":4096,"max_dma_maps":1024,"write_multiple":true}}\0')
    c.conn._next_id = 1  # the raw VERSION used id 0
    c.max_msg_fds, c.max_data_xfer_size = 8, 1 << 20
    # 2. DMA_MAP x N, pipelined ("nowait"), then wait for them
    ram_fd, ram = guest_ram(0x200000)
    ids = [c.send(m.DmaMapRequest(0, 0xA0000, 3, 0, os.dup(ram_fd))),
           c.send(m.DmaMapRequest(0xC0000, 0x140000, 3, 0xC0000, os.dup(ram_fd))),
           c.send(m.DmaMapRequest(0xFFFC0000, 0x40000, p.DMA_FLAG_READ))]
    for msg_id in ids:
        c.wait(msg_id)
    # 3.-5. device, regions, ERR irq
    info = c.device_info()
    assert info.flags & p.DEVICE_FLAGS_PCI and info.num_regions >= 8 and info.num_irqs >= 3
    regions = {i: c.region_info(i) for i in (0, 1, 2, 3, 4, 5, CONFIG)}
    assert regions[0].size == BAR0_SIZE and regions[CONFIG].size == 4096 and regions[1].size == 0
    assert regions[2].fd is not None and regions[2].sparse_areas == [(0x1000, 0x1000)]
    assert c.irq_info(p.PCI_ERR_IRQ_INDEX).count == 1
    # 6.-9. config space, ROM sizing, BAR register, MSI-X
    assert c.region_read(CONFIG, 0, 4096)[:4] == VENDOR_DEVICE
    original = c.region_read(CONFIG, 0x30, 4)
    c.region_write(CONFIG, 0x30, b"\x00\xf8\xff\xff")
    c.region_read(CONFIG, 0x30, 4)
    c.region_write(CONFIG, 0x30, original)
    c.region_read(CONFIG, 0x10, 4)
    assert c.irq_info(p.PCI_MSIX_IRQ_INDEX).count == 16
    # 10. mmap the sparse area of BAR2: stores land in the backend's memfd
    area = mmap.mmap(regions[2].fd, 0x1000, offset=regions[2].offset + 0x1000)
    area[0:4] = b"ring"
    assert os.pread(backend.bar2_fd, 4, 0x1000) == b"ring"
    area.close()
    os.close(regions[2].fd)
    # 12.-13. INTx with a resampler, ERR eventfd
    intx, resample, err = eventfds(3)
    c.set_irqs(p.PCI_INTX_IRQ_INDEX, TRIGGER_FD, 0, 1, [intx])
    c.set_irqs(p.PCI_INTX_IRQ_INDEX, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK, 0, 1)
    c.set_irqs(p.PCI_INTX_IRQ_INDEX, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_UNMASK, 0, 1, [resample])
    c.set_irqs(p.PCI_INTX_IRQ_INDEX, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_UNMASK, 0, 1)
    c.set_irqs(p.PCI_ERR_IRQ_INDEX, TRIGGER_FD, 0, 1, [err])
    # 14. machine reset
    c.set_irqs(p.PCI_INTX_IRQ_INDEX, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER, 0, 0)
    c.region_write(CONFIG, 4, b"\x00\x00")
    c.reset()
    for bar in range(6):
        c.region_write(CONFIG, 0x10 + 4 * bar, bytes(4))
    # 15. runtime: posted BAR0 writes (doorbells), then a read that must see them
    for i in range(50):
        c.region_write(0, 0x1000, i.to_bytes(4, "little"), posted=True)
    assert c.region_read(0, 0x1000, 4) == (49).to_bytes(4, "little")
    # MSI-X enable with no vector, then vectors 0..2
    c.set_irqs(p.PCI_MSIX_IRQ_INDEX, TRIGGER_FD, 0, 1)
    vectors = eventfds(3)
    c.set_irqs(p.PCI_MSIX_IRQ_INDEX, TRIGGER_FD, 0, 3, vectors)

    def device_side() -> tuple[bytes, bool, bool]:
        mem = backend.memory
        assert mem is not None
        mem.write(0x1000, b"completion")
        with pytest.raises(DmaError):
            mem.read(0xFFFC0000, 4)  # mapped without an fd: reachable only by message DMA
        return (bytes(mem.read(0xC1000, 4)), backend.irqs.trigger(p.PCI_MSIX_IRQ_INDEX, 1),  # type: ignore[union-attr]
                backend.irqs.trigger(p.PCI_MSIX_IRQ_INDEX, 5))  # type: ignore[union-attr]

    ram[0xC1000:0xC1004] = b"prp!"
    assert server.call(device_side) == (b"prp!", True, False)
    assert ram[0x1000:0x100A] == b"completion"
    assert [fired(fd) for fd in vectors] == [0, 1, 0]
    assert backend.resets == 1 and backend.attached == 1
    assert p.PCI_MSIX_IRQ_INDEX in backend.irq_changes
    c.close()
    server.wait_disconnected()
    for fd in [ram_fd, intx, resample, err, *vectors]:
        os.close(fd)
    ram.close()


def test_dma_map_with_memfd_and_without_fd(server: ServerThread, backend: FakeBackend,
                                           client: VfioUserClient) -> None:
    fd, ram = guest_ram(0x10000)
    client.dma_map(0x100000, 0x8000, fd, offset=0x8000)
    client.dma_map(0x200000, 0x1000)  # no fd
    client.dma_map(0x300000, 0x1000, fd, flags=p.DMA_FLAG_READ)  # read-only
    os.close(fd)  # the server holds its own reference
    with pytest.raises(VfioUserError) as e:
        client.dma_map(0x104000, 0x1000)
    assert e.value.errno == errno.EEXIST

    def regions() -> list[tuple[int, int, bool, bool]]:
        assert backend.memory is not None
        return [(r.iova, r.size, r.writable, r.mem is not None) for r in backend.memory.regions()]

    assert server.call(regions) == [(0x100000, 0x8000, True, True), (0x200000, 0x1000, True, False),
                                    (0x300000, 0x1000, False, True)]
    server.call(lambda: backend.memory.write(0x100010, b"hello"))  # type: ignore[union-attr]
    assert ram[0x8010:0x8015] == b"hello"
    with pytest.raises(DmaError):
        server.call(lambda: backend.memory.write(0x300000, b"x"))  # type: ignore[union-attr]
    reply = client.dma_unmap(0x100000, 0x8000)
    assert (reply.iova, reply.size, reply.argsz) == (0x100000, 0x8000, 24)  # echoed
    with pytest.raises(VfioUserError) as e:  # it must match a previous map (protocol 0.9.2)
        client.dma_unmap(0x100000, 0x8000)
    assert e.value.errno == errno.ENOENT
    client.dma_unmap(0, 0, p.DMA_UNMAP_ALL)
    assert server.call(regions) == []
    ram.close()


def test_dma_map_refuses_ranges_past_the_end_of_the_file(client: VfioUserClient) -> None:
    fd, ram = guest_ram(0x1000)
    with pytest.raises(VfioUserError) as e:
        client.dma_map(0, 0x2000, fd)  # an access past EOF would SIGBUS the server
    assert e.value.errno == errno.EINVAL
    os.close(fd)
    ram.close()


def test_region_read_write_and_posted(server: ServerThread, backend: FakeBackend, client: VfioUserClient) -> None:
    client.region_write(0, 0x20, b"\x11\x22\x33\x44\x55\x66\x77\x88")
    client.region_write(0, 0x28, b"\x01\x02", posted=True)
    assert client.region_read(0, 0x20, 10) == b"\x11\x22\x33\x44\x55\x66\x77\x88\x01\x02"
    client.region_write_multi([(0, 0x40, b"\xaa"), (0, 0x41, b"\xbb\xcc"), (0, 0x40, b"\xdd")])
    assert client.region_read(0, 0x40, 3) == b"\xdd\xbb\xcc"
    assert server.call(lambda: backend.writes[-4:]) == [(0, 0x28, b"\x01\x02"), (0, 0x40, b"\xaa"),
                                                        (0, 0x41, b"\xbb\xcc"), (0, 0x40, b"\xdd")]


def test_transfers_are_chunked_at_the_server_limit(backend: FakeBackend) -> None:
    with ServerThread(backend, max_data_xfer_size=4096) as srv, connect(srv) as c:
        assert c.max_data_xfer_size == 4096
        data = os.urandom(0x3000)  # three chunks each way
        c.region_write(0, 0, data)
        assert c.region_read(0, 0, len(data)) == data
        with pytest.raises(VfioUserError) as e:
            c.call(m.RegionReadRequest(0, 0, 8192))  # over the limit, unchunked
        assert e.value.errno == errno.EINVAL
        assert srv.errors == []


def test_backend_errors_map_to_errno(server: ServerThread, client: VfioUserClient) -> None:
    with pytest.raises(VfioUserError) as e:
        client.region_read(0, BAR0_SIZE - 2, 4)  # ValueError
    assert e.value.errno == errno.EINVAL
    with pytest.raises(VfioUserError) as e:
        client.region_read(0, BOOM, 4)  # RuntimeError
    assert e.value.errno == errno.EIO
    client.region_write(0, BOOM, b"1234", posted=True)  # fails silently: no reply for NO_REPLY
    with pytest.raises(VfioUserError) as e:
        client.region_info(42)
    assert e.value.errno == errno.EINVAL
    for call, err in [(lambda: client.device_feature(p.DEVICE_FEATURE_GET | 1, argsz=16), errno.ENOTTY),
                      (lambda: client.call(m.MigDataReadRequest(4096)), errno.EINVAL),
                      (lambda: client.call(m.MigDataWriteRequest(b"x")), errno.EINVAL),
                      (lambda: client.call(m.VersionRequest()), errno.EINVAL),  # second VERSION
                      (lambda: client.irq_info(9), errno.EINVAL)]:
        with pytest.raises(VfioUserError) as e:
            call()
        assert e.value.errno == err
    assert client.region_read(CONFIG, 0, 4) == VENDOR_DEVICE


def test_commands_before_version_are_refused(server: ServerThread) -> None:
    with connect(server, negotiate=False) as c:
        with pytest.raises(VfioUserError) as e:
            c.region_read(CONFIG, 0, 4)
        assert e.value.errno == errno.EINVAL
        c.negotiate()
        assert c.region_read(CONFIG, 0, 4) == VENDOR_DEVICE


def test_region_info_truncation_and_retry(client: VfioUserClient) -> None:
    small = client.call(m.RegionInfoRequest(2, argsz=32))
    assert small.argsz == 64 and small.caps == [] and not small.flags & p.REGION_FLAG_CAPS
    assert small.flags & p.REGION_FLAG_MMAP and small.fd is not None  # the fd comes every time
    os.close(small.fd)
    full = client.region_info(2)
    assert full.argsz == 64 and full.flags & p.REGION_FLAG_CAPS and full.sparse_areas == [(0x1000, 0x1000)]
    assert full.size == BAR2_SIZE
    os.close(full.fd)  # type: ignore[arg-type]


def test_set_irqs_assign_chunk_deassign_disable(server: ServerThread, backend: FakeBackend,
                                                client: VfioUserClient) -> None:
    fds = eventfds(12)  # more than max_msg_fds (8): the client sends two chunks
    client.set_irqs(p.PCI_MSIX_IRQ_INDEX, TRIGGER_FD, 2, 12, fds)
    trigger = lambda v: server.call(lambda: backend.irqs.trigger(p.PCI_MSIX_IRQ_INDEX, v))  # type: ignore  # noqa: E731
    assert [trigger(v) for v in range(16)] == [False, False] + [True] * 12 + [False, False]
    assert [fired(fd) for fd in fds] == [1] * 12
    client.set_irqs(p.PCI_MSIX_IRQ_INDEX, TRIGGER_FD, 4, 2)  # 0 fds: de-assign 4 and 5
    assert [trigger(v) for v in (3, 4, 5, 6)] == [True, False, False, True]
    client.set_irqs(p.PCI_MSIX_IRQ_INDEX, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER, 7, 2)  # fire 7, 8
    assert [fired(fd) for fd in fds] == [0, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    client.set_irqs(p.PCI_MSIX_IRQ_INDEX, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER, 0, 0)  # disable all
    assert not any(trigger(v) for v in range(16))
    for bad in [(p.PCI_MSIX_IRQ_INDEX, TRIGGER_FD, 15, 2), (7, TRIGGER_FD, 0, 1),
                (p.PCI_ERR_IRQ_INDEX, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK, 0, 1),
                (p.PCI_MSIX_IRQ_INDEX, TRIGGER_FD | p.IRQ_SET_ACTION_MASK, 0, 1)]:
        with pytest.raises(VfioUserError) as e:
            client.set_irqs(*bad)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(VfioUserError):
        client.set_irqs(p.PCI_MSIX_IRQ_INDEX, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER, 0, 1, [fds[0]])
    for fd in fds[1:]:
        os.close(fd)


def test_intx_automask_and_resample_unmask(server: ServerThread, backend: FakeBackend,
                                           client: VfioUserClient) -> None:
    intx, resample = eventfds(2)
    client.set_irqs(p.PCI_INTX_IRQ_INDEX, TRIGGER_FD, 0, 1, [intx])
    client.set_irqs(p.PCI_INTX_IRQ_INDEX, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_UNMASK, 0, 1, [resample])
    lines = backend.irqs
    assert server.call(lambda: (lines.trigger(0, 0), lines.trigger(0, 0), lines.masked(0, 0)))  # type: ignore
    assert fired(intx) == 1  # the second one is pending behind the automask
    os.write(resample, (1).to_bytes(8, "little"))  # guest EOI, as KVM's resampler signals it
    assert server.wait_until(lambda: fired(intx)) == 1  # unmasked, and the pending one fired
    assert server.call(lambda: lines.masked(0, 0))  # type: ignore[union-attr]  # automasked again
    client.set_irqs(p.PCI_INTX_IRQ_INDEX, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_UNMASK, 0, 1)
    assert server.call(lambda: lines.masked(0, 0)) is False  # type: ignore[union-attr]
    assert backend.irq_changes.count(p.PCI_INTX_IRQ_INDEX) >= 3
    os.close(intx)
    os.close(resample)


def test_disconnect_and_reconnect_keeps_device_state(server: ServerThread, backend: FakeBackend) -> None:
    fd, ram = guest_ram(0x4000)
    with connect(server) as c:
        c.dma_map(0, 0x4000, fd)
        vec = eventfds(1)
        c.set_irqs(p.PCI_MSIX_IRQ_INDEX, TRIGGER_FD, 0, 1, vec)
        c.region_write(0, 0x100, b"kept")
        c.reset()
        lines = backend.irqs
    server.wait_disconnected()
    assert server.call(lambda: (backend.detached, backend.memory, lines.trigger(2, 0))) == (1, None, False)
    with connect(server) as c:
        assert c.region_read(0, 0x100, 4) == b"kept"
        assert server.call(lambda: backend.memory.regions()) == []  # type: ignore[union-attr]
        assert backend.attached == 2 and backend.resets == 1
    server.wait_disconnected()
    os.close(fd)
    os.close(vec[0])
    ram.close()


def test_one_client_at_a_time(server: ServerThread) -> None:
    first = connect(server)
    second = VfioUserClient(server.path, timeout=0.3)  # waits in the listen backlog
    second.send(m.VersionRequest(0, 0, {}))
    with pytest.raises(TimeoutError):
        second.recv_raw()
    assert first.region_read(CONFIG, 0, 4) == VENDOR_DEVICE
    first.close()
    second.sock.settimeout(5)
    reply = second.recv_raw()  # served once the first one left
    assert reply is not None and reply.command == p.Command.VERSION and not reply.is_error
    second.close()
    assert_serves_fresh_client(server)


def test_stale_socket_is_replaced_but_not_a_live_one_or_a_file(backend: FakeBackend, tmp_path) -> None:
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    with ServerThread(backend, path) as srv:
        assert_serves_fresh_client(srv)
        with pytest.raises(OSError) as e:
            ServerThread(FakeBackend(), path).start()
        assert e.value.errno == errno.EADDRINUSE
    assert not os.path.exists(path)
    (tmp_path / "file").write_text("precious")
    with pytest.raises(FileExistsError):
        ServerThread(backend, str(tmp_path / "file")).start()
    assert (tmp_path / "file").read_text() == "precious"


def test_client_answers_server_dma_requests() -> None:
    a, b = socket.socketpair()
    memory = MappedMemory()
    fd, ram = guest_ram(0x2000)
    memory.add(0x10000, 0x2000, fd)
    client = VfioUserClient(sock=a, memory=memory)
    server = Connection(Role.SERVER)
    ram[0x10:0x14] = b"data"
    for req in (m.DmaReadRequest(0x10010, 4), m.DmaWriteRequest(0x10020, b"back"), m.DmaReadRequest(0x90000, 4)):
        b.sendall(server.send(req)[0])
    assert client.process_requests(0.2) == 3
    server.receive_data(b.recv(4096))
    replies = []
    while isinstance(ev := server.next_event(), m.Message):
        replies.append(ev)
    assert replies == [m.DmaReadReply(0x10010, b"data", msg_id=0), m.DmaWriteReply(0x10020, 4, msg_id=1),
                       m.ErrorReply(p.Command.DMA_READ, errno.EFAULT, msg_id=2)]
    assert ram[0x20:0x24] == b"back"
    client.close()
    b.close()
    memory.clear()
    ram.close()
    os.close(fd)


def test_hand_over_a_live_connection(backend: FakeBackend) -> None:
    """detach_connection() on one server, adopt_connection() on another: the client notices nothing."""
    fd, ram = guest_ram(0x4000)
    other = FakeBackend()
    with ServerThread(backend) as a, ServerThread(other) as b, connect(a) as c:
        c.dma_map(0x1000, 0x4000, fd)
        vec = eventfds(1)
        c.set_irqs(p.PCI_MSIX_IRQ_INDEX, TRIGGER_FD, 3, 1, vec)
        sock, state = a.call(a.server.detach_connection)
        assert json.dumps([state.client_caps, state.dma_maps])  # all but the fds is serialisable
        b.call(b.server.adopt_connection, sock, state)
        assert c.region_read(CONFIG, 0, 4) == VENDOR_DEVICE
        assert b.call(lambda: other.memory.read(0x1000, 4)) == bytes(4)  # type: ignore[union-attr]
        assert b.call(lambda: other.irqs.trigger(p.PCI_MSIX_IRQ_INDEX, 3)) is True  # type: ignore[union-attr]
        assert fired(vec[0]) == 1
        assert backend.detached == 1 and other.attached == 1
        assert_serves_fresh_client(a)  # the old owner accepts new clients again
        assert a.errors == [] and b.errors == []
    other.close()
    os.close(fd)
    os.close(vec[0])
    ram.close()


def test_hand_over_in_steps(backend: FakeBackend) -> None:
    """pause, export, adopt without reading, release, start: the messages the client sent while
    paused are answered by the new owner; masks and pending interrupts move too."""
    fd, ram = guest_ram(0x4000)
    other = FakeBackend()
    with ServerThread(backend) as a, ServerThread(other) as b, connect(a) as c:
        c.dma_map(0x1000, 0x4000, fd)
        intx = eventfds(1)
        c.set_irqs(p.PCI_INTX_IRQ_INDEX, TRIGGER_FD, 0, 1, intx)
        c.set_irqs(p.PCI_INTX_IRQ_INDEX, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK, 0, 1)
        assert a.call(lambda: backend.irqs.trigger(0, 0))  # type: ignore[union-attr]  # pending behind the mask
        a.call(a.server.pause)
        queued = c.send(m.RegionReadRequest(CONFIG, 0, 4))  # waits in the socket
        sock_fd, state, device = a.call(a.server.export_connection)
        assert device == {} and state.irq_masks == [(p.PCI_INTX_IRQ_INDEX, 0, True, True)]
        moved = type(state).from_dict(json.loads(json.dumps(state.to_dict())), state.fds())
        b.call(lambda: b.server.adopt_connection(socket.socket(fileno=sock_fd), moved, reading=False))
        a.call(a.server.release)
        assert a.call(lambda: backend.detached) == 1
        b.call(b.server.start_reading)
        assert c.wait(queued).data == VENDOR_DEVICE
        assert b.call(lambda: other.irqs.masked(0, 0)) is True  # type: ignore[union-attr]
        c.set_irqs(p.PCI_INTX_IRQ_INDEX, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_UNMASK, 0, 1)
        assert b.wait_until(lambda: fired(intx[0])) == 1  # the pending one, delivered by b
        assert a.errors == [] and b.errors == []
    other.close()
    os.close(fd)
    os.close(intx[0])
    ram.close()


def test_many_posted_writes_stay_ordered(server: ServerThread, backend: FakeBackend, client: VfioUserClient) -> None:
    """Posted (NO_REPLY) writes pile up in the socket and still apply in order."""
    for i in range(2000):
        client.region_write(0, 0x1000 + (i % 16) * 4, i.to_bytes(4, "little"), posted=True)
    assert client.region_read(0, 0x1000 + (1999 % 16) * 4, 4) == (1999).to_bytes(4, "little")
    assert server.call(lambda: [int.from_bytes(d, "little") for _, off, d in backend.writes]) == list(range(2000))


def test_replies_queue_while_the_client_does_not_read(server: ServerThread, backend: FakeBackend,
                                                      client: VfioUserClient) -> None:
    """400 KiB of replies do not fit the socket: the server queues them, pauses reading, and resumes.

    (Few enough requests that this single-threaded client's own sends never block.)
    """
    ids = [client.send(m.RegionReadRequest(CONFIG, 0, 4096)) for _ in range(100)]
    assert server.wait_until(lambda: server.server._client.out)  # type: ignore[union-attr]
    expected = bytes(backend.config)
    assert all(client.wait(i).data == expected for i in ids)
    assert client.region_read(CONFIG, 0, 4) == VENDOR_DEVICE


def test_no_fd_leaks_across_clients(server: ServerThread) -> None:
    def cycle() -> None:
        fd, ram = guest_ram(0x4000)
        with connect(server) as c:
            dups = [os.dup(fd) for _ in range(4)]  # like QEMU: a fresh dup of one memfd per map
            for i, dup in enumerate(dups):
                c.dma_map(i * 0x4000, 0x4000, dup)
            vec = eventfds(4)
            c.set_irqs(p.PCI_MSIX_IRQ_INDEX, TRIGGER_FD, 0, 3, vec[:3])
            c.set_irqs(p.PCI_INTX_IRQ_INDEX, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_UNMASK, 0, 1, vec[3:])
            info = c.region_info(2)
            os.close(info.fd)  # type: ignore[arg-type]
            c.dma_unmap(0, 0x4000)
        server.wait_disconnected()
        for x in (fd, *dups, *vec):
            os.close(x)
        ram.close()

    cycle()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        cycle()
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("kwargs", [{"max_msg_fds": 17}, {"max_msg_fds": 0}, {"max_data_xfer_size": 2048},
                                    {"max_data_xfer_size": p.MAX_MSG_SIZE}])
def test_server_refuses_limits_qemu_or_the_codec_cannot_take(backend: FakeBackend, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ServerThread(backend, "/nonexistent/s.sock", **kwargs)
