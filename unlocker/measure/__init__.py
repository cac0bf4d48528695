"""What the boot measured: the firmware's TCG event log (eventlog), the events' meaning (events), PE
Authenticode digests (pe), and the PCR values a boot with new components will have (predict).

Pure code for the installed system (predict, status, enrol's record of what was measured). The
boot reads the log only to explain a policy failure; eventlog and events keep the boot path's import
rule (unlocker/lean/__init__.py) for that: struct and our own modules, hashlib only inside functions
the boot never calls.
"""
