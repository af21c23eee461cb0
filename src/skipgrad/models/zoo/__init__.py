"""The bundled Fashion-MNIST zoo: small networks of the families SGM meets, with committed weights.

``load_zoo_model("resnet20")`` gives a trained network (eval mode) taking (N, 1, 28, 28) images in
[0, 1]; ``zoo.json`` records each model's accuracy and weight hash; ``docs/zoo.md`` the recipe.
"""
from skipgrad.models.zoo.architectures import (
    AT_NAMES,
    FMNIST_MEAN,
    FMNIST_STD,
    PreActBasicBlock,
    ZOO_NAMES,
    build_model,
    family_of,
)
from skipgrad.models.zoo.training import load_zoo_model, train_model, weights_path

build_zoo_model = build_model  # the name skipgrad.models.loading looks for

__all__ = ["AT_NAMES", "FMNIST_MEAN", "FMNIST_STD", "PreActBasicBlock", "ZOO_NAMES", "build_model",
           "build_zoo_model", "family_of", "load_zoo_model", "train_model", "weights_path"]
