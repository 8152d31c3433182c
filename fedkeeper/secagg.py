"""Secure aggregation in the SecAgg / SecAgg+ style (Bonawitz et al. 2017; Bell et al. 2020): the protocol logic.

Keys: each client holds a long-term X25519 identity; its public half is registered in the store. Per round, every
client derives from its identity (so a retried invocation produces the same bytes) an ephemeral X25519 mask key and a
self-mask seed, and Shamir-shares both among its neighbours in the round's graph (all selected clients, or SecAgg+'s
sparse graph). Each share travels in a box only its addressee can open: ChaCha20-Poly1305 under a key agreed between
the two identities, bound to the federation, the round and both ids. The masked upload is

    y_i = q(n_i·δ_i) + PRG(b_i) + Σ_{j neighbour in the roster} ±PRG(s_ij)   (mod 2^bits)

with s_ij agreed from the two ephemeral keys through a round-bound HKDF, and ± by id order so pairs cancel in the sum.
After the uploads, survivors reveal shares of b_i for every survivor and of the mask key for every dropped client,
never both for one client, and never a mask key of a client whose update is in the store. The aggregator sums the
masked vectors, rebuilds exactly those secrets, removes their masks, and sees only the sum.

`cryptography` provides X25519, HKDF-SHA256, ChaCha20 (expanding a seed into a mask) and ChaCha20-Poly1305.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fedkeeper.core.privacy import ring, shamir

VERSION = "fedkeeper-secagg-v1"
_HEX32 = 64


class SecAggError(ValueError):
    """A record, share or request that breaks the protocol; the message says which and why."""


def _crypto():
    try:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import x25519
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise RuntimeError("secure aggregation needs the cryptography package; "
                           "install the privacy extra: pip install 'fedkeeper[privacy]'") from exc
    return hashes, x25519, Cipher, algorithms, ChaCha20Poly1305, HKDF


# -- primitives ------------------------------------------------------------------------------------------
def generate_identity() -> tuple[bytes, bytes]:
    """A fresh long-term X25519 key pair as (private, public) raw 32-byte strings."""
    _, x25519, *_ = _crypto()
    sk = x25519.X25519PrivateKey.generate()
    return _raw_private(sk), _raw_public(sk.public_key())


def public_of(private: bytes) -> bytes:
    """The X25519 public key of a raw private key."""
    _, x25519, *_ = _crypto()
    return _raw_public(x25519.X25519PrivateKey.from_private_bytes(_b32(private, "private key")).public_key())


def _raw_private(sk: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return sk.private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption())


def _raw_public(pk: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return pk.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)


def _b32(v: bytes, what: str) -> bytes:
    if not isinstance(v, (bytes, bytearray)) or len(v) != 32:
        raise SecAggError(f"{what} must be 32 bytes")
    return bytes(v)


def agree(private: bytes, public: bytes) -> bytes:
    """X25519 shared secret; a low-order public key (all-zero secret) is refused."""
    _, x25519, *_ = _crypto()
    try:
        return x25519.X25519PrivateKey.from_private_bytes(_b32(private, "private key")).exchange(
            x25519.X25519PublicKey.from_public_bytes(_b32(public, "public key")))
    except ValueError as exc:
        raise SecAggError(f"key agreement refused: {exc}") from None


def kdf(secret: bytes, *info: Any, length: int = 32) -> bytes:
    """HKDF-SHA256 of a secret, bound to the protocol version and every part of `info` (federation, round, ids)."""
    hashes, _, _, _, _, HKDF = _crypto()
    label = json.dumps([VERSION, *[str(x) for x in info]], separators=(",", ":")).encode()
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=VERSION.encode(), info=label).derive(secret)


def expand(seed: bytes, size: int, bits: int, offset: int = 0) -> np.ndarray:
    """`size` ring elements of ChaCha20's keystream under `seed`, starting `offset` elements in (a mask slice)."""
    _, _, Cipher, algorithms, _, _ = _crypto()
    width = bits // 8
    start = offset * width
    block, skip = divmod(start, 64)
    nonce = block.to_bytes(8, "little") + bytes(8)  # ChaCha20's 64-bit block counter starts at the slice's block
    enc = Cipher(algorithms.ChaCha20(_b32(seed, "seed"), nonce), mode=None).encryptor()
    raw = enc.update(bytes(skip + size * width))
    return np.frombuffer(raw, dtype=np.dtype(ring.DTYPES[bits]).newbyteorder("<"), offset=skip)


