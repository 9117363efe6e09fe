"""The GRPO-step benchmark's workloads on google-tunix (JAX), same JSON as bench/grpo_step.py.

Tunix pieces: its Qwen2 model class (tunix.models.qwen2) with the workload's dims, random
init, float32, tied embeddings (Qwen2 has q/k/v biases, so the smollm2 workload carries
them here; they are a negligible part of the FLOPs); `RLCluster` with the "vanilla"
rollout engine, actor, rollout and reference on one 1 x 1 (fsdp, tp) mesh; `GRPOLearner`
with num_generations G, num_iterations 1, beta, epsilon 0.2, one optimizer step per
generation batch (mini batch = micro batch = the whole batch), AdamW.

Same prompts as ours, through a word-level tokenizer (common.word_tokenizer) whose eos is
an id the model never samples, so every completion runs to full length; sampling at
temperature 1 with top_p 1 and no top-k (tunix's top_p mode skips the filter then).
Reward: fraction of even token ids, parsed back from the decoded completion text.

Timing, by wrapping tunix's own methods:
  rollout  RLCluster.generate
  reward   GRPOLearner._compute_rewards
  logps    RLCluster.get_ref_per_token_logps (beta > 0)
  update   the rest of the step: RLCluster.update_actor (the jitted train step) and the weight sync
A step runs from the start of one `_run_global_step` to the end of the next weight sync.
Recompilations: XLA backend compiles during steps 3..N (jax.monitoring), as for ours.

    .venv-tunix/bin/python bench/peers/tunix_grpo.py [--workload tiny|small|smollm2|all] [--steps 5] [--json out.json]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.peers import common  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def timed(obj, name: str, sink: dict, key: str):
    """Wrap obj.name so each call's wall time is added to sink[key]."""
    original = getattr(obj, name)

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            sink[key] += time.perf_counter() - t

    setattr(obj, name, wrapper)


def run_workload(w: common.Workload, steps: int, matmul_gflops: float) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from tunix.models.qwen2 import model as qwen2
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(duration) if event == COMPILE_EVENT else None)

    config = qwen2.ModelConfig(
        num_layers=w.layers, vocab_size=w.vocab, embed_dim=w.hidden, hidden_dim=w.mlp, num_heads=w.heads,
        head_dim=w.head_dim, num_kv_heads=w.kv_heads, rope_theta=int(w.rope_theta), norm_eps=w.rms_norm_eps,
        use_tied_embedding=True, dtype=jnp.float32, param_dtype=jnp.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))  # auto sharding axes
    with mesh:
        actor = qwen2.Qwen2(config, rngs=nnx.Rngs(common.SEED))
        reference = None
        if w.beta:
            graphdef, state = nnx.split(actor)
            reference = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))

    eos = w.vocab  # never sampled: completions run to max_tokens_to_generate
    tokenizer = common.word_tokenizer(w.vocab, eos_id=eos)
    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=w.new_tokens, max_prompt_length=w.prompt_len, kv_cache_size=w.prompt_len + w.new_tokens,
        temperature=1.0, top_p=1.0, top_k=None, eos_tokens=[eos])
    training_config = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.adamw(common.LEARNING_RATE), eval_every_n_steps=10**9, max_steps=steps)
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                      rl_cluster_lib.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False, training_config=training_config,
        rollout_config=rollout_config)
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=tokenizer,
                                       cluster_config=cluster_config)

    def even_fraction(prompts, completions, **kw):
        ids = [common.ids_of_text(c) for c in completions]
        assert all(len(x) == w.new_tokens for x in ids), "completions must be forced to full length"
        return [common.even_fraction(x) for x in ids]

    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, reward_fns=even_fraction,
        algo_config=grpo_learner.GRPOConfig(num_generations=w.group, num_iterations=1, beta=w.beta,
                                            epsilon=common.EPSILON, loss_agg_mode="sequence-mean-token-mean"))

    phase = {"rollout": 0.0, "reward": 0.0, "logps": 0.0}
    timed(cluster, "generate", phase, "rollout")
    timed(learner, "_compute_rewards", phase, "reward")
    timed(cluster, "get_ref_per_token_logps", phase, "logps")
    step_times, splits, compiles_at = [], [], []
    current = {}

    def close_step():
        if current:
            dt = current["end"] - current["start"]
            step_times.append(dt)
            splits.append(dict(phase, update=dt - sum(phase.values())))
            compiles_at.append(len(compiles))
            print(f"  {w.name} step {len(step_times)}: {dt:.3f} s", file=sys.stderr, flush=True)
            current.clear()
            phase.update(rollout=0.0, reward=0.0, logps=0.0)

    run_global_step, sync_weights = learner._run_global_step, cluster.sync_weights

    def global_step(*a, **kw):
        close_step()
        current["start"] = time.perf_counter()
        out = run_global_step(*a, **kw)
        current["end"] = time.perf_counter()
        return out

    def sync(*a, **kw):
        out = sync_weights(*a, **kw)
        current["end"] = time.perf_counter()
        return out

    learner._run_global_step, cluster.sync_weights = global_step, sync
    # batches as grain makes them: a numpy array of strings (a list would be mapped string by string)
    dataset = [{"prompts": np.array(common.prompt_texts(w))} for _ in range(steps)]
    with mesh:
        learner.train(dataset)
    close_step()
    recompiles = compiles_at[-1] - compiles_at[1] if len(compiles_at) >= 2 else None
    return common.summarize(w, step_times, splits, matmul_gflops, recompiles, "jax.monitoring " + COMPILE_EVENT)


def versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("google-tunix", "jax", "flax")}


def main(argv=None) -> int:
    return common.cli_main("tunix", __doc__, os.path.abspath(__file__), run_workload, versions,
                           common.jax_matmul_gflops, argv)


if __name__ == "__main__":
    sys.exit(main())
