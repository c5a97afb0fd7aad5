"""The README's Python examples run as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


# the tutorials whose Python blocks run in order as one program (cli.md trains for minutes and
# writes files; the others hold fragments)
RUNNABLE_DOCS = [
    "diffusion.md",
    "cnf.md",
    "brownian.md",
    "migrating_torchsde.md",
    "cde.md",
    "sde.md",
    "events.md",
    "stiff.md",
    "sequence.md",
    "regularisation.md",
]


@pytest.mark.parametrize("name", RUNNABLE_DOCS)
def test_tutorial_python_blocks_run(name, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    text = (ROOT / "docs" / name).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    namespace = {}
    try:
        for code in blocks:
            exec(compile(code, f"docs/{name}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
