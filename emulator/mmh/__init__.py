"""The Migration Management Host (MMH): live migration of a guest's NVMe disk
between two nvme-emu processes (NVMe Base 2.1 §8.1.13, host-managed).

- ``ranges``   LBA range arithmetic (coalesce, split)
- ``endpoint`` one side: its MMC over vfio-user and its control socket
- ``copier``   user data copy, read on the source MMC, write on the destination MMC
- ``engine``   the flow: preparation, pre-copy rounds, suspend, state, hand-over, resume
- ``cli``      ``nvme-emu migrate`` (progress, summary, --json)

The engine knows nothing of the command line, so other drivers (vfio-user
migration v2) can run the same flow.  docs/live-migration.md describes it.
"""
