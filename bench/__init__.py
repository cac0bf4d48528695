"""Benchmarks: our unlock against systemd-cryptsetup (systemd-tpm2 token) and Clevis, side by side."""
