"""The paper's MathChat run with DeepSeek-R1-Distill-Qwen-1.5B agents (Qwen2 architecture); the
rest as configs/mathchat_qwen3_4b.py."""
import pathlib

from mappa_jax.config import config_from_file


def get_config():
    c = config_from_file(pathlib.Path(__file__).with_name("mathchat_qwen3_4b.py"))
    c.workdir = "runs/mathchat_r1_distill_1p5b"
    c.model.source = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    return c
