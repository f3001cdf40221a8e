"""MIL models: one registry, one output type.

Build a model by name with :func:`create_model`; every model maps a padded batch of cells
``x [B, N, D]`` with ``mask [B, N]`` (plus optional CBC, coordinates and view ids) to a
:class:`MILOutput`. A new model is one module with a ``@register_model("name")`` class plus one
import line below.
"""

from milhema.models import abmil, dsmil, graph, multiview, pooling, transformer  # noqa: F401  (registers the models)
from milhema.models.base import MILModel, MILOutput
from milhema.models.fusion import FUSION_MODES
from milhema.models.registry import (
    canonical_name,
    check_params,
    create_model,
    list_models,
    model_class,
    model_params,
    register_model,
)

__all__ = ["FUSION_MODES", "MILModel", "MILOutput", "canonical_name", "check_params", "create_model", "list_models",
           "model_class", "model_params", "register_model"]
