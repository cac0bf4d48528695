"""adopt: take over a sealed object or NV index made with tpm2-tools by the ArchWiki recipe.

The secret it holds is already a passphrase or key file of one of the disk's keyslots. We unseal it
once (proving the PCR selection and the SRK), find its keyslot, and write our token for it. The
keyslot stays the user's: `remove` never kills it (keyslot_owned = false).
"""

from __future__ import annotations

from dataclasses import dataclass

from unlocker.errors import CorruptError, UsageError
from unlocker.log import say
from unlocker.luks import LuksDevice
from unlocker.secret import Secret
from unlocker.store import read_blob_pair
from unlocker.token import Token
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection, PolicyPlan, sealing_policy
from unlocker.tpm.seal import SealedObject, sealed_auth_policy, validate_sealed
from unlocker.tpm.tcti import resolve_tcti


@dataclass(frozen=True)
class AdoptOptions:
    device: str
    selection: PcrSelection
    blob: tuple[str, str] | None
    nv_index: int | None
    tcti: str | None


def _keyslot_of(device: LuksDevice, secret: Secret) -> int:
    slot = device.slot_of_key(secret)
    if slot is None:
        raise UsageError(f"the sealed secret opens no keyslot of {device.path} "
                         "(it must be the disk's passphrase or key file, byte for byte)")
    return slot


def adopt(opts: AdoptOptions) -> Token:
    device = LuksDevice(opts.device)
    device.metadata()
    if device.our_tokens():
        raise UsageError(f"{opts.device} is already enrolled; run 'remove' first")
    sealed: SealedObject | None = None
    if opts.blob is not None:
        sealed = read_blob_pair(*opts.blob)
        validate_sealed(sealed)
        if not sealed_auth_policy(sealed):
            raise UsageError("that sealed object has no policy: anyone with this TPM can unseal it; "
                             "use 'enroll' instead")
    with Tpm(resolve_tcti(opts.tcti)) as tpm:
        values = tpm.read_pcrs(opts.selection)
        expected = sealing_policy(opts.selection, values)
        if sealed is not None:
            policy = sealed_auth_policy(sealed)
            tpm.use_tpm2_tools_srk()  # the recipe's `tpm2_createprimary --key-algorithm=ecc`
            secret = tpm.unseal(sealed, PolicyPlan(opts.selection), None)  # no pin yet: this is where it is made
            say("the adopted object and its parent are DA-protected: power cuts count against the TPM's "
                "lockout; 'tpm2-unlocker reseal' re-seals the key under a noDA key")
        else:
            assert opts.nv_index is not None
            info = tpm.nv_info(opts.nv_index)
            if info is None:
                raise CorruptError(f"NV index 0x{opts.nv_index:08x} does not exist in this TPM")
            policy = info.auth_policy
            if not info.no_da:
                say(f"NV index 0x{opts.nv_index:08x} is DA-protected: power cuts count against the TPM's "
                    "lockout; 'tpm2-unlocker reseal' moves the key to a noDA index")
            if info.readable_without_policy:
                say(f"NV index 0x{opts.nv_index:08x} can be read without the PCR policy (authread or ownerread "
                    "with a password that is empty unless you set one): anyone with this TPM may read the key; "
                    "'tpm2-unlocker reseal' moves it to an index only the policy reads")
            if info.writable_without_policy:
                say(f"NV index 0x{opts.nv_index:08x} can be overwritten without the PCR policy (authwrite): "
                    "'tpm2-unlocker reseal' moves the key to a write-locked index")
            secret = tpm.nv_read(opts.nv_index, PolicyPlan(opts.selection), None)
        if policy != expected:
            secret.wipe()
            raise UsageError(f"the object's policy is not PolicyPCR over {opts.selection} (check --pcrs)")
        with secret:
            slot = _keyslot_of(device, secret)
        token = Token(keyslot=slot, store="token" if sealed else "nv", selection=opts.selection,
                      pcr_values=values, policy_hash=policy, srk_name=tpm.current_srk_name(),
                      public=sealed.public if sealed else b"", private=sealed.private if sealed else b"",
                      nv_index=opts.nv_index or 0, keyslot_owned=False)
        device.import_token(token)
    return token
