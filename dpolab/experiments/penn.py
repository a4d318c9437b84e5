"""The GPT-2 Penn experiment (`make penn`). Not built yet: it lands with its own issue.

Until then this entry point says so plainly and exits with status 2, so `make penn` never pretends.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "dpolab: the GPT-2 Penn experiment is not implemented yet (see the README's status line).\n"
        "What exists: dpolab.theory, dpolab.logprobs, dpolab.losses and the test suite (make test).",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
