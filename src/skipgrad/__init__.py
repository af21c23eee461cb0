"""skipgrad: transferable adversarial examples with the Skip Gradient Method.

Wu et al., "Skip Connections Matter: On the Transferability of Adversarial Examples Generated with
ResNets", ICLR 2020. ``skip_gradient`` decays the gradient through residual branches of any model;
``attack`` runs one composable iterative attack loop (I-FGSM, PGD, MI, NI, DI, TI, ensembles).
"""
from skipgrad.attacks import AttackSpec, NonFiniteGradientError, attack, parse_attack_name
from skipgrad.backward import (BackwardConflictError, BackwardContext, BlockInfo, Change,
                               NoAttentionError, NoResidualBlockError, NothingToChangeError,
                               UnsupportedOfficialModelError, bpa, find_blocks, linbp, pna,
                               register_block, register_method, skip_gradient, tgr)

__version__ = "0.1.0"

__all__ = [
    "AttackSpec", "BackwardConflictError", "BackwardContext", "BlockInfo", "Change",
    "NoAttentionError", "NoResidualBlockError", "NonFiniteGradientError", "NothingToChangeError",
    "UnsupportedOfficialModelError", "attack", "bpa", "find_blocks", "linbp", "parse_attack_name",
    "pna", "register_block", "register_method", "skip_gradient", "tgr",
]
