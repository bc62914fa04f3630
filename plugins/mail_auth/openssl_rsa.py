"""RSA for dkimpy through OpenSSL (``cryptography``) instead of its pure-Python arithmetic.

dkimpy does DKIM's canonicalization, hashing, tag parsing and ARC; for the RSA step it has
its own ``pow()`` over Python integers, about 20 times slower than OpenSSL for a 2048-bit
signature. dkimpy calls two module-level functions for that step
(``RSASSA_PKCS1_v1_5_sign`` and ``..._verify``, with its parsed key dictionaries); ``install``
points them at OpenSSL. The keys built from those dictionaries are cached by modulus, so a
domain's key is parsed by OpenSSL once, not per message (and dkimpy's PEM parsing, by the
PEM text).
"""

from __future__ import annotations

import functools
from typing import Any

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

__all__ = ["install"]

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


@functools.lru_cache(maxsize=256)
def _private(modulus: int, public_exponent: int, private_exponent: int, p: int, q: int,
             dmp1: int, dmq1: int, iqmp: int) -> rsa.RSAPrivateKey:
    numbers = rsa.RSAPrivateNumbers(p, q, private_exponent, dmp1, dmq1, iqmp,
                                    rsa.RSAPublicNumbers(public_exponent, modulus))
    return numbers.private_key()


@functools.lru_cache(maxsize=4096)
def _public(modulus: int, public_exponent: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(public_exponent, modulus).public_key()


def _algorithm(hash_object: Any) -> utils.Prehashed:
    name = str(hash_object.name).lower()
    if name not in _HASHES:
        raise dkim.ParameterError(f"unsupported hash {name}")
    return utils.Prehashed(_HASHES[name]())


def sign(hash_object: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's ``RSASSA_PKCS1_v1_5_sign(hash, private_key)``, by OpenSSL."""
    key = _private(private_key["modulus"], private_key["publicExponent"],
                   private_key["privateExponent"], private_key["prime1"],
                   private_key["prime2"], private_key["exponent1"], private_key["exponent2"],
                   private_key["coefficient"])
    return key.sign(hash_object.digest(), padding.PKCS1v15(), _algorithm(hash_object))


def verify(hash_object: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    """dkimpy's ``RSASSA_PKCS1_v1_5_verify(hash, signature, public_key)``, by OpenSSL."""
    try:
        key = _public(public_key["modulus"], public_key["publicExponent"])
    except ValueError as exc:  # not a usable RSA key (dkimpy maps this to permerror)
        raise dkim.KeyFormatError(f"invalid RSA public key: {exc}") from None
    try:
        key.verify(signature, hash_object.digest(), padding.PKCS1v15(),
                   _algorithm(hash_object))
    except InvalidSignature:
        return False
    return True


def install() -> None:
    """Point dkimpy's RSA step at OpenSSL, and keep the private keys it parses from PEM
    (its own ASN.1 reader, per signature otherwise) for the next message (idempotent)."""
    dkim.RSASSA_PKCS1_v1_5_sign = sign
    dkim.RSASSA_PKCS1_v1_5_verify = verify
    if not hasattr(dkim.parse_pem_private_key, "cache_info"):
        dkim.parse_pem_private_key = functools.lru_cache(maxsize=64)(
            dkim.parse_pem_private_key)
