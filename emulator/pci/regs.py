"""PCI / PCIe configuration-space register offsets, bits and wire layouts.

Names follow the specifications (and Linux's ``pci_regs.h`` spelling where
that is the common vocabulary).  Sources:

* PCI Local Bus Specification 3.0 (PCI 3.0) §6.1-6.2 type 0 header, §6.7
  capabilities list, §6.8.2 MSI-X;
* PCI Bus Power Management Interface Specification 1.2 (PCI PM 1.2) §3.2;
* PCI Express Base Specification 4.0 (PCIe 4.0) §7.5.3 PCI Express
  Capability Structure, §6.6.2 Function Level Reset.
"""
from __future__ import annotations

import struct

# -- wire layouts: config space and BAR contents are little-endian --------
U8 = struct.Struct("<B")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
BY_WIDTH: dict[int, struct.Struct] = {1: U8, 2: U16, 4: U32, 8: U64}

# MSI-X table entry (PCI 3.0 §6.8.2.6-6.8.2.9): Message Address, Message
# Upper Address, Message Data, Vector Control.
MSIX_ENTRY = struct.Struct("<IIII")
MSIX_ENTRY_SIZE = MSIX_ENTRY.size  # 16
MSIX_ENTRY_VECTOR_CTRL = 12
MSIX_ENTRY_CTRL_MASKBIT = 0x1
MSIX_MAX_VECTORS = 2048  # Table Size is an 11-bit N-1 field

CONFIG_SPACE_SIZE = 4096  # PCIe extended configuration space
LEGACY_CONFIG_SPACE_SIZE = 256

# -- type 0 header (PCI 3.0 §6.2) ----------------------------------------
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09  # 3 bytes: prog-if, sub-class, base class
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BIST = 0x0F
PCI_BASE_ADDRESS_0 = 0x10
PCI_NUM_BARS = 6
PCI_CARDBUS_CIS = 0x28
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_MIN_GNT = 0x3E
PCI_MAX_LAT = 0x3F
PCI_HEADER_END = 0x40

PCI_HEADER_TYPE_NORMAL = 0x00
PCI_INTERRUPT_PIN_INTA = 1

# Command register (PCI 3.0 §6.2.2)
PCI_COMMAND_IO = 0x0001
PCI_COMMAND_MEMORY = 0x0002
PCI_COMMAND_MASTER = 0x0004
PCI_COMMAND_PARITY = 0x0040
PCI_COMMAND_SERR = 0x0100
PCI_COMMAND_INTX_DISABLE = 0x0400
# The bits a guest may set (vfio-user-protocol.md §5.1: QEMU forwards COMMAND).
PCI_COMMAND_WRITABLE = (PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
                        | PCI_COMMAND_PARITY | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE)

# Status register (PCI 3.0 §6.2.3)
PCI_STATUS_INTERRUPT = 0x0008
PCI_STATUS_CAP_LIST = 0x0010

# Base address registers (PCI 3.0 §6.2.5.1): low bits are read-only type bits.
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08

# -- capability IDs (PCI Code and ID Assignment) ---------------------------
PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11
PCI_CAP_LIST_ID = 0  # offsets inside every capability
PCI_CAP_LIST_NEXT = 1

# -- Power Management capability (PCI PM 1.2 §3.2) --------------------------
PCI_PM_PMC = 2
PCI_PM_CTRL = 4  # PMCSR
PCI_PM_SIZEOF = 8
PCI_PM_CAP_VER_1_2 = 0x0003
PCI_PM_CTRL_STATE_MASK = 0x0003  # PowerState: 0 D0, 1 D1, 2 D2, 3 D3hot
PCI_PM_CTRL_NO_SOFT_RESET = 0x0008
PCI_PM_STATE_D0 = 0
PCI_PM_STATE_D3HOT = 3

