"""Backends behind the Tinker client contract.

- :mod:`sdft.backends.local`: ``LocalServiceClient`` runs training and sampling in-process with
  torch + transformers (+ peft for LoRA), on CPU or a GPU.
- :mod:`sdft.backends.remote`: the real Tinker service (``tinker.ServiceClient``).

Both return the real ``tinker.types`` objects and Tinker-style futures, so the training loop does
not know which one it talks to. Importing this package imports neither torch nor tinker.
"""
