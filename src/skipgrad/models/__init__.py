"""Model specs -> models that take [0, 1] images (normalisation and resizing inside).

See :func:`load_model` and :mod:`skipgrad.models.specs` for the spec grammar. The bundled
Fashion-MNIST zoo lives in :mod:`skipgrad.models.zoo`.
"""
from skipgrad.models.loading import load_model, resolve_config
from skipgrad.models.specs import FAMILIES, InputAdapter, ModelConfig, WrappedModel, parse_spec

__all__ = ["FAMILIES", "InputAdapter", "ModelConfig", "WrappedModel", "load_model", "parse_spec",
           "resolve_config"]
