"""`examples/push_hyperparameters.py`: uploads a saved outer-parameter folder with its card (patched HfApi)."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from repo_scripts import load

from hf_integration import DataWeights, LoraRegularization, hub

push_hyperparameters = load("examples/push_hyperparameters.py")


def _patched_upload(captured: dict):
    def upload_folder(**kwargs):
        folder = kwargs["folder_path"]
        captured["files"] = sorted(os.listdir(folder))
        captured["card"] = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
        captured["kwargs"] = kwargs
        return mock.Mock(commit_url="https://huggingface.co/me/x/commit/1", pr_url=None)
    return upload_folder


@pytest.mark.parametrize("kind", ["data_weights", "lora_regularization"])
def test_push_saved_folder(kind, tmp_path, capsys):
    if kind == "data_weights":
        module = DataWeights(7)
        with torch.no_grad():
            module.logits.copy_(torch.linspace(-2, 2, 7))
    else:
        module = LoraRegularization(["layer.0.q", "layer.1.q"], granularity="module")
    module.save_pretrained(str(tmp_path), metadata={"method": "nystrom", "steps": 150})
    captured: dict = {}
    with mock.patch.object(hub, "HfApi") as api_cls:
        api_cls.return_value.create_repo.return_value = mock.Mock(repo_id="me/x")
        api_cls.return_value.upload_folder.side_effect = _patched_upload(captured)
        url = push_hyperparameters.main(["--outer_params_dir", str(tmp_path), "--repo_id", "me/x", "--private",
                                         "--metadata", "test_accuracy=0.97", "--token", "hf_test"])
    assert url == "https://huggingface.co/me/x/commit/1"
    assert api_cls.return_value.create_repo.call_args.kwargs["private"] is True
    assert captured["files"] == ["README.md", "outer_config.json", "outer_params.safetensors"]
    assert captured["kwargs"]["repo_id"] == "me/x"
    cls_name = type(module).__name__
    assert f'{cls_name}.from_pretrained("me/x")' in captured["card"]
    assert "test_accuracy" in captured["card"] and "nystrom" in captured["card"]  # new and saved metadata
    assert f'{cls_name}.from_pretrained("me/x")' in capsys.readouterr().out


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"has no outer_params.safetensors"):
        push_hyperparameters.main(["--outer_params_dir", str(tmp_path), "--repo_id", "me/x"])


def test_bad_metadata_item(tmp_path):
    DataWeights(3).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"--metadata 'oops': expected key=value"):
        push_hyperparameters.main(["--outer_params_dir", str(tmp_path), "--repo_id", "me/x", "--metadata", "oops"])


def test_a_reserved_metadata_key_is_refused_before_the_hub_is_asked_anything(tmp_path):
    """`--metadata kind=x` used to create the Hub repo and only then be refused."""
    DataWeights(3).save_pretrained(str(tmp_path))
    with mock.patch.object(hub, "HfApi") as api_cls, \
            pytest.raises(ValueError, match=r"metadata key 'kind' is reserved"):
        push_hyperparameters.main(["--outer_params_dir", str(tmp_path), "--repo_id", "me/x", "--metadata", "kind=x",
                                   "--token", "hf_test"])
    assert not api_cls.called  # no repo created
    with mock.patch.object(hub, "HfApi") as api_cls, pytest.raises(ValueError, match=r"reserved"):
        DataWeights(3).push_to_hub("me/x", metadata={"format": "x"}, token="hf_test")  # the library call, too
    assert not api_cls.called
