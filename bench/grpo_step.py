"""Seconds per GRPO step (rollout + reward + update) of grpo_jax, split by phase, against the FLOP floor.

The same workloads run on TRL (bench/peers/trl_grpo.py) and google-tunix
(bench/peers/tunix_grpo.py); bench/compare.py runs all three and prints the ratios.
Workloads (bench/peers/common.py): random-weight Qwen2-style decoders, float32, one
optimizer step per generation batch, epsilon 0.2, temperature 1, every completion
forced to full length, reward = fraction of even token ids (scored on the host).

One step here is what `loop.Run.step` does, with the phases run one after another
(each blocked on) so they can be timed apart:
  rollout  `rollout.generate` (shared prefill, while_loop decode) and the tokens to host
  reward   the reward function on the host
  logps    `trainer.assemble_batch` + the reference forward (beta > 0; on-policy, so no old-policy forward)
  update   `objective.group_advantages` + `trainer.train_on_batch` (one AdamW step)
(The training loop overlaps logps with the reward on the host; here they are serial.)

Recompilations: XLA backend compiles counted with a `jax.monitoring` listener on
"/jax/core/compile/backend_compile_duration" during steps 3..N; 0 means every step
after the second reuses compiled programs.

Each workload runs in its own subprocess, so its peak RSS (ru_maxrss) is its own.

    .venv/bin/python bench/grpo_step.py [--workload tiny|small|smollm2|all] [--steps 5] [--json out.json]
        [--micro-batch ROWS] [--lora-rank R]

--lora-rank R trains rank-R LoRA adapters (alpha 2R) on every linear of the frozen base instead
of the whole model, as `model.lora_rank=R` does: the rollout reads base + adapters unmerged.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.peers import common  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def model_config(w: common.Workload):
    from grpo_jax.models import transformer

    return transformer.TransformerConfig(
        vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.mlp, num_layers=w.layers, num_heads=w.heads,
        num_kv_heads=w.kv_heads, head_dim=w.head_dim, rope_theta=w.rope_theta, rms_norm_eps=w.rms_norm_eps,
        tie_word_embeddings=True, qkv_bias=w.qkv_bias, max_position_embeddings=4096,
        model_type="qwen2" if w.qkv_bias else "llama")


def run_config(w: common.Workload, micro_batch: int = 0, lora_rank: int = 0):
    from grpo_jax.config import Config, DataConfig, GRPOConfig, ModelConfig, OptimConfig, RolloutConfig

    return Config(
        model=ModelConfig(lora_rank=lora_rank),
        rollout=RolloutConfig(group_size=w.group, max_prompt_length=w.prompt_len,
                              max_completion_length=w.new_tokens, temperature=1.0, stop_token_ids=()),
        grpo=GRPOConfig(beta=w.beta, epsilon=common.EPSILON, num_iterations=1, num_minibatches=1,
                        micro_batch_size=micro_batch),
        optim=OptimConfig(learning_rate=common.LEARNING_RATE),
        data=DataConfig(batch_size=w.prompts),
    )


def run_workload(w: common.Workload, steps: int, matmul_gflops: float, micro_batch: int = 0,
                 lora_rank: int = 0) -> dict:
    """`steps` GRPO steps of one workload; the result row (see common.summarize).

    micro_batch: grpo.micro_batch_size (rows per forward/backward pass; 0: all rows at once).
    lora_rank: > 0 trains LoRA adapters on the frozen base (model.lora_rank)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from grpo_jax import sharding
    from grpo_jax.models import lora, transformer
    from grpo_jax.objective import group_advantages
    from grpo_jax.optim import make_optimizer
    from grpo_jax.rollout import SamplingParams, generate
    from grpo_jax.trainer import assemble_batch, init_train_state, make_steps, train_on_batch

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(duration) if event == COMPILE_EVENT else None)

    # set up as loop.Run does: a mesh, the train state placed in its shardings, steps with fixed out shardings
    config, cfg = model_config(w), run_config(w, micro_batch, lora_rank)
    mesh = sharding.make_mesh(cfg.mesh)
    model = transformer.Transformer(config, rngs=nnx.Rngs(common.SEED))
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                            transformer.param_shardings(model, mesh, sharding.DEFAULT_RULES))
    decoder = transformer.Decoder(config)
    forward, init_cache = decoder, decoder.init_cache
    optimizer = make_optimizer(cfg.optim, steps)
    spec = lora.LoraSpec.from_config(cfg.model)
    trained, trained_shardings = params, jax.tree.map(lambda x: x.sharding, params)
    if spec is not None:  # the adapters train; params stay as the frozen base
        trained = jax.jit(lora.init_adapters, static_argnums=1)(params, spec, jax.random.PRNGKey(common.SEED))
        trained_shardings = lora.adapter_shardings(trained, trained_shardings)
    state = init_train_state(trained, optimizer, jax.random.PRNGKey(common.SEED),
                             keep_reference=w.beta != 0 and spec is None)
    state_shardings = sharding.train_state_shardings(state, optimizer, trained_shardings, mesh)
    state = jax.device_put(state, state_shardings)
    frozen = None if spec is None else params
    logps_step, update_step = (functools.partial(fn, frozen=frozen)
                               for fn in make_steps(decoder, optimizer, cfg, state_shardings))
    decoder_params = (lambda s: s.params) if spec is None else (lambda s: lora.combine(params, s.params, spec))
    sampling = SamplingParams(w.new_tokens, temperature=1.0, stop_token_ids=(), pad_token_id=0)
    prompt_ids = np.asarray(common.random_prompts(w), np.int32)
    prompt_mask = np.ones(prompt_ids.shape, bool)
    rows_ids, rows_mask = np.repeat(prompt_ids, w.group, axis=0), np.repeat(prompt_mask, w.group, axis=0)

    step_times, splits, compiles_at = [], [], []
    for step in range(steps):
        t0 = time.perf_counter()
        out = generate(forward, init_cache, decoder_params(state), prompt_ids, prompt_mask,
                       jax.random.fold_in(state.rng, step), sampling, group_size=w.group, buckets=(w.prompt_len,))
        tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
        t1 = time.perf_counter()
        rewards = np.asarray([common.even_fraction(row[m]) for row, m in zip(tokens, mask)], np.float32)
        t2 = time.perf_counter()
        batch = assemble_batch(rows_ids, rows_mask, tokens, mask, np.zeros(len(tokens), np.float32))
        batch = sharding.shard_rows(batch, mesh)
        batch = jax.block_until_ready(logps_step(state, batch))
        t3 = time.perf_counter()
        advantages = group_advantages(jnp.asarray(rewards), w.group, cfg.grpo.scale_rewards, cfg.grpo.advantage_eps)
        advantages = jax.device_put(advantages, sharding.rows_sharding(advantages, mesh))
        state, metrics = train_on_batch(state, batch._replace(advantages=advantages), update_step, cfg)
        jax.block_until_ready((state, metrics))
        t4 = time.perf_counter()
        assert int(out.num_tokens) == w.rows * w.new_tokens, "completions must be forced to full length"
        step_times.append(t4 - t0)
        splits.append({"rollout": t1 - t0, "reward": t2 - t1, "logps": t3 - t2, "update": t4 - t3})
        compiles_at.append(len(compiles))
        print(f"  {w.name} step {step + 1}: {t4 - t0:.3f} s (loss {float(metrics['loss']):+.4f})",
              file=sys.stderr, flush=True)
    recompiles = compiles_at[-1] - compiles_at[1] if steps >= 2 else None
    return common.summarize(w, step_times, splits, matmul_gflops, recompiles, "jax.monitoring " + COMPILE_EVENT)


def versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("jax", "flax", "optax")}


def main(argv=None) -> int:
    options = {"--micro-batch": dict(type=int, default=0, metavar="ROWS",
                                     help="grpo.micro_batch_size: rows per forward/backward pass (0: all)"),
               "--lora-rank": dict(type=int, default=0, metavar="R",
                                   help="train rank-R LoRA adapters on the frozen base (0: the whole model)")}
    return common.cli_main("grpo_jax", __doc__, os.path.abspath(__file__), run_workload, versions,
                           common.jax_matmul_gflops, argv, options)


if __name__ == "__main__":
    sys.exit(main())
