"""OpenAI compatibility with the official openai Node SDK: runs tests/node/conformance.mjs
(the SDK version pinned in tests/node/package.json) against the real stack."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conformance.support import MODEL
from tests.procs import ROOT

NODE_DIR = ROOT / "tests" / "node"


def test_node_sdk_conformance(conf_stack: str) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node SDK conformance needs Node.js >= 20")
    if not (NODE_DIR / "node_modules" / "openai" / "package.json").is_file():
        pytest.fail("tests/node/node_modules is missing: run deploy/setup.sh "
                    "(or: cd tests/node && npm ci --no-audit --no-fund)")
    env = {**os.environ, "BASE_URL": conf_stack, "MODEL": MODEL}
    result = subprocess.run([node, "conformance.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True,
                            timeout=180, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert " passed, 0 failed" in result.stdout, output