MASK_CHUNK = 1 << 18  # elements per keystream slice: the mask never needs more than a megabyte or two at once


def apply_mask(flat: np.ndarray, seed: bytes, sign: int, bits: int, offset: int) -> None:
    """flat ← flat ± PRG(seed)[offset : offset + len(flat)] mod 2^bits, in slices (memory stays O(slice))."""
    for start in range(0, flat.size, MASK_CHUNK):
        part = flat[start:start + MASK_CHUNK]
        ring.add(part, expand(seed, part.size, bits, offset + start), sign)


def _seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> str:
    *_, ChaCha20Poly1305, _ = _crypto()
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad).hex()


def _open(key: bytes, nonce: bytes, box: str, aad: bytes) -> bytes:
    *_, ChaCha20Poly1305, _ = _crypto()
    from cryptography.exceptions import InvalidTag

    try:
        return ChaCha20Poly1305(key).decrypt(nonce, bytes.fromhex(box), aad)
    except (InvalidTag, ValueError, TypeError):
        raise SecAggError("a share box does not open: it was not sealed for this client, round and sender") from None


def digest(obj: Any) -> str:
    """SHA-256 of a JSON value in canonical form (binds an answer to the exact request it answers)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hex32(v: Any, what: str) -> bytes:
    """32 bytes from their hex form; raises SecAggError on anything else."""
    if not isinstance(v, str) or len(v) != _HEX32:
        raise SecAggError(f"{what} must be 64 hex digits")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise SecAggError(f"{what} must be 64 hex digits") from None


# -- the round's shape -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundSpec:
    """What every party of round r agrees on from the manifest and the config: ids, graph, thresholds, ring."""

    federation: str
    round: int
    selected: tuple[str, ...]
    neighbors: int = 0          # 0: complete graph
    threshold: float = 0.5
    bits: int = 32
    clip_range: float = 4.0
    graph: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "selected", tuple(sorted(self.selected)))
        object.__setattr__(self, "graph", _graph(self.selected, self.neighbors, f"{self.federation}|{self.round}"))

    def x(self, client: str) -> int:
        """The client's Shamir point (its position among the selected, from 1)."""
        return self.selected.index(client) + 1

    def holders(self, client: str) -> list[str]:
        """Who holds shares of the client's secrets: its neighbours and itself."""
        return sorted(set(self.graph[client]) | {client})

    def t(self, client: str) -> int:
        """Shares needed to rebuild the client's secrets: more than `threshold` of its holders."""
        k = len(self.holders(client))
        return min(k, math.floor(self.threshold * k) + 1)


def _graph(ids: Sequence[str], k: int, seed: str) -> dict[str, list[str]]:
    """Each client's neighbours: everyone, or SecAgg+'s k-regular ring over a round-seeded permutation."""
    n = len(ids)
    if k <= 0 or k >= n - 1:
        return {c: [d for d in ids if d != c] for c in ids}
    order = sorted(ids, key=lambda c: hashlib.sha256(f"{seed}|{c}".encode()).digest())
    half = (k + 1) // 2
    out: dict[str, set[str]] = {c: set() for c in ids}
    for i, c in enumerate(order):
        for step in range(1, half + 1):
            d = order[(i + step) % n]
            out[c].add(d)
            out[d].add(c)
    return {c: sorted(v) for c, v in out.items()}


def _sign(i: str, j: str) -> int:
    return 1 if i < j else -1


