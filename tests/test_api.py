"""The package's public names, `ee_jax.load_run`, and an import without side effects."""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_markov_corpus

import ee_jax
from ee_jax import train as train_lib
from ee_jax.checkpoint import CheckpointError
from ee_jax.config import train_preset
from ee_jax.data import encode_text, load_wikitext2, make_lm_stream
from ee_jax.model import EarlyExitLM

REPO = pathlib.Path(__file__).resolve().parents[1]

# Imports ee_jax and every public name in a fresh process; prints what changed.
IMPORT_SCRIPT = """
import json, sys
import jax
before = dict(jax.config.values)
import ee_jax
after_import = dict(jax.config.values)
for name in ee_jax.__all__:
    getattr(ee_jax, name)
after_names = dict(jax.config.values)
def changed(after):
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
cache = ee_jax.enable_compilation_cache()
print(json.dumps({
    "changed_by_import": changed(after_import),
    "changed_by_names": changed(after_names),
    "changed_by_cache": changed(dict(jax.config.values)),
    "cache": str(cache),
    "cache_setting": jax.config.jax_compilation_cache_dir,
}))
"""


def test_import_changes_no_jax_setting_and_cache_defaults_to_the_user_folder(tmp_path):
    # Given a fresh process whose home is tmp_path, without cache variables.
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    env.pop("EE_JAX_CACHE_DIR", None)
    env.pop("XDG_CACHE_HOME", None)
    # When it imports ee_jax, then every public name, then enables the cache.
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # Then neither import changed a JAX setting; only enable_compilation_cache did,
    # pointing at ~/.cache/ee_jax/jax (created), not at the package's folder.
    assert report["changed_by_import"] == []
    assert report["changed_by_names"] == []
    expected = tmp_path / ".cache" / "ee_jax" / "jax"
    assert report["cache"] == report["cache_setting"] == str(expected.resolve())
    assert expected.is_dir()
    assert "jax_compilation_cache_dir" in report["changed_by_cache"]
    package = pathlib.Path(ee_jax.__file__).resolve().parent
    assert package not in expected.resolve().parents


@pytest.mark.parametrize(
    "given, opt_out, expected",
    [
        (None, None, list(ee_jax.CPU_XLA_FLAGS)),
        (
            "--xla_force_host_platform_device_count=2 --xla_cpu_use_fusion_emitters=true",
            None,
            [
                "--xla_force_host_platform_device_count=2",
                "--xla_cpu_use_fusion_emitters=true",  # the user's own value stays
                "--xla_cpu_parallel_codegen_split_count=1",
            ],
        ),
        (
            "--xla_force_host_platform_device_count=2",
            "0",
            ["--xla_force_host_platform_device_count=2"],
        ),
    ],
)
def test_import_adds_the_cpu_compiler_flags_unless_set_or_opted_out(given, opt_out, expected):
    # Given a fresh process with these XLA_FLAGS and EE_JAX_CPU_XLA_FLAGS, when it
    # imports ee_jax (and nothing else), then XLA_FLAGS holds exactly the expected flags.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "EE_JAX_CPU_XLA_FLAGS")}
    env.update({"XLA_FLAGS": given} if given is not None else {})
    env.update({"EE_JAX_CPU_XLA_FLAGS": opt_out} if opt_out is not None else {})
    script = "import os, ee_jax; print(os.environ.get('XLA_FLAGS', ''))"
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert run.stdout.split() == expected


def test_the_cpu_compiler_flags_wait_for_a_jaxlib_they_were_measured_with(monkeypatch):
    # XLA aborts on an unknown flag: another jaxlib release gets none of them.
    from importlib import metadata

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setattr(metadata, "version", lambda name: "0.11.0")
    assert ee_jax.use_cpu_xla_flags() == "--xla_force_host_platform_device_count=2"
    monkeypatch.setattr(metadata, "version", lambda name: "0.10.7")
    assert ee_jax.use_cpu_xla_flags().split()[1:] == list(ee_jax.CPU_XLA_FLAGS)


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EE_JAX_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert ee_jax.user_cache_dir() == tmp_path / "home" / ".cache" / "ee_jax" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ee_jax.user_cache_dir() == tmp_path / "xdg" / "ee_jax" / "jax"
    monkeypatch.setenv("EE_JAX_CACHE_DIR", str(tmp_path / "chosen"))
    assert ee_jax.user_cache_dir() == tmp_path / "chosen"


