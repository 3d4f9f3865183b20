"""Config nodes generated from code, registered in Hydra's ConfigStore before composing."""

import inspect

from hydra.core.config_store import ConfigStore

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


def register_configs() -> None:
    """Store generated nodes; call before hydra.main or hydra.compose."""
    ConfigStore.instance().store(
        group="trainer", name="lightning_defaults", node=lightning_trainer_defaults()
    )
