"""Model zoo, offline tokenizer, loading and the per-machine cache of pretrained tiny bases."""
from kdaudit.models.loading import compute_device, load_model, load_tokenizer, save_model
from kdaudit.models.tokenizer import train_tokenizer
from kdaudit.models.zoo import ZOO, build_zoo_model, is_zoo

__all__ = ["ZOO", "build_zoo_model", "compute_device", "is_zoo", "load_model", "load_tokenizer",
           "save_model", "train_tokenizer"]
