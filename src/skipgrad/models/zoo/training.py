"""The recipe that produced the bundled zoo weights, and loading those weights back.

Recipe (every model): Fashion-MNIST train split in an order drawn from a seeded generator, no
augmentation, batch 128, one-cycle learning rate schedule (Smith & Topin, 2019). Convolutional nets
use SGD (momentum 0.9, Nesterov, weight decay 5e-4, peak lr 0.1); the ViT uses AdamW, because plain
SGD trains a small ViT from scratch poorly in a few epochs. Accuracy is measured on the full test split.

Adversarially trained members (``NAME-at``) add an L-inf adversary to the same loop: fast adversarial
training (Wong, Rice & Kolter, ICLR 2020, "Fast is better than free"), i.e. one FGSM step of size
1.25 eps from a uniform random start in the ball, on every batch, with eps ramped up linearly over the
first part of training. It costs one extra forward/backward per batch, where PGD-k training costs k:
PGD-7 training of a ResNet-20 would take hours on the project's CPU. Fast AT can overfit
catastrophically (robustness to FGSM, none to PGD), so every epoch logs a PGD-10 accuracy on training
images, and the final robust accuracy is measured with a stronger white-box PGD (:data:`ROBUST_PGD`).
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn
from tqdm import tqdm

from skipgrad.data.fmnist import load_fmnist
from skipgrad.models.zoo.architectures import AT_NAMES, ZOO_NAMES, build_model, zoo_name

WEIGHTS_DIR = Path(__file__).parent / "weights"
__all__ = ["AT_NAMES", "Adversary", "ROBUST_PGD", "Recipe", "RECIPES", "RobustEval", "ZOO_NAMES",
           "build_model", "evaluate_accuracy", "fgsm_random_start", "load_zoo_model",
           "robust_accuracy", "train_model", "weights_path"]


@dataclass(frozen=True)
class Adversary:
    """The training adversary of fast adversarial training (Wong et al., ICLR 2020): FGSM from a
    uniform random start in the L-inf ball of radius ``eps``, step ``alpha_ratio * eps``, projected
    back onto the ball and [0, 1]; ``eps`` grows linearly from 0 over the first ``warmup`` fraction of
    the training steps (a warm-up that keeps early training from collapsing)."""

    eps: float = 16 / 255
    alpha_ratio: float = 1.25
    warmup: float = 0.2

    def eps_at(self, step: int, total: int) -> float:
        """The radius used at training step ``step`` of ``total``."""
        ramp = self.warmup * total
        return self.eps if ramp <= 0 or step >= ramp else self.eps * (step + 1) / ramp

    def describe(self) -> str:
        """One line for zoo.json and the docs."""
        return (f"FGSM-RS (Wong et al. 2020), eps {self.eps * 255:g}/255, step "
                f"{self.alpha_ratio:g} eps, eps warm-up over the first {self.warmup:.0%} of steps")


@dataclass(frozen=True)
class Recipe:
    """Per-model training settings; everything not here is shared by the whole zoo."""

    epochs: int
    optimizer: str = "sgd"  # "sgd" (Nesterov) or "adamw"
    max_lr: float = 0.1
    weight_decay: float = 5e-4
    adversary: Adversary | None = None  # adversarial training when set
    train_images: int | None = None  # train on the first N training images only (None: all)


@dataclass(frozen=True)
class RobustEval:
    """The white-box attack that measures a zoo model's robust accuracy: PGD (Madry et al. 2018)
    with a uniform random start, on the first ``limit`` test images rounded to 8 bits."""

    eps: float = 16 / 255
    step_size: float = 2 / 255
    steps: int = 20
    restarts: int = 1
    limit: int = 1000

    def describe(self) -> str:
        """One line for zoo.json and the docs."""
        return (f"white-box PGD-{self.steps}, eps {self.eps * 255:g}/255, step "
                f"{self.step_size * 255:g}/255, random start, {self.restarts} restart(s), "
                f"first {self.limit} test images, 8-bit")


ROBUST_PGD = RobustEval()


RECIPES: dict[str, Recipe] = {
    "cnn": Recipe(epochs=3),
    "vgg": Recipe(epochs=3),
    "resnet20": Recipe(epochs=2),
    "resnet56": Recipe(epochs=4),  # 2 epochs gave 88.1%, 3 gave 85.5%: the deeper net needs 4
    "resnet110": Recipe(epochs=2),
    "preact-resnet20": Recipe(epochs=2),
    "densenet": Recipe(epochs=2),
    "mobilenetv2": Recipe(epochs=3),
    "vit": Recipe(epochs=8, optimizer="adamw", max_lr=2e-3, weight_decay=0.05),
    # Fast adversarial training, 2 epochs, sized to the shared CPU: under load a ResNet-20 took ~9 s
    # per adversarial batch (over two hours for 2 epochs), hence a ResNet-8, and 20k images each.
    "cnn-at": Recipe(epochs=2, adversary=Adversary(), train_images=20_000),
    "resnet8-at": Recipe(epochs=2, adversary=Adversary(), train_images=20_000),
}


def weights_path(name: str, out_dir: Path | None = None) -> Path:
    """Where the weights of zoo model ``name`` live: ``<out_dir>/fmnist-<name>.safetensors``, by
    default in the package's ``weights`` folder."""
    return Path(out_dir or WEIGHTS_DIR) / f"fmnist-{zoo_name(name)}.safetensors"


