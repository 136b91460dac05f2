"""dlip_ds: distil BLIP-style vision-language models into small, fast students on DeepSpeed (DLIP).

`load_model` and `VLPModel` are imported on first use, so `import dlip_ds` stays light.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_model": "dlip_ds.models.load",
    "save_model": "dlip_ds.models.dlip_format",
    "VLPModel": "dlip_ds.models.vlp",
    "TapRequest": "dlip_ds.models.vlp",
}

__all__ = ["TapRequest", "VLPModel", "__version__", "load_model", "save_model"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dlip_ds' has no attribute '{name}'")
