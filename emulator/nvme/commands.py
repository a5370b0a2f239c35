"""Importing this module registers every command handler of the base controller."""
from emulator.nvme import admin_queues, aer, dbbuf, features, identify, io_cmds, logpages  # noqa: F401
from emulator.nvme import lba_status, lba_status_log  # noqa: F401  (Get LBA Status, TP4165)
from emulator.nvme import migration, sanitize  # noqa: F401  (TP4159 live migration, Sanitize)
# Namespace Management/Attachment, Format NVM, Write Uncorrectable/Compare/Verify/Copy
from emulator.nvme import format_nvm, nvm_cmds, ns_mgmt  # noqa: F401
