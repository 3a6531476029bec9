"""CI must run exactly the test command the README gives users."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Tests", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_readme_kernel_example_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The kernel", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.+?)\n```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})


def test_docs_and_code_pass_dtype_not_torch_dtype():
    """transformers 5 deprecates from_pretrained(torch_dtype=...) in favour of dtype=."""
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").glob("*.py"),
             *(ROOT / "modelopt_sparse").rglob("*.py")]
    assert len(files) > 10
    offending = [f"{p.relative_to(ROOT)}:{i}" for p in files
                 for i, line in enumerate(p.read_text().splitlines(), 1) if "torch_dtype" in line]
    assert not offending
