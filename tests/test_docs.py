"""The documentation's code examples run and do what the prose says."""
from __future__ import annotations

import re
from pathlib import Path

import torch

import skipgrad

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_registration_example_in_docs_makes_sgm_work_on_the_new_block():
    namespace: dict = {}
    exec(python_blocks(DOCS / "sgm.md")[0], namespace)
    block_cls = namespace["PreActBlock"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(block_cls(4), block_cls(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(3)).eval()
    x = torch.rand(2, 4, 5, 5, requires_grad=True)
    model(x)
    with skipgrad.skip_gradient(model, 0.3) as sgm:
        (decayed,) = torch.autograd.grad(model(x).sum(), x)
    (plain,) = torch.autograd.grad(model(x).sum(), x)
    assert [b.decayed for b in sgm.blocks] == [False, True]
    assert not torch.allclose(decayed, plain)
