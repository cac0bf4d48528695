"""The storage root key: which primary our keys are sealed under, found again by its name.

Our SRK is the ECC P-256 storage primary of `tpm2_createprimary -C o -G ecc`, plus noDA (as the TCG
provisioning guidance and systemd have it): without noDA every use of the SRK marks the boot as
DA-relevant, and each power cut then counts towards lockout. tpm2-tools' own (no noDA) is the
parent of objects made by the ArchWiki recipe, which `adopt` takes over.
"""

from __future__ import annotations

from unlocker import TYPE_CHECKING
from unlocker.errors import NoTpmError
from unlocker.tpm import errors, tss
from unlocker.tpm.base import TpmBase
from unlocker.tpm.tss import TssError, lib

if TYPE_CHECKING:
    from unlocker.tpm.tss import CData

SRK_PERSISTENT_HANDLE = 0x81000001
# tpm2-tools' tpm2_createprimary default: fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|
# restricted|decrypt
_TPM2_TOOLS_PRIMARY_ATTRS = (lib.TPMA_OBJECT_FIXEDTPM | lib.TPMA_OBJECT_FIXEDPARENT
                             | lib.TPMA_OBJECT_SENSITIVEDATAORIGIN | lib.TPMA_OBJECT_USERWITHAUTH
                             | lib.TPMA_OBJECT_RESTRICTED | lib.TPMA_OBJECT_DECRYPT)
_MADE_BY_THE_TPM = (lib.TPMA_OBJECT_FIXEDTPM | lib.TPMA_OBJECT_FIXEDPARENT | lib.TPMA_OBJECT_SENSITIVEDATAORIGIN
                    | lib.TPMA_OBJECT_RESTRICTED | lib.TPMA_OBJECT_DECRYPT)
SRK_TEMPLATES = {"tcg": _TPM2_TOOLS_PRIMARY_ATTRS | lib.TPMA_OBJECT_NODA, "tpm2-tools": _TPM2_TOOLS_PRIMARY_ATTRS}


def srk_template(kind: str, alg: str = "ecc") -> CData:
    """TPM2B_PUBLIC of an ECC P-256 storage key with AES-128-CFB, as tpm2-tools' "ecc256:aes128cfb";
    with alg "rsa" the RSA-2048 one ("rsa2048:aes128cfb"), which systemd-cryptenroll falls back to on a
    TPM without ECC and Clevis makes for `"key":"rsa"`."""
    public = tss.new("TPM2B_PUBLIC *")
    area = public.publicArea
    area.nameAlg = lib.TPM2_ALG_SHA256
    area.objectAttributes = SRK_TEMPLATES[kind]
    if alg == "rsa":
        area.type = lib.TPM2_ALG_RSA
        rsa = area.parameters.rsaDetail
        rsa.symmetric.algorithm = lib.TPM2_ALG_AES
        rsa.symmetric.keyBits.aes = 128
        rsa.symmetric.mode.aes = lib.TPM2_ALG_CFB
        rsa.scheme.scheme = lib.TPM2_ALG_NULL
        rsa.keyBits = 2048
        rsa.exponent = 0
        return public
    area.type = lib.TPM2_ALG_ECC
    ecc = area.parameters.eccDetail
    ecc.symmetric.algorithm = lib.TPM2_ALG_AES
    ecc.symmetric.keyBits.aes = 128
    ecc.symmetric.mode.aes = lib.TPM2_ALG_CFB
    ecc.scheme.scheme = lib.TPM2_ALG_NULL
    ecc.curveID = lib.TPM2_ECC_NIST_P256
    ecc.kdf.scheme = lib.TPM2_ALG_NULL
    return public


def srk_name_of(public: bytes) -> bytes:
    """The TPM name of a marshalled TPM2B_PUBLIC with nameAlg SHA-256: the alg id, then the digest of
    the TPMT_PUBLIC (Part 1, 16: Names)."""
    import hashlib  # enrolment and status only: not imported on the boot path

    area = public[2:]
    if len(public) < 4 or int.from_bytes(public[:2], "big") != len(area) or area[2:4] != b"\x00\x0b":
        raise ValueError("not a TPM2B_PUBLIC with nameAlg SHA-256")
    return b"\x00\x0b" + hashlib.sha256(area).digest()