def train_model(name: str, out_dir: Path, *, epochs: int | None = None, seed: int = 0,
                limit: int | None = None, batch_size: int = 128, progress: bool = True) -> dict:
    """Train one zoo model with the zoo recipe and write ``<out_dir>/fmnist-<name>.safetensors``.

    Args:
        name: a name in :data:`ZOO_NAMES` (``fmnist-`` / ``zoo:`` prefixes are accepted).
        out_dir: folder for the weight file (created if needed).
        epochs: overrides the model's default epoch count (:data:`RECIPES`).
        seed: seeds the initialisation, the data order and dropout.
        limit: train on the first ``limit`` training images only (for quick checks); defaults to
            the recipe's ``train_images``.
        batch_size: training batch size.
        progress: show a tqdm progress bar per epoch.
    Returns:
        ``name``, ``params``, ``test_accuracy`` (full test split), ``test_accuracy_first1000``,
        ``train_seconds``, ``sha256`` (of the weight file), ``epochs``, ``seed``, ``path``.
    """
    name = zoo_name(name)
    recipe = RECIPES[name]
    epochs = epochs or recipe.epochs
    torch.manual_seed(seed)
    model = build_model(name)
    limit = limit or recipe.train_images
    images, labels = load_fmnist("train", limit=limit)
    start = time.perf_counter()
    monitor = _fit(model, images, labels, recipe, epochs, seed, batch_size, progress)
    seconds = time.perf_counter() - start
    accuracy, first1000 = _test_accuracies(model)
    meta = {"arch": f"fmnist-{name}", "name": name, "epochs": str(epochs), "seed": str(seed),
            "test_accuracy": f"{accuracy:.4f}", "limit": str(limit)}
    path = weights_path(name, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_weights(path, {k: v.contiguous() for k, v in model.state_dict().items()}, meta)
    summary = {"name": name, "params": sum(p.numel() for p in model.parameters()),
               "test_accuracy": accuracy, "test_accuracy_first1000": first1000,
               "train_seconds": round(seconds, 1), "sha256": _sha256(path), "epochs": epochs,
               "seed": seed, "path": str(path)}
    if recipe.adversary is not None:
        summary.update(adversary=recipe.adversary.describe(), epoch_train_pgd_accuracy=monitor,
                       robust_accuracy_first1000=robust_accuracy(model, progress=progress),
                       robust_attack=ROBUST_PGD.describe())
    return summary


def write_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file whole or not at all (a temporary name, then a rename), with the
    permissions ``open()`` gives under the umask (0644 under 022). safetensors' ``save_file``
    creates its file 0600, unreadable by the colleagues a shared weights folder is for; every other
    file skipgrad writes follows the umask (:mod:`skipgrad.store.atomic`, above this module)."""
    data = save(state, metadata=metadata)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fit(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe,
         epochs: int, seed: int, batch_size: int, progress: bool) -> list[float]:
    """Train in place; returns, for adversarial recipes, the PGD-10 accuracy on the first 256
    training images after each epoch (a catastrophic-overfitting watch), else ``[]``."""
    order_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1)  # the adversary's random starts
    steps = -(-len(images) // batch_size)
    optimizer = _optimizer(model, recipe)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.max_lr,
                                                   total_steps=epochs * steps)
    loss_fn = nn.CrossEntropyLoss()
    monitor: list[float] = []
    step = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=order_gen)
        bar = tqdm(order.split(batch_size), desc=f"{epoch + 1}/{epochs}", disable=not progress,
                   leave=False, unit="batch")
        for index in bar:
            x, y = images[index], labels[index]
            if recipe.adversary is not None:
                eps = recipe.adversary.eps_at(step, epochs * steps)
                x = fgsm_random_start(model, x, y, eps, recipe.adversary.alpha_ratio * eps,
                                      noise_gen)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if recipe.adversary is not None:
            monitor.append(_train_pgd_accuracy(model, images[:256], labels[:256],
                                               recipe.adversary.eps))
    model.eval()
    return monitor


def fgsm_random_start(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float,
                      step_size: float, generator: torch.Generator) -> torch.Tensor:
    """One FGSM step from a uniform random point of the L-inf ball (Wong et al., ICLR 2020).

    The step (``1.25 eps`` in the paper) overshoots the ball on purpose and is projected back;
    the model's mode is left as it is (train mode during training, as in the paper).
    """
    noise = (torch.rand(images.shape, generator=generator) * 2 - 1) * eps
    start = (images + noise).clamp(0, 1).requires_grad_(True)
    loss = nn.functional.cross_entropy(model(start), labels)
    (grad,) = torch.autograd.grad(loss, start)
    adv = start.detach() + step_size * grad.sign()
    return torch.min(torch.max(adv, images - eps), images + eps).clamp(0, 1)


def _train_pgd_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        eps: float) -> float:
    from skipgrad.attacks import attack

    model.eval()
    adv = attack(model, images, labels, "pgd", eps=eps, step_size=eps / 4, steps=10, seed=0)
    with torch.no_grad():
        accuracy = (model(adv).argmax(1) == labels).float().mean().item()
    model.train()
    return round(accuracy, 4)


def robust_accuracy(model: nn.Module, settings: RobustEval = ROBUST_PGD, batch_size: int = 250,
                    progress: bool = False) -> float:
    """Accuracy of ``model`` (eval mode) on white-box PGD examples of the first ``settings.limit``
    test images, after rounding them to 8 bits; an image counts as robust only if it survives every
    restart (restart ``r`` uses seed ``r``)."""
    from skipgrad.attacks import attack

    images, labels = load_fmnist("test", limit=settings.limit)
    model.eval()
    robust = torch.ones(len(labels), dtype=torch.bool)
    batches = list(zip(images.split(batch_size), labels.split(batch_size),
                       torch.arange(len(labels)).split(batch_size)))
    for restart in range(settings.restarts):
        for x, y, ids in tqdm(batches, desc=f"PGD restart {restart + 1}", disable=not progress,
                              leave=False):
            adv = attack(model, x, y, "pgd", eps=settings.eps, step_size=settings.step_size,
                         steps=settings.steps, seed=restart, ids=ids)
            with torch.no_grad():
                robust[ids] &= model((adv * 255).round() / 255).argmax(1) == y
    return robust.float().mean().item()


def _optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=recipe.max_lr,
                                 weight_decay=recipe.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=recipe.max_lr, momentum=0.9, nesterov=True,
                           weight_decay=recipe.weight_decay)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, limit: int | None = None, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on the first ``limit`` Fashion-MNIST test images."""
    images, labels = load_fmnist("test", limit=limit)
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum())
                  for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return correct / len(labels)


def _test_accuracies(model: nn.Module) -> tuple[float, float]:
    # One pass over the full split gives both numbers: the first 1000 images come first.
    images, labels = load_fmnist("test")
    with torch.no_grad():
        hits = torch.cat([model(x).argmax(1) == y
                          for x, y in zip(images.split(500), labels.split(500))])
    return hits.float().mean().item(), hits[:1000].float().mean().item()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_zoo_model(name: str, pretrained: bool = True) -> nn.Module:
    """Zoo model ``name`` with its committed weights, in eval mode.

    Args:
        name: a name in :data:`ZOO_NAMES` (``fmnist-`` / ``zoo:`` prefixes are accepted).
        pretrained: False returns the architecture with random weights (still eval mode).
    Raises:
        FileNotFoundError: the weight file is missing (the message names it and the fix).
    """
    model = build_model(name)
    if pretrained:
        path = weights_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"weights of zoo model {zoo_name(name)!r} are missing ({path}); "
                                    f"train them with `skipgrad zoo train {zoo_name(name)} --out "
                                    f"{path.parent}`")
        model.load_state_dict(load_file(str(path)))
    return model.eval()
