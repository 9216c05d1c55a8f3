"""The embedded demo (README's first command): SmolLM2-135M-Instruct as all three MathChat agents,
each with its own LoRA adapter over one frozen base, the offline rule-based coach, and synthetic
arithmetic word problems with a held-out evaluation set. About 11-12 minutes on 2 quiet CPU cores
(measured: README); `--config.train.steps=40` is the longer setting."""
from mappa_jax.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/demo"
    c.model.source = "smollm2"
    c.policy.lora_rank = 8
    c.policy.lora_alpha = 16.0
    c.policy.lora_targets = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")

    # One problem family (change from a purchase: paid - count x price), the one the worked turns show:
    # SmolLM2-135M's Code Executor writes the right program for some of them untrained and for
    # almost none of the sharing family (have - each x friends + bought) that difficulty 1 also holds.
    family = {"source": "synthetic", "difficulty": 1, "templates": ("change",)}
    c.data.train = {**family, "arithmetic_count": 256, "seed": 0}
    c.data.eval = {**family, "arithmetic_count": 32, "seed": 1}
    c.coach.backend = "rule_based"
    c.coach.model = "rule-based"
    # The rule-based coach checks arithmetic only against the answer, so every role gets it; an LLM
    # coach (coach.backend="gemini") judges a program's arithmetic in context, as the paper's does.
    c.coach.ground_truth_roles = ("problem_solver", "code_executor", "verifier")

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
    # The Verifier reads the program's output only (not the agents' texts, whose numbers it would copy).
    agents.verifier.upstream_text = "none"
    agents.verifier.instructions = "Reply with only the number the program printed, as \\boxed{N}."
    agents.verifier.examples = ((problem + "\n\n# Work of the agents before you\n\n## Code Executor\n"
                                 "[Execution result]\nYour code finished with exit status 0.\nOutput:\n4",
                                 "\\boxed{4}"),)
    # Its samples at temperature 1 are mostly incoherent: the demo samples at 0.7, evaluates greedily.
    for agent in agents.values():
        agent.temperature = 0.7
    # One code turn: the Verifier reads the program's output (a second turn would only restate it).
    agents.code_executor.max_turns = 1
    agents.problem_solver.max_new_tokens = 48
    agents.code_executor.max_new_tokens = 48
    agents.verifier.max_new_tokens = 24
    c.topology.max_tool_output_chars = 80    # a traceback's last lines; keeps prompts in one bucket
    c.topology.max_prompt_tokens = 192
    # Few shapes, each met early and reused by every agent, rollout and eval: 4 distinct prompts are
    # prefilled per training call (their 16 rows = 4 problems x 4 samples share the prefill), 16 rows
    # decode; the Problem Solver's and Code Executor's prompts fit 144 tokens, the Verifier's (its
    # worked turn plus the program's output) 192; 48 new tokens. Compiling is ~7 % of a fresh run.
    c.sampler.batch_buckets = (4, 16)
    c.sampler.prompt_buckets = (144, 192)
    c.sampler.generation_buckets = (48,)

    c.rl.learning_rate = 5e-4       # LoRA adapters take a far larger step than full finetuning's 1e-6:
                                    # 10 optimizer steps per agent in the whole run (1e-3 overshoots:
                                    # held-out 0.281 / 0.094 at seeds 0 / 1, against 0.969 / 0.250 here)
    c.rl.warmup_ratio = 0.0
    c.rl.train_batch_size = 8       # two optimizer steps per agent per step; 16 rows = one update shape
    c.rl.micro_batch_size = 8
    c.rl.old_logprobs = "sampler"   # the behaviour policy is what sampled; the trainer gap is still logged
    c.rl.kl_coef = 0.0              # no KL term: the step skips the reference forward (a third of an update)

    c.train.steps = 5
    c.train.tasks_per_step = 4
    c.train.samples_per_task = 4    # a group of 4 per problem: REINFORCE++'s baseline has spread
    c.train.eval_every = 0
    c.train.eval_samples = 1
    c.train.eval_temperature = 0.0  # greedy held-out accuracy: comparable before and after
    c.train.checkpoint_every = 2
    c.train.sandbox_wall_timeout_s = 20.0
    c.train.sandbox_memory_mb = 1024
    return c