class SrkHolder(TpmBase):
    """Keeps the SRK selected last: the sealing one, or the one a key to unseal names."""

    def __init__(self, tcti: str) -> None:
        super().__init__(tcti)
        self._srk: int | None = None
        self._srk_transient = False
        self._srk_for_sealing = False
        self._srk_name = b""

    def close(self) -> None:
        if self._srk is not None and self._srk_transient:
            self._esys.flush(self._srk)
        self._srk = None
        super().close()

    def _set_srk(self, handle: int, transient: bool, for_sealing: bool) -> None:
        if self._srk is not None and self._srk_transient:
            self._esys.flush(self._srk)
        self._srk, self._srk_transient, self._srk_for_sealing = handle, transient, for_sealing
        self._srk_name = self._esys.name(handle)

    def _current_srk(self) -> int:
        """The SRK selected last (by check_srk for an unseal), else the sealing one."""
        return self._srk if self._srk is not None else self.srk()

    def _persistent_srk(self) -> tuple[int, bool] | None:
        """0x81000001 if present and a storage key the TPM made itself, with whether it has noDA.

        Anyone with the owner's (usually empty) password can persist a key there, one imported
        with a private part they know among them: a session salted to that key is read by whoever
        listens on the bus, and a token's srk_name is the attacker's to write. So a persistent key
        counts only if its attributes say the TPM generated it and it never leaves the TPM
        (fixedTPM, fixedParent and sensitiveDataOrigin: an imported key cannot have fixedTPM), as
        a restricted decryption (storage) key."""
        handles, _ = self._handles(SRK_PERSISTENT_HANDLE, 1)
        if SRK_PERSISTENT_HANDLE not in handles:
            return None
        handle = self._from_tpm_public(SRK_PERSISTENT_HANDLE)
        public = tss.new("TPM2B_PUBLIC **")
        self._esys.call("ReadPublic", handle, tss.NONE, tss.NONE, tss.NONE, public, tss.ffi.NULL, tss.ffi.NULL)
        try:
            attributes = public[0].publicArea.objectAttributes
        finally:
            tss.free(public[0])
        if attributes & _MADE_BY_THE_TPM != _MADE_BY_THE_TPM:
            self._esys.tr_close(handle)
            return None
        return handle, bool(attributes & lib.TPMA_OBJECT_NODA)

    def _create_srk(self, kind: str, alg: str = "ecc") -> int:
        out = tss.new("ESYS_TR *")
        self._esys.call("CreatePrimary", lib.ESYS_TR_RH_OWNER, tss.PASSWORD, tss.NONE, tss.NONE,
                        tss.new("TPM2B_SENSITIVE_CREATE *"), srk_template(kind, alg), tss.new("TPM2B_DATA *"),
                        tss.new("TPML_PCR_SELECTION *"), out, tss.ffi.NULL, tss.ffi.NULL, tss.ffi.NULL,
                        tss.ffi.NULL)
        return out[0]

    def srk(self) -> int:
        """The SRK new keys are sealed under: 0x81000001 when present and noDA, else our noDA primary."""
        if self._srk is not None and self._srk_for_sealing:
            return self._srk
        try:
            persistent = self._persistent_srk()
            if persistent is not None and persistent[1]:
                self._set_srk(persistent[0], transient=False, for_sealing=True)
            else:
                self._set_srk(self._create_srk("tcg"), transient=True, for_sealing=True)
        except TssError as exc:
            raise errors.tpm_error(exc, errors.CREATE_SRK) from None
        return self._srk  # type: ignore[return-value]

    def srk_name(self) -> bytes:
        """Name of the SRK new keys are sealed under."""
        self.srk()
        return self._srk_name

    def _current_srk_name(self) -> bytes:
        self._current_srk()
        return self._srk_name

    def current_srk_name(self) -> bytes:
        """Name of the SRK selected last (the parent of what was just loaded)."""
        self._current_srk()
        return self._srk_name

    def srk_public(self) -> bytes:
        """The sealing SRK's TPM2B_PUBLIC, marshalled, checked against its name: what a token pins."""
        handle = self.srk()
        public = tss.new("TPM2B_PUBLIC **")
        try:
            self._esys.call("ReadPublic", handle, tss.NONE, tss.NONE, tss.NONE, public, tss.ffi.NULL, tss.ffi.NULL)
            marshalled = tss.marshal("TPM2B_PUBLIC", public[0])
        except TssError as exc:
            raise errors.tpm_error(exc, errors.CREATE_SRK) from None
        finally:
            tss.free(public[0])
        if srk_name_of(marshalled) != self._srk_name:
            raise NoTpmError("the TPM's storage root key does not match its own name (something between us "
                             "and the TPM?)")
        return marshalled

    def check_srk(self, expected: bytes) -> None:
        """Select the SRK a key was sealed under, by its name; refuse a TPM that has none such.

        Tried in order: the one already selected, 0x81000001, our noDA primary, tpm2-tools' primary
        (adopted objects). A swapped or cleared TPM derives other keys and is refused.
        """
        try:
            if self._srk is not None and self._srk_name == expected:
                return
            persistent = self._persistent_srk()
            if persistent is not None and self._esys.name(persistent[0]) == expected:
                self._set_srk(persistent[0], transient=False, for_sealing=persistent[1])
                return
            for kind in SRK_TEMPLATES:
                self._set_srk(self._create_srk(kind), transient=True, for_sealing=kind == "tcg")
                if self._srk_name == expected:
                    return
        except TssError as exc:
            raise errors.tpm_error(exc, errors.CREATE_SRK) from None
        raise NoTpmError("TPM identity changed: this TPM's storage root key is not the one the key was sealed "
                         "under (a different or cleared TPM, or something between us and the TPM)")

    def use_tpm2_tools_srk(self, alg: str = "ecc") -> None:
        """Select tpm2-tools' default primary (`tpm2_createprimary -C o -G ecc|rsa`), the parent of
        objects made by the ArchWiki recipe and by Clevis's tpm2 pin; systemd-cryptenroll before
        version 254 (no tpm2_srk in its token) makes the same one."""
        try:
            self._set_srk(self._create_srk("tpm2-tools", alg), transient=True, for_sealing=False)
        except TssError as exc:
            raise errors.tpm_error(exc, errors.CREATE_SRK) from None
