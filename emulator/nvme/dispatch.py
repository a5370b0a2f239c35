"""Who handles what: every controller's command tables, built in this one place.

Like QEMU's per-controller command-set table (hw/nvme/ctrl.c builds the
supported admin and I/O opcodes of each controller at realize time), the
tables depend on the controller's type: a Migration Management Controller
(TP4159, Base 2.1 §8.1.12) adds the privileged admin commands, Identify CNS
20h and its Identify Controller fields; a migratable (I/O) controller "shall
not support" them, so there they answer Invalid Opcode / Invalid Field.
The Commands Supported and Effects log (LID 05h) is read from these tables.

To find who handles admin opcode 41h: look it up in ``_admin`` below.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.nvme import (
    admin_queues, aer, dbbuf, features, format_nvm, identify, io_cmds, lba_status,
    lba_status_log, logpages, ns_mgmt, nvm_cmds, sanitize, sqpoll,
)
from emulator.nvme.config import ControllerConfig
from emulator.nvme.controller import Controller  # FIXME  # FIXME  # FIXME
from emulator.nvme.migration import (
    cdq, identify_lm, lifecycle, memtrack, receive, send, track, udlog,
)
from emulator.nvme.spec import CNS, FID, LID, AdminOpcode, IoOpcode
from emulator.nvme.tables import CnsBuilder, CommandTables, Handler

if TYPE_CHECKING:
    from emulator.nvme.interfaces import InterruptSink, Scheduler
    from emulator.subsystem.subsystem import Subsystem


def _admin(config: ControllerConfig) -> dict[int, Handler]:
    table: dict[int, Handler] = {
        AdminOpcode.DELETE_IO_SQ: admin_queues.delete_io_sq,
        AdminOpcode.CREATE_IO_SQ: admin_queues.create_io_sq,
        AdminOpcode.GET_LOG_PAGE: logpages.get_log_page,
        AdminOpcode.DELETE_IO_CQ: admin_queues.delete_io_cq,
        AdminOpcode.CREATE_IO_CQ: admin_queues.create_io_cq,
        AdminOpcode.IDENTIFY: identify.identify,
        AdminOpcode.ABORT: admin_queues.abort,
        AdminOpcode.SET_FEATURES: features.set_features,
        AdminOpcode.GET_FEATURES: features.get_features,
        AdminOpcode.ASYNC_EVENT_REQUEST: aer.async_event_request,
        AdminOpcode.KEEP_ALIVE: admin_queues.keep_alive,
        AdminOpcode.DOORBELL_BUFFER_CONFIG: dbbuf.doorbell_buffer_config,
        AdminOpcode.SANITIZE: sanitize.sanitize,
        AdminOpcode.GET_LBA_STATUS: lba_status.get_lba_status,  # TP4165 ATYPE 02h
        AdminOpcode.NS_MANAGEMENT: ns_mgmt.namespace_management,
        AdminOpcode.NS_ATTACHMENT: ns_mgmt.namespace_attachment,
        AdminOpcode.FORMAT_NVM: format_nvm.format_nvm,
    }
    if config.is_mmc:  # TP4159: MMC only (Base 2.1 §8.1.12)
        table.update({
            AdminOpcode.TRACK_SEND: track.track_send,  # 3Dh
            AdminOpcode.TRACK_RECEIVE: memtrack.track_receive,  # 3Eh
            AdminOpcode.MIGRATION_SEND: send.migration_send,  # 41h
            AdminOpcode.MIGRATION_RECEIVE: receive.migration_receive,  # 42h
            AdminOpcode.CONTROLLER_DATA_QUEUE: cdq.controller_data_queue,  # 45h
        })
    return table


def _io(config: ControllerConfig) -> dict[int, Handler]:
    return {  # NVM Command Set 1.2
        IoOpcode.FLUSH: io_cmds.flush,
        IoOpcode.WRITE: io_cmds.write,
        IoOpcode.READ: io_cmds.read,
        IoOpcode.WRITE_ZEROES: io_cmds.write_zeroes,
        IoOpcode.DATASET_MANAGEMENT: io_cmds.dataset_management,
        IoOpcode.WRITE_UNCORRECTABLE: nvm_cmds.write_uncorrectable,
        IoOpcode.COMPARE: nvm_cmds.compare,
        IoOpcode.VERIFY: nvm_cmds.verify,
        IoOpcode.COPY: nvm_cmds.copy,
    }


def _cns(config: ControllerConfig) -> dict[int, CnsBuilder]:
    table: dict[int, CnsBuilder] = {  # Base 2.1 §5.1.13, Figure 311
        CNS.NAMESPACE: identify.identify_namespace,
        CNS.CONTROLLER: identify.identify_controller,
        CNS.ACTIVE_NSID_LIST: identify.active_nsid_list,
        CNS.NS_ID_DESCRIPTORS: identify.ns_id_descriptors,
        CNS.CSI_NAMESPACE: identify.identify_nvm_namespace,
        CNS.CSI_CONTROLLER: identify.identify_nvm_controller,
        CNS.CSI_ACTIVE_NSID_LIST: identify.csi_active_nsid_list,
        CNS.CS_INDEPENDENT_NAMESPACE: identify.identify_independent_namespace,
        CNS.ALLOCATED_NSID_LIST: identify.allocated_nsid_list,
        CNS.ALLOCATED_NAMESPACE: identify.identify_allocated_namespace,
        CNS.NS_CONTROLLER_LIST: identify.attached_controller_list,
        CNS.CONTROLLER_LIST: identify.subsystem_controller_list,
        CNS.IO_COMMAND_SET: identify.io_command_set,
    }
    if config.is_mmc:
        table[CNS.SUPPORTED_CTRL_STATE_FORMATS] = identify_lm.supported_controller_state_formats
    return table


def command_tables(config: ControllerConfig) -> CommandTables:
    """The tables of one controller, from its type and configuration."""
    mmc = config.is_mmc
    return CommandTables(
        admin=_admin(config),
        io=_io(config),
        cns=_cns(config),
        features={**features.BASE_FEATURES,
                  lba_status_log.FID_LBA_STATUS_INFO_ATTRIBUTES: lba_status_log.LBA_STATUS_INFO_FEATURE,
                  FID.CONTROLLER_DATA_QUEUE: cdq.CDQ_FEATURE},  # 21h, Figure 426
        log_pages={
            LID.SUPPORTED_LOG_PAGES: logpages.supported_log_pages,
            LID.ERROR_INFORMATION: logpages.error_information,
            LID.SMART_HEALTH: logpages.smart_health,
            LID.FIRMWARE_SLOT: logpages.firmware_slot,
            LID.CHANGED_NAMESPACES: ns_mgmt.changed_namespace_list,
            LID.LBA_STATUS_INFORMATION: lba_status_log.lba_status_information,
            LID.COMMANDS_SUPPORTED_EFFECTS: logpages.commands_supported_effects,
            LID.FEATURE_IDENTIFIERS_SUPPORTED_EFFECTS: logpages.feature_identifiers_supported_effects,
            LID.SANITIZE_STATUS: sanitize.sanitize_status,
        },
        identify_controller=(lba_status_log.identify_glss, sanitize.identify_sanicap)
        + ((identify_lm.identify_mmc_fields,) if mmc else ()),
        identify_nvm_controller=(lba_status.identify_ralbas, identify_lm.identify_lbamqf),
        identify_nvm_namespace=(lba_status.identify_tlbaag,),
        on_write=(udlog.on_write, sanitize.on_write),
        on_reset=(lifecycle.on_reset, sqpoll.on_reset),
        on_memory=(memtrack.on_memory, lifecycle.host_gone),
        # Doorbell Buffer Config depends on the subsystem (an MMC next to it) and the
        # doorbell_buffer key (docs/tp4159.md).
        admin_available={AdminOpcode.DOORBELL_BUFFER_CONFIG: dbbuf.supported},
    )


def new_controller(config: ControllerConfig, subsystem: "Subsystem",
                   irq: "InterruptSink | None" = None,
                   scheduler: "Scheduler | None" = None) -> Controller:
    """A Controller with the tables its configuration calls for."""
    return Controller(config, command_tables(config), subsystem, irq, scheduler)
