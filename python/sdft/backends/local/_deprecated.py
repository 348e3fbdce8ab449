"""The deprecated ``*_async`` methods of Tinker's clients, for code written against older SDKs.

Each client class mixes in its set. As in the SDK, awaiting a training client's shim gives the
future (a double await gives the result), while the service and sampling shims give the result
itself. ``self`` is typed ``Any``: the mixins only forward to the client's own methods.
"""

from __future__ import annotations

from typing import Any


class ServiceClientAsyncShims:
    async def create_lora_training_client_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.create_lora_training_client(*args, **kwargs)

    async def create_sampling_client_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.create_sampling_client(*args, **kwargs)

    async def create_training_client_from_state_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.create_training_client_from_state(*args, **kwargs)

    async def create_training_client_from_state_with_optimizer_async(
        self: Any, *args: Any, **kwargs: Any
    ) -> Any:
        return await self.create_training_client_from_state_with_optimizer(*args, **kwargs)


class TrainingClientAsyncShims:
    async def forward_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    async def forward_backward_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.forward_backward(*args, **kwargs)

    async def forward_backward_custom_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.forward_backward_custom(*args, **kwargs)

    async def optim_step_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.optim_step(*args, **kwargs)

    async def save_state_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.save_state(*args, **kwargs)

    async def save_weights_for_sampler_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.save_weights_for_sampler(*args, **kwargs)

    async def save_weights_and_get_sampling_client_async(
        self: Any, *args: Any, **kwargs: Any
    ) -> Any:
        return await self.save_weights_and_get_sampling_client(*args, **kwargs)

    async def create_sampling_client_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.create_sampling_client(*args, **kwargs)

    async def get_info_async(self: Any) -> Any:
        return self.get_info()


class SamplingClientAsyncShims:
    async def sample_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.sample(*args, **kwargs)

    async def compute_logprobs_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.compute_logprobs(*args, **kwargs)

    async def get_base_model_async(self: Any) -> Any:
        return self.get_base_model()
