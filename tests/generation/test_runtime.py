"""The causal-LM runtime: loading offline, what it reports, chat prompts, dtype."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tidegate.runtimes.causal_lm import CausalLMRuntime, default_chat_prompt

MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]


def test_reports_context_eos_and_memory(gpt2: CausalLMRuntime) -> None:
    assert gpt2.context_length == 256
    assert gpt2.eos_token_ids == frozenset({gpt2.tokenizer.eos_token_id})
    tensors = [*gpt2.model.parameters(), *gpt2.model.buffers()]
    assert gpt2.memory_bytes == sum(t.numel() * 4 for t in tensors) > 0
    assert gpt2.encode("The fox") == gpt2.tokenizer("The fox")["input_ids"]


def test_bfloat16_halves_parameter_memory(llama_dir: Path, llama: CausalLMRuntime) -> None:
    half = CausalLMRuntime(llama_dir, dtype="bfloat16", max_context_tokens=64)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    params = sum(p.numel() for p in half.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in half.model.buffers())
    assert half.memory_bytes == 2 * params + buffers
    assert llama.memory_bytes == 4 * params + buffers  # rotary tables stay float32
    assert half.context_length == 64


def test_the_prompt_encoder_is_chosen_at_load(gpt2_dir: Path) -> None:
    runtime = CausalLMRuntime(gpt2_dir)
    assert "_encoder" in vars(runtime)  # its probe ran in the constructor (the load's thread)
    assert runtime.choose_encoder() is runtime.choose_encoder()


def test_default_chat_format_without_a_template(gpt2_dir: Path) -> None:
    runtime = CausalLMRuntime(gpt2_dir)
    assert not runtime.has_chat_template
    text = "system: Be terse.\nuser: Hi\nassistant:"
    assert default_chat_prompt(MESSAGES) == runtime.chat_prompt(MESSAGES) == text
    assert runtime.encode_chat(MESSAGES) == runtime.encode(text)


def test_chat_template_is_used_when_the_tokenizer_has_one(gpt2_dir: Path) -> None:
    runtime = CausalLMRuntime(gpt2_dir)
    runtime.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert runtime.chat_prompt(MESSAGES) == "<system>Be terse.<user>Hi<assistant>"
    ids = runtime.encode_chat(MESSAGES)
    assert runtime.tokenizer.decode(ids) == "<system>Be terse.<user>Hi<assistant>"
    assert runtime.chat_prompt(MESSAGES, add_generation_prompt=False) == (
        "<system>Be terse.<user>Hi")
    assert runtime.tokenize_chat(MESSAGES, add_generation_prompt=False) == runtime.encode(
        "<system>Be terse.<user>Hi")


def test_as_a_chat_tokenizer(gpt2: CausalLMRuntime) -> None:
    from tidegate.runtimes.tokenization import ChatTokenizer

    tokenizer: ChatTokenizer = gpt2
    assert tokenizer.max_model_len == 256
    assert tokenizer.max_token_id == len(gpt2.tokenizer) - 1
    ids = tokenizer.tokenize("The fox", add_special_tokens=True)
    assert ids == gpt2.encode("The fox")
    assert tokenizer.detokenize(ids) == "The fox"
    assert tokenizer.token_strs(ids) == gpt2.tokenizer.convert_ids_to_tokens(ids)
    assert "".join(tokenizer.token_strs(ids)) == "TheĠfox"  # byte-level, as the vocabulary has it
    assert tokenizer.tokenize_chat(MESSAGES) == gpt2.encode_chat(MESSAGES)
    assert tokenizer.tokenize_chat(MESSAGES, add_generation_prompt=False) == gpt2.encode(
        "system: Be terse.\nuser: Hi\n")


def test_refuses_missing_dirs_and_unsupported_caches(
    tmp_path: Path, byte_tokenizer: Any
) -> None:
    with pytest.raises(FileNotFoundError):
        CausalLMRuntime(tmp_path / "absent")
    with pytest.raises(ValueError, match="dtype"):
        CausalLMRuntime(tmp_path, dtype="float16")  # type: ignore[arg-type]
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    config = Qwen3NextConfig(  # linear attention: a recurrent state, not a key/value cache
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=len(byte_tokenizer), num_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16,
    )
    Qwen3NextForCausalLM(config).save_pretrained(tmp_path)
    byte_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LinearAttentionLayer"):
        CausalLMRuntime(tmp_path)


def test_chat_template_rejection_is_invalid_request(gpt2_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from tidegate.errors import InvalidRequest

    strict = tmp_path / "strict"
    shutil.copytree(gpt2_dir, strict)
    config_path = strict / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('system messages are not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    config_path.write_text(json.dumps(config))
    runtime = CausalLMRuntime(strict)
    assert runtime.has_chat_template
    assert runtime.encode_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequest, match="system messages are not supported") as caught:
        runtime.encode_chat([{"role": "system", "content": "be terse"}])
    assert caught.value.param == "messages"


def test_fp32_linears_are_converted_with_the_same_outputs(
    llama_dir: Path, gpt2_dir: Path, gpt2: CausalLMRuntime, llama: CausalLMRuntime
) -> None:
    from transformers import AutoModelForCausalLM

    from tidegate.runtimes.linear_layout import InputMajorLinear, WeightMajorLinear

    # 7 projections in each of 2 layers, and the untied head: all small, so input-major.
    assert llama.converted_linears == 2 * 7 + 1
    assert isinstance(llama.model.lm_head, InputMajorLinear)
    # GPT-2's Conv1D layers are left alone; its head is tied to the token embeddings, so it
    # goes weight-major and stays tied (one parameter, not two).
    assert gpt2.converted_linears == 1
    head = gpt2.model.lm_head
    assert isinstance(head, WeightMajorLinear)
    assert head.weight is gpt2.model.get_input_embeddings().weight
    for runtime, source in ((llama, llama_dir), (gpt2, gpt2_dir)):
        plain = AutoModelForCausalLM.from_pretrained(source, local_files_only=True).eval()
        assert runtime.memory_bytes == sum(
            t.numel() * t.element_size() for t in (*plain.parameters(), *plain.buffers())
        )
        # 3 x 5 rows and 3 x 13 rows: both sides of the weight-major row threshold.
        for length in (5, 13):
            ids = torch.tensor([runtime.encode("The quick brown fox jumps")[:1] * length] * 3)
            with torch.inference_mode():
                expected = plain(input_ids=ids).logits
                got = runtime.model(input_ids=ids).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_linear_conversion_picks_the_form_by_size_and_sharing() -> None:
    from torch import nn

    from tidegate.runtimes.linear_layout import (
        INPUT_MAJOR_MAX_ELEMENTS,
        InputMajorLinear,
        WeightMajorLinear,
        convert_linears,
    )

    class Scaled(nn.Linear):
        pass

    embed = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    wide = nn.Linear(1024, INPUT_MAJOR_MAX_ELEMENTS // 1024)
    model = nn.Sequential(embed, nn.Linear(4, 4), Scaled(4, 4), head, wide)
    originals = {name: module for name, module in model.named_children()}
    assert convert_linears(model) == 3
    assert isinstance(model[1], InputMajorLinear) and model[1].weight_t.is_contiguous()
    assert type(model[2]) is Scaled
    assert isinstance(model[3], WeightMajorLinear) and model[3].weight is embed.weight
    assert isinstance(model[4], WeightMajorLinear) and model[4].weight is originals["4"].weight
    for rows in (1, 11, 12, 40):
        for index, width in ((1, 4), (3, 4), (4, 1024)):
            inputs = torch.randn(2, rows, width)
            reference = originals[str(index)]
            torch.testing.assert_close(model[index](inputs), reference(inputs),
                                       rtol=1e-5, atol=1e-4)


def test_weight_major_linears_inside_real_models_give_the_same_logits(
    llama_dir: Path, windowed_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every projection weight-major (as in models wider than the test ones): attention and MLP
    code must take the transposed-view outputs. Llama, and each sliding-window family."""
    from transformers import AutoModelForCausalLM

    from tidegate.runtimes import linear_layout

    monkeypatch.setattr(linear_layout, "INPUT_MAJOR_MAX_ELEMENTS", 0)
    for source in (llama_dir, windowed_dir):
        plain = AutoModelForCausalLM.from_pretrained(source, local_files_only=True).eval()
        converted = AutoModelForCausalLM.from_pretrained(source, local_files_only=True).eval()
        assert linear_layout.convert_linears(converted) > 0
        assert not any(isinstance(m, linear_layout.InputMajorLinear)
                       for m in converted.modules())
        for shape in ((1, 5), (3, 13), (16, 1)):  # below, above and at a decode step's rows
            ids = torch.randint(3, plain.config.vocab_size, shape)
            with torch.inference_mode():
                expected = plain(input_ids=ids).logits
                got = converted(input_ids=ids).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
