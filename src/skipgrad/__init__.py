"""skipgrad: transferable adversarial examples with the Skip Gradient Method.

Wu et al., "Skip Connections Matter: On the Transferability of Adversarial Examples Generated with
ResNets", ICLR 2020. ``skip_gradient`` decays the gradient through residual branches of any model;
``attack`` runs one composable iterative attack loop (I-FGSM, PGD, MI, NI, DI, TI, ensembles).

The public names are imported on first use (PEP 562), so that ``skipgrad --help`` and
``skipgrad --version`` answer without loading torch; ``from skipgrad import attack`` is unchanged.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(("AttackSpec", "NonFiniteGradientError", "attack", "parse_attack_name"),
                    "skipgrad.attacks"),
    **dict.fromkeys(("BackwardConflictError", "BackwardContext", "BlockInfo", "Change",
                     "NoAttentionError", "NoDecayedBlockError", "NoResidualBlockError",
                     "NothingToChangeError", "UnsupportedOfficialModelError", "bpa", "find_blocks",
                     "ghost", "iaa", "linbp", "pna", "register_block", "register_method",
                     "sgm_blocks", "skip_gradient", "tgr"),
                    "skipgrad.backward"),
    "InputError": "skipgrad.errors",
}

__all__ = sorted(_EXPORTS, key=str.lower)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'skipgrad' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