# -- one client's secrets for one round --------------------------------------------------------------------
class ClientRound:
    """A client's view of round r: its per-round secrets, all derived from its identity key (retries repeat bytes)."""

    def __init__(self, spec: RoundSpec, client: str, identity: bytes) -> None:
        if client not in spec.selected:
            raise SecAggError(f"client {client} is not selected for round {spec.round}")
        self.spec, self.client, self.identity = spec, client, _b32(identity, "identity key")
        base = (spec.federation, spec.round, client)
        self.mask_private = kdf(self.identity, "mask-key", *base)
        self.mask_public = public_of(self.mask_private)
        self.self_seed = kdf(self.identity, "self-mask", *base)

    def _coefficient(self, which: str):
        return lambda k: int.from_bytes(kdf(self.identity, "poly", which, k, self.spec.federation, self.spec.round,
                                            self.client, length=80), "big")

    def _box_key(self, peer_public: bytes, sender: str, to: str) -> tuple[bytes, bytes, bytes]:
        key = kdf(agree(self.identity, peer_public), "share-box", self.spec.federation, self.spec.round, sender, to,
                  length=44)
        aad = json.dumps([VERSION, self.spec.federation, self.spec.round, sender, to]).encode()
        return key[:32], key[32:], aad

    def advertise(self, identities: Mapping[str, bytes]) -> dict:
        """The advertise record: mask public key, a commitment to the self-mask seed, and a sealed share box per holder."""
        holders = self.spec.holders(self.client)
        t = self.spec.t(self.client)
        xs = [self.spec.x(h) for h in holders]
        key_shares = shamir.split(self.mask_private, xs, t, self._coefficient("key"))
        self_shares = shamir.split(self.self_seed, xs, t, self._coefficient("self"))
        boxes = {}
        for h, x in zip(holders, xs):
            key, nonce, aad = self._box_key(_b32(identities[h], f"public key of {h}"), self.client, h)
            plain = json.dumps({"round": self.spec.round, "from": self.client, "to": h, "x": x,
                                "key": shamir.encode(key_shares[x]), "self": shamir.encode(self_shares[x])}).encode()
            boxes[h] = {"nonce": nonce.hex(), "box": _seal(key, nonce, plain, aad)}
        return {"kind": "secagg_advertise", "round": self.spec.round, "client": self.client,
                "mask_public": self.mask_public.hex(), "self_commitment": hashlib.sha256(self.self_seed).hexdigest(),
                "threshold": t, "boxes": boxes}

    def mask_seeds(self, roster: Iterable[str], mask_publics: Mapping[str, bytes]) -> list[tuple[bytes, int]]:
        """(seed, sign) of the self mask and of each pairwise mask with a neighbour in the roster."""
        roster = set(roster)
        out = [(self.self_seed, 1)]
        for j in self.spec.graph[self.client]:
            if j in roster:
                out.append((pair_seed(self.spec, self.client, j, self.mask_private, mask_publics[j]), _sign(self.client, j)))
        return out

    def mask(self, delta: Mapping[str, np.ndarray], num_examples: int, scale: int, roster: Iterable[str],
             mask_publics: Mapping[str, bytes]) -> dict[str, np.ndarray]:
        """The masked, quantised, example-weighted update y_i, tensor by tensor (sorted names, one mask stream)."""
        q = ring.quantise(delta, num_examples, scale, self.spec.bits, self.spec.clip_range)
        seeds = self.mask_seeds(roster, mask_publics)
        offset = 0
        for name in sorted(q):
            flat = q[name].reshape(-1)
            for seed, sign in seeds:
                apply_mask(flat, seed, sign, self.spec.bits, offset)
            offset += flat.size
        return q

    def open_box(self, sender: str, sender_identity: bytes, record: Mapping) -> dict:
        """The shares `sender` sealed for this client in its advertise record; refuses any other round or addressee."""
        boxes = record.get("boxes") if isinstance(record, Mapping) else None
        entry = boxes.get(self.client) if isinstance(boxes, Mapping) else None
        if not isinstance(entry, Mapping) or not isinstance(entry.get("nonce"), str) or not isinstance(entry.get("box"), str):
            raise SecAggError(f"{sender}'s advertise record holds no box for {self.client}")
        key, _, aad = self._box_key(_b32(sender_identity, f"public key of {sender}"), sender, self.client)
        try:
            nonce = bytes.fromhex(entry["nonce"])
        except ValueError:
            raise SecAggError("a share box's nonce is not hex") from None
        if len(nonce) != 12 or len(entry["box"]) > 4096:
            raise SecAggError("a share box has the wrong size")
        plain = json.loads(_open(key, nonce, entry["box"], aad))
        if (not isinstance(plain, dict) or plain.get("round") != self.spec.round or plain.get("from") != sender
                or plain.get("to") != self.client or plain.get("x") != self.spec.x(self.client)):
            raise SecAggError(f"a share box from {sender} is for another round or client")
        return {"key": shamir.decode(plain.get("key")), "self": shamir.decode(plain.get("self"))}

    def reveal(self, request: Mapping, roster: Sequence[str], records: Mapping[str, Mapping],
               identities: Mapping[str, bytes], delivered: Iterable[str]) -> dict:
        """This client's unmask answer: self-mask shares of survivors, mask-key shares of dropped clients, nothing more.

        `delivered` lists the clients whose updates are in the store: a mask key of any of them is never revealed,
        whatever the request says, since with it and the self mask the update would be exposed.
        """
        survivors, dropped = check_request(self.spec, request, roster)
        if self.client not in survivors:
            raise SecAggError(f"client {self.client} is not a survivor of round {self.spec.round}; it reveals nothing")
        overlap = sorted(set(dropped) & set(delivered))
        if overlap:
            raise SecAggError(f"the request names {', '.join(overlap)} as dropped, but their updates are in the store; "
                              "revealing their mask keys would expose them")
        self_shares, key_shares = {}, {}
        for sender in self.spec.holders(self.client):  # whose shares this client holds: its neighbours and itself
            if sender not in roster:
                continue
            shares = self.open_box(sender, identities[sender], records[sender])
            if sender in survivors:
                self_shares[sender] = shamir.encode(shares["self"])
            elif sender in dropped:
                key_shares[sender] = shamir.encode(shares["key"])
        return {"kind": "secagg_unmask", "round": self.spec.round, "client": self.client,
                "request": digest(dict(request)), "self_shares": self_shares, "key_shares": key_shares}


