"""The paper's MathChat run with Qwen3-4B (Thinking-2507) agents: AIME 1983-2024 for training,
AIME 2025 and AMC for evaluation, Gemini 2.5 Flash as coach, full finetuning of all three agents.
The problem files are the authors' own: `mappa-data paper-math` downloads and verifies them into
data/paper/ (or override --config.data.train / --config.data.eval). Needs GEMINI_API_KEY (or Vertex
AI settings)."""
from mappa_jax.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/mathchat_qwen3_4b"
    c.model.source = "Qwen/Qwen3-4B-Thinking-2507"
    c.model.param_dtype = "float32"  # master weights and AdamW moments (the authors': DeepSpeed fp32 master)
    c.model.dtype = "bfloat16"        # compute, the reference and the sampler's copy
    c.model.train_remat = True
    c.model.train_attention = "blockwise"
    c.policy.mode = "full"
    c.mesh.data = 1
    c.mesh.fsdp = -1                # ZeRO-3 style: parameters and optimizer state over all chips

    # As the authors: train on 512 of the 933 AIME 1983-2024 problems drawn with seed 42 (the same
    # 512; the run records their ids in <workdir>/data_selection.json), evaluate on AIME 2025 and
    # the 32 AMC problems (not on their aime_eval_32: it shares problems with the training pool).
    c.data.train = {"source": "math_files", "files": [
        {"path": "data/paper/AIME_1983_2024.json", "task_type": "aime",
         "select_count": 512, "select_seed": 42}]}
    c.data.eval = {"source": "math_files", "files": [
        {"path": "data/paper/aime_2025.json", "task_type": "aime2025"},
        {"path": "data/paper/amc_eval_32.json", "task_type": "amc"}]}
    c.coach.backend = "gemini"
    c.coach.model = "gemini-2.5-flash"

    for agent in c.topology.agents.values():
        agent.max_new_tokens = 4096
    c.topology.max_prompt_tokens = 24576
    c.sampler.generation_buckets = (4096,)
    c.sampler.batch_buckets = (16, 32)  # larger calls are split: 32 rows of 28k-token KV cache per call

    c.rl.learning_rate = 1e-6
    c.rl.train_batch_size = 16
    c.rl.micro_batch_size = 4
    c.train.steps = 128
    c.train.tasks_per_step = 32
    c.train.samples_per_task = 2
    c.train.eval_every = 16
    c.train.eval_samples = 4
    c.train.eval_temperature = 0.6
    # The Code Executor's snippets: arithmetic and sympy, seconds each; 64 episodes run at once.
    c.train.sandbox_wall_timeout_s = 60.0
    c.train.sandbox_cpu_time_s = 60
    c.train.sandbox_memory_mb = 2048
    c.train.sandbox_total_memory_mb = 4096
    c.train.sandbox_max_processes = 32
    c.train.sandbox_workspace_mb = 256
    return c
