"""What only the local backend can show: gradients and optimizer state against direct torch,
checkpoint files (peft / transformers formats, corruption, atomicity), the EMA teacher, exact
full-vocabulary KL, request coalescing and shared-prefix prefill."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from sdft.backends.local import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    LocalServiceClient,
    _inference,
    _sampling,
)
from sdft.backends.local._modules import lora_delta, lora_layers
from sdft.models import TINY_RANDOM_MODEL, load_model

VOCAB = 49152


def ce_datum(tokens: list[int], targets: np.ndarray, weights: np.ndarray) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.asarray(targets, dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.asarray(weights, dtype=np.float32)),
        },
    )


def random_datum(rng: np.random.Generator, n: int, k: int | None = None) -> types.Datum:
    tokens = rng.integers(3, VOCAB, size=n).tolist()
    shape = (n,) if k is None else (n, k)
    return ce_datum(tokens, rng.integers(0, VOCAB, size=shape), rng.uniform(0, 1, size=shape))


def direct_ce_loss(model: Any, datum: types.Datum) -> torch.Tensor:
    tokens = torch.tensor([datum.model_input.to_ints()])
    targets = torch.from_numpy(datum.loss_fn_inputs["target_tokens"].to_numpy())
    weights = torch.from_numpy(datum.loss_fn_inputs["weights"].to_numpy())
    rows = torch.log_softmax(model(tokens).logits[0].float(), dim=-1)
    if targets.ndim == 1:
        lp = rows[torch.arange(len(targets)), targets]
    else:
        lp = rows.gather(1, targets)
    return -(weights * lp).sum()


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal up to float32 summation order: every entry within ``rel`` of the largest one."""
    scale = float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= rel * scale + 1e-12


def prompt_of(tokenizer: Any, text: str) -> types.ModelInput:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    return types.ModelInput.from_ints(list(ids))


def logprob_rows(model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)


# --- gradients and optimizer ---------------------------------------------------------------


def test_full_finetuning_gradients_equal_direct_autograd(local_service: Any) -> None:
    client = local_service.create_full_training_client(TINY_RANDOM_MODEL).result()
    rng = np.random.default_rng(0)
    data = [random_datum(rng, 9), random_datum(rng, 13, k=3)]
    client.forward_backward(data, "cross_entropy").result()
    reference = load_model(TINY_RANDOM_MODEL)
    sum(direct_ce_loss(reference, d) for d in data).backward()
    expected = dict(reference.named_parameters())
    for name, param in client.runtime.hf_model.named_parameters():
        assert_grads_close(param.grad, expected[name].grad)


def test_lora_gradients_equal_direct_autograd(local_service: Any) -> None:
    client = local_service.create_lora_training_client(TINY_RANDOM_MODEL, rank=4, seed=7).result()
    with torch.no_grad():  # make B non-zero so every adapter matrix gets a gradient
        for name, param in client.runtime.module.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    reference = copy.deepcopy(client.runtime.module)
    rng = np.random.default_rng(1)
    data = [random_datum(rng, 11, k=2)]
    client.forward_backward(data, "cross_entropy").result()
    direct_ce_loss(reference, data[0]).backward()
    expected = dict(reference.named_parameters())
    checked = 0
    for name, param in client.runtime.module.named_parameters():
        if param.requires_grad:
            assert_grads_close(param.grad, expected[name].grad)
            checked += 1
        else:
            assert param.grad is None
    assert checked == 2 * len(lora_layers(client.runtime.module)) > 0


def test_forward_computes_no_gradients(local_service: Any) -> None:
    client = local_service.create_full_training_client(TINY_RANDOM_MODEL).result()
    client.forward([random_datum(np.random.default_rng(2), 6)], "cross_entropy").result()
    assert all(p.grad is None for p in client.runtime.module.parameters())


def test_optim_step_is_torch_adamw_with_tinkers_parameters(local_service: Any) -> None:
    client = local_service.create_full_training_client(TINY_RANDOM_MODEL).result()
    rng = np.random.default_rng(3)
    adam = types.AdamParams(
        learning_rate=3e-3, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.2, grad_clip_norm=0.5
    )
    named = client.trainable_parameters
    reference = [torch.nn.Parameter(p.detach().clone()) for _, p in named]
    optimizer = torch.optim.AdamW(
        reference, lr=3e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.2, fused=True
    )
    for _ in range(2):
        client.forward_backward([random_datum(rng, 10)], "cross_entropy").result()
        for ref, (_, p) in zip(reference, named, strict=True):
            ref.grad = p.grad.detach().clone()
        norm = torch.nn.utils.clip_grad_norm_(reference, 0.5)
        response = client.optim_step(adam).result()
        optimizer.step()
        assert norm > 0.5  # clipping was active
        assert response.metrics["optim/grad_norm:mean"] == pytest.approx(float(norm), rel=1e-6)
        for ref, (name, p) in zip(reference, named, strict=True):
            torch.testing.assert_close(p.detach(), ref.detach(), rtol=0, atol=0, msg=name)
        assert all(p.grad is None for _, p in named)


