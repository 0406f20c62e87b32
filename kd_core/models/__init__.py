"""Staged models. Importing this package registers every family."""

from kd_core.models import (  # noqa: F401  (importing registers the families)
    cifar_resnet,
    convnet,
    mobilenetv2,
    shufflenet,
    timm_models,
    torchvision_models,
    vgg,
    wrn,
)
from kd_core.models.base import Head, StagedModel
from kd_core.models.registry import MODELS, build_model, check_model_args, model_arg_names

__all__ = ["MODELS", "Head", "StagedModel", "build_model", "check_model_args", "model_arg_names"]
