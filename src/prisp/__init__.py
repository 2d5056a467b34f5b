"""prisp: private, few-shot personalization of small language models.

The Python API is a few verbs (see ``prisp.api`` and ``docs/python-api.md``)::

    import prisp
    base = prisp.load_base()                              # the default model, on CPU
    task = prisp.load_task("LaMP-4")
    anchor = prisp.make_anchor(base, task)                # Stage 1: from the task's description
    result = prisp.personalize_user(base, anchor, task, history)  # Stage 2: one user's items
    result.save("users/u0")                               # plain peft LoRA + personalization.json
    prisp.generate(base, "users/u0", task, inputs)

They load lazily, so ``import prisp`` (and the CLI) starts without torch.
"""

from prisp.errors import AdapterError, DataError, DownloadError, ModelNotFoundError, PrispError

__version__ = "0.1.0"

_API = ("Personalized", "generate", "load_base", "load_task", "make_anchor", "personalize_user")

__all__ = ["AdapterError", "DataError", "DownloadError", "ModelNotFoundError", "PrispError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from prisp import api

        return getattr(api, name)
    raise AttributeError(f"module 'prisp' has no attribute {name!r}")
