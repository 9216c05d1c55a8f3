"""The smallest complete run, for tests and smoke checks: a random 2-layer llama decoder (SmolLM2's
tokenizer) as all three MathChat agents with their own LoRA adapters, the offline rule-based coach,
a handful of synthetic arithmetic problems, and one shape bucket per dimension so each program
compiles once. Seconds per step on 2 CPU cores; the numbers it learns mean nothing."""
from mappa_jax.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/tiny"
    c.model.source = "random:llama"
    c.model.random_layers = 2
    c.model.random_hidden = 64
    c.policy.lora_rank = 4
    c.policy.lora_alpha = 8.0
    c.policy.lora_targets = ("q_proj", "v_proj")

    c.data.train = {"source": "synthetic", "arithmetic_count": 8, "difficulty": 1, "seed": 0}
    c.data.eval = {"source": "synthetic", "arithmetic_count": 2, "difficulty": 1, "seed": 1}
    c.coach.backend = "rule_based"
    c.coach.model = "rule-based"

    # The full MathChat topology (the Code Executor's code goes through the sandbox), short replies.
    # A random decoder almost never samples EOS, and truncated actions are masked out of the loss
    # (as in MAPPA), so every agent also stops at the first "e": most replies end early and train.
    agents = c.topology.agents
    for agent in agents.values():
        agent.max_new_tokens = 16
        agent.stop_strings = tuple(agent.stop_strings) + ("e",)
    c.topology.max_prompt_tokens = 256
    c.sampler.batch_buckets = (4,)
    c.sampler.prompt_buckets = (256,)  # the longest MathChat prompt here is ~200 tokens
    c.sampler.generation_buckets = (16,)

    c.rl.learning_rate = 1e-3       # large enough that three steps visibly move the adapters
    c.rl.warmup_ratio = 0.0
    c.rl.train_batch_size = 4
    c.rl.micro_batch_size = 4
    c.rl.old_logprobs = "sampler"   # the behaviour policy is what sampled; the trainer gap is still logged

    c.train.steps = 3
    c.train.tasks_per_step = 2
    c.train.samples_per_task = 2
    c.train.eval_every = 0
    c.train.eval_samples = 1
    c.train.checkpoint_every = 1
    c.train.keep_checkpoints = 5
    c.train.export_hf = False
    c.train.episode_timeout_s = 600.0  # never hit: a timeout would make runs depend on machine load
    c.train.sandbox_wall_timeout_s = 20.0
    c.train.sandbox_memory_mb = 512
    c.logging.tensorboard = False
    c.logging.progress = True
    return c
