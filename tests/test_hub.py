"""Model card rendering and `push_to_hub`, with the Hub mocked only at its HTTP-calling methods."""

import huggingface_hub
import pytest
import torch
from conftest import FIXTURES
from huggingface_hub import CommitOperationAdd

from fastinst_hf.cli import main as cli_main
from fastinst_hf.hub.model_card import render_model_card
from fastinst_hf.releases import variant_config


@pytest.fixture
def fake_hub(monkeypatch):
    """Records what would be sent: `create_repo` and `create_commit` are where HfApi talks to the network."""
    calls = {"repos": [], "commits": []}

    def create_repo(self, repo_id, **kwargs):
        calls["repos"].append(repo_id)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, commit_message, **kwargs):
        files = {}
        for operation in operations:
            assert isinstance(operation, CommitOperationAdd)
            content = operation.path_or_fileobj
            files[operation.path_in_repo] = content if isinstance(content, bytes) else open(content, "rb").read()
        calls["commits"].append({"repo_id": repo_id, "files": files, "message": commit_message})
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0",
            commit_message=commit_message,
            commit_description="",
            oid="0" * 40,
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    return calls


def test_model_card_for_an_official_variant():
    card = render_model_card(
        variant_config("fastinst-d3-r50-vd-dcn"),
        "me/fastinst-d3",
        variant="fastinst-d3-r50-vd-dcn",
        num_values=34_800_000,
    )
    assert card.startswith("---\nlibrary_name: transformers\nlicense: mit\npipeline_tag: image-segmentation")
    assert "fastinst_R50-vd-dcn_ppm-fpn_x3_640_40.1.pth" in card and "40.1" in card
    assert "deformable convolutions in res4, res5" in card and "34.80M" in card
    assert 'pipeline("image-segmentation", model="me/fastinst-d3"' in card
    assert "$" not in card.replace("$$", "")


def test_converter_push_to_hub_sends_one_complete_commit(tmp_path, fake_hub):
    variant = FIXTURES / "d1_r50slim_small"
    code = cli_main(
        [
            "convert",
            "--checkpoint",
            str(variant / "model_state_dict.pt"),
            "--config",
            str(variant / "config.yaml"),
            "--output-dir",
            str(tmp_path / "out"),
            "--push-to-hub",
            "someone/fastinst-slim",
        ]
    )
    assert code == 0
    assert fake_hub["repos"] == ["someone/fastinst-slim"]
    (commit,) = fake_hub["commits"]
    files = commit["files"]
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "modeling_fastinst.py",
        "configuration_fastinst.py",
        "configuration_fastinst_resnet_vd.py",
        "image_processing_fastinst.py",
        "mask_resizing_fastinst.py",
    ):
        assert name in files, name
    assert b"someone/fastinst-slim" in files["README.md"]
    metadata = huggingface_hub.ModelCard(files["README.md"].decode()).data
    assert metadata.license == "mit" and metadata.pipeline_tag == "image-segmentation"
    # The pushed weights are the converted ones.
    from safetensors.torch import load

    pushed = load(files["model.safetensors"])
    assert torch.equal(
        pushed["model.position_embedding"],
        torch.load(variant / "model_state_dict.pt", weights_only=True)["sem_seg_head.predictor.meta_pos_embed"],
    )
    assert (tmp_path / "out" / "README.md").read_text() == files["README.md"].decode()
