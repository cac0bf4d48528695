"""tpm2-unlocker: unlock LUKS disks at boot with a key sealed by the TPM 2.0."""

__version__ = "0.1.0"

# typing.TYPE_CHECKING without importing typing: the boot path needs nothing from typing at run time
# (annotations are strings), and its import is start-up time a boot pays under emulation. Type checkers take
# any name TYPE_CHECKING as true.
TYPE_CHECKING = False
