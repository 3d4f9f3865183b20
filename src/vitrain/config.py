"""Config nodes generated from code, registered in Hydra's ConfigStore before composing; the
check of values the user must give."""

import inspect

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from vitrain.errors import UserError

# vitrain builds these itself from the logger/ and callbacks/ groups.
_TRAINER_ARGS_BUILT_BY_VITRAIN = {"logger", "callbacks"}


def lightning_trainer_defaults() -> dict:
    """Every lightning.pytorch.Trainer argument with Lightning's own default.

    Listing them all lets users write `trainer.<any argument>=<value>` without Hydra's `+`, and
    generating them keeps the list true for whichever Lightning version is installed.
    """
    from lightning.pytorch import Trainer

    node = {"_target_": "lightning.pytorch.Trainer"}
    for name, param in inspect.signature(Trainer.__init__).parameters.items():
        if name == "self" or name in _TRAINER_ARGS_BUILT_BY_VITRAIN:
            continue
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        node[name] = param.default
    return node


def checkpoint_data(key: str, *, _root_: DictConfig):
    """`${checkpoint_data:<key>}` (conf/eval.yaml): a data setting of ckpt_path's run."""
    from vitrain.evaluate import checkpoint_data_facts

    return checkpoint_data_facts(str(_root_.ckpt_path))[key]


def register_configs() -> None:
    """Store generated nodes and register vitrain's resolvers; call before hydra.main or
    hydra.compose."""
    ConfigStore.instance().store(
        group="trainer", name="lightning_defaults", node=lightning_trainer_defaults()
    )
    OmegaConf.register_new_resolver("checkpoint_data", checkpoint_data, replace=True)


def compose_config(config_dir: str, overrides: list[str], output_dir=None, name: str = "train"):
    """The config `python <name>.py <overrides>` gets (train.py, eval.py), outside a Hydra run
    (tests, benchmarks): composed from config_dir, with the run directory at output_dir."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def check_required(cfg: DictConfig) -> None:
    """Every `???` of the config given a value (experiment=finetune's model.init_from, eval's
    ckpt_path): else one error naming them, before anything is built."""
    # Read unresolved: an interpolation may depend on the missing value (eval's data settings
    # read the checkpoint at ckpt_path).
    missing = sorted(_missing_keys(OmegaConf.to_container(cfg, resolve=False)))
    if missing:
        settings = " ".join(f"{key}=..." for key in missing)
        raise UserError(f"{', '.join(missing)} must be given for this run: add {settings}.")


def _missing_keys(node, key: str = ""):
    if isinstance(node, dict):
        for name, value in node.items():
            yield from _missing_keys(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _missing_keys(value, f"{key}[{index}]")
    elif node == "???":
        yield key
