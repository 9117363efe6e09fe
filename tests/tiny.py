"""A tiny random model built by transformers (as a user's own model would be) with the library's
character tokenizer, saved to a folder a run config can point `model.path` at."""

from __future__ import annotations

from pathlib import Path

from grpo_jax.models.tiny import char_tokenizer as make_tokenizer  # noqa: F401  (tests import it from here)


def make_tiny_model(folder, seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = 96,
                    allow_small_vocab: bool = False):
    """Qwen2-style tiny model (tied embeddings, GQA 2) + tokenizer in `folder`; returns the folder.

    allow_small_vocab builds an embedding smaller than the tokenizer (a mismatch, for error tests)."""
    import torch
    import transformers

    folder = Path(folder)
    tokenizer = make_tokenizer()
    assert allow_small_vocab or len(tokenizer) <= vocab
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def target_config(model_dir, run_dir, *extra):
    """Flags of a short run on the tiny model that learns to emit "7" (the target_token reward)."""
    target = make_tokenizer().convert_tokens_to_ids("7")
    return [
        f"--model.path={model_dir}", f"--run.output_dir={run_dir}", "--run.steps=20", "--run.seed=0",
        "--data.source=arithmetic", "--data.batch_size=4", "--data.chat_template=false", "--data.eval_split=test",
        "--rollout.group_size=8", "--rollout.max_completion_length=8", "--rollout.max_prompt_length=64",
        "--rollout.prompt_length_buckets=[64]", "--rollout.temperature=1.0",
        f"--rewards.functions=[target_token(token_id={target})]", "--optim.learning_rate=0.03",
        "--grpo.beta=0.0", "--checkpoint.every_steps=0", "--run.eval_max_examples=8", "--logging.log_completions=1",
        *extra,
    ]
