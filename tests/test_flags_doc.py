"""docs/flags.md is every script's --help, verbatim: a flag or help text changed in code must change there too.

python tests/test_flags_doc.py        # rewrites docs/flags.md from the scripts' --help
"""

import contextlib
import importlib
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGS_DOC = ROOT / "docs" / "flags.md"
SCRIPTS = (
    "train", "multi_classification", "predict", "evaluate", "compare", "audit", "ensemble", "bench", "export",
    "source_shift", "demo", "synthetic",
)  # fmt: skip
WIDTH = 116  # argparse wraps at the terminal's width: fixed, so the file does not depend on who wrote it
HEADER = """# Every flag of every script

Generated from each script's `--help` (`python tests/test_flags_doc.py` rewrites this file; a test checks it);
every default that depends on where the weights start lives in one table, `DEFAULTS` in `config.py`.
"""


def help_text(script: str) -> str:
    module = importlib.import_module(script)
    saved_columns, saved_prog = os.environ.get("COLUMNS"), sys.argv[0]
    os.environ["COLUMNS"], sys.argv[0] = str(WIDTH), f"{script}.py"
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            module.parse_args(["--help"])
    finally:
        sys.argv[0] = saved_prog
        if saved_columns is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = saved_columns
    return out.getvalue()


def flags_markdown() -> str:
    return HEADER + "".join(f"\n## `{script}.py`\n\n```\n{help_text(script)}```\n" for script in SCRIPTS)


def test_flags_doc_is_every_scripts_help():
    assert FLAGS_DOC.read_text() == flags_markdown(), "docs/flags.md is stale: run python tests/test_flags_doc.py"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    FLAGS_DOC.write_text(flags_markdown())
    print(f"wrote {FLAGS_DOC}")
