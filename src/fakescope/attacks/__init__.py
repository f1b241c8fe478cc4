"""Adversarial attacks on detectors, torchattacks-style: one attack = one small class.

``create_attack("pgd", model, eps=4/255)(x, y) -> x_adv``; :func:`robustness` runs an attack over
a data set at several eps and reports robust accuracy, success rate and perturbation sizes.
"""

from __future__ import annotations

from fakescope.attacks.base import Attack, AttackError, check_eps, parse_eps, true_label_loss
from fakescope.attacks.fgsm import FGSM
from fakescope.attacks.pgd import PGD
from fakescope.attacks.pgd_l2 import PGDL2
from fakescope.attacks.registry import ATTACKS, attack_class, create_attack
from fakescope.attacks.robustness import DIRECTIONS, perturb_batch, robustness
from fakescope.attacks.square import Square

__all__ = ["ATTACKS", "DIRECTIONS", "FGSM", "PGD", "PGDL2", "Attack", "AttackError", "Square", "attack_class",
           "check_eps", "create_attack", "parse_eps", "perturb_batch", "robustness", "true_label_loss"]
