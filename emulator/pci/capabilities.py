"""The power-on configuration space of an NVMe function: header and capabilities.

Capabilities are packed back to back (QEMU infers each one's size from the
next one's position, vfio-user-protocol.md §5.1):

    0x40 PM (8 bytes) -> 0x48 PCI Express v2 Endpoint (0x3C) -> 0x84 MSI-X (12)

The extended space starts with a zero dword (no extended capabilities).
"""
from __future__ import annotations

from emulator.pci import regs as r
from emulator.pci.config_space import ConfigSpace
from emulator.pci.ids import PciIdentity
from emulator.pci.msix import Bar0Layout

PM_CAP_OFFSET = 0x40
PCIE_CAP_OFFSET = PM_CAP_OFFSET + r.PCI_PM_SIZEOF  # 0x48
MSIX_CAP_OFFSET = PCIE_CAP_OFFSET + r.PCI_EXP_SIZEOF_V2  # 0x84


def _cap_header(cfg: ConfigSpace, pos: int, cap_id: int, next_pos: int) -> None:
    # Capability ID and Next Capability Pointer, both read-only (PCI 3.0 §6.7).
    cfg.set(pos + r.PCI_CAP_LIST_ID, 1, cap_id)
    cfg.set(pos + r.PCI_CAP_LIST_NEXT, 1, next_pos)


def build_header(cfg: ConfigSpace, ident: PciIdentity, bar0_size: int) -> None:
    """Type 0 header (PCI 3.0 §6.2)."""
    cfg.set(r.PCI_VENDOR_ID, 2, ident.vendor_id)
    cfg.set(r.PCI_DEVICE_ID, 2, ident.device_id)
    cfg.set(r.PCI_STATUS, 2, r.PCI_STATUS_CAP_LIST)
    cfg.set(r.PCI_REVISION_ID, 1, ident.revision_id)
    for i in range(3):  # prog-if, sub-class, base class
        cfg.set(r.PCI_CLASS_PROG + i, 1, ident.class_code >> (8 * i) & 0xFF)
    cfg.set(r.PCI_HEADER_TYPE, 1, r.PCI_HEADER_TYPE_NORMAL)
    cfg.set(r.PCI_SUBSYSTEM_VENDOR_ID, 2, ident.subsystem_vendor_id)
    cfg.set(r.PCI_SUBSYSTEM_ID, 2, ident.subsystem_id)
    cfg.set(r.PCI_CAPABILITY_LIST, 1, PM_CAP_OFFSET)
    cfg.set(r.PCI_INTERRUPT_PIN, 1, r.PCI_INTERRUPT_PIN_INTA)

    cfg.set_wmask(r.PCI_COMMAND, 2, r.PCI_COMMAND_WRITABLE)
    cfg.set_wmask(r.PCI_CACHE_LINE_SIZE, 1, 0xFF)
    cfg.set_wmask(r.PCI_INTERRUPT_LINE, 1, 0xFF)
    # BAR0/BAR1: 64-bit non-prefetchable memory BAR.  The address bits below
    # the size and the type bits are read-only, so a write stores
    # (value & ~(size-1)) | type (PCI 3.0 §6.2.5.1); BAR1 holds bits 63:32.
    # BAR2-5, CardBus CIS and the ROM BAR stay read-only zero: the ROM BAR
    # must read 0 even after the 0xFFFFF800 sizing write (§5.1).
    cfg.set(r.PCI_BASE_ADDRESS_0, 4, r.PCI_BASE_ADDRESS_MEM_TYPE_64)
    cfg.set_wmask(r.PCI_BASE_ADDRESS_0, 4, ~(bar0_size - 1) & 0xFFFFFFFF)
    cfg.set_wmask(r.PCI_BASE_ADDRESS_0 + 4, 4, 0xFFFFFFFF)


def add_pm_cap(cfg: ConfigSpace, pos: int, next_pos: int) -> None:
    """Power Management capability (PCI PM 1.2 §3.2): D0 and D3hot only."""
    _cap_header(cfg, pos, r.PCI_CAP_ID_PM, next_pos)
    cfg.set(pos + r.PCI_PM_PMC, 2, r.PCI_PM_CAP_VER_1_2)  # no D1/D2, no PME
    # No_Soft_Reset: D3hot -> D0 keeps the function's state (as SPDK does).
    cfg.set(pos + r.PCI_PM_CTRL, 2, r.PCI_PM_CTRL_NO_SOFT_RESET | r.PCI_PM_STATE_D0)
    cfg.set_wmask(pos + r.PCI_PM_CTRL, 2, r.PCI_PM_CTRL_STATE_MASK)


