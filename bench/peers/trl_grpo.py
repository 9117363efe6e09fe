"""The GRPO-step benchmark's workloads on TRL's `GRPOTrainer` (torch, CPU), same JSON as bench/grpo_step.py.

Same model shape (transformers Qwen2ForCausalLM / LlamaForCausalLM, random init, float32,
tied embeddings), same prompts, same sampling (temperature 1, no top-k / top-p), every
completion forced to full length with min_new_tokens = max_new_tokens, same reward
(fraction of even completion token ids), one optimizer step per generation batch
(per_device_train_batch_size = prompts x G, gradient_accumulation_steps 1), loss_type
"grpo" as ours, no gradient checkpointing, as our default.

The model is saved to a temporary folder first so TRL can load the reference model
from it (TRL builds the reference from the policy's name or path when beta > 0).
A word-level tokenizer (common.word_tokenizer) maps token id i to the word "<i>", so
text prompts become exactly the benchmark's token ids; eos is id 1, held off by min_new_tokens.

The phase split comes from timing TRL's own methods in a subclass:
  rollout  GRPOTrainer._generate (tokenize, model.generate, decode)
  reward   GRPOTrainer._calculate_rewards
  logps    _get_per_token_logps_and_entropies called while scoring a generation batch
           (the reference forward when beta > 0; no old-policy forward on-policy)
  update   the rest of the step (the policy forward/backward and the AdamW step)
Step wall times come from a TrainerCallback (on_step_begin / on_step_end).
Recompilations: torch runs eagerly (no compile), reported as 0.

    .venv-trl/bin/python bench/peers/trl_grpo.py [--workload tiny|small|smollm2|all] [--steps 5] [--json out.json]
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.peers import common  # noqa: E402


def hf_model(w: common.Workload):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.mlp, num_hidden_layers=w.layers,
              num_attention_heads=w.heads, num_key_value_heads=w.kv_heads, head_dim=w.head_dim,
              rope_theta=w.rope_theta, rms_norm_eps=w.rms_norm_eps, tie_word_embeddings=True,
              max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(common.SEED)
    if w.qkv_bias:
        return Qwen2ForCausalLM(Qwen2Config(**kw)).float()
    return LlamaForCausalLM(LlamaConfig(**kw)).float()


def run_workload(w: common.Workload, steps: int, matmul_gflops: float) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    phase = {"rollout": 0.0, "reward": 0.0, "logps": 0.0}
    scoring = [False]

    @contextlib.contextmanager
    def timed(key):
        """Adds the block's seconds to phase[key] (key None: not timed)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            if key is not None:
                phase[key] += time.perf_counter() - t

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose rollout, reward and no-grad log-prob phases are timed."""

        def _generate(self, *a, **kw):
            with timed("rollout"):
                return super()._generate(*a, **kw)

        def _calculate_rewards(self, *a, **kw):
            with timed("reward"):
                return super()._calculate_rewards(*a, **kw)

        def _generate_and_score_completions(self, *a, **kw):
            scoring[0] = True
            try:
                return super()._generate_and_score_completions(*a, **kw)
            finally:
                scoring[0] = False

        def _get_per_token_logps_and_entropies(self, *a, **kw):
            # the no-grad reference / old-policy pass happens while scoring; the training forward does not count
            with timed("logps" if scoring[0] else None):
                return super()._get_per_token_logps_and_entropies(*a, **kw)

    step_times, splits = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            phase.update(rollout=0.0, reward=0.0, logps=0.0)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            dt = time.perf_counter() - self.t0
            step_times.append(dt)
            splits.append(dict(phase, update=dt - sum(phase.values())))
            print(f"  {w.name} step {len(step_times)}: {dt:.3f} s", file=sys.stderr, flush=True)

    def even_fraction(prompts, completions, completion_ids, **kw):
        assert all(len(ids) == w.new_tokens for ids in completion_ids), "completions must be forced to full length"
        return [common.even_fraction(ids) for ids in completion_ids]

    tokenizer = common.word_tokenizer(w.vocab, eos_id=1)
    prompts = common.prompt_texts(w)
    assert tokenizer(prompts)["input_ids"] == common.random_prompts(w)
    with tempfile.TemporaryDirectory(prefix="trl_grpo_") as tmp:
        model_dir = os.path.join(tmp, "model")
        hf_model(w).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        args = GRPOConfig(
            output_dir=os.path.join(tmp, "out"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            per_device_train_batch_size=w.rows, gradient_accumulation_steps=1, num_generations=w.group,
            max_completion_length=w.new_tokens, temperature=1.0, top_k=0, top_p=1.0,
            generation_kwargs={"min_new_tokens": w.new_tokens}, beta=w.beta, epsilon=common.EPSILON,
            num_iterations=1, loss_type="grpo", scale_rewards="group", learning_rate=common.LEARNING_RATE,
            max_steps=steps, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, seed=common.SEED, model_init_kwargs={"dtype": torch.float32},
            log_completions=False)
        trainer = TimedGRPOTrainer(model=model_dir, reward_funcs=even_fraction, args=args,
                                   train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                                   callbacks=[StepTimer()])
        trainer.train()
    return common.summarize(w, step_times, splits, matmul_gflops, 0, "torch eager: nothing compiles")


def versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("trl", "transformers", "torch")}


def measure_gflops() -> float:
    """Best-of-5 rate of a 2048^3 float32 matmul in torch (bench/peak.py does the same in JAX)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e9


def main(argv=None) -> int:
    return common.cli_main("trl", __doc__, os.path.abspath(__file__), run_workload, versions, measure_gflops, argv)


if __name__ == "__main__":
    sys.exit(main())
