"""tpm2-unlocker: unlock LUKS disks at boot with a key sealed by the TPM 2.0."""

__version__ = "0.1.0"
