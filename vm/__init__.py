"""QEMU + swtpm harness: a real Debian kernel, an initramfs built by our hooks, a LUKS2 root, a TPM."""
