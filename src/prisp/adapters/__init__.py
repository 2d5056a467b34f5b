"""LoRA adapters: weights as data, peft injection, the PRISP bridge, safetensors I/O."""

from prisp.adapters.config import LoraSpec
from prisp.adapters.inject import (
    BridgeParam,
    add_bridge,
    attach_lora,
    bridge_params,
    extract_weights,
    fold_bridge,
    remove_bridge,
    set_trainable,
    shared_copy,
)
from prisp.adapters.io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from prisp.adapters.weights import (
    DEFAULT_MODULE_PATHS,
    LoraPair,
    LoraWeights,
    ModuleSite,
    Shapes,
    parse_module_name,
    random_init,
    shapes_for_config,
    shapes_for_model,
)


def apply_adapter_dir(model, adapter_dir):
    """Load a peft LoRA directory onto ``model`` (checked against its shapes); returns the PeftModel."""
    return attach_lora(model, load_adapter(adapter_dir))


__all__ = [
    "shared_copy",
    "apply_adapter_dir",
    "CONFIG_NAME",
    "DEFAULT_MODULE_PATHS",
    "WEIGHTS_NAME",
    "BridgeParam",
    "LoraPair",
    "LoraSpec",
    "LoraWeights",
    "ModuleSite",
    "Shapes",
    "add_bridge",
    "attach_lora",
    "bridge_params",
    "extract_weights",
    "fold_bridge",
    "load_adapter",
    "parse_module_name",
    "random_init",
    "remove_bridge",
    "save_adapter",
    "set_trainable",
    "shapes_for_config",
    "shapes_for_model",
]
