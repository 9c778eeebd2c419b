"""Ed25519 signatures over an engine's digest (the `cryptography` package, imported only when keys are used).

An engine's digest is the BLAKE3 of its manifest.json, which lists the BLAKE3 of every other file, so one
signature covers every byte. seal.json holds the digest and the signatures; signing adds one, never changes
another file, so an engine can be signed after it is built (`fluxc sign`) or as it is written
(`fluxc build --sign-key`).

Policy (DESIGN.md, README "Trust"):
- Every load checks the seal's digest against manifest.json and every file's digest against the manifest
  (unless verify=False, which is refused when keys are required). That catches damage, not tampering: someone
  who can write the engine can also rewrite its digests.
- Loading with trusted keys (`Engine.load(trusted_keys=...)`, `fluxc run/verify --trusted-key`, and a server
  started with keys) requires a valid signature by one of them over the digest; that check comes before the
  manifest is parsed and before any artifact is read, so an unsigned or tampered engine runs no code.
- Loading without trusted keys accepts unsigned engines: local builds, development. Signatures present are then
  not checked (the loader has no key to check them against); `fluxc verify` still checks them against the
  public keys they carry and says so.
Keys are PEM files: PKCS#8 private keys (`fluxc keygen`, or `openssl genpkey -algorithm ed25519`) and
SubjectPublicKeyInfo public keys (`openssl pkey -pubout`).
"""

import hashlib
import os

from fluxc.runtime.core.errors import FluxcError

DOMAIN = b"fluxc engine digest v1\x00"  # signed message = DOMAIN + the 32 digest bytes


def fingerprint(public_raw: bytes) -> str:
    """A short name for a public key: ed25519: and the first 16 hex digits of SHA-256 over its 32 raw bytes."""
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:16]


def _serialization():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise FluxcError("Signed engines need the cryptography package.", "pip install cryptography") from None
    return serialization, ed25519


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FluxcError(f"Cannot read {what} '{path}': {e.strerror}.", "Check the path.") from None


def load_private_key(path: str):
    serialization, ed25519 = _serialization()
    try:
        key = serialization.load_pem_private_key(_read_pem(path, "private key"), password=None)
    except (ValueError, TypeError) as e:
        raise FluxcError(f"'{path}' is not an unencrypted PEM private key ({e}).",
                         "Make one with `fluxc keygen KEY`, or `openssl genpkey -algorithm ed25519 -out KEY`.") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise FluxcError(f"'{path}' holds a {type(key).__name__}, not an Ed25519 key.",
                         "fluxc signs with Ed25519: make a key with `fluxc keygen KEY`.")
    return key


def load_public_key(path: str) -> bytes:
    """The 32 raw bytes of the Ed25519 public key in a PEM file."""
    serialization, ed25519 = _serialization()
    try:
        key = serialization.load_pem_public_key(_read_pem(path, "public key"))
    except (ValueError, TypeError) as e:
        raise FluxcError(f"'{path}' is not a PEM public key ({e}).",
                         "Pass the KEY.pub that `fluxc keygen KEY` wrote (or `openssl pkey -in KEY -pubout`).") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise FluxcError(f"'{path}' holds a {type(key).__name__}, not an Ed25519 key.", "Pass an Ed25519 public key.")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_keys(keys) -> list[bytes]:
    """Trusted keys as raw bytes, from PEM paths or raw 32-byte keys."""
    return [k if isinstance(k, bytes) else load_public_key(os.fspath(k)) for k in keys]


def generate(path: str) -> str:
    """Write a new Ed25519 private key to `path` (PEM, mode 0600) and its public key to path.pub; the public
    key's fingerprint. Refuses to overwrite either."""
    serialization, ed25519 = _serialization()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for file in (path, path + ".pub"):
        if os.path.exists(file):
            raise FluxcError(f"'{file}' exists; fluxc keygen never overwrites a key.", "Choose another path.")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        with open(path + ".pub", "wb") as f:
            f.write(public)
    except OSError as e:
        raise FluxcError(f"Cannot write the key: {e}.", "Choose a path in a folder you can write.") from None
    return fingerprint(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def sign(digest: str, private_key) -> dict:
    """A seal entry: the signer's raw public key and its signature over the digest, both hex."""
    serialization, _ = _serialization()
    public = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"public_key": public.hex(), "signature": private_key.sign(DOMAIN + bytes.fromhex(digest)).hex()}


def valid(digest: str, entry: dict) -> bool:
    """Whether `entry`'s signature over the digest verifies with the public key it names."""
    _, ed25519 = _serialization()
    from cryptography.exceptions import InvalidSignature

    try:
        key = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(entry["public_key"]))
        key.verify(bytes.fromhex(entry["signature"]), DOMAIN + bytes.fromhex(digest))
        return True
    except (InvalidSignature, ValueError):
        return False


def check_trusted(digest: str, signatures: list[dict], trusted: list[bytes], root: str) -> str:
    """The fingerprint of a trusted key whose valid signature the seal holds; FluxcError otherwise."""
    if not signatures:
        raise FluxcError(f"Engine '{root}' is not signed, and this load requires a signature by a trusted key.",
                         "Sign it with `fluxc sign ENGINE --key KEY` (a key whose .pub is trusted here), or load it "
                         "without trusted keys if you built it yourself.")
    wanted = {k.hex() for k in trusted}
    for entry in signatures:
        if entry["public_key"] in wanted:
            if valid(digest, entry):
                return fingerprint(bytes.fromhex(entry["public_key"]))
            raise FluxcError(f"Engine '{root}' carries a signature by trusted key "
                             f"{fingerprint(bytes.fromhex(entry['public_key']))} that does not verify: the engine "
                             "changed after it was signed.", "Get the engine again from its publisher, or rebuild it.")
    signers = ", ".join(fingerprint(bytes.fromhex(e["public_key"])) for e in signatures)
    raise FluxcError(f"Engine '{root}' is signed by {signers}, none of them a trusted key "
                     f"({', '.join(fingerprint(k) for k in trusted)}).",
                     "Pass the signer's public key with --trusted-key if you trust it, or sign the engine with yours.")
