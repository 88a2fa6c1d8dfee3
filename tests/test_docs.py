"""The Python examples in the README and docs/ run as written.

Each file's ```python blocks run in order in one namespace (later blocks may use
earlier names). Blocks that need hardware or a process group this machine
lacks are skipped by what they import, with the reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ["README.md", "docs/torch.md", "docs/flax.md", "docs/benchmarks.md", "docs/stability.md", "docs/cli.md",
         "docs/reference.md", "docs/schedule.md", "docs/sb3.md", "docs/transformers.md",
         "docs/lightning.md", "docs/optax.md", "docs/testing.md", "docs/equinox.md"]
NEEDS = {"cupy": "needs CuPy and a GPU", "init_process_group": "needs a process group (torchrun)", "fully_shard": "needs a process group (torchrun)"}


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("name", [f for f in FILES if (ROOT / f).exists()])
def test_python_examples_run(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    blocks = _blocks(ROOT / name)
    assert blocks, f"{name} has no python examples"
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for k, code in enumerate(blocks):
        if any(word in code for word in NEEDS):
            continue
        try:
            exec(compile(code, f"{name}[block {k}]", "exec"), namespace)
        except Exception as exc:  # report which block, with the code
            raise AssertionError(f"{name} block {k} failed: {type(exc).__name__}: {exc}\n---\n{code}") from exc
        ran += 1
    assert ran > 0
