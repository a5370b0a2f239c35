"""NVMe host-managed live migration, TP4159 (NVMe Base 2.1 / 2.3, NVM CS 1.2).

A Migration Management Controller (ControllerConfig.type == "mmc") reports
OACS.HMLMS and executes the privileged commands on behalf of the migratable
controllers of its subsystem:

- ``cdq``       Controller Data Queue 45h, Feature 21h, One-Shot CDQ events
- ``udlog``     Track Send SEL 0h: the LBA Migration Queue (NVM CS §5.6)
- ``memtrack``  Track Send SEL 1h, Track Receive 3Eh: host memory dirty tracking
- ``track``     Track Send 3Dh dispatch
- ``send``      Migration Send 41h: Suspend, Resume, Set Controller State
- ``receive``   Migration Receive 42h: Get Controller State
- ``ctrlstate`` the Controller State data structure (NVMe-defined v0 + ours)
- ``identify_lm`` Identify Controller fields, LBAMQF, CNS 20h
- ``wire``      every layout and code point, declared once
- ``model``     the plain serialisable state in ControllerState.vendor
- ``lifecycle`` what a Controller Level Reset does to that state

The package imports nothing when imported: emulator/nvme/dispatch.py puts
the commands into an MMC's tables, and the host side (emulator/host/lm.py)
reads ``wire`` alone.

Reference and choices among sources: docs/tp4159.md.
"""
