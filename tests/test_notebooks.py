"""Both notebooks execute headless (nbclient) in their tiny, offline mode, on a small
corpus."""

import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> str:
    """A small corpus, checksums off: on WikiText-2 (33,278 words) the tiny mode took
    2.6 times as long (the quickstart: 86 s against 33 s, cold compilation caches);
    reading the real corpus is tested in test_data.py."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "valid", "test"):
        (corpus / f"{split}.txt").write_text(" the cat sat on the mat \n a dog sat \n" * 200)
    monkeypatch.setenv("EE_JAX_VERIFY_CHECKSUMS", "0")
    return str(corpus)


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_wikitext2_early_exit.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch, data_dir):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # Committed without outputs: the notebooks are for running, not for reading stale results.
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    # The kernel inherits the suite's compiler settings (conftest): in tiny mode the
    # notebooks compile far longer than they compute.
    monkeypatch.setenv("EE_JAX_NOTEBOOK_MODE", "tiny")
    monkeypatch.setenv("EE_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("EE_JAX_DATA_DIR", data_dir)
    prompt = "the cat sat"  # the small corpus has neither "The game was" nor "<unk>"
    monkeypatch.setenv("EE_JAX_NOTEBOOK_PROMPT", prompt)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
    text = "".join(
        str(output.get("text", "")) for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert "Traceback" not in text
    if name.startswith("02"):
        assert "identical: True" in text and "| softmax_max |" in text
        # The generation cell: the 4 prompt words, then 8 new words with exit depths.
        assert re.search(r"(\S+ ){4}(\S+\[\d\] ){7}\S+\[\d\]", text), text[-2000:]
    if name.startswith("01"):
        assert "halting FLOPs" in text and "blocks run" in text, text[-2000:]
        # The generation cell: the prompt, then at least one new word with its exit depth.
        assert re.search(re.escape(prompt) + r"( \S+\[\d\])+\n", text), text[-2000:]
