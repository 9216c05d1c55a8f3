"""The paper's data-science run: Qwen3-4B as Data Engineer -> Modeler -> Analyst on 64 DSBench
modelling tasks (34 regression, 30 classification; stratified batches), 6 held-out tasks x 4
trials, Gemini 2.5 Pro as coach, 16k tokens per action. Point data.train / data.eval at DSBench-format
task directories (see mappa_jax/data/dsbench.py). Needs GEMINI_API_KEY (or Vertex AI settings)."""
from mappa_jax.config import base_config
from mappa_jax.workflows import data_science_config


def get_config():
    c = base_config()
    c.workdir = "runs/datascience_qwen3_4b"
    c.model.source = "Qwen/Qwen3-4B"
    c.model.param_dtype = "float32"  # master weights and AdamW moments (the authors': DeepSpeed fp32 master)
    c.model.dtype = "bfloat16"        # compute, the reference and the sampler's copy
    c.model.train_remat = True
    c.model.train_attention = "blockwise"
    c.policy.mode = "full"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.topology = data_science_config()
    for agent in c.topology.agents.values():
        agent.max_new_tokens = 16384
    c.topology.max_prompt_tokens = 24576
    c.sampler.generation_buckets = (16384,)
    # Larger calls are split: 16 rows of 40k-token KV cache per call (32 rows with float32 master
    # weights would need ~74 GiB per device on 8 x 80 GiB by the memory check; 16 rows: ~55 GiB).
    c.sampler.batch_buckets = (16,)

    c.data.train = {"source": "dsbench", "tasks_root": "data/dsbench/train", "answers_root": "data/dsbench/answers"}
    c.data.eval = {"source": "dsbench", "tasks_root": "data/dsbench/heldout", "answers_root": "data/dsbench/answers"}
    c.coach.backend = "gemini"
    c.coach.model = "gemini-2.5-pro"
    c.coach.ground_truth_roles = ()
    c.train.steps = 84             # 21 epochs x 64 tasks / 16 tasks per step
    c.train.tasks_per_step = 16
    c.train.samples_per_task = 2
    c.train.eval_every = 4         # per-epoch-ish; the paper saw the held-out peak near epoch 10
    c.train.eval_samples = 4
    # Real model fitting on DSBench tables: a single-threaded fit may use the whole 600 s, a
    # pandas frame of a few GB must fit; 32 episodes at once, each workspace holds a task's data.
    c.train.sandbox_wall_timeout_s = 600.0
    c.train.sandbox_cpu_time_s = 600
    c.train.sandbox_memory_mb = 8192
    c.train.sandbox_total_memory_mb = 16384
    c.train.sandbox_max_processes = 64
    c.train.sandbox_workspace_mb = 4096
    return c
