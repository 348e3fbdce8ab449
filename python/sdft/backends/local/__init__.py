"""The local backend: Tinker's client contract executed in-process (torch + transformers + peft).

>>> from sdft.backends.local import LocalServiceClient
>>> service = LocalServiceClient(checkpoint_root="runs/checkpoints", device="cpu")
>>> student = service.create_lora_training_client("HuggingFaceTB/SmolLM2-135M-Instruct", rank=16).result()
>>> teacher = service.create_sampling_client(base_model="HuggingFaceTB/SmolLM2-135M-Instruct").result()

Everything returns the real ``tinker.types`` objects and Tinker-style futures (``.result()``,
``await``, ``.result_async()``, ``.coroutine()``), so a loop written for Tinker runs unchanged.
Local extras: ``create_full_training_client`` (full fine-tuning),
``LocalTrainingClient.create_ema_sampling_client`` (EMA teacher) and
``LocalTrainingClient.forward_backward_full_kl`` (exact full-vocabulary forward KL).
"""

from sdft.backends.local._errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    LocalBadRequestError,
)
from sdft.backends.local._sampling import LocalSamplingClient
from sdft.backends.local._service import LocalServiceClient
from sdft.backends.local._training import LocalTrainingClient

__all__ = [
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "LocalBadRequestError",
    "LocalSamplingClient",
    "LocalServiceClient",
    "LocalTrainingClient",
]
