"""One attack loop with composable parts: update rules, DI/TI transforms, the companion parts
(SI, VT, Admix, SIA, BSR), ensembles, SGM."""
from skipgrad.attacks.config import ATTACK_TOKENS, AttackSpec, parse_attack_name
from skipgrad.attacks.loop import (NonFiniteGradientError, attack, attack_with, evaluation_mode,
                                   run_attack)

__all__ = ["ATTACK_TOKENS", "AttackSpec", "NonFiniteGradientError", "attack", "attack_with",
           "evaluation_mode", "parse_attack_name", "run_attack"]
