"""Methods that change the gradient: contexts that change how gradients flow back through a
source model -- only the backward pass (SGM, LinBP, BPA, PNA, TGR), or the source itself, forward
and backward (Ghost networks, IAA).

Each method lives in its own module and shares one mechanism: the context contract of
:mod:`skipgrad.backward.base` (found by structure, everything restored on exit, an error instead of
a silent no-op; forward values unchanged unless the context says ``changes_forward``) and the block
registry of :mod:`skipgrad.backward.blocks`.

* :mod:`~skipgrad.backward.sgm` -- ``skip_gradient``, the Skip Gradient Method (Wu et al., ICLR
  2020), with the authors' hook placement in :mod:`~skipgrad.backward.official`.
* :mod:`~skipgrad.backward.registry` -- the methods by name (``--backward linbp:branch_scale=0.5``,
  ``skipgrad.attack(..., backward=...)``) and :func:`register_method` for your own.
* :mod:`~skipgrad.backward.linear_backprop` -- ``linbp``, Linear Backpropagation (Guo, Li, Chen, NeurIPS
  2020): ReLUs inside residual branches linear in backward, branch gradients norm-matched.
* :mod:`~skipgrad.backward.backward_propagation_attack` -- ``bpa``, the Backward Propagation Attack's rules (Wang, Tong,
  He, NeurIPS 2023): softmax max-pool windows and SiLU-derivative ReLUs.
* :mod:`~skipgrad.backward.pay_no_attention` -- ``pna``, Pay No Attention (Wei et al., AAAI 2022): attention
  maps are constants in the backward pass.
* :mod:`~skipgrad.backward.token_gradient_regularization` -- ``tgr``, Token Gradient Regularization (Zhang et al., CVPR
  2023), with the extreme tokens chosen per image. PNA and TGR share
  :mod:`~skipgrad.backward.attention` (attention and MLP types; reaching into fused attention).
* :mod:`~skipgrad.backward.ghost_networks` -- ``ghost``, Ghost networks (Li et al., AAAI 2020): skip
  connections eroded by random per-channel factors, drawn anew at every forward pass.
* :mod:`~skipgrad.backward.intrinsic_adversarial_attack` -- ``iaa``, IAA (Zhu et al., ICLR 2022): ReLUs made Softplus and
  residual branches scaled per stage.

:mod:`~skipgrad.backward.units` says where the methods that act "from a layer on" start.
"""
from skipgrad.backward.base import (BackwardConflictError, BackwardContext, Change,
                                    NothingToChangeError)
from skipgrad.backward.blocks import BLOCKS, BlockKind, register_block
from skipgrad.backward.backward_propagation_attack import bpa
from skipgrad.backward.ghost_networks import ghost
from skipgrad.backward.intrinsic_adversarial_attack import iaa
from skipgrad.backward.linear_backprop import linbp
from skipgrad.backward.official import UnsupportedOfficialModelError
from skipgrad.backward.pay_no_attention import NoAttentionError, pna
from skipgrad.backward.registry import (BackwardPlan, BackwardSpecError, MethodChoice,
                                        parse_backward, parse_forward, register_method)
from skipgrad.backward.sgm import (
    BlockInfo,
    NoDecayedBlockError,
    NoResidualBlockError,
    check_gamma,
    parse_gamma,
    find_blocks,
    sgm_blocks,
    skip_gradient,
)
from skipgrad.backward.token_gradient_regularization import TGRSettings, tgr

__all__ = [
    "BLOCKS", "BackwardConflictError", "BackwardContext", "BackwardPlan", "BackwardSpecError",
    "BlockInfo", "BlockKind", "Change", "MethodChoice", "NoAttentionError", "NoDecayedBlockError",
    "NoResidualBlockError", "NothingToChangeError", "TGRSettings", "UnsupportedOfficialModelError",
    "bpa", "check_gamma", "find_blocks", "ghost", "iaa", "linbp", "parse_backward",
    "parse_forward", "parse_gamma", "pna", "register_block", "register_method", "sgm_blocks",
    "skip_gradient", "tgr",
]
from skipgrad.backward import families  # noqa: E402,F401  (registers the timm/torchvision families)
from skipgrad.backward.registry import register_builtin_methods  # noqa: E402

register_builtin_methods()  # after every method module above can be imported
