"""Key files: ``edgesplit keygen`` writes them, ``--keys DIR`` reads them.

One key pair per daemon or client, in ZeroMQ's certificate format (``zmq.auth`` reads them),
with the holder's role in the file's metadata. A key directory holds exactly one secret
key (``NAME.key_secret``: who this process is) and the public keys (``NAME.key``) of every
peer it accepts; the role written in each public key file is the role that key gets. The
operator assembles these directories, so the role in a file is as trusted as the file.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import zmq.auth

from ..errors import ConfigError

ROLES = ("coordinator", "worker", "operator", "user")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ROLE_LINE = re.compile(r'^\s+role\s*=\s*"?([a-z]+)"?\s*$')


@dataclass(frozen=True)
class Peer:
    """A known key: its file's name, its role, the key (z85 text)."""

    name: str
    role: str
    key: str


@dataclass(frozen=True)
class KeyRing:
    """This process's key pair and the public keys it accepts, by z85 key."""

    me: Peer
    public: bytes  # z85
    secret: bytes  # z85
    peers: Mapping[str, Peer] = field(default_factory=dict)
    root: str = ""

    def peer(self, key: str) -> Peer | None:
        return self.peers.get(key)

    def allowed(self, roles: frozenset[str]) -> list[Peer]:
        return [p for p in self.peers.values() if p.role in roles]

    def coordinator_key(self) -> bytes:
        """The coordinator's public key, to dial it (exactly one coordinator key must be in the directory)."""
        keys = [p for p in self.peers.values() if p.role == "coordinator"]
        if len(keys) != 1:
            raise ConfigError(f"key directory {self.root} holds {len(keys)} coordinator public key(s); it needs "
                              "exactly one (copy coordinator.key from where `edgesplit keygen --role coordinator` "
                              "wrote it)")
        return keys[0].key.encode()


def _role_of(path: Path) -> str:
    for line in path.read_text(errors="replace").splitlines():
        m = _ROLE_LINE.match(line)
        if m:
            role = m.group(1)
            if role not in ROLES:
                raise ConfigError(f"{path}: role {role!r} is not one of {ROLES}")
            return role
    raise ConfigError(f"{path} names no role; make keys with `edgesplit keygen --role ROLE --out DIR`")


def keygen(role: str, out: str | os.PathLike[str], name: str | None = None) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (mode 0600) for ``role`` into ``out``.

    Refuses to overwrite: a replaced key would lock its holder out of every cluster that knew it.
    """
    if role not in ROLES:
        raise ConfigError(f"role must be one of {ROLES}, got {role!r}")
    name = name or role
    if not _NAME.fullmatch(name):
        raise ConfigError(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    root = Path(out)
    public, secret = root / f"{name}.key", root / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise ConfigError(f"{p} exists; pick another --name or remove it first (keys are never overwritten)")
    root.mkdir(parents=True, exist_ok=True)
    pub_key, sec_key = zmq.curve_keypair()
    head = f"#   edgesplit {role} key {name}, made {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    meta = f'metadata\n    role = "{role}"\n'
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{head}#   SECRET: keep it on this machine only\n\n{meta}curve\n"
                f'    public-key = "{pub_key.decode()}"\n    secret-key = "{sec_key.decode()}"\n')
    public.write_text(f"{head}#   public: copy it to the key directory of every peer that accepts this one\n\n"
                      f'{meta}curve\n    public-key = "{pub_key.decode()}"\n')
    return public, secret


def load_keys(root: str | os.PathLike[str]) -> KeyRing:
    """Read a key directory: its one secret key (who we are) and the public keys we accept.

    Raises:
        ConfigError: no such directory, no or several secret keys, a file without a role.
    """
    d = Path(root)
    if not d.is_dir():
        raise ConfigError(f"key directory {d} does not exist; make keys with `edgesplit keygen --role ROLE --out {d}`")
    secrets = sorted(d.glob("*.key_secret"))
    if len(secrets) != 1:
        raise ConfigError(f"key directory {d} holds {len(secrets)} secret keys ({[p.name for p in secrets][:4]}); "
                          "it needs exactly one, this process's own (`edgesplit keygen --role ROLE --out DIR`)")
    try:
        public, secret = zmq.auth.load_certificate(str(secrets[0]))
    except (ValueError, OSError) as e:
        raise ConfigError(f"cannot read {secrets[0]}: {e}") from None
    if secret is None:
        raise ConfigError(f"{secrets[0]} holds no secret key")
    me = Peer(secrets[0].name[:-len(".key_secret")], _role_of(secrets[0]), public.decode())
    peers: dict[str, Peer] = {}
    for p in sorted(d.glob("*.key")):
        try:
            key, _ = zmq.auth.load_certificate(str(p))
        except (ValueError, OSError) as e:
            raise ConfigError(f"cannot read public key {p}: {e}") from None
        peers[key.decode()] = Peer(p.name[:-len(".key")], _role_of(p), key.decode())
    return KeyRing(me, public, secret, peers, str(d))
