"""The embedded demo (README's first command): SmolLM2-135M-Instruct as all three MathChat agents,
each with its own LoRA adapter over one frozen base, the offline rule-based coach, and synthetic
arithmetic word problems with a held-out evaluation set. Sized for 15 minutes on 2 quiet CPU
cores; `--config.train.steps=40` is the longer setting."""
from mappa_jax.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/demo"
    c.model.source = "smollm2"
    c.policy.lora_rank = 8
    c.policy.lora_alpha = 16.0
    c.policy.lora_targets = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")

    c.data.train = {"source": "synthetic", "arithmetic_count": 256, "difficulty": 1, "seed": 0}
    c.data.eval = {"source": "synthetic", "arithmetic_count": 24, "difficulty": 1, "seed": 1}
    c.coach.backend = "rule_based"
    c.coach.model = "rule-based"

    # A 135M model copies a format it has seen answered far more reliably than one it is told
    # about (ENV_FACTS: told to box its answer it boxes 0 % of replies; after one worked chat turn,
    # 100 %), so each agent gets a one-line instruction and one worked turn (`examples`). The
    # arithmetic is what it gets wrong: the Code Executor's Python supplies it, and the Verifier
    # states the printed number, so the team is right when the program is.
    problem = ("Bo buys 3 pens at 2 dollars each and pays with 10 dollars. How many dollars of change "
               "does Bo get back?")
    agents = c.topology.agents
    agents.problem_solver.instructions = "Solve the math word problem. Give the final number as \\boxed{N}."
    agents.problem_solver.examples = ((problem, "10 - 3 * 2 = 4, so the answer is \\boxed{4}."),)
    agents.code_executor.instructions = ("Write one line of Python in a ```python code block that prints "
                                         "the answer.")
    agents.code_executor.examples = ((problem, "```python\nprint(10 - 3 * 2)\n```"),)
    # It writes its program from the problem alone: shown the Problem Solver's reply, it copies that
    # reply's (usually wrong) arithmetic into the code (held-out accuracy 0.042 then, 0.167 this way).
    agents.code_executor.upstream_text = "none"
    agents.verifier.instructions = ("Reply with only the number the Code Executor's program printed, "
                                    "as \\boxed{N}.")
    agents.verifier.examples = ((problem + "\n\n# Work of the agents before you\n\n## Code Executor\n"
                                 "```python\nprint(10 - 3 * 2)\n```\n\n[Execution result]\nYour code finished with "
                                 "exit status 0.\nOutput:\n4", "\\boxed{4}"),)
    # Its samples at temperature 1 are mostly incoherent: the demo samples at 0.7, evaluates greedily.
    for agent in agents.values():
        agent.temperature = 0.7
    # One code turn: the Verifier reads the program's output (a second turn would only restate it).
    agents.code_executor.max_turns = 1
    agents.problem_solver.max_new_tokens = 48
    agents.code_executor.max_new_tokens = 48
    agents.verifier.max_new_tokens = 24
    c.topology.max_tool_output_chars = 200   # a traceback's head and tail; keeps prompts in one bucket
    c.topology.max_prompt_tokens = 384
    # One shape per dimension, so every agent, turn, rollout and eval reuses the same compiled
    # programs (one prefill, one decode, one logprob and one update program): 24 rows = 4 tasks x 6
    # samples in training, the 24 held-out problems in eval; the longest prompt (the Verifier's,
    # with its worked turn, two 48-token replies and the program's output) stays under 384.
    c.sampler.batch_buckets = (24,)
    c.sampler.prompt_buckets = (384,)
    c.sampler.generation_buckets = (48,)

    c.rl.learning_rate = 3e-4       # LoRA adapters take a far larger step than full finetuning's 1e-6
    c.rl.warmup_ratio = 0.0
    c.rl.train_batch_size = 12      # two optimizer steps per agent per step; 24 rows = one update shape
    c.rl.micro_batch_size = 6
    c.rl.old_logprobs = "sampler"   # the behaviour policy is what sampled; the trainer gap is still logged

    c.train.steps = 6
    c.train.tasks_per_step = 4
    c.train.samples_per_task = 6    # a group of 6 per problem: REINFORCE++'s baseline has spread
    c.train.eval_every = 0
    c.train.eval_samples = 1
    c.train.eval_temperature = 0.0  # greedy held-out accuracy: comparable before and after
    c.train.checkpoint_every = 3
    c.train.sandbox_wall_timeout_s = 20.0
    c.train.sandbox_memory_mb = 1024
    return c
