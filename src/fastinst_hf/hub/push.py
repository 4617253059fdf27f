"""Pushing a FastInst model with its processor and model card to the Hugging Face Hub in one commit."""

import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi

from .model_card import render_model_card


def push_model_to_hub(
    model,
    processor,
    repo_id: str,
    model_card: str | None = None,
    variant: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload FastInst model",
) -> str:
    """Push model (safetensors + code files for `trust_remote_code`), processor and model card in one commit.

    Returns the commit URL.
    """
    if model_card is None:
        num_values = sum(t.numel() for t in model.state_dict().values())
        model_card = render_model_card(model.config, repo_id, variant=variant, num_values=num_values)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        (Path(folder) / "README.md").write_text(model_card)
        operations = [
            CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
            for path in sorted(Path(folder).iterdir())
        ]
        commit = api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)
    return commit.commit_url
