"""prisp: private, few-shot personalization of small language models."""

from prisp.errors import AdapterError, DataError, DownloadError, ModelNotFoundError, PrispError

__version__ = "0.1.0"

__all__ = ["AdapterError", "DataError", "DownloadError", "ModelNotFoundError", "PrispError", "__version__"]
