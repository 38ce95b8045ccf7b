"""Hub calls under a wall-clock deadline (``hub.hub_call``): a Hub that never answers, answers a byte a second
or answers 500 gives a one-line error in seconds, not the minutes of huggingface_hub's own retries.

Each test serves a fake Hub on 127.0.0.1 (threads, closed at the end) and points huggingface_hub at it, as
``HF_ENDPOINT`` would. The time bounds are generous (a loaded 2-core machine): far above the 2 s deadlines, far
below the minutes the same calls took without them (393 s measured with ``HF_HUB_ETAG_TIMEOUT=3``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
from huggingface_hub import constants

from hf_integration import DataWeights, LossWeights, hub

BOUND_S = 15.0  # for a 2 s deadline
REPO_ROOT = Path(__file__).resolve().parents[2]
DEADLINE_FIX = (r"the Hub does not answer or is too slow; check the connection, pass a larger {argument}, or use a "
                r"local folder \(or HF_HUB_OFFLINE=1 to load from the cache\)")


# ---------------------------------------------------------------------------------------- from_pretrained


@pytest.mark.parametrize("behaviour", ["hang", "drip", "500"])
def test_from_pretrained_gives_up_at_its_deadline(fake_hub, behaviour):
    server = fake_hub(behaviour)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        LossWeights.from_pretrained("user/repo", hub_timeout=2)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "\n" not in message
    assert re.fullmatch(r"could not load outer parameters from 'user/repo': no such local folder, and downloading "
                        r"outer_params\.safetensors from the Hub repo 'user/repo' \(revision=None\) did not finish "
                        r"within 2 s: " + DEADLINE_FIX.format(argument="hub_timeout"), message), message
    assert elapsed < BOUND_S, elapsed
    assert server.connections >= 1  # the request did reach the fake Hub


def test_the_default_deadline_follows_the_hub_timeouts_set_by_the_user(fake_hub, monkeypatch):
    fake_hub("hang")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)  # as HF_HUB_ETAG_TIMEOUT=1 HF_HUB_DOWNLOAD_TIMEOUT=1
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"did not finish within 2 s: .*raise HF_HUB_DOWNLOAD_TIMEOUT \(the "
                                                r"deadline is HF_HUB_ETAG_TIMEOUT \+ HF_HUB_DOWNLOAD_TIMEOUT\)"):
        LossWeights.from_pretrained("user/repo")
    assert time.monotonic() - start < BOUND_S


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "2"])
def test_a_bad_hub_timeout_is_refused_in_one_line(tmp_path, bad):
    LossWeights().save_pretrained(str(tmp_path))  # refused even where a local folder leaves it unused
    with pytest.raises(ValueError, match=r"^hub_timeout must be a finite number of seconds > 0 .*, got ") as info:
        LossWeights.from_pretrained(str(tmp_path), hub_timeout=bad)
    assert "\n" not in str(info.value)


def test_a_local_folder_loads_without_a_request(fake_hub, tmp_path):
    server = fake_hub("hang")
    LossWeights(init_loss_scale=2.0).save_pretrained("user/repo")  # a local folder shaped like a repo id (in cwd)
    assert LossWeights.from_pretrained("user/repo", hub_timeout=2).init_loss_scale == 2.0
    assert server.connections == 0


# ---------------------------------------------------------------------------------------- hub_call


def test_hub_call_returns_the_result():
    assert hub.hub_call(lambda: 42, what="answering", timeout=5) == 42
    assert hub.hub_call(lambda: None, what="nothing") is None  # the default deadline


def test_hub_call_reraises_the_same_exception():
    error = KeyError("missing")

    def fail():
        raise error

    with pytest.raises(KeyError) as info:
        hub.hub_call(fail, what="failing", timeout=5)
    assert info.value is error


def test_hub_call_times_out_and_leaves_a_daemon_thread():
    release = threading.Event()
    start = time.monotonic()
    with pytest.raises(hub.HubError) as info:
        hub.hub_call(lambda: release.wait(60), what="waiting for the test", timeout=0.5)
    assert time.monotonic() - start < BOUND_S
    assert re.fullmatch(r"waiting for the test did not finish within 0\.5 s: "
                        + DEADLINE_FIX.format(argument="timeout"), str(info.value))
    workers = [t for t in threading.enumerate() if t.name == "hub_call: waiting for the test"]
    assert len(workers) == 1 and workers[0].daemon and workers[0].is_alive()  # abandoned, cannot block the exit
    release.set()
    workers[0].join(timeout=10)
    assert not workers[0].is_alive()


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf"), False, "2"])
def test_hub_call_refuses_a_bad_timeout(bad):
    with pytest.raises(ValueError, match=r"^timeout must be a finite number of seconds > 0 ") as info:
        hub.hub_call(lambda: 1, what="x", timeout=bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^deadline_s must be "):
        hub.hub_call(lambda: 1, what="x", timeout=bad, argument="deadline_s")


def test_a_repo_creation_that_does_not_finish_is_abandoned_at_its_deadline(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.25)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.25)
    with mock.patch.object(hub, "HfApi") as api_cls:
        api_cls.return_value.endpoint = "https://hub.example"
        api_cls.return_value.create_repo.side_effect = lambda *args, **kwargs: release.wait(60)
        start = time.monotonic()
        with pytest.raises(hub.HubError) as info:
            hub.check_hub_repo("me/x", token="hf_x", repo_type="dataset")
        assert time.monotonic() - start < BOUND_S
    release.set()
    assert str(info.value) == ("cannot create or reach the Hub dataset repo 'me/x' at https://hub.example: no answer "
                               "within 0.5 s (HF_HUB_ETAG_TIMEOUT + HF_HUB_DOWNLOAD_TIMEOUT); check the connection "
                               "or raise HF_HUB_DOWNLOAD_TIMEOUT")


def test_an_upload_that_does_not_finish_is_abandoned_at_its_deadline(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(hub, "_upload_deadline", lambda folder, names: 0.5)
    with mock.patch.object(hub, "HfApi") as api_cls:
        api_cls.return_value.create_repo.return_value = mock.Mock(repo_id="me/x")
        api_cls.return_value.upload_folder.side_effect = lambda **kwargs: release.wait(60)
        start = time.monotonic()
        with pytest.raises(hub.HubError) as info:
            DataWeights(3).push_to_hub("me/x", token="hf_x")
        assert time.monotonic() - start < BOUND_S
    release.set()
    assert re.fullmatch(r"uploading to the Hub repo 'me/x' did not finish within 0\.5 s \(3 x \(HF_HUB_ETAG_TIMEOUT \+ "
                        r"HF_HUB_DOWNLOAD_TIMEOUT\) \+ 1 s per 100 kB\): the Hub does not answer or is too slow; "
                        r"check the connection or raise HF_HUB_DOWNLOAD_TIMEOUT \(the upload may still complete in "
                        r"the background\)", str(info.value)), str(info.value)


def test_a_weighted_dataset_push_that_does_not_finish_is_abandoned_at_its_deadline(monkeypatch):
    import datasets

    from hf_integration import weights_dataset

    release = threading.Event()
    monkeypatch.setattr(weights_dataset, "upload_deadline", lambda num_bytes: 0.5)
    table = datasets.Dataset.from_dict({"text": ["a", "b"], "weight": [0.5, 1.0]})
    with mock.patch.object(hub, "HfApi") as api_cls, mock.patch.object(weights_dataset, "HfApi"), \
            mock.patch("datasets.Dataset.push_to_hub", side_effect=lambda *args, **kwargs: release.wait(60)):
        api_cls.return_value.create_repo.return_value = mock.Mock(repo_id="me/weights")
        start = time.monotonic()
        with pytest.raises(hub.HubError, match=r"^uploading the weighted dataset to the Hub dataset repo 'me/weights' "
                                               r"did not finish within 0\.5 s"):
            weights_dataset.push_weights_dataset(table, "me/weights", card="# c", token="hf_x")
        assert time.monotonic() - start < BOUND_S
    release.set()


def test_the_upload_deadline_grows_with_the_hub_timeouts_and_the_size(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 10)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10)
    (tmp_path / "outer_params.safetensors").write_bytes(b"x" * 4_000_000)
    (tmp_path / "other.bin").write_bytes(b"x" * 1_000_000)  # not uploaded: not counted
    assert hub._upload_deadline(str(tmp_path), ["outer_params.safetensors", "README.md"]) == 60 + 40


# ---------------------------------------------------------------------------------------- check_hub_reachable


def test_check_hub_reachable_fails_fast_against_a_hanging_hub(fake_hub):
    server = fake_hub("hang")
    start = time.monotonic()
    with pytest.raises(hub.HubError) as info:
        hub.check_hub_reachable("user/repo", timeout=2)
    assert time.monotonic() - start < BOUND_S
    assert re.fullmatch(rf"reaching the Hub model repo 'user/repo' at {re.escape(server.url)} did not finish within "
                        r"2 s: " + DEADLINE_FIX.format(argument="timeout"), str(info.value)), str(info.value)
    assert server.connections >= 1


def test_check_hub_reachable_reports_a_failure_in_one_line(fake_hub):
    server = fake_hub("500")
    with pytest.raises(hub.HubError) as info:
        hub.check_hub_reachable("org/data", repo_type="dataset", timeout=10, what="the dataset 'org/data' (--dataset)")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot reach the dataset 'org/data' (--dataset) at {server.url}: ")
    assert "500" in message


def test_check_hub_reachable_makes_no_request_offline_or_for_a_local_folder(fake_hub, monkeypatch, tmp_path):
    server = fake_hub("hang")
    (tmp_path / "user" / "local").mkdir(parents=True)
    hub.check_hub_reachable("user/local", timeout=2)  # an existing local folder (cwd is tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.check_hub_reachable("user/repo", timeout=2)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hub.check_hub_reachable("org/data", repo_type="dataset", timeout=2)
    assert server.connections == 0


# ---------------------------------------------------------------------------------------- the process exits


def test_the_process_exits_promptly_after_a_timed_out_load(tmp_path):
    """The worker abandoned at the deadline is a daemon thread: it cannot keep the interpreter from exiting
    (without the deadline, the original failure also left a process that would not exit)."""
    script = textwrap.dedent("""
        import os, socket, time
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(64)  # accepts connections (the kernel completes them) and never answers
        os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{server.getsockname()[1]}"  # before huggingface_hub is imported
        from hf_integration import LossWeights
        start = time.monotonic()
        try:
            LossWeights.from_pretrained("user/repo", hub_timeout=2)
        except FileNotFoundError as err:
            print(f"{time.monotonic() - start:.2f}")
            print(err)
        print(time.time(), flush=True)  # then the interpreter exits, the worker still blocked in its request
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    env.update(HF_HUB_DISABLE_XET="1", HF_HUB_CACHE=str(tmp_path / "hub_cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    exited = time.time()
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3, result.stdout
    assert float(lines[0]) < BOUND_S
    assert "did not finish within 2 s" in lines[1]
    assert exited - float(lines[2]) < BOUND_S  # the process ended promptly once the script was done
