"""configs/tiny.py with training problems whose coach score is written in their text ([[score:N]])
and the loopback coach (mappa_jax.coach.testing.FakeCoachServer) that answers with it, so rewards
differ between problems and a run's updates are not trivially zero. Shared by the training tests."""
import json
import pathlib

TINY_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def write_scored_tiny_config(root: pathlib.Path, coach_url: str, scores, name: str) -> pathlib.Path:
    from mappa_jax.models import hub, weights
    tokenizer_dir = root / "tokenizer"  # SmolLM2's tokenizer as a directory: runs skip the GGUF
    weights.load_tokenizer(hub.smollm2_gguf_path()).save_pretrained(tokenizer_dir)
    (tokenizer_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    problems = root / "problems.jsonl"
    problems.write_text("".join(
        json.dumps({"id": f"p{i}", "problem": f"What is {i + 2} + {3 * i + 1}? [[score:{score}]]",
                    "answer": str(4 * i + 3)}) + "\n" for i, score in enumerate(scores)))
    config_file = root / name
    config_file.write_text(f'''"""configs/tiny.py with scored problems and the loopback coach."""
from mappa_jax.config import config_from_file


def get_config():
    c = config_from_file({str(TINY_CONFIG)!r})
    c.model.tokenizer = {str(tokenizer_dir)!r}
    c.data.train = {{"source": "math_files",
                    "files": [{{"path": {str(problems)!r}, "task_type": "arithmetic"}}]}}
    c.coach.backend = "openai"
    c.coach.model = "loopback-coach"
    c.coach.openai.base_url = {coach_url + "/v1"!r}
    c.coach.openai.api_key_env = ""
    return c
''')
    return config_file