def test_public_names_are_the_modules_objects():
    # Every exported name is the object its module defines (not a copy or wrapper).
    for name, module in ee_jax._EXPORTS.items():
        assert getattr(ee_jax, name) is getattr(importlib.import_module(f"ee_jax.{module}"), name)
    # The rest of __all__ is defined in the package itself (no lazy import behind it).
    own = set(ee_jax.__all__) - set(ee_jax._EXPORTS)
    assert {"enable_compilation_cache", "use_cpu_xla_flags"} <= own
    assert ee_jax._EXPORTS["load_run"] == "run"
    assert all(name in vars(ee_jax) for name in own), own - set(vars(ee_jax))
    assert set(ee_jax._EXPORTS) <= set(ee_jax.__all__)
    assert set(ee_jax.__all__) <= set(dir(ee_jax))
    # A module name still means the module.
    from ee_jax import train

    assert train is train_lib and callable(train.train)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        ee_jax.not_a_name  # noqa: B018


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> pathlib.Path:
    return write_markov_corpus(tmp_path_factory.mktemp("markov"), 200)


def test_load_run_needs_nothing_but_the_run_folder(corpus_dir, tmp_path, monkeypatch):
    # Given the tiny preset trained a few steps on a custom corpus.
    data_cache = tmp_path / "data_cache"
    corpus = load_wikitext2(corpus_dir, cache_dir=data_cache, verify_checksums=False)
    config = train_preset("tiny", len(corpus.vocab)).replace(
        steps=4, warmup_steps=1, checkpoint_every=2
    )
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=0)
    state = train_lib.train(config, stream, tmp_path / "run", vocab=corpus.vocab, progress=False)
    # When ee_jax.load_run loads it (latest step, and step 2) with no corpus anywhere.
    monkeypatch.delenv("EE_JAX_DATA_DIR", raising=False)
    for module in ("ee_jax.data", "ee_jax.data.corpus", "ee_jax.cli"):
        monkeypatch.setattr(f"{module}.load_wikitext2", None)  # any use would fail
    run = ee_jax.load_run(tmp_path / "run")
    earlier = ee_jax.load_run(tmp_path / "run", step=2)
    model, variables = run.model, run.variables
    # Then it has the run's config, vocabulary and step, and its forward equals the
    # trained state's.
    assert run.config == earlier.config == config and (run.step, earlier.step) == (4, 2)
    assert run.vocab.words == corpus.vocab.words
    tokens = jnp.asarray(corpus.valid[: 2 * config.model.n_seq].reshape(2, -1))  # [B, N]
    trained = EarlyExitLM(config.model).apply(state.params, tokens)  # [B, N, V]
    fresh = EarlyExitLM(config.model).apply(train_lib.init_state(config).params, tokens)
    got = model.apply(variables, tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(trained))
    assert not np.allclose(got, fresh, atol=1e-3)  # the trained weights, not initial ones
    # And a folder without its vocabulary is refused, naming the file.
    (tmp_path / "run" / "vocab.txt").unlink()
    with pytest.raises(CheckpointError, match="vocab.txt not found"):
        ee_jax.load_run(tmp_path / "run")


WORDS = ("<eos>", "<unk>", "the", "Japan", "game", "'s", "U.S.", "well", "@-@", "known", "1")
WORDS += ("@,@", "000", ".", ",", "(", ")", '"', "don", "'t", "@.@", "5", "...")


@pytest.mark.parametrize(
    "text, words, unknown",
    [
        ("the game's", ["the", "game", "'s"], {}),
        ("well-known (U.S.)", ["well", "@-@", "known", "(", "U.S.", ")"], {}),
        (
            '1,000 1.5 "don\'t."',
            ["1", "@,@", "000", "1", "@.@", "5", '"', "don", "'t", ".", '"'],
            {},
        ),
        ("the\ngame...", ["the", "<eos>", "game", "..."], {}),
        ("japan", ["<unk>"], {"japan": "did you mean 'Japan'? (the corpus is case-sensitive)"}),
        ("zebra,", ["<unk>", ","], {"zebra": None}),
    ],
)
def test_encode_text_follows_the_corpus_rules(text, words, unknown):
    # Given a vocabulary of WikiText-2-style tokens.
    vocab = ee_jax.Vocabulary(WORDS)
    # When plain text is encoded.
    encoded = encode_text(text, vocab)
    # Then its tokens are the corpus's, unknown words <unk> with a hint where case is why.
    assert encoded.words == words
    assert encoded.unknown == unknown
    np.testing.assert_array_equal(encoded.ids, [WORDS.index(w) for w in words])


