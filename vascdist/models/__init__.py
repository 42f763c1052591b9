"""The models: every module here registers its variants with `@register_model` (models/registry.py), and
importing this package registers them all. Nothing here knows about torch.distributed; `vascdist.dist` wraps the
built model."""

from vascdist.models import baseline, crnn, resnet, resnext1d  # noqa: F401 (each registers its models)
from vascdist.models.registry import build_model, check_input_rank, count_flops, create_model, list_models, register_model

__all__ = ["build_model", "check_input_rank", "count_flops", "create_model", "list_models", "register_model"]