def test_micro_batches_give_the_same_loss_and_gradients(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    data = [random_datum(rng, n, k=2) for n in (12, 7, 9)]
    results = []
    for budget in (4096, 16):
        with LocalServiceClient(tmp_path, device="cpu", train_batch_tokens=budget) as service:
            client = service.create_full_training_client(TINY_RANDOM_MODEL).result()
            output = client.forward_backward(data, "cross_entropy").result()
            grads = [p.grad.clone() for _, p in client.trainable_parameters]
            custom = service.create_full_training_client(TINY_RANDOM_MODEL).result()

            def loss_fn(
                batch: list[types.Datum], logprobs: list[torch.Tensor]
            ) -> tuple[torch.Tensor, dict]:
                total = sum(
                    -(torch.from_numpy(d.loss_fn_inputs["weights"].to_numpy()) * lp).sum()
                    for d, lp in zip(batch, logprobs, strict=True)
                )
                return total, {}

            custom_output = custom.forward_backward_custom(data, loss_fn).result()
            custom_grads = [p.grad.clone() for _, p in custom.trainable_parameters]
            results.append((output, grads, custom_output, custom_grads))
    (out_a, grads_a, custom_a, cgrads_a), (out_b, grads_b, custom_b, cgrads_b) = results
    assert out_a.metrics["loss:sum"] == pytest.approx(out_b.metrics["loss:sum"], rel=1e-6)
    assert custom_a.metrics["loss:sum"] == pytest.approx(custom_b.metrics["loss:sum"], rel=1e-6)
    for i in range(3):
        np.testing.assert_allclose(
            out_a.loss_fn_outputs[i]["logprobs"].to_numpy(),
            out_b.loss_fn_outputs[i]["logprobs"].to_numpy(),
            rtol=1e-5,
            atol=1e-6,
        )
    for a, b, c, d in zip(grads_a, grads_b, cgrads_a, cgrads_b, strict=True):
        assert_grads_close(a, b)
        assert_grads_close(c, d)
        assert_grads_close(a, c)


# --- checkpoint files ------------------------------------------------------------------------


def _checkpoint_dir(service: Any, path: str) -> Path:
    run_id, kind, name = path.removeprefix("local://").split("/")
    return service.checkpoint_root / run_id / kind / name


def _trained_lora(service: Any, tokenizer: Any) -> tuple[Any, types.ModelInput]:
    client = service.create_lora_training_client(TINY_RANDOM_MODEL, rank=4, seed=2).result()
    prompt = prompt_of(tokenizer, "adapter")
    tokens = prompt.to_ints()
    client.forward_backward(
        [ce_datum(tokens, [*tokens[1:], 2], np.ones(len(tokens)))], "cross_entropy"
    ).result()
    client.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    return client, prompt


@pytest.mark.filterwarnings(
    "ignore:.*tie_word_embeddings.*", "ignore:.*is_gradient_checkpointing.*"
)
def test_lora_checkpoint_is_a_peft_adapter(local_service: Any, tiny_tokenizer: Any) -> None:
    from peft import PeftModel

    client, prompt = _trained_lora(local_service, tiny_tokenizer)
    path = client.save_weights_for_sampler("peft").result().path
    directory = _checkpoint_dir(local_service, path)
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "sdft_checkpoint.json"]
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 32
    assert config["base_model_name_or_path"] == TINY_RANDOM_MODEL
    peft_model = PeftModel.from_pretrained(load_model(TINY_RANDOM_MODEL), str(directory))
    expected = logprob_rows(peft_model, prompt.to_ints())
    tokens = prompt.to_ints()
    direct = [None] + [float(expected[i - 1, tokens[i]]) for i in range(1, len(tokens))]
    sampled = (
        client.save_weights_and_get_sampling_client().result().compute_logprobs(prompt).result()
    )
    np.testing.assert_allclose(sampled[1:], direct[1:], rtol=1e-5, atol=1e-5)


def test_full_checkpoint_is_a_transformers_model(local_service: Any) -> None:
    from transformers import AutoModelForCausalLM

    client = local_service.create_full_training_client(TINY_RANDOM_MODEL).result()
    client.forward_backward([random_datum(np.random.default_rng(5), 8)], "cross_entropy").result()
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    saved = client.save_state("hf").result()
    directory = _checkpoint_dir(local_service, saved.path)
    loaded = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    for name, param in client.runtime.hf_model.named_parameters():
        torch.testing.assert_close(
            dict(loaded.named_parameters())[name], param.detach(), rtol=0, atol=0
        )
    state = json.loads((directory / "optimizer.json").read_text())
    assert state["optim_steps"] == 1 and state["optimizer"] == "adamw"
    assert set(state["steps"].values()) == {1.0}