# -- PCI Express capability, version 2 (PCIe 4.0 §7.5.3) ---------------------
PCI_EXP_FLAGS = 0x02  # PCI Express Capabilities Register
PCI_EXP_DEVCAP = 0x04
PCI_EXP_DEVCTL = 0x08
PCI_EXP_DEVSTA = 0x0A
PCI_EXP_LNKCAP = 0x0C
PCI_EXP_LNKCTL = 0x10
PCI_EXP_LNKSTA = 0x12
PCI_EXP_DEVCAP2 = 0x24
PCI_EXP_DEVCTL2 = 0x28
PCI_EXP_LNKCAP2 = 0x2C
PCI_EXP_LNKCTL2 = 0x30
PCI_EXP_SIZEOF_V2 = 0x3C

PCI_EXP_FLAGS_VERS_2 = 0x0002
PCI_EXP_TYPE_ENDPOINT = 0x0  # Device/Port Type, bits 7:4

PCI_EXP_DEVCAP_PAYLOAD_256B = 0x00000001  # Max_Payload_Size Supported 2:0
PCI_EXP_DEVCAP_EXT_TAG = 0x00000020
PCI_EXP_DEVCAP_L0S_NO_LIMIT = 0x000001C0  # Endpoint L0s Acceptable Latency 8:6
PCI_EXP_DEVCAP_L1_NO_LIMIT = 0x00000E00  # Endpoint L1 Acceptable Latency 11:9
PCI_EXP_DEVCAP_RBER = 0x00008000  # Role-Based Error Reporting (1 for PCIe >= 1.1)
PCI_EXP_DEVCAP_FLR = 0x10000000  # Function Level Reset Capability, bit 28

PCI_EXP_DEVCTL_ERR_REPORTING = 0x000F  # CERE, NFERE, FERE, URRE
PCI_EXP_DEVCTL_RELAX_EN = 0x0010
PCI_EXP_DEVCTL_PAYLOAD = 0x00E0  # Max_Payload_Size 7:5 (survives FLR, §6.6.2)
PCI_EXP_DEVCTL_EXT_TAG = 0x0100
PCI_EXP_DEVCTL_NOSNOOP_EN = 0x0800
PCI_EXP_DEVCTL_READRQ = 0x7000  # Max_Read_Request_Size 14:12
PCI_EXP_DEVCTL_READRQ_512B = 0x2000
PCI_EXP_DEVCTL_BCR_FLR = 0x8000  # Initiate Function Level Reset (reads 0)

PCI_EXP_LNKCAP_SLS_2_5GB = 0x00000001  # Max Link Speed 3:0
PCI_EXP_LNKCAP_MLW_X1 = 0x00000010  # Maximum Link Width 9:4
PCI_EXP_LNKCTL_ASPMC = 0x0003
PCI_EXP_LNKCTL_RCB = 0x0008
PCI_EXP_LNKCTL_CCC = 0x0040
PCI_EXP_LNKCTL_ES = 0x0080
PCI_EXP_LNKSTA_CLS_2_5GB = 0x0001
PCI_EXP_LNKSTA_NLW_X1 = 0x0010
PCI_EXP_DEVCAP2_COMP_TMOUT_DIS = 0x00000010  # Completion Timeout Disable Supported
PCI_EXP_DEVCTL2_COMP_TMOUT_DIS = 0x0010
PCI_EXP_LNKCAP2_SLS_2_5GB = 0x00000002  # Supported Link Speeds Vector bit 0
PCI_EXP_LNKCTL2_TLS = 0x000F  # Target Link Speed
PCI_EXP_LNKCTL2_TLS_2_5GT = 0x0001

# -- MSI-X capability (PCI 3.0 §6.8.2) -----------------------------------------
PCI_MSIX_FLAGS = 2  # Message Control
PCI_MSIX_TABLE = 4  # Table Offset / Table BIR
PCI_MSIX_PBA = 8  # PBA Offset / PBA BIR
PCI_MSIX_SIZEOF = 12
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_BIR_MASK = 0x7

# -- extended configuration space (PCIe 4.0 §7.6) ------------------------------
PCI_CFG_SPACE_EXP_START = 0x100

# -- class code (PCI Code and ID Assignment: 01h mass storage, 08h NVM,
# 02h NVM Express I/O controller) --------------------------------------------
PCI_CLASS_STORAGE_EXPRESS = 0x010802
