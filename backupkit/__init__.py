"""backupkit: incremental backups of libvirt/QEMU domains over NBD."""

__version__ = "0.1.0"
