"""Coverage-guided fuzzing of the job parser and the MIME builder (atheris, libFuzzer):
mailbus's modules and the standard library's ``email`` package are instrumented, so
inputs that reach new branches are kept and mutated further.

    python -m tests.reliability.atheris_jobs -max_total_time=60 CORPUS_DIR

takes libFuzzer's flags; an input that makes :func:`fuzz_target.check` fail is a crash,
written where ``-artifact_prefix`` says, and the run exits non-zero.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["consumer", "email"]):
    from tests.reliability.fuzz_target import check


def main() -> None:
    """Fuzz until libFuzzer's flags say stop."""
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
