"""The attacks by name: one owner of the list (``ATTACKS``), :func:`attack_class` and :func:`create_attack`."""

from __future__ import annotations

from torch import nn

from fakescope.attacks.base import Attack, AttackError
from fakescope.attacks.fgsm import FGSM
from fakescope.attacks.pgd import PGD
from fakescope.attacks.pgd_l2 import PGDL2
from fakescope.attacks.square import Square

ATTACKS: dict[str, type[Attack]] = {"fgsm": FGSM, "pgd": PGD, "pgd-l2": PGDL2, "square": Square}


def attack_class(name: str) -> type[Attack]:
    """The attack class registered as ``name``; an unknown name raises :class:`AttackError` (a ValueError)."""
    if name not in ATTACKS:
        raise AttackError(f"unknown attack {name!r}: expected one of {', '.join(ATTACKS)}")
    return ATTACKS[name]


def create_attack(name: str, model: nn.Module, **kwargs) -> Attack:
    """``ATTACKS[name](model, **kwargs)``; an unknown name raises :class:`AttackError` (a ValueError)."""
    cls = attack_class(name)
    try:
        return cls(model, **kwargs)
    except TypeError as e:
        raise AttackError(f"bad options for attack {name!r}: {e}") from None
