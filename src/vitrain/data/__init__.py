from vitrain.data.digits import DigitsDataModule
from vitrain.data.imagefolder import ImageFolderDataModule
from vitrain.data.synthetic import SyntheticDataModule

__all__ = ["DigitsDataModule", "ImageFolderDataModule", "SyntheticDataModule"]