def pair_seed(spec: RoundSpec, i: str, j: str, private: bytes, peer_public: bytes) -> bytes:
    """The pairwise mask seed of i and j for this round (the same from either side)."""
    a, b = sorted((i, j))
    return kdf(agree(private, peer_public), "pair-mask", spec.federation, spec.round, a, b)


# -- checks of what others wrote ---------------------------------------------------------------------------
def check_advertise(spec: RoundSpec, client: str, record: Any) -> bytes:
    """The mask public key of a valid advertise record; raises SecAggError naming what is wrong."""
    if not isinstance(record, Mapping) or record.get("kind") != "secagg_advertise":
        raise SecAggError("not an advertise record")
    if record.get("round") != spec.round:
        raise SecAggError(f"advertise record is for round {record.get('round')!r}, not {spec.round}")
    if record.get("client") != client:
        raise SecAggError(f"advertise record names {record.get('client')!r}, written under {client}")
    if record.get("threshold") != spec.t(client):
        raise SecAggError(f"advertise record's threshold {record.get('threshold')!r} is not the round's {spec.t(client)}")
    boxes = record.get("boxes")
    if not isinstance(boxes, Mapping) or set(boxes) != set(spec.holders(client)):
        raise SecAggError("advertise record does not hold exactly one share box per holder")
    hex32(record.get("self_commitment"), "self_commitment")
    return hex32(record.get("mask_public"), "mask_public")


def check_request(spec: RoundSpec, request: Any, roster: Sequence[str]) -> tuple[list[str], list[str]]:
    """(survivors, dropped) of a well-formed unmask request: the two split the roster exactly."""
    if not isinstance(request, Mapping) or request.get("round") != spec.round:
        raise SecAggError(f"the unmask request is not for round {spec.round}")
    survivors, dropped = request.get("survivors"), request.get("dropped")
    if not isinstance(survivors, list) or not isinstance(dropped, list):
        raise SecAggError("the unmask request lacks survivors or dropped")
    if set(survivors) & set(dropped) or sorted(set(survivors) | set(dropped)) != sorted(roster) \
            or len(survivors) + len(dropped) != len(roster):
        raise SecAggError("survivors and dropped must split the roster, each client once")
    return sorted(survivors), sorted(dropped)


