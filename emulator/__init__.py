"""nvme-emu: a PCIe NVMe controller exposed over vfio-user.

Layers (each package knows only the ones below it):
  memory/    guest-memory interface and the mmap-backed DMA map
  vfio_user/ the vfio-user wire codec (sans-IO), server loop and client
  pci/       the PCIe function: config space, BARs, MSI-X -> a vfio-user DeviceBackend
  nvme/      the NVMe controller: sees GuestMemory, an InterruptSink and doorbells
  subsystem/ NVM subsystem, YAML config, process wiring
  host/      a userspace NVMe host driver on top of the vfio-user client
  guest/     QEMU guest tooling for tests and benchmarks
"""