# One forward of a model with a [B, N, V] = 136 MB output, called repeatedly; prints
# the minor page faults of one call (glibc's default: the output's pages fault anew).
FAULT_SCRIPT = """
import os, resource, sys
os.environ["EE_JAX_KEEP_FREED_MEMORY"] = sys.argv[1]
import ee_jax
kept = sys.argv[1] != "0"
import jax, jax.numpy as jnp
from ee_jax.config import ModelConfig
from ee_jax.model import EarlyExitLM
model = EarlyExitLM(ModelConfig(vocab_size=33278, d_model=16, n_layers=1, bk_heads=2))
tokens = jnp.zeros((8, 128), jnp.int32)
variables = model.init(jax.random.key(0), tokens)
forward = jax.jit(model.apply)
for _ in range(3):
    jax.block_until_ready(forward(variables, tokens))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    jax.block_until_ready(forward(variables, tokens))
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def test_importing_ee_jax_stops_page_faults_on_every_fresh_output_unless_opted_out():
    # Given a forward whose [B, N, V] output is freed and allocated again every call,
    # without any GLIBC_TUNABLES (as a script importing ee_jax runs).
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

    def faults(mode):
        run = subprocess.run(
            [sys.executable, "-c", FAULT_SCRIPT, mode],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            cwd=REPO,
        )
        kept, count = run.stdout.split()
        return kept == "True", float(count)

    # When a script imports ee_jax and calls nothing, and one opts out first.
    (_, default), (kept, keep) = faults("0"), faults("1")
    # Then importing made calls mostly reuse mapped pages: the default
    # faults the output's 33k pages of 4 KiB (and a temporary's) on every call; kept,
    # a call faults only when XLA frees the last output after the next allocation
    # (measured 0 to 20k a call on a loaded machine, 66k by default).
    assert kept and ee_jax.keep_freed_memory()  # glibc accepts the settings
    assert default > 30_000, default
    assert keep < default / 2, (keep, default)


def test_the_cpu_compiler_flags_keep_the_users_xla_flags_as_written(monkeypatch):
    from importlib import metadata

    # Given XLA_FLAGS with a quoted value holding two spaces and text that looks like a
    # flag, and one of the CPU flags set by the user.
    given = "--xla_dump_to='/tmp/a  b --xla_cpu_parallel_codegen_split_count=9'  "
    given += "--xla_cpu_use_fusion_emitters=true"
    monkeypatch.setenv("XLA_FLAGS", given)
    # When the measured jaxlib adds its flags, then the user's string is the exact
    # prefix, followed only by the flag it does not set (the quoted one is a value).
    monkeypatch.setattr(metadata, "version", lambda name: "0.10.7")
    result = ee_jax.use_cpu_xla_flags()
    assert result == os.environ["XLA_FLAGS"]
    assert result.startswith(given)
    assert result[len(given) :].split() == ["--xla_cpu_parallel_codegen_split_count=1"]
    # And another jaxlib leaves the string exactly as it is.
    monkeypatch.setenv("XLA_FLAGS", given)
    monkeypatch.setattr(metadata, "version", lambda name: "0.11.0")
    assert ee_jax.use_cpu_xla_flags() == os.environ["XLA_FLAGS"] == given


def test_load_run_refuses_a_vocab_txt_that_is_not_the_runs(corpus_dir, tmp_path):
    # Given a tiny run trained on a custom corpus (V words, recorded with their sha256).
    corpus = load_wikitext2(corpus_dir, cache_dir=tmp_path / "cache", verify_checksums=False)
    config = train_preset("tiny", len(corpus.vocab)).replace(
        steps=2, warmup_steps=1, checkpoint_every=2
    )
    stream = make_lm_stream(corpus.train, config.batch_size, config.model.n_seq, eos_id=0)
    run, words = tmp_path / "run", corpus.vocab.words
    train_lib.train(config, stream, run, vocab=corpus.vocab, progress=False)
    intact = (run / "vocab.txt").read_bytes()
    damaged = {
        "truncated": "\n".join(words[:-1]),
        "10 words short": "\n".join(words[:-10]),
        "20 words more": "\n".join(words + tuple(f"x{i}" for i in range(20))),
        "another run's order": "\n".join(words[1:] + words[:1]),
        "CRLF": "\r\n".join(words) + "\r\n",
        "CR": "\r".join(words),
    }
    # When vocab.txt is damaged or replaced, in a run with its checksum and in one
    # from before runs recorded it.
    for recorded in (True, False):
        if not recorded:
            (run / "vocab.sha256").unlink()
        assert ee_jax.load_run(run).vocab.words == words  # the intact file loads
        for name, text in damaged.items():
            if name == "another run's order" and not recorded:
                continue  # same size, no checksum: only a corpus can tell (test_train)
            named = "CR" if "\r" in text else "sha256" if recorded else "vocab_size"
            (run / "vocab.txt").write_bytes(text.encode())
            # Then load_run, alone and with the corpus, refuses it in one line
            # naming what is wrong, and the file stays as it was.
            for load in (
                lambda: ee_jax.load_run(run),
                lambda: ee_jax.load_run(run, vocab=corpus.vocab),
            ):
                with pytest.raises(CheckpointError) as caught:
                    load()
                message = str(caught.value)
                assert "\n" not in message and named in message and "vocab.txt" in message, (
                    name,
                    message,
                )
            assert (run / "vocab.txt").read_bytes() == text.encode()
        (run / "vocab.txt").write_bytes(intact)
