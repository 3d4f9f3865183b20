from vitrain.models.factory import create_vit
from vitrain.models.module import ViTClassifier

__all__ = ["ViTClassifier", "create_vit"]
