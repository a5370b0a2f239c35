"""Real Linux guests for nvme-emu: tool box, initramfs, QEMU runner, emulator process.

Provision once with ``bash scripts/guest-env`` (cached under ``$NVME_EMU_CACHE`` or
``~/.cache/nvme-emu``), then::

    from emulator.guest.env import GuestEnv
    from emulator.guest.emuproc import EmulatorProcess
    from emulator.guest.qemu import Guest, GuestSpec, VfioUserDevice, QemuNvme, run

    env = GuestEnv.load()                          # raises GuestEnvMissing
    with EmulatorProcess(Path("subsys.yaml"), Path("emu.log")) as emu:   # waits for "listening on"
        res = run(env, GuestSpec(init='''
            wait_dev /dev/nvme0n1 30 && pass bound || fail bound "no disk"
            capture nvme_list nvme list
            check fio fio --name=x --filename=/dev/nvme0n1 --size=8M --rw=randwrite --direct=1
        ''', vfio_user=[VfioUserDevice(emu.sockets[0])]), Path("run1"), emulators=[emu])
    assert res.ok and "bound" in res.passed; print(res.outputs["nvme_list"])

Modules: ``env`` (manifest), ``initramfs`` (cached base cpio + per-run /init),
``qemu`` (command line, Guest, run, marker contract), ``emuproc`` (emulator child
process), ``qmp`` (QMP client), ``scenario`` / ``demo`` (CLI subcommands).
pytest fixtures: tests/guest/conftest.py.

Marker contract (lines the guest's /init prints on ttyS0, at the start of a line):
``@@RESULT name=value``, ``@@PASS name``, ``@@FAIL name reason``,
``@@BEGIN name`` ... ``@@END name rc=N``, ``@@DONE``.  The /init body gets shell
helpers ``result``, ``pass``, ``fail``, ``check NAME CMD...``, ``capture NAME CMD...``,
``wait_dev PATH [SECONDS]``; it ends with ``@@DONE`` and ``poweroff -f`` by itself.
"""
