"""The scripts of tools/ as modules, for the tests that call their functions: tools/ is not a package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    """A fresh module of tools/NAME.py, in sys.modules as tool_NAME before it executes (dataclasses look their
    module up there while the class is built)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
