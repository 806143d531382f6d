"""Who may talk to whom: CURVE keys per role, the ZAP allow-list, what each role may send, safe binds.

A cluster runs keyed (every daemon and client takes ``--keys DIR``) or open on loopback.
``keys`` reads key directories, ``zap`` makes sockets encrypted and authenticated, ``roles``
says which messages each role may send to each daemon, ``exposure`` refuses an open bind
beyond loopback, ``ratelimit`` bounds each peer's control messages.
"""
from .exposure import InsecureNag, check_exposure, is_loopback
from .keys import ROLES, KeyRing, Peer, keygen, load_keys
from .zap import Security

__all__ = ["ROLES", "KeyRing", "Peer", "keygen", "load_keys", "Security", "InsecureNag", "check_exposure",
           "is_loopback"]