# -- the aggregator's side ---------------------------------------------------------------------------------
class RoundFailed(RuntimeError):
    """The sum cannot be unmasked (too few shares answered); the message says which secret lacked how many."""


def rebuild(spec: RoundSpec, survivors: Sequence[str], dropped: Sequence[str], answers: Mapping[str, Mapping],
            records: Mapping[str, Mapping]) -> tuple[dict[str, bytes], dict[str, bytes], list[dict]]:
    """({survivor: self seed}, {dropped: mask key}, rejected answers) from the unmask answers, each secret checked
    against its owner's commitment (self seed) or mask public key (mask key)."""
    rejected: list[dict] = []
    self_pts: dict[str, dict[int, int]] = {c: {} for c in survivors}
    key_pts: dict[str, dict[int, int]] = {c: {} for c in dropped}
    for holder, ans in sorted(answers.items()):
        try:
            if not isinstance(ans, Mapping) or ans.get("round") != spec.round or ans.get("client") != holder:
                raise SecAggError("answer is for another round or client")
            x = spec.x(holder)
            for field_name, pts, allowed in (("self_shares", self_pts, survivors), ("key_shares", key_pts, dropped)):
                got = ans.get(field_name)
                if not isinstance(got, Mapping):
                    raise SecAggError(f"answer lacks {field_name}")
                for owner, text in got.items():
                    if owner not in allowed or holder not in spec.holders(owner):
                        raise SecAggError(f"answer holds a share of {owner!r} it was not asked for")
                    pts[owner][x] = shamir.decode(text)
        except (SecAggError, shamir.ShareError, ValueError) as exc:
            rejected.append({"client": holder, "reason": f"unmask answer rejected: {exc}"})
            for pts in (self_pts, key_pts):
                for owner in pts:
                    pts[owner].pop(spec.x(holder), None)
    seeds, keys_ = {}, {}
    for owner, pts in sorted(self_pts.items()):
        seeds[owner] = _combine(spec, owner, pts, "self-mask seed",
                                lambda s, o=owner: hashlib.sha256(s).hexdigest() == records[o]["self_commitment"])
    for owner, pts in sorted(key_pts.items()):
        keys_[owner] = _combine(spec, owner, pts, "mask key",
                                lambda s, o=owner: public_of(s).hex() == records[o]["mask_public"])
    return seeds, keys_, rejected


def _combine(spec: RoundSpec, owner: str, pts: Mapping[int, int], what: str, ok) -> bytes:
    t = spec.t(owner)
    if len(pts) < t:
        raise RoundFailed(f"only {len(pts)} of {len(spec.holders(owner))} holders answered with shares of "
                          f"{owner}'s {what}; {t} are needed, so the sum stays masked")
    # Try subsets of t shares (a bounded number): a wrong share from a few holders must not block the honest rest.
    import itertools

    items = sorted(pts.items())
    for subset in itertools.islice(itertools.combinations(items, t), 256):
        try:
            secret = shamir.combine(dict(subset), t)
        except shamir.ShareError:
            continue
        if ok(secret):
            return secret
    raise RoundFailed(f"the shares of {owner}'s {what} do not rebuild the committed value")


def unmask_masks(spec: RoundSpec, survivors: Sequence[str], dropped: Sequence[str], seeds: Mapping[str, bytes],
                 mask_keys: Mapping[str, bytes], mask_publics: Mapping[str, bytes]) -> list[tuple[bytes, int]]:
    """(seed, sign) of every mask left in the sum of the survivors' uploads, to be subtracted."""
    out = [(seeds[c], 1) for c in survivors]
    for d in dropped:
        for i in spec.graph[d]:
            if i in survivors:
                out.append((pair_seed(spec, d, i, mask_keys[d], mask_publics[i]), _sign(i, d)))
    return out


def scale_for(spec: RoundSpec, total_examples: int) -> int:
    """The fixed-point scale the roster uses, from a bound on the round's total examples."""
    return ring.scale_bits(spec.bits, total_examples, spec.clip_range)
