"""fluxc keygen / sign / verify: Ed25519 keys, engine signatures, and the whole-engine check.

The policy (what loads unsigned, what needs a trusted key) is in fluxc.runtime.core.signing.
"""

import click


@click.command("keygen")
@click.argument("key", type=click.Path(dir_okay=False))
def keygen(key):
    """Write a new Ed25519 signing key to KEY (PEM, mode 0600) and its public key to KEY.pub.

    Typical use: fluxc keygen release.key; fluxc build ... --sign-key release.key; ship release.key.pub
    """
    from fluxc.runtime.core.signing import generate

    click.echo(f"wrote {key} (private, keep it secret) and {key}.pub (public): {generate(key)}")


@click.command("sign")
@click.argument("engine", type=click.Path())
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="Ed25519 private key (PEM).")
def sign(engine, key):
    """Sign an engine: checks every file first, then adds the key's signature over the engine digest to seal.json.

    Typical use: fluxc sign flux1-dev.fluxe --key release.key
    """
    from fluxc.runtime.core.bundle import read_manifest, sign_engine, verify_files
    from fluxc.runtime.core.signing import load_private_key

    private = load_private_key(key)  # a bad key fails before the engine is read
    verify_files(engine, read_manifest(engine))
    click.echo(f"signed {engine} with {sign_engine(engine, private)}")


@click.command("verify")
@click.argument("engine", type=click.Path())
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Ed25519 public key (PEM); repeat for several. Given, a valid signature by one of them is required.")
def verify(engine, trusted_keys):
    """Check a whole engine: its seal, manifest and every file's digest, and its signatures.

    Without --trusted-key, each signature is checked against the public key it carries (that shows the engine is
    unchanged since it was signed, not who signed it); with keys, one of them must have signed it.

    Typical use: fluxc verify flux1-dev.fluxe --trusted-key release.key.pub
    """
    from fluxc.runtime.core.bundle import read_manifest, read_seal, verify_files
    from fluxc.runtime.core.errors import FluxcError
    from fluxc.runtime.core.signing import check_trusted, fingerprint, public_keys, valid

    manifest = read_manifest(engine, public_keys(trusted_keys) if trusted_keys else None)
    verify_files(engine, manifest)
    digest, signatures = read_seal(engine)
    click.echo(f"engine digest  blake3:{digest}")
    click.echo(f"files          {len(manifest['files'])} files and the manifest match their digests")
    bad = [fingerprint(bytes.fromhex(e["public_key"])) for e in signatures if not valid(digest, e)]
    if bad:
        raise FluxcError(f"Engine '{engine}' carries a signature by {bad[0]} that does not verify: the engine changed "
                         "after it was signed.", "Get the engine again from its publisher, or rebuild it.")
    for e in signatures:
        click.echo(f"signature      {fingerprint(bytes.fromhex(e['public_key']))}: valid")
    if trusted_keys:
        click.echo(f"trusted        signed by {check_trusted(digest, signatures, public_keys(trusted_keys), engine)}")
    elif not signatures:
        click.echo("signature      none (an unsigned engine loads only where no trusted key is required)")
    else:
        click.echo("trusted        not checked (no --trusted-key given)")
