from vitrain.data.dali import DaliDataModule  # imports DALI only when a loader is built
from vitrain.data.digits import DigitsDataModule
from vitrain.data.imagefolder import ImageFolderDataModule
from vitrain.data.shards import ShardsDataModule
from vitrain.data.synthetic import SyntheticDataModule

__all__ = [
    "DaliDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "ShardsDataModule",
    "SyntheticDataModule",
]
