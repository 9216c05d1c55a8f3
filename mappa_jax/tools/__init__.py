"""Sandboxed execution of model-written Python and per-episode workspaces.

    sandbox = Sandbox(SandboxConfig(wall_timeout_s=30))
    print(sandbox.describe())                       # which isolation backend, for the logs
    workspace = Workspace.create(root, episode_id)  # shared by the episode's agents
    workspace.copy_in({"train.csv": path}, forbidden=[hidden_answers])
    result = await sandbox.run_cells(extract_code_cells(action_text), workspace)
"""
from mappa_jax.tools.backends import SandboxUnavailableError
from mappa_jax.tools.cells import extract_code_cells, strip_thinking
from mappa_jax.tools.config import SandboxConfig, sandbox_config_from
from mappa_jax.tools.sandbox import ExecResult, Sandbox
from mappa_jax.tools.workspace import Workspace, WorkspaceDiff

__all__ = [
    "ExecResult", "Sandbox", "SandboxConfig", "SandboxUnavailableError", "Workspace",
    "WorkspaceDiff", "extract_code_cells", "sandbox_config_from", "strip_thinking",
]