def add_pcie_cap(cfg: ConfigSpace, pos: int, next_pos: int) -> None:
    """PCI Express capability v2, Endpoint, x1 at 2.5 GT/s (PCIe 4.0 §7.5.3)."""
    _cap_header(cfg, pos, r.PCI_CAP_ID_EXP, next_pos)
    cfg.set(pos + r.PCI_EXP_FLAGS, 2, r.PCI_EXP_FLAGS_VERS_2 | r.PCI_EXP_TYPE_ENDPOINT << 4)
    cfg.set(pos + r.PCI_EXP_DEVCAP, 4,
            r.PCI_EXP_DEVCAP_PAYLOAD_256B | r.PCI_EXP_DEVCAP_EXT_TAG
            | r.PCI_EXP_DEVCAP_L0S_NO_LIMIT | r.PCI_EXP_DEVCAP_L1_NO_LIMIT
            | r.PCI_EXP_DEVCAP_RBER | r.PCI_EXP_DEVCAP_FLR)
    # Device Control defaults (§7.5.3.4): relaxed ordering and no-snoop
    # enabled, MPS 128 B, MRRS 512 B.  Initiate FLR (bit 15) is writable
    # here; the function acts on it and it always reads back 0.
    cfg.set(pos + r.PCI_EXP_DEVCTL, 2,
            r.PCI_EXP_DEVCTL_RELAX_EN | r.PCI_EXP_DEVCTL_NOSNOOP_EN | r.PCI_EXP_DEVCTL_READRQ_512B)
    cfg.set_wmask(pos + r.PCI_EXP_DEVCTL, 2,
                  r.PCI_EXP_DEVCTL_ERR_REPORTING | r.PCI_EXP_DEVCTL_RELAX_EN
                  | r.PCI_EXP_DEVCTL_PAYLOAD | r.PCI_EXP_DEVCTL_EXT_TAG
                  | r.PCI_EXP_DEVCTL_NOSNOOP_EN | r.PCI_EXP_DEVCTL_READRQ
                  | r.PCI_EXP_DEVCTL_BCR_FLR)
    cfg.set(pos + r.PCI_EXP_LNKCAP, 4, r.PCI_EXP_LNKCAP_SLS_2_5GB | r.PCI_EXP_LNKCAP_MLW_X1)
    link_ctl = r.PCI_EXP_LNKCTL_ASPMC | r.PCI_EXP_LNKCTL_RCB | r.PCI_EXP_LNKCTL_CCC | r.PCI_EXP_LNKCTL_ES
    cfg.set_wmask(pos + r.PCI_EXP_LNKCTL, 2, link_ctl)
    cfg.set(pos + r.PCI_EXP_LNKSTA, 2, r.PCI_EXP_LNKSTA_CLS_2_5GB | r.PCI_EXP_LNKSTA_NLW_X1)
    cfg.set(pos + r.PCI_EXP_DEVCAP2, 4, r.PCI_EXP_DEVCAP2_COMP_TMOUT_DIS)
    cfg.set_wmask(pos + r.PCI_EXP_DEVCTL2, 2, r.PCI_EXP_DEVCTL2_COMP_TMOUT_DIS)
    cfg.set(pos + r.PCI_EXP_LNKCAP2, 4, r.PCI_EXP_LNKCAP2_SLS_2_5GB)
    cfg.set(pos + r.PCI_EXP_LNKCTL2, 2, r.PCI_EXP_LNKCTL2_TLS_2_5GT)
    cfg.set_wmask(pos + r.PCI_EXP_LNKCTL2, 2, r.PCI_EXP_LNKCTL2_TLS)
    # FLR leaves Max_Payload_Size, the link control fields and the sticky
    # Target Link Speed alone (PCIe 4.0 §6.6.2).
    cfg.set_flr_keep(pos + r.PCI_EXP_DEVCTL, 2, r.PCI_EXP_DEVCTL_PAYLOAD)
    cfg.set_flr_keep(pos + r.PCI_EXP_LNKCTL, 2, link_ctl)
    cfg.set_flr_keep(pos + r.PCI_EXP_LNKCTL2, 2, r.PCI_EXP_LNKCTL2_TLS)


def add_msix_cap(cfg: ConfigSpace, pos: int, next_pos: int, layout: Bar0Layout) -> None:
    """MSI-X capability (PCI 3.0 §6.8.2): table and PBA in BAR0 (BIR 0)."""
    _cap_header(cfg, pos, r.PCI_CAP_ID_MSIX, next_pos)
    cfg.set(pos + r.PCI_MSIX_FLAGS, 2, (layout.vectors - 1) & r.PCI_MSIX_FLAGS_QSIZE)
    cfg.set_wmask(pos + r.PCI_MSIX_FLAGS, 2, r.PCI_MSIX_FLAGS_ENABLE | r.PCI_MSIX_FLAGS_MASKALL)
    cfg.set(pos + r.PCI_MSIX_TABLE, 4, layout.table_offset | 0)
    cfg.set(pos + r.PCI_MSIX_PBA, 4, layout.pba_offset | 0)


def build_config_space(ident: PciIdentity, layout: Bar0Layout) -> ConfigSpace:
    """The power-on image, with write masks, of an NVMe function."""
    cfg = ConfigSpace()
    build_header(cfg, ident, layout.bar_size)
    add_pm_cap(cfg, PM_CAP_OFFSET, PCIE_CAP_OFFSET)
    add_pcie_cap(cfg, PCIE_CAP_OFFSET, MSIX_CAP_OFFSET)
    add_msix_cap(cfg, MSIX_CAP_OFFSET, 0, layout)
    cfg.set(r.PCI_CFG_SPACE_EXP_START, 4, 0)  # no extended capabilities (§5.1)
    return cfg