def test_restored_optimizer_state_is_bit_identical(local_service: Any) -> None:
    client = local_service.create_lora_training_client(TINY_RANDOM_MODEL, rank=2, seed=1).result()
    rng = np.random.default_rng(6)
    for _ in range(3):
        client.forward_backward([random_datum(rng, 7)], "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=1e-3))
    path = client.save_state("opt").result().path
    restored = local_service.create_training_client_from_state_with_optimizer(path).result()
    assert restored.optim_steps == 3
    for (name, a), (_, b) in zip(
        client.trainable_parameters, restored.trainable_parameters, strict=True
    ):
        assert torch.equal(a.detach(), b.detach()), name
        state_a, state_b = client.optimizer.state[a], restored.optimizer.state[b]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[key], state_b[key]), (name, key)
            assert state_a[key].dtype == state_b[key].dtype


def test_missing_corrupt_and_conflicting_checkpoints(
    local_service: Any, tiny_tokenizer: Any
) -> None:
    client, _ = _trained_lora(local_service, tiny_tokenizer)
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint at local://nope/weights/x"):
        local_service.create_sampling_client(model_path="local://nope/weights/x").result()
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(CheckpointNotFoundError, tinker.NotFoundError)
    with pytest.raises(ValueError, match="is a Tinker service path"):
        local_service.create_sampling_client(model_path="tinker://run/weights/x").result()
    with pytest.raises(ValueError, match="malformed local checkpoint path"):
        local_service.create_sampling_client(model_path="local://run/elsewhere/x").result()
    with pytest.raises(ValueError, match="checkpoint name must be"):
        client.save_state("../escape").result()

    path = client.save_state("c1").result().path
    with pytest.raises(CheckpointExistsError, match="already exists; pass overwrite=True"):
        client.save_state("c1").result()
    assert client.save_state("c1", overwrite=True).result().path == path

    sampler_path = client.save_weights_for_sampler("c1").result().path
    with pytest.raises(CorruptCheckpointError, match="has no optimizer state"):
        local_service.create_training_client_from_state_with_optimizer(sampler_path).result()

    directory = _checkpoint_dir(local_service, path)
    weights = directory / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    with pytest.raises(
        CorruptCheckpointError,
        match=rf"adapter_model.safetensors has {len(data) - 10} bytes, {len(data)} were written",
    ):
        local_service.create_training_client_from_state(path).result()
    weights.write_bytes(b"\xff" * len(data))
    with pytest.raises(
        CorruptCheckpointError, match=r"adapter_model\.safetensors does not match its SHA-256"
    ):
        local_service.create_training_client_from_state(path).result()
    # metadata rewritten to vouch for the garbage: the file itself is still refused
    meta_path = directory / "sdft_checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"]["adapter_model.safetensors"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match=r"cannot read adapter_model\.safetensors"):
        local_service.create_training_client_from_state(path).result()
    (directory / "sdft_checkpoint.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match=r"sdft_checkpoint\.json is unreadable"):
        local_service.create_sampling_client(model_path=path).result()


def test_failed_save_leaves_nothing_behind(
    local_service: Any, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdft.backends.local import _checkpoints

    client, _ = _trained_lora(local_service, tiny_tokenizer)
    real_write = _checkpoints.write_file

    def failing_write(path: Path, data: bytes) -> None:
        real_write(path, data)
        if path.name == "optimizer.safetensors":
            raise OSError("disk full")

    monkeypatch.setattr(_checkpoints, "write_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        client.save_state("broken").result()
    run_dir = local_service.checkpoint_root / client.model_id / "weights"
    assert not (run_dir / "broken").exists()
    assert [p.name for p in run_dir.iterdir() if "broken" in p.name] == []


# --- EMA teacher -------------------------------------------------------------------------------


def test_full_ema_teacher_averages_the_weights(local_service: Any, tiny_tokenizer: Any) -> None:
    client = local_service.create_full_training_client(TINY_RANDOM_MODEL).result()
    alpha = 0.3
    ema = client.create_ema_sampling_client(alpha=alpha).result()
    expected = {name: p.detach().clone() for name, p in client.trainable_parameters}
    rng = np.random.default_rng(7)
    for _ in range(2):
        client.forward_backward([random_datum(rng, 9)], "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=2e-2)).result()
        for name, p in client.trainable_parameters:
            expected[name] = (1 - alpha) * expected[name] + alpha * p.detach()
    reference = load_model(TINY_RANDOM_MODEL)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(expected[name])
    prompt = prompt_of(tiny_tokenizer, "average")
    tokens = prompt.to_ints()
    rows = logprob_rows(reference, tokens)
    got = ema.compute_logprobs(prompt).result()
    np.testing.assert_allclose(
        got[1:],
        [float(rows[i - 1, tokens[i]]) for i in range(1, len(tokens))],
        rtol=1e-5,
        atol=1e-5,
    )
    live = client.save_weights_and_get_sampling_client().result().compute_logprobs(prompt).result()
    assert not np.allclose(got[1:], live[1:], atol=1e-4)


def test_lora_ema_teacher_averages_effective_weights(
    local_service: Any, tiny_tokenizer: Any
) -> None:
    client = local_service.create_lora_training_client(TINY_RANDOM_MODEL, rank=2, seed=3).result()
    alpha = 0.5
    ema = client.create_ema_sampling_client(alpha=alpha).result()
    layers = lora_layers(client.runtime.module)
    base = {name: layer.base_layer.weight.detach().clone() for name, layer in layers}
    merged = {name: base[name].clone() for name, _ in layers}  # B = 0 at creation
    rng = np.random.default_rng(8)
    for _ in range(2):
        client.forward_backward([random_datum(rng, 8)], "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        with torch.no_grad():
            for name, layer in layers:
                merged[name] = (1 - alpha) * merged[name] + alpha * (base[name] + lora_delta(layer))
    # The EMA of the effective weights is not the product of averaged A and B.
    reference = load_model(TINY_RANDOM_MODEL)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, _ in layers:
            target = name.removeprefix("base_model.model.")
            modules[target].weight = torch.nn.Parameter(merged[name].clone())
    prompt = prompt_of(tiny_tokenizer, "lora average")
    tokens = prompt.to_ints()
    rows = logprob_rows(reference, tokens)
    got = ema.compute_logprobs(prompt).result()
    np.testing.assert_allclose(
        got[1:],
        [float(rows[i - 1, tokens[i]]) for i in range(1, len(tokens))],
        rtol=1e-5,
        atol=1e-5,
    )
    # The tied embedding is untouched by the averaged lm_head.
    assert torch.equal(
        client.runtime.hf_model.get_input_embeddings().weight, base["base_model.model.lm_head"]
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_client_resumed_from_state_continues_its_ema_teacher(
    local_service: Any, tiny_tokenizer: Any, lora: bool
) -> None:
    def create() -> Any:
        if lora:
            return local_service.create_lora_training_client(TINY_RANDOM_MODEL, rank=2, seed=5)
        return local_service.create_full_training_client(TINY_RANDOM_MODEL, seed=5)

    def train(client: Any, seed: int) -> None:
        client.forward_backward([random_datum(np.random.default_rng(seed), 9)], "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=3e-2)).result()

    prompt = prompt_of(tiny_tokenizer, "resumed average")
    client = create().result()
    ema = client.create_ema_sampling_client(alpha=0.5).result()
    other = client.create_ema_sampling_client(alpha=0.25).result()
    for seed in (1, 2):
        train(client, seed)
    saved = client.save_state("with-ema").result().path
    train(client, 3)
    uninterrupted = ema.compute_logprobs(prompt).result()
    meta = json.loads((_checkpoint_dir(local_service, saved) / "sdft_checkpoint.json").read_text())
    assert meta["ema"] == [
        {"alpha": 0.5, "file": "ema_0.safetensors"},
        {"alpha": 0.25, "file": "ema_1.safetensors"},
    ]
    del other

    resumed = local_service.create_training_client_from_state_with_optimizer(saved).result()
    resumed_ema = resumed.create_ema_sampling_client(alpha=0.5).result()
    train(resumed, 3)
    np.testing.assert_allclose(
        resumed_ema.compute_logprobs(prompt).result()[1:], uninterrupted[1:], rtol=0, atol=1e-6
    )
    # an alpha the checkpoint does not hold starts from the resumed weights, as before
    fresh = resumed.create_ema_sampling_client(alpha=0.9).result()
    live = resumed.save_weights_and_get_sampling_client().result()
    np.testing.assert_allclose(
        fresh.compute_logprobs(prompt).result()[1:],
        live.compute_logprobs(prompt).result()[1:],
        rtol=0,
        atol=1e-6,
    )
    # ... which the continued average is not
    assert not np.allclose(
        resumed_ema.compute_logprobs(prompt).result()[1:],
        live.compute_logprobs(prompt).result()[1:],
        atol=1e-4,
    )
    # weights without the optimizer (a fresh start from them) do not carry the average either
    restarted = local_service.create_training_client_from_state(saved).result()
    assert restarted._saved_emas == []


def test_ema_alpha_must_be_in_range(local_service: Any) -> None:
    client = local_service.create_lora_training_client(TINY_RANDOM_MODEL, rank=2).result()
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\], got 0"):
        client.create_ema_sampling_client(alpha=0).result()


# --- full-vocabulary KL --------------------------------------------------------------------------


def _kl_inputs(tokenizer: Any) -> tuple[list, list, list]:
    from sdft.data import (
        build_teacher_forced_sequence,
        extract_completion_tokens,
        student_datum_from_rollout,
    )

    rng = np.random.default_rng(9)
    data, sequences, slices = [], [], []
    for question, demo in (("What is 2+2?", "4"), ("Name a color.", "Blue, like the sky.")):
        student = prompt_of(tokenizer, question)
        teacher = prompt_of(tokenizer, f"{question}\nExample answer: {demo}")
        completion = rng.integers(3, VOCAB, size=7).tolist()
        datum = student_datum_from_rollout(prompt=student, completion_tokens=completion)
        completion_slice = extract_completion_tokens(datum, teacher.length, max_context_length=1024)
        data.append(datum)
        slices.append(completion_slice)
        sequences.append(build_teacher_forced_sequence(teacher, completion_slice.tokens))
    return data, sequences, slices


def test_full_kl_equals_direct_computation(local_service: Any, tiny_tokenizer: Any) -> None:
    client = local_service.create_full_training_client(TINY_RANDOM_MODEL).result()
    teacher = local_service.create_sampling_client(base_model=TINY_RANDOM_MODEL).result()
    with torch.no_grad():  # make the student differ from the teacher
        for p in client.runtime.hf_model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    student_reference = copy.deepcopy(client.runtime.hf_model)
    teacher_reference = load_model(TINY_RANDOM_MODEL)
    data, sequences, slices = _kl_inputs(tiny_tokenizer)
    skip = 2
    output = client.forward_backward_full_kl(
        data, teacher, sequences, slices, skip_first_n=skip
    ).result()

    expected = torch.zeros(())
    positions = 0
    for datum, sequence, completion_slice in zip(data, sequences, slices, strict=True):
        student_rows = torch.log_softmax(
            student_reference(torch.tensor([datum.model_input.to_ints()])).logits[0], dim=-1
        )
        teacher_rows = logprob_rows(teacher_reference, sequence.to_ints())
        p = datum.model_input.length - len(completion_slice.tokens) + 1  # student prompt length
        q = completion_slice.teacher_prompt_len
        for t in range(skip, len(completion_slice.tokens)):
            log_q = teacher_rows[q + t - 1]  # teacher row q + t predicts completion[t]
            log_s = student_rows[p - 1 + t]
            expected = expected + (log_q.exp() * (log_q - log_s)).sum()
            positions += 1
    expected.backward()
    assert output.metrics["loss:sum"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert output.metrics["full_kl/positions:sum"] == positions == 10
    grads = dict(student_reference.named_parameters())
    for name, param in client.runtime.hf_model.named_parameters():
        assert_grads_close(param.grad, grads[name].grad)
    assert output.loss_fn_outputs[0]["logprobs"].shape == [data[0].model_input.length]


def test_full_kl_with_the_students_own_ema_teacher(local_service: Any, tiny_tokenizer: Any) -> None:
    client = local_service.create_lora_training_client(TINY_RANDOM_MODEL, rank=2, seed=0).result()
    teacher = client.create_ema_sampling_client(alpha=0.01).result()
    data, sequences, slices = _kl_inputs(tiny_tokenizer)
    base = local_service.create_sampling_client(base_model=TINY_RANDOM_MODEL).result()
    # At creation the EMA teacher is the base model (B = 0); it runs inline on the student's
    # own worker and must give what the separate base sampler gives.
    output = client.forward_backward_full_kl(data, teacher, sequences, slices).result(timeout=120)
    reference = client.forward_backward_full_kl(data, base, sequences, slices).result(timeout=120)
    assert output.metrics["loss:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-5)
    assert output.metrics["loss:sum"] > 1.0  # the teachers see the demonstration, the student not
    assert output.metrics["full_kl/positions:sum"] == 8.0


def test_full_kl_rejects_misaligned_inputs(local_service: Any, tiny_tokenizer: Any) -> None:
    client = local_service.create_lora_training_client(TINY_RANDOM_MODEL, rank=2).result()
    teacher = local_service.create_sampling_client(base_model=TINY_RANDOM_MODEL).result()
    data, sequences, slices = _kl_inputs(tiny_tokenizer)
    shifted = types.ModelInput.from_ints([7, *sequences[1].to_ints()])
    with pytest.raises(
        ValueError,
        match=r"datum 1: completion token 3 is .* student and teacher sequences are misaligned",
    ):
        client.forward_backward_full_kl(data, teacher, [sequences[0], shifted], slices).result()
    with pytest.raises(
        ValueError, match=r"data \(2\), teacher_sequences \(1\) and completion_slices \(2\)"
    ):
        client.forward_backward_full_kl(data, teacher, sequences[:1], slices).result()
    nothing = client.forward_backward_full_kl(data, teacher, [None, None], slices).result()
    assert nothing.metrics == {"loss:sum": 0.0, "full_kl/positions:sum": 0.0}


# --- sampling internals ----------------------------------------------------------------------------


def test_concurrent_scoring_requests_share_one_batch(
    local_service: Any, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampler = local_service.create_sampling_client(base_model=TINY_RANDOM_MODEL).result()
    batches: list[int] = []
    real = _sampling._run_batch

    def spy(rt: Any, batch: list) -> Any:
        batches.append(len(batch))
        return real(rt, batch)

    monkeypatch.setattr(_sampling, "_run_batch", spy)
    teacher_prompt = prompt_of(
        tiny_tokenizer, "A long shared teacher prompt " + "with many words " * 6
    )
    rng = np.random.default_rng(10)
    sequences = [
        types.ModelInput.from_ints(teacher_prompt.to_ints() + rng.integers(3, VOCAB, 6).tolist())
        for _ in range(6)
    ]

    async def score() -> list[types.SampleResponse]:
        return await asyncio.gather(
            *(
                sampler.sample(
                    s,
                    1,
                    types.SamplingParams(max_tokens=1),
                    include_prompt_logprobs=True,
                    topk_prompt_logprobs=5,
                ).coroutine()
                for s in sequences
            )
        )

    responses = asyncio.run(score())
    assert batches == [6]
    assert sum(r.prompt_cache_hit_tokens for r in responses) > 0
    for sequence, response in zip(sequences, responses, strict=True):
        alone = sampler.sample(
            sequence,
            1,
            types.SamplingParams(max_tokens=1),
            include_prompt_logprobs=True,
            topk_prompt_logprobs=5,
        ).result()
        np.testing.assert_allclose(
            response.prompt_logprobs_np, alone.prompt_logprobs_np, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_array_equal(
            response.topk_prompt_logprobs_np.token_ids, alone.topk_prompt_logprobs_np.token_ids
        )


def test_shared_prefix_groups_keep_the_longest_useful_prefixes() -> None:
    system = list(range(1000, 1033))  # 33 tokens every prompt starts with
    question_a = system + list(range(2000, 2030))  # 63-token teacher prompt of question A
    question_b = system + list(range(3000, 3010))  # 43-token teacher prompt of question B
    prompts = [
        [*question_a, 1, 2],
        [*question_b, 7],
        [*question_a, 3],
        [5] * 50,
        [*question_a, 1, 2, 4],
        [*question_b, 8, 9],
    ]
    groups = {
        tuple(sorted(members)): length
        for members, length in _inference.shared_prefix_groups(prompts)
    }
    # (3 - 1) * 63 + (2 - 1) * 43 saved tokens beat (5 - 1) * 33 for one system-prompt group.
    assert groups == {(0, 2, 4): 63, (1, 5): 43}
    # Identical prompts still keep one token to run in the second pass.
    assert _inference.shared_prefix_groups([[1] * 40, [1] * 40]) == [([0, 1], 39)]
    assert _inference.shared_prefix_groups([[1] * 10, [1] * 10]) == []  # too short to bother


def test_tempered_logprobs_flag(
    tmp_path: Path, tiny_tokenizer: Any, tiny_reference_model: Any
) -> None:
    with LocalServiceClient(tmp_path, device="cpu", tempered_logprobs=True) as service:
        sampler = service.create_sampling_client(base_model=TINY_RANDOM_MODEL).result()
        prompt = prompt_of(tiny_tokenizer, "temper")
        greedy = sampler.sample(
            prompt, 1, types.SamplingParams(max_tokens=3, temperature=0)
        ).result()
        assert greedy.sequences[0].logprobs == [0.0, 0.0, 0.0]
        hot = sampler.sample(
            prompt, 1, types.SamplingParams(max_tokens=1, temperature=0.5, seed=1)
        ).result()
        token = hot.sequences[0].tokens[0]
        with torch.no_grad():
            logits = tiny_reference_model(torch.tensor([prompt.to_ints()])).logits[0, -1].double()
        expected = torch.log_softmax(logits / 0.5, dim=-1)[token]
        assert hot.sequences[0].logprobs[0] == pytest.approx(float(expected), abs=1e-4)


def test_top_k_top_p_and_sample_topk(
    local_service: Any, tiny_tokenizer: Any, tiny_reference_model: Any
) -> None:
    sampler = local_service.create_sampling_client(base_model=TINY_RANDOM_MODEL).result()
    prompt = prompt_of(tiny_tokenizer, "restrict")
    rows = logprob_rows(tiny_reference_model, prompt.to_ints())
    top2 = set(torch.topk(rows[-1], 2).indices.tolist())
    picks = sampler.sample(prompt, 40, types.SamplingParams(max_tokens=1, top_k=2, seed=0)).result()
    assert {s.tokens[0] for s in picks.sequences} == top2
    nucleus = sampler.sample(
        prompt, 10, types.SamplingParams(max_tokens=1, top_p=1e-6, seed=0)
    ).result()
    assert {s.tokens[0] for s in nucleus.sequences} == {int(rows[-1].argmax())}
    with_topk = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=2, temperature=0), topk_sample_logprobs=3
    ).result()
    top = with_topk.sequences[0].topk_logprobs_np
    assert top.token_ids.shape == (2, 3)
    values, ids = torch.topk(rows[-1], 3)
    assert top.token_ids[0].tolist() == ids.tolist()
    np.testing.assert_allclose(top.logprobs[0], values.numpy(), rtol=1e-5, atol=1e-5)


def test_target_prompt_logprobs(local_service: Any, tiny_reference_model: Any) -> None:
    sampler = local_service.create_sampling_client(base_model=TINY_RANDOM_MODEL).result()
    tokens = [1, 40, 50, 60, 70]
    ids = np.array([[41, -1], [51, 52], [-1, -1], [71, 0]], dtype=np.int64)
    response = sampler.sample(
        types.ModelInput.from_ints(tokens),
        1,
        types.SamplingParams(max_tokens=1),
        target_prompt_logprobs=types.TensorData.from_numpy(ids),
    ).result()
    rows = logprob_rows(tiny_reference_model, tokens)
    got = response.target_prompt_logprobs.to_numpy()
    assert got.shape == (4, 2)
    for r in range(4):
        for c in range(2):
            expected = 0.0 if ids[r, c] < 0 else float(rows[r, ids[r, c]])
            assert got[r, c] == pytest.approx(expected, abs=1e-5)


# --- service ------------------------------------------------------------------------------------


def test_unknown_model_fails_with_a_clear_error(local_service: Any) -> None:
    from sdft.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match=r"model 'nobody/nothing' not found\. Tried: "):
        local_service.create_lora_training_client("nobody/nothing").result(timeout=60)
    with pytest.raises(ValueError, match="at least one of train_mlp, train_attn, train_unembed"):
        local_service.create_lora_training_client(
            TINY_RANDOM_MODEL, train_mlp=False, train_attn=False, train_unembed=False
        ).result()
    with pytest.raises(ValueError, match="rank must be a positive int"):
        local_service.create_lora_training_client(TINY_RANDOM_MODEL, rank=0).result()


def test_lora_switches_choose_the_adapted_layers(local_service: Any) -> None:
    client = local_service.create_lora_training_client(
        TINY_RANDOM_MODEL, rank=2, train_mlp=False, train_unembed=False
    ).result()
    names = [name for name, _ in lora_layers(client.runtime.module)]
    assert names and all("self_attn" in name for name in names)
    assert len(names) == 2 * 4  # 2 layers x q, k, v, o


def test_closed_service_refuses_work(tmp_path: Path) -> None:
    service = LocalServiceClient(tmp_path, device="cpu")
    sampler = service.create_sampling_client(base_model=TINY_RANDOM_MODEL).result()
    service.close()
    with pytest.raises(RuntimeError, match="closed"):
        sampler.sample(
            types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=1)
        ).result()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            LocalServiceClient(tmp_path, device="cuda")


# --- oneDNN float32 linear ---------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_torch_forward_and_backward(bias: bool) -> None:
    from sdft.backends.local._cpu_linear import onednn_linear_available, use_onednn_linears

    if not onednn_linear_available():
        pytest.skip("oneDNN float32 linear not available in this torch build")
    torch.manual_seed(0)
    plain = torch.nn.Sequential(
        torch.nn.Linear(24, 40, bias=bias), torch.nn.Linear(40, 8, bias=bias)
    )
    fast = copy.deepcopy(plain)
    assert use_onednn_linears(fast) == 2
    x = torch.randn(3, 5, 24)
    x_fast = x.clone().requires_grad_(True)
    x_plain = x.clone().requires_grad_(True)
    out_fast, out_plain = fast(x_fast), plain(x_plain)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out_plain)
    out_fast.backward(grad)
    out_plain.backward(grad)
    torch.testing.assert_close(x_fast.grad, x_plain.grad, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    # Frozen weights get no gradient; other dtypes take torch's own path.
    for p in fast.parameters():
        p.requires_grad_(False)
    y = fast(torch.randn(2, 24, requires_grad=True))
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in plain.parameters())
    bf16 = copy.deepcopy(fast).to(torch.bfloat16)
    torch.testing.assert_close(bf16(x.bfloat16()).float(), plain(x).detach(), rtol=5e-2, atol=5e-2)


def test_unmerged_lora_snapshots_equal_the_live_adapters(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    with LocalServiceClient(tmp_path, device="cpu", merge_lora_for_sampling=False) as service:
        client, prompt = _trained_lora(service, tiny_tokenizer)
        snapshot = client.save_weights_and_get_sampling_client().result()
        inflight = client.save_weights_and_get_sampling_client(kind="inflight").result()
        assert (
            snapshot.compute_logprobs(prompt).result() == inflight.compute_logprobs(prompt).result()
        )


def test_merged_lora_snapshots_keep_only_the_recent_merged_copies(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    """A server keeps many samplers alive; each LoRA snapshot holds only its adapters, and the
    merged copy of the adapted layers exists for the 2 most recently used snapshots of the process
    only. A snapshot
    whose merged copy was evicted merges again and answers exactly as before."""
    from sdft.backends.local._views import MERGED_VIEWS, MergedLoraView

    with LocalServiceClient(tmp_path, device="cpu") as service:
        client, prompt = _trained_lora(service, tiny_tokenizer)
        adam = types.AdamParams(learning_rate=2e-2)
        tokens = prompt.to_ints()
        datum = ce_datum(tokens, [*tokens[1:], 2], np.ones(len(tokens)))
        snapshots, first_answers = [], []
        for _ in range(5):
            sampler = client.save_weights_and_get_sampling_client().result()
            assert isinstance(sampler.view, MergedLoraView)
            snapshots.append(sampler)
            first_answers.append(sampler.compute_logprobs(prompt).result())
            client.forward_backward([datum], "cross_entropy").result()
            client.optim_step(adam).result()
        cache = MERGED_VIEWS
        assert len(cache) == cache.capacity == 2
        assert cache.get(snapshots[0].view) is None  # evicted
        assert snapshots[0].compute_logprobs(prompt).result() == first_answers[0]
        assert cache.get(snapshots[0].view) is not None and len(cache) == 2
        # Each snapshot still answers with its own weights.
        assert len({tuple(a[1:]) for a in first_answers}) == 5
        assert snapshots[3].compute_logprobs(prompt).result() == first_answers[3]


def test_inverse_cdf_sampling_is_exact_over_a_large_vocabulary() -> None:
    generator = torch.Generator().manual_seed(0)
    vocab = 3_000  # 12 blocks of 256, the last one partial
    probs = torch.rand(1, vocab, generator=generator) ** 8  # a skewed distribution
    probs[0, 1234] = 0.0
    probs /= probs.sum()
    draws = 24_000
    uniforms = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    picks = torch.cat(
        [
            _inference._inverse_cdf(probs.expand(len(chunk), vocab), chunk.float())
            for chunk in uniforms.split(4_000)
        ]
    )
    counts = torch.bincount(picks, minlength=vocab).double()
    # Evenly spaced draws hit every token within one draw of its expected count.
    assert float((counts - probs[0].double() * draws).abs().max()) <= 1.0 + 1e-6
    assert counts[1234] == 0
    edges = torch.tensor([0.0, 1.0 - 1e-9])
    ends = _inference._inverse_cdf(probs.expand(2, vocab), edges.float())
    assert ends[0] == int(torch.nonzero(probs[0])[0]) and ends[1] == int(
        torch.nonzero(probs[0])[-1]
    )


def test_deprecated_async_shims_forward_to_the_clients(local_service: Any) -> None:
    datum = random_datum(np.random.default_rng(9), 6)
    prompt = types.ModelInput.from_ints([1, 2, 3])
    params = types.SamplingParams(max_tokens=2, temperature=0.0)

    async def run() -> tuple[Any, ...]:
        client = await local_service.create_lora_training_client_async(
            TINY_RANDOM_MODEL, rank=2, seed=0
        )
        # training shims give the future (a second await gives the result), as in the SDK
        forward = await (await client.forward_async([datum], "cross_entropy"))
        direct = client.forward([datum], "cross_entropy").result()
        sampler = await client.save_weights_and_get_sampling_client_async()
        sampled = await sampler.sample_async(prompt, 1, params)
        logprobs = await sampler.compute_logprobs_async(prompt)
        info = await client.get_info_async()
        return client, forward, direct, sampler, sampled, logprobs, info

    client, forward, direct, sampler, sampled, logprobs, info = asyncio.run(run())
    assert forward.metrics == direct.metrics
    assert (
        sampled.sequences[0].tokens
        == sampler.sample(prompt, 1, params).result().sequences[0].tokens
    )
    assert logprobs == sampler.compute_logprobs(prompt).result()
    assert info.model_id == client.model_id and info.lora_rank == 2
    assert asyncio.run(sampler.get_base_model_async()) == TINY_RANDOM_MODEL


def test_service_clients_in_one_process_share_the_base_weights(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    import gc

    from sdft.backends.local._modules import SHARED_BASE_MODELS

    def base_weight(client: Any) -> torch.Tensor:
        return client.runtime.hf_model.get_input_embeddings().weight

    gc.collect()
    held = SHARED_BASE_MODELS.loaded()
    first = LocalServiceClient(tmp_path / "a", device="cpu")
    second = LocalServiceClient(tmp_path / "b", device="cpu", fast_cpu_linear=False)
    try:
        students = [
            service.create_lora_training_client(TINY_RANDOM_MODEL, rank=2, seed=0).result()
            for service in (first, second)
        ]
        teachers = [
            service.create_sampling_client(base_model=TINY_RANDOM_MODEL).result()
            for service in (first, second)
        ]
        assert SHARED_BASE_MODELS.loaded() <= held + 1  # + 0 when another client holds it
        assert base_weight(students[0]).data_ptr() == base_weight(students[1]).data_ptr()
        assert (
            teachers[0].runtime.module.get_input_embeddings().weight.data_ptr()
            == base_weight(students[0]).data_ptr()
        )
        # each service keeps its own module tree: the second one's linears stay torch's own
        linears = [m for m in teachers[1].runtime.module.modules() if type(m) is torch.nn.Linear]
        assert linears and all("forward" not in vars(m) for m in linears)
        prompt = prompt_of(tiny_tokenizer, "shared")
        assert teachers[0].compute_logprobs(prompt).result()[1:] == pytest.approx(
            teachers[1].compute_logprobs(prompt).result()[1:], rel=1e-5
        )
    finally:
        first.close()
        second.close()
    del students, teachers
    gc.collect()
    assert SHARED_BASE_MODELS.loaded() == held


def test_free_memory_is_trimmed_at_most_every_few_seconds(monkeypatch: Any) -> None:
    from sdft.backends.local import _memory

    if _memory._malloc_trim() is None:
        pytest.skip("the C library has no malloc_trim")
    monkeypatch.setattr(_memory, "_last_trim", _memory._last_trim)  # restored afterwards
    start = _memory._last_trim + 1_000.0
    assert _memory.trim_free_memory(now=start) is True
    assert _memory.trim_free_memory(now=start + _memory.TRIM_EVERY_S - 0.01) is False
    assert _memory.trim_free_memory(now=start + _memory.TRIM_EVERY_S) is True
